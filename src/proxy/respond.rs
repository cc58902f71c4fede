//! Error replies to clients: always `{"error":{"type","message"}}` JSON with a Content-Length,
//! written so the connection stays usable (Pingora's `respond_error` would close it).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, Result};
use serde::Serialize;

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// The JSON body of an error.
pub fn error_json(kind: &str, message: &str) -> Bytes {
    let envelope = Envelope {
        error: Body { kind, message },
    };
    Bytes::from(serde_json::to_vec(&envelope).expect("strings always serialize"))
}

/// A ready-to-send error reply.
#[derive(Clone, Debug)]
pub struct ErrorReply {
    pub status: u16,
    pub body: Bytes,
    /// Extra headers, e.g. `retry-after`.
    pub headers: Vec<(&'static str, String)>,
}

impl ErrorReply {
    pub fn new(status: u16, kind: &str, message: &str) -> Self {
        Self {
            status,
            body: error_json(kind, message),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    /// The reply's header; `cors`: allowing any origin, so a browser client can read it.
    pub fn to_header(&self, cors: bool) -> Result<ResponseHeader> {
        let mut header = ResponseHeader::build(self.status, Some(4 + self.headers.len()))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", self.body.len().to_string())?;
        for (name, value) in &self.headers {
            header.insert_header(*name, value.as_str())?;
        }
        if cors {
            super::cors::allow_any_origin(&mut header)?;
        }
        Ok(header)
    }

    /// The reply as HTTP/1.1 bytes that close the connection, for a connection refused before
    /// Pingora reads a request from it.
    pub fn to_http1_close(&self, cors: bool) -> Vec<u8> {
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.status,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if cors {
            head.push_str("access-control-allow-origin: *\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Writes the reply on a proxy session, keeping the connection alive.
    pub async fn send(&self, session: &mut Session, cors: bool) -> Result<()> {
        let header = Box::new(self.to_header(cors)?);
        session
            .write_response_header(header, false)
            .await
            .map_err(from_client)?;
        session
            .write_response_body(Some(self.body.clone()), true)
            .await
            .map_err(from_client)
    }
}

/// Marks a failed write of tollgate's own answer as the client's doing (it closed or reset the
/// connection). Pingora leaves the source of such an error unset, which `fail_to_proxy` took
/// for tollgate's own failure: counted `result="502"` and logged as an internal error, once
/// per request a client (a scanner, a cancelled browser request) reset.
pub fn from_client(mut e: Box<Error>) -> Box<Error> {
    e.as_down();
    e
}

/// The fixed replies, serialized once.
pub struct StockReplies {
    pub missing_token: ErrorReply,
    pub unknown_token: ErrorReply,
    pub blocked: ErrorReply,
    pub ip_limit: ErrorReply,
    pub ip_limit_banned: ErrorReply,
    pub expired: ErrorReply,
    pub unreadable_target: ErrorReply,
    pub unsupported_coding: ErrorReply,
}

impl Default for StockReplies {
    fn default() -> Self {
        Self {
            // RFC 9110 wants a challenge on every 401 (RFC 6750's form for a bearer token).
            missing_token: ErrorReply::new(
                401,
                "unauthorized",
                "Unauthorized: send your token as 'Authorization: Bearer <token>'",
            )
            .with_header("www-authenticate", "Bearer realm=\"tollgate\""),
            unknown_token: ErrorReply::new(
                401,
                "unauthorized",
                "Unauthorized: unknown or invalid token",
            )
            .with_header(
                "www-authenticate",
                "Bearer realm=\"tollgate\", error=\"invalid_token\"",
            ),
            blocked: ErrorReply::new(403, "forbidden", "Forbidden (by IP blocklist)"),
            ip_limit: ErrorReply::new(
                403,
                "forbidden",
                "Forbidden: no more IP addresses allowed for this user token",
            ),
            ip_limit_banned: ErrorReply::new(
                403,
                "forbidden",
                "Forbidden: IP address limit exceeded.",
            ),
            expired: ErrorReply::new(403, "forbidden", "Forbidden: Temporary token expired."),
            unreadable_target: ErrorReply::new(
                400,
                "bad_request",
                "The request target must be a path (/...) or an http(s) URL",
            ),
            unsupported_coding: ErrorReply::new(
                400,
                "bad_request",
                "The request body's Transfer-Encoding must be chunked alone",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape_and_escaping() {
        let body = error_json("forbidden", "Forbidden: \"quoted\"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "forbidden");
        assert_eq!(v["error"]["message"], "Forbidden: \"quoted\"");
    }

    #[test]
    fn header_has_length_and_type() {
        let reply =
            ErrorReply::new(429, "proxy_rate_limited", "slow").with_header("retry-after", 3);
        let h = reply.to_header(false).unwrap();
        assert_eq!(h.status.as_u16(), 429);
        assert_eq!(
            h.headers["content-length"],
            reply.body.len().to_string().as_str()
        );
        assert_eq!(h.headers["content-type"], "application/json");
        assert_eq!(h.headers["retry-after"], "3");
    }

    #[test]
    fn raw_reply_closes_and_frames_the_body() {
        let reply = ErrorReply::new(429, "too_many_connections", "busy");
        let raw = String::from_utf8(reply.to_http1_close(true)).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(
            head.contains("\r\naccess-control-allow-origin: *"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert_eq!(body.as_bytes(), &reply.body[..]);
        let plain = String::from_utf8(reply.to_http1_close(false)).unwrap();
        assert!(!plain.contains("access-control"), "{plain}");
    }
}
