//! A model-based, seeded randomized test of the admin API: a reference model of the documented
//! API (docs/admin-api.md, docs/migration.md) keeps the expected users; random calls (creates,
//! reads, lists with sorts, partial and full upserts of new and existing users, disables,
//! removals, imports with duplicates and bad entries, exports sent back, re-enables,
//! `tokenRefresh`, temporary users, malformed and mistyped bodies, unknown fields, oversized
//! values, unicode, wrong or missing keys, wrong methods, other spellings of the paths) go to
//! the real binary and to the model. Every status, error `type` and `field`, and every User
//! the API returns must be the model's (times set to "now" must fall within the call); every
//! few steps the full list must equal the model's users. A few proxied requests check that the
//! proxy listener honours the state. It runs on the memory store, then on SQLite with a
//! restart in the middle and a crash (SIGKILL) a quarter and three quarters in, after which the
//! list must still equal the model (admin writes are durable when they answer; only what
//! requests changed is written behind), then with several runs at once on one SQLite tollgate.
//!
//! The suite runs one seed. To soak:
//! `TOLLGATE_SOAK_SEED=<n> TOLLGATE_SOAK_ITERATIONS=<k> cargo nextest run --test e2e admin_api::model`
//! (iteration `i` uses seed `n + i`; the failing seed and step are in the panic message;
//! `TOLLGATE_SOAK_STEPS` sets the calls per store, 140 by default).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Map;

use super::*;
use crate::support::soak::{env_u64, for_each_seed, Rng};
use crate::support::wait_until;

/// The seed the suite runs with.
const DEFAULT_SEED: u64 = 0xad31_2026;
const DEFAULT_STEPS: u64 = 140;

/// In an expected body: a time tollgate sets to its clock at the call.
const NOW: &str = "<now>";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[derive(Clone, Copy, Debug)]
enum Auth {
    Key,
    /// `bearer` in lower case: the scheme is case-insensitive.
    KeyLowerScheme,
    Missing,
    Wrong,
    /// The right key under another scheme (the older proxy sliced 7 characters off any).
    Basic,
}

/// One admin call as sent.
#[derive(Debug)]
struct Call {
    method: Method,
    /// Already percent-encoded.
    path: String,
    query: Option<String>,
    body: Option<String>,
    /// `application/json` unless set.
    content_type: Option<&'static str>,
    auth: Auth,
}

impl Call {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Call {
            method,
            path: path.into(),
            query: None,
            body: None,
            content_type: None,
            auth: Auth::Key,
        }
    }
    fn json(mut self, body: &Value) -> Self {
        self.body = Some(body.to_string());
        self
    }
    fn raw(mut self, body: &str) -> Self {
        self.body = Some(body.to_string());
        self
    }
    fn labelled(mut self, content_type: &'static str) -> Self {
        self.content_type = Some(content_type);
        self
    }
    fn query(mut self, query: String) -> Self {
        self.query = Some(query);
        self
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    allow: Option<String>,
    persisted: Option<String>,
    /// When the call was sent and when its answer was read (epoch ms).
    sent: u64,
    answered: u64,
}

/// What the model expects of a call.
#[derive(Debug)]
enum Expect {
    /// 200 with this body (`NOW` for times set at the call).
    Ok(Value),
    /// An error: status, `error.type`, `error.field`.
    Err(u16, &'static str, Option<String>),
}

fn err(status: u16, kind: &'static str, field: Option<&str>) -> Expect {
    Expect::Err(status, kind, field.map(str::to_string))
}

fn bad(field: impl Into<String>) -> Expect {
    Expect::Err(400, "invalid_request", Some(field.into()))
}

/// A path segment percent-encoded (every byte but the unreserved ones).
fn enc(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `actual` is `expected`, where `NOW` stands for an integer within `[from, to]`.
fn matches(expected: &Value, actual: &Value, from: u64, to: u64) -> bool {
    match (expected, actual) {
        (Value::String(s), _) if s == NOW => {
            actual.as_u64().is_some_and(|t| (from..=to).contains(&t))
        }
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av, from, to)))
        }
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(e, a)| matches(e, a, from, to))
        }
        _ => expected == actual,
    }
}

/// A new user's fields before a patch: `POST`'s and `PUT`'s defaults.
fn new_user(token: &str, user_type: &str) -> Map<String, Value> {
    json!({"token": token, "ip": [], "type": user_type, "promptCount": 0, "tokenCounts": {},
           "tokenLimits": {}, "createdAt": NOW, "meta": {}})
    .as_object()
    .unwrap()
    .clone()
}

/// A family map as tollgate keeps it: zero entries left out.
fn families(map: &Value) -> Value {
    Value::Object(
        map.as_object()
            .unwrap()
            .iter()
            .filter(|(_, n)| n.as_f64() != Some(0.0))
            .map(|(k, v)| (k.clone(), js_number(v)))
            .collect(),
    )
}

/// A number as JavaScript writes it: an integral one without a fraction (`1e15` is
/// `1000000000000000`).
fn js_number(v: &Value) -> Value {
    match v.as_f64() {
        Some(f) if v.is_f64() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_991.0 => {
            json!(f as i64)
        }
        _ => v.clone(),
    }
}

/// The documented PUT semantics: present fields replace, `null` removes, maps replaced whole
/// (zero entries not kept; an empty `tokenRefresh` is left out), `maxIps` coerced.
fn apply(user: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (field, value) in patch {
        match (field.as_str(), value) {
            ("token", _) => {}
            (_, Value::Null) => {
                user.remove(field);
            }
            ("tokenCounts" | "tokenLimits", map) => {
                user.insert(field.clone(), families(map));
            }
            ("tokenRefresh", map) => {
                let map = families(map);
                if map.as_object().unwrap().is_empty() {
                    user.remove(field);
                } else {
                    user.insert(field.clone(), map);
                }
            }
            ("maxIps", Value::String(s)) => {
                user.insert(field.clone(), json!(s.trim().parse::<u64>().unwrap()));
            }
            _ => {
                user.insert(field.clone(), value.clone());
            }
        }
    }
}

/// What `DELETE` without `hard` does: disabled now, the reason replaced (or removed), and
/// `meta.refreshable = false`.
fn disable(user: &mut Map<String, Value>, reason: Option<&str>) {
    user.insert("disabledAt".into(), json!(NOW));
    match reason {
        Some(r) => user.insert("disabledReason".into(), json!(r)),
        None => user.remove("disabledReason"),
    };
    let meta = user.entry("meta").or_insert_with(|| json!({}));
    meta.as_object_mut()
        .unwrap()
        .insert("refreshable".into(), json!(false));
}

const NICKNAMES: &[&str] = &[
    "bob",
    "ñandú",
    "日本語のユーザー",
    "a b\u{a0}c",
    "",
    "😀 emoji",
    "Ωmega \"quoted\" \\ back",
];
const FAMILIES: &[&str] = &["turbo", "gpt4", "claude", "gpt4-32k", "aws-claude-opus"];
const IPS: &[&str] = &[
    "1.2.3.4",
    "::ffff:5.6.7.8",
    "2001:DB8::1",
    "risu123-1.2.3.4",
    "127.0.0.1",
    "::ffff:127.0.0.1",
    "::FFFF:1.2.3.4",
    " 1.2.3.4",
];

