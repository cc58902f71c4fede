//! Turning the engine's batches into Firebase writes: one atomic multi-path PATCH at the
//! root that writes leaves (never whole users, except new ones), server-side increments for
//! counters, and the instance's batch marker; bisection to isolate a key Firebase refuses;
//! and the union merge used for the `ip` list.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::users::{Change, Fields};

/// Paths this instance writes under.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The users path (`users`, or `FIREBASE_USERS_REF_NAME`), without slashes at the ends.
    pub users: String,
    /// `_sync/instances/<instance id>`.
    pub marker: String,
}

impl Layout {
    pub fn user(&self, token: &str) -> String {
        format!("{}/{token}", self.users)
    }

    pub fn leaf(&self, token: &str, field: &str) -> String {
        format!("{}/{token}/{field}", self.users)
    }
}

/// An increment Firebase applies on the server.
pub fn increment(delta: u64) -> Value {
    json!({".sv": {"increment": delta}})
}

/// How a user created by an upsert of an unknown token ([`Fields::UPSERTED`]) was written
/// before the batch's PATCH: by a conditional `PUT` (`if-match: null_etag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Creation {
    /// The PUT created it, without the batch's counted requests (the PATCH adds those).
    Put,
    /// 412: the token exists in the store; the PATCH writes the upsert's fields as leaves.
    Existed,
}

/// A new user that must be created only if absent: see [`Fields::UPSERTED`].
pub fn needs_conditional_create(change: &Change) -> bool {
    matches!(change, Change::Upsert(c) if c.fields.contains(Fields::CREATED | Fields::UPSERTED))
}

/// The conditional PUT's body: the whole user, with `promptCount` before this batch's
/// requests. The requests go in the PATCH as an increment, which the batch marker makes
/// exactly-once; in the PUT they would count twice after an ambiguous PUT (its retry gets 412
/// and the PATCH adds them again).
pub fn create_body(change: &Change) -> Option<Value> {
    let Change::Upsert(c) = change else {
        return None;
    };
    let mut user = c.user.clone();
    user.prompt_count = user.prompt_count.saturating_sub(c.prompt_delta);
    serde_json::to_value(&user).ok()
}

/// The `(path, value)` entries one change contributes to a PATCH. New users are written
/// whole, unless they came from an upsert (`creation`: see [`Creation`]); otherwise only the
/// fields marked changed, as leaves. A merged `ip` (requests added addresses) is not in the
/// PATCH: see [`needs_ip_merge`].
pub fn entries(
    layout: &Layout,
    change: &Change,
    creation: Option<Creation>,
) -> Vec<(String, Value)> {
    let c = match change {
        Change::Delete { token } => return vec![(layout.user(token), Value::Null)],
        Change::Upsert(c) => c,
    };
    let token = c.record.token();
    let user = match serde_json::to_value(&c.user) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    if c.fields.contains(Fields::CREATED) {
        match creation {
            None => return vec![(layout.user(token), Value::Object(user))],
            Some(Creation::Put) => {
                return if c.prompt_delta > 0 {
                    vec![(layout.leaf(token, "promptCount"), increment(c.prompt_delta))]
                } else {
                    Vec::new()
                };
            }
            // The fields marked are the upsert's (and later edits'): leaves as for any user.
            Some(Creation::Existed) => {}
        }
    }
    let mut out = Vec::new();
    if c.fields.contains(Fields::PROMPT_COUNT) {
        // An admin's absolute value (plus requests counted since): last writer wins.
        out.push((
            layout.leaf(token, "promptCount"),
            json!(c.user.prompt_count),
        ));
    } else if c.fields.contains(Fields::PROMPT_DELTA) && c.prompt_delta > 0 {
        out.push((layout.leaf(token, "promptCount"), increment(c.prompt_delta)));
    }
    for (bit, name) in Fields::NAMED {
        if !c.fields.contains(*bit) || *bit == Fields::PROMPT_COUNT {
            continue;
        }
        if *bit == Fields::IP && !c.fields.contains(Fields::IP_REPLACED) {
            continue;
        }
        let value = user.get(*name).cloned().unwrap_or(Value::Null);
        out.push((layout.leaf(token, name), stored(value)));
    }
    out
}

