//! One cached user: the token, an immutable profile swapped atomically on edits, and the
//! counters as atomics so that counting a request never copies or locks anything.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;

use super::fields::Fields;
use super::model::{User, UserType, MAX_SAFE_COUNT};
use super::profile::{IpEntry, Profile};

/// Set in `pending` while the record sits in the change queue.
const QUEUED: u32 = 1 << 31;
/// Set in `inflight` once the user was removed from the cache.
const DELETED: u32 = 1 << 31;
/// Set in `inflight` when a store change arrived while fields were being written and the
/// local values were kept: the store may hold a newer value than the write, to be read again
/// once the write is confirmed.
const STORE_CHANGE_KEPT_OUT: u32 = 1 << 30;
/// Set in `inflight` with `DELETED` when the store's change removed the user (not a removal
/// here): the store may bring the user back, and the requests counted on this record then
/// go to the record that replaced it.
const REMOVED_BY_STORE: u32 = 1 << 29;

/// What the gatekeeper reads from a user on every request, in one word beside the token:
/// whether the user is disabled, special, or a temporary user with an expiry (whose profile
/// must then be read), and the version of the profile it was taken from. Every writer of the
/// profile publishes a new word after swapping the profile (see `UserRecord::publish`), so
/// the word never lags the profile by more than a write in progress, as a reader holding the
/// previous profile would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission(u64);

impl Admission {
    const DISABLED: u64 = 1 << 32;
    const SPECIAL: u64 = 1 << 33;
    const EXPIRES: u64 = 1 << 34;

    fn of(profile: &Profile, version: u32) -> Self {
        let mut word = u64::from(version);
        if profile.disabled_at.is_some() {
            word |= Self::DISABLED;
        }
        if profile.user_type == UserType::Special {
            word |= Self::SPECIAL;
        }
        // Exactly the users `Profile::is_expired` can refuse.
        if profile.user_type == UserType::Temporary && profile.expires_at.is_some() {
            word |= Self::EXPIRES;
        }
        Self(word)
    }

    /// Counts profile swaps (wrapping, never 0).
    pub fn version(self) -> u32 {
        self.0 as u32
    }

    pub fn disabled(self) -> bool {
        self.0 & Self::DISABLED != 0
    }

    /// `type: special`: exempt from IP and rate limits.
    pub fn special(self) -> bool {
        self.0 & Self::SPECIAL != 0
    }

    /// A temporary user with `expiresAt`: whether it expired is in the profile.
    pub fn expires(self) -> bool {
        self.0 & Self::EXPIRES != 0
    }
}

/// A remembered known IP: the IPv4 address and the admission version it was checked at.
/// Other addresses are not remembered (their check reads the profile).
#[inline]
fn ip_fingerprint(ip: IpAddr, version: u32) -> Option<u64> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Some(u64::from(version) << 32 | u64::from(u32::from(v4))),
        IpAddr::V6(_) => None,
    }
}

// Hot fields first: a lookup reads the token, then `admission` and `known_ip`; with the
// `Arc`'s counts they are the first 64 bytes.
#[repr(C)]
pub struct UserRecord {
    token: Arc<str>,
    /// [`Admission`] of the current profile.
    admission: AtomicU64,
    /// An IPv4 address found in the profile's list, and the admission version it was found
    /// at ([`ip_fingerprint`]): while that version is current, the address is known without
    /// reading the profile. 0 (version 0 never occurs) remembers nothing.
    known_ip: AtomicU64,
    profile: ArcSwap<Profile>,
    /// `promptCount` as last written to (or read from) the store.
    prompt_base: AtomicU64,
    /// Requests counted since the last flush took them.
    prompt_pending: AtomicU64,
    /// Requests in the batch being written now.
    prompt_inflight: AtomicU64,
    /// `lastUsedAt` as [`stored_time`] keeps it: 0 = never used, else epoch ms + 1.
    last_used_at: AtomicU64,
    /// Fields changed since the last flush took them, plus `QUEUED`.
    pending: AtomicU32,
    /// Fields in the batch being written now, plus `DELETED`.
    inflight: AtomicU32,
    /// Addresses requests added since the last confirmed write: what gets merged into the
    /// stored list, never the whole local list (which would bring back addresses an admin
    /// cleared elsewhere). Boxed and `None` when empty, as nearly always. Its lock also
    /// orders the flush cycle's counter moves with an admin's `promptCount` set (never taken
    /// by counting a request).
    ip_added: Mutex<Option<Box<IpAdditions>>>,
    /// The cache's confirmation count when the store last confirmed a write of this user
    /// (0: never here): a stream snapshot taken before that write may lack the user. Written
    /// only by the flush cycle, never by a request.
    confirmed_at: AtomicU64,
}

/// See [`UserRecord::ip_added`].
#[derive(Debug, Default)]
struct IpAdditions {
    /// Added since the last flush took them.
    pending: Vec<IpAddr>,
    /// In the batch being written now.
    inflight: Vec<IpAddr>,
}

