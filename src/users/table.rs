//! The user map: records found by their token, laid out for the request path.
//!
//! A bucket is two cache lines: seven slots' tags and tokens (address and length in one word)
//! in the first, their record pointers in the second. A lookup reads the bucket, then, for the
//! slot whose tag matches, the token's bytes (to compare) and the record, both at once: two
//! dependent trips to memory. papaya, the map used before, kept the tags and the entry
//! pointers in two arrays and every entry in an allocation of its own, and the token was
//! behind the record: five dependent loads. With a million users none of them is in the CPU
//! caches, and on this kind of virtual machine each costs about 200 ns (a cache miss and a
//! TLB miss).
//!
//! Readers never lock and never write shared memory: they enter a [`seize`] guard, load the
//! current table, and take a reference to the record found. Writers are serialised by a mutex
//! (they are rare: admin edits, store sync, imports). A removed record, and a table replaced
//! when it grows, are handed to the guard's collector, which frees them once no reader that
//! may have seen them is still running. A token's bytes belong to its record, so they live as
//! long.
//!
//! Tags: 0 is an empty slot, 1 a removed one (a tombstone: probes go past it), and otherwise
//! `0x80 | 7 bits of the hash`. A probe walks buckets from the hash's bucket and stops at the
//! first bucket with an empty slot; removals leave tombstones, never empty slots, so a probe
//! never stops before a key it should find. Tombstones are dropped when the table is rebuilt.
//!
//! A record is returned only if its own token equals the one asked for: the slot's token word
//! is compared, then checked to be the record's (a slot can be reused between the two loads);
//! when it is not, or the slot has no token word, the record's token is compared instead.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use seize::{Collector, Guard, LocalGuard};

use super::record::UserRecord;

const SLOTS: usize = 7;
const EMPTY: u8 = 0;
const TOMBSTONE: u8 = 1;
/// The high bit of each of the seven tag bytes.
const TAG_HIGH_BITS: u64 = 0x0080_8080_8080_8080;
const LOW_SEVEN: u64 = 0x7F7F_7F7F_7F7F_7F7F;

/// Two cache lines: byte `i` of `tags` tags slot `i` (byte 7 is unused and stays 0); then
/// each slot's token word ([`token_word`]) and record pointer.
#[repr(C, align(128))]
struct Bucket {
    tags: AtomicU64,
    tokens: [AtomicUsize; SLOTS],
    records: [AtomicPtr<UserRecord>; SLOTS],
}

impl Bucket {
    fn empty() -> Self {
        Self {
            tags: AtomicU64::new(0),
            tokens: std::array::from_fn(|_| AtomicUsize::new(0)),
            records: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
        }
    }
}

/// Bits of a token word that hold the address.
const ADDRESS_BITS: usize = 57;

/// A token's address and length in one word, so that a reader loads them together: the
/// length in the top 7 bits, which user-space addresses leave free on 64-bit Linux (57-bit
/// addresses at most). 0 when that does not hold or the token is 128 bytes or longer: the
/// lookup then compares the record's token.
fn token_word(token: &str) -> usize {
    #[cfg(target_pointer_width = "64")]
    {
        let address = token.as_ptr().expose_provenance();
        if (1..128).contains(&token.len()) && address >> ADDRESS_BITS == 0 {
            return token.len() << ADDRESS_BITS | address;
        }
    }
    0
}

/// Whether the token word `word` holds exactly `token`'s bytes.
#[inline]
fn word_holds(word: usize, token: &str) -> bool {
    if word == 0 || word >> ADDRESS_BITS != token.len() {
        return false;
    }
    let address = std::ptr::with_exposed_provenance::<u8>(word & ((1 << ADDRESS_BITS) - 1));
    // SAFETY: a non-zero word is the address and length of a live record's token, and the
    // caller's guard keeps that record (and so its token) alive.
    unsafe { std::slice::from_raw_parts(address, token.len()) == token.as_bytes() }
}

