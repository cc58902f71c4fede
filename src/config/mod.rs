//! Configuration: the YAML file (`-c FILE`), environment overrides in the older proxy's names,
//! and secrets from the environment only. Everything is validated before Pingora starts, so
//! `tollgate -t` checks all of it and the hot path never re-parses anything.

mod env;
mod pingora_section;
mod raw;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use pingora::server::configuration::ServerConf;
use serde::de::DeserializeOwned;

use crate::net::CidrSet;
use crate::secret::Secret;

pub use env::{EnvSource, ProcessEnv};

/// The longest duration a `*_seconds` key takes. A year is "until someone looks" for a
/// lockout and far beyond any sensible interval or timeout; values near `u64::MAX` overflowed
/// the clock where they were added to it (the store's flush loop died, so nothing was saved).
const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// Refuses a `*_seconds` value over [`MAX_SECONDS`].
fn at_most_a_year(origin: &str, key: &str, seconds: u64) -> Result<(), ConfigError> {
    if seconds > MAX_SECONDS {
        return Err(ConfigError::new(
            origin,
            key,
            format!("must be at most {MAX_SECONDS} (a year)"),
        ));
    }
    Ok(())
}

/// Refuses a `*_ms` value over [`MAX_SECONDS`]: Pingora's own timer adds an upstream timeout
/// to the clock unchecked when `pingora.fast_timeout_to_tokio_threshold_seconds` is null.
fn at_most_a_year_ms(origin: &str, key: &str, ms: u64) -> Result<(), ConfigError> {
    const MAX_MS: u64 = MAX_SECONDS * 1000;
    if ms > MAX_MS {
        return Err(ConfigError::new(
            origin,
            key,
            format!("must be at most {MAX_MS} (a year)"),
        ));
    }
    Ok(())
}

/// Client connections. Pingora keeps an idle HTTP/1.1 client connection open forever once it
/// has served a request, so clients that vanish (a NAT timeout, a crashed client) or that open
/// connections and wait would hold memory and a file descriptor each until a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientsConfig {
    /// Longest wait for a kept-alive client's next request (and between its header's reads);
    /// 0 = no limit (Pingora's behaviour).
    pub keepalive_timeout_seconds: u64,
    /// TCP keep-alive probes on client sockets, so dead peers are found while a request waits.
    pub tcp_keepalive: bool,
    /// Longest time from the first bytes of a request header to its end (`None`: no limit
    /// beyond Pingora's per read), as nginx's `client_header_timeout`.
    pub header_timeout: Option<Duration>,
    /// Longest wait for the next bytes of a request body (`None`: no limit of its own), as
    /// nginx's `client_body_timeout`.
    pub body_timeout: Option<Duration>,
    /// Longest wait for a client to take the next bytes of its answer (`None`: no limit, Pingora's
    /// behaviour), as nginx's `send_timeout`: a client that stops reading otherwise held its
    /// connection, and the upstream connection feeding it, for good.
    pub send_timeout: Option<Duration>,
    /// Open proxy connections one address (an IPv6 /64) may hold; 0: no cap.
    pub max_connections_per_ip: u32,
    /// Largest proxied request body (`None`: no limit), as nginx's `client_max_body_size`.
    pub max_body_bytes: Option<u64>,
}

/// A configuration problem, always naming where (file or environment), which key and what.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}: {}: {}", one_line(.origin), one_line(.key), one_line(.problem))]
pub struct ConfigError {
    /// The file path, or `environment`.
    pub origin: String,
    /// Dotted key path (`upstream.addrs[0]`) or environment variable name.
    pub key: String,
    pub problem: String,
}

/// Control characters escaped (`\n`, `\t`, `\u{1b}`): an error is one line on stderr and in
/// the journal, whatever a key, value or path quoted from the file or environment holds (a
/// newline would split it, a carriage return or escape sequence rewrite the terminal).
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}

impl ConfigError {
    pub fn new(
        origin: impl Into<String>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self {
            origin: origin.into(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Who may use the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatekeeperMode {
    /// Open; rate limited per client IP.
    None,
    /// One shared password, `PROXY_KEY`.
    ProxyKey,
    /// A token per user, managed over the admin API.
    UserToken,
}

impl GatekeeperMode {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "none" => Some(Self::None),
            "proxy_key" => Some(Self::ProxyKey),
            "user_token" => Some(Self::UserToken),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ProxyKey => "proxy_key",
            Self::UserToken => "user_token",
        }
    }
}

/// Where users are persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Sqlite,
    FirebaseRtdb,
}

impl StoreKind {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "memory" => Some(Self::Memory),
            "sqlite" => Some(Self::Sqlite),
            "firebase_rtdb" => Some(Self::FirebaseRtdb),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::FirebaseRtdb => "firebase_rtdb",
        }
    }
}

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Every address every `addrs` entry resolved to, in order; requests rotate over them.
    pub addrs: Vec<UpstreamAddr>,
    pub tls: bool,
    pub verify_cert: bool,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// Send the client's `Host` rather than each upstream's own.
    pub preserve_host: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// One resolved upstream address, with the names its `addrs` entry gives it.
