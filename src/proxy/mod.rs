//! The proxy service: in `request_filter`, block list, gatekeeper and rate limits decide
//! whether a request passes; it then goes upstream with the client's credential removed and
//! an `X-Forwarded-For` that tollgate set. No I/O and no locks happen before the upstream.

pub mod connection;
pub mod cors;
pub mod credential;
pub mod gatekeeper;
pub mod rate_limit;
pub mod respond;
pub mod upstream;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use log::warn;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::clock::now_ms;
use crate::config::{Config, GatekeeperMode};
use crate::net::{peer_ip, request_client_ip, CidrSet};
use crate::observe::{AccessLog, Metrics, Outcome};
use crate::store::StoreStatus;
use crate::users::UserCache;
use credential::CredentialSource;
use gatekeeper::{Gatekeeper, Identity, Refusal};
use rate_limit::{
    ConcurrencyLimiter, ConcurrencySlot, KeyHasher, LimitKey, RateDecision, SlidingWindowLimiter,
};
use respond::{ErrorReply, StockReplies};
use upstream::Upstreams;

/// Shared by all proxy workers.
pub struct Proxy {
    gatekeeper: Gatekeeper,
    cache: Arc<UserCache>,
    upstreams: Upstreams,
    set_headers: Vec<(HeaderName, HeaderValue)>,
    trusted_proxies: CidrSet,
    blocklist: CidrSet,
    hasher: KeyHasher,
    requests: Option<SlidingWindowLimiter>,
    auth_failures: Option<SlidingWindowLimiter>,
    /// "per minute" or "per N seconds", for refusal messages.
    window_text: String,
    inflight: Option<ConcurrencyLimiter>,
    replies: StockReplies,
    /// Answer preflights and allow any origin (`cors.enabled`).
    cors: bool,
    /// Longest wait for a kept-alive client's next request (`None`: no limit).
    client_keepalive: Option<u64>,
    /// Largest request body passed upstream (`clients.max_body_bytes`), and its refusal.
    max_body_bytes: Option<u64>,
    too_large: ErrorReply,
    /// Longest wait for a request body's next bytes (`clients.body_timeout_seconds`).
    body_timeout: Option<Duration>,
    /// Set once `X-Forwarded-For` was seen from a peer outside `trusted_proxies` (logged once).
    untrusted_forwarding_seen: AtomicBool,
    /// Says when this process hands its listeners over or stops ([`StoreStatus::is_leaving`]).
    status: Arc<StoreStatus>,
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
}

/// Whether the client waits for `100 Continue` before sending its body (curl does for bodies
/// over 1 MiB, and would otherwise stall for a second): an HTTP/1.1 `Expect: 100-continue`.
/// Pingora's own check is private. The admin API answers it too.
pub(crate) fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Answers `100 Continue` once the request passed, as nginx does, so the client sends its body
/// now and the upstream gets no `Expect` ([`Proxy::upstream_request_filter`]). Relayed from
/// the upstream instead, the 100 came only if the upstream sent one (otherwise the client waited
/// for its own timeout, curl's 1 s), and Pingora closed the connection after the answer. The
/// admin API answers its `Expect` with this too.
pub(crate) async fn send_continue(
    session: &mut pingora::protocols::http::ServerSession,
) -> Result<()> {
    // The 100 precedes the body by definition: it must not mark the connection for closing
    // the way an early final answer does.
    session.set_close_on_response_before_downstream_finish(false);
    let sent = session.write_continue_response().await;
    session.set_close_on_response_before_downstream_finish(true);
    sent.map_err(respond::from_client)
}

/// Once it has read a request, Pingora waits for the client's next one without limit, and
/// without limit between the reads of its header: a client that goes silent, or sends a byte
/// now and then, kept its connection (memory and a file descriptor) for good. The wait is
/// bounded by `clients.keepalive_timeout_seconds` (a shorter one Pingora set is kept).
fn bound_keepalive(session: &mut Session, limit: u64) {
    if let Some(current) = session.get_keepalive() {
        if current == 0 || current > limit {
            session.set_keepalive(Some(limit));
        }
    }
}

/// The response's version and framing as the client's HTTP version needs them; Pingora
/// passes the origin's on. Before `response_filter`, Pingora turns a body the origin ends by
/// closing the connection into a chunked one, whatever the client's version.
/// - An HTTP/1.1 client behind an HTTP/1.0 origin is answered in HTTP/1.1, as nginx does.
/// - An HTTP/1.0 client cannot read chunked framing: its body is sent as it came, ended by
///   closing the connection.
/// - An origin's `Keep-Alive` header describes its own connection, not the client's.
fn frame_for_the_client(session: &mut Session, response: &mut ResponseHeader) {
    let client = session.req_header().version;
    if client == http::Version::HTTP_11 {
        if response.version == http::Version::HTTP_10 {
            response.set_version(http::Version::HTTP_11);
        }
    } else if client < http::Version::HTTP_11 && is_chunked(response) {
        response.remove_header(&http::header::TRANSFER_ENCODING);
        // Pingora writes `Connection` before it sees that the body ends with the connection.
        session.set_keepalive(None);
    }
    if response.headers.contains_key("keep-alive") {
        response.remove_header("keep-alive");
    }
}

