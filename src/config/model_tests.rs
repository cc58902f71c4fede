//! A model-based test of configuration loading: seeded random YAML documents and environments
//! (valid values, boundaries, the type's maximum and one past it, negatives, floats, huge
//! numbers, strings, null, lists and maps where scalars belong, unknown and misspelt keys,
//! duplicates, anchors and aliases, env values empty, padded, quoted, malformed or conflicting
//! with the file) are loaded, and a model of docs/configuration.md says what must happen: either
//! the documented values are applied (defaults for what is absent, the environment over the
//! file), or the load is refused with an error naming the file (or `environment`), one of the
//! keys that is wrong, and the problem in words. Nothing may panic, and secret values never
//! appear in an error. Random byte mutations of documents must be refused or accepted cleanly.
//!
//! `TOLLGATE_MODEL_SEED=N` replays one run; `TOLLGATE_MODEL_RUNS` (default 400) sizes the search.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use super::{Config, ConfigError, GatekeeperMode, StoreKind};

/// The soaks' seeded generator and knobs, shared rather than copied.
use crate::soak::{model_seeds, Rng};

const FILE: &str = "model.yaml";
const YEAR: u64 = 365 * 24 * 3600;
const ADMIN_SECRET: &str = "model-admin-secret-4711";
const PROXY_SECRET: &str = "model-proxy-secret-0815";

/// The integer types of the file format, by their largest value.
const U32: u128 = u32::MAX as u128;
const U64: u128 = u64::MAX as u128;

/// One documented integer key: its path, type maximum, default and accepted range.
pub(super) struct IntKey {
    pub(super) path: &'static str,
    max_of_type: u128,
    pub(super) default: u64,
    pub(super) lo: u64,
    pub(super) hi: u64,
}

const fn key(path: &'static str, max_of_type: u128, default: u64, lo: u64, hi: u64) -> IntKey {
    IntKey {
        path,
        max_of_type,
        default,
        lo,
        hi,
    }
}

/// docs/configuration.md's integer keys (`hi` is the documented maximum, else the type's).
pub(super) const INT_KEYS: &[IntKey] = &[
    key("pingora.threads", U64, 1, 1, 1024),
    key("pingora.grace_period_seconds", U64, 5, 0, YEAR),
    key("pingora.graceful_shutdown_timeout_seconds", U64, 5, 0, YEAR),
    key(
        "pingora.upstream_keepalive_pool_size",
        U64,
        128,
        0,
        u64::MAX,
    ),
    key("upstream.connect_timeout_ms", U64, 2000, 1, YEAR * 1000),
    key("upstream.read_timeout_ms", U64, 60_000, 1, YEAR * 1000),
    key("upstream.idle_timeout_ms", U64, 60_000, 1, YEAR * 1000),
    key("gatekeeper.max_ips_per_user", U32, 0, 0, u32::MAX as u64),
    key("gatekeeper.max_recorded_ips", U32, 1000, 0, u32::MAX as u64),
    key(
        "rate_limit.requests_per_minute",
        U32,
        60,
        0,
        u32::MAX as u64,
    ),
    key("rate_limit.max_inflight", U32, 0, 0, u32::MAX as u64),
    key(
        "rate_limit.auth_failures_per_minute",
        U32,
        30,
        0,
        u32::MAX as u64,
    ),
    key("rate_limit.window_seconds", U64, 60, 1, 3600),
    key("rate_limit.estimator_slots", U64, 131_072, 1024, 16_777_216),
    key("admin.max_body_bytes", U64, 67_108_864, 1, u64::MAX),
    key("admin.body_read_timeout_ms", U64, 10_000, 1, YEAR * 1000),
    key("admin.persist_timeout_ms", U64, 10_000, 1, YEAR * 1000),
    key("admin.lockout_after_failures", U32, 5, 1, u32::MAX as u64),
    key("admin.lockout_seconds", U64, 900, 1, YEAR),
    key("store.flush_interval_seconds", U64, 20, 1, YEAR),
    key("store.firebase.startup_timeout_seconds", U64, 15, 1, YEAR),
    key("store.firebase.keepalive_timeout_seconds", U64, 75, 1, YEAR),
    key(
        "store.firebase.temporary_user_purge_hours",
        U64,
        48,
        0,
        u64::MAX,
    ),
    key("clients.keepalive_timeout_seconds", U64, 60, 0, YEAR),
    key("clients.header_timeout_seconds", U64, 60, 0, YEAR),
    key("clients.body_timeout_seconds", U64, 60, 0, YEAR),
    key("clients.send_timeout_seconds", U64, 60, 0, YEAR),
    key("clients.max_connections_per_ip", U32, 0, 0, u32::MAX as u64),
    key("clients.max_body_bytes", U64, 104_857_600, 0, u64::MAX),
];

