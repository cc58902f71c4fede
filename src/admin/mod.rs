//! The admin listener (a second Pingora service, loopback by default): the `/admin/users` REST
//! API behind `ADMIN_KEY`, plus `/health`, `/ready` and `/metrics` for operators. The proxy
//! listener never serves any of these.

pub mod auth;
pub mod http;
pub mod users;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::{Method, Response};
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

use crate::config::Config;
use crate::encoding::percent_decode_segment;
use crate::net::{peer_ip, request_client_ip, CidrSet};
use crate::observe::Metrics;
use crate::proxy::{connection, expects_continue};
use crate::store::StoreStatus;
use crate::users::UserCache;
use auth::AdminAuth;
use http::{
    bytes_response, form_to_json, is_form, json_response, looks_like_json, read_body, ApiError,
};
use users::UsersApi;

/// Every route the admin listener serves: `(method, path pattern)`. `docs/openapi.yaml`
/// documents exactly these; a test keeps the two in step.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("HEAD", "/health"),
    ("GET", "/ready"),
    ("HEAD", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/admin/users"),
    ("HEAD", "/admin/users"),
    ("POST", "/admin/users"),
    ("PUT", "/admin/users"),
    ("GET", "/admin/users/{token}"),
    ("HEAD", "/admin/users/{token}"),
    ("PUT", "/admin/users/{token}"),
    ("DELETE", "/admin/users/{token}"),
];

pub struct AdminService {
    auth: AdminAuth,
    users: UsersApi,
    status: Arc<StoreStatus>,
    metrics: Arc<Metrics>,
    trusted_proxies: CidrSet,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    /// `clients.keepalive_timeout_seconds` (0: no limit); Pingora's own is 60 s.
    keepalive_timeout_seconds: u64,
}

enum Route<'a> {
    Health,
    Ready,
    Metrics,
    Users,
    User(&'a str),
}

impl AdminService {
    pub fn new(
        config: &Config,
        cache: Arc<UserCache>,
        status: Arc<StoreStatus>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let admin = &config.admin;
        Self {
            auth: AdminAuth::new(
                config.secrets.admin_key.clone(),
                config.ip_blocklist.clone(),
                admin.allow.clone(),
                admin.lockout_after_failures,
                admin.lockout,
            ),
            users: UsersApi::new(cache, Arc::clone(&status), admin.persist_timeout),
            status,
            metrics,
            trusted_proxies: admin.trusted_proxies.clone(),
            max_body_bytes: admin.max_body_bytes,
            body_read_timeout: admin.body_read_timeout,
            keepalive_timeout_seconds: config.clients.keepalive_timeout_seconds,
        }
    }

