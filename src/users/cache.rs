//! The in-process user cache shared by the proxy workers, the admin API and the store sync.
//!
//! Reads are lock-free (a concurrent hash map with epoch-based reclamation, and per-user
//! profiles behind `ArcSwap`), so neither admin writes nor sync ever make a request wait.
//! Every local change marks the user and puts it once in a lock-free queue; the store-sync
//! engine drains that queue into batches. Changes that come *from* the store are applied
//! without being queued, and never overwrite a local edit the store has not confirmed.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use parking_lot::{Mutex, RwLock};

use super::fields::Fields;
use super::model::User;
use super::patch::UserPatch;
use super::profile::Profile;
use super::record::{IpAdmission, UserRecord};
use super::table::{Lookup, RecordTable};

/// Identifies a local change; a store confirms changes up to a ticket.
pub type ChangeTicket = u64;

enum Queued {
    User(Arc<UserRecord>),
    Deleted(Arc<str>),
}

/// One user's changes, taken from the cache for a store write.
#[derive(Clone, Debug)]
pub enum Change {
    Upsert(Box<UserChange>),
    Delete { token: Arc<str> },
}

impl Change {
    pub fn token(&self) -> &Arc<str> {
        match self {
            Change::Upsert(c) => c.record.token(),
            Change::Delete { token } => token,
        }
    }

    /// The change creates its user (writes it whole).
    pub fn is_creation(&self) -> bool {
        matches!(self, Change::Upsert(c) if c.fields.contains(Fields::CREATED))
    }

    /// What is left of this change once all of it but the addresses requests added to the
    /// `ip` list is written ([`UserCache::acknowledge_except_ips`]): those addresses alone.
    pub fn ip_additions_only(&self) -> Option<Change> {
        let Change::Upsert(c) = self else {
            return None;
        };
        (!c.ip_added.is_empty()).then(|| {
            Change::Upsert(Box::new(UserChange {
                record: Arc::clone(&c.record),
                user: c.user.clone(),
                fields: Fields::IP,
                prompt_delta: 0,
                ip_added: c.ip_added.clone(),
            }))
        })
    }
}

#[derive(Clone)]
pub struct UserChange {
    pub record: Arc<UserRecord>,
    /// The user as it was when the change was taken; `promptCount` includes `prompt_delta`.
    pub user: User,
    /// Fields edited locally (`CREATED`: write the whole user).
    pub fields: Fields,
    /// Requests counted since the previous write.
    pub prompt_delta: u64,
    /// Addresses requests added to the `ip` list since it was last written: what a store
    /// that merges lists adds to its stored list (not the whole local list).
    pub ip_added: Vec<String>,
}

impl std::fmt::Debug for UserChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never print it.
        f.debug_struct("UserChange")
            .field("fields", &self.fields)
            .field("prompt_delta", &self.prompt_delta)
            .field("ip_added", &self.ip_added.len())
            .finish_non_exhaustive()
    }
}

/// Changes taken for one write, and the newest ticket they cover.
#[derive(Debug, Default)]
pub struct TakenChanges {
    pub changes: Vec<Change>,
    /// Every change with a ticket up to this one is in `changes` (or an earlier write), unless
    /// `None`: the queue held more than was taken.
    pub covers: Option<ChangeTicket>,
    /// The newest ticket issued when these were taken: a change in `changes` includes every
    /// edit of its user with a ticket up to this one, and none with a later one.
    pub taken_at: ChangeTicket,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("a user with this token already exists")]
    Exists,
    #[error("no user with this token")]
    NotFound,
    /// A conditional removal found the user changed so that it no longer applies.
    #[error("the user changed; not removed")]
    Changed,
}

/// A user whose store value the change stream is to apply again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reread {
    pub token: Arc<str>,
    /// The store refused to create this user: when the store does not hold it, it is removed
    /// here. Otherwise a user the store does not show yet is kept (its creation may not have
    /// come back on the stream yet).
    pub creation_refused: bool,
}

