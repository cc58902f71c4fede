//! The JSON tree: write normalisation, server values, storage and the read form.
//!
//! Stored form invariants: no `null` below the root, no empty objects, no arrays (they are
//! stored as integer-keyed objects), every key valid. The read form turns integer-keyed
//! objects back into arrays when `max_key < 2 * key_count` (firebase-js-sdk `ChildrenNode.val`;
//! the REST guide words it as "more than half of the keys between 0 and the maximum").

use base64::Engine as _;
use serde_json::{Map, Number, Value};
use sha1::{Digest, Sha1};

use crate::path::{validate_key, DbPath, PathError, MAX_DEPTH};

/// The ETag of an empty location.
pub const NULL_ETAG: &str = "null_etag";

/// Integral doubles within this magnitude are stored as integers, as a JavaScript client
/// would see them.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// Why a value could not be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    /// A key in the data broke the key rules.
    #[error("Invalid data; key {key:?} is not allowed: {source}")]
    InvalidKey {
        /// The offending key.
        key: String,
        /// The rule it broke.
        source: PathError,
    },
    /// The data would nest deeper than 32 levels below the root.
    #[error("Invalid data; the data is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A `.sv` placeholder was not one of the known server values.
    #[error("Invalid data; unsupported server value {0}")]
    InvalidServerValue(String),
    /// A `.value` wrapper had keys other than `.value` and `.priority`.
    #[error("Invalid data; .value may only be combined with .priority")]
    InvalidValueWrapper,
    /// An increment overflowed to a non-finite double.
    #[error("Invalid data; numeric result is not finite")]
    NotFinite,
}

/// Inputs to server-value resolution.
#[derive(Debug, Clone, Copy)]
pub struct WriteContext {
    /// The server clock in ms since the epoch, for `{".sv":"timestamp"}`.
    pub now_ms: i64,
}

/// Normalises a value about to be written at a location `depth` keys below the root.
///
/// `old` is the value currently stored there (used by increments). Returns `None` when the
/// write amounts to a deletion (`null`, `{}`, `[]`, or containers holding only those).
pub fn prepare(
    value: Value,
    old: Option<&Value>,
    depth: usize,
    ctx: WriteContext,
) -> Result<Option<Value>, DataError> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(_) | Value::String(_) => Ok(Some(value)),
        Value::Number(n) => Ok(Some(Value::Number(canonical_number(n)))),
        Value::Array(items) => {
            let entries = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v));
            prepare_children(entries, old, depth, ctx)
        }
        Value::Object(map) => prepare_object(map, old, depth, ctx),
    }
}

fn prepare_object(
    mut map: Map<String, Value>,
    old: Option<&Value>,
    depth: usize,
    ctx: WriteContext,
) -> Result<Option<Value>, DataError> {
    if let Some(sv) = map.remove(".sv") {
        if !map.is_empty() {
            return Err(DataError::InvalidServerValue(
                "(.sv mixed with other keys)".into(),
            ));
        }
        return resolve_server_value(sv, old, ctx).map(Some);
    }
    if let Some(inner) = map.remove(".value") {
        map.remove(".priority");
        if !map.is_empty() {
            return Err(DataError::InvalidValueWrapper);
        }
        return prepare(inner, old, depth, ctx);
    }
    // Priorities are accepted and discarded (see the fidelity caveats).
    map.remove(".priority");
    prepare_children(map, old, depth, ctx)
}

fn prepare_children(
    entries: impl IntoIterator<Item = (String, Value)>,
    old: Option<&Value>,
    depth: usize,
    ctx: WriteContext,
) -> Result<Option<Value>, DataError> {
    let mut out = Map::new();
    for (key, child) in entries {
        if child.is_null() {
            continue;
        }
        validate_key(&key).map_err(|source| DataError::InvalidKey {
            key: key.clone(),
            source,
        })?;
        if depth + 1 > MAX_DEPTH {
            return Err(DataError::TooDeep);
        }
        let old_child = old.and_then(|o| o.get(&key));
        if let Some(v) = prepare(child, old_child, depth + 1, ctx)? {
            out.insert(key, v);
        }
    }
    Ok((!out.is_empty()).then_some(Value::Object(out)))
}

