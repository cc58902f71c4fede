//! Environment variables, under the older proxy's names. An empty value counts as unset.

use std::collections::HashMap;

use super::ConfigError;
use crate::net::CidrSet;
use crate::secret::Secret;

/// Where environment variables come from (the process, or a map in tests).
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

pub(super) fn error(name: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new("environment", name, problem)
}

/// A non-empty, trimmed value.
pub(super) fn string(env: &dyn EnvSource, name: &str) -> Option<String> {
    env.var(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Secrets are taken verbatim (not trimmed, never JSON-parsed: an all-digit key stays a key).
pub(super) fn secret(env: &dyn EnvSource, name: &str) -> Option<Secret> {
    env.var(name).and_then(Secret::new)
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
            _ => Err(error(name, format!("expected true or false, got '{v}'"))),
        })
        .transpose()
}

/// A comma-separated CIDR list.
pub(super) fn cidrs(env: &dyn EnvSource, name: &str) -> Result<Option<CidrSet>, ConfigError> {
    string(env, name)
        .map(|v| CidrSet::parse_csv(&v).map_err(|e| error(name, e.to_string())))
        .transpose()
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
