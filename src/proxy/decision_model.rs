//! A model-based test of the admission decision ([`Proxy::decide`], as `request_filter` and
//! the `decision` benchmark run it, with the real user cache and limiters): a reference model
//! of the documented rules (docs/user-management.md, docs/configuration.md, the older proxy's
//! contract where docs/migration.md keeps it) is driven by a seeded random sequence of
//! requests (each gatekeeper mode; credentials from every source, padded or not; IPv4, mapped
//! and IPv6 clients, through a trusted proxy or not), admin edits (type, `maxIps`, `expiresAt`,
//! `ip`, disabling, re-enabling, removal; the same edits arriving from the store), requests
//! refused for their target or declared size, requests that stay in flight under `max_inflight`,
//! and clock moves (window boundaries, steps back). Every decision (status, error type and
//! message, `Retry-After` and `X-RateLimit-*`) and every side effect (the user's `ip` list,
//! `promptCount`, `lastUsedAt`, auto-ban, the auth-failure lockout) must equal the model's.
//!
//! `TOLLGATE_MODEL_SEED=N` replays one run; `TOLLGATE_MODEL_RUNS` and `TOLLGATE_MODEL_STEPS`
//! size the search (defaults: 150 runs of 400 steps, about 4 s in a debug build).
//!
//! The model computes the sliding-window arithmetic exactly (integers and fractions); where the
//! documents are silent (when a limiter of rare events looks at the clock) it follows
//! tollgate's window bookkeeping.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::ProxyHttp;
use serde_json::{json, Value};

use super::rate_limit::LimitKey;
use super::{add_rate_headers, Proxy, RequestCtx};
use crate::config::{Config, GatekeeperMode};
use crate::observe::Metrics;
use crate::store::StoreStatus;
use crate::users::{UserCache, UserPatch, UserType};

const ADMIN_KEY: &str = "model-admin-key";
const PROXY_KEY: &str = "model-proxy-key";
/// A multiple of every window length used (1 s, 10 s, 60 s).
const GRID: u64 = 1_700_000_040_000;
const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
/// `clients.max_body_bytes`: a request declaring more is refused before the gatekeeper.
const MAX_BODY: u64 = 1000;
const TRUSTED_PROXY: &str = "10.9.9.9";
const BLOCKED: &str = "192.0.2.66";
/// TCP peers: IPv4, the same as IPv4-mapped IPv6, two addresses of one /64 and one of
/// another, a blocked address, and a proxy that is trusted when the run trusts one.
const PEERS: [&str; 9] = [
    "198.51.100.1",
    "198.51.100.2",
    "198.51.100.3",
    "::ffff:198.51.100.1",
    "2001:db8:0:1::1",
    "2001:db8:0:1::2",
    "2001:db8:0:2::1",
    BLOCKED,
    TRUSTED_PROXY,
];
/// `X-Forwarded-For` values (read only from a trusted peer).
const FORWARDED: [&str; 8] = [
    "198.51.100.3",
    "::ffff:198.51.100.2",
    "203.0.113.5, 10.9.9.8",
    "2001:db8:0:1::7",
    "junk, 198.51.100.2",
    "192.0.2.66",
    "198.51.100.1, not-an-ip",
    "[2001:db8:0:2::9]:443",
];

use crate::soak::{env_u64, model_seeds, Rng};

/// What the model draws from the soaks' generator.
trait Draw {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
    fn below_u64(&mut self, n: u64) -> u64;
}

impl Draw for Rng {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn below_u64(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ------------------------------------------------------------------------------- the setup

/// One run's configuration.
#[derive(Debug, Clone)]
struct Setup {
    mode: GatekeeperMode,
    max_ips: u32,
    auto_ban: bool,
    max_recorded: u32,
    window_s: u64,
    /// Requests per window (0 = off).
    budget: u32,
    /// Failed authentications per window (0 = off).
    fail_budget: u32,
    /// Concurrent requests per user or IP (0 = off).
    max_inflight: u32,
    trusted: bool,
}

impl Setup {
    fn random(rng: &mut Rng) -> Self {
        let mode = *rng.pick(&[
            GatekeeperMode::UserToken,
            GatekeeperMode::UserToken,
            GatekeeperMode::ProxyKey,
            GatekeeperMode::None,
        ]);
        let window_s = *rng.pick(&[1, 10, 60]);
        Self {
            mode,
            max_ips: *rng.pick(&[0, 1, 2, 3]),
            auto_ban: rng.chance(30),
            max_recorded: *rng.pick(&[0, 2, 1000]),
            window_s,
            budget: if rng.chance(85) {
                1 + rng.below_u64(5) as u32
            } else {
                0
            },
            fail_budget: if rng.chance(85) {
                1 + rng.below_u64(4) as u32
            } else {
                0
            },
            max_inflight: *rng.pick(&[0, 0, 1, 2]),
            trusted: rng.chance(60),
        }
    }

    fn per_minute(&self, budget: u32) -> u64 {
        u64::from(budget) * 60 / self.window_s
    }

    fn yaml(&self) -> String {
        let mode = match self.mode {
            GatekeeperMode::None => "none",
            GatekeeperMode::ProxyKey => "proxy_key",
            GatekeeperMode::UserToken => "user_token",
        };
        format!(
            "listen: [\"127.0.0.1:7860\"]\n\
             upstream:\n  addrs: [\"127.0.0.1:8080\"]\n\
             gatekeeper:\n  mode: {mode}\n  max_ips_per_user: {}\n  max_ips_auto_ban: {}\n  max_recorded_ips: {}\n\
             rate_limit:\n  estimator_slots: 1024\n  max_inflight: {}\n  requests_per_minute: {}\n  auth_failures_per_minute: {}\n  window_seconds: {}\n\
             trusted_proxies: [{}]\n\
             ip_blocklist: [\"{BLOCKED}\"]\n\
             clients:\n  max_body_bytes: {MAX_BODY}\n\
             store:\n  kind: memory\n",
            self.max_ips,
            self.auto_ban,
            self.max_recorded,
            self.max_inflight,
            self.per_minute(self.budget),
            self.per_minute(self.fail_budget),
            self.window_s,
            if self.trusted { "\"10.9.9.0/24\"" } else { "" },
        )
    }

    fn proxy(&self, cache: Arc<UserCache>) -> Proxy {
        let env: HashMap<String, String> = [
            ("ADMIN_KEY".to_string(), ADMIN_KEY.to_string()),
            ("PROXY_KEY".to_string(), PROXY_KEY.to_string()),
        ]
        .into_iter()
        .collect();
        let config = Config::from_yaml(&self.yaml(), "model", &env)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.yaml()));
        let metrics = Arc::new(Metrics::new("model", "memory"));
        let status = StoreStatus::new("memory", Arc::clone(&cache));
        Proxy::new(&config, cache, status, metrics, None)
    }
}