/// Removes the header fields an upstream's final answer names in its `Connection` header:
/// they describe the upstream's connection, not the client's, and a proxy must not pass them
/// on (RFC 9110, 7.6.1; Pingora does so for requests only, and replaces `Connection` itself).
/// Framing fields stay: Pingora frames the client's body by them. Interim answers are left
/// alone: a `101`'s `Connection: upgrade` names the `Upgrade` it must keep.
fn remove_connection_nominated(response: &mut ResponseHeader) {
    if response.status.is_informational() {
        return;
    }
    let named: Vec<HeaderName> = response
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| {
            name != http::header::CONTENT_LENGTH
                && name != http::header::TRANSFER_ENCODING
                && name != http::header::CONNECTION
        })
        .collect();
    for name in named {
        response.remove_header(&name);
    }
}

/// The single value of a `Content-Length` sent as a list of one number (`3, 3`) or on several
/// lines, which Pingora accepts and frames the body by (it refuses differing values) but
/// passes on as it came: such a field is invalid, and a proxy must send one value instead
/// (RFC 9110, 8.6); an upstream or client may refuse the message (Node.js does). `None`: a
/// single value (or none), to be left as it is.
fn collapsed_content_length(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return None;
    }
    let number = first.as_bytes().split(|&b| b == b',').next()?.trim_ascii();
    HeaderValue::from_bytes(number).ok()
}

/// An HTTP/1.0 client knows no interim answers and would take an upstream's `103 Early
/// Hints` or `100 Continue` for the final one (RFC 9110, 15.2: a server must not send it one);
/// Pingora relayed them whatever the client's version. It drops them on request (a `101`
/// still goes through).
fn no_interim_answers(session: &mut Session) {
    if let pingora::protocols::http::ServerSession::H1(h1) = &mut *session.downstream_session {
        h1.set_ignore_info_resp(true);
    }
}

/// The budget left after a counted request, on every answer it gets (proxied or not).
fn add_rate_headers(response: &mut ResponseHeader, rate: Option<RateDecision>) -> Result<()> {
    if let Some(RateDecision::Allowed {
        limit,
        remaining,
        reset_at_ms,
    }) = rate
    {
        let mut buf = itoa::Buffer::new();
        response.insert_header("x-ratelimit-limit", buf.format(limit))?;
        response.insert_header("x-ratelimit-remaining", buf.format(remaining))?;
        response.insert_header("x-ratelimit-reset", buf.format(reset_at_ms))?;
    }
    Ok(())
}

/// Whether the request target is one whose path and query tollgate reads as they go upstream:
/// a path (origin-form), `*`, or an `http(s)://` URL (absolute-form, whose path Pingora splits
/// off). Any other target (`mailto:a?key=…`, `a/b?key=…`) Pingora reads as `/` and passes
/// upstream byte for byte, so a credential in its query could be neither found nor removed.
fn readable_target(req: &RequestHeader) -> bool {
    let raw = req.raw_path();
    let has_scheme = |scheme: &[u8]| {
        raw.get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    };
    raw.first() == Some(&b'/') || raw == b"*" || has_scheme(b"http://") || has_scheme(b"https://")
}

/// The request's `Content-Length`, when it declares a valid one. A list of one number
/// (`3, 3`), which Pingora accepts, declares that number.
fn declared_body_length(req: &RequestHeader) -> Option<u64> {
    let value = req.headers.get(http::header::CONTENT_LENGTH)?;
    let first = value.as_bytes().split(|&b| b == b',').next()?;
    std::str::from_utf8(first).ok()?.trim().parse().ok()
}

/// Whether the request's body has a transfer coding besides `chunked` (`gzip, chunked`), or
/// `chunked` twice. Pingora reads such a body as chunked and sends it on with
/// `Transfer-Encoding: chunked` alone: the upstream would take the still gzip-coded bytes for
/// the body itself. Refused as nginx does (it answers 501), since tollgate does not decode
/// them. (Pingora refuses a request whose last coding is not `chunked` itself.)
fn other_transfer_coding(req: &RequestHeader) -> bool {
    let mut codings = req
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match codings.next() {
        None => false,
        Some(first) => !first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some(),
    }
}

fn is_chunked(response: &ResponseHeader) -> bool {
    response
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
}

/// Per-request state.
pub struct RequestCtx {
    client_ip: IpAddr,
    /// Whether the TCP peer is in `trusted_proxies`, so its forwarding headers may be passed on.
    peer_trusted: bool,
    identity: Option<Identity>,
    credential: Option<CredentialSource>,
    rate: Option<RateDecision>,
    /// Holds the concurrency slot until the response's last byte is handed on, or the
    /// request ends however it ends.
    inflight_slot: Option<ConcurrencySlot>,
    upstream_started: Option<Instant>,
    /// The request's place in the upstream rotation, the attempts made, and the upstream of
    /// the last one.
    upstream_first: usize,
    upstream_attempts: usize,
    upstream_index: usize,
    /// The upstreams this request could not connect to: skipped by its later attempts. A
    /// kept-alive connection the upstream had closed (Pingora retries it) is no such failure.
    upstream_unreachable: Vec<usize>,
    upstream_status: Option<u16>,
    /// Request body bytes passed upstream so far.
    body_bytes: u64,
    /// tollgate answered the client's `Expect: 100-continue` itself.
    continue_sent: bool,
    /// The upstream's whole answer was handed on (its last write to the client may still fail).
    answered: bool,
    outcome: Outcome,
}