#[derive(Clone, Debug)]
pub struct UpstreamAddr {
    pub addr: SocketAddr,
    /// TLS server name: `upstream.sni`, else the entry's host name (empty without TLS).
    pub sni: String,
    /// The `Host` the upstream gets: the entry's `host[:port]`, the port left out when it is
    /// the scheme's default, as a browser or nginx (`$proxy_host`) would send it.
    pub host: HeaderValue,
}

#[derive(Clone, Debug)]
pub struct GatekeeperConfig {
    pub mode: GatekeeperMode,
    /// 0 = unlimited.
    pub max_ips_per_user: u32,
    pub max_ips_auto_ban: bool,
    /// Addresses recorded per user without an IP limit; 0 = all.
    pub max_recorded_ips: u32,
}

#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    /// 0 = off.
    pub requests_per_minute: u32,
    /// 0 = off.
    pub max_inflight: u32,
    /// Failed authentications tolerated per client IP and minute; 0 = off.
    pub auth_failures_per_minute: u32,
    /// Count-min sketch width per hash row: how many distinct active keys per window the
    /// limiter tells apart without over-counting.
    pub estimator_slots: usize,
    /// The sliding window; budgets per window are `per_minute × window / 60 s`.
    pub window: Duration,
}

impl RateLimitConfig {
    /// `per_minute` scaled to the window, at least 1 when the limit is on.
    pub fn per_window(&self, per_minute: u32) -> u32 {
        let scaled = (u64::from(per_minute) * self.window.as_secs()).div_ceil(60);
        u32::try_from(scaled)
            .unwrap_or(u32::MAX)
            .max(u32::from(per_minute > 0))
    }
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `None` (no `admin.allow`, no `ADMIN_WHITELIST`) = every address may try (the key is
    /// still required); an explicitly empty list = nobody, as in the older proxy.
    pub allow: Option<CidrSet>,
    /// Whose `X-Forwarded-For` the admin listener believes for `allow` and the lockout: its
    /// own list, so that trusting a proxy in front of the proxy listener does not let every
    /// process behind that address (say, a local nginx's host) pick the address it is locked
    /// out and allowed by.
    pub trusted_proxies: CidrSet,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    pub persist_timeout: Duration,
    pub lockout_after_failures: u32,
    pub lockout: Duration,
}

#[derive(Clone, Debug)]
pub struct FirebaseConfig {
    pub rtdb_url: Option<String>,
    pub key: Option<Secret>,
    pub users_ref: String,
    pub emulator_host: Option<String>,
    pub startup_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub temporary_user_purge: Duration,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub flush_interval: Duration,
    pub sqlite_path: PathBuf,
    pub firebase: FirebaseConfig,
}

#[derive(Clone, Debug)]
pub struct Secrets {
    pub proxy_key: Option<Secret>,
    pub admin_key: Option<Secret>,
}

/// Where access log lines go.
#[derive(Clone, Debug)]
pub struct AccessLogConfig {
    /// Appended to (created if missing, followed across rotation); `None`: stdout.
    pub path: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConf,
    pub listen: Vec<SocketAddr>,
    pub upstream: UpstreamConfig,
    pub gatekeeper: GatekeeperConfig,
    pub rate_limit: RateLimitConfig,
    pub trusted_proxies: CidrSet,
    pub ip_blocklist: CidrSet,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    /// `None`: off.
    pub access_log: Option<AccessLogConfig>,
    /// Answer CORS preflights and allow any origin, as the older proxy's `cors()` did.
    pub cors: bool,
    pub clients: ClientsConfig,
    pub secrets: Secrets,
    /// Settings that do not stop tollgate but that an operator should hear about (logged at
    /// start and by `-t`), e.g. the older proxy's variables that tollgate does not read.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads and validates `path`, applying environment overrides from `env`.
    pub fn load(path: &Path, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = read_limited(path)
            .map_err(|e| ConfigError::new(&origin, "(file)", format!("cannot read: {e}")))?;
        Self::from_yaml(&text, &origin, env)
    }