// ------------------------------------------------------------------------ the rate model

/// A rate decision as the headers show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rate {
    Allowed {
        limit: u32,
        remaining: u32,
        reset: u64,
    },
    Limited {
        limit: u32,
        retry_after: u64,
        reset: u64,
    },
}

/// `a / b` rounded up.
fn ceil_div(a: u128, b: u128) -> u128 {
    a.div_ceil(b)
}

/// The documented sliding window, exactly: the estimate is `previous × (w − e) / w + current`
/// (`e` ms into the current window of `w` ms). Returns, as a fraction `(num, den)`, the ms
/// until the estimate is at most `target` if nothing more is counted.
fn ms_until_at_most(prev: u128, cur: u128, e: u128, w: u128, target: u128) -> (u128, u128) {
    if prev * (w - e) + cur * w <= target * w {
        return (0, 1);
    }
    let rest = w - e;
    if cur <= target {
        // prev > 0 here: within this window the previous one's weight decays.
        (rest * prev - (target - cur) * w, prev)
    } else {
        // After the boundary this window's events decay in turn.
        (rest * cur + (cur - target) * w, cur)
    }
}

/// `lag`: how far the clock is behind the start of the window the limiter is in (a clock
/// stepped back by less than a window): waits and resets count from that start.
#[allow(clippy::too_many_arguments)]
fn exact_decision(
    prev: u32,
    cur: u32,
    e: u64,
    w: u64,
    limit: u32,
    now: u64,
    lag: u64,
    counted: bool,
) -> Rate {
    let (p, c, e, w, l) = (
        u128::from(prev),
        u128::from(cur),
        u128::from(e),
        u128::from(w),
        u128::from(limit),
    );
    let lag = u128::from(lag);
    let reset_after = |c: u128| {
        let (num, den) = ms_until_at_most(p, c, e, w, 0);
        now + (lag + ceil_div(num, den)) as u64
    };
    if p * (w - e) + (c + 1) * w > l * w {
        let (num, den) = ms_until_at_most(p, c, e, w, l - 1);
        return Rate::Limited {
            limit,
            retry_after: (ceil_div(num + lag * den, den * 1000) as u64).max(1),
            reset: reset_after(c),
        };
    }
    let c = c + u128::from(counted);
    let left = l * w - p * (w - e) - c * w;
    Rate::Allowed {
        limit,
        remaining: (left / w) as u32,
        reset: reset_after(c),
    }
}

/// One limiter: counts per key and window, and the window bookkeeping tollgate documents
/// (windows on the grid; a clock stepped back past the start of the previous window starts
/// over, a smaller step back stays in the window reached until the clock catches up, and
/// `Retry-After` and `X-RateLimit-Reset` then count from the window's start) or, where the
/// documents say nothing, does (a limiter of rare events looks at the clock only while it may
/// hold counts).
struct ModelLimiter {
    limit: u32,
    w: u64,
    start: u64,
    generation: u64,
    /// 1 + the generation of the newest event, 0 once none can be left.
    latest: u64,
    counts: HashMap<(String, u64), u32>,
}

impl ModelLimiter {
    fn new(limit: u32, w: u64) -> Self {
        Self {
            limit,
            w,
            start: 0,
            generation: 0,
            latest: 0,
            counts: HashMap::new(),
        }
    }

    /// Moves to the window `now` is in; returns the ms into it.
    fn advance(&mut self, now: u64) -> u64 {
        let past = now.saturating_sub(self.start);
        if past < self.w {
            if now + self.w < self.start {
                self.start = now - now % self.w;
                self.counts.clear();
                self.generation += 2;
                return now - self.start;
            }
            return past;
        }
        self.start += self.w * (past / self.w);
        self.generation += 1;
        past % self.w
    }

