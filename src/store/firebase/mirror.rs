//! The last known server state of the users path, changed only by stream events. `put` and
//! `patch` are applied as Firebase defines them (multi-segment patch keys included), and each
//! event says which users it touched so only they are re-read into the cache.
//!
//! Values are kept as the database stores them: no `null`, no empty objects, arrays as
//! index-keyed objects. [`render`] turns index-keyed objects back into arrays, as a read would.
//!
//! Each user is kept as compact JSON text, parsed only while an event changes it or the cache
//! reads it: a parsed tree of a typical user takes about 3.3 KB against its 380 bytes of text
//! (measured with serde_json's `Value`), and the mirror holds every user of the database.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::hash::BuildHasher;

use indexmap::IndexMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Users an event touched.
#[derive(Debug, PartialEq, Eq)]
pub enum Touched {
    /// The whole path was replaced (the first event of every connection).
    All,
    Users(Vec<String>),
}

#[derive(Debug, Default)]
pub struct Mirror {
    /// Token → the user's stored value, as compact JSON in the stored form.
    users: HashMap<Box<str>, Box<str>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("the event's data is not JSON of the form {{\"path\":…,\"data\":…}}")]
    Shape,
    #[error("a patch event whose data is not an object")]
    PatchNotObject,
    #[error("a path of more than {MAX_PATH_SEGMENTS} segments (Firebase nests 32 levels at most)")]
    TooDeep,
}

/// Firebase keeps data at most 32 levels deep, so no event it sends names a longer path. A
/// longer one (a hostile or broken server) is refused: the mirror nests one level per segment
/// and every walk of it recurses, so a path of thousands of segments would overflow the stack.
const MAX_PATH_SEGMENTS: usize = 32;

/// The payload of `put` and `patch` events. `data` stays text until it is split by user, so a
/// snapshot of the whole path is never one parsed tree.
#[derive(serde::Deserialize)]
struct Payload<'a> {
    path: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl Mirror {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Applies a `put` event's data (JSON text).
    pub fn put(&mut self, payload: &str) -> Result<Touched, EventError> {
        let p: Payload = serde_json::from_str(payload).map_err(|_| EventError::Shape)?;
        let path = segments(&p.path)?;
        if path.is_empty() {
            self.users = stored_users(p.data)?;
            return Ok(Touched::All);
        }
        let value = match p.data {
            Some(raw) => parse(raw)?,
            None => None,
        };
        let mut edit = Edit::default();
        edit.set(self, &path, value)?;
        Ok(Touched::Users(edit.save(self)))
    }

    /// Applies a `patch` event's data: each key (a relative path) is replaced.
    pub fn patch(&mut self, payload: &str) -> Result<Touched, EventError> {
        let p: Payload = serde_json::from_str(payload).map_err(|_| EventError::Shape)?;
        let children: IndexMap<String, &RawValue> = p
            .data
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .ok_or(EventError::PatchNotObject)?;
        let base = segments(&p.path)?;
        let mut edit = Edit::default();
        for (key, raw) in children {
            let mut path = base.clone();
            path.extend(segments(&key)?);
            if path.len() > MAX_PATH_SEGMENTS {
                return Err(EventError::TooDeep);
            }
            if path.is_empty() {
                continue;
            }
            edit.set(self, &path, parse(raw)?)?;
        }
        Ok(Touched::Users(edit.save(self)))
    }

    /// A user's stored value, rendered as a read would return it.
    pub fn user(&self, token: &str) -> Option<Value> {
        self.users
            .get(token)
            .and_then(|text| tree(text))
            .map(render)
    }

    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(AsRef::as_ref)
    }

    /// Whether the mirror holds a value for `token`.
    pub fn contains(&self, token: &str) -> bool {
        self.users.contains_key(token)
    }
}

