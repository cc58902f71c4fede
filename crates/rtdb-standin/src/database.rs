//! The database proper: the tree plus its open streams, so that every committed write and
//! its stream notifications happen under one lock, in one order.

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::options::PatchEventKeys;
use crate::path::{DbPath, PathError, MAX_DEPTH};
use crate::pushid::PushIdGenerator;
use crate::sse::{plan_events, put_event, Auth, Change, Listener, StreamCmd, StreamRegistry};
use crate::tree::{prepare, DataError, Tree, WriteContext};

/// Why a write was refused (always a 400, with nothing applied).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    /// The body of a PATCH was not a JSON object.
    #[error("Invalid data; couldn't parse JSON object. Are you sending a JSON object with valid key names?")]
    NotAnObject,
    /// A PATCH key was not a valid relative path.
    #[error("Invalid key {key:?}: {source}")]
    InvalidKey {
        /// The key as sent.
        key: String,
        /// The rule it broke.
        source: PathError,
    },
    /// Two PATCH keys overlap (one is, or is inside, the other).
    #[error("Invalid data; path {ancestor} is an ancestor of {descendant}")]
    Overlap {
        /// The outer path.
        ancestor: String,
        /// The inner path.
        descendant: String,
    },
    /// A value could not be normalised.
    #[error(transparent)]
    Data(#[from] DataError),
}

/// Whether a write notifies open streams, and how PATCH keys are shown if it does.
pub type Notify = Option<PatchEventKeys>;

/// The tree, its streams and the push-id generator.
#[derive(Default)]
pub struct Database {
    /// The data.
    pub tree: Tree,
    /// Open streams.
    pub streams: StreamRegistry,
    push_ids: PushIdGenerator,
}

impl Database {
    /// The next push id at `now_ms`.
    pub fn next_push_id(&mut self, now_ms: i64) -> String {
        self.push_ids.next(now_ms)
    }

    /// Replaces the value at `path` (PUT, POST, DELETE). Returns the stored value in read
    /// form.
    pub fn set(
        &mut self,
        path: &DbPath,
        raw: Value,
        ctx: WriteContext,
        notify: Notify,
    ) -> Result<Value, WriteError> {
        let prepared = prepare(raw, self.tree.get_stored(path), path.depth(), ctx)?;
        self.commit(
            Change::Put { path: path.clone() },
            vec![(path.clone(), prepared)],
            notify,
        );
        Ok(self.tree.get(path))
    }

    /// A (multi-path) update: every key is validated and every value prepared before anything
    /// is applied; then all apply together with one round of notifications. Returns each key
    /// as sent mapped to its stored value in read form (`null` when deleted).
    pub fn update(
        &mut self,
        base: &DbPath,
        raw: Value,
        ctx: WriteContext,
        notify: Notify,
    ) -> Result<Map<String, Value>, WriteError> {
        let Value::Object(map) = raw else {
            return Err(WriteError::NotAnObject);
        };
        let entries = parse_update_keys(base, map)?;
        let mut writes = Vec::with_capacity(entries.len());
        for (_, rel, value) in &entries {
            let full = base.join(rel);
            let prepared = prepare(
                value.clone(),
                self.tree.get_stored(&full),
                full.depth(),
                ctx,
            )?;
            writes.push((full, prepared));
        }
        if !writes.is_empty() {
            let keys = entries.iter().map(|(_, rel, _)| rel.clone()).collect();
            self.commit(
                Change::Patch {
                    base: base.clone(),
                    keys,
                },
                writes,
                notify,
            );
        }
        Ok(entries
            .into_iter()
            .map(|(key, rel, _)| (key, self.tree.get(&base.join(&rel))))
            .collect())
    }

    /// Registers a stream at `path` and queues its first event, a `put /` with the current
    /// value, before any later write can be committed.
    pub fn open_stream(
        &mut self,
        path: &DbPath,
        listener: Listener,
        auth: Auth,
    ) -> (u64, mpsc::UnboundedReceiver<StreamCmd>) {
        let (id, rx) = self.streams.register(path.clone(), listener, auth);
        let initial = put_event(&DbPath::root(), &self.tree.get(path));
        self.streams.send(id, StreamCmd::Data(initial));
        (id, rx)
    }

    fn commit(&mut self, change: Change, writes: Vec<(DbPath, Option<Value>)>, notify: Notify) {
        let Some(style) = notify else {
            writes.into_iter().for_each(|(p, v)| self.tree.set(&p, v));
            return;
        };
        let streams = self.streams.paths();
        let before: Vec<Option<Value>> = streams
            .iter()
            .map(|(_, s)| change.needs_snapshot(s).then(|| self.tree.get(s)))
            .collect();
        writes.into_iter().for_each(|(p, v)| self.tree.set(&p, v));
        for ((id, path), before) in streams.iter().zip(before) {
            for event in plan_events(&change, path, before.as_ref(), &self.tree, style) {
                self.streams.send(*id, StreamCmd::Data(event));
            }
        }
    }
}