/// A power-of-two number of buckets. It does not own the records its slots point to: the
/// [`RecordTable`] does, whichever table holds them.
struct Table {
    mask: usize,
    buckets: Box<[Bucket]>,
}

impl Table {
    fn new(buckets: usize) -> Self {
        debug_assert!(buckets.is_power_of_two());
        Self {
            mask: buckets - 1,
            buckets: (0..buckets).map(|_| Bucket::empty()).collect(),
        }
    }

    /// Slots that may be in use (live or tombstones) before the table must be rebuilt: 3/4.
    fn max_used(&self) -> usize {
        self.buckets.len() * SLOTS * 3 / 4
    }

    #[inline]
    fn bucket(&self, index: usize) -> &Bucket {
        // SAFETY: every index is masked with `mask`, and `buckets.len() == mask + 1`.
        unsafe { self.buckets.get_unchecked(index & self.mask) }
    }
}

impl Table {
    /// Visits, in probe order, the slots whose tag matches `hash` (bucket index, bucket, slot)
    /// until `visit` returns `Some`, or a bucket with an empty slot ends the probe.
    #[inline(always)]
    fn probe<R>(
        &self,
        hash: u64,
        mut visit: impl FnMut(usize, &Bucket, usize) -> Option<R>,
    ) -> Option<R> {
        let tag = tag_of(hash);
        let mut index = hash as usize;
        for _ in 0..=self.mask {
            let bucket = self.bucket(index);
            let tags = bucket.tags.load(Ordering::Acquire);
            let mut candidates = matching(tags, tag);
            while candidates != 0 {
                let slot = candidates.trailing_zeros() as usize / 8;
                candidates &= candidates - 1;
                if let Some(found) = visit(index & self.mask, bucket, slot) {
                    return Some(found);
                }
            }
            if zero_bytes(tags) != 0 {
                return None;
            }
            index = index.wrapping_add(1);
        }
        None
    }
}

/// How many buckets hold `users` records within [`Table::max_used`].
fn buckets_for(users: usize) -> usize {
    (users.saturating_mul(4).div_ceil(SLOTS * 3))
        .max(1)
        .next_power_of_two()
}

#[inline]
fn tag_of(hash: u64) -> u8 {
    0x80 | (hash >> 57) as u8
}

/// The high bit of byte `i` is set when tag byte `i` (of the seven) equals zero.
#[inline]
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW_SEVEN) + LOW_SEVEN) | x | LOW_SEVEN) & TAG_HIGH_BITS
}

/// Slots whose tag is `tag`, as the high bit of their byte.
#[inline]
fn matching(tags: u64, tag: u8) -> u64 {
    zero_bytes(tags ^ (u64::from(tag) * 0x0101_0101_0101_0101))
}

#[inline]
fn with_tag(tags: u64, slot: usize, tag: u8) -> u64 {
    let shift = slot * 8;
    (tags & !(0xFF << shift)) | (u64::from(tag) << shift)
}

#[inline]
fn tag_at(tags: u64, slot: usize) -> u8 {
    (tags >> (slot * 8)) as u8
}

/// Drops the table's reference to a record that no reader can reach any more.
unsafe fn release_record(ptr: *mut UserRecord, _: &Collector) {
    // SAFETY: the pointer came from `Arc::into_raw` and this was the table's reference.
    drop(unsafe { Arc::from_raw(ptr) });
}

/// Frees a replaced table (not the records: the new table holds them now).
unsafe fn release_table(ptr: *mut Table, _: &Collector) {
    // SAFETY: the pointer came from `Box::into_raw`, and no reader can reach it any more.
    drop(unsafe { Box::from_raw(ptr) });
}

/// For the padding retirements of [`RecordTable::reclaim_soon`]: nothing to free.
unsafe fn release_nothing(_: *mut u8, _: &Collector) {}

/// Where a key is, for a writer.
struct Found {
    bucket: usize,
    slot: usize,
    ptr: *mut UserRecord,
}

