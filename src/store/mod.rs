//! Persistence: one sync engine, several backends. The engine drains the cache's change queue
//! into batches and writes them through a [`StoreBackend`]; a failed write keeps its batch and
//! is retried with backoff, so nothing is dropped whatever the backend does.

mod backoff;
pub mod engine;
pub mod firebase;
pub mod memory;
pub mod purge;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;

use crate::users::{Change, ChangeTicket, User, UserCache};

pub use engine::{StoreStatus, SyncEngine};

use crate::config::{StoreConfig, StoreKind};

/// The configured backend.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn StoreBackend>, StoreError> {
    match config.kind {
        StoreKind::Memory => Ok(Arc::new(memory::MemoryStore)),
        StoreKind::Sqlite => Ok(Arc::new(sqlite::SqliteStore::open(&config.sqlite_path)?)),
        StoreKind::FirebaseRtdb => Ok(Arc::new(firebase::FirebaseStore::open(&config.firebase)?)),
    }
}

/// Fills the cache before any listener opens, on a short-lived runtime that is gone before
/// Pingora starts (its `-d` fork would lose any threads started here). Only a load over the
/// network (Firebase's) is bounded, by [`StoreBackend::startup_timeout`]; a local file's is
/// bounded by the disk.
pub fn load_at_startup(backend: &dyn StoreBackend) -> Result<UserCache, LoadError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LoadError::Runtime)?;
    let timeout = backend.startup_timeout();
    let loaded = runtime.block_on(async {
        match timeout {
            // One deadline for both: the backend's own bound, counted from its own start,
            // began after this one and could run out after it (see `load_cache_until`).
            Some(timeout) => {
                let deadline = tokio::time::Instant::now() + timeout;
                tokio::time::timeout_at(deadline, backend.load_cache_until(deadline))
                    .await
                    .ok()
            }
            None => Some(backend.load_cache().await),
        }
    });
    // Without waiting for anything the load left behind (a timed-out request).
    runtime.shutdown_background();
    let store = backend.name();
    let cache = loaded
        .ok_or(LoadError::TimedOut {
            store,
            seconds: timeout.unwrap_or_default().as_secs(),
        })?
        .map_err(|source| LoadError::Failed { store, source })?;
    log::info!("loaded {} users from the {store} store", cache.len());
    Ok(cache)
}

/// Why start-up could not fill the cache.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot start the loader runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "store {store}: loading users took longer than {seconds} s \
         (store.firebase.startup_timeout_seconds)"
    )]
    TimedOut { store: &'static str, seconds: u64 },
    #[error("store {store}: cannot load users: {source}")]
    Failed {
        store: &'static str,
        source: StoreError,
    },
}

/// What `tollgate -t` can check of the store without touching it: Firebase's URL and key are
/// decoded (nothing is sent); a SQLite file is only opened, and created, at start.
pub fn check(config: &StoreConfig) -> Result<(), StoreError> {
    match config.kind {
        StoreKind::FirebaseRtdb => firebase::FirebaseStore::open(&config.firebase).map(drop),
        StoreKind::Memory | StoreKind::Sqlite => Ok(()),
    }
}

/// One write: the changes of some users, in order, numbered per process.
#[derive(Debug)]
pub struct Batch {
    /// 1, 2, 3… within this process; a retry keeps its number.
    pub seq: u64,
    pub changes: Vec<Change>,
    /// The newest change ticket this batch completes, if it completes all up to it.
    pub covers: Option<ChangeTicket>,
}

/// What a backend did with a batch it accepted.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Changes the backend can never write (e.g. a key Firebase refuses), with the reason.
    /// They are dropped from the queue and logged, not retried forever.
    pub rejected: Vec<(Arc<str>, String)>,
    /// Changes the backend could not write this time for a reason of their own user (its
    /// node kept changing under a compare-and-set, or a request about that user alone was
    /// refused) while the batch's other changes were written. They are kept and written with
    /// the next batch, so one user cannot hold back everyone else's counts and edits.
    pub held_back: Vec<HeldBack>,
}

/// A change of [`ApplyReport::held_back`].
#[derive(Debug, Clone)]
pub struct HeldBack {
    pub token: Arc<str>,
    pub reason: String,
    /// What is left to write of it.
    pub part: Unwritten,
}