/// docs/configuration.md's boolean keys and their defaults (`pingora.work_stealing` aside:
/// its default depends on `threads`).
const BOOL_KEYS: &[(&str, bool)] = &[
    ("upstream.verify_cert", true),
    ("upstream.preserve_host", false),
    ("gatekeeper.max_ips_auto_ban", false),
    ("access_log.enabled", false),
    ("cors.enabled", true),
    ("clients.tcp_keepalive", true),
    ("pingora.work_stealing", true),
];

/// What the model reads a written value as.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    Int(i128),
    Bool(bool),
    Str(String),
    /// Too large for any integer type serde reads (`u128`), or anything else that is never a
    /// valid value of an integer or boolean key (floats, lists, maps, `.inf`).
    Junk,
    Null,
}

/// The document being built: section → (key, YAML text of its value).
#[derive(Default)]
struct Doc {
    sections: BTreeMap<&'static str, Vec<(String, String)>>,
    /// Whole sections written as something other than a mapping.
    replaced: BTreeMap<&'static str, String>,
    anchors: usize,
}

impl Doc {
    fn put(&mut self, path: &str, text: String) {
        if !self.live(path) {
            return;
        }
        let (section, leaf) = path.split_once('.').expect("a dotted key");
        let section = SECTIONS.iter().find(|s| **s == section).expect("a section");
        self.sections
            .entry(section)
            .or_default()
            .push((leaf.to_string(), text));
    }

    fn render(&self, rng: &mut Rng) -> String {
        let mut out = String::new();
        if rng.chance(20) {
            out.push_str("# tollgate model document\n---\n");
        }
        // In the order keys were drawn, so that an alias follows its anchor.
        for section in SECTIONS {
            if let Some(text) = self.replaced.get(section) {
                out.push_str(&format!("{section}: {text}\n"));
                continue;
            }
            let entries = self.sections.get(section).cloned().unwrap_or_default();
            if *section == "upstream" {
                out.push_str("upstream:\n  addrs: [\"127.0.0.1:8080\"]\n");
                out.push_str(&block(&entries, "  "));
            } else if entries.is_empty() {
                continue;
            } else if rng.chance(30) {
                out.push_str(&format!("{section}: {}\n", flow(&entries)));
            } else {
                out.push_str(&format!("{section}:\n{}", block(&entries, "  ")));
            }
        }
        out
    }

    /// Whether keys of `path`'s section are written (not when the section is replaced).
    fn live(&self, path: &str) -> bool {
        let section = path.split_once('.').map_or(path, |(s, _)| s);
        !self.replaced.contains_key(section)
    }
}

/// A section's (key, YAML text) pairs.
type Entries = Vec<(String, String)>;

/// Entries (`firebase.x` nested under `firebase`) as block lines, in the order drawn.
fn block(entries: &[(String, String)], indent: &str) -> String {
    let mut out = String::new();
    for (sub, group) in grouped(entries) {
        match sub {
            None => {
                for (leaf, text) in group {
                    out.push_str(&format!("{indent}{leaf}: {text}\n"));
                }
            }
            Some(sub) => {
                out.push_str(&format!("{indent}{sub}:\n"));
                out.push_str(&block(&group, &format!("{indent}  ")));
            }
        }
    }
    out
}