pub struct UserCache {
    /// Records found by token (`table.rs`): lock-free reads, one pointer per user.
    map: RecordTable,
    queue: SegQueue<Queued>,
    /// Bumped (after queueing) by every change someone may wait for.
    tickets: AtomicU64,
    /// Edits that take a ticket hold this shared, a take holds it alone: an edit is then
    /// wholly before a take (taken with it, its ticket covered by the take's `taken_at`) or
    /// wholly after it. An edit landing in the middle of a take was taken with it under a
    /// later ticket, and the store's refusal of it never reached the admin waiting on that
    /// ticket, who was answered "persisted". Proxy requests never take it.
    edits: RwLock<()>,
    /// Serialises inserts and removals between admin and sync; readers never take it.
    structure: Mutex<()>,
    /// Tokens removed locally whose removal the store has not confirmed yet.
    deleting: Mutex<HashSet<Arc<str>>>,
    /// Users whose store value must be applied again ([`UserCache::take_rereads`]).
    rereads: Mutex<Vec<Reread>>,
    reread_wanted: tokio::sync::Notify,
    /// Records the store's changes removed, by token, until the store brings the user back
    /// (their requests counted meanwhile go to the new record), a full snapshot starts (one
    /// that lacks the user too says it is gone), or [`REMOVED_KEPT_FOR`] has passed.
    removed_by_store: Mutex<RemovedByStore>,
    /// Store confirmations so far (one per [`acknowledge`](Self::acknowledge) that confirmed a
    /// user's write); each record keeps the count of its latest ([`UserRecord::confirmed_at`]).
    confirmations: AtomicU64,
    /// Users a full snapshot lacked but that were kept until the store is asked about them
    /// ([`remove_absent_remote`](Self::remove_absent_remote)), with the snapshot's number; a
    /// store change of the user settles it first.
    unverified: Mutex<Unverified>,
}

#[derive(Default)]
struct Unverified {
    users: HashMap<Arc<str>, u64>,
    snapshots: u64,
}

/// Users a full snapshot lacked but that were kept, to be looked up in the store
/// ([`UserCache::settle_absent`]).
#[derive(Debug, Default)]
pub struct KeptAbsent {
    /// The snapshot (numbered by the cache).
    pub snapshot: u64,
    pub tokens: Vec<Arc<str>>,
}

/// What [`UserCache::settle_absent`] made of the store's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Nothing more to do: kept, removed, or settled by a store change meanwhile.
    Done,
    /// A write of the user was confirmed after the store was asked: the answer may lack it.
    AskAgain,
}

/// How long a record the store removed waits for the user to come back. The events that bring
/// it back follow the stale snapshot that removed it within seconds; a user still gone after
/// this is gone for good, and its record (with the requests counted on it) is dropped, so
/// removals between two snapshots do not pile up for the life of a stream.
const REMOVED_KEPT_FOR: Duration = Duration::from_secs(300);

/// Records the store's changes removed, by token, with when.
#[derive(Default)]
struct RemovedByStore {
    records: HashMap<Arc<str>, (Instant, Arc<UserRecord>)>,
    pruned_at: Option<Instant>,
}

impl RemovedByStore {
    /// Keeps `record`, first dropping those kept longer than [`REMOVED_KEPT_FOR`] (a sweep at
    /// most once per that period, so at most two periods' removals are held).
    fn insert(&mut self, record: Arc<UserRecord>, now: Instant) {
        if self
            .pruned_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REMOVED_KEPT_FOR)
        {
            self.records
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < REMOVED_KEPT_FOR);
            self.pruned_at = Some(now);
        }
        self.records
            .insert(Arc::clone(record.token()), (now, record));
    }

    fn take(&mut self, token: &str) -> Option<Arc<UserRecord>> {
        self.records.remove(token).map(|(_, record)| record)
    }

    fn clear(&mut self) {
        self.records.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }
}

