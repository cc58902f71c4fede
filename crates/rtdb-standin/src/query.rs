//! Query-string parameters of database requests, and `orderBy="$key"` filtering.

use std::cmp::Ordering;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::path::DbPath;

/// The longest `timeout=` the service accepts.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A rejected query string; the message is returned as the 400 body's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

fn bad(msg: impl Into<String>) -> QueryError {
    QueryError(msg.into())
}

/// `print=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Print {
    /// Compact JSON.
    #[default]
    Compact,
    /// Indented JSON.
    Pretty,
    /// 204 with no body.
    Silent,
}

/// What `orderBy` named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderBy {
    /// `"$key"`: supported.
    Key,
    /// `"$value"`: rejected by the stand-in.
    Value,
    /// `"$priority"`: rejected by the stand-in.
    Priority,
    /// A child path: rejected as the real service does without `.indexOn` rules.
    Child(String),
}

/// `orderBy` plus its range and limit parameters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyRange {
    /// `startAt` (inclusive) or `startAfter` (exclusive) bound.
    pub start: Option<(String, bool)>,
    /// `endAt` (inclusive) or `endBefore` (exclusive) bound.
    pub end: Option<(String, bool)>,
    /// `equalTo`.
    pub equal: Option<String>,
    /// `limitToFirst`.
    pub first: Option<usize>,
    /// `limitToLast`.
    pub last: Option<usize>,
}

/// A parsed, validated query string.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `access_token=`.
    pub access_token: Option<String>,
    /// `auth=` (legacy secret).
    pub auth: Option<String>,
    /// `shallow=true`.
    pub shallow: bool,
    /// `print=`.
    pub print: Print,
    /// `timeout=`.
    pub timeout: Option<Duration>,
    /// `orderBy=` and what it applies to.
    pub order_by: Option<OrderBy>,
    /// Range and limit parameters (only meaningful with `order_by`).
    pub range: KeyRange,
    /// True when any range or limit parameter was given.
    pub has_range: bool,
    /// `format=export`.
    pub export: bool,
}

impl Query {
    /// Parses a raw query string (without `?`). Unknown parameters are an error.
    pub fn parse(raw: Option<&str>) -> Result<Query, QueryError> {
        let mut q = Query::default();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            q.apply(&name, value.into_owned())?;
        }
        q.check_combination()?;
        Ok(q)
    }

    fn apply(&mut self, name: &str, value: String) -> Result<(), QueryError> {
        match name {
            "access_token" => self.access_token = Some(value),
            "auth" => self.auth = Some(value),
            "shallow" => self.shallow = parse_bool("shallow", &value)?,
            "print" => self.print = parse_print(&value)?,
            "timeout" => self.timeout = Some(parse_timeout(&value)?),
            "orderBy" => self.order_by = Some(parse_order_by(&value)?),
            "startAt" => self.range.start = Some((range_value(name, &value)?, true)),
            "startAfter" => self.range.start = Some((range_value(name, &value)?, false)),
            "endAt" => self.range.end = Some((range_value(name, &value)?, true)),
            "endBefore" => self.range.end = Some((range_value(name, &value)?, false)),
            "equalTo" => self.range.equal = Some(range_value(name, &value)?),
            "limitToFirst" => self.range.first = Some(parse_limit(name, &value)?),
            "limitToLast" => self.range.last = Some(parse_limit(name, &value)?),
            "writeSizeLimit" => parse_write_size_limit(&value)?,
            "format" if value == "export" => self.export = true,
            "format" => return Err(bad("format must be export")),
            // Sent by the real service's redirects; accepted and ignored.
            "ns" | "sse" => {}
            other => return Err(bad(format!("Invalid parameter: {other}"))),
        }
        if matches!(
            name,
            "startAt"
                | "startAfter"
                | "endAt"
                | "endBefore"
                | "equalTo"
                | "limitToFirst"
                | "limitToLast"
        ) {
            self.has_range = true;
        }
        Ok(())
    }

    fn check_combination(&self) -> Result<(), QueryError> {
        if self.has_range && self.order_by.is_none() {
            return Err(bad(
                "orderBy must be defined when other query parameters are defined",
            ));
        }
        if self.range.first.is_some() && self.range.last.is_some() {
            return Err(bad(
                "Only one of limitToFirst and limitToLast may be specified",
            ));
        }
        if self.range.equal.is_some() && (self.range.start.is_some() || self.range.end.is_some()) {
            return Err(bad("equalTo cannot be combined with startAt or endAt"));
        }
        Ok(())
    }

    /// Rejects `orderBy` values the stand-in cannot evaluate faithfully.
    pub fn check_supported(&self, path: &DbPath) -> Result<(), QueryError> {
        match &self.order_by {
            None | Some(OrderBy::Key) => Ok(()),
            Some(OrderBy::Value) => Err(bad(
                "orderBy \"$value\" is not supported by rtdb-standin",
            )),
            Some(OrderBy::Priority) => Err(bad(
                "orderBy \"$priority\" is not supported by rtdb-standin",
            )),
            Some(OrderBy::Child(child)) => Err(bad(format!(
                "Index not defined, add \".indexOn\": \"{child}\", for path \"{path}\", to the rules"
            ))),
        }
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, QueryError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(format!("{name} must be true or false"))),
    }
}