/// The outcome of checking a request's IP against the user's list and limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpAdmission {
    /// Already in the list.
    Known,
    /// New and recorded.
    Added,
    /// New, over the limit; not recorded.
    OverLimit,
    /// New, admitted (no limit), not recorded: the list already holds as many addresses as
    /// are recorded.
    Unrecorded,
}

impl UserRecord {
    pub(super) fn new(
        token: Arc<str>,
        profile: Profile,
        prompt_count: u64,
        last_used_at: Option<u64>,
    ) -> Self {
        Self {
            token,
            admission: AtomicU64::new(Admission::of(&profile, 1).0),
            known_ip: AtomicU64::new(0),
            profile: ArcSwap::from_pointee(profile),
            prompt_base: AtomicU64::new(prompt_count),
            prompt_pending: AtomicU64::new(0),
            prompt_inflight: AtomicU64::new(0),
            last_used_at: AtomicU64::new(stored_time(last_used_at)),
            pending: AtomicU32::new(0),
            inflight: AtomicU32::new(0),
            ip_added: Mutex::new(None),
            confirmed_at: AtomicU64::new(0),
        }
    }

    pub(super) fn from_user(user: &User) -> Self {
        Self::new(
            user.token.as_str().into(),
            Profile::from_user(user),
            user.prompt_count,
            user.last_used_at,
        )
    }

    #[inline]
    pub fn token(&self) -> &Arc<str> {
        &self.token
    }

    /// The current profile; a cheap, lock-free snapshot.
    #[inline]
    pub fn profile(&self) -> Guard<Arc<Profile>> {
        self.profile.load()
    }

    /// The current [`Admission`]: one load, no pointer to follow.
    #[inline]
    pub fn admission(&self) -> Admission {
        Admission(self.admission.load(Ordering::Acquire))
    }

    /// Whether `ip` is known to be in the user's list at `admission` (from
    /// [`admission`](Self::admission)) without reading the profile: true only for the address
    /// last found there while that profile version is current. False means "read the profile".
    #[inline]
    pub fn knows_ip(&self, ip: IpAddr, admission: Admission) -> bool {
        ip_fingerprint(ip, admission.version())
            .is_some_and(|fp| self.known_ip.load(Ordering::Relaxed) == fp)
    }

    /// The admission, then the profile (loaded after it), and whether `ip` is in the profile's
    /// list; an address found there is remembered for [`knows_ip`](Self::knows_ip).
    #[inline]
    pub fn profile_with_ip(&self, ip: IpAddr) -> (Admission, Guard<Arc<Profile>>, bool) {
        let admission = self.admission();
        let profile = self.profile();
        let known = profile.has_ip(ip);
        if known {
            // The profile was loaded after the version was read, so the address was in a
            // profile at least as new as that version's.
            if let Some(fp) = ip_fingerprint(ip, admission.version()) {
                if self.known_ip.load(Ordering::Relaxed) != fp {
                    self.known_ip.store(fp, Ordering::Relaxed);
                }
            }
        }
        (admission, profile, known)
    }

    /// Publishes the [`Admission`] of the current profile under a new version. Every profile
    /// swap is followed by this; concurrent writers each retry until their word was computed
    /// from a profile loaded after the word they replace, so the last word published is that
    /// of the last profile.
    fn publish(&self) {
        let mut word = self.admission.load(Ordering::Acquire);
        loop {
            let profile = self.profile.load();
            let version = match Admission(word).version().wrapping_add(1) {
                0 => 1,
                v => v,
            };
            let next = Admission::of(&profile, version).0;
            match self.admission.compare_exchange_weak(
                word,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(current) => word = current,
            }
        }
    }

    /// `promptCount` as clients and admins see it: stored value plus what is on its way, at
    /// most 2^53 - 1. The API takes no larger count, so a count requests pushed past it made
    /// tollgate's own export one its import refused.
    pub fn prompt_count(&self) -> u64 {
        self.prompt_base
            .load(Ordering::Acquire)
            .saturating_add(self.prompt_inflight.load(Ordering::Acquire))
            .saturating_add(self.prompt_pending.load(Ordering::Acquire))
            .min(MAX_SAFE_COUNT)
    }

    pub fn last_used_at(&self) -> Option<u64> {
        shown_time(self.last_used_at.load(Ordering::Relaxed))
    }

    pub fn to_user(&self) -> User {
        self.profile()
            .to_user(&self.token, self.prompt_count(), self.last_used_at())
    }

    pub fn is_deleted(&self) -> bool {
        self.inflight.load(Ordering::Acquire) & DELETED != 0
    }

    // ---- local changes (called through the cache, which queues the record) ----

    /// Counts one answered request. Returns the fields to mark.
    #[inline]
    pub(super) fn count_request(&self, now_ms: u64) -> Fields {
        self.prompt_pending.fetch_add(1, Ordering::AcqRel);
        self.touch(now_ms) | Fields::PROMPT_DELTA
    }