    fn decide(&mut self, key: &str, now: u64, counted: bool) -> Rate {
        let e = self.advance(now);
        let count = |start: u64| *self.counts.get(&(key.to_string(), start)).unwrap_or(&0);
        let prev = self.start.checked_sub(self.w).map_or(0, count);
        let cur = count(self.start);
        let lag = self.start.saturating_sub(now);
        exact_decision(prev, cur, e, self.w, self.limit, now, lag, counted)
    }

    fn add(&mut self, key: &str) {
        self.latest = self.latest.max(self.generation + 1);
        *self
            .counts
            .entry((key.to_string(), self.start))
            .or_default() += 1;
    }

    fn check_and_count(&mut self, key: &str, now: u64) -> Rate {
        let rate = self.decide(key, now, true);
        if matches!(rate, Rate::Allowed { .. }) {
            self.add(key);
        }
        rate
    }

    fn count(&mut self, key: &str, now: u64) {
        self.advance(now);
        self.add(key);
    }

    /// `None`: nothing can be counted, so the key is allowed.
    fn check_rare(&mut self, key: &str, now: u64) -> Option<Rate> {
        if self.latest == 0 {
            return None;
        }
        self.advance(now);
        if self.generation > self.latest {
            self.latest = 0;
            return None;
        }
        Some(self.decide(key, now, false))
    }
}

// ------------------------------------------------------------------------ the user model

#[derive(Clone, Debug, PartialEq)]
struct ModelUser {
    user_type: UserType,
    ip: Vec<String>,
    disabled_at: Option<u64>,
    disabled_reason: Option<String>,
    expires_at: Option<u64>,
    max_ips: Option<u32>,
    prompt_count: u64,
    last_used_at: Option<u64>,
    /// Disabling sets `meta.refreshable = false`.
    not_refreshable: bool,
}

impl ModelUser {
    fn new() -> Self {
        Self {
            user_type: UserType::Normal,
            ip: Vec::new(),
            disabled_at: None,
            disabled_reason: None,
            expires_at: None,
            max_ips: None,
            prompt_count: 0,
            last_used_at: None,
            not_refreshable: false,
        }
    }

    fn knows(&self, ip: IpAddr) -> bool {
        self.ip
            .iter()
            .filter_map(|e| e.parse::<IpAddr>().ok())
            .any(|e| e.to_canonical() == ip)
    }

    fn disable(&mut self, reason: Option<&str>, now: u64) {
        self.disabled_at = Some(now);
        self.disabled_reason = reason.map(str::to_string);
        self.not_refreshable = true;
    }

    /// An admin's partial update (`null` removes).
    fn apply(&mut self, patch: &Value) {
        let user = self;
        for (name, value) in patch.as_object().unwrap() {
            match name.as_str() {
                "type" => {
                    user.user_type = serde_json::from_value(value.clone()).unwrap();
                }
                "maxIps" => user.max_ips = value.as_u64().map(|v| v as u32),
                "expiresAt" => user.expires_at = value.as_u64(),
                "ip" => {
                    user.ip = value
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string())
                        .collect()
                }
                "disabledAt" => user.disabled_at = value.as_u64(),
                "disabledReason" => user.disabled_reason = value.as_str().map(str::to_string),
                "promptCount" => user.prompt_count = value.as_u64().unwrap(),
                other => unreachable!("{other}"),
            }
        }
    }

    fn touch(&mut self, now: u64) {
        self.last_used_at = Some(self.last_used_at.unwrap_or(0).max(now));
    }

    /// What the cache holds, in the model's terms.
    fn of(user: &crate::users::User) -> Self {
        Self {
            user_type: user.user_type,
            ip: user.ip.clone(),
            disabled_at: user.disabled_at,
            disabled_reason: user.disabled_reason.clone(),
            expires_at: user.expires_at,
            max_ips: user.max_ips,
            prompt_count: user.prompt_count,
            last_used_at: user.last_used_at,
            not_refreshable: user
                .meta
                .as_ref()
                .is_some_and(|m| m.get("refreshable") == Some(&Value::Bool(false))),
        }
    }
}

// ------------------------------------------------------------------- requests and answers

#[derive(Clone, Debug)]
enum Credential {
    None,
    Bearer(String),
    /// `bearer` in lower case: the scheme is case-insensitive.
    BearerLower(String),
    XApiKey(String),
    Query(String),
    /// Another scheme is not a credential.
    Basic,
    /// Another scheme beside an `x-api-key`: the key is the credential.
    BasicAndXApiKey(String),
}

impl Credential {
    /// The token presented: trimmed (docs/user-management.md), from wherever it came.
    fn token(&self) -> Option<String> {
        match self {
            Credential::None | Credential::Basic => None,
            Credential::Query(t) => Some(t.replace("%20", " ").replace('+', " ")),
            Credential::Bearer(t)
            | Credential::BearerLower(t)
            | Credential::XApiKey(t)
            | Credential::BasicAndXApiKey(t) => Some(t.clone()),
        }
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    }

