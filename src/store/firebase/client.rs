//! The RTDB REST client: `<db>/<path>.json` requests with the Bearer token, redirects followed
//! by hand (reqwest would drop `Authorization` on a host change), one retry with a fresh token
//! after a 401, and errors classified by what they mean for a write: not sent, refused, or
//! ambiguous (it may have been applied).

use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, LOCATION};
use reqwest::{Method, StatusCode, Url};

use super::auth::{AuthError, TokenSource};

const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one REST request (not streams).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the database is and which redirect targets are trusted.
#[derive(Debug, Clone)]
pub struct Target {
    /// Scheme, host and port only.
    pub base: Url,
    /// `?ns=<db>`, sent on every request (the emulator needs it).
    pub ns: Option<String>,
    /// Plain http and loopback redirect targets allowed (emulator or stand-in).
    pub local: bool,
}

impl Target {
    /// The URL of a database path (`""` is the root, `"users/abc"` a child).
    pub fn url(&self, path: &str, query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let mut out = url.path_segments_mut().expect("http URLs have paths");
            out.clear();
            match segments.split_last() {
                None => {
                    out.push(".json");
                }
                Some((last, parents)) => {
                    out.extend(parents);
                    out.push(&format!("{last}.json"));
                }
            }
        }
        {
            let mut pairs = url.query_pairs_mut();
            pairs.clear();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
            if let Some(ns) = &self.ns {
                pairs.append_pair("ns", ns);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    /// Whether a redirect may be followed there with the token: the configured host, Firebase's
    /// own hosts over https, or (emulator and stand-in only) loopback addresses.
    pub fn may_redirect_to(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        if url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
        {
            return true;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match url.scheme() {
            "https" => {
                host.ends_with(".firebaseio.com")
                    || host.ends_with(".firebasedatabase.app")
                    || (self.local && is_loopback(host))
            }
            "http" => self.local && is_loopback(host),
            _ => false,
        }
    }
}

/// `localhost` or a loopback address (IPv6 without its brackets).
pub(super) fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What went wrong with a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RtdbError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The request never reached the server: safe to resend.
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    /// Sent, but no complete answer (timeout, reset): a write may or may not have applied.
    #[error("no answer from the database: {0}")]
    Ambiguous(String),
    /// 5xx: the server may or may not have applied a write.
    #[error("the database answered {status}: {message}")]
    Server { status: u16, message: String },
    /// 401 with a fresh token, or 403: the account may not do this.
    #[error("permission denied ({status}): {message}")]
    Denied { status: u16, message: String },
    /// 400: the request itself is wrong (a bad key, a bad value); nothing was applied.
    #[error("the database refused the request: {0}")]
    BadRequest(String),
    /// 412 on a conditional write: the value changed; body and ETag are the current ones.
    #[error("the value changed since it was read")]
    Precondition { body: Bytes, etag: Option<String> },
    /// A compare-and-set kept losing to other writers: retry later, nothing is wrong with
    /// the request.
    #[error("{0}")]
    Contended(String),
    #[error("the database answered {status}: {message}")]
    Other { status: u16, message: String },
    #[error("refused to follow a redirect: {0}")]
    Redirect(String),
}

impl RtdbError {
    /// Errors that retrying will not cure (wrong key, no permission, wrong URL).
    pub fn is_permanent(&self) -> bool {
        match self {
            RtdbError::Auth(e) => e.is_permanent(),
            RtdbError::Denied { .. } | RtdbError::BadRequest(_) | RtdbError::Redirect(_) => true,
            RtdbError::Other { status, .. } => *status != 408 && *status != 429,
            _ => false,
        }
    }

    /// The database (or the way to it) failed, not the request: every other request would
    /// fail now too, so a batch is kept whole and retried with backoff. Other failures of a
    /// request about one user (a compare-and-set that keeps losing, a refusal) are that
    /// user's, and are kept apart from the rest of the batch.
    pub fn is_database_wide(&self) -> bool {
        match self {
            RtdbError::Auth(_)
            | RtdbError::Connect(_)
            | RtdbError::Ambiguous(_)
            | RtdbError::Server { .. }
            | RtdbError::Redirect(_) => true,
            RtdbError::Other { status, .. } => *status == 408 || *status == 429,
            RtdbError::Denied { .. }
            | RtdbError::BadRequest(_)
            | RtdbError::Precondition { .. }
            | RtdbError::Contended(_) => false,
        }
    }

    /// A write that failed this way may have been applied.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, RtdbError::Ambiguous(_) | RtdbError::Server { .. })
    }
}

/// One request to the database.
pub struct Request<'a> {
    pub method: Method,
    pub path: &'a str,
    pub query: Vec<(&'a str, String)>,
    pub body: Option<Bytes>,
    /// `X-Firebase-ETag: true`.
    pub etag: bool,
    pub if_match: Option<String>,
    pub stream: bool,
    pub timeout: Option<Duration>,
}

impl<'a> Request<'a> {
    pub fn new(method: Method, path: &'a str) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            body: None,
            etag: false,
            if_match: None,
            stream: false,
            timeout: Some(REQUEST_TIMEOUT),
        }
    }