/// What a held-back change has left to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwritten {
    /// All of it: nothing of it was written.
    Whole,
    /// Only the addresses requests added to the user's `ip` list: the rest is written.
    IpAdditions,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: network, 5xx, busy database, full disk.
    #[error("{0}")]
    Unavailable(String),
    /// Retrying will not help: bad credentials, permissions, corrupt data.
    #[error("{0}")]
    Fatal(String),
}

/// A place users are persisted. Implementations: memory, SQLite, Firebase RTDB.
#[async_trait]
pub trait StoreBackend: Send + Sync + 'static {
    /// Name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Every stored user, for the cache's initial fill.
    async fn load_all(&self) -> Result<Vec<User>, StoreError>;

    /// Every stored user, in a new cache: the initial fill. A store that receives all its
    /// users as one text (Firebase) fills the cache one user at a time instead of listing
    /// them first, so that they are never held twice.
    async fn load_cache(&self) -> Result<UserCache, StoreError> {
        let users = self.load_all().await?;
        // Sized up front: growing the map a million times over costs more than filling it.
        let cache = UserCache::with_capacity(users.len());
        cache.load(users);
        Ok(cache)
    }

    /// [`load_cache`](Self::load_cache) at start-up, which gives up at `deadline` (the end of
    /// [`startup_timeout`](Self::startup_timeout), counted by the loader). A backend that can
    /// say what it was waiting for bounds its own work by this deadline, a little before it,
    /// so that its message rather than the loader's bare "took longer" is reported: a bound
    /// counted from its own start began later (after building its HTTP client, which took
    /// over half a second on a loaded machine) and ran out after the loader's.
    async fn load_cache_until(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<UserCache, StoreError> {
        let _ = deadline;
        self.load_cache().await
    }

    /// How long start-up may wait for [`load_cache`](Self::load_cache); `None` for a local
    /// store, whose load is bounded by its disk.
    fn startup_timeout(&self) -> Option<Duration> {
        None
    }

    /// The start-up read is not current when the engine starts: the new process of a
    /// graceful upgrade read the store, then waited for the hand-over (for as long as the old
    /// process took to get SIGQUIT), while others went on writing. A store that takes the
    /// start-up read as its baseline for noticing other writers (SQLite) reads everything
    /// again when its engine starts instead.
    fn startup_read_may_be_stale(&self) {}

    /// The most users the engine puts in one batch (one write).
    fn batch_users(&self) -> usize {
        engine::DEFAULT_BATCH_USERS
    }

    /// Writes a batch. `Ok` means durable; `Err` leaves the batch to be retried unchanged.
    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError>;

    /// Puts the store's own value of users whose change it refused for good (reported by
    /// [`apply`](Self::apply), already acknowledged in `cache`) back into the cache, so that
    /// this instance does not go on serving a value no other instance, and no restart, sees.
    async fn restore(&self, cache: &UserCache, refused: &[&Change]) -> Result<(), StoreError>;

    /// True when the store sends confirmed counter totals back (Firebase's stream), so the
    /// cache must not add acknowledged increments to its base itself.
    fn echoes_counters(&self) -> bool {
        false
    }

    /// Keeps the cache in step with changes made elsewhere; returns on shutdown. Stores that
    /// only this process writes have nothing to follow.
    async fn follow(
        &self,
        _cache: Arc<UserCache>,
        _status: Arc<StoreStatus>,
        mut shutdown: ShutdownWatch,
    ) {
        let _ = shutdown.changed().await;
    }

    /// Whether this instance should run a fleet-wide job now (one instance per fleet).
    async fn lead(&self, _job: &str, _ttl: Duration) -> bool {
        true
    }

    /// Upkeep of the store's own bookkeeping, run by the instance that leads the fleet's
    /// housekeeping; returns how many entries it removed.
    async fn housekeeping(&self, _now_ms: u64) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Every stored user again, if another process wrote the store since this one last read
    /// it (`None`: nobody did). For stores without [`follow`](Self::follow) that are still
    /// shared now and then: an SQLite file is written by the old process during a graceful
    /// upgrade. The sync engine asks between its own writes.
    async fn reload_if_changed(&self) -> Result<Option<Vec<User>>, StoreError> {
        Ok(None)
    }
}