    fn request(&self, forwarded: Option<&str>, shape: Shape) -> RequestHeader {
        let base = match shape {
            Shape::Unreadable => "v1/models",
            _ => "/v1/models",
        };
        let path = match self {
            Credential::Query(t) => format!("{base}?a=1&key={t}"),
            _ => base.to_string(),
        };
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        req.append_header("host", "api.example.com").unwrap();
        match self {
            Credential::Bearer(t) => req.append_header("authorization", format!("Bearer {t}")),
            Credential::BearerLower(t) => req.append_header("authorization", format!("bearer {t}")),
            Credential::XApiKey(t) => req.append_header("x-api-key", t.as_str()),
            Credential::Basic => req.append_header("authorization", "Basic dXNlcjpwdw=="),
            Credential::BasicAndXApiKey(t) => {
                req.append_header("authorization", "Basic dXNlcjpwdw==")
                    .unwrap();
                req.append_header("x-api-key", t.as_str())
            }
            Credential::None | Credential::Query(_) => Ok(true),
        }
        .unwrap();
        if let Some(value) = forwarded {
            req.append_header("x-forwarded-for", value).unwrap();
        }
        if shape == Shape::TooLarge {
            req.append_header("content-length", (MAX_BODY + 1).to_string())
                .unwrap();
        }
        req
    }
}

/// What the request itself shows before its credential is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Plain,
    /// A target that is not a path (`v1/models?key=…`): 400 in every mode.
    Unreadable,
    /// A declared body over `clients.max_body_bytes`: 413, before the gatekeeper.
    TooLarge,
}

/// An answer as the client sees its status line and the headers this test is about.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    kind: Option<String>,
    message: Option<String>,
    /// `retry-after`, `www-authenticate` and `x-ratelimit-*`, sorted.
    headers: Vec<(String, String)>,
}

impl Answer {
    fn admitted(rate: Option<Rate>) -> Self {
        let mut headers = Vec::new();
        if let Some(Rate::Allowed {
            limit,
            remaining,
            reset,
        }) = rate
        {
            headers = rate_headers(limit, remaining, reset);
        }
        Self {
            status: 200,
            kind: None,
            message: None,
            headers,
        }
    }

    fn refused(status: u16, kind: &str, message: Option<String>) -> Self {
        Self {
            status,
            kind: Some(kind.to_string()),
            message,
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: &str, value: impl ToString) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self.headers.sort();
        self
    }
}

fn rate_headers(limit: u32, remaining: u32, reset: u64) -> Vec<(String, String)> {
    let mut headers = vec![
        ("x-ratelimit-limit".to_string(), limit.to_string()),
        ("x-ratelimit-remaining".to_string(), remaining.to_string()),
        ("x-ratelimit-reset".to_string(), reset.to_string()),
    ];
    headers.sort();
    headers
}

/// The answer tollgate gives: the refusal `decide` returned, or the headers `response_filter`
/// adds to a proxied answer.
fn observed(
    result: &Result<(), (super::ErrorReply, crate::observe::Outcome)>,
    ctx: &RequestCtx,
) -> Answer {
    match result {
        Ok(()) => {
            let mut response = ResponseHeader::build(200, None).unwrap();
            add_rate_headers(&mut response, ctx.rate).unwrap();
            let mut headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            headers.sort();
            Answer {
                status: 200,
                kind: None,
                message: None,
                headers,
            }
        }
        Err((reply, _)) => {
            let body: Value = serde_json::from_slice(&reply.body).unwrap();
            let mut headers: Vec<(String, String)> = reply
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            headers.sort();
            Answer {
                status: reply.status,
                kind: body["error"]["type"].as_str().map(str::to_string),
                message: body["error"]["message"].as_str().map(str::to_string),
                headers,
            }
        }
    }
}

// ------------------------------------------------------------------------------ the model

struct Model {
    setup: Setup,
    users: BTreeMap<String, ModelUser>,
    /// Which creation of a user this is: a request admitted before a hard delete counts on
    /// the removed user, not on one created again with its token.
    incarnations: BTreeMap<String, u64>,
    created: u64,
    requests: Option<ModelLimiter>,
    failures: Option<ModelLimiter>,
    /// Requests holding a `max_inflight` slot, per limit key.
    inflight: HashMap<String, u32>,
}

/// Who an admitted (or limit-refused) request was: the user it authenticated, and the
/// `max_inflight` slot it holds until it ends.
#[derive(Debug, Default)]
struct Admitted {
    user: Option<(String, u64)>,
    slot: Option<String>,
}

/// The client as per-IP limits count it: IPv4, or the /64 of IPv6.
fn subscriber(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("{:x}/64", u128::from(v6) >> 64),
    }
}

impl Model {
    fn new(setup: &Setup) -> Self {
        let w = setup.window_s * 1000;
        Self {
            setup: setup.clone(),
            users: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            created: 0,
            requests: (setup.budget > 0).then(|| ModelLimiter::new(setup.budget, w)),
            failures: (setup.fail_budget > 0 && setup.mode != GatekeeperMode::None)
                .then(|| ModelLimiter::new(setup.fail_budget, w)),
            inflight: HashMap::new(),
        }
    }