    /// `lastUsedAt = now` (never backwards).
    pub(super) fn touch(&self, now_ms: u64) -> Fields {
        let now = stored_time(Some(now_ms));
        if self.last_used_at.load(Ordering::Relaxed) < now {
            self.last_used_at.fetch_max(now, Ordering::Relaxed);
        }
        Fields::LAST_USED_AT
    }

    /// Admits `ip` under `limit` (0 = unlimited), recording it when new. With no limit, at
    /// most `record_at_most` addresses are recorded (0 = all): every new address copies the
    /// list, so a token shared by thousands of addresses made each new one cost more, for
    /// every request of the worker thread.
    pub(super) fn admit_ip(&self, ip: IpAddr, limit: u32, record_at_most: u32) -> IpAdmission {
        // A full list answers from the profile already loaded: the swap below (a write to a
        // shared cache line) is only for an address really added.
        if let Some(outcome) = Self::unchanged_by(&self.profile(), ip, limit, record_at_most) {
            return outcome;
        }
        let mut outcome = IpAdmission::Added;
        self.profile.rcu(|current| {
            if let Some(unchanged) = Self::unchanged_by(current, ip, limit, record_at_most) {
                outcome = unchanged;
                return Arc::clone(current);
            }
            outcome = IpAdmission::Added;
            let mut next = Profile::clone(current);
            let mut ips = next.ips.into_vec();
            ips.push(IpEntry::Addr(ip.to_canonical()));
            next.ips = ips.into_boxed_slice();
            Arc::new(next)
        });
        if outcome == IpAdmission::Added {
            self.publish();
            // Only new addresses get here, so the lock is off the common path.
            self.ip_added
                .lock()
                .get_or_insert_with(Default::default)
                .pending
                .push(ip.to_canonical());
        }
        outcome
    }

    /// The outcome when `ip` does not change the list: known, over the limit, or not recorded
    /// because the list is full; `None` when it is to be added.
    fn unchanged_by(
        profile: &Profile,
        ip: IpAddr,
        limit: u32,
        record_at_most: u32,
    ) -> Option<IpAdmission> {
        if profile.has_ip(ip) {
            Some(IpAdmission::Known)
        } else if limit != 0 && profile.ips.len() >= limit as usize {
            Some(IpAdmission::OverLimit)
        } else if limit == 0 && record_at_most != 0 && profile.ips.len() >= record_at_most as usize
        {
            Some(IpAdmission::Unrecorded)
        } else {
            None
        }
    }

    /// Every address added by requests and not confirmed written yet.
    fn ip_additions(&self) -> Vec<IpAddr> {
        match self.ip_added.lock().as_deref() {
            Some(adds) => adds.inflight.iter().chain(&adds.pending).copied().collect(),
            None => Vec::new(),
        }
    }

    /// Moves the addresses requests added into flight (with [`take_pending`]) and returns all
    /// those in flight, as text, for the store to merge into its list. Addresses no longer in
    /// the local list (an admin replaced it meanwhile) are dropped.
    ///
    /// [`take_pending`]: Self::take_pending
    pub(super) fn take_ip_additions(&self) -> Vec<String> {
        let mut slot = self.ip_added.lock();
        let Some(adds) = slot.as_deref_mut() else {
            return Vec::new();
        };
        let profile = self.profile();
        for ip in std::mem::take(&mut adds.pending) {
            if profile.has_ip(ip) && !adds.inflight.contains(&ip) {
                adds.inflight.push(ip);
            }
        }
        let out = adds
            .inflight
            .iter()
            .map(|ip| IpEntry::Addr(*ip).to_text())
            .collect();
        if adds.inflight.is_empty() {
            *slot = None;
        }
        out
    }

    /// Replaces the profile through `edit`; returns what `edit` reported.
    pub(super) fn edit<R>(&self, mut edit: impl FnMut(&mut Profile) -> R) -> R {
        let mut result = None;
        self.profile.rcu(|current| {
            let mut next = Profile::clone(current);
            result = Some(edit(&mut next));
            Arc::new(next)
        });
        self.publish();
        result.expect("rcu runs the closure at least once")
    }

    /// An admin's absolute `promptCount`. Requests counted before it are dropped with it,
    /// including those of a write in flight: its acknowledgement must not add them back.
    pub(super) fn set_prompt_count(&self, value: u64) {
        let _cycle = self.ip_added.lock();
        self.prompt_pending.store(0, Ordering::Release);
        self.prompt_inflight.store(0, Ordering::Release);
        self.prompt_base.store(value, Ordering::Release);
    }

    pub(super) fn set_last_used_at(&self, value: Option<u64>) {
        self.last_used_at
            .store(stored_time(value), Ordering::Relaxed);
    }

