//! Plumbing for the admin listener: JSON responses with a Content-Length (Pingora would
//! otherwise close the connection), bounded body reads, and errors with a type and a field.

use std::time::Duration;

use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;
use serde::Serialize;

use crate::encoding::percent_decode;
use crate::proxy::{expects_continue, send_continue};

/// An error answer: `{"error":{"type","message","field"?}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub headers: Vec<(&'static str, String)>,
    /// The request body was not read: the connection cannot be reused.
    pub close: bool,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            field: None,
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn bad_request(field: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        let field = field.into();
        let message = if field.is_empty() {
            problem.to_string()
        } else {
            format!("{field}: {problem}")
        };
        Self {
            field: (!field.is_empty()).then_some(field),
            ..Self::new(400, "invalid_request", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }

    pub fn with_header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn into_response(self) -> Response<Vec<u8>> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            field: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Body<'a>,
        }
        let body = Envelope {
            error: Body {
                kind: self.kind,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let headers: Vec<(&str, &str)> =
            self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        json_response(self.status, &body, &headers)
    }
}

/// A JSON response with Content-Type and Content-Length.
pub fn json_response<T: Serialize + ?Sized>(
    status: u16,
    body: &T,
    headers: &[(&str, &str)],
) -> Response<Vec<u8>> {
    let bytes = serde_json::to_vec(body).expect("API types always serialize");
    bytes_response(status, "application/json", bytes, headers)
}

pub fn bytes_response(
    status: u16,
    content_type: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Response<Vec<u8>> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(body)
        .expect("static header names and checked values")
}

/// Reads the whole request body, refusing more than `limit` bytes or a client that sends
/// nothing for `idle`. The bound is on silence, not on the whole body: a large import over a
/// slow link keeps arriving and is read to the end.
pub async fn read_body(
    session: &mut ServerSession,
    limit: usize,
    idle: Duration,
) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "payload_too_large",
            format!("request body over {limit} bytes"),
        )
        .closing()
    };
    let stalled = || {
        ApiError::new(
            408,
            "request_timeout",
            format!(
                "no part of the request body arrived for {} ms",
                idle.as_millis()
            ),
        )
        .closing()
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // Only now, with the request authorised and its declared size acceptable, is the client
    // told to send the body; an earlier refusal is the final status instead.
    if expects_continue(session.req_header()) {
        // Sent as the proxy sends it: Pingora's own call marked the connection for closing, so
        // every request with `Expect` (curl's large imports) ended its connection.
        tokio::time::timeout(idle, send_continue(session))
            .await
            .map_err(|_| stalled())?
            .map_err(|e| {
                ApiError::bad_request("", format!("could not answer 100 Continue: {e}")).closing()
            })?;
    }
    let mut body = Vec::with_capacity(reserved_for(declared, limit));
    loop {
        let chunk = tokio::time::timeout(idle, session.read_request_body())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| {
                ApiError::bad_request("", format!("could not read the request body: {e}")).closing()
            })?;
        let Some(chunk) = chunk else {
            return Ok(body);
        };
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
}

/// The most memory a declared `Content-Length` reserves before the body arrives; a larger body
/// grows the buffer as it comes. Without a bound, a length near a very high
/// `admin.max_body_bytes` asked for memory the process did not have, which aborts it.
const MAX_RESERVED_BODY: usize = 16 << 20;

/// The body buffer's first capacity: the declared length, within the limit and the bound.
fn reserved_for(declared: Option<usize>, limit: usize) -> usize {
    declared.unwrap_or(0).min(limit).min(MAX_RESERVED_BODY)
}

/// Whether the body is form-encoded (`type=special&nickname=bob`).
pub fn is_form(session: &ServerSession) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Whether a body starts like a JSON object or array (after any white space).
pub fn looks_like_json(body: &[u8]) -> bool {
    matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// A form body as the JSON object of its fields, all strings, as the older proxy's express
/// `urlencoded` handed them to its validation: a number field given this way is refused like a
/// JSON string would be. A field given twice is refused rather than one silently winning.
pub fn form_to_json(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut fields = serde_json::Map::new();
    for (name, value) in form_urlencoded::parse(body) {
        let name = name.into_owned();
        if fields.contains_key(&name) {
            return Err(ApiError::bad_request(name, "is given more than once"));
        }
        fields.insert(name, serde_json::Value::String(value.into_owned()));
    }
    Ok(serde_json::to_vec(&fields).expect("strings always serialize"))
}

/// A JSON object read into `T`. serde's derived structs also accept an array of their fields
/// in order (`["special"]` would create a special user), which no client means to send.
#[derive(Debug)]
pub struct JsonObject<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for JsonObject<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(JsonObject)
    }
}