    /// The client: the peer, or through a trusted peer the rightmost hop that is not trusted.
    fn client(&self, peer: IpAddr, forwarded: Option<&str>) -> IpAddr {
        let trusted = |ip: IpAddr| {
            self.setup.trusted
                && matches!(ip.to_canonical(), IpAddr::V4(v4) if v4.octets()[..3] == [10, 9, 9])
        };
        let peer = peer.to_canonical();
        if !trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded.unwrap_or("").rsplit(',') {
            let hop = hop.trim();
            let parsed = hop
                .parse::<IpAddr>()
                .ok()
                .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()));
            let Some(ip) = parsed else { break };
            client = ip.to_canonical();
            if !trusted(client) {
                break;
            }
        }
        client
    }

    /// The answer to a request, and who it was (see [`Admitted`]).
    fn decide(
        &mut self,
        credential: &Credential,
        shape: Shape,
        client: IpAddr,
        now: u64,
    ) -> (Answer, Admitted) {
        if let Some(answer) = Self::screen(shape, client) {
            return (answer, Admitted::default());
        }
        let ip_key = format!("ip:{}", subscriber(client));
        if let Some(answer) = self.locked_out(&ip_key, now) {
            return (answer, Admitted::default());
        }
        let token = credential.token();
        let user = match self.gatekeeper(token.as_deref(), client, now) {
            Ok(user) => user,
            Err(answer) => {
                if answer.status == 401 {
                    if let Some(failures) = &mut self.failures {
                        failures.count(&ip_key, now);
                    }
                }
                return (answer, Admitted::default());
            }
        };
        let user = user.map(|t| {
            let incarnation = self.incarnations[t.as_str()];
            (t, incarnation)
        });
        self.limits(user, ip_key, now)
    }

    /// The block list, then what the request itself shows: refused before the credential is
    /// read, at no cost to any budget.
    fn screen(shape: Shape, client: IpAddr) -> Option<Answer> {
        if client == BLOCKED.parse::<IpAddr>().unwrap() {
            let message = "Forbidden (by IP blocklist)";
            return Some(Answer::refused(403, "forbidden", Some(message.into())));
        }
        match shape {
            Shape::Plain => None,
            Shape::Unreadable => {
                let message = "The request target must be a path (/...) or an http(s) URL";
                Some(Answer::refused(400, "bad_request", Some(message.into())))
            }
            Shape::TooLarge => {
                let message = format!(
                    "The request body is larger than this proxy accepts ({MAX_BODY} bytes)"
                );
                Some(Answer::refused(413, "request_too_large", Some(message)))
            }
        }
    }

    /// The auth-failure lockout of the client's IP (or /64): 429 with only `Retry-After`.
    fn locked_out(&mut self, ip_key: &str, now: u64) -> Option<Answer> {
        let Rate::Limited { retry_after, .. } = self.failures.as_mut()?.check_rare(ip_key, now)?
        else {
            return None;
        };
        let message = format!(
            "Too many failed authentication attempts from this IP. Please try again in {retry_after} seconds."
        );
        Some(
            Answer::refused(429, "proxy_rate_limited", Some(message))
                .with("retry-after", retry_after),
        )
    }

    /// The request rate and `max_inflight` of an admitted request: per user (`special` users
    /// exempt from the rate only), else per IP. A request the concurrency cap refuses is not
    /// counted against the rate.
    fn limits(
        &mut self,
        user: Option<(String, u64)>,
        ip_key: String,
        now: u64,
    ) -> (Answer, Admitted) {
        let (key, applies) = match &user {
            Some((token, _)) => (
                format!("user:{token}"),
                self.users[token].user_type != UserType::Special,
            ),
            None => (ip_key, true),
        };
        let mut admitted = Admitted { user, slot: None };
        let max = self.setup.max_inflight;
        let slot_free = (max > 0).then(|| self.inflight.get(&key).copied().unwrap_or(0) < max);
        let rate = match &mut self.requests {
            Some(requests) if applies && slot_free == Some(false) => {
                Some(requests.decide(&key, now, false))
            }
            Some(requests) if applies => Some(requests.check_and_count(&key, now)),
            _ => None,
        };
        let answer = match rate {
            Some(Rate::Limited {
                limit,
                retry_after,
                reset,
            }) => self.rate_limited(limit, retry_after, reset),
            _ if slot_free == Some(false) => {
                let message = format!(
                    "Too many concurrent requests: at most {max} at a time. Wait for one to finish."
                );
                let mut answer = Answer::refused(429, "proxy_concurrency_limited", Some(message))
                    .with("retry-after", 1);
                answer.headers.extend(Answer::admitted(rate).headers);
                answer.headers.sort();
                answer
            }
            _ => {
                if slot_free == Some(true) {
                    *self.inflight.entry(key.clone()).or_default() += 1;
                    admitted.slot = Some(key);
                }
                Answer::admitted(rate)
            }
        };
        (answer, admitted)
    }

    fn rate_limited(&self, limit: u32, retry_after: u64, reset: u64) -> Answer {
        let per = match self.setup.window_s {
            60 => "per minute".to_string(),
            1 => "per second".to_string(),
            n => format!("per {n} seconds"),
        };
        let message = format!(
            "This proxy is rate limited to {limit} requests {per}. Please try again in {retry_after} seconds."
        );
        let mut answer = Answer::refused(429, "proxy_rate_limited", Some(message))
            .with("retry-after", retry_after);
        answer.headers.extend(rate_headers(limit, 0, reset));
        answer.headers.sort();
        answer
    }

    /// `Ok(Some(token))`: a user; `Ok(None)`: anonymous.
    fn gatekeeper(
        &mut self,
        token: Option<&str>,
        client: IpAddr,
        now: u64,
    ) -> Result<Option<String>, Answer> {
        let unauthorized = |token: Option<&str>| {
            let (message, challenge) = if token.is_none() {
                (
                    "Unauthorized: send your token as 'Authorization: Bearer <token>'",
                    "Bearer realm=\"tollgate\"",
                )
            } else {
                (
                    "Unauthorized: unknown or invalid token",
                    "Bearer realm=\"tollgate\", error=\"invalid_token\"",
                )
            };
            Answer::refused(401, "unauthorized", Some(message.into()))
                .with("www-authenticate", challenge)
        };
        if token == Some(ADMIN_KEY) {
            return Ok(None);
        }
        match self.setup.mode {
            GatekeeperMode::None => return Ok(None),
            GatekeeperMode::ProxyKey if token == Some(PROXY_KEY) => return Ok(None),
            GatekeeperMode::ProxyKey => return Err(unauthorized(token)),
            GatekeeperMode::UserToken => {}
        }
        let Some(token) = token else {
            return Err(unauthorized(None));
        };
        let (global, auto_ban, max_recorded) = (
            self.setup.max_ips,
            self.setup.auto_ban,
            self.setup.max_recorded,
        );
        let Some(user) = self.users.get_mut(token) else {
            return Err(unauthorized(Some(token)));
        };
        let forbidden = |message: &str| Answer::refused(403, "forbidden", Some(message.into()));
        if user.disabled_at.is_some() {
            let reason = user
                .disabled_reason
                .as_deref()
                .filter(|r| !r.is_empty())
                .unwrap_or("User token disabled");
            return Err(forbidden(&format!("Forbidden: {reason}")));
        }
        if user.user_type == UserType::Temporary && user.expires_at.is_some_and(|at| at <= now) {
            return Err(forbidden("Forbidden: Temporary token expired."));
        }
        if user.knows(client) {
            return Ok(Some(token.to_string()));
        }
        let limit = match user.user_type {
            UserType::Special => 0,
            _ => user.max_ips.unwrap_or(global),
        };
        let len = user.ip.len();
        if limit != 0 && len >= limit as usize {
            if auto_ban {
                user.ip.push(client.to_string());
                user.disable(Some("IP address limit exceeded."), now);
                return Err(forbidden("Forbidden: IP address limit exceeded."));
            }
            return Err(forbidden(
                "Forbidden: no more IP addresses allowed for this user token",
            ));
        }
        if !(limit == 0 && max_recorded != 0 && len >= max_recorded as usize) {
            user.ip.push(client.to_string());
        }
        Ok(Some(token.to_string()))
    }

    /// The end of a request: `promptCount` on a 2xx, `lastUsedAt` always (on the user as it
    /// was when the request was admitted), and its concurrency slot given back.
    fn finish(&mut self, admitted: Admitted, success: bool, now: u64) {
        if let Some((token, incarnation)) = admitted.user {
            if self.incarnations.get(&token) == Some(&incarnation) {
                let user = self.users.get_mut(&token).unwrap();
                if success {
                    user.prompt_count += 1;
                }
                user.touch(now);
            }
        }
        if let Some(key) = admitted.slot {
            *self.inflight.get_mut(&key).unwrap() -= 1;
        }
    }
}

