//! Database paths and key validation.
//!
//! A [`DbPath`] is a sequence of validated keys. Keys follow the RTDB limits: non-empty, at
//! most 768 bytes of UTF-8, none of `. $ # [ ] /`, no ASCII control characters; a location is
//! at most 32 levels deep.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 768;
/// Deepest location, in keys from the root.
pub const MAX_DEPTH: usize = 32;

/// Why a key or path was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A key was empty.
    #[error("key is empty")]
    EmptyKey,
    /// A key contained `. $ # [ ] /` or an ASCII control character.
    #[error("key {0:?} contains an illegal character")]
    IllegalCharacter(String),
    /// A key was longer than [`MAX_KEY_BYTES`].
    #[error("key is longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong,
    /// The path was deeper than [`MAX_DEPTH`].
    #[error("path is deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A percent-encoded segment did not decode to UTF-8.
    #[error("path segment is not valid UTF-8 after percent-decoding")]
    BadEncoding,
}

/// Checks one key against the RTDB key rules.
pub fn validate_key(key: &str) -> Result<(), PathError> {
    if key.is_empty() {
        return Err(PathError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(PathError::KeyTooLong);
    }
    let illegal = |c: char| matches!(c, '.' | '$' | '#' | '[' | ']' | '/') || c.is_ascii_control();
    if key.chars().any(illegal) {
        return Err(PathError::IllegalCharacter(key.to_owned()));
    }
    Ok(())
}

/// A validated location in the database; the empty path is the root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DbPath(Vec<String>);

impl DbPath {
    /// The root location.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Parses a plain (not percent-encoded) `/`-separated path. Empty segments are skipped,
    /// so `""`, `"/"` and `"//"` are all the root.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        Self::from_segments(text.split('/').filter(|s| !s.is_empty()).map(str::to_owned))
    }

    /// Parses the path part of a URL (without `.json`), percent-decoding each segment.
    pub fn from_url_path(raw: &str) -> Result<Self, PathError> {
        let segments = raw
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| PathError::BadEncoding)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_segments(segments)
    }

    fn from_segments(segments: impl IntoIterator<Item = String>) -> Result<Self, PathError> {
        let keys: Vec<String> = segments.into_iter().collect();
        if keys.len() > MAX_DEPTH {
            return Err(PathError::TooDeep);
        }
        keys.iter().try_for_each(|k| validate_key(k))?;
        Ok(Self(keys))
    }

    /// The keys from the root down.
    pub fn keys(&self) -> &[String] {
        &self.0
    }

    /// Number of keys; 0 for the root.
    pub fn depth(&self) -> usize {
        self.0.len()
    }

    /// True for the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// This path followed by `rel`.
    pub fn join(&self, rel: &DbPath) -> DbPath {
        let mut keys = self.0.clone();
        keys.extend(rel.0.iter().cloned());
        DbPath(keys)
    }

    /// This path followed by one (already validated) key.
    pub fn child(&self, key: &str) -> DbPath {
        let mut keys = self.0.clone();
        keys.push(key.to_owned());
        DbPath(keys)
    }

    /// The path without its last key, or `None` for the root.
    pub fn parent(&self) -> Option<DbPath> {
        let (_, init) = self.0.split_last()?;
        Some(DbPath(init.to_vec()))
    }

    /// The last key, or `None` for the root.
    pub fn last(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }

    /// True if `self` is `other` or one of its ancestors.
    pub fn contains(&self, other: &DbPath) -> bool {
        other.0.starts_with(&self.0)
    }

    /// True if `self` is a proper ancestor of `other`.
    pub fn is_strict_ancestor_of(&self, other: &DbPath) -> bool {
        self.0.len() < other.0.len() && self.contains(other)
    }

    /// `self` relative to `base`, if `base` contains `self`.
    pub fn relative_to(&self, base: &DbPath) -> Option<DbPath> {
        self.0
            .strip_prefix(base.0.as_slice())
            .map(|rest| DbPath(rest.to_vec()))
    }

    /// The keys joined by `/` without a leading slash (`""` for the root); the form used
    /// for multi-path PATCH keys.
    pub fn to_key(&self) -> String {
        self.0.join("/")
    }
}

impl fmt::Display for DbPath {
    /// `/a/b`, or `/` for the root.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        assert_eq!(DbPath::parse("").unwrap(), DbPath::root());
        assert_eq!(DbPath::parse("//").unwrap(), DbPath::root());
        let p = DbPath::parse("/users//abc/").unwrap();
        assert_eq!(p.keys(), ["users", "abc"]);
        assert_eq!(p.to_string(), "/users/abc");
        assert_eq!(DbPath::root().to_string(), "/");
    }

    #[test]
    fn rejects_illegal_keys() {
        for bad in ["a.b", "a$", "#", "[x", "x]", "a\u{7}", "\u{7f}"] {
            assert!(
                matches!(validate_key(bad), Err(PathError::IllegalCharacter(_))),
                "{bad:?}"
            );
        }
        assert_eq!(validate_key(""), Err(PathError::EmptyKey));
        assert_eq!(
            validate_key(&"é".repeat(385)),
            Err(PathError::KeyTooLong),
            "770 bytes"
        );
        assert!(validate_key(&"x".repeat(768)).is_ok());
        assert!(validate_key("ünïcødé-_ ~!@%^&*()").is_ok());
    }

    #[test]
    fn limits_depth() {
        let ok = vec!["k"; MAX_DEPTH].join("/");
        assert!(DbPath::parse(&ok).is_ok());
        assert_eq!(DbPath::parse(&format!("{ok}/k")), Err(PathError::TooDeep));
    }

    #[test]
    fn percent_decodes_url_segments() {
        let p = DbPath::from_url_path("/users/a%20b").unwrap();
        assert_eq!(p.keys(), ["users", "a b"]);
        assert!(matches!(
            DbPath::from_url_path("/a%2Fb"),
            Err(PathError::IllegalCharacter(_))
        ));
        assert_eq!(DbPath::from_url_path("/%FF"), Err(PathError::BadEncoding));
        // A malformed escape is kept literally rather than panicking.
        assert_eq!(DbPath::from_url_path("/%zz").unwrap().keys(), ["%zz"]);
    }

    #[test]
    fn relations() {
        let a = DbPath::parse("a").unwrap();
        let ab = DbPath::parse("a/b").unwrap();
        assert!(a.contains(&ab) && a.contains(&a) && !ab.contains(&a));
        assert!(a.is_strict_ancestor_of(&ab) && !a.is_strict_ancestor_of(&a));
        assert_eq!(ab.relative_to(&a).unwrap().to_key(), "b");
        assert_eq!(a.relative_to(&ab), None);
        assert_eq!(ab.parent().unwrap(), a);
        assert_eq!(DbPath::root().join(&ab), ab);
    }
}