impl Default for UserCache {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl UserCache {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            map: RecordTable::with_capacity(capacity),
            queue: SegQueue::new(),
            tickets: AtomicU64::new(0),
            edits: RwLock::new(()),
            structure: Mutex::new(()),
            deleting: Mutex::new(HashSet::new()),
            rereads: Mutex::new(Vec::new()),
            reread_wanted: tokio::sync::Notify::new(),
            removed_by_store: Mutex::new(RemovedByStore::default()),
            confirmations: AtomicU64::new(0),
            unverified: Mutex::new(Unverified::default()),
        }
    }

    /// The hot-path lookup: lock-free.
    #[inline]
    pub fn get(&self, token: &str) -> Option<Arc<UserRecord>> {
        self.map.get(token)
    }

    /// The keyed hash [`lookup`](Self::lookup) computes for `token`.
    pub fn token_hash(&self, token: &str) -> u64 {
        self.map.hash(token)
    }

    /// Starts a lookup: hashes the token and starts loading the memory the lookup will read,
    /// so that other work can run meanwhile; [`Lookup::get`] finishes it. Its
    /// [`hash`](Lookup::hash) is a keyed hash of the token, usable as the user's limit key.
    #[inline]
    pub fn lookup<'a>(&'a self, token: &'a str) -> Lookup<'a> {
        self.map.lookup(token)
    }

    pub fn user(&self, token: &str) -> Option<User> {
        self.get(token).map(|r| r.to_user())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every user, in no particular order.
    pub fn snapshot(&self) -> Vec<User> {
        let mut users = Vec::with_capacity(self.len());
        self.map.for_each(|r| users.push(r.to_user()));
        users
    }

    /// Calls `f` for every record (maintenance jobs).
    pub fn for_each(&self, f: impl FnMut(&Arc<UserRecord>)) {
        self.map.for_each(f);
    }

    /// Users waiting in the change queue (approximate while others push).
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    // ---------------------------------------------------------------- local changes

    /// A local edit of `fields`: protected from concurrent store changes from before it lands
    /// until the write queued after it is confirmed.
    fn edit_marked<R>(
        &self,
        record: &Arc<UserRecord>,
        fields: Fields,
        edit: impl FnMut(&mut Profile) -> R,
    ) -> R {
        record.protect(fields);
        let result = record.edit(edit);
        self.mark(record, fields);
        result
    }

    fn mark(&self, record: &Arc<UserRecord>, fields: Fields) {
        if record.mark(fields) {
            self.queue.push(Queued::User(Arc::clone(record)));
        }
    }

    fn ticket(&self) -> ChangeTicket {
        self.tickets.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// One request answered successfully by the upstream: `promptCount + 1`, `lastUsedAt = now`.
    #[inline]
    pub fn count_request(&self, record: &Arc<UserRecord>, now_ms: u64) {
        let fields = record.count_request(now_ms);
        self.mark(record, fields);
    }

    /// The user authenticated (its request may still be refused or fail upstream):
    /// `lastUsedAt = now`, as the older proxy set it on every successful authentication.
    #[inline]
    pub fn touch(&self, record: &Arc<UserRecord>, now_ms: u64) {
        let fields = record.touch(now_ms);
        self.mark(record, fields);
    }

    /// Checks and records the request's IP; see [`IpAdmission`].
    #[inline]
    pub fn admit_ip(
        &self,
        record: &Arc<UserRecord>,
        ip: IpAddr,
        limit: u32,
        record_at_most: u32,
    ) -> IpAdmission {
        let outcome = record.admit_ip(ip, limit, record_at_most);
        if outcome == IpAdmission::Added {
            self.mark(record, Fields::IP);
        }
        outcome
    }

    /// Auto-ban: records the IP and disables the user with `reason`. No ticket: nobody waits
    /// for it to be written, and a proxy request must not wait for a take (the `edits` lock).
    pub fn ban_for_ips(&self, record: &Arc<UserRecord>, ip: IpAddr, reason: &str, now_ms: u64) {
        let fields = Fields::IP | Fields::DISABLED_AT | Fields::DISABLED_REASON | Fields::META;
        record.protect(fields);
        record.admit_ip(ip, 0, 0);
        self.edit_marked(record, fields, |p| disable_profile(p, Some(reason), now_ms));
    }

    /// Adds a new user; refuses an existing token.
    pub fn create(&self, user: &User) -> Result<ChangeTicket, CacheError> {
        let _edit = self.edits.read();
        let _guard = self.structure.lock();
        if self.map.contains(user.token.as_str()) {
            return Err(CacheError::Exists);
        }
        self.insert_created(Arc::new(UserRecord::from_user(user)), None);
        Ok(self.ticket())
    }

    /// `upserted`: the fields of the upsert that created the user from a token unknown here
    /// (see [`Fields::UPSERTED`]); `None` for a token that cannot exist in the store.
    fn insert_created(&self, record: Arc<UserRecord>, upserted: Option<Fields>) {
        let recreated = self.deleting.lock().remove(record.token());
        self.map.insert(Arc::clone(&record));
        let fields = match upserted {
            // Removed here and not yet confirmed: this instance knew the user, and the
            // removal plus re-creation is a replacement.
            Some(patched) if !recreated => Fields::CREATED | Fields::UPSERTED | patched,
            _ => Fields::CREATED | Fields::ALL,
        };
        self.mark(&record, fields);
    }

    /// Partial upsert (`PUT`): creates the user from defaults when missing. The patch must be
    /// validated already.
    pub fn upsert(&self, token: &str, patch: &UserPatch, now_ms: u64) -> (User, ChangeTicket) {
        let _edit = self.edits.read();
        let user = self.upsert_one(token, patch, now_ms);
        (user, self.ticket())
    }

    /// The bulk import: every patch is applied, then one ticket covers them all.
    pub fn upsert_many(
        &self,
        items: &[(String, UserPatch)],
        now_ms: u64,
    ) -> (Vec<User>, ChangeTicket) {
        let _edit = self.edits.read();
        let users = items
            .iter()
            .map(|(token, patch)| self.upsert_one(token, patch, now_ms))
            .collect();
        (users, self.ticket())
    }

    fn upsert_one(&self, token: &str, patch: &UserPatch, now_ms: u64) -> User {
        loop {
            let guard = self.structure.lock();
            let Some(record) = self.map.get(token) else {
                let mut user = User::new(token.to_string(), Default::default(), now_ms);
                patch.apply_to(&mut user);
                let record = Arc::new(UserRecord::from_user(&user));
                self.insert_created(Arc::clone(&record), Some(patch.fields()));
                // As stored (zero family entries are not kept), like an existing user's answer.
                return record.to_user();
            };
            drop(guard);
            if let Some(user) = self.upsert_existing(&record, patch) {
                return user;
            }
            // The record was removed (a hard delete, or by the store) while it was edited:
            // the edit went with it, so the PUT runs again and creates the user.
        }
    }

    /// Applies `patch` to a record found in the map; `None` when the record turns out to have
    /// been removed meanwhile (its change is never written, so answering with it would confirm
    /// an edit of a user that no longer exists).
    fn upsert_existing(&self, record: &Arc<UserRecord>, patch: &UserPatch) -> Option<User> {
        let token = record.token();
        let fields = patch.fields();
        record.protect(fields);
        record.edit(|profile| {
            let mut user = profile.to_user(token, 0, None);
            patch.apply_to(&mut user);
            *profile = Profile::from_user(&user);
        });
        if let super::patch::Patch::Set(count) = patch.prompt_count {
            record.set_prompt_count(count);
        }
        match patch.last_used_at {
            super::patch::Patch::Absent => {}
            super::patch::Patch::Null => record.set_last_used_at(None),
            super::patch::Patch::Set(at) => record.set_last_used_at(Some(at)),
        }
        if !fields.is_empty() {
            self.mark(record, fields);
        }
        // Checked after the mark: a removal before it means the change is skipped.
        (!record.is_deleted()).then(|| record.to_user())
    }

    /// `DELETE` without `hard`: disables, as the older proxy did.
    pub fn disable(
        &self,
        token: &str,
        reason: Option<&str>,
        now_ms: u64,
    ) -> Result<(User, ChangeTicket), CacheError> {
        let _edit = self.edits.read();
        let record = self.get(token).ok_or(CacheError::NotFound)?;
        let user = self.disable_record(&record, reason, now_ms)?;
        Ok((user, self.ticket()))
    }

    /// Disables a record found in the map; `NotFound` when it was removed meanwhile (its
    /// change is never written), as if the lookup had missed it.
    fn disable_record(
        &self,
        record: &Arc<UserRecord>,
        reason: Option<&str>,
        now_ms: u64,
    ) -> Result<User, CacheError> {
        self.edit_marked(
            record,
            Fields::DISABLED_AT | Fields::DISABLED_REASON | Fields::META,
            |p| disable_profile(p, reason, now_ms),
        );
        if record.is_deleted() {
            return Err(CacheError::NotFound);
        }
        Ok(record.to_user())
    }

    /// `DELETE ?hard=true`: removes the user everywhere.
    pub fn remove(&self, token: &str) -> Result<ChangeTicket, CacheError> {
        self.remove_if(token, |_| true)
    }

    /// Removes the user only if `still` holds for its current record, checked under the lock
    /// removals take: a job that decided from an earlier snapshot (the purge) must not remove
    /// a user an admin changed since.
    pub fn remove_if(
        &self,
        token: &str,
        still: impl FnOnce(&UserRecord) -> bool,
    ) -> Result<ChangeTicket, CacheError> {
        let _edit = self.edits.read();
        let _guard = self.structure.lock();
        let current = self.map.get(token).ok_or(CacheError::NotFound)?;
        if !still(&current) {
            return Err(CacheError::Changed);
        }
        let record = self.map.remove(token).ok_or(CacheError::NotFound)?;
        record.mark_deleted();
        self.deleting.lock().insert(Arc::clone(record.token()));
        self.queue.push(Queued::Deleted(Arc::clone(record.token())));
        Ok(self.ticket())
    }

    // ---------------------------------------------------------------- from the store

    /// Fills the cache at start-up; nothing is queued.
    pub fn load(&self, users: impl IntoIterator<Item = User>) -> usize {
        let _guard = self.structure.lock();
        let mut loaded = 0;
        for user in users {
            self.map.insert(Arc::new(UserRecord::from_user(&user)));
            loaded += 1;
        }
        loaded
    }

    /// The store's current state of one user (`None`: removed there).
    pub fn apply_remote(&self, token: &str, remote: Option<&User>) {
        let _guard = self.structure.lock();
        self.apply_remote_locked(token, remote);
    }

    fn apply_remote_locked(&self, token: &str, remote: Option<&User>) {
        // A store change of a user kept unverified is newer than the snapshot that lacked it.
        {
            let mut unverified = self.unverified.lock();
            if !unverified.users.is_empty() {
                unverified.users.remove(token);
            }
        }
        match (self.map.get(token), remote) {
            (Some(record), Some(user)) => record.apply_remote(user),
            (Some(record), None) => {
                // A user created here and not yet written is not "deleted remotely".
                if !record.unconfirmed_fields().contains(Fields::CREATED) {
                    self.map.remove(token);
                    record.mark_removed_by_store();
                    self.removed_by_store.lock().insert(record, Instant::now());
                }
            }
            (None, Some(user)) => {
                if !self.deleting.lock().contains(token) {
                    let record = Arc::new(UserRecord::from_user(user));
                    self.map.insert(Arc::clone(&record));
                    if let Some(removed) = self.removed_by_store.lock().take(token) {
                        self.carry_counts(&removed, &record);
                    }
                }
            }
            (None, None) => {}
        }
    }

    /// The store refused to create this user and does not hold it. A user edited again since
    /// that write was taken is kept and written whole, as a new user, by the next flush (the
    /// newer edit was confirmed to the admin who made it); one without newer edits is removed.
    pub fn undo_refused_creation(&self, token: &str) {
        let _guard = self.structure.lock();
        let Some(record) = self.map.get(token) else {
            return;
        };
        if record.unconfirmed_fields().is_empty() {
            self.map.remove(token);
            record.mark_deleted();
        } else {
            self.mark(&record, Fields::CREATED);
        }
    }

    /// A full snapshot from the store (e.g. after a reconnect): users missing from it are
    /// removed here too, unless they were created here and are not written yet.
    pub fn replace_all_remote(&self, users: &HashMap<String, User>) {
        let _guard = self.structure.lock();
        self.remove_absent_locked(|token| users.contains_key(token));
        for (token, user) in users {
            self.apply_remote_locked(token, Some(user));
        }
    }

    /// Store confirmations so far. A change stream takes it before it asks for a connection:
    /// see [`remove_absent_remote`](Self::remove_absent_remote).
    pub fn confirmations(&self) -> u64 {
        self.confirmations.load(Ordering::Acquire)
    }

    /// Ends a full snapshot from a change stream whose users were applied one at a time with
    /// [`apply_remote`](Self::apply_remote). The snapshot is asked about each user rather than
    /// handed over as a map of its users, which would hold all of them once more.
    ///
    /// Such a snapshot shows the store at some point after the connection was asked for, and
    /// may arrive after this instance's later writes were confirmed (their events follow it):
    /// it can be older than what the cache knows. A user it does not hold (`held` is false) is
    /// removed at once only if it has no unconfirmed edits and no write of it was confirmed
    /// since `opened_at` ([`confirmations`](Self::confirmations) taken before the connection
    /// was asked for). The others are kept, and returned: the caller asks the store about
    /// each and hands the answer to [`settle_absent`](Self::settle_absent) (a removal made
    /// elsewhere before the snapshot brings no event after it).
    pub fn remove_absent_remote(&self, held: impl Fn(&str) -> bool, opened_at: u64) -> KeptAbsent {
        let _guard = self.structure.lock();
        let gone = self.absent_locked(held);
        let mut kept = KeptAbsent::default();
        let mut removed = Vec::new();
        {
            let mut unverified = self.unverified.lock();
            unverified.users.clear();
            unverified.snapshots += 1;
            kept.snapshot = unverified.snapshots;
            for token in gone {
                let Some(record) = self.map.get(&token) else {
                    continue;
                };
                // Unconfirmed edits first: a confirmation sets `confirmed_at` before it clears
                // them, so one of the two shows a write confirmed meanwhile.
                if !record.unconfirmed_fields().is_empty() || record.confirmed_at() > opened_at {
                    unverified.users.insert(Arc::clone(&token), kept.snapshot);
                    kept.tokens.push(token);
                } else {
                    removed.push(token);
                }
            }
        }
        for token in removed {
            self.apply_remote_locked(&token, None);
        }
        kept
    }

    /// The store's answer about a user snapshot `snapshot` lacked and kept (`held`: the store
    /// holds it as a user), asked when [`confirmations`](Self::confirmations) was `asked_at`.
    /// A user the store does not hold is removed, unless it was created here and is not
    /// written yet, or a write of it was confirmed since `asked_at` (then it is to be asked
    /// about again). Nothing happens when a store change of the user, or a newer snapshot,
    /// came meanwhile.
    pub fn settle_absent(&self, token: &str, snapshot: u64, held: bool, asked_at: u64) -> Settled {
        let _guard = self.structure.lock();
        let mut unverified = self.unverified.lock();
        if unverified.users.get(token) != Some(&snapshot) {
            return Settled::Done;
        }
        let record = self.map.get(token);
        if let Some(record) = record.filter(|_| !held) {
            if record.unconfirmed_fields().contains(Fields::CREATED) {
                // Its creation's write settles it.
            } else if record.confirmed_at() > asked_at {
                return Settled::AskAgain;
            } else {
                drop(unverified);
                self.apply_remote_locked(token, None);
                return Settled::Done;
            }
        }
        unverified.users.remove(token);
        Settled::Done
    }

    /// A full read from a store that takes it in one transaction (SQLite's read-back), with
    /// every change of this process confirmed or still queued: it is never older than the
    /// cache, and the users it lacks are removed here too, unless they were created here and
    /// are not written yet.
    fn remove_absent_locked(&self, held: impl Fn(&str) -> bool) {
        for token in self.absent_locked(held) {
            self.apply_remote_locked(&token, None);
        }
    }

    /// The users a full snapshot lacks. Users the store removed before it and it does not
    /// hold are gone for good.
    fn absent_locked(&self, held: impl Fn(&str) -> bool) -> Vec<Arc<str>> {
        self.removed_by_store.lock().clear();
        let mut gone: Vec<Arc<str>> = Vec::new();
        self.map.for_each(|r| {
            if !held(r.token()) {
                gone.push(Arc::clone(r.token()));
            }
        });
        gone
    }

    // ---------------------------------------------------------------- the flush cycle

    /// Takes up to `max_users` users' pending changes for one store write.
    pub fn take_changes(&self, max_users: usize) -> TakenChanges {
        self.take_changes_after(Vec::new(), max_users)
    }

    /// [`take_changes`](Self::take_changes), after `held`: changes taken for an earlier write
    /// that the store held back (their user's write failed alone, the rest were written),
    /// still in flight and not acknowledged. A user's held change and its newer changes
    /// become one, as a user queued twice in one take does; up to `max_users` more users are
    /// taken, so held changes never crowd out the others.
    pub fn take_changes_after(&self, held: Vec<Change>, max_users: usize) -> TakenChanges {
        let _no_edits = self.edits.write();
        let covers = self.tickets.load(Ordering::Acquire);
        let mut changes: Vec<Change> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        for change in held {
            merge_into(&mut changes, &mut index, change);
        }
        let max_users = changes.len().saturating_add(max_users);
        while changes.len() < max_users {
            let Some(item) = self.queue.pop() else {
                return TakenChanges {
                    changes,
                    covers: Some(covers),
                    taken_at: covers,
                };
            };
            let change = match item {
                Queued::Deleted(token) => Change::Delete { token },
                Queued::User(record) if record.is_deleted() => {
                    self.carry_counts_of_removed(&record);
                    continue;
                }
                Queued::User(record) => take_user_change(record),
            };
            merge_into(&mut changes, &mut index, change);
        }
        let taken_at = covers;
        let covers = self.queue.is_empty().then_some(covers);
        TakenChanges {
            changes,
            covers,
            taken_at,
        }
    }

    /// Requests counted on a record the store's change removed go to the record that holds
    /// the user now, if the store brought it back: a stream snapshot older than the user (one
    /// that was slow to arrive) removes it, and the events behind it bring it back as a new
    /// record. Dropped with the old record, those requests were answered and never counted.
    /// Until the user is back, they stay on the old record, and go over when it comes back
    /// (see `apply_remote_locked`). A user removed here, or gone for good, counts nothing
    /// more.
    fn carry_counts_of_removed(&self, removed: &Arc<UserRecord>) {
        if !removed.removed_by_store() {
            return;
        }
        match self.map.get(removed.token()) {
            Some(current) if !Arc::ptr_eq(&current, removed) => {
                self.carry_counts(removed, &current)
            }
            // Not back yet: counted when it is. Requests counted on it meanwhile must queue
            // it again, so it leaves the queue's mark.
            _ => removed.unqueue(),
        }
    }

    fn carry_counts(&self, removed: &Arc<UserRecord>, current: &Arc<UserRecord>) {
        let (_, requests, _) = removed.take_pending();
        if requests > 0 {
            current.add_counted(requests);
            self.mark(current, Fields::PROMPT_DELTA);
        }
    }

    /// The store confirmed `changes`; `fold_counters` is false for stores that echo totals.
    pub fn acknowledge(&self, changes: &[Change], fold_counters: bool) {
        self.acknowledge_with(changes, fold_counters, false);
    }

    /// The store wrote `changes` except the addresses requests added to their users' `ip`
    /// lists (a merge that failed for that user alone): those stay in flight, for
    /// [`Change::ip_additions_only`] to carry to the next write.
    pub fn acknowledge_except_ips(&self, changes: &[Change], fold_counters: bool) {
        self.acknowledge_with(changes, fold_counters, true);
    }

    fn acknowledge_with(&self, changes: &[Change], fold_counters: bool, keep_ips: bool) {
        let mut deleting = self.deleting.lock();
        let mut rereads = Vec::new();
        let mut confirmation = None;
        for change in changes {
            match change {
                Change::Upsert(c) => {
                    // Before the fields stop being unconfirmed (see `remove_absent_remote`).
                    let n = *confirmation.get_or_insert_with(|| {
                        self.confirmations.fetch_add(1, Ordering::AcqRel) + 1
                    });
                    c.record.set_confirmed_at(n);
                    if c.record
                        .acknowledge(c.fields, c.prompt_delta, fold_counters, keep_ips)
                    {
                        rereads.push(Reread {
                            token: Arc::clone(c.record.token()),
                            creation_refused: false,
                        });
                    }
                }
                Change::Delete { token } => {
                    deleting.remove(token);
                }
            }
        }
        drop(deleting);
        self.reread(rereads);
    }

    /// Asks the change stream to apply the store's value of these users again.
    pub fn reread(&self, users: impl IntoIterator<Item = Reread>) {
        let mut rereads = self.rereads.lock();
        let before = rereads.len();
        rereads.extend(users);
        if rereads.len() > before {
            self.reread_wanted.notify_one();
        }
    }

    /// The users whose store value must be applied again: a store change that arrived while
    /// their write was in flight kept its local values and may be newer than the write, or the
    /// store refused their change ([`UserCache::reread`]). Only stores that deliver changes
    /// (Firebase's stream) produce them.
    pub fn take_rereads(&self) -> Vec<Reread> {
        std::mem::take(&mut *self.rereads.lock())
    }

    /// Resolves when [`UserCache::take_rereads`] has something.
    pub async fn reread_wanted(&self) {
        self.reread_wanted.notified().await
    }
}

fn take_user_change(record: Arc<UserRecord>) -> Change {
    let (fields, prompt_delta, base) = record.take_pending();
    let ip_added = record.take_ip_additions();
    let mut user =
        record
            .profile()
            .to_user(record.token(), base + prompt_delta, record.last_used_at());
    user.prompt_count = base + prompt_delta;
    Change::Upsert(Box::new(UserChange {
        record,
        user,
        fields,
        prompt_delta,
        ip_added,
    }))
}

/// Keeps one change per token: later state wins, fields and deltas add up.
fn merge_into(changes: &mut Vec<Change>, index: &mut HashMap<Arc<str>, usize>, change: Change) {
    let token = Arc::clone(change.token());
    let Some(&at) = index.get(&token) else {
        index.insert(token, changes.len());
        changes.push(change);
        return;
    };
    let merged = match (
        std::mem::replace(&mut changes[at], Change::Delete { token }),
        change,
    ) {
        (Change::Upsert(old), Change::Upsert(new)) if Arc::ptr_eq(&old.record, &new.record) => {
            Change::Upsert(Box::new(UserChange {
                fields: old.fields | new.fields,
                prompt_delta: old.prompt_delta + new.prompt_delta,
                ..*new
            }))
        }
        // A removal, or a new record under a removed token: the later one stands. A new
        // record carries CREATED, so the store replaces the user whole.
        (_, later) => later,
    };
    changes[at] = merged;
}

fn disable_profile(profile: &mut Profile, reason: Option<&str>, now_ms: u64) {
    profile.disabled_at = Some(now_ms);
    let extra = profile.extra.get_or_insert_with(Default::default);
    extra.disabled_reason = reason.map(Into::into);
    // The older proxy marks disabled users not refreshable (its PoW flow reads this).
    let meta = extra.meta.get_or_insert_with(Default::default);
    meta.insert("refreshable".into(), serde_json::Value::Bool(false));
    profile.empty_meta = false;
}

#[cfg(test)]
mod tests;