/// Whether an `ip` list already holds the test's own address (an IPv4-mapped spelling is
/// the same client).
fn holds_loopback(ips: &[Value]) -> bool {
    ips.iter().any(|ip| {
        ip.as_str()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.to_canonical() == std::net::IpAddr::from([127, 0, 0, 1]))
    })
}
/// Fields a patch may touch (`token` aside).
const PATCH_FIELDS: &[&str] = &[
    "ip",
    "nickname",
    "type",
    "promptCount",
    "tokenCount",
    "tokenCounts",
    "tokenLimits",
    "tokenRefresh",
    "createdAt",
    "lastUsedAt",
    "disabledAt",
    "disabledReason",
    "expiresAt",
    "maxIps",
    "adminNote",
    "meta",
];
const OPTIONAL: &[&str] = &[
    "nickname",
    "tokenCount",
    "tokenRefresh",
    "lastUsedAt",
    "disabledAt",
    "disabledReason",
    "expiresAt",
    "maxIps",
    "adminNote",
    "meta",
];
const SORTS: &[&str] = &[
    "token",
    "nickname",
    "type",
    "promptCount",
    "createdAt",
    "lastUsedAt",
    "disabledAt",
    "expiresAt",
    "maxIps",
    "ip",
    "sumTokens",
];

fn family_map(rng: &mut Rng) -> Value {
    let values = [
        json!(0),
        json!(1),
        json!(1000),
        json!(2.5),
        json!(1e15),
        json!(0.30000000000000004),
        json!(1e300),
        json!(5e-324),
        json!(1_152_921_504_606_846_976.0),
    ];
    let mut map = Map::new();
    for _ in 0..rng.below(4) {
        let family = FAMILIES[rng.below(FAMILIES.len())];
        map.insert(family.into(), values[rng.below(values.len())].clone());
    }
    Value::Object(map)
}

fn time(rng: &mut Rng) -> Value {
    match rng.below(10) {
        0 => json!(0),
        1 => json!(9_007_199_254_740_991u64),
        // Past and future, so temporary users are both expired and not.
        _ => json!(1_600_000_000_000u64 + rng.next() % 200_000_000_000),
    }
}

/// A valid value of `field` (`null` only for optional ones).
fn valid_value(rng: &mut Rng, field: &str) -> Value {
    if OPTIONAL.contains(&field) && rng.chance(20) {
        return Value::Null;
    }
    match field {
        "ip" => {
            let mut ips: Vec<String> = IPS
                .iter()
                .filter(|_| rng.chance(30))
                .map(|ip| ip.to_string())
                .collect();
            if rng.chance(5) {
                ips.push("x".repeat(256));
            }
            json!(ips)
        }
        "nickname" if rng.chance(10) => json!("é😀日".repeat(26) + "ab"),
        "nickname" => json!(NICKNAMES[rng.below(NICKNAMES.len())]),
        "type" => json!(["normal", "special", "temporary"][rng.below(3)]),
        "promptCount" => match rng.below(5) {
            0 => json!(9_007_199_254_740_991u64),
            _ => json!(rng.below(1000)),
        },
        "tokenCount" => [
            json!(0),
            json!(17),
            json!({"a": [1, {"b": null}]}),
            json!("x"),
            json!(u64::MAX),
            json!(-5),
            json!(1.5),
            json!([]),
        ][rng.below(8)]
        .clone(),
        "tokenCounts" | "tokenLimits" | "tokenRefresh" => family_map(rng),
        "createdAt" | "lastUsedAt" | "disabledAt" | "expiresAt" => time(rng),
        "adminNote" if rng.chance(2) => json!("ü".repeat(1 << 19)),
        "disabledReason" | "adminNote" => {
            json!(["spam", "", "abuse — ñ 😀", "a\nmultiline\tnote"][rng.below(4)])
        }
        "maxIps" => match rng.below(4) {
            0 => json!(format!("{}", rng.below(4))),
            1 => json!(4_294_967_295u64),
            _ => json!(rng.below(4)),
        },
        "meta" if rng.chance(5) => {
            let mut deep = json!({ "k".repeat(768): "at the limits" });
            for _ in 0..15 {
                deep = json!({ "k": deep });
            }
            deep
        }
        "meta" => [
            json!({}),
            json!({"refreshable": true}),
            json!({"k": {"nested": [1, 2, {"x": "y"}]}, "refreshable": false}),
            json!({"n": null, "arr": [], "obj": {}, "big": u64::MAX, "neg": -1.5}),
        ][rng.below(4)]
        .clone(),
        _ => unreachable!("{field}"),
    }
}

/// An invalid `(field, value, field named in the 400)`.
fn invalid_value(rng: &mut Rng) -> (&'static str, Value, String) {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("maxIps", json!("many"), "maxIps"),
        ("maxIps", json!(4_294_967_296u64), "maxIps"),
        ("maxIps", json!(-1), "maxIps"),
        ("maxIps", json!(""), "maxIps"),
        ("nickname", json!("x".repeat(81)), "nickname"),
        ("nickname", json!("😀".repeat(81)), "nickname"),
        ("nickname", json!("a\u{1}b"), "nickname"),
        ("nickname", json!(5), "nickname"),
        ("promptCount", json!(-1), "promptCount"),
        ("promptCount", json!(1.5), "promptCount"),
        ("promptCount", json!("3"), "promptCount"),
        ("expiresAt", json!(9_007_199_254_740_992u64), "expiresAt"),
        ("lastUsedAt", json!(-5), "lastUsedAt"),
        ("type", json!("admin"), "type"),
        ("type", json!(null), "type"),
        ("ip", json!(null), "ip"),
        ("ip", json!("1.2.3.4"), "ip"),
        ("ip", json!([""]), "ip[0]"),
        ("ip", json!(["1.1.1.1", 7]), "ip[1]"),
        ("tokenCounts", json!(null), "tokenCounts"),
        ("tokenLimits", json!({"gpt.4": 1}), "tokenLimits.gpt.4"),
        ("tokenLimits", json!({"gpt4": -1}), "tokenLimits.gpt4"),
        ("tokenRefresh", json!({"gpt4": "1"}), "tokenRefresh.gpt4"),
        ("meta", json!({"a$": 1}), "meta.a$"),
        ("meta", json!([1]), "meta"),
        ("createdAt", json!("yesterday"), "createdAt"),
        ("createdAt", json!(null), "createdAt"),
        ("adminNote", json!(5), "adminNote"),
        ("disabledReason", json!(false), "disabledReason"),
        ("tokenCount", json!({"a/b": 1}), "tokenCount.a/b"),
        // Unknown fields, typos of real ones included.
        ("maxIPs", json!(3), "maxIPs"),
        ("nickName", json!("x"), "nickName"),
        ("password", json!("x"), "password"),
        ("nickname", json!("a\u{7f}b"), "nickname"),
        ("nickname", json!("a\u{85}b"), "nickname"),
        ("ip", json!(["x".repeat(257)]), "ip[0]"),
        ("maxIps", json!("3.5"), "maxIps"),
        ("createdAt", json!(1e300), "createdAt"),
        ("disabledAt", json!(1.5), "disabledAt"),
        ("tokenLimits", json!({"": 1}), "tokenLimits."),
    ];
    if rng.chance(5) {
        let mut deep = json!(1);
        for _ in 0..17 {
            deep = json!({ "k": deep });
        }
        return ("meta", deep, format!("meta{}", ".k".repeat(17)));
    }
    if rng.chance(5) {
        let key = "k".repeat(769);
        return ("meta", json!({ key.clone(): 1 }), format!("meta.{key}"));
    }
    if rng.chance(3) {
        // Over the 1 MiB bound on notes.
        return (
            "adminNote",
            json!("n".repeat((1 << 20) + 1)),
            "adminNote".into(),
        );
    }
    let (f, v, named) = cases[rng.below(cases.len())].clone();
    (f, v, named.to_string())
}