/// Empty containers delete a path in Firebase; send them as the explicit `null`.
fn stored(value: Value) -> Value {
    match &value {
        Value::Array(a) if a.is_empty() => Value::Null,
        Value::Object(o) if o.is_empty() => Value::Null,
        _ => value,
    }
}

/// Requests added addresses to the user's `ip` list: merge those (`ip_added`) into the stored
/// list. An admin's replacement and a user created here carry the list in their write instead.
pub fn needs_ip_merge(change: &Change, creation: Option<Creation>) -> bool {
    match change {
        Change::Upsert(c) => {
            !c.ip_added.is_empty()
                && !c.fields.contains(Fields::IP_REPLACED)
                && (!c.fields.contains(Fields::CREATED) || creation == Some(Creation::Existed))
        }
        Change::Delete { .. } => false,
    }
}

/// The PATCH body for the changes at `indices` of `changes`, marked with `write_no`.
pub fn patch_body(
    layout: &Layout,
    changes: &[Change],
    indices: &[usize],
    creations: &HashMap<usize, Creation>,
    write_no: u64,
    batch_seq: u64,
) -> Map<String, Value> {
    let mut body = Map::new();
    for &i in indices {
        for (path, value) in entries(layout, &changes[i], creations.get(&i).copied()) {
            body.insert(path, value);
        }
    }
    body.insert(
        layout.marker.clone(),
        json!({"seq": write_no, "batch": batch_seq, "at": {".sv": "timestamp"}}),
    );
    body
}

/// The stored `ip` list with `local`'s entries that are missing from it appended (the same
/// client counts once: `::ffff:1.2.3.4` equals `1.2.3.4`). `None` when nothing is missing.
pub fn merge_ips(stored: &[String], local: &[String]) -> Option<Vec<String>> {
    use crate::users::profile::IpEntry;
    let present = |entry: &str, list: &[String]| {
        let parsed = IpEntry::from_text(entry);
        list.iter().any(|s| {
            s == entry
                || match &parsed {
                    IpEntry::Addr(ip) => IpEntry::from_text(s).is(*ip),
                    IpEntry::Text(_) => false,
                }
        })
    };
    let mut merged = stored.to_vec();
    for entry in local {
        if !present(entry, &merged) {
            merged.push(entry.clone());
        }
    }
    (merged.len() != stored.len()).then_some(merged)
}

/// Splits groups of changes that Firebase refused (400 fails a whole PATCH) until the bad
/// ones stand alone.
#[derive(Debug)]
pub struct Bisection {
    stack: Vec<Vec<usize>>,
}

impl Bisection {
    pub fn new(items: Vec<usize>) -> Self {
        Self {
            stack: if items.is_empty() {
                Vec::new()
            } else {
                vec![items]
            },
        }
    }

    /// The next group to write.
    pub fn next_group(&mut self) -> Option<Vec<usize>> {
        self.stack.pop()
    }