fn resolve_server_value(
    sv: Value,
    old: Option<&Value>,
    ctx: WriteContext,
) -> Result<Value, DataError> {
    match &sv {
        Value::String(s) if s == "timestamp" => Ok(Value::from(ctx.now_ms)),
        Value::Object(m) if m.len() == 1 => match m.get("increment") {
            Some(Value::Number(delta)) => increment(old, delta).map(Value::Number),
            _ => Err(DataError::InvalidServerValue(sv.to_string())),
        },
        _ => Err(DataError::InvalidServerValue(sv.to_string())),
    }
}

/// `ServerValue.increment` semantics: a non-number or missing value becomes the delta;
/// integers add exactly; a double on either side (or an i64 overflow) adds as doubles.
pub fn increment(old: Option<&Value>, delta: &Number) -> Result<Number, DataError> {
    let Some(current) = old.and_then(Value::as_number) else {
        return Ok(canonical_number(delta.clone()));
    };
    let exact = match (as_exact_i64(current), as_exact_i64(delta)) {
        (Some(a), Some(b)) => a.checked_add(b),
        _ => None,
    };
    match exact {
        Some(sum) => Ok(Number::from(sum)),
        None => {
            let sum = current.as_f64().unwrap_or(0.0) + delta.as_f64().unwrap_or(0.0);
            Number::from_f64(sum)
                .map(canonical_number)
                .ok_or(DataError::NotFinite)
        }
    }
}

fn as_exact_i64(n: &Number) -> Option<i64> {
    if n.is_f64() {
        None
    } else {
        n.as_i64()
    }
}

/// Stores integral doubles of safe magnitude as integers (`3.0` becomes `3`).
fn canonical_number(n: Number) -> Number {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER => {
            Number::from(f as i64)
        }
        _ => n,
    }
}

/// The stored data.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    root: Value,
}

impl Tree {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stored (normalised) value at `path`, if any.
    pub fn get_stored(&self, path: &DbPath) -> Option<&Value> {
        let mut node = &self.root;
        for key in path.keys() {
            node = node.as_object()?.get(key)?;
        }
        (!node.is_null()).then_some(node)
    }

    /// The value at `path` in read form (arrays restored), `null` when empty.
    pub fn get(&self, path: &DbPath) -> Value {
        self.get_stored(path).map(render).unwrap_or(Value::Null)
    }

    /// Replaces the value at `path` with an already prepared value (`None` deletes), creating
    /// parents and pruning ancestors left empty.
    pub fn set(&mut self, path: &DbPath, value: Option<Value>) {
        match value {
            Some(v) => set_at(&mut self.root, path.keys(), v),
            None => delete_at(&mut self.root, path.keys()),
        }
    }
}

fn set_at(node: &mut Value, keys: &[String], value: Value) {
    let Some((key, rest)) = keys.split_first() else {
        *node = value;
        return;
    };
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    if let Value::Object(map) = node {
        let child = map.entry(key.clone()).or_insert(Value::Null);
        set_at(child, rest, value);
    }
}

fn delete_at(node: &mut Value, keys: &[String]) {
    let Some((key, rest)) = keys.split_first() else {
        *node = Value::Null;
        return;
    };
    let Value::Object(map) = node else { return };
    if let Some(child) = map.get_mut(key) {
        delete_at(child, rest);
        if child.is_null() {
            map.remove(key);
        }
    }
    if map.is_empty() {
        *node = Value::Null;
    }
}

/// Converts a stored value to its read form: integer-keyed objects that are dense enough
/// become arrays with `null` holes.
pub fn render(value: &Value) -> Value {
    let Value::Object(map) = value else {
        return value.clone();
    };
    match array_length(map) {
        Some(len) => {
            let mut items = vec![Value::Null; len];
            for (k, v) in map {
                if let Some(slot) = k.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    *slot = render(v);
                }
            }
            Value::Array(items)
        }
        None => Value::Object(map.iter().map(|(k, v)| (k.clone(), render(v))).collect()),
    }
}

/// `Some(max_key + 1)` if the object should read back as an array.
fn array_length(map: &Map<String, Value>) -> Option<usize> {
    let mut max = 0usize;
    for key in map.keys() {
        max = max.max(array_index(key)?);
    }
    let count = map.len();
    (count > 0 && max < 2 * count).then_some(max + 1)
}