pub(super) struct RecordTable {
    table: AtomicPtr<Table>,
    len: AtomicUsize,
    /// SipHash with a random key: tokens are attacker-chosen, and the lookup's timing reveals
    /// nothing about stored tokens without the key.
    hasher: RandomState,
    collector: Collector,
    /// Serialises writers; holds the number of used slots (live and tombstones).
    writer: Mutex<usize>,
    /// The collector's batch size (see [`reclaim_soon`](Self::reclaim_soon)).
    batch: usize,
}

// SAFETY: the raw pointers are owned `Arc<UserRecord>`s and boxed tables, shared under the
// rules above (readers through guards, writers under the mutex); `UserRecord` is Send + Sync.
unsafe impl Send for RecordTable {}
unsafe impl Sync for RecordTable {}
// Those two hand records to other threads: checked here, as `AtomicPtr<UserRecord>` would
// be Send and Sync whatever `UserRecord` is.
const _: fn() = || {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<UserRecord>();
};

/// A lookup started: the token is hashed, its bucket is on its way into the cache, and the
/// guard keeps what it finds alive. [`Lookup::get`] finishes it.
pub struct Lookup<'a> {
    /// A pointer, not a reference: dropping the guard at the end of [`Lookup::get`] may free
    /// the table (a writer retired it meanwhile), and a reference field would still have to
    /// be valid then.
    table: *const Table,
    guard: LocalGuard<'a>,
    hash: u64,
    token: &'a str,
}

impl Lookup<'_> {
    /// The token's keyed hash (unpredictable without the process's key).
    #[inline]
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The record with this token.
    #[inline]
    pub fn get(self) -> Option<Arc<UserRecord>> {
        // SAFETY: the guard, held until this returns, keeps the table alive.
        let table = unsafe { &*self.table };
        table.probe(self.hash, |_, bucket, slot| {
            // SeqCst, as the guard's protected loads: the word points into a record.
            let word = bucket.tokens[slot].load(Ordering::SeqCst);
            let ptr = self.guard.protect(&bucket.records[slot], Ordering::Acquire);
            if ptr.is_null() {
                return None;
            }
            // The record loads while the token is compared.
            prefetch(ptr);
            let matched = word_holds(word, self.token);
            // SAFETY: a non-null slot holds a live record, kept alive by the guard.
            let record = unsafe { &*ptr };
            let own = word != 0
                && record.token().as_ptr().expose_provenance() == word & ((1 << ADDRESS_BITS) - 1);
            if !((matched && own) || (!own && record.token().as_ref() == self.token)) {
                return None;
            }
            // SAFETY: the table's reference is not released while the guard is held, so the
            // count is at least one.
            unsafe { Arc::increment_strong_count(ptr) };
            // SAFETY: one reference, just taken, handed to the caller.
            Some(unsafe { Arc::from_raw(ptr) })
        })
    }
}

impl RecordTable {
    pub fn with_capacity(users: usize) -> Self {
        // At least one retired object per thread that may hold a guard, as seize requires.
        let batch = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .max(32);
        Self {
            table: AtomicPtr::new(Box::into_raw(Box::new(Table::new(buckets_for(users))))),
            len: AtomicUsize::new(0),
            hasher: RandomState::new(),
            collector: Collector::new().batch_size(batch),
            writer: Mutex::new(0),
            batch,
        }
    }

    /// Retired objects wait in a per-thread batch until it is full; a replaced table is as
    /// large as all the records' slots, so the batch is filled up at once (with retirements
    /// that free nothing) to have it freed as soon as the readers that may see it are done.
    fn reclaim_soon(&self) {
        for _ in 0..self.batch {
            // SAFETY: the reclaimer does nothing, with any pointer.
            unsafe {
                self.collector.retire(
                    std::ptr::NonNull::<u8>::dangling().as_ptr(),
                    release_nothing,
                )
            };
        }
    }

    #[inline]
    pub fn hash(&self, token: &str) -> u64 {
        self.hasher.hash_one(token)
    }

