//! Secrets from the environment: never printed, compared in constant time.

use std::fmt;

use subtle::ConstantTimeEq;

/// A secret string (`ADMIN_KEY`, `PROXY_KEY`, …). `Debug` and `Display` are redacted so a
/// secret cannot reach a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a non-empty value; an empty value counts as "not set", as in the older proxy.
    pub fn new(value: impl Into<String>) -> Option<Self> {
        let value = value.into();
        if value.is_empty() {
            None
        } else {
            Some(Self(value.into_boxed_str()))
        }
    }

    /// Constant-time comparison: the time taken does not depend on where the first differing
    /// byte is, so the key cannot be guessed byte by byte. Only the length can leak.
    #[inline]
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }

    /// The raw value, for the few places that must send it (e.g. an upstream header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Constant-time byte comparison (length is not secret).
#[inline]
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_unset() {
        assert!(Secret::new("").is_none());
    }

    #[test]
    fn matches_only_exact_value() {
        let s = Secret::new("hunter2").unwrap();
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!s.matches("hunter2 "));
        assert!(!s.matches(""));
    }

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
