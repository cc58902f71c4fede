//! Rate limiting as a sliding window: the previous window's count is weighted by how much of
//! it still overlaps the last window-length of time. A fixed window would let a client send
//! twice the limit across a boundary; this does not.
//!
//! Keys are hashed once per request (a keyed SipHash); the counts live in a count-min sketch
//! (`WindowSketch`) whose counters for one key, in both windows, share one cache line, so a
//! check and its count touch one line of memory however many clients there are.
//!
//! Time is the caller's `now_ms` (epoch milliseconds, read once per request): windows start
//! on multiples of the window length, so tests drive the clock instead of sleeping.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora_limits::estimator::Estimator;

/// What a limiter is keyed by. Users are limited per token across IPs; everyone else per IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey<'a> {
    Ip(IpAddr),
    User(&'a str),
}

/// Hashes limiter keys; one instance per process so keys cannot be predicted from outside.
#[derive(Clone, Default)]
pub struct KeyHasher(std::collections::hash_map::RandomState);

impl KeyHasher {
    /// Per-IP keys count the subscriber ([`crate::net::subscriber`]: an IPv6 /64).
    #[inline]
    pub fn hash(&self, key: LimitKey<'_>) -> u64 {
        match key {
            LimitKey::Ip(ip) => self.0.hash_one(LimitKey::Ip(crate::net::subscriber(ip))),
            key => self.0.hash_one(key),
        }
    }
}

/// The outcome of a rate check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    Allowed {
        limit: u32,
        remaining: u32,
        /// When the full budget is back (epoch ms).
        reset_at_ms: u64,
    },
    Limited {
        limit: u32,
        /// Whole seconds until one more request fits.
        retry_after_secs: u64,
        reset_at_ms: u64,
    },
}

/// A sliding-window limit of `limit` events per `window` per key.
pub struct SlidingWindowLimiter {
    sketch: WindowSketch,
    limit: u32,
    window_ms: u64,
    /// 1 + the newest sketch generation an event was counted in; 0 once none can be left
    /// (see [`check_rare`](Self::check_rare)).
    latest_event: AtomicU64,
}