fn flow(entries: &[(String, String)]) -> String {
    let parts: Vec<String> = grouped(entries)
        .into_iter()
        .flat_map(|(sub, group)| match sub {
            None => group.iter().map(|(k, t)| format!("{k}: {t}")).collect(),
            Some(sub) => vec![format!("{sub}: {}", flow(&group))],
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Direct entries (`None`), then one group per nested mapping, keeping the drawn order.
fn grouped(entries: &[(String, String)]) -> Vec<(Option<String>, Entries)> {
    let mut groups: Vec<(Option<String>, Entries)> = vec![(None, Vec::new())];
    for (key, text) in entries {
        let (sub, leaf) = match key.split_once('.') {
            Some((sub, leaf)) => (Some(sub.to_string()), leaf.to_string()),
            None => (None, key.clone()),
        };
        match groups.iter_mut().find(|(s, _)| *s == sub) {
            Some((_, group)) => group.push((leaf, text.clone())),
            None => groups.push((sub, vec![(leaf, text.clone())])),
        }
    }
    groups
}

const SECTIONS: &[&str] = &[
    "pingora",
    "upstream",
    "gatekeeper",
    "rate_limit",
    "admin",
    "store",
    "access_log",
    "cors",
    "clients",
];

/// A YAML spelling of a value and what the model reads it as.
fn int_value(rng: &mut Rng, k: &IntKey, valid: bool) -> (String, Val) {
    let n = |v: i128| (v.to_string(), Val::Int(v));
    let class = if valid {
        *rng.pick(&[0, 1, 16, 20, 21, 99])
    } else {
        rng.below(22)
    };
    match class {
        // Small values, where rounding to whole events per window shows.
        20 => n(k.lo as i128 + rng.below(4) as i128),
        21 => n(k.lo as i128 + rng.below(100) as i128),
        0 => n(k.lo as i128),
        1 => n(k.hi as i128),
        2 => n(k.lo as i128 - 1),
        3 => n(k.hi as i128 + 1),
        4 => n(k.max_of_type as i128),
        5 => n(k.max_of_type as i128 + 1),
        6 => n(-1),
        7 => n(0),
        8 => ("1.5".into(), Val::Junk),
        9 => (format!("{}.0", k.default), Val::Junk),
        10 => {
            let huge = *rng.pick(&[99_999_999_999_999_999_999_999, -99_999_999_999_999_999_999]);
            n(huge)
        }
        11 => ("1".to_string() + &"0".repeat(45), Val::Junk),
        12 => (
            format!("\"{}\"", k.default),
            Val::Str(k.default.to_string()),
        ),
        13 => (rng.pick(&["null", "~", ""]).to_string(), Val::Null),
        14 => ("\"\"".into(), Val::Str(String::new())),
        15 => (
            rng.pick(&["[1]", "{a: 1}", ".inf", "-.inf", ".nan"])
                .to_string(),
            Val::Junk,
        ),
        16 => (format!("0x{:x}", k.default), Val::Int(k.default as i128)),
        17 => ("true".into(), Val::Bool(true)),
        _ => {
            let span = k.hi.min(1 << 40).saturating_sub(k.lo).saturating_add(1);
            n((k.lo + rng.next() % span) as i128)
        }
    }
}

fn bool_value(rng: &mut Rng, valid: bool) -> (String, Val) {
    let class = if valid {
        *rng.pick(&[0, 1, 6, 7])
    } else {
        rng.below(8)
    };
    match class {
        0 => ("true".into(), Val::Bool(true)),
        1 => ("false".into(), Val::Bool(false)),
        2 => (
            rng.pick(&["yes", "on", "\"true\""]).to_string(),
            Val::Str("x".into()),
        ),
        3 => ("1".into(), Val::Int(1)),
        4 => ("null".into(), Val::Null),
        5 => ("[true]".into(), Val::Junk),
        6 => ("True".into(), Val::Bool(true)),
        _ => ("FALSE".into(), Val::Bool(false)),
    }
}

trait Pick {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
}

impl Pick for Rng {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the model expects of one load.
#[derive(Default, Debug)]
struct Expect {
    /// Keys (dotted paths, or variable names for `environment`) any of which may be named.
    refusals: Vec<(String, String)>,
    ints: HashMap<&'static str, u64>,
    bools: HashMap<&'static str, bool>,
    mode: Option<GatekeeperMode>,
    store: Option<StoreKind>,
    /// `None`: any address; `Some(list)`: whether 10.1.2.3 and 192.0.2.1 are allowed.
    admin_allow: Option<(bool, bool)>,
    blocked_10: bool,
    admin_key: bool,
    proxy_key: bool,
}

impl Expect {
    fn refuse_file(&mut self, key: &str) {
        self.refusals.push((FILE.into(), key.into()));
    }
    fn refuse_env(&mut self, name: &str) {
        self.refusals.push(("environment".into(), name.into()));
    }
}

/// The older proxy's reading of a variable: JSON string quotes removed, then (for everything
/// but secrets and `ADMIN_WHITELIST`) trimmed, empty = unset.
fn unquoted(value: &str) -> String {
    let t = value.trim();
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        if let Ok(inner) = serde_json::from_str::<String>(t) {
            return inner;
        }
    }
    value.to_string()
}

fn env_string(env: &HashMap<String, String>, name: &str) -> Option<String> {
    env.get(name)
        .map(|v| unquoted(v).trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A value for an environment variable, from the odd ones an env file produces.
fn env_value(rng: &mut Rng, valid: &[&str], invalid: &[&str], only_valid: bool) -> String {
    let good = rng.pick(valid).to_string();
    let invalid = if invalid.is_empty() || only_valid {
        valid
    } else {
        invalid
    };
    match rng.below(9) {
        0 => String::new(),
        1 => rng.pick(&[" ", "\t", "\n"]).to_string(),
        2 => format!(" {good}\n"),
        3 => format!("\"{good}\""),
        4 | 5 => rng.pick(invalid).to_string(),
        _ => good,
    }
}

struct Case {
    yaml: String,
    env: HashMap<String, String>,
    expect: Expect,
}

fn generate(rng: &mut Rng) -> Case {
    // Half the cases hold only valid values, so that what is applied gets checked often.
    let strict = rng.chance(50);
    let mut doc = Doc::default();
    let mut expect = Expect::default();
    let mut written: HashMap<&'static str, Val> = HashMap::new();
    let mut anchored: Vec<(String, Val)> = Vec::new();
    if !strict && rng.chance(5) {
        let section = *rng.pick(&["rate_limit", "admin", "clients", "store", "cors"]);
        let text = rng.pick(&["[1, 2]", "5", "\"x\"", "[]"]).to_string();
        doc.replaced.insert(section, text);
        expect.refuse_file(section);
    }

    for k in INT_KEYS {
        // The rate keys more often: they are checked together (rates against the window).
        let chance = if k.path.starts_with("rate_limit.") {
            35
        } else {
            12
        };
        if !rng.chance(chance) {
            continue;
        }
        let (mut text, mut val) = int_value(rng, k, strict);
        if !doc.live(k.path) {
            // Not written: an anchor here would be missing for its alias.
        } else if !anchored.is_empty() && rng.chance(15) {
            let (name, v) = rng.pick(&anchored).clone();
            text = format!("*{name}");
            val = v;
        } else if rng.chance(10) && !text.is_empty() {
            doc.anchors += 1;
            let name = format!("a{}", doc.anchors);
            anchored.push((name.clone(), val.clone()));
            text = format!("&{name} {text}");
        }
        doc.put(k.path, text);
        written.insert(k.path, val);
    }
    for (path, _) in BOOL_KEYS {
        if rng.chance(12) {
            let (text, val) = bool_value(rng, strict);
            doc.put(path, text);
            written.insert(path, val);
        }
    }
    let yaml_mode = if rng.chance(30) {
        let modes = [
            ("none", Some(GatekeeperMode::None)),
            ("proxy_key", Some(GatekeeperMode::ProxyKey)),
            ("user_token", Some(GatekeeperMode::UserToken)),
            ("User_Token", None),
            ("\"\"", None),
            ("5", None),
        ];
        let (text, mode) = *rng.pick(if strict { &modes[..3] } else { &modes[..] });
        doc.put("gatekeeper.mode", text.to_string());
        if mode.is_none() {
            expect.refuse_file("gatekeeper.mode");
        }
        mode
    } else {
        Some(GatekeeperMode::None)
    };
    let yaml_store = if rng.chance(20) {
        let kinds = [
            ("memory", Some(StoreKind::Memory)),
            ("sqlite", Some(StoreKind::Sqlite)),
            ("firebase", None),
        ];
        let (text, kind) = *rng.pick(if strict { &kinds[..2] } else { &kinds[..] });
        doc.put("store.kind", text.to_string());
        if kind.is_none() {
            expect.refuse_file("store.kind");
        }
        kind
    } else {
        Some(StoreKind::Memory)
    };
    let yaml_allow: Option<(bool, bool)> = match rng.below(4) {
        0 => {
            doc.put("admin.allow", "[]".into());
            Some((false, false))
        }
        1 => {
            doc.put("admin.allow", "[\"10.0.0.0/8\"]".into());
            Some((true, false))
        }
        2 => {
            doc.put("admin.allow", "null".into());
            None
        }
        _ => None,
    };
    let yaml_blocked = rng.chance(30);
    let blocklist = if yaml_blocked {
        "[\"10.0.0.0/8\"]"
    } else {
        "[]"
    };
    let blocklist_line = format!("ip_blocklist: {blocklist}\n");

    // Unknown, misspelt and duplicate keys; sections that are not mappings.
    if !strict && rng.chance(8) {
        let (path, typo) = *rng.pick(&[
            ("rate_limit", "request_per_minute"),
            ("admin", "lisen"),
            ("clients", "keepalive_timeout"),
            ("pingora", "thread"),
            ("store", "flush_interval"),
            ("cors", "enable"),
        ]);
        doc.put(&format!("{path}.{typo}"), "1".into());
        expect.refuse_file(&format!("{path}.{typo}"));
    }
    if !strict && rng.chance(6) {
        let k = rng.pick(INT_KEYS);
        doc.put(k.path, "1".into());
        doc.put(k.path, "2".into());
        expect.refuse_file(k.path);
    }

    // The model of the file's keys.
    let mut ints: HashMap<&'static str, u64> = HashMap::new();
    for k in INT_KEYS {
        let value = match written.get(k.path) {
            None => Some(k.default),
            // `null` means the default for Pingora's optional durations, as documented.
            Some(Val::Null)
                if matches!(
                    k.path,
                    "pingora.grace_period_seconds" | "pingora.graceful_shutdown_timeout_seconds"
                ) =>
            {
                Some(k.default)
            }
            Some(Val::Int(n)) if *n >= 0 && (*n as u128) <= k.max_of_type => {
                let n = *n as u64;
                (k.lo..=k.hi).contains(&n).then_some(n)
            }
            Some(_) => None,
        };
        match value {
            Some(v) => {
                ints.insert(k.path, v);
            }
            None => expect.refuse_file(k.path),
        }
    }
    for (path, default) in BOOL_KEYS {
        match written.get(path) {
            None => {
                expect.bools.insert(path, *default);
            }
            Some(Val::Bool(b)) => {
                expect.bools.insert(path, *b);
            }
            Some(_) => expect.refuse_file(path),
        }
    }
    if !written.contains_key("pingora.work_stealing") {
        let one = ints.get("pingora.threads") == Some(&1);
        expect.bools.insert("pingora.work_stealing", !one);
    }
    // A rate that whole events per window would raise by more than a tenth is refused.
    if let Some(&window) = ints.get("rate_limit.window_seconds") {
        for key in [
            "rate_limit.requests_per_minute",
            "rate_limit.auth_failures_per_minute",
        ] {
            if let Some(&rate) = ints.get(key) {
                let per_window = (rate as u128 * window as u128).div_ceil(60);
                // per_window × 60 / window > rate × 1.1, in integers.
                if per_window * 600 > rate as u128 * 11 * window as u128 {
                    expect.refuse_file(key);
                }
            }
        }
    }

    // The environment: overrides of the file in the older proxy's names, and secrets.
    let mut env: HashMap<String, String> = HashMap::new();
    let mut set = |rng: &mut Rng, name: &str, valid: &[&str], invalid: &[&str]| {
        if rng.chance(25) {
            env.insert(name.to_string(), env_value(rng, valid, invalid, strict));
        }
    };
    set(
        rng,
        "GATEKEEPER",
        &["none", "proxy_key", "user_token"],
        &["open", "USER_TOKEN"],
    );
    set(
        rng,
        "GATEKEEPER_STORE",
        &["memory", "sqlite"],
        &["redis", "Memory"],
    );
    set(
        rng,
        "MAX_IPS_PER_USER",
        &["0", "3", "4294967295"],
        &["-1", "1.5", "4294967296", "x"],
    );
    set(
        rng,
        "MAX_IPS_AUTO_BAN",
        &["true", "0", "YES", "no"],
        &["on", "2", "ja"],
    );
    set(
        rng,
        "IP_BLACKLIST",
        &["10.0.0.0/8", "10.0.0.0/8, 192.0.2.0/24", ","],
        &["10.0.0.0/33", "x"],
    );
    set(
        rng,
        "ADMIN_WHITELIST",
        &["10.0.0.0/8", "192.0.2.1,10.0.0.0/8", ",", ""],
        &["localhost"],
    );
    set(
        rng,
        "POW_TOKEN_PURGE_HOURS",
        &["0", "1", "18446744073709551615"],
        &["-1", "1h", "18446744073709551616"],
    );
    set(rng, "ADMIN_KEY", &[ADMIN_SECRET], &[]);
    set(rng, "PROXY_KEY", &[PROXY_SECRET], &[]);
    if !strict && rng.chance(20) {
        env.insert("ADMIN_KEY".into(), format!("{ADMIN_SECRET}\n"));
    }

    let mode = match env_string(&env, "GATEKEEPER") {
        Some(v) => GatekeeperMode::parse(&v).or_else(|| {
            expect.refuse_env("GATEKEEPER");
            None
        }),
        None => yaml_mode,
    };
    let store = match env_string(&env, "GATEKEEPER_STORE") {
        Some(v) => StoreKind::parse(&v).or_else(|| {
            expect.refuse_env("GATEKEEPER_STORE");
            None
        }),
        None => yaml_store,
    };
    if let Some(v) = env_string(&env, "MAX_IPS_PER_USER") {
        match v.parse::<u32>() {
            Ok(n) => {
                ints.insert("gatekeeper.max_ips_per_user", n.into());
            }
            Err(_) => expect.refuse_env("MAX_IPS_PER_USER"),
        }
    }
    if let Some(v) = env_string(&env, "MAX_IPS_AUTO_BAN") {
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => expect.bools.insert("gatekeeper.max_ips_auto_ban", true),
            "false" | "0" | "no" => expect.bools.insert("gatekeeper.max_ips_auto_ban", false),
            _ => {
                expect.refuse_env("MAX_IPS_AUTO_BAN");
                None
            }
        };
    }
    if let Some(v) = env_string(&env, "POW_TOKEN_PURGE_HOURS") {
        match v.parse::<u64>() {
            Ok(n) => {
                ints.insert("store.firebase.temporary_user_purge_hours", n);
            }
            Err(_) => expect.refuse_env("POW_TOKEN_PURGE_HOURS"),
        }
    }
    let csv = |v: &str| -> Option<(bool, bool)> {
        let set = super::CidrSet::parse_csv(v).ok()?;
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        let b: IpAddr = "192.0.2.1".parse().unwrap();
        Some((set.contains(a), set.contains(b)))
    };
    expect.blocked_10 = match env_string(&env, "IP_BLACKLIST") {
        Some(v) => csv(&v).map(|(a, _)| a).unwrap_or_else(|| {
            expect.refuse_env("IP_BLACKLIST");
            false
        }),
        None => yaml_blocked,
    };
    // Set at all (even empty) = this list; quotes removed as for every variable.
    expect.admin_allow = match env.get("ADMIN_WHITELIST") {
        Some(v) => Some(csv(&unquoted(v)).unwrap_or_else(|| {
            expect.refuse_env("ADMIN_WHITELIST");
            (false, false)
        })),
        None => yaml_allow,
    };
    for (name, present) in [
        ("ADMIN_KEY", &mut expect.admin_key),
        ("PROXY_KEY", &mut expect.proxy_key),
    ] {
        if let Some(v) = env.get(name) {
            let v = unquoted(v);
            if v.trim() != v {
                expect.refusals.push(("environment".into(), name.into()));
            }
            *present = !v.is_empty();
        }
    }
    if mode == Some(GatekeeperMode::UserToken) && !expect.admin_key {
        expect.refuse_env("ADMIN_KEY");
    }
    if mode == Some(GatekeeperMode::ProxyKey) && !expect.proxy_key {
        expect.refuse_env("PROXY_KEY");
    }
    expect.mode = mode;
    expect.store = store;
    expect.ints = ints;
    let mut yaml = doc.render(rng);
    yaml.push_str(&blocklist_line);
    Case { yaml, env, expect }
}

/// Words an operator should see instead of Rust's (`u32`, `struct RawAdmin`, serde's `?`).
fn check_problem_words(error: &ConfigError, context: &str) {
    for word in [
        "u8",
        "u16",
        "u32",
        "u64",
        "u128",
        "usize",
        "i64",
        "Raw",
        "struct",
        "identifier",
        "unit value",
        "any YAML value",
    ] {
        assert!(
            !error.problem.contains(word),
            "the problem names Rust's `{word}`: {error}\n{context}"
        );
    }
    let line = error.to_string();
    assert!(
        !line.contains(|c: char| c.is_control()),
        "an error is one line of text: {line:?}\n{context}"
    );
    assert!(
        !error.key.is_empty()
            && error.key != "?"
            && !error.key.ends_with(".?")
            && !error.problem.trim().is_empty(),
        "an error names a key and a problem: {error:?}\n{context}"
    );
}

fn check(case: &Case, seed: u64) {
    let context = format!(
        "replay: TOLLGATE_MODEL_SEED={seed} cargo test --lib config::model_tests\n--- yaml\n{}--- env\n{:?}",
        case.yaml, case.env
    );
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        Config::from_yaml(&case.yaml, FILE, &case.env)
    }))
    .unwrap_or_else(|_| panic!("loading panicked\n{context}"));
    let e = &case.expect;
    let config = match loaded {
        Err(error) => {
            check_problem_words(&error, &context);
            let text = error.to_string();
            for secret in [ADMIN_SECRET, PROXY_SECRET] {
                assert!(
                    !text.contains(secret),
                    "a secret in an error: {text}\n{context}"
                );
            }
            assert!(
                e.refusals
                    .iter()
                    .any(|(origin, key)| *origin == error.origin && *key == error.key),
                "refused for something the model accepts: {error}\nmodel refuses {:?}\n{context}",
                e.refusals
            );
            return;
        }
        Ok(config) => config,
    };
    assert!(
        e.refusals.is_empty(),
        "accepted, but the model refuses {:?}\n{context}",
        e.refusals
    );
    let int = |path: &str| e.ints[path];
    let secs = |path: &str| Duration::from_secs(int(path));
    let ms = |path: &str| Duration::from_millis(int(path));
    let optional = |path: &str| (int(path) > 0).then(|| secs(path));
    let actual_ints: Vec<(&str, u64, u64)> = vec![
        (
            "pingora.threads",
            config.server.threads as u64,
            int("pingora.threads"),
        ),
        (
            "pingora.grace_period_seconds",
            config.server.grace_period_seconds.unwrap_or(u64::MAX),
            int("pingora.grace_period_seconds"),
        ),
        (
            "pingora.graceful_shutdown_timeout_seconds",
            config
                .server
                .graceful_shutdown_timeout_seconds
                .unwrap_or(u64::MAX),
            int("pingora.graceful_shutdown_timeout_seconds"),
        ),
        (
            "pingora.upstream_keepalive_pool_size",
            config.server.upstream_keepalive_pool_size as u64,
            int("pingora.upstream_keepalive_pool_size"),
        ),
        (
            "gatekeeper.max_ips_per_user",
            config.gatekeeper.max_ips_per_user.into(),
            int("gatekeeper.max_ips_per_user"),
        ),
        (
            "gatekeeper.max_recorded_ips",
            config.gatekeeper.max_recorded_ips.into(),
            int("gatekeeper.max_recorded_ips"),
        ),
        (
            "rate_limit.requests_per_minute",
            config.rate_limit.requests_per_minute.into(),
            int("rate_limit.requests_per_minute"),
        ),
        (
            "rate_limit.max_inflight",
            config.rate_limit.max_inflight.into(),
            int("rate_limit.max_inflight"),
        ),
        (
            "rate_limit.auth_failures_per_minute",
            config.rate_limit.auth_failures_per_minute.into(),
            int("rate_limit.auth_failures_per_minute"),
        ),
        (
            "rate_limit.estimator_slots",
            config.rate_limit.estimator_slots as u64,
            int("rate_limit.estimator_slots"),
        ),
        (
            "admin.max_body_bytes",
            config.admin.max_body_bytes as u64,
            int("admin.max_body_bytes"),
        ),
        (
            "admin.lockout_after_failures",
            config.admin.lockout_after_failures.into(),
            int("admin.lockout_after_failures"),
        ),
        (
            "clients.keepalive_timeout_seconds",
            config.clients.keepalive_timeout_seconds,
            int("clients.keepalive_timeout_seconds"),
        ),
        (
            "clients.max_connections_per_ip",
            config.clients.max_connections_per_ip.into(),
            int("clients.max_connections_per_ip"),
        ),
        (
            "clients.max_body_bytes",
            config.clients.max_body_bytes.unwrap_or(0),
            int("clients.max_body_bytes"),
        ),
    ];
    for (path, actual, expected) in actual_ints {
        assert_eq!(actual, expected, "{path}\n{context}");
    }
    let durations: Vec<(&str, Duration, Duration)> = vec![
        (
            "upstream.connect_timeout_ms",
            config.upstream.connect_timeout,
            ms("upstream.connect_timeout_ms"),
        ),
        (
            "upstream.read_timeout_ms",
            config.upstream.read_timeout,
            ms("upstream.read_timeout_ms"),
        ),
        (
            "upstream.idle_timeout_ms",
            config.upstream.idle_timeout,
            ms("upstream.idle_timeout_ms"),
        ),
        (
            "rate_limit.window_seconds",
            config.rate_limit.window,
            secs("rate_limit.window_seconds"),
        ),
        (
            "admin.body_read_timeout_ms",
            config.admin.body_read_timeout,
            ms("admin.body_read_timeout_ms"),
        ),
        (
            "admin.persist_timeout_ms",
            config.admin.persist_timeout,
            ms("admin.persist_timeout_ms"),
        ),
        (
            "admin.lockout_seconds",
            config.admin.lockout,
            secs("admin.lockout_seconds"),
        ),
        (
            "store.flush_interval_seconds",
            config.store.flush_interval,
            secs("store.flush_interval_seconds"),
        ),
        (
            "store.firebase.startup_timeout_seconds",
            config.store.firebase.startup_timeout,
            secs("store.firebase.startup_timeout_seconds"),
        ),
        (
            "store.firebase.keepalive_timeout_seconds",
            config.store.firebase.keepalive_timeout,
            secs("store.firebase.keepalive_timeout_seconds"),
        ),
        (
            "store.firebase.temporary_user_purge_hours",
            config.store.firebase.temporary_user_purge,
            Duration::from_secs(
                int("store.firebase.temporary_user_purge_hours").saturating_mul(3600),
            ),
        ),
    ];
    for (path, actual, expected) in durations {
        assert_eq!(actual, expected, "{path}\n{context}");
    }
    let optionals = [
        (
            "clients.header_timeout_seconds",
            config.clients.header_timeout,
        ),
        ("clients.body_timeout_seconds", config.clients.body_timeout),
        ("clients.send_timeout_seconds", config.clients.send_timeout),
    ];
    for (path, actual) in optionals {
        assert_eq!(actual, optional(path), "{path}\n{context}");
    }
    let bools = [
        ("upstream.verify_cert", config.upstream.verify_cert),
        ("upstream.preserve_host", config.upstream.preserve_host),
        (
            "gatekeeper.max_ips_auto_ban",
            config.gatekeeper.max_ips_auto_ban,
        ),
        ("access_log.enabled", config.access_log.is_some()),
        ("cors.enabled", config.cors),
        ("clients.tcp_keepalive", config.clients.tcp_keepalive),
        ("pingora.work_stealing", config.server.work_stealing),
    ];
    for (path, actual) in bools {
        assert_eq!(actual, e.bools[path], "{path}\n{context}");
    }
    assert_eq!(Some(config.gatekeeper.mode), e.mode, "mode\n{context}");
    assert_eq!(Some(config.store.kind), e.store, "store.kind\n{context}");
    let probe = |ip: &str| ip.parse::<IpAddr>().unwrap();
    let allow = config.admin.allow.as_ref().map(|set| {
        (
            set.contains(probe("10.1.2.3")),
            set.contains(probe("192.0.2.1")),
        )
    });
    assert_eq!(allow, e.admin_allow, "admin.allow\n{context}");
    assert_eq!(
        config.ip_blocklist.contains(probe("10.1.2.3")),
        e.blocked_10,
        "ip_blocklist\n{context}"
    );
    assert_eq!(
        config.secrets.admin_key.is_some(),
        e.admin_key,
        "ADMIN_KEY\n{context}"
    );
    assert_eq!(
        config.secrets.proxy_key.is_some(),
        e.proxy_key,
        "PROXY_KEY\n{context}"
    );
    if let Some(key) = &config.secrets.admin_key {
        assert!(key.matches(ADMIN_SECRET), "ADMIN_KEY's value\n{context}");
    }
    if let Some(key) = &config.secrets.proxy_key {
        assert!(key.matches(PROXY_SECRET), "PROXY_KEY's value\n{context}");
    }
}

/// A document broken at random: bytes changed, removed or repeated, cut short. It may still be
/// valid; if refused, the error names the file, a key and a problem in words.
fn mutate(rng: &mut Rng, yaml: &str) -> String {
    let mut bytes: Vec<char> = yaml.chars().collect();
    const ODD: &[char] = &[
        ':', '-', '[', ']', '{', '}', '&', '*', '!', '|', '>', '"', '\'', '#', '\t', '\n', ' ',
        '0', '9', '%', '@', '`', ',', '?', 'é', '\u{0}', '\u{feff}', '\u{7f}',
    ];
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        match rng.below(4) {
            0 => bytes[at] = *rng.pick(ODD),
            1 => {
                bytes.remove(at);
            }
            2 => bytes.insert(at, *rng.pick(ODD)),
            _ => bytes.truncate(at),
        }
    }
    bytes.into_iter().collect()
}

fn seeds() -> Vec<u64> {
    model_seeds(400)
}

#[test]
fn random_documents_and_environments_load_as_documented() {
    for seed in seeds() {
        let mut rng = Rng::new(seed);
        let case = generate(&mut rng);
        check(&case, seed);
    }
}

#[test]
fn broken_documents_are_refused_cleanly() {
    for seed in seeds() {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let case = generate(&mut rng);
        let yaml = mutate(&mut rng, &case.yaml);
        let context = format!("replay: TOLLGATE_MODEL_SEED={seed}\n--- yaml\n{yaml}");
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            Config::from_yaml(&yaml, FILE, &HashMap::<String, String>::new())
        }))
        .unwrap_or_else(|_| panic!("loading panicked\n{context}"));
        if let Err(error) = loaded {
            // Valid YAML may still need a secret (`mode: proxy_key`, no `PROXY_KEY`).
            assert!(
                error.origin == FILE || error.origin == "environment",
                "{error}\n{context}"
            );
            check_problem_words(&error, &context);
        }
    }
}
