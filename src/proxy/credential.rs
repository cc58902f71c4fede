//! Where a client's token comes from: `Authorization: Bearer`, then `x-api-key`, then the
//! `key` query parameter (the older proxy's order). In `proxy_key` and `user_token` modes every
//! one of these is removed before the request goes upstream ([`strip_all`]): a client that sends
//! its key in several places must not leak the ones not read. In `none` mode only the source
//! read is removed ([`strip`]), as the older proxy did, since no key is being protected there.

use std::borrow::Cow;

use http::uri::{PathAndQuery, Uri};
use pingora::http::RequestHeader;

use crate::encoding::percent_decode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    Authorization,
    XApiKey,
    QueryKey,
}

/// The token and where it was found.
pub fn extract(req: &RequestHeader) -> Option<(CredentialSource, Cow<'_, str>)> {
    if let Some(token) = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()))
    {
        return Some((CredentialSource::Authorization, Cow::Borrowed(token)));
    }
    if let Some(token) = req
        .headers
        .get("x-api-key")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some((CredentialSource::XApiKey, Cow::Borrowed(token)));
    }
    query_key(req.uri.query()?).map(|t| (CredentialSource::QueryKey, t))
}

/// The token of `Bearer <token>` (scheme case-insensitive). The older proxy sliced off seven
/// characters whatever the scheme; any other scheme is not a tollgate credential.
pub fn bearer(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The first `key=` parameter that is not empty once percent-decoded and trimmed (presented
/// tokens are trimmed wherever they come from).
fn query_key(query: &str) -> Option<Cow<'_, str>> {
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("key="))
        .map(|value| trimmed(percent_decode(value)))
        .find(|v| !v.is_empty())
}

/// `value` without leading and trailing white space; allocates only when a decoded value
/// (already owned) had some.
fn trimmed(value: Cow<'_, str>) -> Cow<'_, str> {
    match value {
        Cow::Borrowed(v) => Cow::Borrowed(v.trim()),
        Cow::Owned(v) if v.trim().len() == v.len() => Cow::Owned(v),
        Cow::Owned(v) => Cow::Owned(v.trim().to_string()),
    }
}

/// Removes the credential the client used from the upstream request.
pub fn strip(req: &mut RequestHeader, source: CredentialSource) {
    match source {
        CredentialSource::Authorization => {
            req.remove_header(&http::header::AUTHORIZATION);
        }
        CredentialSource::XApiKey => {
            req.remove_header("x-api-key");
        }
        CredentialSource::QueryKey => {
            if let Some(uri) = without_key_param(&req.uri) {
                req.set_uri(uri);
            }
        }
    }
}

/// Removes every tollgate credential from the upstream request: each `Authorization` value
/// with the Bearer scheme (another scheme is not a tollgate credential and is passed on),
/// `x-api-key`, and every `key` query parameter. Allocates only when something other than
/// Bearer values must be kept beside them, or a `key` parameter must be cut from the query.
pub fn strip_all(req: &mut RequestHeader) {
    strip_bearer(req);
    req.remove_header("x-api-key");
    if req.uri.query().is_some_and(has_key_param) {
        if let Some(uri) = without_key_param(&req.uri) {
            req.set_uri(uri);
        }
    }
}

/// Removes the Bearer `Authorization` values and keeps any other.
fn strip_bearer(req: &mut RequestHeader) {
    let (mut bearers, mut others) = (0usize, 0usize);
    for value in req.headers.get_all(http::header::AUTHORIZATION) {
        if bearer(value.as_bytes()).is_some() {
            bearers += 1;
        } else {
            others += 1;
        }
    }
    if bearers == 0 {
        return;
    }
    if others == 0 {
        req.remove_header(&http::header::AUTHORIZATION);
        return;
    }
    // Rare: a Bearer value beside another scheme; only the other survives.
    let kept: Vec<_> = req
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter(|v| bearer(v.as_bytes()).is_none())
        .cloned()
        .collect();
    req.remove_header(&http::header::AUTHORIZATION);
    for value in kept {
        // Re-adding a value that was valid in the same header cannot fail.
        let _ = req.append_header(http::header::AUTHORIZATION, value);
    }
}

/// Whether the query holds a `key` parameter (with or without a value), without allocating.
fn has_key_param(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair == "key" || pair.starts_with("key="))
}