impl Proxy {
    pub fn new(
        config: &Config,
        cache: Arc<UserCache>,
        status: Arc<StoreStatus>,
        metrics: Arc<Metrics>,
        access_log: Option<AccessLog>,
    ) -> Self {
        let limits = &config.rate_limit;
        Self {
            gatekeeper: Gatekeeper::new(&config.gatekeeper, &config.secrets, Arc::clone(&cache)),
            cache,
            upstreams: Upstreams::new(&config.upstream),
            set_headers: config.upstream.set_headers.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            blocklist: config.ip_blocklist.clone(),
            hasher: KeyHasher::default(),
            requests: (limits.requests_per_minute > 0).then(|| {
                let budget = limits.per_window(limits.requests_per_minute);
                SlidingWindowLimiter::new(budget, limits.window, limits.estimator_slots)
            }),
            auth_failures: (limits.auth_failures_per_minute > 0
                && config.gatekeeper.mode != GatekeeperMode::None)
                .then(|| {
                    let budget = limits.per_window(limits.auth_failures_per_minute);
                    SlidingWindowLimiter::new(budget, limits.window, limits.estimator_slots)
                }),
            window_text: match limits.window.as_secs() {
                60 => "per minute".to_string(),
                1 => "per second".to_string(),
                n => format!("per {n} seconds"),
            },
            inflight: (limits.max_inflight > 0)
                .then(|| ConcurrencyLimiter::new(limits.max_inflight, limits.estimator_slots)),
            replies: StockReplies::default(),
            cors: config.cors,
            client_keepalive: Some(config.clients.keepalive_timeout_seconds).filter(|&s| s > 0),
            max_body_bytes: config.clients.max_body_bytes,
            too_large: ErrorReply::new(
                413,
                "request_too_large",
                &format!(
                    "The request body is larger than this proxy accepts ({} bytes)",
                    config.clients.max_body_bytes.unwrap_or(u64::MAX)
                ),
            ),
            body_timeout: config.clients.body_timeout,
            untrusted_forwarding_seen: AtomicBool::new(false),
            status,
            metrics,
            access_log,
        }
    }

    /// The client's IP (through trusted proxies) into `ctx`, and the block list's answer: the
    /// first step of every request, CORS preflights included.
    #[inline]
    fn screen_client(
        &self,
        req: &RequestHeader,
        peer: IpAddr,
        ctx: &mut RequestCtx,
    ) -> Result<(), (ErrorReply, Outcome)> {
        ctx.client_ip = request_client_ip(peer, req, &self.trusted_proxies);
        ctx.peer_trusted = self.trusted_proxies.contains(peer);
        if !self.blocklist.is_empty() && self.blocklist.contains(ctx.client_ip) {
            return Err((self.replies.blocked.clone(), Outcome::Forbidden));
        }
        Ok(())
    }

    /// The whole admission decision of `request_filter`, without I/O: the client IP (`peer`
    /// is the TCP peer), block list, credential, gatekeeper, rate and concurrency limits.
    /// Fills `ctx` for the later phases; `Err` is the reply to send instead of proxying.
    /// Public so that benchmarks measure the very code requests go through.
    pub fn decide(
        &self,
        req: &RequestHeader,
        peer: IpAddr,
        now: u64,
        ctx: &mut RequestCtx,
    ) -> Result<(), (ErrorReply, Outcome)> {
        let credential = credential::extract(req);
        ctx.credential = credential.as_ref().map(|(source, _)| *source);
        let token = credential.as_ref().map(|(_, t)| t.as_ref());
        // In user_token mode the token is hashed first: the hash finds the user and is the
        // user's limit key, and the memory both will read starts loading now, while the
        // checks below run.
        let lookup = match (self.gatekeeper.mode(), token) {
            (GatekeeperMode::UserToken, Some(token)) => {
                let lookup = self.cache.lookup(token);
                if let Some(requests) = &self.requests {
                    requests.prefetch(lookup.hash());
                }
                Some(lookup)
            }
            _ => None,
        };
        let user_key = lookup.as_ref().map(|l| l.hash());
        self.screen_client(req, peer, ctx)?;
        self.screen_request(req)?;
        // The client IP's key, hashed only when needed.
        let mut ip_key = None;
        let hasher = &self.hasher;
        let client_ip = ctx.client_ip;
        let mut ip_key_of = || *ip_key.get_or_insert_with(|| hasher.hash(LimitKey::Ip(client_ip)));
        self.check_auth_failures(&mut ip_key_of, now)?;
        let identity = match self
            .gatekeeper
            .admit_with(token, lookup, ctx.client_ip, now)
        {
            Ok(identity) => identity,
            Err(refusal) => return Err(self.refuse(refusal, &mut ip_key_of, now)),
        };
        self.apply_limits(identity, user_key, ip_key_of, now, ctx)
    }

    /// What the request itself shows before its credential is looked at: a target tollgate
    /// can read, and a declared body within `clients.max_body_bytes` (checked before the
    /// gatekeeper, as the older proxy read the body before it: a refused body costs no rate
    /// budget).
    fn screen_request(&self, req: &RequestHeader) -> Result<(), (ErrorReply, Outcome)> {
        if !readable_target(req) {
            return Err((self.replies.unreadable_target.clone(), Outcome::BadRequest));
        }
        if other_transfer_coding(req) {
            return Err((self.replies.unsupported_coding.clone(), Outcome::BadRequest));
        }
        if let Some(limit) = self.max_body_bytes {
            if declared_body_length(req).is_some_and(|length| length > limit) {
                return Err((self.too_large.clone(), Outcome::TooLarge));
            }
        }
        Ok(())
    }