/// The users an event changes, parsed once each, in the order first touched; written back
/// as text when the event is applied. The set keeps an event touching many users linear (a
/// search of the list made a patch of 40,000 users take 12 s, with the store's runtime
/// stalled).
#[derive(Default)]
struct Edit {
    users: Map<String, Value>,
    touched: Vec<String>,
    seen: HashSet<String>,
}

impl Edit {
    /// Sets (or with `None` removes) the value at `path`, whose first segment is the token.
    /// Data nested deeper than Firebase keeps it is refused: the user's text could not be read
    /// back (serde_json parses 128 levels at most).
    fn set(
        &mut self,
        mirror: &Mirror,
        path: &[&str],
        value: Option<Value>,
    ) -> Result<(), EventError> {
        if path.len() + value.as_ref().map_or(0, depth) > MAX_PATH_SEGMENTS {
            return Err(EventError::TooDeep);
        }
        let token = path[0];
        if !self.seen.contains(token) {
            self.seen.insert(token.to_string());
            self.touched.push(token.to_string());
            if let Some(stored) = mirror.users.get(token).and_then(|text| tree(text)) {
                self.users.insert(token.to_string(), stored);
            }
        }
        set(&mut self.users, path, value);
        Ok(())
    }

    /// Writes the changed users back; returns their tokens.
    fn save(mut self, mirror: &mut Mirror) -> Vec<String> {
        for token in &self.touched {
            match self.users.remove(token) {
                Some(value) => {
                    mirror
                        .users
                        .insert(token.as_str().into(), value.to_string().into());
                }
                None => {
                    mirror.users.remove(token.as_str());
                }
            }
        }
        self.touched
    }
}

/// A whole snapshot of the users path, split by user without parsing it as one tree.
fn stored_users(data: Option<&RawValue>) -> Result<HashMap<Box<str>, Box<str>>, EventError> {
    // Anything but an object or array (null, a primitive) holds no users.
    let Some(users) = data.and_then(children) else {
        return Ok(HashMap::new());
    };
    let mut stored = HashMap::with_capacity(users.len());
    users.try_for_each(|token, raw| {
        if let Some(value) = parse(raw)? {
            if 1 + depth(&value) > MAX_PATH_SEGMENTS {
                return Err(EventError::TooDeep);
            }
            stored.insert(token.into(), value.to_string().into_boxed_str());
        }
        Ok(())
    })?;
    Ok(stored)
}

/// The children of a JSON object, or of an array, which is how Firebase renders an object
/// whose keys are all small integers (numeric tokens): its positions are the keys, `null`
/// holes skipped. `None` for anything else, and for an object one of whose keys cannot be
/// read (before any child is visited). Children are visited one at a time rather than
/// listed: a list of every user of the path is as long as the users path.
///
/// A key named twice is visited once, with its last value, as a JSON reader takes it
/// (Firebase never sends one). Finding them costs a hash per key; only keys whose hash was
/// seen twice are then counted by name.
pub fn children(raw: &RawValue) -> Option<Children<'_>> {
    let hasher = RandomState::new();
    let mut hashes = HashSet::new();
    let mut suspects = HashSet::new();
    let len = walk(raw, |key, _| {
        let hash = hasher.hash_one(key);
        if !hashes.insert(hash) {
            suspects.insert(hash);
        }
        Ok::<(), Infallible>(())
    })
    .ok()?;
    drop(hashes);
    let mut repeated: HashMap<Box<str>, usize> = HashMap::new();
    if !suspects.is_empty() {
        let counted = walk(raw, |key, _| {
            if suspects.contains(&hasher.hash_one(key)) {
                *repeated.entry(key.into()).or_default() += 1;
            }
            Ok::<(), Infallible>(())
        });
        counted.ok()?;
        repeated.retain(|_, times| *times > 1);
    }
    let extra: usize = repeated.values().map(|times| times - 1).sum();
    Some(Children {
        raw,
        len: len - extra,
        repeated,
    })
}