    /// Marks fields as edited locally before the edit lands, without queueing the record: a
    /// store change merged meanwhile ([`apply_remote`](Self::apply_remote)) then keeps them.
    /// [`mark`](Self::mark) after the edit queues the write.
    pub(super) fn protect(&self, fields: Fields) {
        self.pending.fetch_or(fields.0, Ordering::AcqRel);
    }

    /// Marks fields changed; true when the record must be (re)queued.
    #[inline]
    pub(super) fn mark(&self, fields: Fields) -> bool {
        let wanted = fields.0 | QUEUED;
        if self.pending.load(Ordering::Acquire) & wanted == wanted {
            return false;
        }
        self.pending.fetch_or(wanted, Ordering::AcqRel) & QUEUED == 0
    }

    pub(super) fn mark_deleted(&self) {
        self.inflight.fetch_or(DELETED, Ordering::AcqRel);
    }

    /// Removed from the cache because the store's change said the user is gone.
    pub(super) fn mark_removed_by_store(&self) {
        self.inflight
            .fetch_or(DELETED | REMOVED_BY_STORE, Ordering::AcqRel);
    }

    pub(super) fn removed_by_store(&self) -> bool {
        self.inflight.load(Ordering::Acquire) & REMOVED_BY_STORE != 0
    }

    /// Out of the change queue without taking its changes: the next change queues it again.
    pub(super) fn unqueue(&self) {
        self.pending.fetch_and(!QUEUED, Ordering::AcqRel);
    }

    /// Requests counted on another record of this user (one the store's change removed),
    /// to be written with this record's.
    pub(super) fn add_counted(&self, requests: u64) {
        self.prompt_pending.fetch_add(requests, Ordering::AcqRel);
    }

    // ---- the flush cycle ----

    /// Takes the pending changes into flight: `(fields, prompt delta, count before the delta)`.
    /// The count before the delta is the base plus the requests already in flight: those of
    /// an earlier take of this record in the same batch (a request queued it again while the
    /// batch was being taken), which the merged change carries too.
    pub(super) fn take_pending(&self) -> (Fields, u64, u64) {
        // Into flight before out of pending, so that no store change merged in between finds
        // the fields unprotected.
        let seen = self.pending.load(Ordering::Acquire);
        self.inflight
            .fetch_or(seen & Fields::TRACKED.0, Ordering::AcqRel);
        let bits = self.pending.swap(0, Ordering::AcqRel) & !QUEUED;
        let (delta, base) = {
            // An admin's `promptCount` set between the two steps would have the requests
            // counted before it come back into flight.
            let _cycle = self.ip_added.lock();
            let delta = self.prompt_pending.swap(0, Ordering::AcqRel);
            let earlier = self.prompt_inflight.fetch_add(delta, Ordering::AcqRel);
            (delta, self.prompt_base.load(Ordering::Acquire) + earlier)
        };
        self.inflight
            .fetch_or(bits & Fields::TRACKED.0, Ordering::AcqRel);
        (Fields(bits), delta, base)
    }