    /// An IP that failed to authenticate too often is refused whatever it sends. Known
    /// without the IP's counters while no authentication failed lately.
    fn check_auth_failures(
        &self,
        ip_key: &mut impl FnMut() -> u64,
        now: u64,
    ) -> Result<(), (ErrorReply, Outcome)> {
        let Some(failures) = &self.auth_failures else {
            return Ok(());
        };
        if let Some(RateDecision::Limited {
            retry_after_secs, ..
        }) = failures.check_rare(&mut *ip_key, now)
        {
            self.metrics.record_rate_limited(ip_key(), now);
            return Err((
                auth_failures_limited(retry_after_secs),
                Outcome::RateLimited,
            ));
        }
        Ok(())
    }

    /// The request rate and concurrency limits of an admitted request, keyed by its user (or
    /// its IP when anonymous). `special` users are exempt from the request rate, not from
    /// `max_inflight` (as in the older proxy, whose special users still queued like everyone
    /// else).
    fn apply_limits(
        &self,
        identity: Identity,
        user_key: Option<u64>,
        mut ip_key: impl FnMut() -> u64,
        now: u64,
        ctx: &mut RequestCtx,
    ) -> Result<(), (ErrorReply, Outcome)> {
        let limited = self.requests.is_some() || self.inflight.is_some();
        let (limit_key, rate_applies) = match &identity {
            _ if !limited => (None, false),
            // The user was found by this very token, so `user_key` is its key.
            Identity::User(user) => (
                Some(user_key.unwrap_or_else(|| self.cache.token_hash(user.token()))),
                !user.admission().special(),
            ),
            Identity::Anonymous => (Some(ip_key()), true),
        };
        ctx.identity = Some(identity);
        let Some(limit_key) = limit_key else {
            return Ok(());
        };
        let requests = self.requests.as_ref().filter(|_| rate_applies);
        // The concurrency slot is taken first so that a request it refuses is not counted
        // against the rate (refused requests never are); a rate refusal releases the slot.
        let slot = self
            .inflight
            .as_ref()
            .map(|inflight| inflight.acquire(limit_key));
        if let Some(requests) = requests {
            let decision = if matches!(slot, Some(None)) {
                requests.check(limit_key, now)
            } else {
                requests.check_and_count(limit_key, now)
            };
            ctx.rate = Some(decision);
            if let RateDecision::Limited {
                limit,
                retry_after_secs,
                reset_at_ms,
            } = decision
            {
                self.metrics.record_rate_limited(limit_key, now);
                let reply = rate_limited(limit, &self.window_text, retry_after_secs, reset_at_ms);
                return Err((reply, Outcome::RateLimited));
            }
        }
        match slot {
            Some(Some(guard)) => ctx.inflight_slot = Some(guard),
            Some(None) => {
                self.metrics.record_rate_limited(limit_key, now);
                let max = self.inflight.as_ref().map_or(0, ConcurrencyLimiter::max);
                return Err((concurrency_limited(max, ctx.rate), Outcome::RateLimited));
            }
            None => {}
        }
        Ok(())
    }

    fn refuse(
        &self,
        refusal: Refusal,
        ip_key: impl FnOnce() -> u64,
        now: u64,
    ) -> (ErrorReply, Outcome) {
        match refusal {
            Refusal::MissingToken | Refusal::UnknownToken => {
                if let Some(failures) = &self.auth_failures {
                    failures.count(ip_key(), now);
                }
                let reply = if refusal == Refusal::MissingToken {
                    &self.replies.missing_token
                } else {
                    &self.replies.unknown_token
                };
                (reply.clone(), Outcome::Unauthorized)
            }
            Refusal::Disabled(message) => (
                ErrorReply::new(403, "forbidden", &message),
                Outcome::Forbidden,
            ),
            Refusal::IpLimit => (self.replies.ip_limit.clone(), Outcome::Forbidden),
            Refusal::IpLimitBanned => (self.replies.ip_limit_banned.clone(), Outcome::Forbidden),
            Refusal::Expired => (self.replies.expired.clone(), Outcome::Forbidden),
        }
    }
}

fn auth_failures_limited(retry_after_secs: u64) -> ErrorReply {
    let message = format!(
        "Too many failed authentication attempts from this IP. Please try again in {retry_after_secs} seconds."
    );
    ErrorReply::new(429, "proxy_rate_limited", &message)
        .with_header("retry-after", retry_after_secs)
}

/// Carries the request rate budget as a success would report it (`rate`, when the rate
/// allowed the request): the client learns that it is not the rate that refused it.
fn concurrency_limited(max: u32, rate: Option<RateDecision>) -> ErrorReply {
    let message =
        format!("Too many concurrent requests: at most {max} at a time. Wait for one to finish.");
    let reply =
        ErrorReply::new(429, "proxy_concurrency_limited", &message).with_header("retry-after", 1);
    match rate {
        Some(RateDecision::Allowed {
            limit,
            remaining,
            reset_at_ms,
        }) => reply
            .with_header("x-ratelimit-limit", limit)
            .with_header("x-ratelimit-remaining", remaining)
            .with_header("x-ratelimit-reset", reset_at_ms),
        _ => reply,
    }
}