/// The children of one object or array, counted and checked by [`children`].
#[derive(Debug, Clone)]
pub struct Children<'a> {
    raw: &'a RawValue,
    /// Distinct keys.
    len: usize,
    /// Keys named more than once, with how many times.
    repeated: HashMap<Box<str>, usize>,
}

impl Children<'_> {
    /// How many children [`Children::try_for_each`] visits.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `visit` with each child's key and value, in order (a repeated key at its last
    /// place); its first error stops the walk and is returned.
    pub fn try_for_each<E>(
        mut self,
        mut visit: impl FnMut(&str, &RawValue) -> Result<(), E>,
    ) -> Result<(), E> {
        let last_only = |key: &str, value: &RawValue| match self.repeated.get_mut(key) {
            Some(left) if *left > 1 => {
                *left -= 1;
                Ok(())
            }
            _ => visit(key, value),
        };
        match walk(self.raw, last_only) {
            Ok(_) => Ok(()),
            Err(Walk::Visit(e)) => Err(e),
            // The same text walked once already, in `children`.
            Err(Walk::Json) => Ok(()),
        }
    }
}

/// Why a walk over children stopped early.
enum Walk<E> {
    /// Not an object or array, or a key that cannot be read.
    Json,
    Visit(E),
}

/// Visits the children of `raw` (see [`children`]); returns how many were visited.
fn walk<E>(
    raw: &RawValue,
    visit: impl FnMut(&str, &RawValue) -> Result<(), E>,
) -> Result<usize, Walk<E>> {
    let mut walker = Walker {
        visit,
        visited: 0,
        failed: None,
    };
    let mut json = serde_json::Deserializer::from_str(raw.get());
    match serde::Deserializer::deserialize_any(&mut json, &mut walker) {
        Ok(()) => Ok(walker.visited),
        Err(_) => Err(walker.failed.take().map_or(Walk::Json, Walk::Visit)),
    }
}

/// The serde visitor of [`walk`]: calls `visit` with each child as the parser reaches it.
struct Walker<F, E> {
    visit: F,
    visited: usize,
    /// The error `visit` stopped the walk with (serde only carries its own errors).
    failed: Option<E>,
}

impl<F, E> Walker<F, E>
where
    F: FnMut(&str, &RawValue) -> Result<(), E>,
{
    fn child<D: serde::de::Error>(&mut self, key: &str, value: &RawValue) -> Result<(), D> {
        self.visited += 1;
        (self.visit)(key, value).map_err(|e| {
            self.failed = Some(e);
            D::custom("stopped by the visitor")
        })
    }
}

impl<'de, F, E> serde::de::Visitor<'de> for &mut Walker<F, E>
where
    F: FnMut(&str, &RawValue) -> Result<(), E>,
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object or an array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let value: &RawValue = map.next_value()?;
            self.child(&key, value)?;
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        while let Some(item) = items.next_element::<&RawValue>()? {
            if item.get() != "null" {
                self.child(&index.to_string(), item)?;
            }
            index += 1;
        }
        Ok(())
    }
}

/// Levels of nesting below `value` (0 for a primitive).
fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// One value of an event, in the stored form (`None`: nothing, e.g. `null`).
fn parse(raw: &RawValue) -> Result<Option<Value>, EventError> {
    let value: Value = serde_json::from_str(raw.get()).map_err(|_| EventError::Shape)?;
    Ok(normalize(value))
}

/// A user's text as kept by the mirror, parsed (it was written by the mirror itself).
fn tree(text: &str) -> Option<Value> {
    serde_json::from_str(text).ok()
}

fn segments(path: &str) -> Result<Vec<&str>, EventError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(EventError::TooDeep);
    }
    Ok(segments)
}

