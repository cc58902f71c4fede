//! Users as rows: `promptCount` and `lastUsedAt` in the integer columns `prompt_count` and
//! `last_used_at`, everything else in `doc` as the older proxy's JSON without those two fields.
//!
//! Counted requests are written as increments (`prompt_count + delta`), so two processes on
//! one file (the old and the new one during a graceful upgrade) add up instead of overwriting
//! each other; the `flushes` table makes each increment apply once. An absolute value is
//! written for a new user and for an admin's `promptCount`.

use std::sync::Arc;

use crate::users::{Change, Fields, User};

/// Fields that live in the counter columns: a change of only these does not touch `doc`.
const COUNTER_FIELDS: Fields =
    Fields(Fields::PROMPT_DELTA.0 | Fields::PROMPT_COUNT.0 | Fields::LAST_USED_AT.0);

/// One statement of a flush, prepared off the database thread.
pub(super) enum Op {
    /// The whole row: a new user, or a profile field changed.
    Put {
        token: Arc<str>,
        counters: Counters,
        doc: String,
    },
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
            let profile_changed = c.fields.contains(Fields::CREATED)
                || c.fields.intersects(Fields(!COUNTER_FIELDS.0));
            if profile_changed {
                Ok(Op::Put {
                    token,
                    counters,
                    doc: doc_of(&c.user).map_err(|e| e.to_string())?,
                })
            } else {
                Ok(Op::Counters { token, counters })
            }
        }
    }
}

/// `doc` for a user: its JSON without the counter fields.
pub(super) fn doc_of(user: &User) -> serde_json::Result<String> {
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