    /// Hashes `token` and starts loading its bucket.
    #[inline]
    pub fn lookup<'a>(&'a self, token: &'a str) -> Lookup<'a> {
        let guard = self.collector.enter();
        let hash = self.hash(token);
        // SAFETY: the table pointer is never null, and the guard, which the `Lookup` holds
        // as long as this reference, keeps the table alive.
        let table: *const Table = guard.protect(&self.table, Ordering::Acquire);
        // SAFETY: as above, for the prefetches' address computations.
        let table_ref = unsafe { &*table };
        prefetch(table_ref.bucket(hash as usize));
        // (Both lines of the bucket: the records' line is the second.)
        prefetch((table_ref.bucket(hash as usize) as *const Bucket).wrapping_byte_add(64));
        Lookup {
            table,
            guard,
            hash,
            token,
        }
    }

    #[inline]
    pub fn get(&self, token: &str) -> Option<Arc<UserRecord>> {
        self.lookup(token).get()
    }

    pub fn contains(&self, token: &str) -> bool {
        self.get(token).is_some()
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Calls `f` for every record; records added or removed meanwhile may or may not be seen.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<UserRecord>)) {
        let guard = self.collector.enter();
        // SAFETY: never null; kept alive by the guard.
        let table = unsafe { &*guard.protect(&self.table, Ordering::Acquire) };
        for bucket in table.buckets.iter() {
            let tags = bucket.tags.load(Ordering::Acquire);
            for (slot, ptr) in bucket.records.iter().enumerate() {
                if tag_at(tags, slot) & 0x80 == 0 {
                    continue;
                }
                let ptr = guard.protect(ptr, Ordering::Acquire);
                if ptr.is_null() {
                    continue;
                }
                // SAFETY: a live record kept alive by the guard; the `Arc` is only lent (its
                // count is not touched unless `f` clones it).
                let record = ManuallyDrop::new(unsafe { Arc::from_raw(ptr) });
                f(&record);
            }
        }
    }

    /// Adds `record`, replacing any record with the same token.
    pub fn insert(&self, record: Arc<UserRecord>) {
        let mut used = self.writer.lock();
        let hash = self.hash(record.token());
        // SAFETY: only writers replace the table, and this one holds the lock.
        let mut table = unsafe { &*self.table.load(Ordering::Acquire) };
        if let Some(found) = self.find(table, record.token(), hash) {
            let bucket = table.bucket(found.bucket);
            let word = token_word(record.token());
            let new = Arc::into_raw(record).cast_mut();
            // Same token: a reader that pairs the old word with the new record (or the other
            // way round) compares the record's token instead.
            bucket.records[found.slot].store(new, Ordering::Release);
            bucket.tokens[found.slot].store(word, Ordering::Release);
            // SAFETY: unreachable from the table now; readers that saw it hold guards.
            unsafe { self.collector.retire(found.ptr, release_record) };
            return;
        }
        if *used + 1 > table.max_used() {
            let buckets = (table.mask + 1).max(buckets_for(2 * (self.len() + 1)));
            let old = std::ptr::from_ref(table);
            table = self.rebuild(table, buckets);
            // Retired only now: freeing it while `rebuild` still held it as a reference
            // argument would be undefined behaviour even if unused (seize frees a retired
            // batch at once when no reader holds a guard).
            // SAFETY: unreachable for new readers; the records moved to the new table.
            unsafe { self.collector.retire(old.cast_mut(), release_table) };
            self.reclaim_soon();
            *used = self.len();
        }
        let tag = tag_of(hash);
        let mut index = hash as usize;
        loop {
            let bucket = table.bucket(index);
            let tags = bucket.tags.load(Ordering::Relaxed);
            let free =
                (0..SLOTS).find(|&s| tag_at(tags, s) == EMPTY || tag_at(tags, s) == TOMBSTONE);
            if let Some(slot) = free {
                if tag_at(tags, slot) == EMPTY {
                    *used += 1;
                }
                // The record and its token first, then the tag that makes readers look.
                let word = token_word(record.token());
                bucket.records[slot].store(Arc::into_raw(record).cast_mut(), Ordering::Release);
                bucket.tokens[slot].store(word, Ordering::Release);
                bucket
                    .tags
                    .store(with_tag(tags, slot, tag), Ordering::Release);
                self.len.fetch_add(1, Ordering::Relaxed);
                return;
            }
            index = index.wrapping_add(1);
        }
    }

    /// Removes the record with `token`; returns it.
    pub fn remove(&self, token: &str) -> Option<Arc<UserRecord>> {
        let _used = self.writer.lock();
        // SAFETY: only writers replace the table, and this one holds the lock.
        let table = unsafe { &*self.table.load(Ordering::Acquire) };
        let found = self.find(table, token, self.hash(token))?;
        let bucket = table.bucket(found.bucket);
        let tags = bucket.tags.load(Ordering::Relaxed);
        bucket
            .tags
            .store(with_tag(tags, found.slot, TOMBSTONE), Ordering::Release);
        bucket.tokens[found.slot].store(0, Ordering::Release);
        bucket.records[found.slot].store(std::ptr::null_mut(), Ordering::Release);
        self.len.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the table's reference is alive until retired below; this is a new one.
        let removed = unsafe {
            Arc::increment_strong_count(found.ptr);
            Arc::from_raw(found.ptr)
        };
        // SAFETY: unreachable from the table now; readers that saw it hold guards.
        unsafe { self.collector.retire(found.ptr, release_record) };
        Some(removed)
    }

    /// A writer's search (the lock is held, so nothing it finds is released meanwhile).
    fn find(&self, table: &Table, token: &str, hash: u64) -> Option<Found> {
        table.probe(hash, |bucket_index, bucket, slot| {
            let ptr = bucket.records[slot].load(Ordering::Acquire);
            // SAFETY: records are only released by writers, and this one holds the lock.
            (!ptr.is_null() && unsafe { (*ptr).token().as_ref() } == token).then_some(Found {
                bucket: bucket_index,
                slot,
                ptr,
            })
        })
    }

    /// Copies the live records into a new table of `buckets` buckets and publishes it; the
    /// caller retires `old`.
    fn rebuild<'t>(&self, old: &Table, buckets: usize) -> &'t Table {
        let new = Table::new(buckets);
        for bucket in old.buckets.iter() {
            let tags = bucket.tags.load(Ordering::Relaxed);
            for slot in 0..SLOTS {
                if tag_at(tags, slot) & 0x80 == 0 {
                    continue;
                }
                let ptr = bucket.records[slot].load(Ordering::Relaxed);
                if ptr.is_null() {
                    continue;
                }
                let word = bucket.tokens[slot].load(Ordering::Relaxed);
                // SAFETY: live, and only this writer could release it.
                let hash = self.hash(unsafe { (*ptr).token() });
                let mut index = hash as usize;
                loop {
                    let target = new.bucket(index);
                    let target_tags = target.tags.load(Ordering::Relaxed);
                    if let Some(free) = (0..SLOTS).find(|&s| tag_at(target_tags, s) == EMPTY) {
                        target.records[free].store(ptr, Ordering::Relaxed);
                        target.tokens[free].store(word, Ordering::Relaxed);
                        target
                            .tags
                            .store(with_tag(target_tags, free, tag_of(hash)), Ordering::Relaxed);
                        break;
                    }
                    index = index.wrapping_add(1);
                }
            }
        }
        let new = Box::into_raw(Box::new(new));
        // Release: readers that load the new table see its contents.
        let replaced = self.table.swap(new, Ordering::AcqRel);
        debug_assert!(std::ptr::eq(replaced, old));
        // SAFETY: just published; only a writer (under the lock) can retire it.
        unsafe { &*new }
    }
}

