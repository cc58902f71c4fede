//! The store-sync engine: a Pingora background service that writes the cache's changes to the
//! backend every `flush_interval`, on demand (admin writes wait for it), and once more on
//! graceful shutdown. At most one batch is in flight; a failed batch is kept and retried with
//! exponential backoff, and new changes keep queueing behind it in the cache.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{error, info, warn};
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{Batch, HeldBack, StoreBackend, StoreError, Unwritten};
use crate::clock::now_ms;
use crate::observe::StoreGauges;
use crate::users::{Change, ChangeTicket, User, UserCache};

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// How often the engine asks the store whether another process wrote it.
const READ_BACK_INTERVAL: Duration = Duration::from_secs(1);
/// Users per batch (one Firebase PATCH) unless the backend says otherwise.
pub const DEFAULT_BATCH_USERS: usize = 1_000;

/// The engine's state as the admin API, health checks and metrics see it.
pub struct StoreStatus {
    store: &'static str,
    cache: Arc<UserCache>,
    wake: Notify,
    durable: watch::Sender<ChangeTicket>,
    last_flush_ms: AtomicU64,
    flush_failures: AtomicU64,
    in_flight_users: AtomicU64,
    /// False while a change stream (Firebase) is down; stores without one are always "up".
    stream_connected: AtomicBool,
    stream_reconnects: AtomicU64,
    ready: AtomicBool,
    /// The process is handing over to a new one or stopping ([`StoreStatus::set_leaving`]).
    leaving: AtomicBool,
    /// Changes the store refused for good, newest last (at most [`REFUSALS_KEPT`]), so an
    /// admin write that waited for the store is not reported persisted when it was dropped.
    refusals: Mutex<VecDeque<Refusal>>,
    /// Users whose change the store held back ([`super::ApplyReport::held_back`]) and that
    /// are not written yet: their edits are not durable, whatever the ticket says.
    held_back: watch::Sender<HashSet<Arc<str>>>,
    /// Users held back, including those with only `ip` additions left (the metric).
    held_back_users: AtomicU64,
}

/// A change the store refused: its user, the newest ticket it included, and why.
struct Refusal {
    token: Arc<str>,
    taken_at: ChangeTicket,
    reason: String,
}

const REFUSALS_KEPT: usize = 1024;

impl StoreStatus {
    pub fn new(store: &'static str, cache: Arc<UserCache>) -> Arc<Self> {
        Arc::new(Self {
            store,
            cache,
            wake: Notify::new(),
            durable: watch::channel(0).0,
            last_flush_ms: AtomicU64::new(0),
            flush_failures: AtomicU64::new(0),
            in_flight_users: AtomicU64::new(0),
            stream_connected: AtomicBool::new(true),
            stream_reconnects: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            refusals: Mutex::new(VecDeque::new()),
            held_back: watch::channel(HashSet::new()).0,
            held_back_users: AtomicU64::new(0),
        })
    }

    fn record_refusal(&self, token: Arc<str>, taken_at: ChangeTicket, reason: String) {
        let mut refusals = self.refusals.lock();
        if refusals.len() == REFUSALS_KEPT {
            refusals.pop_front();
        }
        refusals.push_back(Refusal {
            token,
            taken_at,
            reason,
        });
    }

    /// The users whose changes the store refused, with why, among the changes that included
    /// the edits up to `ticket` or later ones (checked after [`StoreStatus::wait_durable`]).
    pub fn refusals_since(&self, ticket: ChangeTicket) -> Vec<(Arc<str>, String)> {
        let refusals = self.refusals.lock();
        refusals
            .iter()
            .filter(|r| r.taken_at >= ticket)
            .map(|r| (Arc::clone(&r.token), r.reason.clone()))
            .collect()
    }