/// Sets (or with `None` removes) the value at `path`, creating parents and pruning the ones
/// left empty. A primitive in the way becomes an object, as in the database.
fn set(map: &mut Map<String, Value>, path: &[&str], value: Option<Value>) {
    let (first, rest) = path.split_first().expect("non-empty path");
    if rest.is_empty() {
        match value {
            Some(v) => {
                map.insert((*first).to_string(), v);
            }
            None => {
                map.remove(*first);
            }
        }
        return;
    }
    if value.is_none() && !map.contains_key(*first) {
        return;
    }
    let child = map
        .entry((*first).to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !child.is_object() {
        *child = Value::Object(Map::new());
    }
    let Value::Object(child_map) = child else {
        unreachable!("made an object above")
    };
    set(child_map, rest, value);
    if child_map.is_empty() {
        map.remove(*first);
    }
}

/// The stored form: no nulls or empty containers, arrays as index-keyed objects.
pub fn normalize(value: Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Array(items) => {
            let map: Map<String, Value> = items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| normalize(v).map(|v| (i.to_string(), v)))
                .collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        Value::Object(map) => {
            let map: Map<String, Value> = map
                .into_iter()
                .filter_map(|(k, v)| normalize(v).map(|v| (k, v)))
                .collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        other => Some(other),
    }
}

/// Objects keyed by array indices read back as arrays (with `null` holes) when the largest
/// index is below twice the number of keys, as Firebase renders them.
pub fn render(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let indices: Option<Vec<usize>> = map.keys().map(|k| array_index(k)).collect();
            match indices {
                Some(indices) if !indices.is_empty() => {
                    let max = *indices.iter().max().expect("non-empty");
                    if max < 2 * indices.len() {
                        let mut items = vec![Value::Null; max + 1];
                        for (i, (_, v)) in indices.into_iter().zip(map) {
                            items[i] = render(v);
                        }
                        return Value::Array(items);
                    }
                    Value::Object(map.into_iter().map(|(k, v)| (k, render(v))).collect())
                }
                _ => Value::Object(map.into_iter().map(|(k, v)| (k, render(v))).collect()),
            }
        }
        other => other,
    }
}