impl Drop for RecordTable {
    fn drop(&mut self) {
        let table = *self.table.get_mut();
        // SAFETY: no reader or writer is left (`&mut self`); the table and the records in
        // it are the table's own. Retired ones are freed when the collector drops.
        unsafe {
            let table = Box::from_raw(table);
            for bucket in table.buckets.iter() {
                let tags = bucket.tags.load(Ordering::Relaxed);
                for slot in 0..SLOTS {
                    let ptr = bucket.records[slot].load(Ordering::Relaxed);
                    if tag_at(tags, slot) & 0x80 != 0 && !ptr.is_null() {
                        drop(Arc::from_raw(ptr));
                    }
                }
            }
        }
    }
}

/// Starts loading the cache line at `address` (a hint: any address is fine).
#[inline]
fn prefetch<T>(address: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing the program sees.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::model::{User, UserType};

    fn record(token: &str) -> Arc<UserRecord> {
        Arc::new(UserRecord::from_user(&User::new(
            token.into(),
            UserType::Normal,
            1,
        )))
    }

    #[test]
    fn tag_matching_is_exact() {
        let tags = with_tag(with_tag(0, 0, 0x85), 3, 0x85);
        let tags = with_tag(tags, 1, TOMBSTONE);
        assert_eq!(matching(tags, 0x85), 0x80 | 0x80 << 24);
        assert_eq!(matching(tags, 0x86), 0);
        // Empty: slots 2, 4, 5, 6 (byte 7 is not a slot).
        assert_eq!(
            zero_bytes(tags),
            0x80 << 16 | 0x80 << 32 | 0x80 << 40 | 0x80 << 48
        );
        let full = (0..SLOTS).fold(0, |t, s| with_tag(t, s, 0xFF));
        assert_eq!(zero_bytes(full), 0);
        assert_eq!(matching(full, 0xFF).count_ones(), SLOTS as u32);
    }

    #[test]
    fn insert_get_replace_remove() {
        let table = RecordTable::with_capacity(0);
        assert!(table.get("a").is_none());
        let a = record("a");
        table.insert(Arc::clone(&a));
        assert!(Arc::ptr_eq(&table.get("a").unwrap(), &a));
        let a2 = record("a");
        table.insert(Arc::clone(&a2));
        assert_eq!(table.len(), 1);
        assert!(Arc::ptr_eq(&table.get("a").unwrap(), &a2));
        let removed = table.remove("a").unwrap();
        assert!(Arc::ptr_eq(&removed, &a2));
        assert!(table.get("a").is_none());
        assert!(table.remove("a").is_none());
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn tokens_without_a_token_word_are_compared_through_the_record() {
        let table = RecordTable::with_capacity(0);
        let long = "x".repeat(300);
        let long_other = format!("{}y", "x".repeat(299));
        for token in [long.as_str(), "", "short"] {
            table.insert(record(token));
        }
        assert_eq!(token_word(&long), 0);
        assert_eq!(token_word(""), 0);
        for token in [long.as_str(), "", "short"] {
            assert_eq!(table.get(token).unwrap().token().as_ref(), token);
        }
        assert!(table.get(&long_other).is_none());
        assert!(table.get("shorT").is_none());
        assert!(table.get("shor").is_none());
    }

    #[test]
    fn grows_and_keeps_every_record_through_removals() {
        let table = RecordTable::with_capacity(0);
        let n = 20_000;
        for i in 0..n {
            table.insert(record(&format!("user-{i}")));
        }
        assert_eq!(table.len(), n);
        for i in (0..n).step_by(2) {
            assert!(table.remove(&format!("user-{i}")).is_some());
        }
        // Tombstones are reused or dropped by rebuilds; the survivors stay findable.
        for i in n..n + 10_000 {
            table.insert(record(&format!("user-{i}")));
        }
        for i in 0..n + 10_000 {
            let present = i >= n || i % 2 == 1;
            assert_eq!(
                table.get(&format!("user-{i}")).is_some(),
                present,
                "user-{i}"
            );
        }
        let mut seen = 0;
        table.for_each(|_| seen += 1);
        assert_eq!(seen, table.len());
        assert_eq!(table.len(), n / 2 + 10_000);
    }

    #[test]
    fn records_are_released_once_gone() {
        let a = record("a");
        {
            let table = RecordTable::with_capacity(4);
            table.insert(Arc::clone(&a));
            for i in 0..1000 {
                table.insert(record(&format!("other-{i}")));
            }
            assert!(Arc::strong_count(&a) >= 2);
        }
        assert_eq!(Arc::strong_count(&a), 1, "the table's reference is dropped");
        let b = record("b");
        {
            let table = RecordTable::with_capacity(4);
            table.insert(Arc::clone(&b));
            drop(table.remove("b"));
        }
        assert_eq!(Arc::strong_count(&b), 1, "a removed record is released");
    }

    #[test]
    fn readers_find_every_record_while_a_writer_grows_and_prunes() {
        let table = Arc::new(RecordTable::with_capacity(0));
        let stable: Vec<String> = (0..2000).map(|i| format!("stable-{i}")).collect();
        for token in &stable {
            table.insert(record(token));
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let (table, stable, stop) = (table.clone(), stable.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rounds = 0;
                    while !stop.load(Ordering::Relaxed) || rounds == 0 {
                        for token in stable.iter().skip(r) {
                            let found = table.get(token).expect("a stable record is always found");
                            assert_eq!(found.token().as_ref(), token.as_str());
                        }
                        rounds += 1;
                    }
                })
            })
            .collect();
        for round in 0..20 {
            let churn: Vec<String> = (0..5000).map(|i| format!("churn-{round}-{i}")).collect();
            for token in &churn {
                table.insert(record(token));
            }
            for token in &churn {
                assert!(table.remove(token).is_some());
            }
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        assert_eq!(table.len(), stable.len());
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use crate::users::model::{User, UserType};
    use std::sync::atomic::AtomicBool;

    fn record(token: &str) -> Arc<UserRecord> {
        Arc::new(UserRecord::from_user(&User::new(
            token.into(),
            UserType::Normal,
            1,
        )))
    }

    /// Tokens of lengths around the packed word's limits (0, 1, 126, 127, 128, 300).
    fn token(i: usize) -> String {
        let len = [1usize, 5, 126, 127, 128, 129, 300, 0][i % 8];
        let base = format!("t{i}-");
        if len == 0 {
            return String::new();
        }
        let mut s = base.repeat(len / base.len() + 1);
        s.truncate(len);
        s
    }

    /// Readers look up tokens while one writer inserts, replaces (fresh allocations of the
    /// same token), removes and grows/rebuilds; every record found must carry the asked token.
    #[test]
    fn stress_readers_vs_writer_churn() {
        let table = Arc::new(RecordTable::with_capacity(0));
        let tokens: Arc<Vec<String>> = Arc::new((0..64).map(token).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let (table, tokens, stop) = (table.clone(), tokens.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for t in tokens.iter().skip(r) {
                            if let Some(rec) = table.get(t) {
                                assert_eq!(rec.token().as_ref(), t.as_str());
                            }
                        }
                        table.for_each(|rec| {
                            let _ = rec.token().len();
                        });
                    }
                })
            })
            .collect();
        let rounds = std::env::var("STRESS_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        for round in 0..rounds {
            for t in tokens.iter() {
                table.insert(record(t));
            }
            // Replace with fresh allocations (so an old token's bytes are freed on release).
            for t in tokens.iter() {
                table.insert(record(t));
            }
            for (i, t) in tokens.iter().enumerate() {
                if (i + round) % 3 != 0 {
                    drop(table.remove(t));
                }
            }
            // Grow now and then so the table is rebuilt while readers are on the old one.
            if round % 50 == 0 {
                for i in 0..500 {
                    table.insert(record(&format!("grow-{round}-{i}")));
                }
                for i in 0..500 {
                    drop(table.remove(&format!("grow-{round}-{i}")));
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader
                .join()
                .expect("a reader found a record under another token");
        }
    }
}