// ------------------------------------------------------------------------------- the run

/// Whether every limit key a run can use has counters of its own in both limiters. The
/// sketches are small (1,024 slots, so that the window clears of a debug build stay cheap) and
/// keyed by per-process random hashes; two keys sharing counters would make tollgate's counts
/// exceed the model's for reasons that are the sketch's documented approximation.
fn keys_apart(proxy: &Proxy) -> bool {
    let ips = [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
        "203.0.113.5",
        TRUSTED_PROXY,
        "2001:db8:0:1::",
        "2001:db8:0:2::",
    ];
    let keys: Vec<u64> = ips
        .iter()
        .map(|ip| proxy.hasher.hash(LimitKey::Ip(ip.parse().unwrap())))
        .chain(USERS.iter().map(|t| proxy.cache.token_hash(t)))
        .collect();
    [&proxy.requests, &proxy.auth_failures]
        .into_iter()
        .flatten()
        .all(|limiter| {
            let mut blocks: Vec<usize> = keys.iter().map(|k| limiter.block_of(*k)).collect();
            blocks.sort_unstable();
            blocks.windows(2).all(|pair| pair[0] != pair[1])
        })
}

/// A request admitted and still running (its answer streaming), holding its context.
struct Held {
    ctx: RequestCtx,
    admitted: Admitted,
    success: bool,
}

struct Run {
    held: Vec<Held>,
    rng: Rng,
    setup: Setup,
    cache: Arc<UserCache>,
    proxy: Proxy,
    model: Model,
    now: u64,
    trace: Vec<String>,
    seed: u64,
}

