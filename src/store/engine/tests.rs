use std::sync::atomic::AtomicUsize;

use parking_lot::Mutex;

use super::*;
use crate::store::ApplyReport;
use crate::users::{Change, User, UserPatch, UserType};

/// The requests a batch carries.
fn prompt_deltas(batch: &Batch) -> u64 {
    let delta = |change: &Change| match change {
        Change::Upsert(u) => u.prompt_delta,
        Change::Delete { .. } => 0,
    };
    batch.changes.iter().map(delta).sum()
}

/// A backend that fails the first `fail` writes, then records what it was given.
struct Flaky {
    fail: AtomicUsize,
    written: Mutex<Vec<(u64, usize, u64)>>,
}

impl Flaky {
    fn new(fail: usize) -> Arc<Self> {
        Arc::new(Self {
            fail: AtomicUsize::new(fail),
            written: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl StoreBackend for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        Ok(Vec::new())
    }
    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        if self
            .fail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("injected".into()));
        }
        let deltas = prompt_deltas(batch);
        self.written
            .lock()
            .push((batch.seq, batch.changes.len(), deltas));
        Ok(ApplyReport::default())
    }
    async fn restore(&self, _: &UserCache, _: &[&Change]) -> Result<(), StoreError> {
        unreachable!("this store refuses nothing")
    }
}

fn engine(backend: Arc<Flaky>) -> (SyncEngine, Arc<UserCache>, Arc<StoreStatus>) {
    let cache = Arc::new(UserCache::default());
    let status = StoreStatus::new("flaky", Arc::clone(&cache));
    let engine = SyncEngine::new(
        backend,
        Arc::clone(&status),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    (engine, cache, status)
}

#[tokio::test]
async fn failed_batch_is_retried_unchanged_and_nothing_is_lost() {
    let backend = Flaky::new(2);
    let (engine, cache, status) = engine(Arc::clone(&backend));
    cache.load([User::new("a".into(), UserType::Normal, 1)]);
    let rec = cache.get("a").unwrap();
    for _ in 0..3 {
        cache.count_request(&rec, 1);
    }
    assert!(engine.flush().await.is_err());
    cache.count_request(&rec, 2); // queues behind the stuck batch
    assert!(engine.flush().await.is_err());
    assert_eq!(rec.prompt_count(), 4);
    engine.flush().await.unwrap();
    let written = backend.written.lock().clone();
    assert_eq!(
        written,
        vec![(1, 1, 3), (2, 1, 1)],
        "same batch #1 retried, then the rest"
    );
    assert_eq!(rec.prompt_count(), 4);
    assert_eq!(status.gauges().flush_failures, 2);
}

#[tokio::test]
async fn tickets_become_durable_after_the_write() {
    let backend = Flaky::new(1);
    let (engine, cache, status) = engine(backend);
    let ticket = cache
        .create(&User::new("a".into(), UserType::Normal, 1))
        .unwrap();
    assert!(engine.flush().await.is_err());
    assert!(status.durable_ticket() < ticket);
    engine.flush().await.unwrap();
    assert!(status.durable_ticket() >= ticket);
    assert!(status.wait_durable(ticket, Duration::from_millis(1)).await);
}

#[tokio::test]
async fn wait_durable_times_out_honestly() {
    let backend = Flaky::new(usize::MAX);
    let (engine, cache, status) = engine(backend);
    let ticket = cache
        .create(&User::new("a".into(), UserType::Normal, 1))
        .unwrap();
    let _ = engine.flush().await;
    assert!(!status.wait_durable(ticket, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn large_queues_go_out_in_several_batches() {
    let backend = Flaky::new(0);
    let (engine, cache, _) = engine(Arc::clone(&backend));
    let engine = engine.with_batch_users(10);
    for i in 0..25 {
        cache
            .create(&User::new(format!("u{i}"), UserType::Normal, 1))
            .unwrap();
    }
    engine.flush().await.unwrap();
    let sizes: Vec<usize> = backend.written.lock().iter().map(|w| w.1).collect();
    assert_eq!(sizes, vec![10, 10, 5]);
}

/// A backend whose writes take a while, during which traffic counts a request for user "a"
/// (for the first `counting` writes).
struct Busy {
    cache: Arc<UserCache>,
    counting: AtomicUsize,
    deltas: Mutex<Vec<u64>>,
}

#[async_trait]
impl StoreBackend for Busy {
    fn name(&self) -> &'static str {
        "busy"
    }
    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        Ok(Vec::new())
    }
    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self
            .counting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            self.cache.count_request(&self.cache.get("a").unwrap(), 5);
        }
        let delta = prompt_deltas(batch);
        self.deltas.lock().push(delta);
        Ok(ApplyReport::default())
    }
    async fn restore(&self, _: &UserCache, _: &[&Change]) -> Result<(), StoreError> {
        unreachable!("this store refuses nothing")
    }
}