    async fn handle(&self, session: &mut ServerSession) -> Result<Response<Vec<u8>>, ApiError> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().map(str::to_string);
        let route =
            route(&path).ok_or_else(|| ApiError::not_found(format!("no such endpoint: {path}")))?;
        let allowed = allowed_methods(&route);
        if !allowed.contains(&method.as_str()) {
            return Err(ApiError::new(
                405,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            )
            .with_header("allow", allowed.join(", ")));
        }
        let ip = request_client_ip(
            peer_ip(session),
            session.req_header(),
            &self.trusted_proxies,
        );
        match route {
            Route::Health => {
                return Ok(json_response(
                    200,
                    &serde_json::json!({"status": "ok"}),
                    &[],
                ))
            }
            Route::Ready => return Ok(self.ready()),
            Route::Metrics => {
                self.auth.allowed(ip)?;
                let body = self.metrics.render(self.status.gauges());
                return Ok(bytes_response(200, "text/plain; version=0.0.4", body, &[]));
            }
            Route::Users | Route::User(_) => {
                let authorization = session
                    .req_header()
                    .headers
                    .get(::http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                self.auth.authorize(ip, authorization, Instant::now())?;
            }
        }
        let writes = matches!(method, Method::POST | Method::PUT | Method::DELETE);
        if writes && self.status.is_leaving() {
            return Err(leaving());
        }
        // The token is decoded as a path segment: `+` is a literal plus, not a space.
        let token = match route {
            Route::User(raw) => percent_decode_segment(raw).map_err(|_| {
                ApiError::bad_request(
                    "token",
                    "the path segment is not valid UTF-8 after percent-decoding",
                )
            })?,
            _ => Default::default(),
        };
        let body = if method == Method::POST || method == Method::PUT {
            let body = read_body(session, self.max_body_bytes, self.body_read_timeout).await?;
            // `curl -d '{...}'` labels JSON as a form; no form this API takes starts so.
            if is_form(session) && !looks_like_json(&body) {
                form_to_json(&body)?
            } else {
                body
            }
        } else {
            Vec::new()
        };
        let query = query.as_deref();
        match (method, route) {
            (Method::GET | Method::HEAD, Route::Users) => self.users.list(query).await,
            (Method::POST, Route::Users) => self.users.create(&body).await,
            (Method::PUT, Route::Users) => self.users.upsert_many(body).await,
            (Method::GET | Method::HEAD, Route::User(_)) => self.users.get(&token),
            (Method::PUT, Route::User(_)) => self.users.upsert(&token, &body).await,
            (Method::DELETE, Route::User(_)) => self.users.delete(&token, query).await,
            _ => unreachable!("methods checked against allowed_methods above"),
        }
    }

    fn ready(&self) -> Response<Vec<u8>> {
        let gauges = self.status.gauges();
        let body = serde_json::json!({
            "ready": gauges.ready,
            "store": self.status.store(),
            "users": gauges.users_in_cache,
            "streamConnected": gauges.stream_connected,
        });
        json_response(if gauges.ready { 200 } else { 503 }, &body, &[])
    }
}

/// A write sent to a process that is handing over to a new one (or stopping). The client's
/// retry on a new connection reaches the new process: Pingora's old process stops accepting
/// within 5 s of the hand-over.
fn leaving() -> ApiError {
    ApiError::new(
        503,
        "shutting_down",
        "this tollgate process is handing over to a new one or stopping and takes no more \
         changes; retry in a moment (the new process will take it)",
    )
    .with_header("retry-after", 1)
    .closing()
}

/// The `/admin/users` paths are matched as the older proxy's express router matched them:
/// the literal part case-insensitively (`/Admin/Users` too) and with one optional trailing
/// slash (`/admin/users/{token}/` is the user `{token}`), so scripts written against it keep
/// working. The token keeps its case. tollgate's own `/health`, `/ready` and `/metrics` are
/// exact.
fn route(path: &str) -> Option<Route<'_>> {
    match path {
        "/health" => return Some(Route::Health),
        "/ready" => return Some(Route::Ready),
        "/metrics" => return Some(Route::Metrics),
        _ => {}
    }
    const USERS: &str = "/admin/users";
    let prefix = path.get(..USERS.len())?;
    if !prefix.eq_ignore_ascii_case(USERS) {
        return None;
    }
    match &path[USERS.len()..] {
        "" | "/" => Some(Route::Users),
        rest => {
            let token = rest.strip_prefix('/')?;
            let token = token.strip_suffix('/').unwrap_or(token);
            (!token.is_empty() && !token.contains('/')).then_some(Route::User(token))
        }
    }
}