/// The URI without any `key=` parameter.
fn without_key_param(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| *pair != "key" && !pair.starts_with("key="))
        .collect();
    let path_and_query = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn token(r: &RequestHeader) -> Option<(CredentialSource, String)> {
        extract(r).map(|(s, t)| (s, t.into_owned()))
    }

    #[test]
    fn bearer_wins_then_api_key_then_query() {
        let r = req(
            "/v1?key=q",
            &[("authorization", "Bearer a"), ("x-api-key", "x")],
        );
        assert_eq!(
            token(&r),
            Some((CredentialSource::Authorization, "a".into()))
        );
        let r = req("/v1?key=q", &[("x-api-key", "x")]);
        assert_eq!(token(&r), Some((CredentialSource::XApiKey, "x".into())));
        let r = req("/v1?a=1&key=q", &[]);
        assert_eq!(token(&r), Some((CredentialSource::QueryKey, "q".into())));
        assert_eq!(token(&req("/v1", &[])), None);
        // An empty credential is no credential: the next place is read, as the older proxy's
        // `||` chain did.
        let r = req(
            "/v1?key=q",
            &[("authorization", "Bearer   "), ("x-api-key", "")],
        );
        assert_eq!(token(&r), Some((CredentialSource::QueryKey, "q".into())));
    }

    #[test]
    fn scheme_is_checked_case_insensitively() {
        assert_eq!(
            token(&req("/", &[("authorization", "bearer  t1 ")]))
                .unwrap()
                .1,
            "t1"
        );
        assert_eq!(
            token(&req("/", &[("authorization", "Basic dXNlcjpw")])),
            None
        );
        assert_eq!(token(&req("/", &[("authorization", "Bearer")])), None);
        let r = req("/", &[("authorization", "Basic x"), ("x-api-key", "k")]);
        assert_eq!(token(&r).unwrap().0, CredentialSource::XApiKey);
    }

    #[test]
    fn query_key_is_percent_decoded() {
        assert_eq!(token(&req("/?key=a%2Db", &[])).unwrap().1, "a-b");
        assert_eq!(token(&req("/?key=%zz", &[])).unwrap().1, "%zz");
        assert_eq!(token(&req("/?key=%4", &[])).unwrap().1, "%4");
        assert_eq!(token(&req("/?key=&key=second", &[])).unwrap().1, "second");
        // As express's query parser read it: `+` is a space in a query string.
        assert_eq!(token(&req("/?key=a+b", &[])).unwrap().1, "a b");
    }

    /// Found by the decision model: presented tokens are trimmed (docs/user-management.md),
    /// as `Authorization` and `x-api-key` are, but a `key` query parameter was not, so
    /// `?key=<token>+` (a trailing space) was refused as an unknown token, and `?key=%20`
    /// counted as a wrong token rather than none.
    #[test]
    fn query_key_is_trimmed_like_the_headers() {
        assert_eq!(token(&req("/?key=%20t1+", &[])).unwrap().1, "t1");
        assert_eq!(token(&req("/?key=t1%09", &[])).unwrap().1, "t1");
        assert_eq!(token(&req("/?key=+&key=%20t2", &[])).unwrap().1, "t2");
        assert_eq!(token(&req("/?key=%20", &[])), None);
    }

    #[test]
    fn strip_all_removes_every_credential_source() {
        let mut r = req(
            "/p?key=pk&a=1&key&b=2",
            &[
                ("authorization", "Bearer pk"),
                ("x-api-key", "pk"),
                ("x-api-key", "pk2"),
            ],
        );
        strip_all(&mut r);
        assert!(r.headers.get("authorization").is_none());
        assert!(r.headers.get("x-api-key").is_none());
        assert_eq!(r.uri.to_string(), "/p?a=1&b=2");
    }

    #[test]
    fn strip_all_keeps_other_authorization_schemes_and_queries() {
        let mut r = req(
            "/p?monkey=1&keys=2",
            &[
                ("authorization", "Basic dXNlcjpw"),
                ("authorization", "bearer pk"),
            ],
        );
        strip_all(&mut r);
        let auth: Vec<_> = r.headers.get_all("authorization").iter().collect();
        assert_eq!(auth, vec!["Basic dXNlcjpw"]);
        assert_eq!(r.uri.to_string(), "/p?monkey=1&keys=2", "no key parameter");
        let mut r = req("/p", &[("authorization", "Basic x")]);
        strip_all(&mut r);
        assert_eq!(r.headers.get("authorization").unwrap(), "Basic x");
        let mut r = req("/p?key=pk", &[]);
        strip_all(&mut r);
        assert_eq!(r.uri.to_string(), "/p");
    }

    #[test]
    fn strip_removes_only_the_used_credential() {
        let mut r = req("/p?a=1&key=k&b=2", &[("x-api-key", "x")]);
        strip(&mut r, CredentialSource::QueryKey);
        assert_eq!(r.uri.to_string(), "/p?a=1&b=2");
        assert!(r.headers.get("x-api-key").is_some());
        let mut r = req("/p?key=k", &[]);
        strip(&mut r, CredentialSource::QueryKey);
        assert_eq!(r.uri.to_string(), "/p");
        let mut r = req("/p", &[("authorization", "Bearer a"), ("x-api-key", "x")]);
        strip(&mut r, CredentialSource::Authorization);
        assert!(r.headers.get("authorization").is_none());
        assert!(r.headers.get("x-api-key").is_some());
    }
}
