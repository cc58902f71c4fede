//! Users as rows: `promptCount` and `lastUsedAt` in the integer columns `prompt_count` and
//! `last_used_at`, everything else in `doc` as the older proxy's JSON without those two fields.
//!
//! Counted requests are written as increments (`prompt_count + delta`), so two processes on
//! one file (the old and the new one during a graceful upgrade) add up instead of overwriting
//! each other; the `flushes` table makes each increment apply once. An absolute value is
//! written for a new user and for an admin's `promptCount`.
//!
//! A user that exists is written field by field, as Firebase's leaves: only the fields this
//! process changed go into the stored `doc`, read in the flush's transaction, and addresses
//! requests added are merged into the stored `ip` list. Another client's edit of other fields
//! (an operator's `sqlite3`, the other process of an upgrade) that this process has not read
//! back yet is kept, and a user deleted elsewhere is not brought back.

use std::sync::Arc;

use crate::store::firebase::batch::merge_ips;
use crate::users::{Change, Fields, User};

/// Fields that live in the counter columns: a change of only these does not touch `doc`.
const COUNTER_FIELDS: Fields =
    Fields(Fields::PROMPT_DELTA.0 | Fields::PROMPT_COUNT.0 | Fields::LAST_USED_AT.0);

/// One statement of a flush, prepared off the database thread.
pub(super) enum Op {
    /// The whole row: a new user, whose token cannot exist in the file.
    Put {
        token: Arc<str>,
        counters: Counters,
        doc: String,
    },
    /// Profile fields changed: merged into the stored row, see [`Edit`].
    Edit(Box<Edit>),
    /// Only counters changed.
    Counters {
        token: Arc<str>,
        counters: Counters,
    },
    Delete {
        token: Arc<str>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Counters {
    /// The user's `promptCount` when the change was taken: written for a row that is new, or
    /// when `absolute`.
    pub prompt_count: i64,
    /// Requests counted since the previous write: added to the stored count otherwise.
    pub delta: i64,
    /// The count was set (new user, admin edit), not counted up.
    pub absolute: bool,
    pub last_used_at: Option<i64>,
}

impl Counters {
    fn of(user: &User, delta: u64, absolute: bool) -> Result<Self, String> {
        let prompt_count = i64::try_from(user.prompt_count)
            .map_err(|_| format!("promptCount {} is too large to store", user.prompt_count))?;
        let delta = i64::try_from(delta).map_err(|_| format!("{delta} requests is too many"))?;
        let last_used_at = user
            .last_used_at
            .map(|at| i64::try_from(at).map_err(|_| format!("lastUsedAt {at} is too large")))
            .transpose()?;
        Ok(Self {
            prompt_count,
            delta,
            absolute,
            last_used_at,
        })
    }
}

/// The changed fields of a user, for the stored row.
pub(super) struct Edit {
    pub token: Arc<str>,
    pub counters: Counters,
    /// The fields this process changed; their values are in `doc` (read from it only when
    /// the row exists, so that creating a user costs one serialisation).
    pub fields: Fields,
    /// Addresses requests added, merged into the stored `ip` list.
    pub ip_added: Vec<String>,
    /// The whole user: written when the row is absent and `create` (an upsert may create), or
    /// when the stored `doc` is not a JSON object (it could not be read anyway).
    pub doc: String,
    pub create: bool,
}

impl Edit {
    /// The stored `doc` with this edit's fields; `None` when the stored one is not an object.
    pub fn merge_into(&self, stored: &str) -> Option<String> {
        let serde_json::Value::Object(mut doc) = serde_json::from_str(stored).ok()? else {
            return None;
        };
        let serde_json::Value::Object(ours) = serde_json::from_str(&self.doc).ok()? else {
            return None;
        };
        for (name, value) in leaves(ours, self.fields) {
            match value {
                Some(value) => doc.insert(name.to_string(), value),
                None => doc.shift_remove(name),
            };
        }
        if !self.ip_added.is_empty() {
            let listed: Vec<String> = match doc.get("ip") {
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if let Some(merged) = merge_ips(&listed, &self.ip_added) {
                doc.insert("ip".into(), merged.into());
            }
        }
        serde_json::to_string(&doc).ok()
    }
}

/// The statement for one change; `Err` names why this user can never be written.
pub(super) fn encode(change: &Change) -> Result<Op, String> {
    match change {
        Change::Delete { token } => Ok(Op::Delete {
            token: Arc::clone(token),
        }),
        Change::Upsert(c) => {
            let absolute = c.fields.intersects(Fields::CREATED | Fields::PROMPT_COUNT);
            let counters = Counters::of(&c.user, c.prompt_delta, absolute)?;
            let token = Arc::clone(c.record.token());
            let whole = c.fields.contains(Fields::CREATED) && !c.fields.contains(Fields::UPSERTED);
            if !whole && !c.fields.intersects(Fields(!COUNTER_FIELDS.0)) {
                return Ok(Op::Counters { token, counters });
            }
            let doc = doc_of(&c.user).map_err(|e| e.to_string())?;
            if whole {
                return Ok(Op::Put {
                    token,
                    counters,
                    doc,
                });
            }
            Ok(Op::Edit(Box::new(Edit {
                token,
                // An existing row keeps its count (plus the requests), unless an admin set it;
                // a row created by the upsert gets this whole user, count included.
                counters: Counters {
                    absolute: c.fields.contains(Fields::PROMPT_COUNT),
                    ..counters
                },
                fields: c.fields,
                ip_added: if c.fields.contains(Fields::IP_REPLACED) {
                    Vec::new()
                } else {
                    c.ip_added.clone()
                },
                doc,
                create: c.fields.contains(Fields::CREATED),
            })))
        }
    }
}

/// The changed profile fields of a user's `doc`. `ip` only when an admin replaced the list:
/// addresses requests added are merged instead.
fn leaves(
    mut json: serde_json::Map<String, serde_json::Value>,
    fields: Fields,
) -> Vec<(&'static str, Option<serde_json::Value>)> {
    let replaced_ip = fields.contains(Fields::IP_REPLACED);
    Fields::NAMED
        .iter()
        .filter(|(bit, _)| fields.contains(*bit) && !COUNTER_FIELDS.contains(*bit))
        .filter(|(bit, _)| *bit != Fields::IP || replaced_ip)
        .map(|(_, name)| (*name, json.shift_remove(*name)))
        .collect()
}

/// `doc` for a user: its JSON without the counter fields, which live in their own columns.
fn doc_of(user: &User) -> serde_json::Result<String> {
    let mut value = serde_json::to_value(user)?;
    if let Some(object) = value.as_object_mut() {
        object.shift_remove("promptCount");
        object.shift_remove("lastUsedAt");
    }
    serde_json::to_string(&value)
}

/// A stored row back to a user; `Err` says what is wrong with it.
pub(super) fn decode(
    token: &str,
    prompt_count: i64,
    last_used_at: Option<i64>,
    doc: &str,
) -> Result<User, String> {
    let mut user: User =
        serde_json::from_str(doc).map_err(|e| format!("doc is not a valid user: {e}"))?;
    if user.token != token {
        return Err("doc names a different token than the row".into());
    }
    user.prompt_count = u64::try_from(prompt_count)
        .map_err(|_| format!("prompt_count {prompt_count} is negative"))?;
    user.last_used_at = last_used_at
        .map(|at| u64::try_from(at).map_err(|_| format!("last_used_at {at} is negative")))
        .transpose()?;
    Ok(user)
}