fn parse_print(value: &str) -> Result<Print, QueryError> {
    match value {
        "pretty" => Ok(Print::Pretty),
        "silent" => Ok(Print::Silent),
        _ => Err(bad("print must be pretty or silent")),
    }
}

/// `3ms`, `3s` or `3min`; positive and at most 15 minutes.
pub fn parse_timeout(value: &str) -> Result<Duration, QueryError> {
    let err = || bad(format!("Invalid timeout: {value}"));
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(digits_end);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let per_unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        _ => return Err(err()),
    };
    let ms = n.checked_mul(per_unit_ms).ok_or_else(err)?;
    let timeout = Duration::from_millis(ms);
    if ms == 0 || timeout > MAX_TIMEOUT {
        return Err(err());
    }
    Ok(timeout)
}

fn parse_order_by(value: &str) -> Result<OrderBy, QueryError> {
    let Ok(Value::String(s)) = serde_json::from_str::<Value>(value) else {
        return Err(bad("orderBy must be a valid JSON encoded path"));
    };
    Ok(match s.as_str() {
        "$key" => OrderBy::Key,
        "$value" => OrderBy::Value,
        "$priority" => OrderBy::Priority,
        _ => OrderBy::Child(s),
    })
}

/// Range values are JSON; with `$key` ordering they must be strings (the only ordering the
/// stand-in evaluates).
fn range_value(name: &str, value: &str) -> Result<String, QueryError> {
    match serde_json::from_str::<Value>(value) {
        Ok(Value::String(s)) => Ok(s),
        Ok(_) => Err(bad(format!(
            "{name}: only string values are supported (orderBy \"$key\")"
        ))),
        Err(_) => Err(bad(format!("{name} must be a valid JSON value"))),
    }
}

fn parse_limit(name: &str, value: &str) -> Result<usize, QueryError> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad(format!("{name} must be a positive integer"))),
    }
}

fn parse_write_size_limit(value: &str) -> Result<(), QueryError> {
    match value {
        "tiny" | "small" | "medium" | "large" | "unlimited" => Ok(()),
        _ => Err(bad(
            "writeSizeLimit must be one of tiny, small, medium, large or unlimited",
        )),
    }
}

/// RTDB key order: keys that are 32-bit integers first, numerically; then the rest as strings.
pub fn compare_keys(a: &str, b: &str) -> Ordering {
    match (int_key(a), int_key(b)) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

fn int_key(key: &str) -> Option<i32> {
    let digits = key.strip_prefix('-').unwrap_or(key);
    let canonical = !digits.is_empty()
        && digits.len() <= 10
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && key != "-0";
    if canonical {
        key.parse().ok()
    } else {
        None
    }
}

/// Applies `orderBy="$key"` with its ranges and limits to a read-form value. The result is
/// an (unordered) object, as from the real service; non-objects pass through.
pub fn filter_by_key(value: Value, range: &KeyRange) -> Value {
    let map = match value {
        Value::Object(map) => map,
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_null())
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        other => return other,
    };
    let mut entries: Vec<(String, Value)> = map
        .into_iter()
        .filter(|(k, _)| in_range(k, range))
        .collect();
    entries.sort_by(|a, b| compare_keys(&a.0, &b.0));
    if let Some(n) = range.first {
        entries.truncate(n);
    }
    if let Some(n) = range.last {
        let skip = entries.len().saturating_sub(n);
        entries.drain(..skip);
    }
    Value::Object(entries.into_iter().collect::<Map<_, _>>())
}