fn rate_limited(limit: u32, per: &str, retry_after_secs: u64, reset_at_ms: u64) -> ErrorReply {
    let message = format!(
        "This proxy is rate limited to {limit} requests {per}. Please try again in {retry_after_secs} seconds."
    );
    ErrorReply::new(429, "proxy_rate_limited", &message)
        .with_header("retry-after", retry_after_secs)
        .with_header("x-ratelimit-limit", limit)
        .with_header("x-ratelimit-remaining", 0)
        .with_header("x-ratelimit-reset", reset_at_ms)
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // None. Pingora's default adds a response-compression module at level 0 (off), whose
        // context is still built and consulted for every request; tollgate never compresses.
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            client_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            peer_trusted: false,
            identity: None,
            credential: None,
            rate: None,
            inflight_slot: None,
            upstream_started: None,
            upstream_first: 0,
            upstream_attempts: 0,
            upstream_index: 0,
            upstream_unreachable: Vec::new(),
            upstream_status: None,
            body_bytes: 0,
            continue_sent: false,
            answered: false,
            outcome: Outcome::Proxied,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        connection::header_received(session);
        // HTTP/1.1 pipelining, as nginx serves it: Pingora's default answered the first of
        // several requests sent ahead (with `Connection: keep-alive`), then closed the
        // connection and dropped the others. Requests are still handled one after the other.
        session.set_pipelining_enabled(true);
        // Pingora times each body read with this; the header is read by now, and the next
        // request on the connection gets a new session.
        session.set_read_timeout(self.body_timeout);
        if session.req_header().version < http::Version::HTTP_11 {
            no_interim_answers(session);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.status.is_leaving() {
            // Handing over to a new process or stopping: each connection closes after its
            // answer (`Connection: close`), instead of idling until this process closes it under
            // a client that may be sending its next request on it right then.
            session.set_keepalive(None);
        } else if let Some(limit) = self.client_keepalive {
            bound_keepalive(session, limit);
        }
        let peer = peer_ip(session);
        if self.cors && cors::is_preflight(session.req_header()) {
            if let Err((reply, outcome)) = self.screen_client(session.req_header(), peer, ctx) {
                ctx.outcome = outcome;
                reply.send(session, self.cors).await?;
                return Ok(true);
            }
            ctx.outcome = Outcome::Preflight;
            let reply = cors::preflight_reply(session.req_header())?;
            session
                .write_response_header(Box::new(reply), true)
                .await
                .map_err(respond::from_client)?;
            return Ok(true);
        }
        match self.decide(session.req_header(), peer, now_ms(), ctx) {
            Ok(()) => {
                if expects_continue(session.req_header()) && !session.is_body_empty() {
                    send_continue(session).await?;
                    ctx.continue_sent = true;
                }
                Ok(false)
            }
            Err((reply, outcome)) => {
                ctx.outcome = outcome;
                reply.send(session, self.cors).await?;
                Ok(true)
            }
        }
    }

    /// A body without a declared length (chunked) is counted as it streams: past the limit the
    /// request is aborted, upstream included, and answered 413 if no answer has started.
    /// Pingora passes the bytes of an upgraded connection (a WebSocket) through here too; they
    /// are not a request body and are not counted, or a long session would be cut.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(limit), Some(chunk)) = (self.max_body_bytes, body.as_ref()) {
            if session.was_upgraded() {
                return Ok(());
            }
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > limit {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body over clients.max_body_bytes",
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if ctx.upstream_attempts == 0 {
            ctx.upstream_started = Some(Instant::now());
            ctx.upstream_first = self.upstreams.first();
        }
        let mut index = self
            .upstreams
            .index(ctx.upstream_first, ctx.upstream_attempts);
        // Never all of them (`fail_to_connect` stops retrying before), but bounded anyway.
        let last = ctx.upstream_attempts + self.upstreams.len();
        while ctx.upstream_unreachable.contains(&index) && ctx.upstream_attempts < last {
            ctx.upstream_attempts += 1;
            index = self
                .upstreams
                .index(ctx.upstream_first, ctx.upstream_attempts);
        }
        ctx.upstream_attempts += 1;
        ctx.upstream_index = index;
        Ok(self.upstreams.peer(index))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.metrics.record_connect_failure();
        // Nothing was sent yet: another upstream may take it, each one failing once at most.
        // Counted apart from the attempts: a stale pooled connection before used up a
        // healthy upstream's try, and the request got a 502 from the next one's refusal.
        ctx.upstream_unreachable.push(ctx.upstream_index);
        // Whatever the connector decided: past the last upstream there is none to try.
        e.set_retry(ctx.upstream_unreachable.len() < self.upstreams.len());
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(length) = collapsed_content_length(&upstream.headers) {
            upstream.insert_header(http::header::CONTENT_LENGTH, length)?;
        }
        if self.gatekeeper.mode() == GatekeeperMode::None {
            // Nothing is protected: only the credential read goes, as in the older proxy.
            if let Some(source) = ctx.credential {
                credential::strip(upstream, source);
            }
        } else {
            // A key sent in several places must not reach the upstream through the others.
            credential::strip_all(upstream);
        }
        if ctx.continue_sent {
            upstream.remove_header(&http::header::EXPECT);
        }
        if !ctx.peer_trusted {
            // Only until the warning was given: then no header lookup per request.
            if !self.untrusted_forwarding_seen.load(Ordering::Relaxed)
                && upstream.headers.contains_key("x-forwarded-for")
            {
                self.warn_untrusted_forwarding(ctx.client_ip);
            }
        }
        remove_forwarding_headers(upstream, !ctx.peer_trusted, &self.set_headers);
        // Never forward the client's own X-Forwarded-For: it is whatever they wanted it to be.
        upstream.insert_header("x-forwarded-for", ctx.client_ip.to_string())?;
        // The upstream's own name, as the older proxy (`changeOrigin`) and nginx send it: a
        // virtual host or a TLS front end answers to its name, not to tollgate's.
        let client_sent_host = upstream.headers.contains_key(http::header::HOST);
        if let Some(host) = self.upstreams.host(ctx.upstream_index, client_sent_host) {
            upstream.insert_header(http::header::HOST, host.clone())?;
        }
        for (name, value) in &self.set_headers {
            upstream.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(response.status.as_u16());
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        frame_for_the_client(session, response);
        if let Some(length) = collapsed_content_length(&response.headers) {
            response.insert_header(http::header::CONTENT_LENGTH, length)?;
        }
        if response.headers.contains_key(http::header::CONNECTION) {
            remove_connection_nominated(response);
        }
        if self.cors {
            cors::allow_any_origin(response)?;
        }
        add_rate_headers(response, ctx.rate)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if end_of_stream {
            // Before the last write, not after it (the context is dropped after `logging`):
            // a client that sends its next request once it has the whole response must find
            // its slot free.
            ctx.inflight_slot = None;
            ctx.answered = true;
        }
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // fail_to_proxy logs upstream failures once, without the request line (it may hold a key).
        true
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if answered_before(ctx, e) {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let (status, reply) = match e.esource() {
            _ if e.etype() == &ErrorType::HTTPStatus(413) => (413, self.too_large.clone()),
            ErrorSource::Upstream => {
                let timed_out = matches!(
                    e.etype(),
                    ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                );
                warn!(
                    "upstream failure: {} ({})",
                    e.etype().as_str(),
                    redacted_path(session)
                );
                if timed_out {
                    (
                        504,
                        ErrorReply::new(
                            504,
                            "upstream_timeout",
                            "The upstream server did not answer in time",
                        ),
                    )
                } else {
                    (
                        502,
                        ErrorReply::new(
                            502,
                            "upstream_error",
                            "The upstream server could not be reached or failed",
                        ),
                    )
                }
            }
            // A body that stopped arriving (`clients.body_timeout_seconds`): the client's fault,
            // as nginx's 408, not a malformed request or an upstream failure.
            ErrorSource::Downstream if e.etype() == &ErrorType::ReadTimedout => (
                408,
                ErrorReply::new(
                    408,
                    "request_timeout",
                    "The request body did not arrive in time",
                ),
            ),
            ErrorSource::Downstream => {
                if matches!(
                    e.etype(),
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
                ) {
                    // The client is gone; there is nobody to answer.
                    ctx.outcome = Outcome::ClientClosed;
                    return FailToProxy {
                        error_code: 0,
                        can_reuse_downstream: false,
                    };
                }
                (
                    400,
                    ErrorReply::new(400, "bad_request", "The request could not be read"),
                )
            }
            ErrorSource::Internal | ErrorSource::Unset => {
                warn!(
                    "internal proxy error: {} ({})",
                    e.etype().as_str(),
                    redacted_path(session)
                );
                (
                    500,
                    ErrorReply::new(
                        500,
                        "internal_error",
                        "tollgate failed to handle the request",
                    ),
                )
            }
        };
        ctx.outcome = match status {
            408 => Outcome::TimedOut,
            413 => Outcome::TooLarge,
            500.. => Outcome::UpstreamError,
            _ => Outcome::BadRequest,
        };
        if let Ok(mut header) = reply.to_header(self.cors) {
            // The request was counted: its budget is shown as on any other answer.
            let _ = add_rate_headers(&mut header, ctx.rate);
            // A failed write is a client that left; nothing more to do.
            let _ = session
                .write_error_response(header, reply.body.clone())
                .await;
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        connection::request_finished(session);
        let upstream_latency = ctx.upstream_started.map(|t| t.elapsed());
        self.account(ctx, now_ms());
        self.metrics.record_request(
            ctx.outcome,
            upstream_latency.filter(|_| ctx.upstream_status.is_some()),
        );
        if let Some(log) = &self.access_log {
            let status = final_status(session.response_written());
            let user = match &ctx.identity {
                Some(Identity::User(u)) => Some(u.as_ref()),
                _ => None,
            };
            log.write(
                session.req_header(),
                ctx.client_ip,
                user,
                status,
                upstream_latency,
            );
        }
    }

    /// What Pingora's own log lines (a retried upstream failure, a downstream error) name the
    /// request by: its default is the raw path, query string and all, where `key=<token>`
    /// may be.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        redacted_path(session)
    }
}

impl Proxy {
    /// What a finished request changes on its user: `promptCount` is successful generations,
    /// as the older proxy counted them after a successful upstream response; `lastUsedAt`
    /// moves with every authenticated request (refused by a limit or failed upstream too).
    fn account(&self, ctx: &RequestCtx, now: u64) {
        if let Some(Identity::User(user)) = &ctx.identity {
            if ctx.upstream_status.is_some_and(|s| (200..300).contains(&s)) {
                self.cache.count_request(user, now);
            } else {
                self.cache.touch(user, now);
            }
        }
    }

    /// The older proxy trusted one `X-Forwarded-For` hop by default; tollgate trusts none
    /// until `trusted_proxies` is set. Behind a load balancer every client would then be the
    /// balancer's address (one rate limit, one lockout, one IP for every user), so the first
    /// forwarded request from an untrusted peer says so.
    #[cold]
    fn warn_untrusted_forwarding(&self, peer: IpAddr) {
        if !self.untrusted_forwarding_seen.swap(true, Ordering::Relaxed) {
            warn!(
                "requests from {peer} carry X-Forwarded-For, but {peer} is not in \
                 trusted_proxies: their client address is taken to be {peer} and the header is \
                 replaced. If {peer} is your load balancer or proxy, add it to trusted_proxies \
                 (logged once)"
            );
        }
    }
}

/// Whether `e` came after the client had the upstream's whole answer, on the rest of its request
/// body: an upstream that answered early (a 401, a 413, a redirect) without reading it, then
/// closed, or a client that stopped sending it or left once answered. The request was proxied
/// (as its access log line says); counted a `502`, `408`, `413` or `client_closed` instead, it
/// raised the upstream-failure series for answers clients got whole. A failed write to the
/// client is not such an error: the last piece of the answer may be what failed.
fn answered_before(ctx: &RequestCtx, e: &Error) -> bool {
    let client_write = e.etype() == &ErrorType::WriteError && e.esource() != &ErrorSource::Upstream;
    ctx.answered && ctx.upstream_status.is_some() && !client_write
}

/// The status of the final answer the client was sent, 0 when it got none. The last answer
/// written may be an interim one (tollgate's `100 Continue`, an upstream's `103 Early Hints`)
/// when the client left after it: logged as its status, it read as an answer the request never
/// had. A `101` is final: the connection was handed over.
fn final_status(written: Option<&ResponseHeader>) -> u16 {
    written
        .map(|r| r.status)
        .filter(|s| !s.is_informational() || *s == http::StatusCode::SWITCHING_PROTOCOLS)
        .map_or(0, |s| s.as_u16())
}

/// Forwarding headers other than `X-Forwarded-For` (which tollgate always sets itself). From a
/// peer that is not a trusted proxy they are whatever the client wrote, and an upstream that
/// believes them (client IP, original host or scheme) could be fooled, so they are removed.
static FORWARDING_HEADERS: [HeaderName; 7] = [
    http::header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
];

/// Removes [`FORWARDING_HEADERS`] (`untrusted`: the peer is no trusted proxy) and, from any
/// peer, every forwarding header spelled with underscores (`X_Real_IP`, `X_Forwarded_For`):
/// CGI and WSGI servers read those as the real one (`HTTP_X_REAL_IP`), so a client could name
/// its own address to an upstream that way, and no proxy writes them. The same goes for the
/// headers tollgate `sets` (`upstream.set_headers`: an `X_Api_Key` would be merged into the
/// operator's `X-Api-Key`). One pass over the header names when there is nothing to remove.
fn remove_forwarding_headers(
    req: &mut RequestHeader,
    untrusted: bool,
    sets: &[(HeaderName, HeaderValue)],
) {
    let doomed = |name: &HeaderName| {
        (untrusted && FORWARDING_HEADERS.contains(name))
            || name.as_str().contains('_')
                && (underscored_forwarding(name.as_str())
                    || sets
                        .iter()
                        .any(|(set, _)| underscored(name.as_str(), set.as_str())))
    };
    if !req.headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = req.headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in names {
        req.remove_header(&name);
    }
}

/// Whether `name` (lower case, as header names are kept) is `X-Forwarded-For` or one of
/// [`FORWARDING_HEADERS`] with one or more of its dashes written as underscores.
fn underscored_forwarding(name: &str) -> bool {
    underscored(name, "x-forwarded-for")
        || FORWARDING_HEADERS
            .iter()
            .any(|h| underscored(name, h.as_str()))
}

/// Whether `name` is `real` with one or more of its dashes written as underscores (both lower
/// case).
fn underscored(name: &str, real: &str) -> bool {
    name.len() == real.len()
        && name != real
        && real
            .bytes()
            .zip(name.bytes())
            .all(|(r, n)| r == n || (r == b'-' && n == b'_'))
}

/// Longest path logged in full: a request target may be 64 KiB, and every upstream failure
/// logs one (nginx cuts its error lines at 2 KiB).
const LOGGED_PATH_MAX: usize = 512;

/// Method and path without the query string, which may carry `key=<token>`; a path over
/// [`LOGGED_PATH_MAX`] bytes is cut, with its length said.
fn redacted_path(session: &Session) -> String {
    let req = session.req_header();
    format!("{} {}", req.method, logged_path(req.uri.path()))
}

fn logged_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= LOGGED_PATH_MAX {
        return path.into();
    }
    let mut end = LOGGED_PATH_MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &path[..end], path.len()).into()
}