    pub fn json(mut self, body: Vec<u8>) -> Self {
        self.body = Some(Bytes::from(body));
        self
    }

    pub fn query(mut self, key: &'a str, value: &str) -> Self {
        self.query.push((key, value.to_string()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value, RtdbError> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| RtdbError::Ambiguous(format!("the database sent invalid JSON: {e}")))
    }
}

/// A database client bound to the runtime it was created on.
#[derive(Clone)]
pub struct Rtdb {
    http: reqwest::Client,
    target: Arc<Target>,
    auth: Arc<TokenSource>,
}

/// rustls needs a process-wide crypto provider; Pingora's is ring, so is ours.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client that follows no redirects by itself.
pub fn http_client() -> Result<reqwest::Client, String> {
    install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(50))
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", describe(&e)))
}

impl Rtdb {
    pub fn new(target: Arc<Target>, auth: Arc<TokenSource>) -> Result<Self, String> {
        Ok(Self {
            http: http_client()?,
            target,
            auth,
        })
    }

    pub fn auth(&self) -> &TokenSource {
        &self.auth
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends `req` and reads the whole answer; non-2xx answers become errors (except 304).
    pub async fn call(&self, req: Request<'_>) -> Result<Reply, RtdbError> {
        let timeout = req.timeout;
        let response = self.execute(&req).await?;
        let status = response.status();
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let read = response.bytes();
        let body = match timeout {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| RtdbError::Ambiguous("timed out reading the answer".into()))?,
            None => read.await,
        }
        .map_err(|e| RtdbError::Ambiguous(describe(&e)))?;
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(Reply { status, etag, body });
        }
        Err(status_error(status, body, etag))
    }

    /// Sends `req`: redirects by hand, and once more with a fresh token after a 401. Returns
    /// the final response whatever its status (except 401 after the retry, and redirects).
    pub async fn execute(&self, req: &Request<'_>) -> Result<reqwest::Response, RtdbError> {
        let mut refreshed = false;
        loop {
            let token = self.auth.token(&self.http).await?;
            let response = self.follow_redirects(req, &token).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let body = response.bytes().await.unwrap_or_default();
            if refreshed || matches!(*self.auth, TokenSource::Emulator) {
                return Err(RtdbError::Denied {
                    status: 401,
                    message: error_message(&body),
                });
            }
            self.auth.invalidate(&token).await;
            refreshed = true;
        }
    }

    async fn follow_redirects(
        &self,
        req: &Request<'_>,
        token: &str,
    ) -> Result<reqwest::Response, RtdbError> {
        let mut url = self.target.url(req.path, &req.query);
        for _ in 0..=MAX_REDIRECTS {
            let mut builder = self
                .http
                .request(req.method.clone(), url.clone())
                .headers(self.headers(req, token)?);
            if let Some(body) = &req.body {
                builder = builder
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            if let Some(t) = req.timeout {
                builder = builder.timeout(t);
            }
            let response = builder.send().await.map_err(|e| {
                if e.is_connect() {
                    RtdbError::Connect(describe(&e))
                } else {
                    RtdbError::Ambiguous(describe(&e))
                }
            })?;
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| RtdbError::Redirect("a redirect without Location".into()))?;
            let next = url
                .join(location)
                .map_err(|_| RtdbError::Redirect("an invalid Location".into()))?;
            if !self.target.may_redirect_to(&next) {
                return Err(RtdbError::Redirect(format!(
                    "to {}://{} is not a Firebase database host",
                    next.scheme(),
                    next.host_str().unwrap_or("?")
                )));
            }
            url = next;
        }
        Err(RtdbError::Redirect(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    fn headers(&self, req: &Request<'_>, token: &str) -> Result<HeaderMap, RtdbError> {
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| AuthError::Unavailable("the access token is not a header value".into()))?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        if req.stream {
            headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        if req.etag {
            headers.insert("x-firebase-etag", HeaderValue::from_static("true"));
        }
        if let Some(tag) = &req.if_match {
            let value = HeaderValue::from_str(tag)
                .map_err(|_| RtdbError::BadRequest("an ETag that is not a header value".into()))?;
            headers.insert("if-match", value);
        }
        Ok(headers)
    }
}

/// The error for a non-success status.
pub fn status_error(status: StatusCode, body: Bytes, etag: Option<String>) -> RtdbError {
    let code = status.as_u16();
    match code {
        400 => RtdbError::BadRequest(error_message(&body)),
        401 | 403 => RtdbError::Denied {
            status: code,
            message: error_message(&body),
        },
        412 => RtdbError::Precondition { body, etag },
        500..=599 => RtdbError::Server {
            status: code,
            message: error_message(&body),
        },
        _ => RtdbError::Other {
            status: code,
            message: error_message(&body),
        },
    }
}

/// `{"error": "..."}` as Firebase sends it, else the start of the raw text.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => snippet(body),
    }
}

