//! Environment variables, under the older proxy's names. An empty value counts as unset.

use std::collections::HashMap;

use super::ConfigError;
use crate::net::CidrSet;
use crate::secret::Secret;

/// Where environment variables come from (the process, or a map in tests).
pub trait EnvSource {
    /// The value, `None` when unset (or not UTF-8: see [`EnvSource::is_not_unicode`]).
    fn var(&self, name: &str) -> Option<String>;
    /// Whether the variable is set to bytes that are not UTF-8 (only a real environment can).
    fn is_not_unicode(&self, _name: &str) -> bool {
        false
    }
    /// Every variable name (to find the older proxy's `TOKEN_QUOTA_<FAMILY>` family).
    fn names(&self) -> Vec<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn is_not_unicode(&self, name: &str) -> bool {
        matches!(std::env::var(name), Err(std::env::VarError::NotUnicode(_)))
    }

    fn names(&self) -> Vec<String> {
        std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect()
    }
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

pub(super) fn error(name: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new("environment", name, problem)
}

/// Every variable tollgate reads (besides `RUST_LOG` and `${NAME}` references).
pub(super) const READ: &[&str] = &[
    "ADMIN_KEY",
    "PROXY_KEY",
    "GATEKEEPER",
    "GATEKEEPER_STORE",
    "MAX_IPS_PER_USER",
    "MAX_IPS_AUTO_BAN",
    "IP_BLACKLIST",
    "ADMIN_WHITELIST",
    "POW_TOKEN_PURGE_HOURS",
    "FIREBASE_RTDB_URL",
    "FIREBASE_KEY",
    "FIREBASE_USERS_REF_NAME",
    "FIREBASE_DATABASE_EMULATOR_HOST",
];

/// A variable set to bytes that are not UTF-8 read as unset: `GATEKEEPER=user_token` with a
/// stray byte ran the file's mode (by default `none`, an open proxy), an `ADMIN_KEY` was
/// dropped. Refused instead, naming the variable and never the value.
pub(super) fn check_unicode(env: &dyn EnvSource) -> Result<(), ConfigError> {
    match READ.iter().find(|name| env.is_not_unicode(name)) {
        Some(name) => Err(not_unicode(name)),
        None => Ok(()),
    }
}

fn not_unicode(name: &str) -> ConfigError {
    error(name, "is not valid UTF-8 text")
}

/// The value as the older proxy read it where that matters: it JSON-parsed every variable, so a
/// value in double quotes (`ADMIN_KEY="k"`: `docker run --env-file` and some hosting dashboards
/// keep the quotes) meant the string inside. Anything else is taken as it is (an all-digit key
/// stays a string, not a number).
fn unquoted(env: &dyn EnvSource, name: &str) -> Option<String> {
    let value = env.var(name)?;
    let trimmed = value.trim();
    if trimmed.len() >= 2 && trimmed.starts_with('"') && trimmed.ends_with('"') {
        if let Ok(inner) = serde_json::from_str::<String>(trimmed) {
            return Some(inner);
        }
    }
    Some(value)
}

/// A non-empty, trimmed value.
pub(super) fn string(env: &dyn EnvSource, name: &str) -> Option<String> {
    unquoted(env, name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Secrets are taken verbatim (not trimmed, never parsed as a number: an all-digit key stays a
/// key), except for the double quotes the older proxy removed.
pub(super) fn secret(env: &dyn EnvSource, name: &str) -> Option<Secret> {
    unquoted(env, name).and_then(Secret::new)
}

/// A secret that clients present (`ADMIN_KEY`, `PROXY_KEY`). Presented keys are trimmed, so a
/// key with leading or trailing whitespace (`"abc "`, a newline from an env file) could never
/// match: refused at load, naming the variable but never the value.
pub(super) fn client_secret(
    env: &dyn EnvSource,
    name: &str,
) -> Result<Option<Secret>, ConfigError> {
    let value = unquoted(env, name).unwrap_or_default();
    if value.trim() != value {
        return Err(error(
            name,
            "has leading or trailing whitespace (e.g. a newline from an env file); \
             presented keys are trimmed, so it could never match: remove the whitespace",
        ));
    }
    Ok(Secret::new(value))
}

pub(super) fn parsed<T: std::str::FromStr>(
    env: &dyn EnvSource,
    name: &str,
    expected: &str,
) -> Result<Option<T>, ConfigError> {
    string(env, name)
        .map(|v| {
            v.parse()
                .map_err(|_| error(name, format!("expected {expected}, got '{v}'")))
        })
        .transpose()
}

/// `true`/`false`/`1`/`0`/`yes`/`no`, case-insensitive.
pub(super) fn boolean(env: &dyn EnvSource, name: &str) -> Result<Option<bool>, ConfigError> {
    string(env, name)
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(error(
                name,
                format!("expected true or false (or 1 or 0, yes or no), got '{v}'"),
            )),
        })
        .transpose()
}

/// A comma-separated CIDR list.
pub(super) fn cidrs(env: &dyn EnvSource, name: &str) -> Result<Option<CidrSet>, ConfigError> {
    string(env, name)
        .map(|v| CidrSet::parse_csv(&v).map_err(|e| error(name, e.to_string())))
        .transpose()
}

/// A comma-separated CIDR list where an explicitly empty value (`""`, `","`) is an empty list,
/// not "unset": the older proxy allowed no admin requests with an empty `ADMIN_WHITELIST`.
/// `None` only when the variable is absent. Double quotes are removed as for every variable.
pub(super) fn explicit_cidrs(
    env: &dyn EnvSource,
    name: &str,
) -> Result<Option<CidrSet>, ConfigError> {
    unquoted(env, name)
        .map(|v| CidrSet::parse_csv(&v).map_err(|e| error(name, e.to_string())))
        .transpose()
}

/// The older proxy's variables that tollgate does not read, each with what to use instead.
const NOT_READ: &[(&str, &str)] = &[
    ("TRUSTED_PROXIES", "set `trusted_proxies` in the configuration file (a CIDR list of your proxies, not a hop count)"),
    ("TEXT_MODEL_RATE_LIMIT", "set `rate_limit.requests_per_minute` in the configuration file"),
    ("IMAGE_MODEL_RATE_LIMIT", "set `rate_limit.requests_per_minute` in the configuration file"),
    ("MODEL_RATE_LIMIT", "set `rate_limit.requests_per_minute` in the configuration file"),
    ("USER_CONCURRENCY_LIMIT", "set `rate_limit.max_inflight` in the configuration file"),
    ("ALLOWED_MODEL_FAMILIES", "tollgate does not inspect models; it has no equivalent"),
    ("ALLOWED_VISION_SERVICES", "tollgate does not inspect models; it has no equivalent"),
    ("QUOTA_REFRESH_PERIOD", "per-family token quotas are not enforced by tollgate"),
    ("CAPTCHA_MODE", "the proof-of-work captcha is not carried over"),
    ("POW_TOKEN_HOURS", "the proof-of-work captcha is not carried over"),
    ("POW_TOKEN_MAX_IPS", "the proof-of-work captcha is not carried over; `gatekeeper.max_ips_per_user` limits IPs per user"),
    ("POW_DIFFICULTY_LEVEL", "the proof-of-work captcha is not carried over"),
    ("POW_CHALLENGE_TIMEOUT", "the proof-of-work captcha is not carried over"),
    ("ALLOW_NICKNAME_CHANGES", "tollgate has no user-facing pages; set `nickname` over the admin API"),
    ("SIGNING_KEY", "tollgate has no admin web UI or sessions; it has no equivalent"),
    ("COOKIE_SECRET", "tollgate has no admin web UI or sessions; it has no equivalent"),
    ("USE_INSECURE_COOKIES", "tollgate has no admin web UI or sessions; it has no equivalent"),
    ("EVENT_LOGGING", "/admin/events is not carried over; `access_log.enabled` logs each request"),
    ("SQLITE_DATA_PATH", "/admin/events is not carried over; the users' SQLite file is `store.sqlite.path`"),
    ("PROXY_ENDPOINT_ROUTE", "tollgate forwards every path unchanged; it has no equivalent"),
];

/// One warning per set variable of the older proxy that tollgate ignores, so a migrated env
/// file does not silently lose a setting. Names only: values may be secrets.
pub(super) fn not_read_warnings(env: &dyn EnvSource) -> Vec<String> {
    let mut warnings: Vec<String> = NOT_READ
        .iter()
        .filter(|(name, _)| string(env, name).is_some())
        .map(|(name, instead)| {
            format!("environment: {name} is set but not read by tollgate; {instead}")
        })
        .collect();
    let mut quotas: Vec<String> = env
        .names()
        .into_iter()
        .filter(|name| name.starts_with("TOKEN_QUOTA_") && string(env, name).is_some())
        .collect();
    quotas.sort();
    warnings.extend(quotas.into_iter().map(|name| {
        format!("environment: {name} is set but not read by tollgate; per-family token quotas are not enforced by tollgate")
    }));
    warnings
}

/// Replaces `${VAR}` with the variable's value. A missing variable is an error (naming the
/// variable, never the value), so a forgotten upstream key cannot silently send `Bearer `.
pub(super) fn interpolate(env: &dyn EnvSource, template: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${...} reference".to_string())?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "'${{{name}}}' is not a valid environment variable reference"
            ));
        }
        if env.is_not_unicode(name) {
            return Err(format!(
                "environment variable {name} is not valid UTF-8 text"
            ));
        }
        let value = env
            .var(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