    /// What running as a daemon (`-d`, `pingora.daemon`) needs beyond a valid file: an access
    /// log file (a daemon's stdout is /dev/null) and an error log and pid file it can write.
    pub fn check_daemon(&self) -> Result<(), ConfigError> {
        let origin = self.source.display().to_string();
        if self
            .access_log
            .as_ref()
            .is_some_and(|log| log.path.is_none())
        {
            return Err(ConfigError::new(
                &origin,
                "access_log.path",
                "required with -d (pingora.daemon): a daemon's stdout is /dev/null, so the \
                 access log would be lost",
            ));
        }
        pingora_section::check_daemon_files(&self.server, &origin)
    }

    /// The CA certificates Pingora loads at start when `pingora.ca_file` is unset (see
    /// `pingora_section::check_system_roots`); run by `-t` and before a start.
    pub fn check_system_roots(&self) -> Result<(), ConfigError> {
        pingora_section::check_system_roots(&self.server)
    }

    /// Validates YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = parse_yaml(text, origin)?;
        Builder { origin, env }.build(raw)
    }
}

/// The most a configuration file may hold: far more than any real one, and a bound on what
/// `-c` with a wrong path (a log file, `/dev/zero`, which never ends) reads into memory.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB; is it the configuration file?",
            MAX_FILE_BYTES >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// Deserializes YAML, reporting the dotted path of the offending key.
fn parse_yaml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let value: serde_yaml::Value = if text.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(text).map_err(|e| document_error::<T>(text, origin, e))?
    };
    serde_path_to_error::deserialize(value).map_err(|e| path_error(origin, e))
}

/// A document serde_yaml could not read as a YAML value. Some of these are about one key (a
/// number beyond any integer type, a key given twice), which reading the document straight
/// into the file format names; the rest (syntax, aliases) are about the document.
fn document_error<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    error: serde_yaml::Error,
) -> ConfigError {
    let document = || {
        let problem = without_type_names(format!("invalid YAML: {error}"));
        ConfigError::new(origin, "(document)", problem)
    };
    // Read straight into the file format, a syntax error further on would go unseen.
    if serde_yaml::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return document();
    }
    let direct: Result<T, _> =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text));
    match direct.map_err(|e| path_error(origin, e)) {
        Err(e) if e.key != "(document)" && is_about_a_value(&e.problem) => e,
        _ => document(),
    }
}

/// serde's words for a value or key that is wrong (rather than YAML syntax).
fn is_about_a_value(problem: &str) -> bool {
    ["invalid ", "duplicate ", "unknown field", "missing field"]
        .iter()
        .any(|prefix| problem.starts_with(prefix))
}

fn path_error(origin: &str, e: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
    let path = e.path().to_string();
    let problem = e.into_inner().to_string();
    // Read straight from the text, serde_yaml puts (part of) the path in front of the message.
    let problem = path
        .match_indices('.')
        .map(|(i, _)| &path[..i])
        .chain([path.as_str()])
        .find_map(|prefix| problem.strip_prefix(&format!("{prefix}: ")))
        .map_or(problem.clone(), str::to_string);
    let problem = without_type_names(problem);
    ConfigError::new(origin, error_key(&path, &problem), problem)
}

/// serde names the Rust type a value is read into ("expected struct RawRateLimit", "expected
/// u32", "invalid type: unit value"), which means nothing to an operator: a section is a
/// mapping of keys, a number has a range, and YAML's empty value is `null`.
pub(crate) fn without_type_names(problem: String) -> String {
    let mut problem = match problem.split_once("expected struct ") {
        Some((before, rest)) => {
            let after = rest.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_');
            format!("{before}expected a mapping (`key: value` lines){after}")
        }
        None => problem,
    };
    if let Some((before, rest)) = problem.split_once("expected ") {
        let name_len = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        let plain = match &rest[..name_len] {
            "u8" => Some("a whole number from 0 to 255"),
            "u16" => Some("a whole number from 0 to 65535"),
            "u32" => Some("a whole number from 0 to 4294967295"),
            "u64" | "usize" => Some("a whole number of at least 0"),
            "i8" | "i16" | "i32" | "i64" | "isize" => Some("a whole number"),
            "f32" | "f64" => Some("a number"),
            _ => None,
        };
        if let Some(plain) = plain {
            problem = format!("{before}expected {plain}{}", &rest[name_len..]);
        }
    }
    let wide = ["` as u128", "` as i128"]
        .into_iter()
        .find(|w| problem.contains(w));
    if let Some((before, rest)) = wide.and_then(|w| problem.split_once(w)) {
        // A number beyond 64 bits: its size, not its type, is the problem.
        let before = before.replacen("invalid type: integer", "invalid value: integer", 1);
        let rest = rest.replacen(", expected any YAML value", ", too large", 1);
        problem = format!("{before}`{rest}");
    }
    problem
        .replace("invalid type: unit value", "invalid type: null")
        .replace("expected field identifier", "expected a key name")
}