    /// The store confirmed a change: counters move from flight into the base (unless the
    /// store echoes its totals back, as Firebase does), and the fields stop being in flight.
    /// True when a store change was kept out meanwhile: the store's value must be read again.
    /// `keep_ips`: the addresses in flight were not written; they stay in flight.
    pub(super) fn acknowledge(
        &self,
        fields: Fields,
        delta: u64,
        fold_counters: bool,
        keep_ips: bool,
    ) -> bool {
        // The counters move under the lock an admin's `promptCount` set takes: a set in
        // between would otherwise get the acknowledged requests added on top of it.
        let mut slot = self.ip_added.lock();
        if fold_counters {
            // Only what is still in flight: an absolute `promptCount` set meanwhile dropped it.
            let in_flight = self.prompt_inflight.load(Ordering::Acquire);
            self.prompt_base
                .fetch_add(delta.min(in_flight), Ordering::AcqRel);
        }
        let _ = self
            .prompt_inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(delta))
            });
        let before = self.inflight.fetch_and(
            !((fields.0 & Fields::TRACKED.0) | STORE_CHANGE_KEPT_OUT),
            Ordering::AcqRel,
        );
        // The change carried every address in flight (one batch at a time).
        if let Some(adds) = slot.as_deref_mut().filter(|_| !keep_ips) {
            adds.inflight.clear();
            if adds.pending.is_empty() {
                *slot = None;
            }
        }
        before & STORE_CHANGE_KEPT_OUT != 0
    }

    /// The store confirmed a write of this user as the cache's `confirmation`th.
    pub(super) fn set_confirmed_at(&self, confirmation: u64) {
        self.confirmed_at.store(confirmation, Ordering::Release);
    }

    /// The cache's confirmation count when a write of this user was last confirmed.
    pub(super) fn confirmed_at(&self) -> u64 {
        self.confirmed_at.load(Ordering::Acquire)
    }

    /// Fields with local edits the store has not confirmed yet.
    pub fn unconfirmed_fields(&self) -> Fields {
        Fields(
            (self.pending.load(Ordering::Acquire) | self.inflight.load(Ordering::Acquire))
                & Fields::TRACKED.0,
        )
    }

    // ---- changes that come from the store ----

    /// Applies the store's view of this user, keeping fields with unconfirmed local edits.
    pub(crate) fn apply_remote(&self, remote: &User) {
        let incoming = Profile::from_user(remote);
        let mut keep = Fields::NONE;
        // `keep` is read inside the swap: an edit that lands first makes the swap retry, and
        // reads its fields as protected then.
        self.profile.rcu(|current| {
            keep = self.unconfirmed_fields();
            Arc::new(merge_profile(
                current,
                &incoming,
                keep,
                &self.ip_additions(),
            ))
        });
        self.publish();
        // A field being written kept its local value; if this change reached the store after
        // the write, it is the newer one, and is read again when the write is confirmed.
        if keep.intersects(Fields(self.inflight.load(Ordering::Acquire))) {
            self.inflight
                .fetch_or(STORE_CHANGE_KEPT_OUT, Ordering::AcqRel);
        }
        if !keep.contains(Fields::PROMPT_COUNT) {
            // Under the lock an admin's `promptCount` set takes, and checked again: a set that
            // landed since `keep` was read (its field protected first) must not be replaced by
            // the store's older count, which would then be written back as absolute.
            let _cycle = self.ip_added.lock();
            if !self.unconfirmed_fields().contains(Fields::PROMPT_COUNT) {
                self.prompt_base
                    .store(remote.prompt_count, Ordering::Release);
            }
        }
        if !keep.contains(Fields::LAST_USED_AT) {
            // The store's value as it is, older or absent included: `lastUsedAt` is written
            // last-writer-wins like the other fields, so another instance's write may leave
            // an older time there (or an admin or console may clear it), and every instance
            // must end with what the store holds. (Keeping the newest time seen here left
            // instances each showing a different time than the store, for good.) A request
            // counted between the check above and this store loses its time here; its write
            // then carries the store's time, so all agree, off by at most one flush.
            self.last_used_at
                .store(stored_time(remote.last_used_at), Ordering::Relaxed);
        }
    }
}

/// An optional time in one atomic word: 0 is "none", so a time `t` is kept as `t + 1`. Keeping
/// `t` itself made a `lastUsedAt` of 0 (the epoch, which the API takes and an import may
/// carry) read back as absent.
fn stored_time(time: Option<u64>) -> u64 {
    time.map_or(0, |t| t.saturating_add(1))
}

/// The time [`stored_time`] kept.
fn shown_time(word: u64) -> Option<u64> {
    word.checked_sub(1)
}

/// For each `BIT => field`: `$out.field` becomes `$local.field` when `$keep` has the bit.
macro_rules! keep_local {
    ($keep:expr, $out:expr, $local:expr, { $($bit:ident => $field:ident),+ $(,)? }) => {
        $(if $keep.contains(Fields::$bit) {
            $out.$field = $local.$field.clone();
        })+
    };
}

