//! The YAML file as written by operators. Every section rejects unknown keys; defaults live here
//! so that `conf/tollgate.yaml` and `docs/configuration.md` can quote them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Pingora's `ServerConf`, checked key by key (Pingora itself ignores typos).
    #[serde(default)]
    pub pingora: Option<serde_yaml::Mapping>,
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub gatekeeper: RawGatekeeper,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub ip_blocklist: Vec<String>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub access_log: RawAccessLog,
    #[serde(default)]
    pub cors: RawCors,
    #[serde(default)]
    pub clients: RawClients,
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:7860".to_string()]
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub addrs: Vec<String>,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub sni: String,
    /// Verify the upstream's certificate (only with `tls: true`).
    #[serde(default = "yes")]
    pub verify_cert: bool,
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    /// Forward the client's `Host` instead of the upstream's own `host[:port]`.
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// How long an idle pooled upstream connection is kept.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

fn yes() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGatekeeper {
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default)]
    pub max_ips_per_user: u32,
    #[serde(default)]
    pub max_ips_auto_ban: bool,
    #[serde(default = "default_max_recorded_ips")]
    pub max_recorded_ips: u32,
}

fn default_max_recorded_ips() -> u32 {
    1000
}

fn default_mode() -> String {
    "none".to_string()
}

impl Default for RawGatekeeper {
    fn default() -> Self {
        Self {
            mode: default_mode(),
            max_ips_per_user: 0,
            max_ips_auto_ban: false,
            max_recorded_ips: default_max_recorded_ips(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    #[serde(default)]
    pub max_inflight: u32,
    #[serde(default = "default_auth_failures")]
    pub auth_failures_per_minute: u32,
    #[serde(default = "default_slots")]
    pub estimator_slots: usize,
    /// Length of the sliding window; the budget per window is scaled from the per-minute one.
    #[serde(default = "default_window")]
    pub window_seconds: u64,
}

fn default_window() -> u64 {
    60
}

fn default_rpm() -> u32 {
    60
}
fn default_auth_failures() -> u32 {
    30
}
fn default_slots() -> usize {
    131_072
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            requests_per_minute: default_rpm(),
            max_inflight: 0,
            auth_failures_per_minute: default_auth_failures(),
            estimator_slots: default_slots(),
            window_seconds: default_window(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Absent = any address; an explicit empty list = nobody (as `ADMIN_WHITELIST=""`).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Proxies in front of the admin listener whose `X-Forwarded-For` is believed; apart from
    /// the proxy listener's `trusted_proxies`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_body_timeout")]
    pub body_read_timeout_ms: u64,
    /// Upper bound on how long a `PUT` waits for the store to confirm its change.
    #[serde(default = "default_persist_timeout")]
    pub persist_timeout_ms: u64,
    /// Failed admin-key attempts from one IP before it is locked out.
    #[serde(default = "default_lockout_after")]
    pub lockout_after_failures: u32,
    #[serde(default = "default_lockout_seconds")]
    pub lockout_seconds: u64,
}

fn default_lockout_after() -> u32 {
    5
}
fn default_lockout_seconds() -> u64 {
    900
}

fn default_admin_listen() -> String {
    "127.0.0.1:7861".to_string()
}
fn default_max_body() -> usize {
    64 * 1024 * 1024
}
fn default_body_timeout() -> u64 {
    10_000
}
fn default_persist_timeout() -> u64 {
    10_000
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            allow: None,
            trusted_proxies: Vec::new(),
            max_body_bytes: default_max_body(),
            body_read_timeout_ms: default_body_timeout(),
            persist_timeout_ms: default_persist_timeout(),
            lockout_after_failures: default_lockout_after(),
            lockout_seconds: default_lockout_seconds(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default = "default_store_kind")]
    pub kind: String,
    #[serde(default = "default_flush_interval")]
    pub flush_interval_seconds: u64,
    #[serde(default)]
    pub sqlite: RawSqlite,
    #[serde(default)]
    pub firebase: RawFirebase,
}

fn default_store_kind() -> String {
    "memory".to_string()
}
fn default_flush_interval() -> u64 {
    20
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            flush_interval_seconds: default_flush_interval(),
            sqlite: RawSqlite::default(),
            firebase: RawFirebase::default(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSqlite {
    #[serde(default = "default_sqlite_path")]
    pub path: String,
}

fn default_sqlite_path() -> String {
    "data/tollgate.db".to_string()
}

impl Default for RawSqlite {
    fn default() -> Self {
        Self {
            path: default_sqlite_path(),
        }
    }
}

/// Non-secret Firebase tuning; the URL and key come from the environment.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirebase {
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout_seconds: u64,
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_seconds: u64,
    #[serde(default = "default_purge_hours")]
    pub temporary_user_purge_hours: u64,
}

fn default_startup_timeout() -> u64 {
    15
}
fn default_keepalive_timeout() -> u64 {
    75
}
fn default_purge_hours() -> u64 {
    48
}

impl Default for RawFirebase {
    fn default() -> Self {
        Self {
            startup_timeout_seconds: default_startup_timeout(),
            keepalive_timeout_seconds: default_keepalive_timeout(),
            temporary_user_purge_hours: default_purge_hours(),
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for RawCors {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClients {
    #[serde(default = "default_client_keepalive")]
    pub keepalive_timeout_seconds: u64,
    #[serde(default = "default_true")]
    pub tcp_keepalive: bool,
    #[serde(default = "default_header_timeout")]
    pub header_timeout_seconds: u64,
    #[serde(default = "default_client_body_timeout")]
    pub body_timeout_seconds: u64,
    #[serde(default = "default_send_timeout")]
    pub send_timeout_seconds: u64,
    #[serde(default)]
    pub max_connections_per_ip: u32,
    #[serde(default = "default_client_max_body")]
    pub max_body_bytes: u64,
}

/// The older proxy's `express.json({limit: "100mb"})` on its proxy routes.
fn default_client_max_body() -> u64 {
    100 * 1024 * 1024
}

fn default_header_timeout() -> u64 {
    60
}

/// nginx's `client_body_timeout`, and what Pingora applied to every read.
fn default_client_body_timeout() -> u64 {
    60
}

/// nginx's `send_timeout`.
fn default_send_timeout() -> u64 {
    60
}

fn default_client_keepalive() -> u64 {
    60
}

impl Default for RawClients {
    fn default() -> Self {
        Self {
            keepalive_timeout_seconds: default_client_keepalive(),
            tcp_keepalive: true,
            header_timeout_seconds: default_header_timeout(),
            body_timeout_seconds: default_client_body_timeout(),
            send_timeout_seconds: default_send_timeout(),
            max_connections_per_ip: 0,
            max_body_bytes: default_client_max_body(),
        }
    }
}