fn busy_engine(counting: usize) -> (SyncEngine, Arc<Busy>, Arc<UserCache>) {
    let cache = Arc::new(UserCache::default());
    cache.load([User::new("a".into(), UserType::Normal, 1)]);
    let backend = Arc::new(Busy {
        cache: Arc::clone(&cache),
        counting: AtomicUsize::new(counting),
        deltas: Mutex::new(Vec::new()),
    });
    let status = StoreStatus::new("busy", Arc::clone(&cache));
    let engine = SyncEngine::new(
        Arc::clone(&backend) as Arc<dyn StoreBackend>,
        status,
        Duration::from_secs(3600),
        Duration::from_secs(5),
    );
    (engine, backend, cache)
}

#[tokio::test]
async fn a_flush_writes_what_was_queued_not_what_traffic_adds_meanwhile() {
    // Every write sees a new request counted: chasing them, one flush would never end and the
    // store would be written back to back instead of once per interval.
    let (engine, backend, cache) = busy_engine(usize::MAX);
    cache.count_request(&cache.get("a").unwrap(), 1);
    tokio::time::timeout(Duration::from_secs(5), engine.flush())
        .await
        .expect("the flush ends")
        .unwrap();
    assert_eq!(*backend.deltas.lock(), vec![1]);
    assert_eq!(cache.queued_len(), 1, "the request counted meanwhile waits");
    engine.flush().await.unwrap();
    assert_eq!(
        *backend.deltas.lock(),
        vec![1, 1],
        "and goes with the next flush"
    );
}

#[tokio::test]
async fn the_last_flush_also_writes_what_arrives_while_it_writes() {
    let (engine, backend, cache) = busy_engine(1);
    cache.count_request(&cache.get("a").unwrap(), 1);
    assert!(engine.final_flush().await);
    assert_eq!(*backend.deltas.lock(), vec![1, 1]);
    assert_eq!(cache.queued_len(), 0);
}

/// A store that takes nothing until the deadline: the last flush says so (the process then
/// exits non-zero), and the changes are still counted as pending.
#[tokio::test(start_paused = true)]
async fn the_last_flush_reports_changes_it_could_not_write() {
    let (engine, cache, status) = engine(Flaky::new(usize::MAX));
    cache.load([User::new("a".into(), UserType::Normal, 1)]);
    cache.count_request(&cache.get("a").unwrap(), 1);
    assert!(!engine.final_flush().await);
    assert_eq!(status.gauges().pending_changes, 1);
}

/// A backend that refuses every change for good (as Firebase does with a 400 it isolated), and
/// holds `stored` as its users.
#[derive(Default)]
struct Refusing {
    stored: HashMap<String, User>,
    /// The store cannot be read when the engine restores the refused users.
    unreadable: bool,
}