/// Deserializes a JSON object, naming the field at fault (`users[3].maxIps`).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let JsonObject(value) = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let mut field = if path == "." { String::new() } else { path };
        // Reported at the enclosing object (a duplicate before its value is read, a missing
        // one once the object ended), so not in the path yet.
        if let Some(name) = named_field(&inner.to_string()) {
            field = if field.is_empty() {
                name.to_string()
            } else {
                format!("{field}.{name}")
            };
        }
        // serde_json reports some type errors (a number where an enum belongs) as syntax
        // errors; only a document that does not parse at all is malformed.
        let malformed = (inner.is_syntax() || inner.is_eof())
            && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err();
        if malformed {
            ApiError::bad_request("", format!("malformed JSON: {inner}"))
        } else {
            ApiError::bad_request(field, inner)
        }
    })?;
    // Only white space may follow the object (`{...} ["special"]` is not one object).
    de.end()
        .map_err(|e| ApiError::bad_request("", format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// The name in serde's "duplicate field `name`" and "missing field `name`" errors.
fn named_field(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("duplicate field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split_once('`').map(|(name, _)| name)
}

/// Query parameters, percent-decoded (`+` is a space).
pub fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(k).into_owned(),
                percent_decode(v).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_length_reserves_a_bounded_buffer() {
        assert_eq!(reserved_for(None, 1 << 26), 0);
        assert_eq!(reserved_for(Some(300), 1 << 26), 300);
        // An `admin.max_body_bytes` set very high ("no limit") must not let a declared
        // Content-Length ask for that much memory before a byte arrived (an allocation that
        // fails aborts the process).
        assert_eq!(reserved_for(Some(1 << 60), usize::MAX), 16 << 20);
        assert_eq!(reserved_for(Some(usize::MAX), usize::MAX), 16 << 20);
    }

    #[test]
    fn parse_json_names_fields_and_syntax() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            a: Vec<u32>,
        }
        let e = parse_json::<T>(br#"{"a":[1,"x"]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("a[1]"));
        let e = parse_json::<T>(br#"{"a":"#).unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{e:?}");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn parse_json_takes_objects_only() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct T {
            a: u32,
        }
        assert_eq!(parse_json::<T>(br#" {"a":1} "#).unwrap(), T { a: 1 });
        for body in [&b"[1]"[..], b"null", b"5", br#""a""#] {
            let e = parse_json::<T>(body).unwrap_err();
            assert!(e.message.contains("expected a JSON object"), "{e:?}");
            assert_eq!(e.field, None);
        }
        for body in [&br#"{"a":1}{"a":2}"#[..], br#"{"a":1} [1]"#, br#"{"a":1}]"#] {
            let e = parse_json::<T>(body).unwrap_err();
            assert!(e.message.starts_with("malformed JSON: trailing"), "{e:?}");
        }
    }

    #[test]
    fn a_duplicate_or_missing_field_is_named() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Inner {
            b: u32,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            a: Option<u32>,
            inner: Option<JsonObject<Inner>>,
        }
        let e = parse_json::<T>(br#"{"a":1,"a":2}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("a"), "{e:?}");
        let e = parse_json::<T>(br#"{"inner":{"b":1,"b":2}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner.b"), "{e:?}");
        let e = parse_json::<T>(br#"{"inner":[1]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner"), "{e:?}");
        // A missing field is reported at its object, once the object ended.
        let e = parse_json::<T>(br#"{"inner":{}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner.b"), "{e:?}");
    }

    #[test]
    fn query_decoding() {
        let q = query_params(Some("disabledReason=too+many%20requests&hard=true&bad=%zz"));
        assert_eq!(q[0], ("disabledReason".into(), "too many requests".into()));
        assert_eq!(q[1], ("hard".into(), "true".into()));
        assert_eq!(q[2].1, "%zz");
    }

    #[test]
    fn error_body_shape() {
        let r = ApiError::bad_request("users[0].ip", "nope").into_response();
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request");
        assert_eq!(v["error"]["field"], "users[0].ip");
        assert_eq!(
            r.headers()["content-length"],
            r.body().len().to_string().as_str()
        );
    }
}