#[cfg(test)]
mod decision_model;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_targets_read_as_they_go_upstream_are_readable() {
        let readable =
            |target: &[u8]| readable_target(&RequestHeader::build("GET", target, None).unwrap());
        for target in [
            &b"/"[..],
            b"/a?key=k",
            b"*",
            b"http://h/a?key=k",
            b"HTTPS://h",
        ] {
            assert!(readable(target), "{}", String::from_utf8_lossy(target));
        }
        for target in [
            &b"mailto:a?key=k"[..],
            b"a/b?key=k",
            b"h:80",
            b"httpx://h/a",
        ] {
            assert!(!readable(target), "{}", String::from_utf8_lossy(target));
        }
    }

    #[test]
    fn an_interim_answer_is_no_final_status() {
        let status = |code: u16| final_status(Some(&ResponseHeader::build(code, None).unwrap()));
        assert_eq!(final_status(None), 0);
        assert_eq!(status(100), 0);
        assert_eq!(status(103), 0);
        assert_eq!(status(101), 101);
        assert_eq!(status(200), 200);
        assert_eq!(status(504), 504);
    }

    #[test]
    fn long_paths_are_cut_for_the_log() {
        assert_eq!(logged_path("/v1/chat"), "/v1/chat");
        let long = format!("/{}", "é".repeat(400));
        let logged = logged_path(&long);
        assert!(logged.len() < LOGGED_PATH_MAX + 20, "{logged}");
        assert!(logged.ends_with("... (801 bytes)"), "{logged}");
    }

    #[test]
    fn fields_the_upstream_connection_names_are_removed_but_framing_stays() {
        let mut response = ResponseHeader::build(200, None).unwrap();
        for (name, value) in [
            ("Connection", "keep-alive, X-Hop"),
            ("connection", "close ,Content-Length, transfer-encoding"),
            ("X-Hop", "1"),
            ("x-hop", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Content-Length", "2"),
            ("X-Kept", "3"),
        ] {
            response.append_header(name, value).unwrap();
        }
        remove_connection_nominated(&mut response);
        let left: Vec<_> = response.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["connection", "content-length", "x-kept"]);
        let mut upgrade = ResponseHeader::build(101, None).unwrap();
        upgrade.append_header("Connection", "upgrade").unwrap();
        upgrade.append_header("Upgrade", "websocket").unwrap();
        remove_connection_nominated(&mut upgrade);
        assert!(upgrade.headers.contains_key("upgrade"));
    }

    #[test]
    fn a_content_length_list_is_collapsed_to_its_value() {
        let collapsed = |values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for v in values {
                headers.append(http::header::CONTENT_LENGTH, v.parse().unwrap());
            }
            collapsed_content_length(&headers).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(collapsed(&[]), None);
        assert_eq!(collapsed(&["3"]), None);
        assert_eq!(collapsed(&["3, 3"]), Some("3".into()));
        assert_eq!(collapsed(&["3", "3"]), Some("3".into()));
        assert_eq!(collapsed(&[" 12 ,12,12"]), Some("12".into()));
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let coded = |values: &[&str]| {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            for v in values {
                req.append_header("transfer-encoding", *v).unwrap();
            }
            other_transfer_coding(&req)
        };
        for ok in [&[][..], &["chunked"], &["Chunked"], &[" chunked ,"]] {
            assert!(!coded(ok), "{ok:?}");
        }
        for refused in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["identity"],
        ] {
            assert!(coded(refused), "{refused:?}");
        }
    }

    #[test]
    fn forwarding_headers_are_removed_and_others_kept() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in [
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("true-client-ip", "6.6.6.6"),
            ("x-request-id", "r1"),
        ] {
            req.append_header(name, value).unwrap();
        }
        remove_forwarding_headers(&mut req, true, &[]);
        let left: Vec<_> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-request-id"]);
        // Nothing to remove: untouched.
        remove_forwarding_headers(&mut req, true, &[]);
        assert_eq!(req.headers.len(), 1);
    }

    #[test]
    fn underscored_forwarding_headers_are_removed_from_any_peer() {
        for untrusted in [false, true] {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            for (name, value) in [
                ("X_Forwarded_For", "6.6.6.6"),
                ("x-forwarded_for", "6.6.6.6"),
                ("X_Real_IP", "6.6.6.6"),
                ("true_client_ip", "6.6.6.6"),
                ("x_forwarded_proto", "https"),
                ("X-Real-IP", "10.0.0.1"),
                ("x_request_id", "r1"),
                ("x_forwarded_fo", "r2"),
            ] {
                req.append_header(name, value).unwrap();
            }
            remove_forwarding_headers(&mut req, untrusted, &[]);
            let mut left: Vec<_> = req.headers.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            let mut want = vec!["x-real-ip", "x_forwarded_fo", "x_request_id"];
            if untrusted {
                want.remove(0);
            }
            assert_eq!(left, want, "untrusted: {untrusted}");
        }
    }

    /// A header tollgate sets for the upstream (`upstream.set_headers`) wins over the client's
    /// spellings of it with underscores too: a CGI or WSGI upstream merges `X_Api_Key` into
    /// the operator's `X-Api-Key`.
    #[test]
    fn underscored_spellings_of_set_headers_are_removed() {
        let sets = [(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("operator"),
        )];
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for name in ["X_Api_Key", "x-api_key", "x_api_keys", "x-api-key"] {
            req.append_header(name, "client").unwrap();
        }
        remove_forwarding_headers(&mut req, false, &sets);
        let mut left: Vec<_> = req.headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-api-key", "x_api_keys"]);
    }
}