    /// `group` was refused: its halves are written separately; a single change is the bad one
    /// and is returned.
    pub fn refused(&mut self, group: Vec<usize>) -> Option<usize> {
        if group.len() == 1 {
            return Some(group[0]);
        }
        let mut first = group;
        let second = first.split_off(first.len() / 2);
        self.stack.push(second);
        self.stack.push(first);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::{User, UserCache, UserType};

    fn layout() -> Layout {
        Layout {
            users: "users".into(),
            marker: "_sync/instances/i1".into(),
        }
    }

    fn cache_with(token: &str) -> UserCache {
        let cache = UserCache::default();
        cache.load([User::new(token.into(), UserType::Normal, 1)]);
        cache
    }

    #[test]
    fn counters_are_increments_and_edits_are_leaves() {
        let cache = cache_with("t");
        let r = cache.get("t").unwrap();
        cache.count_request(&r, 50);
        cache.count_request(&r, 60);
        let patch: crate::users::UserPatch =
            serde_json::from_value(json!({"nickname": "n", "maxIps": null})).unwrap();
        cache.upsert("t", &patch, 70);
        let taken = cache.take_changes(10);
        let body = patch_body(&layout(), &taken.changes, &[0], &HashMap::new(), 7, 3);
        assert_eq!(
            Value::Object(body),
            json!({
                "users/t/promptCount": {".sv": {"increment": 2}},
                "users/t/lastUsedAt": 60,
                "users/t/nickname": "n",
                "users/t/maxIps": null,
                "_sync/instances/i1": {"seq": 7, "batch": 3, "at": {".sv": "timestamp"}},
            })
        );
    }

    #[test]
    fn new_users_are_written_whole_and_deletes_are_null() {
        let cache = UserCache::default();
        let mut user = User::new("new".into(), UserType::Special, 5);
        user.ip = vec!["1.1.1.1".into()];
        cache.create(&user).unwrap();
        let r = cache.get("new").unwrap();
        cache.count_request(&r, 9);
        cache.load([User::new("old".into(), UserType::Normal, 1)]);
        cache.remove("old").unwrap();
        let taken = cache.take_changes(10);
        let body = patch_body(&layout(), &taken.changes, &[0, 1], &HashMap::new(), 1, 1);
        let whole = &body["users/new"];
        assert_eq!(whole["promptCount"], 1, "created with its count so far");
        assert_eq!(whole["type"], "special");
        assert_eq!(whole["ip"], json!(["1.1.1.1"]));
        assert_eq!(body["users/old"], Value::Null);
        assert!(
            !body.keys().any(|k| k.starts_with("users/new/")),
            "never a path and its ancestor"
        );
    }

    #[test]
    fn admin_count_is_absolute_and_ip_merge_is_separate() {
        let cache = cache_with("t");
        let r = cache.get("t").unwrap();
        cache.admit_ip(&r, "1.2.3.4".parse().unwrap(), 0, 0);
        let patch: crate::users::UserPatch =
            serde_json::from_value(json!({"promptCount": 40})).unwrap();
        cache.upsert("t", &patch, 1);
        let taken = cache.take_changes(10);
        assert!(needs_ip_merge(&taken.changes[0], None));
        let entries = entries(&layout(), &taken.changes[0], None);
        assert_eq!(entries, vec![("users/t/promptCount".into(), json!(40))]);
        // An admin's replacement of the list is a plain leaf.
        let patch: crate::users::UserPatch = serde_json::from_value(json!({"ip": []})).unwrap();
        cache.upsert("t", &patch, 1);
        let taken = cache.take_changes(10);
        assert!(!needs_ip_merge(&taken.changes[0], None));
        assert_eq!(
            super::entries(&layout(), &taken.changes[0], None),
            vec![("users/t/ip".into(), Value::Null)]
        );
    }

    #[test]
    fn ip_merge_is_a_union() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(merge_ips(&s(&["1.1.1.1"]), &s(&["1.1.1.1"])), None);
        assert_eq!(
            merge_ips(
                &s(&["1.1.1.1", "risu1-2.2.2.2"]),
                &s(&["3.3.3.3", "1.1.1.1"])
            ),
            Some(s(&["1.1.1.1", "risu1-2.2.2.2", "3.3.3.3"]))
        );
        assert_eq!(merge_ips(&s(&["::ffff:1.1.1.1"]), &s(&["1.1.1.1"])), None);
    }

    #[test]
    fn bisection_isolates_every_bad_change() {
        for bad in [vec![], vec![0], vec![6], vec![2, 3], vec![0, 4, 6]] {
            let mut b = Bisection::new((0..7).collect());
            let (mut written, mut refused, mut writes) = (Vec::new(), Vec::new(), 0);
            while let Some(group) = b.next_group() {
                writes += 1;
                if group.iter().any(|i| bad.contains(i)) {
                    refused.extend(b.refused(group));
                } else {
                    written.extend(group);
                }
            }
            written.sort();
            refused.sort();
            assert_eq!(refused, bad);
            assert_eq!(written.len() + refused.len(), 7);
            assert!(writes <= 1 + 2 * 7, "{writes} writes for {bad:?}");
        }
    }
}