/// The key an error is about. serde reports a missing or repeated field at its parent, so the
/// field's name is taken from the message; a key that is not a name (`1: x`) is reported at its
/// mapping.
fn error_key(path: &str, problem: &str) -> String {
    let path = path.trim_end_matches('?').trim_end_matches('.');
    let field = [
        "missing field `",
        "duplicate field `",
        "duplicate entry with key \"",
    ]
    .iter()
    .find_map(|prefix| problem.strip_prefix(prefix))
    .and_then(|rest| rest.split(['`', '"']).next());
    match (path, field) {
        ("", Some(field)) => field.to_string(),
        ("", None) => "(document)".to_string(),
        (parent, Some(field)) => format!("{parent}.{field}"),
        (parent, None) => parent.to_string(),
    }
}

struct Builder<'a> {
    origin: &'a str,
    env: &'a dyn EnvSource,
}

impl Builder<'_> {
    fn err(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.origin, key, problem)
    }

    fn build(&self, raw: raw::RawConfig) -> Result<Config, ConfigError> {
        env::check_unicode(self.env)?;
        let server = pingora_section::build(raw.pingora, self.origin)?;
        let listen = self.listen(&raw.listen)?;
        let upstream = self.upstream(raw.upstream)?;
        let gatekeeper = self.gatekeeper(raw.gatekeeper)?;
        let rate_limit = self.rate_limit(raw.rate_limit)?;
        let trusted_proxies = self.cidrs("trusted_proxies", &raw.trusted_proxies)?;
        // The file's list is checked even when the environment replaces it: `-t` vouches for
        // the file, which may be used without that variable later.
        let file_blocklist = self.cidrs("ip_blocklist", &raw.ip_blocklist)?;
        let ip_blocklist = env::cidrs(self.env, "IP_BLACKLIST")?.unwrap_or(file_blocklist);
        let admin = self.admin(raw.admin, &listen)?;
        let store = self.store(raw.store)?;
        let secrets = Secrets {
            proxy_key: env::client_secret(self.env, "PROXY_KEY")?,
            admin_key: env::client_secret(self.env, "ADMIN_KEY")?,
        };
        check_secrets(&gatekeeper, &store, &secrets)?;
        let mut warnings = env::not_read_warnings(self.env);
        if admin.allow.as_ref().is_some_and(CidrSet::is_empty) {
            let setting = match self.env.var("ADMIN_WHITELIST") {
                Some(_) => "environment: ADMIN_WHITELIST".to_string(),
                None => format!("{}: admin.allow", self.origin),
            };
            warnings.push(format!(
                "{setting} is set but empty: no admin requests will be allowed \
                 (/admin/* and /metrics answer 403)"
            ));
        }
        Ok(Config {
            source: PathBuf::from(self.origin),
            server,
            listen,
            upstream,
            gatekeeper,
            rate_limit,
            trusted_proxies,
            ip_blocklist,
            admin,
            store,
            access_log: self.access_log(&raw.access_log)?,
            cors: raw.cors.enabled,
            clients: self.clients(&raw.clients)?,
            secrets,
            warnings,
        })
    }

    fn clients(&self, raw: &raw::RawClients) -> Result<ClientsConfig, ConfigError> {
        let seconds = raw.keepalive_timeout_seconds;
        at_most_a_year(self.origin, "clients.keepalive_timeout_seconds", seconds)?;
        let header = raw.header_timeout_seconds;
        at_most_a_year(self.origin, "clients.header_timeout_seconds", header)?;
        let body = raw.body_timeout_seconds;
        at_most_a_year(self.origin, "clients.body_timeout_seconds", body)?;
        let send = raw.send_timeout_seconds;
        at_most_a_year(self.origin, "clients.send_timeout_seconds", send)?;
        Ok(ClientsConfig {
            keepalive_timeout_seconds: seconds,
            tcp_keepalive: raw.tcp_keepalive,
            header_timeout: (header > 0).then(|| Duration::from_secs(header)),
            body_timeout: (body > 0).then(|| Duration::from_secs(body)),
            send_timeout: (send > 0).then(|| Duration::from_secs(send)),
            max_connections_per_ip: raw.max_connections_per_ip,
            max_body_bytes: (raw.max_body_bytes > 0).then_some(raw.max_body_bytes),
        })
    }

    fn access_log(&self, raw: &raw::RawAccessLog) -> Result<Option<AccessLogConfig>, ConfigError> {
        let path = match raw.path.as_deref() {
            Some("") => return Err(self.err("access_log.path", "must not be empty")),
            Some(path) => Some(PathBuf::from(path)),
            None => None,
        };
        Ok(raw.enabled.then_some(AccessLogConfig { path }))
    }

    fn listen(&self, entries: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
        if entries.is_empty() {
            return Err(self.err("listen", "at least one address is required"));
        }
        let addrs: Vec<SocketAddr> = entries
            .iter()
            .enumerate()
            .map(|(i, entry)| self.socket_addr(&format!("listen[{i}]"), entry))
            .collect::<Result<_, _>>()?;
        let named: Vec<(String, SocketAddr)> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("listen[{i}]"), *a))
            .collect();
        self.check_overlaps(&named)?;
        Ok(addrs)
    }

    /// Two listeners on one socket pass load but make Pingora's bind panic its thread while
    /// the process stays up; refused here, naming the later key and the one it collides with.
    fn check_overlaps(&self, listeners: &[(String, SocketAddr)]) -> Result<(), ConfigError> {
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if let Some((earlier_key, earlier)) = listeners[..i]
                .iter()
                .find(|(_, other)| crate::net::listeners_overlap(*addr, *other))
            {
                let problem = if addr == earlier {
                    format!("{addr} is also {earlier_key}; every listener needs its own address")
                } else {
                    format!(
                        "{addr} overlaps {earlier_key} ({earlier}): a wildcard address \
                         (0.0.0.0, or [::] which may also take IPv4) covers every address \
                         on its port; every listener needs its own address"
                    )
                };
                return Err(self.err(key.as_str(), problem));
            }
        }
        Ok(())
    }

    fn socket_addr(&self, key: &str, entry: &str) -> Result<SocketAddr, ConfigError> {
        entry.parse().map_err(|_| {
            self.err(
                key,
                format!("'{entry}' is not an IP:port address (e.g. 0.0.0.0:7860)"),
            )
        })
    }

    fn upstream(&self, raw: raw::RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        if raw.addrs.is_empty() {
            return Err(self.err("upstream.addrs", "at least one address is required"));
        }
        let mut addrs = Vec::new();
        for (i, entry) in raw.addrs.iter().enumerate() {
            let key = format!("upstream.addrs[{i}]");
            let resolved = self.resolve(&key, entry)?;
            let (host, port) = host_and_port(entry).expect("resolve checked host:port");
            let is_ip = host.parse::<std::net::IpAddr>().is_ok();
            let sni = if !raw.tls {
                String::new()
            } else if !raw.sni.is_empty() {
                raw.sni.clone()
            } else if is_ip {
                return Err(self.err(
                    "upstream.sni",
                    format!("required when tls is true and {key} is an IP address"),
                ));
            } else {
                host.to_string()
            };
            if raw.tls {
                let from = if raw.sni.is_empty() {
                    key.as_str()
                } else {
                    "upstream.sni"
                };
                self.server_name(from, &sni)?;
            }
            let default_port = if raw.tls { 443 } else { 80 };
            let bracketed = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            let authority = if port == default_port {
                bracketed
            } else {
                format!("{bracketed}:{port}")
            };
            let host_header = HeaderValue::from_str(&authority)
                .map_err(|_| self.err(&key, format!("'{entry}' is not a valid host")))?;
            addrs.extend(resolved.into_iter().map(|addr| UpstreamAddr {
                addr,
                sni: sni.clone(),
                host: host_header.clone(),
            }));
        }
        for (key, value) in [
            ("upstream.connect_timeout_ms", raw.connect_timeout_ms),
            ("upstream.read_timeout_ms", raw.read_timeout_ms),
            ("upstream.idle_timeout_ms", raw.idle_timeout_ms),
        ] {
            if value == 0 {
                return Err(self.err(key, "must be greater than 0"));
            }
            at_most_a_year_ms(self.origin, key, value)?;
        }
        Ok(UpstreamConfig {
            addrs,
            tls: raw.tls,
            verify_cert: raw.verify_cert,
            set_headers: self.set_headers(&raw.set_headers)?,
            preserve_host: raw.preserve_host,
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
            read_timeout: Duration::from_millis(raw.read_timeout_ms),
            idle_timeout: Duration::from_millis(raw.idle_timeout_ms),
        })
    }

    /// Resolves `host:port` now, so a typo fails at load instead of panicking in Pingora.
    fn resolve(&self, key: &str, entry: &str) -> Result<Vec<SocketAddr>, ConfigError> {
        // A URL would otherwise be looked up as a host name ("http://api.example.com") and
        // reported as a name that does not resolve.
        if let Some((scheme, _)) = entry.split_once("://") {
            let tls = if scheme.eq_ignore_ascii_case("https") {
                ", and upstream.tls: true for https"
            } else {
                ""
            };
            return Err(self.err(
                key,
                format!("'{entry}' is a URL; write host:port (e.g. api.example.com:443){tls}"),
            ));
        }
        match host_and_port(entry) {
            None => return Err(self.err(key, format!("'{entry}' is not host:port"))),
            Some((_, 0)) => {
                return Err(self.err(key, format!("'{entry}': port 0 cannot be connected to")))
            }
            Some(_) => {}
        }
        let resolved: Vec<SocketAddr> = entry
            .to_socket_addrs()
            .map_err(|e| self.err(key, format!("cannot resolve '{entry}': {e}")))?
            .collect();
        if resolved.is_empty() {
            return Err(self.err(key, format!("'{entry}' resolved to no address")));
        }
        Ok(resolved)
    }

    /// A TLS server name rustls takes (a DNS name or an IP address): Pingora checks it only
    /// when connecting, so a bad one passed load and then failed every request with 502.
    fn server_name(&self, key: &str, sni: &str) -> Result<(), ConfigError> {
        rustls::pki_types::ServerName::try_from(sni)
            .map(drop)
            .map_err(|_| {
                self.err(
                    key,
                    format!("'{sni}' is not a TLS server name (a DNS name or an IP address)"),
                )
            })
    }

    fn set_headers(
        &self,
        raw: &std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
        raw.iter()
            .map(|(name, template)| {
                let key = format!("upstream.set_headers.{name}");
                let header = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| self.err(&key, "not a valid HTTP header name"))?;
                let value = env::interpolate(self.env, template).map_err(|p| self.err(&key, p))?;
                let mut value = HeaderValue::from_str(&value).map_err(|_| {
                    self.err(&key, "value contains characters not allowed in a header")
                })?;
                value.set_sensitive(true);
                Ok((header, value))
            })
            .collect()
    }

    fn gatekeeper(&self, raw: raw::RawGatekeeper) -> Result<GatekeeperConfig, ConfigError> {
        // The file's value is checked even when the environment overrides it.
        let file_mode = GatekeeperMode::parse(&raw.mode).ok_or_else(|| {
            self.err(
                "gatekeeper.mode",
                format!("'{}' is not one of none, proxy_key, user_token", raw.mode),
            )
        })?;
        let mode = match env::string(self.env, "GATEKEEPER") {
            Some(value) => GatekeeperMode::parse(&value).ok_or_else(|| {
                env::error(
                    "GATEKEEPER",
                    format!("'{value}' is not one of none, proxy_key, user_token"),
                )
            })?,
            None => file_mode,
        };
        Ok(GatekeeperConfig {
            mode,
            max_ips_per_user: env::parsed(
                self.env,
                "MAX_IPS_PER_USER",
                "a whole number from 0 to 4294967295",
            )?
            .unwrap_or(raw.max_ips_per_user),
            max_ips_auto_ban: env::boolean(self.env, "MAX_IPS_AUTO_BAN")?
                .unwrap_or(raw.max_ips_auto_ban),
            max_recorded_ips: raw.max_recorded_ips,
        })
    }

    fn rate_limit(&self, raw: raw::RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
        if !(1024..=(1 << 24)).contains(&raw.estimator_slots) {
            return Err(self.err(
                "rate_limit.estimator_slots",
                "must be between 1024 and 16777216",
            ));
        }
        if !(1..=3600).contains(&raw.window_seconds) {
            return Err(self.err("rate_limit.window_seconds", "must be between 1 and 3600"));
        }
        let config = RateLimitConfig {
            window: Duration::from_secs(raw.window_seconds),
            requests_per_minute: raw.requests_per_minute,
            max_inflight: raw.max_inflight,
            auth_failures_per_minute: raw.auth_failures_per_minute,
            estimator_slots: raw.estimator_slots,
        };
        for (key, per_minute) in [
            ("rate_limit.requests_per_minute", config.requests_per_minute),
            (
                "rate_limit.auth_failures_per_minute",
                config.auth_failures_per_minute,
            ),
        ] {
            // A window holds a whole number of events: a rate too small for the window would
            // be rounded up, e.g. 1 per minute in windows of 1 s allows 60 per minute.
            // Exactly (allowed per minute = per_window × 60 / window, more than 1.1 × the
            // rate is refused): rounding the allowed rate down first let 30 per minute in 9 s
            // windows (33.3 per minute) through.
            let per_window = config.per_window(per_minute);
            let tenths = u64::from(per_window) * 600 / raw.window_seconds;
            let allowed = match tenths % 10 {
                0 => format!("{}", tenths / 10),
                tenth => format!("{}.{tenth}", tenths / 10),
            };
            if u64::from(per_window) * 600 > u64::from(per_minute) * 11 * raw.window_seconds {
                return Err(self.err(
                    key,
                    format!(
                        "{per_minute} per minute cannot be kept in windows of {} s: each window \
                         would allow {per_window}, {allowed} per minute; use a longer \
                         rate_limit.window_seconds (60 keeps any rate exact)",
                        raw.window_seconds
                    ),
                ));
            }
        }
        Ok(config)
    }

    fn cidrs(&self, key: &str, entries: &[String]) -> Result<CidrSet, ConfigError> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                CidrSet::parse_entry(e)
                    .map_err(|err| self.err(format!("{key}[{i}]"), err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(CidrSet::new)
    }

    fn admin(
        &self,
        raw: raw::RawAdmin,
        proxy_listen: &[SocketAddr],
    ) -> Result<AdminConfig, ConfigError> {
        let listen = self.socket_addr("admin.listen", &raw.listen)?;
        // The admin listener comes last, so a collision is reported at `admin.listen`.
        let mut listeners: Vec<(String, SocketAddr)> = proxy_listen
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("listen[{i}]"), *a))
            .collect();
        listeners.push(("admin.listen".to_string(), listen));
        self.check_overlaps(&listeners)?;
        let file_allow = raw
            .allow
            .as_deref()
            .map(|entries| self.cidrs("admin.allow", entries))
            .transpose()?;
        let allow = env::explicit_cidrs(self.env, "ADMIN_WHITELIST")?.or(file_allow);
        if raw.max_body_bytes == 0 {
            return Err(self.err("admin.max_body_bytes", "must be greater than 0"));
        }
        if raw.lockout_after_failures == 0 {
            return Err(self.err("admin.lockout_after_failures", "must be at least 1"));
        }
        if raw.body_read_timeout_ms == 0 {
            return Err(self.err("admin.body_read_timeout_ms", "must be greater than 0"));
        }
        // 0 would forget every failure at once (no lockout at all) or answer every write 202.
        if raw.lockout_seconds == 0 {
            return Err(self.err(
                "admin.lockout_seconds",
                "must be at least 1 (0 would disable the lockout)",
            ));
        }
        at_most_a_year(self.origin, "admin.lockout_seconds", raw.lockout_seconds)?;
        if raw.persist_timeout_ms == 0 {
            return Err(self.err(
                "admin.persist_timeout_ms",
                "must be at least 1 (0 would answer every write before the store confirms it)",
            ));
        }
        for (key, ms) in [
            ("admin.body_read_timeout_ms", raw.body_read_timeout_ms),
            ("admin.persist_timeout_ms", raw.persist_timeout_ms),
        ] {
            at_most_a_year_ms(self.origin, key, ms)?;
        }
        let trusted_proxies = self.cidrs("admin.trusted_proxies", &raw.trusted_proxies)?;
        Ok(AdminConfig {
            listen,
            allow,
            trusted_proxies,
            max_body_bytes: raw.max_body_bytes,
            body_read_timeout: Duration::from_millis(raw.body_read_timeout_ms),
            persist_timeout: Duration::from_millis(raw.persist_timeout_ms),
            lockout_after_failures: raw.lockout_after_failures,
            lockout: Duration::from_secs(raw.lockout_seconds),
        })
    }

    fn store(&self, raw: raw::RawStore) -> Result<StoreConfig, ConfigError> {
        // The file's value is checked even when the environment overrides it.
        let file_kind = StoreKind::parse(&raw.kind).ok_or_else(|| {
            self.err(
                "store.kind",
                format!("'{}' is not one of memory, sqlite, firebase_rtdb", raw.kind),
            )
        })?;
        let kind = match env::string(self.env, "GATEKEEPER_STORE") {
            Some(value) => StoreKind::parse(&value).ok_or_else(|| {
                env::error(
                    "GATEKEEPER_STORE",
                    format!("'{value}' is not one of memory, sqlite, firebase_rtdb"),
                )
            })?,
            None => file_kind,
        };
        if raw.flush_interval_seconds == 0 {
            return Err(self.err("store.flush_interval_seconds", "must be at least 1"));
        }
        at_most_a_year(
            self.origin,
            "store.flush_interval_seconds",
            raw.flush_interval_seconds,
        )?;
        if raw.sqlite.path.trim().is_empty() {
            return Err(self.err("store.sqlite.path", "must not be empty"));
        }
        let fb = raw.firebase;
        if fb.startup_timeout_seconds == 0 {
            return Err(self.err(
                "store.firebase.startup_timeout_seconds",
                "must be at least 1",
            ));
        }
        if fb.keepalive_timeout_seconds == 0 {
            return Err(self.err(
                "store.firebase.keepalive_timeout_seconds",
                "must be at least 1",
            ));
        }
        for (key, seconds) in [
            (
                "store.firebase.startup_timeout_seconds",
                fb.startup_timeout_seconds,
            ),
            (
                "store.firebase.keepalive_timeout_seconds",
                fb.keepalive_timeout_seconds,
            ),
        ] {
            at_most_a_year(self.origin, key, seconds)?;
        }
        let purge_hours = env::parsed(
            self.env,
            "POW_TOKEN_PURGE_HOURS",
            "a whole number of at least 0",
        )?
        .unwrap_or(fb.temporary_user_purge_hours);
        Ok(StoreConfig {
            kind,
            flush_interval: Duration::from_secs(raw.flush_interval_seconds),
            sqlite_path: PathBuf::from(raw.sqlite.path),
            firebase: FirebaseConfig {
                rtdb_url: env::string(self.env, "FIREBASE_RTDB_URL"),
                key: env::secret(self.env, "FIREBASE_KEY"),
                users_ref: env::string(self.env, "FIREBASE_USERS_REF_NAME")
                    .unwrap_or_else(|| "users".into()),
                emulator_host: env::string(self.env, "FIREBASE_DATABASE_EMULATOR_HOST"),
                startup_timeout: Duration::from_secs(fb.startup_timeout_seconds),
                keepalive_timeout: Duration::from_secs(fb.keepalive_timeout_seconds),
                temporary_user_purge: Duration::from_secs(purge_hours.saturating_mul(3600)),
            },
        })
    }
}