#[async_trait]
impl StoreBackend for Refusing {
    fn name(&self) -> &'static str {
        "refusing"
    }
    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        Ok(self.stored.values().cloned().collect())
    }
    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        let rejected = batch
            .changes
            .iter()
            .map(|c| (Arc::clone(c.token()), "invalid data".to_string()))
            .collect();
        Ok(ApplyReport {
            rejected,
            ..Default::default()
        })
    }
    async fn restore(&self, cache: &UserCache, refused: &[&Change]) -> Result<(), StoreError> {
        if self.unreadable {
            return Err(StoreError::Unavailable("down".into()));
        }
        for change in refused {
            let token = change.token();
            cache.apply_remote(token, self.stored.get(token.as_ref()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn refused_changes_are_known_to_the_writes_they_include() {
    let cache = Arc::new(UserCache::default());
    let status = StoreStatus::new("refusing", Arc::clone(&cache));
    let engine = SyncEngine::new(
        Arc::new(Refusing::default()),
        Arc::clone(&status),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let first = cache
        .create(&User::new("a".into(), UserType::Normal, 1))
        .unwrap();
    engine.flush().await.unwrap();
    let refused = status.refusals_since(first);
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (refused[0].0.as_ref(), refused[0].1.as_str()),
        ("a", "invalid data")
    );
    // An edit made after that write was taken is not the refused one.
    let later = cache
        .create(&User::new("b".into(), UserType::Normal, 1))
        .unwrap();
    assert!(status.refusals_since(later).is_empty());
}

#[tokio::test]
async fn refused_changes_are_undone_in_the_cache() {
    let mut stored = User::new("edited".into(), UserType::Normal, 1);
    stored.nickname = Some("stored".into());
    let removed = User::new("removed".into(), UserType::Normal, 1);
    let backend = Refusing {
        stored: HashMap::from([
            ("edited".to_string(), stored.clone()),
            ("removed".to_string(), removed.clone()),
        ]),
        unreadable: false,
    };
    let cache = Arc::new(UserCache::default());
    cache.load([stored, removed]);
    let status = StoreStatus::new("refusing", Arc::clone(&cache));
    let engine = SyncEngine::new(
        Arc::new(backend),
        status,
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let edit: UserPatch = serde_json::from_str(r#"{"nickname":"refused"}"#).unwrap();
    cache.upsert("edited", &edit, 2);
    cache
        .create(&User::new("new".into(), UserType::Normal, 2))
        .unwrap();
    cache.remove("removed").unwrap();
    engine.flush().await.unwrap();
    let edited = cache.user("edited").unwrap();
    assert_eq!(
        edited.nickname.as_deref(),
        Some("stored"),
        "a refused edit is undone"
    );
    assert!(cache.user("new").is_none(), "a refused creation is undone");
    assert!(
        cache.user("removed").is_some(),
        "a refused removal is undone"
    );
    assert_eq!(cache.queued_len(), 0);
}

/// Requests counted in a refused change were not stored: they are not added to the cached
/// count, even when the store cannot be read back to restore the user.
#[tokio::test]
async fn a_refused_changes_requests_are_not_counted_as_stored() {
    let cache = Arc::new(UserCache::default());
    cache.load([User::new("a".into(), UserType::Normal, 1)]);
    let engine = SyncEngine::new(
        Arc::new(Refusing {
            unreadable: true,
            ..Refusing::default()
        }),
        StoreStatus::new("refusing", Arc::clone(&cache)),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let record = cache.get("a").unwrap();
    cache.count_request(&record, 2);
    cache.count_request(&record, 3);
    engine.flush().await.unwrap();
    assert_eq!(cache.user("a").unwrap().prompt_count, 0);
}

#[test]
fn backoff_grows_and_caps() {
    assert_eq!(backoff_for(0), Duration::ZERO);
    let first = backoff_for(1);
    assert!(first >= Duration::from_millis(375) && first <= Duration::from_millis(625));
    assert!(backoff_for(30) <= Duration::from_secs(75));
    assert!(backoff_for(30) >= Duration::from_secs(45));
}

/// A backend that holds back user `b`'s change the first `hold` times it sees it, and
/// records the requests each user's written changes carried.
struct Holding {
    hold: AtomicUsize,
    /// Batches with user `a` fail this many times.
    fail_a: AtomicUsize,
    written: Mutex<HashMap<String, u64>>,
}

impl Holding {
    fn new(hold: usize, fail_a: usize) -> Arc<Self> {
        Arc::new(Self {
            hold: AtomicUsize::new(hold),
            fail_a: AtomicUsize::new(fail_a),
            written: Mutex::new(HashMap::new()),
        })
    }

    fn engine(self: &Arc<Self>) -> (SyncEngine, Arc<UserCache>, Arc<StoreStatus>) {
        let cache = Arc::new(UserCache::default());
        let status = StoreStatus::new("holding", Arc::clone(&cache));
        let engine = SyncEngine::new(
            Arc::clone(self) as Arc<dyn StoreBackend>,
            Arc::clone(&status),
            Duration::from_secs(3600),
            Duration::from_secs(30),
        );
        cache.load([
            User::new("a".into(), UserType::Normal, 1),
            User::new("b".into(), UserType::Normal, 1),
        ]);
        (engine, cache, status)
    }
}

#[async_trait]
impl StoreBackend for Holding {
    fn name(&self) -> &'static str {
        "holding"
    }
    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        Ok(Vec::new())
    }
    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        if batch.changes.iter().any(|c| &**c.token() == "a")
            && self
                .fail_a
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(StoreError::Unavailable("injected".into()));
        }
        let mut report = ApplyReport::default();
        for change in &batch.changes {
            let Change::Upsert(c) = change else { continue };
            let held = &**change.token() == "b"
                && self
                    .hold
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok();
            if held {
                report.held_back.push(crate::store::HeldBack {
                    token: Arc::clone(change.token()),
                    reason: "its node keeps changing".into(),
                    part: crate::store::Unwritten::Whole,
                });
            } else {
                *self
                    .written
                    .lock()
                    .entry(change.token().to_string())
                    .or_default() += c.prompt_delta;
            }
        }
        Ok(report)
    }
    async fn restore(&self, _: &UserCache, _: &[&Change]) -> Result<(), StoreError> {
        unreachable!("this store refuses nothing")
    }
}

/// A change the store held back is kept (not acknowledged, its requests not lost), goes with
/// the next flush merged with the user's newer changes, and the last flush at shutdown tries
/// it again until it is written.
#[tokio::test(start_paused = true)]
async fn a_held_back_change_is_kept_until_written() {
    let backend = Holding::new(3, 0);
    let (engine, cache, status) = backend.engine();
    let (a, b) = (cache.get("a").unwrap(), cache.get("b").unwrap());
    cache.count_request(&a, 1);
    cache.count_request(&b, 1);
    engine.flush().await.unwrap();
    cache.count_request(&b, 2);
    engine.flush().await.unwrap();
    assert_eq!(*backend.written.lock(), HashMap::from([("a".into(), 1)]));
    assert_eq!(status.gauges().held_back_users, 1);
    assert_eq!(status.gauges().pending_changes, 1);
    assert_eq!(b.prompt_count(), 2);
    assert!(engine.final_flush().await);
    assert_eq!(
        *backend.written.lock(),
        HashMap::from([("a".into(), 1), ("b".into(), 2)]),
        "b's two requests, once"
    );
    assert_eq!(status.gauges().held_back_users, 0);
    assert_eq!(status.gauges().pending_changes, 0);
}

/// A held-back change waits for the first batch taken by a later flush. A flush that first
/// retried a failed batch, and failed again, used to return without it: the change (and the
/// requests it counted) was gone.
#[tokio::test(start_paused = true)]
async fn a_held_back_change_survives_a_failed_retry_before_it() {
    let backend = Holding::new(1, 2);
    let (engine, cache, status) = backend.engine();
    let engine = engine.with_batch_users(1);
    let (a, b) = (cache.get("a").unwrap(), cache.get("b").unwrap());
    cache.count_request(&b, 1);
    cache.count_request(&a, 1);
    // b's batch is held back, a's then fails; the retry of a's batch fails again.
    assert!(engine.flush().await.is_err());
    assert!(engine.flush().await.is_err());
    assert!(engine.final_flush().await);
    assert_eq!(
        *backend.written.lock(),
        HashMap::from([("a".into(), 1), ("b".into(), 1)])
    );
    assert_eq!(status.gauges().pending_changes, 0);
}