/// A random valid patch (no `token`).
fn valid_patch(rng: &mut Rng) -> Map<String, Value> {
    let mut patch = Map::new();
    let n = if rng.chance(15) {
        PATCH_FIELDS.len()
    } else {
        rng.below(4)
    };
    for _ in 0..n {
        let field = PATCH_FIELDS[rng.below(PATCH_FIELDS.len())];
        patch.insert(field.into(), valid_value(rng, field));
    }
    patch
}

/// Descending with missing values last, arrays by length, `sumTokens` the sum of
/// `tokenCounts` (as documented); `Less` means `a` comes first.
fn sort_cmp(field: &str, a: &Value, b: &Value) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let key = |u: &Value| -> Option<Value> {
        match field {
            "ip" => Some(json!(u["ip"].as_array().unwrap().len())),
            "sumTokens" => Some(json!(u["tokenCounts"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .sum::<f64>())),
            f => u.get(f).cloned(),
        }
    };
    let cmp = |x: &Value, y: &Value| -> Ordering {
        match (x, y) {
            (Value::String(x), Value::String(y)) => x.cmp(y),
            _ => x.as_f64().unwrap().total_cmp(&y.as_f64().unwrap()),
        }
    };
    match (key(a), key(b)) {
        (Some(x), Some(y)) => cmp(&y, &x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

struct Run {
    seed: u64,
    store: &'static str,
    rng: Rng,
    /// The admin and proxy listeners' base URLs.
    admin: String,
    proxy: String,
    /// Runs sharing one tollgate each keep to their own users: the tokens they make start
    /// with this, or are in `created`; other users in a list are not theirs to check.
    prefix: String,
    created: std::collections::BTreeSet<String>,
    /// Users with proxied requests since the process started: what requests change is
    /// written behind (every `flush_interval_seconds`), so a crash may lose the last of it.
    proxied: std::collections::BTreeSet<String>,
    users: BTreeMap<String, Map<String, Value>>,
    step: u64,
    /// The last calls, for the panic message.
    trail: Vec<String>,
    ops: BTreeMap<&'static str, u32>,
}

impl Run {
    fn new(seed: u64, store: &'static str, rng_seed: u64, tg: &Tollgate, prefix: &str) -> Self {
        Run {
            seed,
            store,
            rng: Rng::new(rng_seed),
            admin: tg.admin.clone(),
            proxy: tg.proxy.clone(),
            prefix: prefix.to_string(),
            created: Default::default(),
            proxied: Default::default(),
            users: BTreeMap::new(),
            step: 0,
            trail: Vec::new(),
            ops: BTreeMap::new(),
        }
    }

    /// Whether a user in a list is this run's.
    fn mine(&self, token: &str) -> bool {
        token.starts_with(&self.prefix) || self.created.contains(token)
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "admin API model, seed {} ({} store), step {}: {what}\nlast calls:\n{}",
            self.seed,
            self.store,
            self.step,
            self.trail.join("\n")
        );
    }

    fn send(&mut self, call: &Call) -> Reply {
        let mut url = format!("{}{}", self.admin, call.path);
        if let Some(q) = &call.query {
            url = format!("{url}?{q}");
        }
        let mut request = client().request(call.method.clone(), &url);
        request = match call.auth {
            Auth::Key => request.bearer_auth(ADMIN_KEY),
            Auth::KeyLowerScheme => request.header("authorization", format!("bearer {ADMIN_KEY}")),
            Auth::Missing => request,
            Auth::Wrong => request.bearer_auth("not-the-admin-key"),
            Auth::Basic => request.header("authorization", format!("Basic {ADMIN_KEY}")),
        };
        if let Some(body) = &call.body {
            request = request
                .header(
                    "content-type",
                    call.content_type.unwrap_or("application/json"),
                )
                .body(body.clone());
        }
        let shown_body = call.body.as_deref().map(|b| {
            if b.len() > 300 {
                format!(
                    "{}… ({} bytes)",
                    b.chars().take(300).collect::<String>(),
                    b.len()
                )
            } else {
                b.to_string()
            }
        });
        self.trail.push(format!(
            "  {} {} {:?} {:?} {:?}",
            self.step, call.method, url, call.auth, shown_body
        ));
        if self.trail.len() > 12 {
            self.trail.remove(0);
        }
        let sent = now_ms();
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let allow = header("allow");
        let persisted = header("x-tollgate-persisted");
        let text = response.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            allow,
            persisted,
            sent,
            answered: now_ms(),
        }
    }

    /// Sends `call`, checks the reply against `expect`, and returns it.
    fn check(&mut self, call: Call, expect: Expect) -> Reply {
        let reply = self.send(&call);
        let writes = matches!(call.method, Method::POST | Method::PUT | Method::DELETE);
        match &expect {
            Expect::Ok(body) => {
                if reply.status != 200 || !matches(body, &reply.body, reply.sent, reply.answered) {
                    self.fail(format!(
                        "expected 200 {body}\n got {} {}",
                        reply.status, reply.body
                    ));
                }
                if writes && reply.persisted.as_deref() != Some("true") {
                    self.fail(format!("x-tollgate-persisted {:?}", reply.persisted));
                }
            }
            Expect::Err(status, kind, field) => {
                let error = &reply.body["error"];
                let ok = reply.status == *status
                    && error["type"] == *kind
                    && error["message"].is_string()
                    && error["field"].as_str() == field.as_deref()
                    && field
                        .as_ref()
                        .is_none_or(|f| error["message"].as_str().unwrap().starts_with(f.as_str()));
                if !ok {
                    self.fail(format!(
                        "expected {status} {kind} field {field:?}\n got {} {}",
                        reply.status, reply.body
                    ));
                }
            }
        }
        reply
    }

    /// Records a user the API returned (already checked against the model's expectation).
    fn adopt(&mut self, user: &Value) {
        let token = user["token"].as_str().unwrap().to_string();
        self.users.insert(token, user.as_object().unwrap().clone());
    }

    fn count(&mut self, op: &'static str) {
        *self.ops.entry(op).or_default() += 1;
    }

    /// A token of a known user (when there is one and `known_chance` says so), else a new one.
    fn token(&mut self, known_chance: u64) -> String {
        if self.rng.chance(known_chance) {
            if let Some(t) = self.rng.pick_key(&self.users) {
                return t;
            }
        }
        let suffix = ["", "ü", "日本", "a b", "+plus", "~", "%", "CaSe"][self.rng.below(8)];
        format!(
            "{}t{}-{}{suffix}",
            self.prefix,
            self.step,
            self.rng.below(1000)
        )
    }

    /// The path of one user, sometimes spelled as the older proxy's router also took it.
    fn user_path(&mut self, token: &str) -> String {
        match self.rng.below(10) {
            0 => format!("/Admin/Users/{}/", enc(token)),
            1 => format!("/ADMIN/users/{}", enc(token)),
            _ => format!("/admin/users/{}", enc(token)),
        }
    }

    fn users_path(&mut self) -> &'static str {
        [
            "/admin/users",
            "/admin/users",
            "/admin/users/",
            "/Admin/USERS",
        ][self.rng.below(4)]
    }

    // ------------------------------------------------------------------ operations

    fn create(&mut self) {
        self.count("create");
        let limits = family_map(&mut self.rng);
        let (body, user_type, limits): (Option<Value>, &str, Value) = match self.rng.below(7) {
            0 => (None, "normal", json!({})),
            1 => (Some(json!({})), "normal", json!({})),
            2 => (Some(json!({"type": "normal"})), "normal", json!({})),
            3 => (Some(json!({"type": "special"})), "special", json!({})),
            // Stripped for normal and special users, as in the older proxy.
            4 => (
                Some(json!({"type": "special", "tokenLimits": limits})),
                "special",
                json!({}),
            ),
            5 => (
                Some(json!({"type": "temporary", "expiresAt": 4_102_444_800_000u64})),
                "temporary",
                json!({}),
            ),
            _ => (
                Some(
                    json!({"type": "temporary", "expiresAt": 1_600_000_000_000u64, "tokenLimits": limits}),
                ),
                "temporary",
                families(&limits),
            ),
        };
        let mut call = Call::new(Method::POST, self.users_path());
        if let Some(body) = &body {
            call = call.json(body);
        }
        let reply = self.send(&call);
        let token = reply.body["token"].as_str().map(str::to_string);
        let Some(token) = token.filter(|_| reply.status == 200) else {
            self.fail(format!("create: {} {}", reply.status, reply.body));
        };
        let uuid_v4 = token.len() == 36
            && token.as_bytes()[14] == b'4'
            && b"89ab".contains(&token.as_bytes()[19])
            && token
                .chars()
                .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        if !uuid_v4 || self.users.contains_key(&token) || reply.body.as_object().unwrap().len() != 1
        {
            self.fail(format!("create answered {}", reply.body));
        }
        self.created.insert(token.clone());
        let mut user = new_user(&token, user_type);
        user.insert("tokenLimits".into(), limits);
        if let Some(at) = body.as_ref().and_then(|b| b.get("expiresAt")) {
            user.insert("expiresAt".into(), at.clone());
        }
        let (from, to) = (reply.sent, reply.answered);
        let got = self.send(&Call::new(
            Method::GET,
            format!("/admin/users/{}", enc(&token)),
        ));
        if got.status != 200 || !matches(&Value::Object(user.clone()), &got.body, from, to) {
            self.fail(format!(
                "created user: expected {}\n got {} {}",
                Value::Object(user),
                got.status,
                got.body
            ));
        }
        self.adopt(&got.body);
    }

    fn create_invalid(&mut self) {
        self.count("create_invalid");
        let cases: Vec<(Value, &str)> = vec![
            (json!({"type": "temporary"}), "expiresAt"),
            (json!({"type": "normal", "expiresAt": 1}), "expiresAt"),
            (json!({"expiresAt": 1}), "expiresAt"),
            (json!({"type": "temporary", "expiresAt": -1}), "expiresAt"),
            (json!({"type": "temporary", "expiresAt": 1.5}), "expiresAt"),
            (json!({"nickname": "x"}), "nickname"),
            (json!({"type": "special", "maxIps": 2}), "maxIps"),
            (json!({"type": "admin"}), "type"),
            (json!({"type": 5}), "type"),
            (
                json!({"type": "temporary", "expiresAt": 1, "tokenLimits": {"a.b": 1}}),
                "tokenLimits.a.b",
            ),
            (
                json!({"type": "temporary", "expiresAt": 1, "tokenLimits": {"gpt4": "x"}}),
                "tokenLimits.gpt4",
            ),
        ];
        let (body, field) = cases[self.rng.below(cases.len())].clone();
        let call = Call::new(Method::POST, self.users_path()).json(&body);
        self.check(call, bad(field));
    }

    fn get_one(&mut self) {
        self.count("get");
        let mut token = self.token(80);
        if self.rng.chance(10) {
            // Tokens are case-sensitive (only the path's literal part is not).
            token = token.to_uppercase();
        }
        let path = self.user_path(&token);
        let head = self.rng.chance(10);
        let expect = match self.users.get(&token) {
            Some(user) => Expect::Ok(Value::Object(user.clone())),
            None => err(404, "not_found", None),
        };
        if head {
            let reply = self.send(&Call::new(Method::HEAD, path));
            let want = if matches!(expect, Expect::Ok(_)) {
                200
            } else {
                404
            };
            if reply.status != want || !reply.body.is_null() {
                self.fail(format!("HEAD: {} {}", reply.status, reply.body));
            }
            return;
        }
        self.check(Call::new(Method::GET, path), expect);
    }

    /// The list with a random sort: the model's users, ordered as documented.
    fn list(&mut self) {
        self.count("list");
        let sort = match self.rng.below(7) {
            0 => None,
            1 => Some([String::new(), ",".into(), " , ".into()][self.rng.below(3)].clone()),
            _ => {
                let n = 1 + self.rng.below(3);
                let fields: Vec<&str> =
                    (0..n).map(|_| SORTS[self.rng.below(SORTS.len())]).collect();
                let comma = [",", ",", " , "][self.rng.below(3)];
                Some(fields.join(comma))
            }
        };
        let mut call = Call::new(Method::GET, self.users_path());
        if let Some(sort) = &sort {
            call = call.query(format!("sort={}", enc(sort)));
        }
        let reply = self.send(&call);
        self.check_list(&reply);
        // Fields are trimmed; no field at all is the default.
        let fields: Vec<&str> = sort
            .as_deref()
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|f| !f.is_empty())
                    .collect()
            })
            .filter(|f: &Vec<&str>| !f.is_empty())
            .unwrap_or_else(|| vec!["promptCount", "lastUsedAt"]);
        let users = reply.body["users"].as_array().unwrap();
        for pair in users.windows(2) {
            let order = fields
                .iter()
                .map(|f| sort_cmp(f, &pair[0], &pair[1]))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal);
            if order.is_gt() {
                self.fail(format!("sort {sort:?}: {} before {}", pair[0], pair[1]));
            }
        }
    }

    fn list_invalid(&mut self) {
        self.count("list_invalid");
        let (query, field) = [
            ("sort=password", "sort"),
            ("sort=createdAt,secret", "sort"),
            ("sort=createdAt&sort=token", "sort"),
            ("page=2", "page"),
            ("sort=token&perPage=5", "perPage"),
        ][self.rng.below(5)];
        let call = Call::new(Method::GET, "/admin/users").query(query.into());
        self.check(call, bad(field));
    }

    /// A list reply must hold exactly the model's users.
    fn check_list(&mut self, reply: &Reply) {
        let Some(users) = reply.body["users"]
            .as_array()
            .filter(|_| reply.status == 200)
        else {
            self.fail(format!("list: {} {}", reply.status, reply.body));
        };
        let all: BTreeMap<String, Value> = users
            .iter()
            .map(|u| (u["token"].as_str().unwrap().to_string(), u.clone()))
            .collect();
        if all.len() != users.len() || reply.body["count"] != json!(users.len()) {
            self.fail(format!(
                "a token listed twice, or a wrong count: {}",
                reply.body
            ));
        }
        let got: BTreeMap<String, Value> = all.into_iter().filter(|(t, _)| self.mine(t)).collect();
        let want: BTreeMap<String, Value> = self
            .users
            .iter()
            .map(|(t, u)| (t.clone(), Value::Object(u.clone())))
            .collect();
        if got != want {
            let missing: Vec<&String> = want.keys().filter(|t| !got.contains_key(*t)).collect();
            let extra: Vec<&String> = got.keys().filter(|t| !want.contains_key(*t)).collect();
            let differ: Vec<String> = want
                .iter()
                .filter_map(|(t, u)| {
                    let g = got.get(t)?;
                    (g != u).then(|| format!("{t}: model {u}\n  tollgate {g}"))
                })
                .collect();
            self.fail(format!(
                "list differs from the model (count {}): missing {missing:?}, extra {extra:?}, \
                 differing:\n{}",
                reply.body["count"],
                differ.join("\n")
            ));
        }
    }

    /// The documented purge (at start, then every minute): temporary users unusable (expired
    /// or disabled) for over `POW_TOKEN_PURGE_HOURS` (48 h) are removed.
    fn purge(&mut self) {
        let now = now_ms();
        self.users.retain(|_, u| {
            let time = |f: &str| u.get(f).and_then(Value::as_u64);
            let since = match (time("expiresAt"), time("disabledAt")) {
                (Some(e), Some(d)) => Some(e.min(d)),
                (e, d) => e.or(d),
            };
            u["type"] != "temporary" || since.is_none_or(|s| s + 48 * 3_600_000 >= now)
        });
    }

    /// After a restart: the purge runs as the process starts; the list must reach the
    /// model's purged users.
    fn restart(&mut self, tg: Tollgate) -> Tollgate {
        self.full_check();
        let tg = tg.restart();
        self.trail.push("  -- restarted --".into());
        self.proxied.clear();
        self.purge();
        let want = self.users.len();
        wait_until(Duration::from_secs(5), || {
            tg.admin_call(Method::GET, "/admin/users", None).1["count"] == json!(want)
        });
        self.full_check();
        tg
    }

    /// A crash (SIGKILL) and a start: every write the API answered was durable, so every
    /// user must be as the model has it, except for what requests changed (`promptCount`,
    /// `lastUsedAt`, `ip`: written behind), which is taken from the store once it is no more
    /// than the model's.
    fn crash(&mut self, mut tg: Tollgate) -> Tollgate {
        tg.kill();
        self.trail.push("  -- killed and started --".into());
        let tg = tg.restart();
        self.purge();
        let want = self.users.len();
        let mut list = Value::Null;
        wait_until(Duration::from_secs(5), || {
            list = tg.admin_call(Method::GET, "/admin/users", None).1;
            list["count"] == json!(want)
        });
        for token in std::mem::take(&mut self.proxied) {
            let stored = list["users"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|u| u["token"] == token.as_str());
            let (Some(stored), Some(user)) = (stored, self.users.get_mut(&token)) else {
                continue;
            };
            if stored["promptCount"].as_u64() > user["promptCount"].as_u64() {
                let msg = format!("{token}: more requests counted than answered: {stored}");
                self.fail(msg);
            }
            for field in ["promptCount", "lastUsedAt", "ip"] {
                match stored.get(field) {
                    Some(v) => user.insert(field.into(), v.clone()),
                    None => user.remove(field),
                };
            }
        }
        self.full_check();
        tg
    }

    fn full_check(&mut self) {
        self.count("full_check");
        let reply = self.send(&Call::new(Method::GET, "/admin/users"));
        self.check_list(&reply);
    }

    /// `PUT /admin/users/{token}`: a partial (or full) upsert of a known or new user.
    fn upsert(&mut self) {
        self.count("upsert");
        let token = self.token(70);
        let mut patch = valid_patch(&mut self.rng);
        if self.rng.chance(15) {
            // The same token in the body is fine.
            patch.insert("token".into(), json!(token));
        }
        let mut user = self
            .users
            .get(&token)
            .cloned()
            .unwrap_or_else(|| new_user(&token, "normal"));
        apply(&mut user, &patch);
        let path = self.user_path(&token);
        let call = Call::new(Method::PUT, path).json(&Value::Object(patch));
        let reply = self.check(call, Expect::Ok(Value::Object(user)));
        self.adopt(&reply.body);
    }

    fn upsert_invalid(&mut self) {
        self.count("upsert_invalid");
        let token = self.token(60);
        let mut patch = valid_patch(&mut self.rng);
        let (call, expect) = match self.rng.below(8) {
            0 => {
                patch.insert("token".into(), json!(format!("{token}-other")));
                let path = self.user_path(&token);
                (
                    Call::new(Method::PUT, path).json(&Value::Object(patch)),
                    bad("token"),
                )
            }
            1 => {
                let bad_token = ["a.b", "a$b", "a#b", "a[b", " lead", "trail ", "a\u{1}b"]
                    [self.rng.below(7)]
                .to_string();
                let bad_token = if self.rng.chance(20) {
                    "x".repeat(769)
                } else {
                    bad_token
                };
                (
                    Call::new(Method::PUT, format!("/admin/users/{}", enc(&bad_token)))
                        .json(&Value::Object(patch)),
                    bad("token"),
                )
            }
            2 => {
                let body = [
                    r#"{"nickname": "x""#,
                    r#"{"nickname": }"#,
                    "not json",
                    r#"{"nickname":"x"} {"b":2}"#,
                    r#"[]"#,
                    r#"["t", ["1.1.1.1"]]"#,
                    "null",
                ][self.rng.below(7)];
                let path = self.user_path(&token);
                (
                    Call::new(Method::PUT, path).raw(body),
                    err(400, "invalid_request", None),
                )
            }
            3 => {
                let path = self.user_path(&token);
                (
                    Call::new(Method::PUT, path).raw(r#"{"nickname": "a", "nickname": "b"}"#),
                    bad("nickname"),
                )
            }
            _ => {
                let (field, value, named) = invalid_value(&mut self.rng);
                patch.remove(field);
                patch.insert(field.into(), value);
                let path = self.user_path(&token);
                (
                    Call::new(Method::PUT, path).json(&Value::Object(patch)),
                    bad(named),
                )
            }
        };
        self.check(call, expect);
    }

    fn delete(&mut self) {
        self.count("delete");
        let token = self.token(85);
        let path = self.user_path(&token);
        let reasons = ["spam", "", "too many requests", "ñ 😀 & = + %"];
        let reason = self
            .rng
            .chance(60)
            .then(|| reasons[self.rng.below(reasons.len())]);
        let mut call = Call::new(Method::DELETE, path);
        if let Some(r) = reason {
            call = call.query(format!("disabledReason={}", enc(r)));
        }
        let Some(mut user) = self.users.get(&token).cloned() else {
            self.check(call, err(404, "not_found", None));
            return;
        };
        disable(&mut user, reason);
        let reply = self.check(call, Expect::Ok(Value::Object(user)));
        self.adopt(&reply.body);
    }

    fn hard_delete(&mut self) {
        self.count("hard_delete");
        let token = self.token(85);
        let path = self.user_path(&token);
        let value = ["true", "1"][self.rng.below(2)];
        let call = Call::new(Method::DELETE, path).query(format!("hard={value}"));
        if self.users.remove(&token).is_some() {
            self.check(call, Expect::Ok(json!({ "deleted": token })));
        } else {
            self.check(call, err(404, "not_found", None));
        }
    }

    fn delete_invalid(&mut self) {
        self.count("delete_invalid");
        let token = self.token(80);
        let path = self.user_path(&token);
        let (query, field) = [
            ("reason=spam", "reason"),
            ("disabledReason=a&disabledReason=b", "disabledReason"),
            ("hard=true&disabledReason=x", "disabledReason"),
            ("hard=yes", "hard"),
            ("hard=false&hard=true", "hard"),
        ][self.rng.below(5)];
        self.check(
            Call::new(Method::DELETE, path).query(query.into()),
            bad(field),
        );
    }

    fn reenable(&mut self) {
        self.count("reenable");
        let Some(token) = self.rng.pick_key(&self.users) else {
            return;
        };
        let patch = json!({"disabledAt": null, "disabledReason": null});
        let mut user = self.users[&token].clone();
        apply(&mut user, patch.as_object().unwrap());
        let path = self.user_path(&token);
        let reply = self.check(
            Call::new(Method::PUT, path).json(&patch),
            Expect::Ok(Value::Object(user)),
        );
        self.adopt(&reply.body);
    }

    /// `PUT /admin/users`: entries applied in order (duplicates too), each answered as it was
    /// right after its own upsert; or, with one bad entry, nothing applied.
    fn import(&mut self) {
        self.count("import");
        let n = 1 + self.rng.below(6);
        let mut entries = Vec::new();
        let mut tokens: Vec<String> = Vec::new();
        for _ in 0..n {
            let token = if !tokens.is_empty() && self.rng.chance(25) {
                tokens[self.rng.below(tokens.len())].clone()
            } else {
                self.token(50)
            };
            tokens.push(token.clone());
            let mut entry = valid_patch(&mut self.rng);
            entry.insert("token".into(), json!(token));
            entries.push(entry);
        }
        let bad_at = self.rng.chance(30).then(|| self.rng.below(n));
        let mut expect_field = None;
        if let Some(i) = bad_at {
            let entry = &mut entries[i];
            match self.rng.below(3) {
                0 => {
                    entry.remove("token");
                    expect_field = Some(format!("users[{i}].token"));
                }
                1 => {
                    entry.insert("token".into(), json!("bad.token"));
                    expect_field = Some(format!("users[{i}].token"));
                }
                _ => {
                    let (field, value, named) = invalid_value(&mut self.rng);
                    entry.remove(field);
                    entry.insert(field.into(), value);
                    expect_field = Some(format!("users[{i}].{named}"));
                }
            }
        }
        let mut body = json!({ "users": entries });
        if self.rng.chance(20) {
            body["count"] = json!(n);
        }
        let call = Call::new(Method::PUT, self.users_path()).json(&body);
        if let Some(field) = expect_field {
            self.check(call, bad(field));
            return;
        }
        let mut model = self.users.clone();
        let mut upserted = Vec::new();
        for entry in &entries {
            let token = entry["token"].as_str().unwrap().to_string();
            let user = model
                .entry(token.clone())
                .or_insert_with(|| new_user(&token, "normal"));
            apply(user, entry);
            upserted.push(Value::Object(user.clone()));
        }
        let reply = self.check(
            call,
            Expect::Ok(json!({"upserted_users": upserted, "count": n})),
        );
        for user in reply.body["upserted_users"].as_array().unwrap().clone() {
            self.adopt(&user);
        }
    }

    fn import_invalid_shape(&mut self) {
        self.count("import_invalid");
        let (body, field): (&str, Option<&str>) = [
            ("{}", Some("users")),
            (r#"{"users": {}}"#, Some("users")),
            (r#"{"users": null}"#, Some("users")),
            (r#"{"users": [["t"]]}"#, Some("users[0]")),
            (r#"{"users": [], "extra": 1}"#, Some("extra")),
            (
                r#"{"users": [{"token": "a", "token": "b"}]}"#,
                Some("users[0].token"),
            ),
            (r#"{"users": [{"token": 5}]}"#, Some("users[0].token")),
            (
                r#"{"users": [{"token": "ok"}], "users": []}"#,
                Some("users"),
            ),
            ("[]", None),
            (r#"{"users": ["#, None),
            ("", None),
        ][self.rng.below(11)];
        let call = Call::new(Method::PUT, self.users_path()).raw(body);
        self.check(call, err(400, "invalid_request", field));
    }

    /// An export sent back as it is changes nothing.
    fn export_reimport(&mut self) {
        self.count("export_reimport");
        let export = self.send(&Call::new(Method::GET, "/admin/users"));
        self.check_list(&export);
        let n = export.body["users"].as_array().unwrap().len();
        let expected = json!({"upserted_users": export.body["users"], "count": n});
        let call = Call::new(Method::PUT, "/admin/users").json(&export.body);
        self.check(call, Expect::Ok(expected));
    }

    /// Any call without the right key is a 401 and changes nothing.
    fn unauthorized(&mut self) {
        self.count("unauthorized");
        let auth = [Auth::Missing, Auth::Wrong, Auth::Basic][self.rng.below(3)];
        let token = self.token(80);
        let mut call = match self.rng.below(5) {
            0 => Call::new(Method::GET, "/admin/users"),
            1 => Call::new(Method::POST, "/admin/users").json(&json!({})),
            2 => Call::new(Method::PUT, self.user_path(&token)).json(&json!({"nickname": "x"})),
            3 => Call::new(Method::DELETE, self.user_path(&token)).query("hard=true".into()),
            _ => Call::new(Method::GET, self.user_path(&token)),
        };
        call.auth = auth;
        let reply = self.check(call, err(401, "unauthorized", None));
        let message = match auth {
            Auth::Wrong => "the admin key is not valid",
            _ => "send the admin key as 'Authorization: Bearer <ADMIN_KEY>'",
        };
        if reply.body["error"]["message"] != message {
            self.fail(format!("401 message {}, expected {message:?}", reply.body));
        }
    }

    /// The scheme is case-insensitive: `bearer` works as `Bearer`.
    fn lower_scheme(&mut self) {
        self.count("lower_scheme");
        let token = self.token(90);
        let expect = match self.users.get(&token) {
            Some(u) => Expect::Ok(Value::Object(u.clone())),
            None => err(404, "not_found", None),
        };
        let mut call = Call::new(Method::GET, self.user_path(&token));
        call.auth = Auth::KeyLowerScheme;
        self.check(call, expect);
    }

    fn wrong_method(&mut self) {
        self.count("wrong_method");
        let token = self.token(80);
        let (call, allow) = match self.rng.below(4) {
            0 => (
                Call::new(Method::PATCH, self.user_path(&token)).json(&json!({})),
                "GET, HEAD, PUT, DELETE",
            ),
            1 => (
                Call::new(Method::POST, self.user_path(&token)).json(&json!({})),
                "GET, HEAD, PUT, DELETE",
            ),
            2 => (
                Call::new(Method::DELETE, self.users_path()),
                "GET, HEAD, POST, PUT",
            ),
            _ => (
                Call::new(Method::PATCH, self.users_path()),
                "GET, HEAD, POST, PUT",
            ),
        };
        let reply = self.check(call, err(405, "method_not_allowed", None));
        if reply.allow.as_deref() != Some(allow) {
            self.fail(format!("Allow {:?}, expected {allow}", reply.allow));
        }
    }

    fn no_such_endpoint(&mut self) {
        self.count("no_endpoint");
        let path =
            ["/admin/user", "/admin/users/a/b", "/admin/usersx", "/admin"][self.rng.below(4)];
        self.check(Call::new(Method::GET, path), err(404, "not_found", None));
    }

    /// The proxy listener honours the state: an enabled user's token passes, a disabled,
    /// expired, IP-capped or unknown one is refused. A pass counts a request and records the
    /// address; the model takes those from a re-read once checked.
    fn proxy(&mut self) {
        self.count("proxy");
        let token = self.token(90);
        let user = self.users.get(&token).cloned();
        let now = now_ms();
        let disabled =
            |u: &Map<String, Value>| match u.get("disabledReason").and_then(Value::as_str) {
                Some(r) if !r.is_empty() => format!("Forbidden: {r}"),
                _ => "Forbidden: User token disabled".to_string(),
            };
        let expected = match &user {
            None => 401,
            Some(u) if u.contains_key("disabledAt") => 403,
            Some(u)
                if u["type"] == "temporary"
                    && u.get("expiresAt")
                        .and_then(Value::as_u64)
                        .is_some_and(|at| at <= now + 1000) =>
            {
                // Within a second of expiring: too close to call; skip.
                if u["expiresAt"].as_u64().unwrap() + 1000 > now {
                    return;
                }
                403
            }
            Some(u) => {
                let ips = u["ip"].as_array().unwrap();
                let limit = u.get("maxIps").and_then(Value::as_u64).unwrap_or(0);
                let capped = u["type"] != "special"
                    && limit > 0
                    && ips.len() as u64 >= limit
                    && !holds_loopback(ips);
                if capped {
                    403
                } else {
                    200
                }
            }
        };
        let url = format!("{}/model?key={}", self.proxy, enc(&token));
        let sent = now_ms();
        let response = client().get(url).send().unwrap();
        let status = response.status().as_u16();
        let message = response.json::<Value>().unwrap_or_default()["error"]["message"].clone();
        self.trail
            .push(format!("  {} proxy GET for {token:?}: {status}", self.step));
        if status != expected {
            self.fail(format!("proxy: {status} for {user:?}, expected {expected}"));
        }
        // The 403's message says why (checked where only one reason applies).
        let why = user.as_ref().filter(|_| status == 403).and_then(|u| {
            let expired = u["type"] == "temporary" && u.get("expiresAt").is_some();
            match (u.contains_key("disabledAt"), expired) {
                (true, false) => Some(disabled(u)),
                (false, true) => Some("Forbidden: Temporary token expired.".to_string()),
                (false, false) => {
                    Some("Forbidden: no more IP addresses allowed for this user token".to_string())
                }
                (true, true) => None,
            }
        });
        if let Some(why) = why.filter(|w| message != json!(w)) {
            self.fail(format!("proxy 403 message {message}, expected {why:?}"));
        }
        let Some(mut before) = user else {
            return;
        };
        self.proxied.insert(token.clone());
        // A refusal by the gatekeeper changes nothing. A pass sets `lastUsedAt` (never
        // backwards: a later one an admin set stays), counts the request (up to 2^53 - 1, the
        // largest count the API takes) and records the address; both land as the request
        // ends, `lastUsedAt` last, so it is the sign that they did.
        let path = format!("/admin/users/{}", enc(&token));
        let later = before
            .get("lastUsedAt")
            .and_then(Value::as_u64)
            .filter(|&t| t > sent + 60_000);
        let mut after = Value::Null;
        let settled = wait_until(Duration::from_secs(5), || {
            after = self.send(&Call::new(Method::GET, path.clone())).body;
            status != 200 || later.is_some() || after["lastUsedAt"].as_u64() >= Some(sent)
        });
        let answered = now_ms();
        if !settled {
            self.fail(format!("a pass did not set lastUsedAt: {after}"));
        }
        if status == 200 {
            let count = before["promptCount"].as_u64().unwrap();
            before.insert(
                "promptCount".into(),
                json!((count + 1).min(9_007_199_254_740_991)),
            );
            let ips = before["ip"].as_array_mut().unwrap();
            if !holds_loopback(ips) {
                ips.push(json!("127.0.0.1"));
            }
            before.insert("lastUsedAt".into(), later.map_or(json!(NOW), |t| json!(t)));
        }
        if !matches(&Value::Object(before.clone()), &after, sent, answered) {
            self.fail(format!(
                "after a proxied request ({status}): expected {}\n got {after}",
                Value::Object(before)
            ));
        }
        self.adopt(&after);
    }

    /// The same edits spelled as the older proxy's clients may send them: form bodies, JSON
    /// labelled as a form or as text, integral floats for times, `maxIps` in a string, an
    /// empty body, a repeated key inside `meta` (the last wins), `hard=false`, a raw `+` in
    /// the path, `+` for a space in the query.
    fn spellings(&mut self) {
        self.count("spellings");
        let token = self.token(70);
        let path = self.user_path(&token);
        let base = self
            .users
            .get(&token)
            .cloned()
            .unwrap_or_else(|| new_user(&token, "normal"));
        let put =
            |body: &str, patch: Value| (Call::new(Method::PUT, path.clone()).raw(body), patch);
        let (call, patch) = match self.rng.below(9) {
            0 => {
                let (call, patch) = put(
                    "nickname=b%C3%B6b+x&maxIps=+3+&adminNote=a%26b",
                    json!({"nickname": "böb x", "maxIps": 3, "adminNote": "a&b"}),
                );
                (call.labelled("application/x-www-form-urlencoded"), patch)
            }
            1 => {
                let (call, patch) = put(r#"{"type":"special"}"#, json!({"type": "special"}));
                (call.labelled("application/x-www-form-urlencoded"), patch)
            }
            2 => {
                let (call, patch) = put(r#"{"adminNote":"text"}"#, json!({"adminNote": "text"}));
                (call.labelled("text/plain"), patch)
            }
            3 => put(
                r#"{"expiresAt": 1.7e12, "lastUsedAt": 1700000000001.0, "promptCount": 1e2}"#,
                json!({"expiresAt": 1_700_000_000_000u64, "lastUsedAt": 1_700_000_000_001u64, "promptCount": 100}),
            ),
            4 => put(r#"{"maxIps": " 2 "}"#, json!({"maxIps": 2})),
            5 => put(" \n", json!({})),
            6 => put(
                r#"{"meta": {"k": 1, "k": 2, "refreshable": true}}"#,
                json!({"meta": {"k": 2, "refreshable": true}}),
            ),
            7 => {
                let Some(mut user) = self.users.get(&token).cloned() else {
                    return;
                };
                let value = ["false", "0"][self.rng.below(2)];
                disable(&mut user, Some("a b+c"));
                let call = Call::new(Method::DELETE, path)
                    .query(format!("hard={value}&disabledReason=a+b%2Bc"));
                let reply = self.check(call, Expect::Ok(Value::Object(user)));
                self.adopt(&reply.body);
                return;
            }
            _ => {
                // A `+` in a path segment is a plus.
                let token = format!("{}p{}+q", self.prefix, self.step);
                let mut user = new_user(&token, "normal");
                apply(&mut user, json!({"nickname": "plus"}).as_object().unwrap());
                let call = Call::new(Method::PUT, format!("/admin/users/{token}"))
                    .json(&json!({"nickname": "plus"}));
                let reply = self.check(call, Expect::Ok(Value::Object(user)));
                self.adopt(&reply.body);
                return;
            }
        };
        let mut user = base;
        apply(&mut user, patch.as_object().unwrap());
        let reply = self.check(call, Expect::Ok(Value::Object(user)));
        self.adopt(&reply.body);
    }

    /// Form bodies carry strings only: a number field, or a field given twice, is a 400.
    fn spellings_invalid(&mut self) {
        self.count("spellings_invalid");
        if self.rng.chance(30) {
            let call = Call::new(Method::POST, self.users_path())
                .raw("type=temporary&expiresAt=4102444800000")
                .labelled("application/x-www-form-urlencoded");
            self.check(call, bad("expiresAt"));
            return;
        }
        let token = self.token(70);
        let path = self.user_path(&token);
        let (body, field) = [
            ("promptCount=3", "promptCount"),
            ("nickname=a&nickname=b", "nickname"),
            ("maxIps=", "maxIps"),
            ("maxIps=many", "maxIps"),
            ("nick=x", "nick"),
        ][self.rng.below(5)];
        let call = Call::new(Method::PUT, path)
            .raw(body)
            .labelled("application/x-www-form-urlencoded");
        self.check(call, bad(field));
    }

    fn step_once(&mut self) {
        self.step += 1;
        match self.rng.below(100) {
            0..=9 => self.create(),
            10..=12 => self.create_invalid(),
            13..=20 => self.get_one(),
            21..=25 => self.list(),
            26..=27 => self.list_invalid(),
            28..=43 => self.upsert(),
            44..=51 => self.upsert_invalid(),
            52..=57 => self.delete(),
            58..=61 => self.hard_delete(),
            62..=63 => self.delete_invalid(),
            64..=67 => self.reenable(),
            68..=75 => self.import(),
            76..=78 => self.import_invalid_shape(),
            // Sent back, another run's export would undo that run's changes since.
            79 if self.prefix.is_empty() => self.export_reimport(),
            79 => self.list(),
            80..=83 => self.unauthorized(),
            84 => self.lower_scheme(),
            85..=86 => self.wrong_method(),
            87 => self.no_such_endpoint(),
            88..=90 => self.spellings(),
            91 => self.spellings_invalid(),
            _ => self.proxy(),
        }
        if self.step.is_multiple_of(10) {
            self.full_check();
        }
    }
}

/// Never locked out by the deliberate wrong keys; no rate limit in the way of the few proxied
/// requests.
fn builder(origin: &Origin) -> TollgateBuilder {
    TollgateBuilder::new(origin.addr)
        .admin_yaml("lockout_after_failures: 1000000")
        .yaml("rate_limit:\n  requests_per_minute: 0\n  auth_failures_per_minute: 0\n")
}

/// Steps one process runs at most: the purge runs as a process starts and then every
/// minute, and the model applies it only at a (re)start, so a process must live under a
/// minute (400 steps take a few seconds).
const STEPS_PER_PROCESS: u64 = 400;

fn sqlite_builder(origin: &Origin) -> TollgateBuilder {
    builder(origin).yaml(
        "store:\n  kind: sqlite\n  flush_interval_seconds: 1\n  sqlite:\n    path: data/users.db\n",
    )
}

fn report(run: &Run) {
    eprintln!(
        "admin API model, seed {}, {}: {} users at the end; {:?}",
        run.seed,
        run.store,
        run.users.len(),
        run.ops
    );
}

/// The memory store (its process lives at most [`STEPS_PER_PROCESS`]), then SQLite, restarted
/// half-way and every [`STEPS_PER_PROCESS`] steps: each restart must keep every user. Then
/// [`CONCURRENT_RUNS`] runs at once on one SQLite tollgate, each with its own users.
fn run_once(seed: u64, steps: u64) {
    let origin = Origin::start();
    let tg = builder(&origin).start();
    let mut run = Run::new(seed, "memory", seed, &tg, "");
    for _ in 0..steps.min(STEPS_PER_PROCESS) {
        run.step_once();
    }
    run.full_check();
    report(&run);
    drop(tg);

    let mut tg = sqlite_builder(&origin).start();
    let mut run = Run::new(seed, "sqlite", seed ^ (1 << 32), &tg, "");
    let mut since_start = 0;
    for step in 0..steps {
        if step == steps / 2 || since_start == STEPS_PER_PROCESS {
            tg = run.restart(tg);
            since_start = 0;
        } else if step == steps / 4 || step == 3 * steps / 4 {
            tg = run.crash(tg);
            since_start = 0;
        }
        run.step_once();
        since_start += 1;
    }
    run.full_check();
    report(&run);
    drop(tg);

    run_concurrently(seed, steps, &origin);
}

/// Runs sharing one SQLite tollgate at once; each checks its own users as it goes, and after
/// a restart the list must hold all of theirs.
const CONCURRENT_RUNS: u64 = 3;

fn run_concurrently(seed: u64, steps: u64, origin: &Origin) {
    let tg = sqlite_builder(origin).start();
    let steps = (steps / CONCURRENT_RUNS).min(STEPS_PER_PROCESS / CONCURRENT_RUNS);
    let runs: Vec<Run> = (0..CONCURRENT_RUNS)
        .map(|i| {
            let prefix = format!("r{i}-");
            Run::new(
                seed,
                "sqlite, runs at once",
                seed ^ ((2 + i) << 32),
                &tg,
                &prefix,
            )
        })
        .collect();
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let threads: Vec<_> = runs
            .into_iter()
            .map(|mut run| {
                scope.spawn(move || {
                    for _ in 0..steps {
                        run.step_once();
                    }
                    run.full_check();
                    run
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut all = Run::new(seed, "sqlite, after the runs at once", seed, &tg, "");
    for run in &runs {
        report(run);
        all.users.extend(run.users.clone());
    }
    drop(all.restart(tg));
}

#[test]
fn randomized_admin_api_against_a_model() {
    let steps = env_u64("TOLLGATE_SOAK_STEPS").unwrap_or(DEFAULT_STEPS);
    for_each_seed(DEFAULT_SEED, |seed| run_once(seed, steps));
}