impl Run {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let setup = Setup::random(&mut rng);
        let (cache, proxy) = loop {
            let cache = Arc::new(UserCache::default());
            let proxy = setup.proxy(Arc::clone(&cache));
            if keys_apart(&proxy) {
                break (cache, proxy);
            }
        };
        let model = Model::new(&setup);
        let now = GRID + rng.below_u64(3 * setup.window_s * 1000);
        Self {
            held: Vec::new(),
            rng,
            trace: vec![format!("{setup:?}")],
            setup,
            cache,
            proxy,
            model,
            now,
            seed,
        }
    }

    fn fail(&self, what: String) -> ! {
        let mut text = String::new();
        let from = self.trace.len().saturating_sub(40);
        if from > 0 {
            let _ = writeln!(text, "{}", self.trace[0]);
        }
        for line in &self.trace[from..] {
            let _ = writeln!(text, "  {line}");
        }
        panic!(
            "{what}\nreplay: TOLLGATE_MODEL_SEED={} cargo test --lib decision_model\n{text}",
            self.seed
        );
    }

    fn w(&self) -> u64 {
        self.setup.window_s * 1000
    }

    fn step(&mut self) {
        match self.rng.below_u64(100) {
            0..=54 => self.request(),
            55..=59 => self.release(),
            60..=79 => self.admin(),
            _ => self.clock(),
        }
        self.compare_users();
    }

    fn clock(&mut self) {
        let w = self.w();
        let before = self.now;
        self.now = match self.rng.below_u64(8) {
            0 => self.now + 1,
            1..=2 => self.now + self.rng.below_u64(1500),
            3 => {
                // Just before, at or just after the next window boundary.
                let next = self.now - self.now % w + w;
                next + self.rng.below_u64(3) - 1
            }
            4 => self.now + w + self.rng.below_u64(2 * w),
            5 => self.now + self.rng.below_u64(w / 4 + 1),
            6 => self.now.saturating_sub(1 + self.rng.below_u64(w)),
            _ => self
                .now
                .saturating_sub(2 * w + 1 + self.rng.below_u64(5 * w)),
        };
        self.trace.push(format!(
            "clock {before} -> {} ({:+})",
            self.now,
            self.now as i64 - before as i64
        ));
    }

    fn token(&mut self) -> String {
        match self.rng.below_u64(10) {
            0..=5 => self.rng.pick(&USERS).to_string(),
            6 => "nobody".to_string(),
            7 => ADMIN_KEY.to_string(),
            8 => PROXY_KEY.to_string(),
            _ => self.rng.pick(&USERS).to_string(),
        }
    }

    fn credential(&mut self) -> Credential {
        let token = self.token();
        let padded = self.rng.chance(10);
        let pad = |left: &str, right: &str| {
            if padded {
                format!("{left}{token}{right}")
            } else {
                token.clone()
            }
        };
        match self.rng.below_u64(12) {
            0 => Credential::None,
            1 => Credential::Basic,
            2 => Credential::BearerLower(pad(" ", " ")),
            3 => Credential::XApiKey(pad(" ", "  ")),
            4 => Credential::Query(pad("%20", "+")),
            5 => Credential::BasicAndXApiKey(pad("", " ")),
            _ => Credential::Bearer(pad("  ", "")),
        }
    }

    fn request(&mut self) {
        let credential = self.credential();
        let peer: IpAddr = self.rng.pick(&PEERS).parse().unwrap();
        let forwarded = self
            .rng
            .chance(if peer.to_string() == TRUSTED_PROXY {
                80
            } else {
                10
            })
            .then(|| *self.rng.pick(&FORWARDED));
        let shape = match self.rng.below_u64(100) {
            0..=2 => Shape::Unreadable,
            3..=6 => Shape::TooLarge,
            _ => Shape::Plain,
        };
        let req = credential.request(forwarded, shape);
        let now = self.now;
        let mut ctx = self.proxy.new_ctx();
        let result = self.proxy.decide(&req, peer, now, &mut ctx);
        let actual = observed(&result, &ctx);
        let client = self.model.client(peer, forwarded);
        let (expected, admitted) = self.model.decide(&credential, shape, client, now);
        let success = result.is_ok() && self.rng.chance(70);
        self.trace.push(format!(
            "request {credential:?} {shape:?} peer {peer} xff {forwarded:?} at {now} -> {} {:?} {:?}{}",
            actual.status,
            actual.message,
            actual.headers,
            if success { " (upstream 2xx)" } else { "" }
        ));
        if actual != expected {
            self.fail(format!(
                "decision differs from the model\n  tollgate: {actual:?}\n  model:    {expected:?}"
            ));
        }
        if ctx.client_ip != client {
            self.fail(format!("client ip {} , model {client}", ctx.client_ip));
        }
        if success {
            ctx.upstream_status = Some(200);
        }
        if result.is_ok() && self.setup.max_inflight > 0 && self.rng.chance(40) {
            self.held.push(Held {
                ctx,
                admitted,
                success,
            });
            return;
        }
        self.proxy.account(&ctx, now);
        drop(ctx);
        self.model.finish(admitted, success, now);
    }

    /// One of the requests still running ends: its slot is given back and its user counted.
    fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let i = self.rng.below_u64(self.held.len() as u64) as usize;
        let held = self.held.swap_remove(i);
        self.trace.push(format!(
            "end of request {:?} at {}",
            held.admitted, self.now
        ));
        self.proxy.account(&held.ctx, self.now);
        drop(held.ctx);
        self.model.finish(held.admitted, held.success, self.now);
    }

    /// An admin edit through the cache, as the admin API makes it.
    fn admin(&mut self) {
        let token = self.rng.pick(&USERS).to_string();
        let now = self.now;
        let exists = self.model.users.contains_key(&token);
        match self.rng.below_u64(13) {
            0 if exists => {
                let reason = match self.rng.below_u64(3) {
                    0 => None,
                    1 => Some(String::new()),
                    _ => Some(format!("reason-{}", self.rng.below_u64(100))),
                };
                self.trace
                    .push(format!("disable {token} {reason:?} at {now}"));
                self.cache.disable(&token, reason.as_deref(), now).unwrap();
                self.model
                    .users
                    .get_mut(&token)
                    .unwrap()
                    .disable(reason.as_deref(), now);
            }
            2 | 3 if exists => {
                let patch = self.patch();
                self.remote(&token, patch);
            }
            1 if exists => {
                self.trace.push(format!("remove {token}"));
                self.cache.remove(&token).unwrap();
                self.model.users.remove(&token);
                self.model.incarnations.remove(&token);
            }
            _ => {
                let patch = self.patch();
                self.put(&token, patch);
            }
        }
    }

    fn patch(&mut self) -> Value {
        let now = self.now;
        match self.rng.below_u64(9) {
            0 => json!({}),
            1 => json!({"type": *self.rng.pick(&["normal", "special", "temporary"])}),
            2 => {
                if self.rng.chance(25) {
                    json!({"maxIps": null})
                } else {
                    json!({"maxIps": self.rng.below_u64(4)})
                }
            }
            3 => {
                if self.rng.chance(25) {
                    json!({"expiresAt": null})
                } else {
                    // Often exactly at, or a millisecond either side of, the clock's time.
                    let at = match self.rng.below_u64(4) {
                        0 => now,
                        1 => now + 1,
                        2 => now - 1,
                        _ => (now + self.rng.below_u64(8000)).saturating_sub(2000),
                    };
                    json!({ "expiresAt": at })
                }
            }
            4 => {
                let pool = [
                    "198.51.100.1",
                    "::ffff:198.51.100.2",
                    "2001:DB8:0:1::1",
                    "2001:db8:0:2::1",
                    "risu1-198.51.100.3",
                    "203.0.113.5",
                ];
                let n = self.rng.below_u64(4);
                let ips: Vec<&str> = (0..n).map(|_| *self.rng.pick(&pool)).collect();
                json!({ "ip": ips })
            }
            5 => match self.rng.below_u64(3) {
                0 => json!({"disabledAt": null}),
                1 => json!({"disabledReason": *self.rng.pick(&["later", ""])}),
                _ => json!({"disabledAt": null, "disabledReason": null}),
            },
            6 => json!({"disabledAt": now, "disabledReason": *self.rng.pick(&["", "manual"])}),
            7 => json!({"promptCount": self.rng.below_u64(50)}),
            _ => json!({"type": "temporary", "expiresAt": now + self.rng.below_u64(3000)}),
        }
    }

    fn put(&mut self, token: &str, patch: Value) {
        self.trace
            .push(format!("put {token} {patch} at {}", self.now));
        let parsed: UserPatch = serde_json::from_value(patch.clone()).unwrap();
        parsed.validate("").unwrap();
        self.cache.upsert(token, &parsed, self.now);
        if !self.model.users.contains_key(token) {
            self.model.created += 1;
            self.model
                .incarnations
                .insert(token.to_string(), self.model.created);
        }
        let user = self
            .model
            .users
            .entry(token.to_string())
            .or_insert_with(ModelUser::new);
        user.apply(&patch);
    }

    /// The same edit made elsewhere (another instance, the database console) and brought by
    /// the store's change stream, once this instance's own changes are written.
    fn remote(&mut self, token: &str, patch: Value) {
        self.trace
            .push(format!("remote edit {token} {patch} at {}", self.now));
        let taken = self.cache.take_changes(usize::MAX);
        self.cache.acknowledge(&taken.changes, true);
        let parsed: UserPatch = serde_json::from_value(patch.clone()).unwrap();
        let mut remote = self.cache.user(token).unwrap();
        parsed.apply_to(&mut remote);
        self.cache.apply_remote(token, Some(&remote));
        self.model.users.get_mut(token).unwrap().apply(&patch);
    }

    fn compare_users(&self) {
        for token in USERS {
            let actual = self.cache.user(token).map(|u| ModelUser::of(&u));
            let expected = self.model.users.get(token);
            if actual.as_ref() != expected {
                self.fail(format!(
                    "user {token} differs from the model\n  tollgate: {actual:?}\n  model:    {expected:?}"
                ));
            }
        }
    }
}

#[test]
fn the_decision_follows_the_documented_model() {
    let steps = env_u64("TOLLGATE_MODEL_STEPS").unwrap_or(400);
    for seed in model_seeds(150) {
        let mut run = Run::new(seed);
        for _ in 0..steps {
            run.step();
        }
    }
}