/// Canonical non-negative integer keys (`0`, `17`; not `01`, `-1`, `+1`).
fn array_index(key: &str) -> Option<usize> {
    let canonical = key == "0"
        || (!key.starts_with('0') && key.len() <= 9 && key.bytes().all(|b| b.is_ascii_digit()));
    if canonical {
        key.parse().ok()
    } else {
        None
    }
}

/// `shallow=true`: object children become `true`; primitives are returned as they are.
pub fn shallow(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.keys().map(|k| (k.clone(), Value::Bool(true))).collect())
        }
        Value::Array(items) => Value::Object(
            items
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_null())
                .map(|(i, _)| (i.to_string(), Value::Bool(true)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The ETag of a read-form value: base64(sha1(canonical JSON)), or `null_etag` when empty.
pub fn etag(value: &Value) -> String {
    if value.is_null() {
        return NULL_ETAG.to_owned();
    }
    let mut canonical = Vec::new();
    write_canonical(value, &mut canonical);
    base64::engine::general_purpose::STANDARD.encode(Sha1::digest(&canonical))
}

/// Compact JSON with object keys sorted, independent of serde_json's map implementation.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CTX: WriteContext = WriteContext {
        now_ms: 1_700_000_000_000,
    };

    fn p(s: &str) -> DbPath {
        DbPath::parse(s).unwrap()
    }

    fn prep(v: Value) -> Option<Value> {
        prepare(v, None, 0, CTX).unwrap()
    }

    #[test]
    fn drops_nulls_and_empty_containers() {
        assert_eq!(prep(json!(null)), None);
        assert_eq!(prep(json!({})), None);
        assert_eq!(prep(json!([])), None);
        assert_eq!(prep(json!({"a": {"b": {}, "c": []}, "d": null})), None);
        assert_eq!(
            prep(json!({"a": 1, "b": null, "c": {"d": {}}})),
            Some(json!({"a": 1}))
        );
    }

    #[test]
    fn arrays_are_stored_as_integer_keyed_objects() {
        assert_eq!(
            prep(json!(["x", null, "z"])),
            Some(json!({"0": "x", "2": "z"}))
        );
    }

    #[test]
    fn read_form_restores_dense_arrays_only() {
        assert_eq!(render(&json!({"0": "a", "1": "b"})), json!(["a", "b"]));
        assert_eq!(
            render(&json!({"0": "a", "2": "c"})),
            json!(["a", null, "c"])
        );
        // max < 2 * count: {"1"} is an array, {"2"} and {"5","6"} are not.
        assert_eq!(render(&json!({"1": "b"})), json!([null, "b"]));
        assert_eq!(render(&json!({"2": "c"})), json!({"2": "c"}));
        assert_eq!(render(&json!({"5": 1, "6": 2})), json!({"5": 1, "6": 2}));
        assert_eq!(render(&json!({"0": 1, "x": 2})), json!({"0": 1, "x": 2}));
        assert_eq!(render(&json!({"00": 1})), json!({"00": 1}));
        assert_eq!(
            render(&json!({"a": {"0": {"0": true}}})),
            json!({"a": [[true]]})
        );
    }

    #[test]
    fn rejects_bad_keys_and_depth() {
        let err = prepare(json!({"a.b": 1}), None, 0, CTX).unwrap_err();
        assert!(matches!(err, DataError::InvalidKey { ref key, .. } if key == "a.b"));
        assert!(prepare(json!({"a/b": 1}), None, 0, CTX).is_err());
        assert!(prepare(json!({"": 1}), None, 0, CTX).is_err());
        assert_eq!(
            prepare(json!({"a": 1}), None, 32, CTX),
            Err(DataError::TooDeep)
        );
        assert!(prepare(json!({"a": 1}), None, 31, CTX).is_ok());
        // A null child with a bad key is ignored, like any null.
        assert_eq!(prepare(json!({"a.b": null}), None, 0, CTX), Ok(None));
    }

    #[test]
    fn timestamp_server_value() {
        assert_eq!(
            prep(json!({"at": {".sv": "timestamp"}})),
            Some(json!({"at": 1_700_000_000_000i64}))
        );
        assert!(prepare(json!({".sv": "bogus"}), None, 0, CTX).is_err());
        assert!(prepare(json!({".sv": "timestamp", "x": 1}), None, 0, CTX).is_err());
        assert!(prepare(json!({".sv": {"increment": "1"}}), None, 0, CTX).is_err());
    }

    #[test]
    fn increment_semantics() {
        let inc = |old: Value, delta: Value| {
            prepare(json!({".sv": {"increment": delta}}), Some(&old), 0, CTX)
                .unwrap()
                .unwrap()
        };
        assert_eq!(inc(json!(5), json!(3)), json!(8));
        assert_eq!(inc(json!(null), json!(3)), json!(3));
        assert_eq!(inc(json!("five"), json!(-2)), json!(-2));
        assert_eq!(inc(json!({"a": 1}), json!(2)), json!(2));
        assert_eq!(inc(json!(1.5), json!(1)), json!(2.5));
        assert_eq!(inc(json!(1), json!(0.25)), json!(1.25));
        // Integral double results are stored as integers.
        assert_eq!(inc(json!(0.5), json!(0.5)), json!(1));
        // i64 overflow falls back to a double.
        let big = inc(json!(i64::MAX), json!(1));
        assert!(big.is_f64() && big.as_f64().unwrap() > 9.2e18);
        assert!(increment(Some(&json!(f64::MAX)), &Number::from_f64(f64::MAX).unwrap()).is_err());
    }

    #[test]
    fn increment_uses_the_old_value_at_each_nested_location() {
        let old = json!({"a": {"n": 10}});
        let v = prepare(
            json!({"a": {"n": {".sv": {"increment": 1}}}, "b": {".sv": {"increment": 2}}}),
            Some(&old),
            0,
            CTX,
        )
        .unwrap();
        assert_eq!(v, Some(json!({"a": {"n": 11}, "b": 2})));
    }

    #[test]
    fn value_and_priority_wrappers() {
        assert_eq!(prep(json!({".value": 3, ".priority": 1})), Some(json!(3)));
        assert_eq!(prep(json!({"a": 1, ".priority": 1})), Some(json!({"a": 1})));
        assert_eq!(
            prepare(json!({".value": 3, "x": 1}), None, 0, CTX),
            Err(DataError::InvalidValueWrapper)
        );
    }

    #[test]
    fn set_and_delete_prune_ancestors() {
        let mut t = Tree::new();
        t.set(&p("a/b/c"), Some(json!(1)));
        t.set(&p("a/d"), Some(json!(2)));
        assert_eq!(t.get(&p("")), json!({"a": {"b": {"c": 1}, "d": 2}}));
        t.set(&p("a/b/c"), None);
        assert_eq!(t.get(&p("")), json!({"a": {"d": 2}}));
        t.set(&p("a/d"), None);
        assert_eq!(t.get(&p("")), json!(null));
        assert_eq!(t.get_stored(&p("a")), None);
        // Deleting something absent is a no-op.
        t.set(&p("x/y"), None);
        assert_eq!(t.get(&p("")), json!(null));
    }

    #[test]
    fn writing_below_a_primitive_replaces_it() {
        let mut t = Tree::new();
        t.set(&p("a"), Some(json!(5)));
        t.set(&p("a/b"), Some(json!(true)));
        assert_eq!(t.get(&p("a")), json!({"b": true}));
        assert_eq!(t.get(&p("a/b/c")), json!(null));
    }

    #[test]
    fn shallow_and_etag() {
        assert_eq!(
            shallow(&json!({"a": {"x": 1}, "b": 2})),
            json!({"a": true, "b": true})
        );
        assert_eq!(
            shallow(&json!(["x", null, "z"])),
            json!({"0": true, "2": true})
        );
        assert_eq!(shallow(&json!("s")), json!("s"));
        assert_eq!(etag(&Value::Null), NULL_ETAG);
        let e = etag(&json!({"b": 1, "a": 2}));
        assert_eq!(e.len(), 28);
        assert_eq!(e, etag(&json!({"a": 2, "b": 1})));
        assert_ne!(e, etag(&json!({"a": 2, "b": 2})));
    }
}
