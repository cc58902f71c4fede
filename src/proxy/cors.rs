//! CORS as the older proxy's global `cors()` middleware answered it, so browser clients keep
//! working: a preflight is answered here, before any credential is asked for (it carries none,
//! and must not count as a failed authentication), and every reply allows any origin.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, CONTENT_LENGTH, VARY,
};
use http::{HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

/// The `cors` package's default methods.
const ALLOWED_METHODS: &str = "GET,HEAD,PUT,PATCH,POST,DELETE";

/// An `OPTIONS` request asking what a cross-origin request may do (the Fetch standard's
/// definition of a preflight). Other `OPTIONS` requests are proxied like any request.
pub fn is_preflight(req: &RequestHeader) -> bool {
    req.method == Method::OPTIONS && req.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// 204 allowing any origin, the default methods and whatever headers the browser asked for.
pub fn preflight_reply(req: &RequestHeader) -> Result<ResponseHeader> {
    let mut reply = ResponseHeader::build(204, Some(5))?;
    reply.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"))?;
    reply.insert_header(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOWED_METHODS),
    )?;
    if let Some(asked) = req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS) {
        reply.insert_header(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone())?;
        reply.insert_header(
            VARY,
            HeaderValue::from_static("Access-Control-Request-Headers"),
        )?;
    }
    reply.insert_header(CONTENT_LENGTH, HeaderValue::from_static("0"))?;
    Ok(reply)
}

/// Allows any origin on a reply, unless the upstream already said which.
pub fn allow_any_origin(reply: &mut ResponseHeader) -> Result<()> {
    if reply.headers.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) {
        return Ok(());
    }
    // A static name: Pingora copies a `HeaderName` it has no title case for, on every reply.
    reply.insert_header("access-control-allow-origin", HeaderValue::from_static("*"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/v1/chat/completions", None).unwrap();
        for (name, value) in headers {
            req.insert_header(name.to_string(), *value).unwrap();
        }
        req
    }

    #[test]
    fn only_options_asking_for_a_method_is_a_preflight() {
        let asking = [("access-control-request-method", "POST")];
        assert!(is_preflight(&request("OPTIONS", &asking)));
        assert!(!is_preflight(&request("OPTIONS", &[])));
        assert!(!is_preflight(&request("POST", &asking)));
    }

    #[test]
    fn the_preflight_reply_allows_what_was_asked() {
        let req = request(
            "OPTIONS",
            &[
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,content-type",
                ),
            ],
        );
        let reply = preflight_reply(&req).unwrap();
        assert_eq!(reply.status, 204);
        let header = |name: &str| reply.headers.get(name).unwrap().to_str().unwrap();
        assert_eq!(header("access-control-allow-origin"), "*");
        assert_eq!(header("access-control-allow-methods"), ALLOWED_METHODS);
        assert_eq!(
            header("access-control-allow-headers"),
            "authorization,content-type"
        );
        assert_eq!(header("content-length"), "0");
    }

    #[test]
    fn an_upstream_origin_policy_is_kept() {
        let mut reply = ResponseHeader::build(200, None).unwrap();
        reply
            .insert_header("access-control-allow-origin", "https://app.example")
            .unwrap();
        allow_any_origin(&mut reply).unwrap();
        assert_eq!(
            reply.headers["access-control-allow-origin"],
            "https://app.example"
        );
        let mut bare = ResponseHeader::build(200, None).unwrap();
        allow_any_origin(&mut bare).unwrap();
        assert_eq!(bare.headers["access-control-allow-origin"], "*");
    }
}