/// At most 200 characters of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut out: String = text.chars().take(200).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// A reqwest error with its causes, without the URL (it may contain a user's token).
pub fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut text = String::new();
    let stripped = clone_without_url(e);
    text.push_str(&stripped);
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn clone_without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else if e.is_body() || e.is_decode() {
        "the answer broke off".into()
    } else if e.is_request() {
        "the request failed".into()
    } else {
        "HTTP error".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, local: bool) -> Target {
        Target {
            base: Url::parse(url).unwrap(),
            ns: None,
            local,
        }
    }

    #[test]
    fn builds_database_urls() {
        let t = target("https://db.firebaseio.com", false);
        assert_eq!(t.url("", &[]).as_str(), "https://db.firebaseio.com/.json");
        assert_eq!(
            t.url("users/a b%", &[("print", "silent".into())]).as_str(),
            "https://db.firebaseio.com/users/a%20b%25.json?print=silent"
        );
        let mut t = target("http://127.0.0.1:9000", true);
        t.ns = Some("my-db".into());
        assert_eq!(
            t.url("_sync/instances/x/seq", &[]).as_str(),
            "http://127.0.0.1:9000/_sync/instances/x/seq.json?ns=my-db"
        );
    }

    #[test]
    fn redirects_only_to_trusted_hosts() {
        let prod = target("https://db.firebaseio.com", false);
        let ok = |t: &Target, u: &str| t.may_redirect_to(&Url::parse(u).unwrap());
        assert!(ok(
            &prod,
            "https://s-usc1c-nss-118.firebaseio.com/users.json?ns=db&sse=true"
        ));
        assert!(ok(
            &prod,
            "https://db.europe-west1.firebasedatabase.app/x.json"
        ));
        assert!(!ok(
            &prod,
            "http://s-usc1c-nss-118.firebaseio.com/users.json"
        ));
        assert!(!ok(&prod, "https://evil.example/users.json"));
        assert!(!ok(&prod, "https://firebaseio.com.evil.example/users.json"));
        assert!(!ok(&prod, "http://127.0.0.2:9000/users.json"));
        let local = target("http://127.0.0.1:9000", true);
        assert!(ok(
            &local,
            "http://127.0.0.2:41234/users.json?ns=db&sse=true"
        ));
        assert!(ok(&local, "http://localhost:1/x.json"));
        assert!(!ok(&local, "http://10.0.0.1:1/x.json"));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(br#"{"error":"Permission denied"}"#),
            "Permission denied"
        );
        assert_eq!(
            error_message(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
        assert!(status_error(StatusCode::BAD_REQUEST, Bytes::new(), None).is_permanent());
        assert!(status_error(StatusCode::SERVICE_UNAVAILABLE, Bytes::new(), None).is_ambiguous());
    }
}