    pub fn store(&self) -> &'static str {
        self.store
    }

    /// Asks the engine to write now instead of at the next interval.
    pub fn request_flush(&self) {
        self.wake.notify_one();
    }

    /// Requests a flush and waits until the store confirmed every change up to `ticket`.
    /// False when `timeout` passed first (the change stays queued and will be written).
    pub async fn wait_durable(&self, ticket: ChangeTicket, timeout: Duration) -> bool {
        let mut rx = self.durable.subscribe();
        self.request_flush();
        tokio::time::timeout(timeout, rx.wait_for(|done| *done >= ticket))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// [`wait_durable`](Self::wait_durable), and then until none of `tokens` has a change the
    /// store held back: those users' edits are not written although later tickets are.
    pub async fn wait_written(
        &self,
        ticket: ChangeTicket,
        tokens: &[&str],
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        if !self.wait_durable(ticket, timeout).await {
            return false;
        }
        let mut rx = self.held_back.subscribe();
        tokio::time::timeout_at(
            deadline,
            rx.wait_for(|held| tokens.iter().all(|t| !held.contains(*t))),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    pub fn durable_ticket(&self) -> ChangeTicket {
        *self.durable.borrow()
    }

    fn confirm(&self, ticket: ChangeTicket) {
        self.durable.send_if_modified(|done| {
            let advance = ticket > *done;
            if advance {
                *done = ticket;
            }
            advance
        });
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.stream_connected.load(Ordering::Acquire)
    }

    /// From now on this process takes no admin writes: it is handing its listeners to a new
    /// process or stopping, and a change made here could land after the new process read the
    /// store, or be written only at the very end.
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// False while a change stream is down or has not delivered its snapshot since it
    /// reconnected: changes made elsewhere may be missing from the cache.
    pub fn cache_is_current(&self) -> bool {
        self.stream_connected.load(Ordering::Acquire)
    }

    pub fn set_stream_connected(&self, connected: bool) {
        self.stream_connected.store(connected, Ordering::Release);
    }

    pub fn count_reconnect(&self) {
        self.stream_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn gauges(&self) -> StoreGauges {
        StoreGauges {
            users_in_cache: self.cache.len(),
            pending_changes: self.cache.queued_len()
                + self.in_flight_users.load(Ordering::Relaxed) as usize,
            held_back_users: self.held_back_users.load(Ordering::Relaxed),
            last_flush_epoch_ms: self.last_flush_ms.load(Ordering::Relaxed),
            flush_failures: self.flush_failures.load(Ordering::Relaxed),
            stream_connected: self.stream_connected.load(Ordering::Relaxed),
            stream_reconnects: self.stream_reconnects.load(Ordering::Relaxed),
            ready: self.is_ready(),
        }
    }
}

pub struct SyncEngine {
    backend: Arc<dyn StoreBackend>,
    status: Arc<StoreStatus>,
    cache: Arc<UserCache>,
    interval: Duration,
    shutdown_deadline: Duration,
    batch_users: usize,
    state: tokio::sync::Mutex<EngineState>,
}

#[derive(Default)]
struct EngineState {
    /// The batch being written, kept across failed attempts, and its `taken_at` ticket.
    in_flight: Option<(Batch, ChangeTicket)>,
    next_seq: u64,
    failures_in_a_row: u32,
    /// The last check for other writers failed (logged once until it works again).
    read_back_failing: bool,
    /// Changes the store held back, to go with the next batch (see [`HeldBack`]).
    held: Vec<Change>,
    /// Attempts so far for each user held back, for the log.
    held_attempts: HashMap<Arc<str>, u32>,
    /// The users in `held` with nothing of their change written ([`Unwritten::Whole`]).
    held_whole: HashSet<Arc<str>>,
}

impl SyncEngine {
    pub fn new(
        backend: Arc<dyn StoreBackend>,
        status: Arc<StoreStatus>,
        interval: Duration,
        shutdown_deadline: Duration,
    ) -> Self {
        Self {
            batch_users: backend.batch_users().max(1),
            cache: Arc::clone(&status.cache),
            backend,
            status,
            interval,
            shutdown_deadline,
            state: tokio::sync::Mutex::new(EngineState::default()),
        }
    }

    pub fn with_batch_users(mut self, users: usize) -> Self {
        self.batch_users = users.max(1);
        self
    }

    /// Writes what was queued when it was called, in batches; changes queued meanwhile wait
    /// for the next flush, so steady traffic cannot keep one flush writing back to back.
    /// `Err` after the first failed write (its batch is kept).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.write_queued(false).await
    }

    /// `until_empty`: also write what is queued while writing (the last flush at shutdown).
    async fn write_queued(&self, until_empty: bool) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        // Users are written whole: read another writer's changes first, so as not to write
        // back what it replaced.
        self.read_back_locked(&mut state).await;
        // A batch kept from a failed attempt was taken before this call: whatever was queued
        // since it was taken is part of this flush's work too.
        let mut retrying = state.in_flight.is_some();
        // Changes held back go with the first batch taken here, once per call, so a user whose
        // write keeps failing is tried once per flush, not again and again in one. They stay
        // in the state until then: a retried batch that fails first returns without them.
        let mut held_taken = false;
        loop {
            if state.in_flight.is_none() {
                let held = if std::mem::replace(&mut held_taken, true) {
                    Vec::new()
                } else {
                    std::mem::take(&mut state.held)
                };
                let taken = self.cache.take_changes_after(held, self.batch_users);
                if taken.changes.is_empty() {
                    if let Some(ticket) = taken.covers {
                        self.status.confirm(ticket);
                    }
                    return Ok(());
                }
                state.next_seq += 1;
                self.status
                    .in_flight_users
                    .store(taken.changes.len() as u64, Ordering::Relaxed);
                let batch = Batch {
                    seq: state.next_seq,
                    changes: taken.changes,
                    covers: taken.covers,
                };
                state.in_flight = Some((batch, taken.taken_at));
            }
            let (batch, _) = state.in_flight.as_ref().expect("set above");
            match self.backend.apply(batch).await {
                Ok(report) => {
                    let (batch, taken_at) = state.in_flight.take().expect("set above");
                    let mut refused = HashSet::with_capacity(report.rejected.len());
                    for (token, reason) in report.rejected {
                        error!(
                            "{} store refused a change for user {}; it is dropped and the user \
                             goes back to its stored value: {reason}",
                            self.backend.name(),
                            crate::observe::token_id(&token)
                        );
                        refused.insert(Arc::clone(&token));
                        self.status.record_refusal(token, taken_at, reason);
                    }
                    let fold = !self.backend.echoes_counters();
                    let held_back: HashMap<Arc<str>, Unwritten> = report
                        .held_back
                        .iter()
                        .map(|h| (Arc::clone(&h.token), h.part))
                        .collect();
                    let (mut written, mut dropped, mut ips_left) =
                        (Vec::new(), Vec::new(), Vec::new());
                    for change in &batch.changes {
                        if refused.contains(change.token()) {
                            dropped.push(change.clone());
                            continue;
                        }
                        match held_back.get(change.token()) {
                            None => written.push(change.clone()),
                            Some(Unwritten::IpAdditions) => ips_left.push(change.clone()),
                            // Not acknowledged: still in flight, carried to the next batch.
                            Some(Unwritten::Whole) => state.held.push(change.clone()),
                        }
                    }
                    self.cache.acknowledge(&written, fold);
                    self.cache.acknowledge_except_ips(&ips_left, fold);
                    state
                        .held
                        .extend(ips_left.iter().filter_map(Change::ip_additions_only));
                    if !dropped.is_empty() {
                        // A refused change's requests were not stored: not added to the count.
                        self.cache.acknowledge(&dropped, false);
                        self.restore(&dropped).await;
                    }
                    // Before `confirm`: a waiter woken by it must see who is still held back.
                    self.note_held_back(&mut state, &report.held_back, &batch);
                    self.status
                        .in_flight_users
                        .store(state.held.len() as u64, Ordering::Relaxed);
                    self.status.last_flush_ms.store(now_ms(), Ordering::Relaxed);
                    if state.failures_in_a_row > 0 {
                        info!("{} store writes recovered", self.backend.name());
                    }
                    state.failures_in_a_row = 0;
                    if let Some(ticket) = batch.covers {
                        self.status.confirm(ticket);
                    }
                    // `covers` is set when the batch emptied the queue it was taken from.
                    if batch.covers.is_some() && !retrying && !until_empty {
                        return Ok(());
                    }
                    retrying = false;
                }
                Err(e) => {
                    state.failures_in_a_row += 1;
                    self.status.flush_failures.fetch_add(1, Ordering::Relaxed);
                    if state.failures_in_a_row == 1 || state.failures_in_a_row.is_power_of_two() {
                        warn!(
                            "{} store write failed ({} in a row), will retry: {e}",
                            self.backend.name(),
                            state.failures_in_a_row
                        );
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Logs the users the store held back (at the first attempt and then at powers of two)
    /// and those written after being held back, and publishes who is held back now.
    fn note_held_back(&self, state: &mut EngineState, held: &[HeldBack], batch: &Batch) {
        for change in &batch.changes {
            if held.iter().any(|h| h.token == *change.token()) {
                continue;
            }
            state.held_whole.remove(change.token());
            if let Some(attempts) = state.held_attempts.remove(change.token()) {
                info!(
                    "{} store: user {} is no longer held back, after {attempts} attempts",
                    self.backend.name(),
                    crate::observe::token_id(change.token())
                );
            }
        }
        for h in held {
            if h.part == Unwritten::Whole {
                state.held_whole.insert(Arc::clone(&h.token));
            } else {
                state.held_whole.remove(&h.token);
            }
            let attempts = state.held_attempts.entry(Arc::clone(&h.token)).or_insert(0);
            *attempts += 1;
            if *attempts == 1 || attempts.is_power_of_two() {
                let what = match h.part {
                    Unwritten::Whole => "its change",
                    Unwritten::IpAdditions => "the addresses its requests added",
                };
                warn!(
                    "{} store: cannot write {what} for user {} ({} attempts): {}; the other \
                     users' changes are written, and this one is kept and tried again with \
                     the next write",
                    self.backend.name(),
                    crate::observe::token_id(&h.token),
                    attempts,
                    h.reason
                );
            }
        }
        self.status.held_back.send_replace(state.held_whole.clone());
        self.status
            .held_back_users
            .store(state.held_attempts.len() as u64, Ordering::Relaxed);
    }

    /// The store's values of users whose change it refused, back into the cache. A store that
    /// cannot be read now leaves them as they are here (logged); its next change, or a
    /// restart, brings them in line.
    async fn restore(&self, refused: &[Change]) {
        let changes: Vec<&Change> = refused.iter().collect();
        if let Err(e) = self.backend.restore(&self.cache, &changes).await {
            warn!(
                "{} store: cannot read back the {} users whose change it refused; this \
                 instance keeps their refused values for now: {e}",
                self.backend.name(),
                changes.len()
            );
        }
    }

    /// Reads the store back into the cache if another process wrote it since this one last
    /// read it (only stores that can tell: SQLite).
    pub async fn read_back(&self) {
        let mut state = self.state.lock().await;
        self.read_back_locked(&mut state).await;
    }

    /// With the state lock held and no batch in flight, every change of this process is
    /// either acknowledged (and in the store's values) or still queued here, which the
    /// cache's merge keeps: the store's values can be taken as they are.
    async fn read_back_locked(&self, state: &mut EngineState) {
        if state.in_flight.is_some() {
            return;
        }
        match self.backend.reload_if_changed().await {
            Ok(None) => state.read_back_failing = false,
            Ok(Some(users)) => {
                state.read_back_failing = false;
                let count = users.len();
                let users: HashMap<String, User> =
                    users.into_iter().map(|u| (u.token.clone(), u)).collect();
                self.cache.replace_all_remote(&users);
                info!(
                    "{} store: written by another process or client; read back {count} users",
                    self.backend.name()
                );
            }
            Err(e) => {
                if !std::mem::replace(&mut state.read_back_failing, true) {
                    warn!(
                        "{} store: cannot check for other writers: {e}",
                        self.backend.name()
                    );
                }
            }
        }
    }

    async fn backoff(&self) -> Duration {
        let failures = self.state.lock().await.failures_in_a_row;
        backoff_for(failures)
    }

    /// Writes everything still queued, retrying with backoff until the shutdown deadline.
    /// False when changes were left unwritten (logged): they are lost when the process exits.
    pub async fn final_flush(&self) -> bool {
        let deadline = Instant::now() + self.shutdown_deadline;
        let mut held_attempts = 0;
        loop {
            // One attempt may not outlast the deadline (a store request can take 30 s); a
            // write cut off here stays in flight and is resolved by the next attempt.
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = match tokio::time::timeout(left, self.write_queued(true)).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(
                    "the shutdown deadline passed during a write".into(),
                )),
            };
            match attempt {
                Ok(()) if self.state.lock().await.held.is_empty() => {
                    info!(
                        "{} store: all changes written before shutdown",
                        self.backend.name()
                    );
                    return true;
                }
                // Users held back: the rest is written; theirs is tried again until the
                // deadline.
                Ok(()) if Instant::now() < deadline => {
                    held_attempts += 1;
                    let wait = backoff_for(held_attempts).min(deadline - Instant::now());
                    tokio::time::sleep(wait).await;
                }
                Ok(()) => {
                    error!(
                        "{} store: {} users' changes were held back and could not be written \
                         before shutdown",
                        self.backend.name(),
                        self.status.gauges().pending_changes
                    );
                    return false;
                }
                Err(_) if Instant::now() < deadline => {
                    let wait = self.backoff().await.min(deadline - Instant::now());
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    error!(
                        "{} store: {} users' changes could not be written before shutdown: {e}",
                        self.backend.name(),
                        self.status.gauges().pending_changes
                    );
                    return false;
                }
            }
        }
    }
}

/// 0.5 s doubling to 60 s, jittered ([`super::backoff::jittered`]); none before a first failure.
fn backoff_for(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    super::backoff::jittered(BACKOFF_START, BACKOFF_CAP, failures)
}

#[async_trait]
impl BackgroundService for SyncEngine {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let follower = {
            let (backend, cache, status, shutdown) = (
                Arc::clone(&self.backend),
                Arc::clone(&self.cache),
                Arc::clone(&self.status),
                shutdown.clone(),
            );
            tokio::spawn(async move { backend.follow(cache, status, shutdown).await })
        };
        let mut next = Instant::now() + self.interval;
        // The first check at once: it opens the SQLite writer connection, whose baseline is
        // start-up's read, so the moment in which another client's edit goes unseen is short.
        let mut next_read_back = Instant::now();
        loop {
            let backing_off = self.state.lock().await.failures_in_a_row > 0;
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep_until(next) => {}
                _ = self.status.wake.notified(), if !backing_off => {}
                _ = tokio::time::sleep_until(next_read_back) => {
                    self.read_back().await;
                    next_read_back = Instant::now() + READ_BACK_INTERVAL;
                    continue;
                }
            }
            next = match self.flush().await {
                Ok(()) => Instant::now() + self.interval,
                Err(_) => Instant::now() + self.backoff().await,
            };
        }
        // What is left is written once more after every service stopped (main.rs), which
        // reports the outcome.
        self.final_flush().await;
        let _ = follower.await;
    }
}

#[cfg(test)]
mod tests;