/// Whether the client lets the connection be reused after this request: HTTP/1.1 unless it
/// sent `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
fn client_keeps_alive(req: &pingora::http::RequestHeader) -> bool {
    let has = |token: &str| {
        req.headers
            .get_all(::http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if has("close") {
        return false;
    }
    req.version >= ::http::Version::HTTP_11 || has("keep-alive")
}

fn allowed_methods(route: &Route<'_>) -> &'static [&'static str] {
    match route {
        // HEAD for load balancers that probe with it; Pingora sends no body for HEAD.
        Route::Health | Route::Ready => &["GET", "HEAD"],
        Route::Metrics => &["GET"],
        // HEAD as express answered it for every GET route: the GET's status and headers.
        Route::Users => &["GET", "HEAD", "POST", "PUT"],
        Route::User(_) => &["GET", "HEAD", "PUT", "DELETE"],
    }
}

/// Pingora's `ServeHttp` loop (read, answer, reuse the connection), except that a request
/// Pingora refuses while reading its header (two `Host` headers, an absolute URL whose host is
/// not `Host`'s, `Content-Length` values that differ, a header line it cannot parse) gets a
/// 400 and the end, as on the proxy listener; that loop closed the connection without a word.
#[async_trait]
impl HttpServerApp for AdminService {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype, pingora::ErrorType::InvalidHTTPHeader) {
                    refuse_malformed(&mut session).await;
                }
                return None;
            }
        }
        // Keep-alive off while shutting down (the handler leaves it so), 60 s otherwise.
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        let (parts, body) = self.response(&mut session).await.into_parts();
        let header: ResponseHeader = parts.into();
        if session
            .write_response_header(Box::new(header))
            .await
            .is_err()
        {
            return None;
        }
        if !body.is_empty()
            && session
                .write_response_body(body.into(), true)
                .await
                .is_err()
        {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(_) => None,
        }
    }
}

/// Answers a request whose header Pingora refused. The message names no part of it: the
/// header may hold the admin key.
async fn refuse_malformed(session: &mut ServerSession) {
    let (parts, body) = ApiError::bad_request(
        "",
        "the request could not be read: malformed header or framing",
    )
    .into_response()
    .into_parts();
    let header: ResponseHeader = parts.into();
    // The connection is closed after it either way.
    let _ = session.write_error_response(header, body.into()).await;
    session.shutdown().await;
}

impl AdminService {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Pingora turns keep-alive off while shutting down (left so) and sets 60 s otherwise,
        // over its own reading of the request's wish (an HTTP/1.0 client then waited for an
        // end that never came).
        if session.get_keepalive().is_some() {
            let keep = client_keeps_alive(session.req_header());
            session.set_keepalive(keep.then_some(self.keepalive_timeout_seconds));
        }
        // Requests sent ahead of their answers are answered in order, as on the proxy
        // listener; Pingora's default answered the first and dropped the others.
        session.set_pipelining_enabled(true);
        connection::header_received(session);
        let response = self.handle(session).await;
        // Reads from here on are the next request's header, or a body left unread that Pingora
        // drains before it reuses the connection: both under the header deadline.
        connection::request_finished(session);
        match response {
            Ok(response) => response,
            Err(error) => {
                // A client still holding back its body after `Expect: 100-continue` may send
                // it or not: the connection cannot be reused either way.
                if error.close
                    || (expects_continue(session.req_header()) && !session.is_body_done())
                {
                    session.set_keepalive(None);
                }
                error.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_table_matches_the_router() {
        for (method, pattern) in ROUTES {
            let path = pattern.replace("{token}", "abc");
            let route = route(&path).unwrap_or_else(|| panic!("{pattern} not routed"));
            assert!(
                allowed_methods(&route).contains(method),
                "{method} {pattern}"
            );
        }
        assert!(route("/admin/users/a/b").is_none());
        assert!(route("/admin").is_none());
        assert!(route("/admin/usersx").is_none());
        assert!(route("/admin/users//").is_none());
        assert!(route("/admin/users/a//").is_none());
        assert!(
            route("/admin/useré").is_none(),
            "no panic off a char boundary"
        );
        assert!(matches!(route("/Admin/USERS"), Some(Route::Users)));
        assert!(matches!(
            route("/admin/users/AbC/"),
            Some(Route::User("AbC"))
        ));
        assert!(matches!(
            route("/ADMIN/users/AbC"),
            Some(Route::User("AbC"))
        ));
        assert!(route("/HEALTH").is_none(), "tollgate's own paths are exact");
    }
}