fn in_range(key: &str, range: &KeyRange) -> bool {
    if let Some(eq) = &range.equal {
        return compare_keys(key, eq) == Ordering::Equal;
    }
    let after_start = range.start.as_ref().is_none_or(|(s, inclusive)| {
        let ord = compare_keys(key, s);
        ord == Ordering::Greater || (*inclusive && ord == Ordering::Equal)
    });
    let before_end = range.end.as_ref().is_none_or(|(e, inclusive)| {
        let ord = compare_keys(key, e);
        ord == Ordering::Less || (*inclusive && ord == Ordering::Equal)
    });
    after_start && before_end
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_known_parameters() {
        let q = Query::parse(Some(
            "access_token=t&shallow=true&print=silent&timeout=3s&writeSizeLimit=tiny&ns=x&sse=true",
        ))
        .unwrap();
        assert_eq!(q.access_token.as_deref(), Some("t"));
        assert!(q.shallow);
        assert_eq!(q.print, Print::Silent);
        assert_eq!(q.timeout, Some(Duration::from_secs(3)));
        assert!(Query::parse(None).is_ok());
    }

    #[test]
    fn rejects_unknown_and_malformed_parameters() {
        for raw in [
            "cachebust=1",
            "shallow=yes",
            "print=loud",
            "timeout=0ms",
            "timeout=16min",
            "timeout=3h",
            "timeout=99999999999999999999ms",
            "writeSizeLimit=huge",
            "orderBy=$key",
            "limitToFirst=2",
            "orderBy=%22$key%22&limitToFirst=0",
            "orderBy=%22$key%22&limitToFirst=1&limitToLast=1",
            "orderBy=%22$key%22&startAt=3",
            "orderBy=%22$key%22&startAt=%22a",
        ] {
            assert!(Query::parse(Some(raw)).is_err(), "{raw}");
        }
        assert!(parse_timeout("15min").is_ok());
        assert!(parse_timeout("900000ms").is_ok());
    }

    #[test]
    fn unsupported_orderings_are_rejected_not_ignored() {
        let root = DbPath::parse("users").unwrap();
        let q = Query::parse(Some("orderBy=%22age%22&limitToFirst=1")).unwrap();
        let err = q.check_supported(&root).unwrap_err();
        assert!(err.0.starts_with("Index not defined"), "{err}");
        assert!(err.0.contains("\"/users\""));
        let q = Query::parse(Some("orderBy=%22$value%22")).unwrap();
        assert!(q.check_supported(&root).is_err());
        let q = Query::parse(Some("orderBy=%22$key%22")).unwrap();
        assert!(q.check_supported(&root).is_ok());
    }

    #[test]
    fn key_order_puts_integers_first() {
        let mut keys = vec!["b", "10", "a", "2", "-1", "01"];
        keys.sort_by(|a, b| compare_keys(a, b));
        assert_eq!(keys, ["-1", "2", "10", "01", "a", "b"]);
    }

    #[test]
    fn filters_by_key() {
        let v = json!({"a": 1, "b": 2, "c": 3, "d": 4});
        let q = |raw: &str| Query::parse(Some(raw)).unwrap().range;
        let f = |raw: &str| filter_by_key(v.clone(), &q(raw));
        assert_eq!(
            f("orderBy=%22$key%22&limitToFirst=2"),
            json!({"a": 1, "b": 2})
        );
        assert_eq!(f("orderBy=%22$key%22&limitToLast=1"), json!({"d": 4}));
        assert_eq!(
            f("orderBy=%22$key%22&startAt=%22b%22&endAt=%22c%22"),
            json!({"b": 2, "c": 3})
        );
        assert_eq!(
            f("orderBy=%22$key%22&startAfter=%22b%22&limitToFirst=1"),
            json!({"c": 3})
        );
        assert_eq!(f("orderBy=%22$key%22&endBefore=%22b%22"), json!({"a": 1}));
        assert_eq!(f("orderBy=%22$key%22&equalTo=%22c%22"), json!({"c": 3}));
        assert_eq!(filter_by_key(json!(5), &q("orderBy=%22$key%22")), json!(5));
        assert_eq!(
            filter_by_key(
                json!(["x", "y", "z"]),
                &q("orderBy=%22$key%22&limitToLast=2")
            ),
            json!({"1": "y", "2": "z"})
        );
    }
}