/// Parses PATCH keys as relative paths and rejects empty keys, excess depth and overlaps.
fn parse_update_keys(
    base: &DbPath,
    map: Map<String, Value>,
) -> Result<Vec<(String, DbPath, Value)>, WriteError> {
    let mut entries = Vec::with_capacity(map.len());
    for (key, value) in map {
        let invalid = |source| WriteError::InvalidKey {
            key: key.clone(),
            source,
        };
        let rel = DbPath::parse(&key).map_err(invalid)?;
        if rel.is_root() {
            return Err(invalid(PathError::EmptyKey));
        }
        if base.depth() + rel.depth() > MAX_DEPTH {
            return Err(invalid(PathError::TooDeep));
        }
        entries.push((key, rel, value));
    }
    let mut sorted: Vec<&DbPath> = entries.iter().map(|(_, rel, _)| rel).collect();
    sorted.sort();
    // In sorted order an ancestor comes right before some descendant of it, if it has any.
    if let Some(pair) = sorted.windows(2).find(|w| w[0].contains(w[1])) {
        return Err(WriteError::Overlap {
            ancestor: base.join(pair[0]).to_string(),
            descendant: base.join(pair[1]).to_string(),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CTX: WriteContext = WriteContext { now_ms: 1000 };
    const NOTIFY: Notify = Some(PatchEventKeys::Keep);

    fn p(s: &str) -> DbPath {
        DbPath::parse(s).unwrap()
    }

    #[test]
    fn multi_path_update_applies_all_keys() {
        let mut db = Database::default();
        db.set(&p("users/a"), json!({"n": 1, "keep": true}), CTX, NOTIFY)
            .unwrap();
        let echo = db
            .update(
                &DbPath::root(),
                json!({
                    "users/a/n": {".sv": {"increment": 2}},
                    "users/b": {"n": 5},
                    "users/a/gone": null,
                    "_sync/i": {"seq": 1, "at": {".sv": "timestamp"}}
                }),
                CTX,
                NOTIFY,
            )
            .unwrap();
        assert_eq!(echo["users/a/n"], json!(3));
        assert_eq!(echo["users/a/gone"], json!(null));
        assert_eq!(
            db.tree.get(&DbPath::root()),
            json!({"users": {"a": {"n": 3, "keep": true}, "b": {"n": 5}}, "_sync": {"i": {"seq": 1, "at": 1000}}})
        );
    }

    #[test]
    fn invalid_or_overlapping_updates_apply_nothing() {
        let mut db = Database::default();
        db.set(&p("x"), json!(1), CTX, NOTIFY).unwrap();
        let before = db.tree.get(&DbPath::root());
        let cases = [
            json!({"a": 1, "b.c": 2}),
            json!({"a": 1, "b": {"c$": 2}}),
            json!({"a": 1, "a/b": 2}),
            json!({"q/r": 1, "q/r/s/t": 2}),
            json!({"a": 1, "a/": 2}),
            json!({"a": 1, "": 2}),
            json!({"a": {".sv": "nope"}, "x": 2}),
            json!([1, 2]),
            json!("text"),
        ];
        for case in cases {
            assert!(
                db.update(&DbPath::root(), case.clone(), CTX, NOTIFY)
                    .is_err(),
                "{case}"
            );
            assert_eq!(db.tree.get(&DbPath::root()), before, "{case}");
        }
        let err = db
            .update(&DbPath::root(), json!({"a/b": 1, "a": 2}), CTX, NOTIFY)
            .unwrap_err();
        assert_eq!(
            err,
            WriteError::Overlap {
                ancestor: "/a".into(),
                descendant: "/a/b".into()
            }
        );
        // Siblings sharing a prefix are not overlaps.
        assert!(db
            .update(
                &DbPath::root(),
                json!({"a": 1, "ab": 2, "a_b/c": 3}),
                CTX,
                NOTIFY
            )
            .is_ok());
    }

    #[test]
    fn streams_get_the_initial_put_then_events_in_commit_order() {
        let mut db = Database::default();
        db.set(&p("users/a"), json!(1), CTX, NOTIFY).unwrap();
        let (_, mut rx) = db.open_stream(&p("users"), Listener::Primary, Auth::Public);
        db.set(&p("users/b"), json!(2), CTX, NOTIFY).unwrap();
        db.set(&p("users/c"), json!(3), CTX, None).unwrap();
        db.update(&p("users"), json!({"a": null}), CTX, NOTIFY)
            .unwrap();
        let mut got = Vec::new();
        while let Ok(StreamCmd::Data(b)) = rx.try_recv() {
            got.push(String::from_utf8(b.to_vec()).unwrap());
        }
        assert_eq!(
            got,
            [
                "event: put\ndata: {\"path\":\"/\",\"data\":{\"a\":1}}\n\n",
                "event: put\ndata: {\"path\":\"/b\",\"data\":2}\n\n",
                "event: patch\ndata: {\"path\":\"/\",\"data\":{\"a\":null}}\n\n",
            ]
        );
    }
}