/// `incoming`, except the fields in `keep`, which stay as they are locally. The `ip` list is
/// kept only when an admin replaced it (or the user is new here and cannot exist in the store);
/// otherwise it is the
/// incoming list plus the addresses requests added here (`ip_added`) that it lacks, so that an
/// admin's `ip: []` elsewhere is not undone by the addresses this instance knew before.
fn merge_profile(
    local: &Profile,
    incoming: &Profile,
    keep: Fields,
    ip_added: &[IpAddr],
) -> Profile {
    let mut out = incoming.clone();
    let new_here = keep.contains(Fields::CREATED) && !keep.contains(Fields::UPSERTED);
    if keep.contains(Fields::IP) && (keep.contains(Fields::IP_REPLACED) || new_here) {
        out.ips = local.ips.clone();
    } else if ip_added.iter().any(|ip| !incoming.has_ip(*ip)) {
        let mut ips = out.ips.into_vec();
        for ip in ip_added {
            if !ips.iter().any(|e| e.is(*ip)) {
                ips.push(IpEntry::Addr(*ip));
            }
        }
        out.ips = ips.into_boxed_slice();
    }
    keep_local!(keep, out, local, {
        TYPE => user_type,
        CREATED_AT => created_at,
        DISABLED_AT => disabled_at,
        EXPIRES_AT => expires_at,
        MAX_IPS => max_ips,
        TOKEN_COUNTS => token_counts,
        TOKEN_LIMITS => token_limits,
        META => empty_meta,
    });
    let extra_bits = Fields::NICKNAME
        | Fields::DISABLED_REASON
        | Fields::ADMIN_NOTE
        | Fields::META
        | Fields::TOKEN_REFRESH
        | Fields::TOKEN_COUNT;
    if keep.intersects(extra_bits) {
        let local_extra = local.extra.as_deref().cloned().unwrap_or_default();
        let mut extra = out.extra.as_deref().cloned().unwrap_or_default();
        keep_local!(keep, extra, local_extra, {
            NICKNAME => nickname,
            DISABLED_REASON => disabled_reason,
            ADMIN_NOTE => admin_note,
            META => meta,
            TOKEN_REFRESH => token_refresh,
            TOKEN_COUNT => token_count,
        });
        out.extra = (extra != Default::default()).then(|| Box::new(extra));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::model::UserType;

    fn record() -> UserRecord {
        UserRecord::from_user(&User::new("tok".into(), UserType::Normal, 1))
    }

    #[test]
    fn an_admin_count_set_during_a_flush_is_the_count() {
        // A flush takes and acknowledges the requests counted before an admin sets
        // `promptCount`, on another thread at the same moment: whatever the interleaving,
        // those requests are gone and the count is what the admin set.
        let record = std::sync::Arc::new(record());
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let done = std::sync::Arc::new(std::sync::Barrier::new(2));
        let flusher = {
            let (record, start, done) = (record.clone(), start.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..50_000 {
                    start.wait();
                    let (fields, delta, _) = record.take_pending();
                    record.acknowledge(fields, delta, true, false);
                    done.wait();
                }
            })
        };
        for round in 0..50_000 {
            for _ in 0..5 {
                record.count_request(1);
            }
            start.wait();
            record.set_prompt_count(100);
            done.wait();
            assert_eq!(record.prompt_count(), 100, "round {round}");
        }
        flusher.join().unwrap();
    }

    #[test]
    fn ip_limit_refuses_without_recording() {
        let r = record();
        let a: IpAddr = "1.1.1.1".parse().unwrap();
        let b: IpAddr = "2.2.2.2".parse().unwrap();
        assert_eq!(r.admit_ip(a, 1, 0), IpAdmission::Added);
        assert_eq!(r.admit_ip(a, 1, 0), IpAdmission::Known);
        assert_eq!(r.admit_ip(b, 1, 0), IpAdmission::OverLimit);
        assert_eq!(r.to_user().ip, vec!["1.1.1.1"]);
        assert_eq!(r.admit_ip(b, 0, 0), IpAdmission::Added);
    }

    #[test]
    fn a_last_used_time_of_zero_is_kept() {
        let r = record();
        assert_eq!(r.last_used_at(), None);
        r.set_last_used_at(Some(0));
        assert_eq!(r.last_used_at(), Some(0));
        r.touch(5);
        assert_eq!(r.last_used_at(), Some(5));
        r.set_last_used_at(None);
        assert_eq!(r.last_used_at(), None);
        let mut user = User::new("tok".into(), UserType::Normal, 1);
        user.last_used_at = Some(0);
        assert_eq!(UserRecord::from_user(&user).to_user().last_used_at, Some(0));
    }

    #[test]
    fn the_count_shown_stops_at_the_largest_the_api_takes() {
        let r = record();
        r.set_prompt_count(MAX_SAFE_COUNT);
        r.count_request(10);
        assert_eq!(r.prompt_count(), MAX_SAFE_COUNT);
        assert_eq!(r.to_user().validate(""), Ok(()));
    }

    #[test]
    fn counters_survive_the_flush_cycle() {
        let r = record();
        for _ in 0..3 {
            r.count_request(10);
        }
        let (_, delta, base) = r.take_pending();
        assert_eq!((delta, base), (3, 0));
        r.count_request(11);
        assert_eq!(r.prompt_count(), 4, "in-flight requests still count");
        r.acknowledge(Fields::NONE, delta, true, false);
        assert_eq!(r.prompt_count(), 4);
        let (_, delta, base) = r.take_pending();
        assert_eq!((delta, base), (1, 3));
    }

    #[test]
    fn echoing_store_sets_base_instead_of_folding() {
        let r = record();
        r.count_request(10);
        let (_, delta, _) = r.take_pending();
        r.acknowledge(Fields::NONE, delta, false, false);
        assert_eq!(r.prompt_count(), 0, "until the echo arrives");
        let mut remote = r.to_user();
        remote.prompt_count = 1;
        r.apply_remote(&remote);
        assert_eq!(r.prompt_count(), 1);
    }

    #[test]
    fn remote_changes_keep_unconfirmed_local_edits() {
        let r = record();
        r.edit(|p| p.max_ips = Some(3));
        r.mark(Fields::MAX_IPS);
        let mut remote = r.to_user();
        remote.max_ips = Some(9);
        remote.nickname = Some("remote".into());
        remote.disabled_at = Some(5);
        r.apply_remote(&remote);
        let now = r.to_user();
        assert_eq!(now.max_ips, Some(3), "local edit not yet written wins");
        assert_eq!(now.nickname.as_deref(), Some("remote"));
        assert_eq!(now.disabled_at, Some(5));
        let (fields, _, _) = r.take_pending();
        r.apply_remote(&remote);
        assert_eq!(r.to_user().max_ips, Some(3), "still in flight");
        r.acknowledge(fields, 0, true, false);
        r.apply_remote(&remote);
        assert_eq!(
            r.to_user().max_ips,
            Some(9),
            "confirmed: the store wins again"
        );
    }

    #[test]
    fn the_store_time_of_last_use_replaces_a_newer_one_once_confirmed() {
        let r = record();
        let counted = r.count_request(50);
        r.mark(counted);
        let mut remote = r.to_user();
        remote.last_used_at = Some(40);
        r.apply_remote(&remote);
        assert_eq!(
            r.last_used_at(),
            Some(50),
            "not yet written: the local time stays"
        );
        let (fields, delta, _) = r.take_pending();
        r.acknowledge(fields, delta, false, false);
        // Another instance's write of an older time landed after this one's.
        r.apply_remote(&remote);
        assert_eq!(
            r.last_used_at(),
            Some(40),
            "the store's value, as every instance has"
        );
        remote.last_used_at = None;
        r.apply_remote(&remote);
        assert_eq!(r.last_used_at(), None, "cleared in the store");
    }

    /// The invariant: the published word is that of the current profile.
    fn assert_in_step(r: &UserRecord) {
        let word = r.admission();
        assert_eq!(
            word,
            Admission::of(&r.profile(), word.version()),
            "admission word matches the profile"
        );
        assert_ne!(word.version(), 0);
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn admission_follows_edits_remote_applies_and_ip_admissions() {
        let r = record();
        assert_in_step(&r);
        assert!(!r.admission().disabled() && !r.admission().special());
        let v0 = r.admission().version();
        r.edit(|p| p.disabled_at = Some(5));
        assert_in_step(&r);
        assert!(r.admission().disabled());
        assert_ne!(r.admission().version(), v0);
        r.edit(|p| {
            p.disabled_at = None;
            p.user_type = UserType::Special;
        });
        assert_in_step(&r);
        assert!(!r.admission().disabled() && r.admission().special());
        let mut remote = r.to_user();
        remote.user_type = UserType::Temporary;
        remote.expires_at = Some(1000);
        r.apply_remote(&remote);
        assert_in_step(&r);
        assert!(r.admission().expires() && !r.admission().special());
        remote.expires_at = None;
        r.apply_remote(&remote);
        assert_in_step(&r);
        assert!(
            !r.admission().expires(),
            "a temporary user without expiry never expires"
        );
        let v = r.admission().version();
        assert_eq!(r.admit_ip(ip("1.1.1.1"), 0, 0), IpAdmission::Added);
        assert_in_step(&r);
        assert_ne!(r.admission().version(), v, "a new IP is a new profile");
        let v = r.admission().version();
        assert_eq!(r.admit_ip(ip("1.1.1.1"), 0, 0), IpAdmission::Known);
        assert_eq!(r.admit_ip(ip("2.2.2.2"), 1, 0), IpAdmission::OverLimit);
        assert_eq!(r.admission().version(), v, "no change, no new version");
    }

    #[test]
    fn a_known_ip_is_remembered_until_the_profile_changes() {
        let r = record();
        let a = ip("1.1.1.1");
        assert!(!r.knows_ip(a, r.admission()), "nothing remembered yet");
        r.admit_ip(a, 0, 0);
        assert!(
            !r.knows_ip(a, r.admission()),
            "only found addresses are remembered"
        );
        let (_, _, known) = r.profile_with_ip(a);
        assert!(known);
        assert!(r.knows_ip(a, r.admission()));
        assert!(!r.knows_ip(ip("1.1.1.2"), r.admission()));
        // IPv4-mapped IPv6 is the same client.
        assert!(r.knows_ip(ip("::ffff:1.1.1.1"), r.admission()));
        // Any profile change forgets it, even one that keeps the address...
        r.edit(|p| p.max_ips = Some(3));
        assert!(!r.knows_ip(a, r.admission()));
        assert!(r.profile_with_ip(a).2);
        assert!(r.knows_ip(a, r.admission()));
        // ...and one that removes it: the address is no longer known (once its addition was
        // written; until then a store change keeps it).
        r.take_ip_additions();
        r.acknowledge(Fields::IP, 0, true, false);
        let mut remote = r.to_user();
        remote.ip = vec!["9.9.9.9".into()];
        r.apply_remote(&remote);
        assert!(!r.knows_ip(a, r.admission()));
        assert!(!r.profile_with_ip(a).2);
        assert!(!r.knows_ip(a, r.admission()));
        // A stale word cannot vouch for the address either.
        let before = r.admission();
        r.profile_with_ip(ip("9.9.9.9"));
        r.edit(|p| p.ips = Box::new([]));
        assert!(!r.knows_ip(ip("9.9.9.9"), r.admission()));
        assert_ne!(before, r.admission());
    }

    #[test]
    fn ipv6_addresses_are_always_checked_in_the_profile() {
        let r = record();
        let v6 = ip("2001:db8::1");
        r.admit_ip(v6, 0, 0);
        assert!(r.profile_with_ip(v6).2);
        assert!(!r.knows_ip(v6, r.admission()));
    }

    #[test]
    fn concurrent_writers_leave_the_word_in_step() {
        let r = Arc::new(record());
        let writers: Vec<_> = (0..4u8)
            .map(|t| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        match (i + u32::from(t)) % 4 {
                            0 => {
                                r.edit(|p| p.disabled_at = (i % 3 == 0).then_some(u64::from(i)));
                            }
                            1 => {
                                let mut remote = r.to_user();
                                remote.user_type = if i % 2 == 0 {
                                    UserType::Special
                                } else {
                                    UserType::Temporary
                                };
                                remote.expires_at = (i % 5 == 0).then_some(7);
                                r.apply_remote(&remote);
                            }
                            2 => {
                                // New addresses and known ones, in a list of at most about 500:
                                // every new address copies the list, so an ever-growing one made
                                // this test quadratic (a minute in a debug build under load).
                                r.admit_ip(IpAddr::from([10, t, 0, (i % 250) as u8]), 0, 0);
                            }
                            _ => {
                                r.profile_with_ip(IpAddr::from([10, t, 0, 1]));
                            }
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_in_step(&r);
        // Whatever was remembered is in the list.
        for t in 0..4u8 {
            let a = IpAddr::from([10, t, 0, 1]);
            if r.knows_ip(a, r.admission()) {
                assert!(r.profile().has_ip(a));
            }
        }
    }

    #[test]
    fn mark_queues_once() {
        let r = record();
        assert!(r.mark(Fields::IP));
        assert!(!r.mark(Fields::IP));
        assert!(!r.mark(Fields::NICKNAME));
        let (fields, _, _) = r.take_pending();
        assert_eq!(fields, Fields::IP | Fields::NICKNAME);
        assert!(r.mark(Fields::IP));
    }
}

#[cfg(test)]
mod ip_tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn with_ips(ips: &[&str]) -> UserRecord {
        let mut user = User::new("tok".into(), UserType::Normal, 1);
        user.ip = ips.iter().map(|s| s.to_string()).collect();
        UserRecord::from_user(&user)
    }

    #[test]
    fn a_remote_list_replaces_the_local_one_plus_pending_additions() {
        let r = with_ips(&["1.1.1.1", "2.2.2.2"]);
        assert_eq!(r.admit_ip(ip("3.3.3.3"), 0, 0), IpAdmission::Added);
        r.mark(Fields::IP);
        let mut remote = r.to_user();
        remote.ip = vec![];
        r.apply_remote(&remote);
        assert_eq!(r.to_user().ip, vec!["3.3.3.3"], "the admin's reset stands");
        // In flight too.
        let (fields, _, _) = r.take_pending();
        assert_eq!(r.take_ip_additions(), vec!["3.3.3.3"]);
        remote.ip = vec!["4.4.4.4".into()];
        r.apply_remote(&remote);
        assert_eq!(r.to_user().ip, vec!["4.4.4.4", "3.3.3.3"]);
        // Confirmed: the store's list is the list.
        r.acknowledge(fields, 0, true, false);
        assert!(r.take_ip_additions().is_empty());
        r.apply_remote(&remote);
        assert_eq!(r.to_user().ip, vec!["4.4.4.4"]);
    }

    #[test]
    fn only_additions_are_taken_and_an_admin_list_is_kept_whole() {
        let r = with_ips(&["1.1.1.1"]);
        r.admit_ip(ip("::ffff:2.2.2.2"), 0, 0);
        r.admit_ip(ip("3.3.3.3"), 0, 0);
        assert_eq!(r.take_ip_additions(), vec!["2.2.2.2", "3.3.3.3"]);
        r.acknowledge(Fields::IP, 0, true, false);
        // An admin replaces the list: an address added before it is not merged back.
        r.admit_ip(ip("4.4.4.4"), 0, 0);
        r.protect(Fields::IP | Fields::IP_REPLACED);
        r.edit(|p| p.ips = Box::new([IpEntry::Addr(ip("9.9.9.9"))]));
        r.mark(Fields::IP | Fields::IP_REPLACED);
        let mut remote = r.to_user();
        remote.ip = vec!["1.1.1.1".into()];
        r.apply_remote(&remote);
        assert_eq!(
            r.to_user().ip,
            vec!["9.9.9.9"],
            "the admin's list waits to be written"
        );
        let (fields, _, _) = r.take_pending();
        assert!(r.take_ip_additions().is_empty());
        r.apply_remote(&remote);
        assert_eq!(r.to_user().ip, vec!["9.9.9.9"], "still in flight");
        r.acknowledge(fields, 0, true, false);
        r.apply_remote(&remote);
        assert_eq!(r.to_user().ip, vec!["1.1.1.1"]);
    }
}