fn array_index(key: &str) -> Option<usize> {
    if key == "0" {
        return Some(0);
    }
    if key.starts_with('0') || key.len() > 9 || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(m: &mut Mirror, path: &str, data: Value) -> Touched {
        m.put(&json!({"path": path, "data": data}).to_string())
            .unwrap()
    }

    fn patch(m: &mut Mirror, path: &str, data: Value) -> Touched {
        m.patch(&json!({"path": path, "data": data}).to_string())
            .unwrap()
    }

    /// A hostile or broken server's event nesting thousands of levels overflowed the stack
    /// (the process died) when the mirror applied, rendered or dropped it.
    #[test]
    fn paths_deeper_than_firebase_allows_are_refused() {
        let deep = "/a".repeat(20_000);
        let mut m = Mirror::new();
        let event = json!({"path": deep, "data": 1}).to_string();
        assert_eq!(m.put(&event), Err(EventError::TooDeep));
        let key = vec!["a"; 20_000].join("/");
        let event = json!({"path": "/", "data": {key: 1}}).to_string();
        assert_eq!(m.patch(&event), Err(EventError::TooDeep));
        // Base and key are counted together.
        let event = json!({"path": "/a".repeat(20), "data": {"b/".repeat(13): 1}}).to_string();
        assert_eq!(m.patch(&event), Err(EventError::TooDeep));
        assert!(m.is_empty());
        // Firebase's own limit passes.
        put(&mut m, &"/a".repeat(32), json!(1));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn put_and_patch_follow_firebase_semantics() {
        let mut m = Mirror::new();
        let t = put(
            &mut m,
            "/",
            json!({"a": {"promptCount": 1, "ip": ["1.1.1.1"], "meta": {}}, "b": {"promptCount": 2}}),
        );
        assert_eq!(t, Touched::All);
        assert_eq!(
            m.user("a"),
            Some(json!({"promptCount": 1, "ip": ["1.1.1.1"]}))
        );
        // A multi-path patch at the root with keys that contain '/'.
        let t = patch(
            &mut m,
            "/",
            json!({"a/promptCount": 5, "b/tokenCounts/gpt4": 3, "c": {"promptCount": 0, "type": "normal"}}),
        );
        assert_eq!(t, Touched::Users(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(m.user("a").unwrap()["promptCount"], 5);
        assert_eq!(
            m.user("b"),
            Some(json!({"promptCount": 2, "tokenCounts": {"gpt4": 3}}))
        );
        // The nested form of the same thing.
        patch(&mut m, "/a", json!({"nickname": "x", "ip/1": "2.2.2.2"}));
        assert_eq!(m.user("a").unwrap()["ip"], json!(["1.1.1.1", "2.2.2.2"]));
        assert_eq!(m.user("a").unwrap()["nickname"], "x");
        // A leaf put, then deletions; an emptied user disappears.
        put(&mut m, "/b/promptCount", json!(9));
        assert_eq!(m.user("b").unwrap()["promptCount"], 9);
        put(&mut m, "/b/promptCount", Value::Null);
        put(&mut m, "/b/tokenCounts/gpt4", Value::Null);
        assert_eq!(m.user("b"), None);
        let t = patch(&mut m, "/", json!({"c": null}));
        assert_eq!(t, Touched::Users(vec!["c".into()]));
        assert_eq!(m.user("c"), None);
        // Deleting below a missing parent creates nothing.
        put(&mut m, "/zz/ip/0", Value::Null);
        assert_eq!(m.user("zz"), None);
        // A full replace drops everything else.
        put(&mut m, "/", Value::Null);
        assert!(m.is_empty());
    }

    /// Firebase renders an object whose keys are all small integers (numeric tokens) as an
    /// array: its users are kept, not dropped.
    #[test]
    fn a_snapshot_rendered_as_an_array_keeps_its_users() {
        let mut m = Mirror::new();
        put(
            &mut m,
            "/",
            json!([null, {"promptCount": 1}, {"promptCount": 2}]),
        );
        assert_eq!(m.user("1"), Some(json!({"promptCount": 1})));
        assert_eq!(m.len(), 2);
    }

    /// Data nested deeper than Firebase keeps it is refused (a stored user's text could not be
    /// read back past serde_json's 128 levels), not kept as a user that reads as absent.
    #[test]
    fn data_deeper_than_firebase_allows_is_refused() {
        let mut deep = json!(1);
        for _ in 0..100 {
            deep = json!({ "k": deep });
        }
        let mut m = Mirror::new();
        let event = json!({"path": "/t".to_string() + &"/a".repeat(31), "data": deep}).to_string();
        assert_eq!(m.put(&event), Err(EventError::TooDeep));
        let event = json!({"path": "/", "data": {"t": deep}}).to_string();
        assert_eq!(m.put(&event), Err(EventError::TooDeep));
        assert!(m.is_empty());
        // 32 levels in all pass.
        let mut ok = json!(1);
        for _ in 0..31 {
            ok = json!({ "k": ok });
        }
        put(&mut m, "/t", ok);
        assert!(m.user("t").is_some());
    }

    fn visited(text: &str) -> Option<(usize, Vec<(String, String)>)> {
        let raw: &RawValue = serde_json::from_str(text).unwrap();
        let users = children(raw)?;
        let len = users.len();
        let mut seen = Vec::new();
        users
            .try_for_each(|key, value| {
                seen.push((key.to_string(), value.get().to_string()));
                Ok::<(), ()>(())
            })
            .unwrap();
        Some((len, seen))
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The users path is split into its children one at a time, in order, with the same
    /// children as before: an array's positions are the keys, its `null` holes skipped.
    #[test]
    fn children_are_visited_in_order() {
        let (len, seen) = visited(r#"{"b": {"x": 1}, "a\u0041": null, "1": 2}"#).unwrap();
        assert_eq!(len, 3);
        assert_eq!(
            seen,
            pairs(&[("b", r#"{"x": 1}"#), ("aA", "null"), ("1", "2")])
        );
        let (len, seen) = visited(r#"[null, {"p": 1}, null, 3]"#).unwrap();
        assert_eq!(len, 2);
        assert_eq!(seen, pairs(&[("1", r#"{"p": 1}"#), ("3", "3")]));
        assert_eq!(visited("{}"), Some((0, Vec::new())));
        for nothing in ["5", "\"text\"", "null", "true"] {
            assert_eq!(visited(nothing), None, "{nothing}");
        }
    }

    /// A key that cannot be read makes the whole value hold no children, as when the object
    /// was read whole: no child before it is visited.
    #[test]
    fn an_unreadable_key_means_no_children() {
        assert_eq!(visited(r#"{"a": 1, "\ud800": 2}"#), None);
    }

    #[test]
    fn a_visitor_error_stops_the_walk() {
        let raw: &RawValue = serde_json::from_str(r#"{"a": 1, "b": 2, "c": 3}"#).unwrap();
        let mut seen = Vec::new();
        let stopped = children(raw).unwrap().try_for_each(|key, _| {
            seen.push(key.to_string());
            if key == "b" {
                return Err("stop");
            }
            Ok(())
        });
        assert_eq!(stopped, Err("stop"));
        assert_eq!(seen, ["a", "b"]);
    }

    /// A snapshot naming a user twice holds its last value, as JSON readers (and the mirror
    /// before the one-at-a-time walk, which read the object into a map first) take it: a
    /// user whose last value is `null` is not held.
    #[test]
    fn a_snapshot_naming_a_user_twice_holds_the_last_value() {
        let mut m = Mirror::new();
        m.put(r#"{"path":"/","data":{"t":{"createdAt":1,"nickname":"first"},"t":null}}"#)
            .unwrap();
        assert!(m.user("t").is_none(), "{:?}", m.user("t"));
        let raw: &RawValue = serde_json::from_str(r#"{"t": 1, "t": 2}"#).unwrap();
        assert_eq!(children(raw).unwrap().len(), 1, "one child, named twice");
    }

    /// A repeated key is visited once, at its last place and with its last value; other keys
    /// as they come (the first pass only suspects keys by hash, the second counts them).
    #[test]
    fn repeated_keys_are_visited_once_with_their_last_value() {
        let (len, seen) = visited(r#"{"a": 1, "b": 2, "a": 3, "c": 4, "a": 5, "b": 6}"#).unwrap();
        assert_eq!(len, 3);
        assert_eq!(seen, pairs(&[("c", "4"), ("a", "5"), ("b", "6")]));
        let (len, seen) = visited(r#"{"a": 1, "b": 2}"#).unwrap();
        assert_eq!((len, seen), (2, pairs(&[("a", "1"), ("b", "2")])));
    }

    #[test]
    fn malformed_events_are_errors() {
        let mut m = Mirror::new();
        assert_eq!(m.put("{\"path\":\"/\",\"data\":"), Err(EventError::Shape));
        assert_eq!(
            m.patch(r#"{"path":"/","data":5}"#),
            Err(EventError::PatchNotObject)
        );
    }

    #[test]
    fn arrays_render_like_firebase() {
        assert_eq!(render(json!({"0": "a", "1": "b"})), json!(["a", "b"]));
        assert_eq!(render(json!({"1": "b"})), json!([null, "b"]));
        assert_eq!(
            render(json!({"0": "a", "5": "b"})),
            json!({"0": "a", "5": "b"})
        );
        assert_eq!(render(json!({"01": "a"})), json!({"01": "a"}));
        assert_eq!(normalize(json!([null, "x", []])), Some(json!({"1": "x"})));
    }
}