/// Startup refuses a mode whose secret is missing, with one line naming the variable.
fn check_secrets(
    gatekeeper: &GatekeeperConfig,
    store: &StoreConfig,
    secrets: &Secrets,
) -> Result<(), ConfigError> {
    if gatekeeper.mode == GatekeeperMode::ProxyKey && secrets.proxy_key.is_none() {
        return Err(env::error(
            "PROXY_KEY",
            "must be set when the gatekeeper mode is proxy_key",
        ));
    }
    if gatekeeper.mode == GatekeeperMode::UserToken && secrets.admin_key.is_none() {
        return Err(env::error(
            "ADMIN_KEY",
            "must be set when the gatekeeper mode is user_token",
        ));
    }
    if store.kind == StoreKind::FirebaseRtdb {
        if store.firebase.rtdb_url.is_none() {
            return Err(env::error(
                "FIREBASE_RTDB_URL",
                "must be set when the store is firebase_rtdb",
            ));
        }
        // A local emulator takes `Bearer owner` (as the Firebase tools send), not a key.
        if store.firebase.key.is_none() && store.firebase.emulator_host.is_none() {
            return Err(env::error(
                "FIREBASE_KEY",
                "must be set when the store is firebase_rtdb",
            ));
        }
    }
    Ok(())
}

/// `host:port` (`[v6]:port` for IPv6) split into the host, without brackets, and the port.
fn host_and_port(entry: &str) -> Option<(&str, u16)> {
    let (host, port) = entry.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((host, port))
}

/// Every key of the file format with its default, as dotted paths (`upstream.read_timeout_ms`);
/// the `pingora` section is Pingora's and listed separately by Pingora.
pub fn known_keys() -> Vec<String> {
    let defaults: raw::RawConfig =
        parse_yaml("upstream: {addrs: [\"127.0.0.1:1\"]}", "defaults").expect("defaults parse");
    let value = serde_yaml::to_value(defaults).expect("the file format serializes");
    let mut keys = Vec::new();
    collect_keys(&value, "", &mut keys);
    keys
}

fn collect_keys(value: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    let Some(map) = value.as_mapping() else {
        return;
    };
    for (key, child) in map {
        let Some(key) = key.as_str() else { continue };
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        if key != "pingora" {
            out.push(path.clone());
            collect_keys(child, &path, out);
        }
    }
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