impl SlidingWindowLimiter {
    /// `slots`: sized for the number of distinct keys active per window.
    pub fn new(limit: u32, window: Duration, slots: usize) -> Self {
        Self {
            sketch: WindowSketch::new(window, slots),
            limit,
            window_ms: window_ms(window),
            latest_event: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Admits and counts one event, or refuses it without counting (so a client that backs
    /// off for `Retry-After` gets through).
    #[inline]
    pub fn check_and_count(&self, key: u64, now_ms: u64) -> RateDecision {
        let (counts, slot) = self.sketch.counts(key, now_ms);
        let decision = decide(self.window(counts), self.limit, now_ms, true);
        if matches!(decision, RateDecision::Allowed { .. }) {
            self.record_event(slot.generation);
            self.sketch.add(slot);
        }
        decision
    }

    /// Notes, before an event is added, the generation it is counted in. One write per
    /// generation: afterwards it is a read of a line that rarely changes.
    #[inline]
    fn record_event(&self, generation: u64) {
        if self.latest_event.load(Ordering::Acquire) < generation + 1 {
            self.latest_event
                .fetch_max(generation + 1, Ordering::SeqCst);
        }
    }

    /// [`check`](Self::check) for a limiter of rare events (failed authentications), or `None`
    /// when the answer is known to be "allowed" for every key without hashing the key or
    /// reading its counters: no event was counted in the sketch's current or previous window,
    /// so every key's count is zero. An event counted at generation `g` is in the half of the
    /// sketch that is cleared when the generation reaches `g + 2`, so "quiet" is exact, not a
    /// guess from the clock. `key` is only called when the counters must be read.
    #[inline]
    pub fn check_rare(&self, key: impl FnOnce() -> u64, now_ms: u64) -> Option<RateDecision> {
        let latest = self.latest_event.load(Ordering::SeqCst);
        if latest == 0 && self.limit > 0 {
            return None;
        }
        if self.limit > 0 {
            // `latest - 1` is the generation of the newest event; it is gone at `+ 2`.
            let generation = self.sketch.generation_now(now_ms);
            if generation > latest {
                // A newer event since `latest` was read makes this fail, as it should.
                let _ = self.latest_event.compare_exchange(
                    latest,
                    0,
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                );
                return None;
            }
        }
        Some(self.check(key(), now_ms))
    }

    /// Starts fetching `key`'s counters into the cache, so that a check shortly after does not
    /// wait for memory (the user lookup runs meanwhile).
    #[inline]
    pub fn prefetch(&self, key: u64) {
        let block: *const Block = &self.sketch.blocks[self.sketch.slot(key).block];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint; the address is that of a live block.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(block.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = block;
    }

    /// The block of counters `key` uses: keys in different blocks share no counter, so a test
    /// that keeps its keys apart knows the counts are exact.
    #[cfg(test)]
    pub(crate) fn block_of(&self, key: u64) -> usize {
        self.sketch.slot(key).block
    }

    /// Whether one more event of `key` would be over the limit, without counting anything;
    /// when allowed, `remaining` and `reset_at_ms` are as they stand now (nothing was counted).
    #[inline]
    pub fn check(&self, key: u64, now_ms: u64) -> RateDecision {
        let (counts, _) = self.sketch.counts(key, now_ms);
        decide(self.window(counts), self.limit, now_ms, false)
    }

    /// Counts one event without checking.
    #[inline]
    pub fn count(&self, key: u64, now_ms: u64) {
        let (_, slot) = self.sketch.counts(key, now_ms);
        self.record_event(slot.generation);
        self.sketch.add(slot);
    }

    #[inline]
    fn window(&self, counts: Counts) -> Window {
        Window {
            previous: u64::from(counts.previous),
            current: u64::from(counts.current),
            elapsed_ms: counts.elapsed_ms.min(self.window_ms - 1),
            length_ms: self.window_ms,
            behind_ms: counts.behind_ms,
        }
    }
}

/// Counters per window in one block: a key uses 4 of them, chosen by its hash.
const PER_WINDOW: usize = 8;
/// Hash rows of the sketch: over-counting a key needs collisions on all of its counters.
const HASHES: usize = 4;

/// One cache line: 8 counters of window A, then 8 of window B.
#[repr(C, align(64))]
struct Block([AtomicU32; 2 * PER_WINDOW]);

/// The 70 ways to pick 4 of a block's 8 counters, as bit masks.
const SUBSETS: [u8; 70] = {
    let mut out = [0u8; 70];
    let mut n = 0;
    let mut mask = 0u16;
    while mask < 256 {
        if mask.count_ones() == HASHES as u32 {
            out[n] = mask as u8;
            n += 1;
        }
        mask += 1;
    }
    out
};

/// Where a key's counters are: its block and which 4 of the block's 8 per window.
#[derive(Clone, Copy)]
struct Slot {
    block: usize,
    mask: u8,
    /// The sketch's generation when the slot was read; its parity is the half of the block
    /// counting the current window.
    generation: u64,
}

impl Slot {
    fn current(self) -> usize {
        (self.generation & 1) as usize
    }
}

/// A key's counts in the previous and current windows, and how far into the current window
/// we are (ms, below the window's length).
#[derive(Clone, Copy, Debug)]
struct Counts {
    previous: u32,
    current: u32,
    elapsed_ms: u64,
    /// How far `now` is behind the start of the current window (a clock stepped back by less
    /// than a window): the window lasts that much longer.
    behind_ms: u64,
}

/// The window's length in ms: at least 1, and at most 2^30 (12 days; the configuration allows
/// an hour), so that the window arithmetic (counts below 2^32 times this) fits in a `u64`.
fn window_ms(window: Duration) -> u64 {
    (window.as_millis() as u64).clamp(1, 1 << 30)
}

/// Two count-min sketches, one per window, that rotate like pingora-limits' `Rate` (the
/// current window becomes the previous one every `window`; windows start on multiples of
/// `window` since the Unix epoch, whenever the first event after a quiet spell arrives). Unlike
/// `Rate`, whose four rows per window are separate arrays hashed separately (eight cache lines
/// and twelve hashes per check and count), a key's counters for both windows sit in one
/// 64-byte block picked from its (already keyed-hashed) value.
struct WindowSketch {
    blocks: Box<[Block]>,
    /// Windows started so far; its parity is the half of every block counting the current
    /// window. A half is cleared just before it becomes current, so whatever was counted at
    /// generation `g` is gone once the generation is `g + 2`.
    generation: AtomicU64,
    interval_ms: u64,
    /// When the current window began (epoch ms), always a multiple of `interval_ms`: a window
    /// started late, at the first event after a quiet spell, would make the window that ended
    /// long ago look as if it had just ended and weigh it in full.
    last_reset_ms: AtomicU64,
}

impl WindowSketch {
    /// As many counters per window as a 4-row sketch `slots` wide: `slots / 2` blocks.
    fn new(window: Duration, slots: usize) -> Self {
        let blocks = (slots * HASHES / PER_WINDOW).max(1);
        Self {
            blocks: (0..blocks)
                .map(|_| Block(std::array::from_fn(|_| AtomicU32::new(0))))
                .collect(),
            generation: AtomicU64::new(0),
            interval_ms: window_ms(window),
            last_reset_ms: AtomicU64::new(0),
        }
    }

    #[inline]
    fn slot(&self, key: u64) -> Slot {
        // `key` is a keyed SipHash already; one multiply spreads even small test keys. The high
        // bits pick the block (no division), the low bits the counters within it.
        let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (key >> 29);
        let block = ((u128::from(mixed) * self.blocks.len() as u128) >> 64) as usize;
        let mask = SUBSETS[(mixed as u32 as usize) % SUBSETS.len()];
        Slot {
            block,
            mask,
            generation: 0,
        }
    }

    /// The generation, after starting a new window if the current one is over.
    #[inline]
    fn generation_now(&self, now: u64) -> u64 {
        self.maybe_reset(now);
        self.generation.load(Ordering::Acquire)
    }

    /// Starts a new window when the current one is over; returns the ms since the current
    /// window began (as it was before any reset), as `Rate` does. `now` is epoch ms; a clock
    /// that steps back by up to a window prolongs the current window, a longer step starts
    /// over ([`restart`](Self::restart)).
    #[inline]
    fn maybe_reset(&self, now: u64) -> u64 {
        let last = self.last_reset_ms.load(Ordering::Acquire);
        let past = now.saturating_sub(last);
        if past < self.interval_ms {
            if now.saturating_add(self.interval_ms) < last {
                return self.restart(last, now);
            }
            return past;
        }
        // The window `now` falls in, on the grid: `past % interval_ms` into it.
        let start = last + self.interval_ms * (past / self.interval_ms);
        let generation = self.generation.load(Ordering::Acquire);
        let current = (generation & 1) as usize;
        if self
            .last_reset_ms
            .compare_exchange(last, start, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // The previous window's half is cleared and becomes the current one.
            self.clear(current ^ 1);
            self.generation.store(generation + 1, Ordering::Release);
            if past >= self.interval_ms * 2 {
                // Nothing happened for two windows: the old current one is stale too.
                self.clear(current);
            }
        }
        past
    }

    /// The clock stepped back by more than a window: every count lies "ahead" of `now`, and
    /// kept, it would refuse its keys until the clock caught up (for as long as the step). The
    /// grid starts over at `now`'s window with nothing counted; the generation moves on by two,
    /// so whatever was counted is gone by the rule [`check_rare`] relies on. Returns the ms
    /// since the new window began.
    ///
    /// [`check_rare`]: SlidingWindowLimiter::check_rare
    #[cold]
    fn restart(&self, last: u64, now: u64) -> u64 {
        let start = now - now % self.interval_ms;
        if self
            .last_reset_ms
            .compare_exchange(last, start, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.clear(0);
            self.clear(1);
            self.generation.fetch_add(2, Ordering::AcqRel);
        }
        now - start
    }

    fn clear(&self, half: usize) {
        for block in self.blocks.iter() {
            for counter in &block.0[half * PER_WINDOW..(half + 1) * PER_WINDOW] {
                counter.store(0, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    fn min(block: &Block, half: usize, mask: u8) -> u32 {
        let counters = &block.0[half * PER_WINDOW..(half + 1) * PER_WINDOW];
        let mut min = u32::MAX;
        for (i, counter) in counters.iter().enumerate() {
            if mask & (1 << i) != 0 {
                min = min.min(counter.load(Ordering::Relaxed));
            }
        }
        min
    }

    /// The key's counts, and its slot for a following [`add`](Self::add).
    #[inline]
    fn counts(&self, key: u64, now: u64) -> (Counts, Slot) {
        let past = self.maybe_reset(now);
        let mut slot = self.slot(key);
        slot.generation = self.generation.load(Ordering::Acquire);
        let current = slot.current();
        let block = &self.blocks[slot.block];
        let (previous, current_count) = if past >= self.interval_ms * 2 {
            (0, 0)
        } else if past >= self.interval_ms {
            // A reset just happened: the window that ended is the previous one now.
            (Self::min(block, current ^ 1, slot.mask), 0)
        } else {
            (
                Self::min(block, current ^ 1, slot.mask),
                Self::min(block, current, slot.mask),
            )
        };
        let counts = Counts {
            previous,
            current: current_count,
            // Time since the (grid-aligned) start of the window `now` is in.
            elapsed_ms: past % self.interval_ms,
            // 0 unless `now` is at or before the window's start (read again only then).
            behind_ms: if past == 0 {
                self.last_reset_ms
                    .load(Ordering::Acquire)
                    .saturating_sub(now)
            } else {
                0
            },
        };
        (counts, slot)
    }

    /// Counts one event in the window that was current when `slot` was read.
    #[inline]
    fn add(&self, slot: Slot) {
        let block = &self.blocks[slot.block];
        let half = slot.current();
        let counters = &block.0[half * PER_WINDOW..(half + 1) * PER_WINDOW];
        for (i, counter) in counters.iter().enumerate() {
            if slot.mask & (1 << i) != 0 {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The two windows' counts and how far into the current one we are. In integers, so that
/// waits and resets are exact: in floating point, 70% into a 10 s window left 3000.0000000000005
/// ms, announced as a 4 s wait.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    previous: u64,
    current: u64,
    /// Below `length_ms`.
    elapsed_ms: u64,
    length_ms: u64,
    /// How far the clock is behind the window's start (stepped back by less than a window):
    /// waits and resets count from the start, when the window really begins to pass.
    behind_ms: u64,
}

impl Window {
    /// Events in the last window-length, assuming the previous window's were spread evenly,
    /// times `length_ms` (exact: no division).
    fn scaled_estimate(&self) -> u64 {
        self.previous * (self.length_ms - self.elapsed_ms) + self.current * self.length_ms
    }

    /// Milliseconds (rounded up) until the estimate falls to `target` if no more events arrive.
    fn ms_until_at_most(&self, target: u64) -> u64 {
        let length = self.length_ms;
        if self.scaled_estimate() <= target * length {
            return 0;
        }
        let rest_of_window = length - self.elapsed_ms;
        if self.current <= target {
            // Still inside this window (`previous` > 0, or the estimate would be at most
            // `target`): the previous window's weight decays linearly; it is below the target
            // by the end of this window.
            (rest_of_window * self.previous - (target - self.current) * length)
                .div_ceil(self.previous)
        } else if target == 0 {
            // Every event must pass (the reset): this window's weigh in full until the
            // boundary, then decay over the next window. No division on the admitted path.
            rest_of_window + length
        } else {
            // Only after the boundary, when this window's events start decaying in turn.
            rest_of_window + ((self.current - target) * length).div_ceil(self.current)
        }
    }
}

/// Refuses when one more event would exceed `limit`; otherwise the budget left, after this
/// event when it is `counted`.
fn decide(window: Window, limit: u32, now_ms: u64, counted: bool) -> RateDecision {
    let scaled_limit = u64::from(limit) * window.length_ms;
    if window.scaled_estimate() + window.length_ms > scaled_limit {
        let wait_ms = window.ms_until_at_most(u64::from(limit).saturating_sub(1));
        let behind = window.behind_ms;
        return RateDecision::Limited {
            limit,
            retry_after_secs: (behind + wait_ms).div_ceil(1000).max(1),
            reset_at_ms: now_ms + behind + window.ms_until_at_most(0),
        };
    }
    let after = Window {
        current: window.current + u64::from(counted),
        ..window
    };
    RateDecision::Allowed {
        limit,
        remaining: (scaled_limit.saturating_sub(after.scaled_estimate()) / window.length_ms) as u32,
        reset_at_ms: now_ms + after.behind_ms + after.ms_until_at_most(0),
    }
}

/// Caps concurrent requests per key; the slot is released when the guard drops, however the
/// request ends (answered, refused, client gone, upstream error).
///
/// The counts are a count-min sketch (pingora-limits' [`Estimator`]) as wide as the rate
/// limiter's (`estimator_slots` per row), so it tells apart as many concurrent clients.
/// pingora-limits' own `Inflight` is fixed at 8,192 counters per row: with 10,000 clients
/// holding one request each, a quarter of them would find all four of their counters shared
/// and be refused under `max_inflight: 1`.
pub struct ConcurrencyLimiter {
    counts: Arc<Estimator>,
    max: u32,
}

/// Rows of the concurrency sketch: a false refusal needs collisions in all of them.
const CONCURRENCY_HASHES: usize = 4;

impl ConcurrencyLimiter {
    pub fn new(max: u32, slots: usize) -> Self {
        Self {
            counts: Arc::new(Estimator::new(CONCURRENCY_HASHES, slots.max(1))),
            max,
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// A guard holding the slot, or `None` when `key` already has `max` requests running.
    #[inline]
    pub fn acquire(&self, key: u64) -> Option<ConcurrencySlot> {
        let slot = ConcurrencySlot {
            counts: Arc::clone(&self.counts),
            key,
        };
        // A refused slot is released by its drop, like an admitted one.
        (self.counts.incr(key, 1) <= self.max as isize).then_some(slot)
    }
}

/// One request's place in the concurrency count, given back when dropped.
pub struct ConcurrencySlot {
    counts: Arc<Estimator>,
    key: u64,
}

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        self.counts.decr(self.key, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 60 s window, `elapsed` of the way into it.
    fn w(previous: u64, current: u64, elapsed: f64) -> Window {
        Window {
            previous,
            current,
            elapsed_ms: (elapsed * 60_000.0).round() as u64,
            length_ms: 60_000,
            behind_ms: 0,
        }
    }

    #[test]
    fn allows_up_to_the_limit_and_reports_remaining() {
        match decide(w(0, 3, 0.5), 5, 1000, true) {
            RateDecision::Allowed { remaining, .. } => assert_eq!(remaining, 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(w(0, 4, 0.5), 5, 0, true),
            RateDecision::Allowed { remaining: 0, .. }
        ));
        assert!(matches!(
            decide(w(0, 5, 0.5), 5, 0, true),
            RateDecision::Limited { .. }
        ));
    }

    #[test]
    fn previous_window_still_counts_so_no_double_burst() {
        // 10 requests in the last minute, limit 10, 10% into this one: 9 of them still weigh
        // in, so one more fits and the next is refused (a fixed window would allow 10).
        assert!(matches!(
            decide(w(10, 0, 0.1), 10, 0, true),
            RateDecision::Allowed { remaining: 0, .. }
        ));
        assert!(matches!(
            decide(w(10, 1, 0.1), 10, 0, true),
            RateDecision::Limited { .. }
        ));
        // Half-way through, half the weight is gone: 5 fit.
        let mut window = w(10, 0, 0.5);
        let mut allowed = 0;
        while let RateDecision::Allowed { .. } = decide(window, 10, 0, true) {
            window.current += 1;
            allowed += 1;
        }
        assert_eq!(allowed, 5);
    }

    #[test]
    fn retry_after_is_when_one_more_fits() {
        // Previous 10, current 1, 10% in, limit 10: need estimate <= 9, so the previous
        // weight must drop by 1, i.e. elapsed 0.1 -> 0.2: 6 s.
        match decide(w(10, 1, 0.1), 10, 0, true) {
            RateDecision::Limited {
                retry_after_secs, ..
            } => assert_eq!(retry_after_secs, 6),
            other => panic!("{other:?}"),
        }
        // Current window alone is full: wait for the boundary plus decay.
        match decide(w(0, 10, 0.5), 10, 0, true) {
            RateDecision::Limited {
                retry_after_secs,
                reset_at_ms,
                ..
            } => {
                assert_eq!(retry_after_secs, 36); // 30 s to the boundary + 6 s of decay
                assert_eq!(reset_at_ms, 90_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        match decide(w(10, 1, 0.1999), 10, 0, true) {
            RateDecision::Limited {
                retry_after_secs, ..
            } => assert_eq!(retry_after_secs, 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_check_reports_the_budget_as_it_stands_and_counts_nothing() {
        let limiter = SlidingWindowLimiter::new(3, Duration::from_secs(60), 1024);
        limiter.count(5, 0);
        for _ in 0..3 {
            assert!(matches!(
                limiter.check(5, 0),
                RateDecision::Allowed { remaining: 2, .. }
            ));
        }
        assert!(matches!(
            limiter.check_and_count(5, 0),
            RateDecision::Allowed { remaining: 1, .. }
        ));
    }

    #[test]
    fn limiter_counts_only_admitted_events() {
        let limiter = SlidingWindowLimiter::new(3, Duration::from_secs(60), 1024);
        let key = 42;
        for _ in 0..3 {
            assert!(matches!(
                limiter.check_and_count(key, 0),
                RateDecision::Allowed { .. }
            ));
        }
        for _ in 0..5 {
            assert!(matches!(
                limiter.check_and_count(key, 0),
                RateDecision::Limited { .. }
            ));
        }
        assert!(matches!(
            limiter.check_and_count(43, 0),
            RateDecision::Allowed { .. }
        ));
    }

    /// A window boundary on the grid (epoch ms, a multiple of 10 s and of 1 s).
    const GRID: u64 = 1_700_000_000_000;

    fn allowed(d: &RateDecision) -> bool {
        matches!(d, RateDecision::Allowed { .. })
    }

    #[test]
    fn a_rare_event_limiter_skips_the_counters_only_while_nothing_can_be_counted() {
        let window = Duration::from_secs(1);
        let limiter = SlidingWindowLimiter::new(3, window, 1024);
        let never = || -> u64 { panic!("a quiet limiter needs no key") };
        assert_eq!(limiter.check_rare(never, GRID), None, "nothing counted yet");
        let (throttled, other) = (7, 8);
        let last_event = GRID + 100;
        for _ in 0..3 {
            limiter.count(throttled, last_event);
        }
        assert!(matches!(
            limiter.check_rare(|| throttled, last_event),
            Some(RateDecision::Limited { .. })
        ));
        assert!(matches!(
            limiter.check_rare(|| other, last_event),
            Some(RateDecision::Allowed { .. })
        ));
        // Over the next windows: whenever the counters are skipped, reading them allows the
        // key too; and they are skipped again once the events' half of the sketch is cleared.
        let mut quiet_after = None;
        for now in (last_event..last_event + 6_000).step_by(50) {
            match limiter.check_rare(|| throttled, now) {
                None => {
                    let read = limiter.check(throttled, now);
                    assert!(
                        allowed(&read),
                        "skipped at +{} while {read:?}",
                        now - last_event
                    );
                    quiet_after.get_or_insert(now - last_event);
                }
                Some(decision) => {
                    assert_eq!(decision, limiter.check(throttled, now));
                    assert!(quiet_after.is_none(), "quiet stays quiet until an event");
                }
            }
        }
        // The events' window [GRID, GRID+1s) is cleared when the window after next begins.
        assert_eq!(
            quiet_after,
            Some(1_900),
            "quiet once the grid moved two windows on"
        );
        // A new event ends the quiet at once.
        let now = last_event + 6_000;
        limiter.count(other, now);
        assert!(limiter.check_rare(|| other, now).is_some());
        assert!(limiter.check_rare(|| throttled, now).is_some());
    }

    /// The reviewer's case: 3 failures allowed per 10 s, 3 failures, 17 s of silence, then a
    /// request. Every event is older than one window; a window started at the request (not
    /// on the grid) made the next read weigh them in full (429, Retry-After 4).
    #[test]
    fn events_older_than_a_window_do_not_refuse_after_an_idle_gap() {
        let limiter = SlidingWindowLimiter::new(3, Duration::from_secs(10), 1024);
        let (key, t0) = (7, GRID + 1_000);
        for _ in 0..3 {
            limiter.count(key, t0);
        }
        assert!(!allowed(&limiter.check(key, t0)));
        let later = t0 + 17_000;
        // What request_filter does: the rare-event check, then (when it reads) the check.
        let rare = limiter.check_rare(|| key, later);
        assert!(rare.is_none_or(|d| allowed(&d)), "{rare:?}");
        assert!(allowed(&limiter.check(key, later)));
        // Later reads in the same window stay on the grid: 8 s into it, 20% of the 3 old
        // events weigh in (0.6), so two more fit, not none.
        assert!(matches!(
            limiter.check_and_count(key, later + 1),
            RateDecision::Allowed { remaining: 1, .. }
        ));
        assert!(allowed(&limiter.check_and_count(key, later + 2)));
        assert!(!allowed(&limiter.check_and_count(key, later + 3)));
    }

    #[test]
    fn the_window_after_an_idle_gap_is_weighed_by_its_place_on_the_grid() {
        let limiter = SlidingWindowLimiter::new(10, Duration::from_secs(10), 1024);
        let key = 9;
        for _ in 0..10 {
            assert!(allowed(&limiter.check_and_count(key, GRID + 500)));
        }
        // 15 s later: 5 s into the next window, half the previous window's 10 still count.
        let now = GRID + 15_000;
        for n in 0..5 {
            assert!(
                allowed(&limiter.check_and_count(key, now + n)),
                "request {n} refused"
            );
        }
        assert!(!allowed(&limiter.check_and_count(key, now + 5)));
    }

    /// The wall clock stepped back by more than a window (NTP correcting a clock that ran
    /// ahead, e.g. an RTC read as UTC, after tollgate started): the window begun "ahead" stayed
    /// current until the clock caught up, so a client refused then (or an IP locked out for
    /// failed authentications) stayed refused for as long as the step, whatever Retry-After said.
    #[test]
    fn a_clock_stepped_back_by_more_than_a_window_starts_over() {
        let limiter = SlidingWindowLimiter::new(3, Duration::from_secs(10), 1024);
        let key = 5;
        let ahead = GRID + 3_600_000;
        for _ in 0..3 {
            limiter.count(key, ahead);
        }
        assert!(!allowed(&limiter.check_and_count(key, ahead + 1)));
        assert!(limiter.check_rare(|| key, ahead + 1).is_some());
        // An hour back: what was counted "ahead" is gone at once.
        let now = GRID + 4_000;
        assert_eq!(limiter.check_rare(|| key, now), None, "quiet again");
        assert!(matches!(
            limiter.check_and_count(key, now),
            RateDecision::Allowed { remaining: 2, .. }
        ));
        // Counting goes on, on the grid of the corrected clock.
        assert!(allowed(&limiter.check_and_count(key, now + 1)));
        assert!(allowed(&limiter.check_and_count(key, now + 2)));
        assert!(!allowed(&limiter.check_and_count(key, now + 3)));
        assert!(allowed(&limiter.check_and_count(key, GRID + 20_000)));
        // A step back shorter than a window only prolongs the current one: nothing is forgotten.
        let limiter = SlidingWindowLimiter::new(3, Duration::from_secs(10), 1024);
        for _ in 0..3 {
            limiter.count(key, GRID + 9_000);
        }
        assert!(!allowed(&limiter.check(key, GRID + 1_000)));
    }

    /// Found by the decision model (`decision_model.rs`): the window arithmetic was done in
    /// floating point, so `1 - 0.7` of a 10 s window came to 3000.0000000000005 ms and a wait
    /// of exactly 3 s was announced as `Retry-After: 4`, and `X-RateLimit-Reset` (epoch ms)
    /// came a millisecond late in most windows (999 ms into a 1 s window: 1.0000000000000009
    /// ms left, rounded up to 2).
    #[test]
    fn waits_and_resets_are_exact_at_whole_seconds_and_milliseconds() {
        let limiter = SlidingWindowLimiter::new(1, Duration::from_secs(10), 1024);
        let key = 3;
        limiter.count(key, GRID + 500);
        // 7 s into the next window: 30% of the one event still weighs, for exactly 3 s more.
        let now = GRID + 17_000;
        assert_eq!(
            limiter.check(key, now),
            RateDecision::Limited {
                limit: 1,
                retry_after_secs: 3,
                reset_at_ms: GRID + 20_000,
            }
        );
        let limiter = SlidingWindowLimiter::new(1, Duration::from_secs(1), 1024);
        let now = GRID + 999;
        assert_eq!(
            limiter.check_and_count(key, now),
            RateDecision::Allowed {
                limit: 1,
                remaining: 0,
                // The event weighs in full until GRID + 1 s, then decays for a window.
                reset_at_ms: GRID + 2_000,
            }
        );
    }

    /// Found by the decision model: after the clock stepped back by less than a window (into
    /// the window before the one the limiter is in), the limiter stays in its window until the
    /// clock catches up, but `Retry-After` and `X-RateLimit-Reset` were counted from the
    /// clock's time as if the window started now, so a client that waited as told was refused
    /// again.
    #[test]
    fn behind_the_window_waits_and_resets_count_from_its_start() {
        let limiter = SlidingWindowLimiter::new(1, Duration::from_secs(10), 1024);
        let (key, other) = (3, 4);
        limiter.count(key, GRID + 9_000);
        // A second back behind the window [GRID, GRID + 10 s) the event is in: it weighs in
        // full until GRID + 10 s, then decays over the next window.
        let now = GRID - 1_000;
        assert_eq!(
            limiter.check(key, now),
            RateDecision::Limited {
                limit: 1,
                retry_after_secs: 21,
                reset_at_ms: GRID + 20_000,
            }
        );
        assert_eq!(
            limiter.check_and_count(other, now),
            RateDecision::Allowed {
                limit: 1,
                remaining: 0,
                reset_at_ms: GRID + 20_000,
            }
        );
    }

    #[test]
    fn two_idle_windows_forget_everything() {
        let limiter = SlidingWindowLimiter::new(3, Duration::from_secs(10), 1024);
        let key = 11;
        for _ in 0..3 {
            limiter.count(key, GRID + 9_999);
        }
        // 20 s after the window began (10 s after the events): both halves are stale.
        let now = GRID + 20_000;
        assert!(matches!(
            limiter.check_and_count(key, now),
            RateDecision::Allowed { remaining: 2, .. }
        ));
        assert!(matches!(
            limiter.check_and_count(key, now + 1),
            RateDecision::Allowed { remaining: 1, .. }
        ));
    }

    #[test]
    fn a_quiet_ip_is_not_limited_by_100k_active_ips() {
        let hasher = KeyHasher::default();
        let limiter = SlidingWindowLimiter::new(60, Duration::from_secs(60), 131_072);
        for i in 0..100_000u32 {
            let ip = IpAddr::from(i.to_be_bytes().map(|b| b.wrapping_add(1)));
            let key = hasher.hash(LimitKey::Ip(ip));
            for _ in 0..5 {
                limiter.count(key, 0);
            }
        }
        let quiet = hasher.hash(LimitKey::Ip("203.0.113.7".parse().unwrap()));
        // Half its budget: the sketch's noise from 500,000 other events must stay below the rest.
        for n in 0..30 {
            assert!(
                matches!(
                    limiter.check_and_count(quiet, 0),
                    RateDecision::Allowed { .. }
                ),
                "quiet IP refused after {n} requests"
            );
        }
    }

    #[test]
    fn user_and_ip_keys_do_not_collide() {
        let hasher = KeyHasher::default();
        assert_ne!(
            hasher.hash(LimitKey::User("1.2.3.4")),
            hasher.hash(LimitKey::Ip("1.2.3.4".parse().unwrap()))
        );
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let hasher = KeyHasher::default();
        let ip = |text: &str| hasher.hash(LimitKey::Ip(text.parse().unwrap()));
        assert_eq!(
            ip("2001:db8:1:2::1"),
            ip("2001:db8:1:2:ffff:abcd:1234:5678")
        );
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"));
        assert_ne!(ip("192.0.2.1"), ip("192.0.2.2"), "IPv4 stays per address");
    }

    #[test]
    fn concurrency_slots_are_released_on_drop() {
        let limiter = ConcurrencyLimiter::new(2, 1024);
        let a = limiter.acquire(1).unwrap();
        let _b = limiter.acquire(1).unwrap();
        assert!(limiter.acquire(1).is_none());
        assert!(
            limiter.acquire(1).is_none(),
            "a refusal gives its slot back"
        );
        drop(a);
        assert!(limiter.acquire(1).is_some());
    }

    /// With 8,000 clients holding one request each under `max_inflight: 1`, at the default
    /// width, the held clients and 1,000 more are each admitted. (pingora-limits' `Inflight`,
    /// 8,192 counters per row, refused about 150 of the 1,000: all four of their counters
    /// shared with held clients.)
    #[test]
    fn many_concurrent_clients_are_told_apart() {
        let limiter = ConcurrencyLimiter::new(1, 131_072);
        let hasher = KeyHasher::default();
        let key = |client: u32| hasher.hash(LimitKey::Ip(IpAddr::from(client.to_be_bytes())));
        let mut held = Vec::new();
        let mut refused = 0;
        for client in 0..8_000 {
            match limiter.acquire(key(client)) {
                Some(slot) => held.push(slot),
                None => refused += 1,
            }
        }
        for client in 8_000..9_000 {
            if limiter.acquire(key(client)).is_none() {
                refused += 1;
            }
        }
        // Two refusals are allowed for the sketch's odds (about 1 in 50 runs would see one).
        assert!(refused <= 2, "{refused} of 9,000 clients refused");
    }
}
