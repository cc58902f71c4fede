//! The Firebase Realtime Database store: users live at `/<users>/<token>` in the older proxy's
//! layout, and several tollgate instances share them.
//!
//! - Start-up ([`FirebaseStore::load_cache`]): one GET of the users path, bounded in time; the
//!   users go into the cache one at a time.
//! - Remote to local ([`stream`]): an SSE stream on the users path keeps a mirror and the cache
//!   in step; every (re)connect starts with a full snapshot.
//! - Local to remote ([`FirebaseStore::apply`]): each engine batch is one atomic multi-path
//!   PATCH of leaves with server-side increments and a per-instance marker that makes
//!   retries after an ambiguous failure exactly-once ([`batch`]); `ip` lists merge by ETag CAS.
//! - Fleet-wide jobs take a lease ([`lease`]); the leader removes the markers of runs that
//!   stopped long ago ([`markers`]).
//!
//! See `docs/firebase.md`.

pub mod auth;
pub mod batch;
pub mod client;
pub mod key;
pub mod lease;
pub mod markers;
pub mod mirror;
pub mod sse;
pub mod stream;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use log::{debug, info, warn};
use pingora::server::ShutdownWatch;
use reqwest::{Method, Url};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::Instant;

/// The largest PATCH body sent: the Firebase SDKs' write limit (the REST API's is 256 MB, but
/// the server also aborts writes it expects to take over a minute). Batches of 1,000 ordinary
/// users are far below it; users with large `meta` or notes are split into smaller PATCHes.
const MAX_WRITE_BYTES: usize = 16 * 1024 * 1024;

use self::auth::TokenSource;
use self::batch::{Bisection, Layout};
use self::client::{Request, Rtdb, RtdbError, Target, REQUEST_TIMEOUT};
use super::{ApplyReport, Batch, HeldBack, StoreBackend, StoreError, StoreStatus, Unwritten};
use crate::config::FirebaseConfig;
use crate::observe::token_id;
use crate::users::{Change, Reread, User, UserCache};

pub struct FirebaseStore {
    target: Arc<Target>,
    auth: Arc<TokenSource>,
    layout: Layout,
    instance: String,
    keepalive: Duration,
    startup_timeout: Duration,
    /// The client for the engine's runtime (flushes and the stream), made there on first use:
    /// connections belong to the runtime that opened them.
    engine_client: OnceLock<Rtdb>,
    /// The client for the maintenance service's runtime (the lease).
    lease_client: OnceLock<Rtdb>,
    progress: tokio::sync::Mutex<Progress>,
    /// The marker's sequence: one number per PATCH sent with new content.
    write_no: AtomicU64,
    /// The largest PATCH sent; a larger group of changes is split first ([`MAX_WRITE_BYTES`]).
    max_write_bytes: usize,
    /// When housekeeping may next read the markers (ms since the epoch): at most hourly, as
    /// every read downloads all of them.
    next_housekeeping_ms: AtomicU64,
}

/// How far the batch being written got; kept across the engine's retries of the same batch.
#[derive(Debug, Default)]
struct Progress {
    seq: u64,
    /// Changes whose PATCH is applied.
    done: HashSet<usize>,
    /// Changes Firebase refused (400), with its message.
    rejected: Vec<(usize, String)>,
    /// Changes whose `ip` merge is done.
    ips_done: HashSet<usize>,
    /// Users created by an upsert whose conditional PUT is answered ([`batch::Creation`]).
    created: HashMap<usize, batch::Creation>,
    /// A PATCH that failed ambiguously, to be settled by reading the marker before anything
    /// else is sent.
    unresolved: Option<Unresolved>,
    /// Changes whose own request failed in this attempt, with why (not a failure of the
    /// database: see [`RtdbError::is_database_wide`]): the others are written without them,
    /// and they go back to the engine for the next batch. Found afresh by every attempt.
    held: Vec<(usize, String, Unwritten)>,
}

impl Progress {
    fn is_held(&self, i: usize) -> bool {
        self.held
            .iter()
            .any(|(j, _, part)| *j == i && *part == Unwritten::Whole)
    }
}

/// A PATCH whose outcome is unknown.
#[derive(Debug)]
struct Unresolved {
    /// Its write number, which the marker shows once it is applied.
    no: u64,
    /// The batch's changes it carried.
    group: Vec<usize>,
    /// When a marker that is still behind means the write was lost: [`SETTLE`] after the
    /// client gave up on it. `None` until known (a send cut off mid-request gives no answer
    /// to take the time from; the next attempt starts the wait). Kept across attempts, so a
    /// write given up on long ago is settled by one read, not a new wait each time: a wait
    /// started afresh at every attempt took the whole of a short shutdown deadline, and the
    /// write (and the requests it counted) was lost.
    settles_at: Option<Instant>,
}

impl std::fmt::Debug for FirebaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirebaseStore")
            .field("target", &self.target)
            .field("users", &self.layout.users)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl FirebaseStore {
    /// Checks the configuration and decodes the key; nothing is sent yet.
    pub fn open(config: &FirebaseConfig) -> Result<Self, StoreError> {
        let (target, emulator) = target(config).map_err(StoreError::Fatal)?;
        let auth = if emulator {
            TokenSource::Emulator
        } else {
            let raw = config
                .key
                .as_ref()
                .ok_or_else(|| StoreError::Fatal("FIREBASE_KEY: is not set".into()))?;
            let account =
                key::decode(raw.expose()).map_err(|e| StoreError::Fatal(e.to_string()))?;
            check_token_uri(&account.token_uri, target.local).map_err(StoreError::Fatal)?;
            TokenSource::service_account(account)
        };
        let users = users_path(&config.users_ref).map_err(StoreError::Fatal)?;
        let instance = instance_id();
        if target.local {
            info!(
                "firebase: {} is a local database (emulator or stand-in): plain http allowed",
                target.base
            );
        }
        Ok(Self {
            target: Arc::new(target),
            auth: Arc::new(auth),
            layout: Layout {
                marker: format!("_sync/instances/{instance}"),
                users,
            },
            instance,
            keepalive: config.keepalive_timeout,
            startup_timeout: config.startup_timeout,
            engine_client: OnceLock::new(),
            lease_client: OnceLock::new(),
            progress: tokio::sync::Mutex::new(Progress::default()),
            write_no: AtomicU64::new(0),
            max_write_bytes: MAX_WRITE_BYTES,
            next_housekeeping_ms: AtomicU64::new(0),
        })
    }

    /// This boot's id in `_sync/instances/<id>` and in leases.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn client<'a>(&self, slot: &'a OnceLock<Rtdb>) -> Result<&'a Rtdb, StoreError> {
        if let Some(rtdb) = slot.get() {
            return Ok(rtdb);
        }
        let rtdb = Rtdb::new(Arc::clone(&self.target), Arc::clone(&self.auth))
            .map_err(StoreError::Fatal)?;
        Ok(slot.get_or_init(|| rtdb))
    }

    /// The marker's `seq` as stored: the newest write of this instance that was applied.
    async fn read_marker(&self, rtdb: &Rtdb) -> Result<u64, RtdbError> {
        let path = format!("{}/seq", self.layout.marker);
        let value = rtdb.call(Request::new(Method::GET, &path)).await?.json()?;
        Ok(value.as_u64().unwrap_or(0))
    }

    /// Whether write `no` of this instance was applied, for a write whose outcome is unknown
    /// (a timeout, a reset, a 5xx, or a send cut off by the shutdown deadline). A server may
    /// still be applying a write its client gave up on, so a marker that is behind before
    /// `settles_at` ([`SETTLE`] after the client gave up) is read once more then, before the
    /// write counts as lost and is sent again.
    async fn was_applied(
        &self,
        rtdb: &Rtdb,
        no: u64,
        settles_at: Instant,
    ) -> Result<bool, RtdbError> {
        if self.read_marker(rtdb).await? >= no {
            return Ok(true);
        }
        if Instant::now() >= settles_at {
            return Ok(false);
        }
        tokio::time::sleep_until(settles_at).await;
        Ok(self.read_marker(rtdb).await? >= no)
    }

    /// Writes one group of changes as one atomic PATCH. `Ok(Err(msg))`: refused with 400, or
    /// too large (413).
    async fn write_group(
        &self,
        rtdb: &Rtdb,
        batch: &Batch,
        group: &[usize],
        progress: &mut Progress,
    ) -> Result<Result<(), String>, StoreError> {
        let no = self.write_no.fetch_add(1, Ordering::AcqRel) + 1;
        let body = batch::patch_body(
            &self.layout,
            &batch.changes,
            group,
            &progress.created,
            no,
            batch.seq,
        );
        let bytes = serde_json::to_vec(&Value::Object(body))
            .map_err(|e| StoreError::Fatal(format!("cannot encode a batch: {e}")))?;
        if bytes.len() > self.max_write_bytes {
            // Not sent: split like a refused group, so only a user too large on its own is
            // refused. A server that refuses a large body may close the connection before
            // its 413 is read, which would look like a lost answer and be retried for good.
            return Ok(Err(format!(
                "the write would be {} bytes, more than the {} sent in one request",
                bytes.len(),
                self.max_write_bytes
            )));
        }
        let request = Request::new(Method::PATCH, "")
            .query("print", "silent")
            .json(bytes);
        // Unresolved from before the send: if this future is dropped mid-request (the
        // shutdown deadline), the next attempt asks the marker instead of sending again.
        progress.unresolved = Some(Unresolved {
            no,
            group: group.to_vec(),
            settles_at: None,
        });
        let outcome = rtdb.call(request).await;
        let settles_at = Instant::now() + SETTLE;
        match (&outcome, progress.unresolved.as_mut()) {
            (Err(e), Some(unresolved)) if e.is_ambiguous() => {
                unresolved.settles_at = Some(settles_at);
            }
            _ => progress.unresolved = None,
        }
        match outcome {
            Ok(_) => Ok(Ok(())),
            Err(RtdbError::BadRequest(message)) => Ok(Err(message)),
            // Too large for one request: split like a refused group (nothing was applied), so
            // only a user too large on its own is refused, not every later write held up.
            Err(RtdbError::Other { status: 413, .. }) => Ok(Err(
                "the write is larger than the database takes in one request".into(),
            )),
            Err(e) if e.is_ambiguous() => match self.was_applied(rtdb, no, settles_at).await {
                Ok(true) => {
                    progress.unresolved = None;
                    info!(
                        "firebase: a write failed ambiguously ({e}) but its marker shows it \
                             applied; not resending"
                    );
                    Ok(Ok(()))
                }
                Ok(false) => {
                    progress.unresolved = None;
                    Err(StoreError::Unavailable(format!("{e} (not applied)")))
                }
                Err(read) => Err(StoreError::Unavailable(format!(
                    "{e}; the batch marker cannot be read yet ({read})"
                ))),
            },
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Creates the batch's users that came from an upsert of a token unknown here, each by a
    /// `PUT` with `if-match: null_etag` (create if absent; 412: it exists, and the PATCH then
    /// writes the upsert's fields as leaves instead of replacing the stored user). Up to
    /// [`CREATE_CONCURRENCY`] at once, so a large import is not one request after another.
    /// Answers are kept across retries; a PUT without an answer is sent again (a 412 then
    /// tells that it applied, and the result is the same).
    async fn create_upserted(
        &self,
        rtdb: &Rtdb,
        batch: &Batch,
        progress: &mut Progress,
    ) -> Result<(), StoreError> {
        let todo: Vec<usize> = (0..batch.changes.len())
            .filter(|i| {
                batch::needs_conditional_create(&batch.changes[*i])
                    && !progress.created.contains_key(i)
                    && !progress.done.contains(i)
                    && !progress.rejected.iter().any(|(j, _)| j == i)
            })
            .collect();
        let mut failure = None;
        for chunk in todo.chunks(CREATE_CONCURRENCY) {
            let mut puts = tokio::task::JoinSet::new();
            for &i in chunk {
                let change = &batch.changes[i];
                let Some(body) = batch::create_body(change) else {
                    continue;
                };
                let (rtdb, path) = (rtdb.clone(), self.layout.user(change.token()));
                puts.spawn(async move {
                    let mut put =
                        Request::new(Method::PUT, &path).json(body.to_string().into_bytes());
                    put.if_match = Some("null_etag".into());
                    (i, rtdb.call(put).await)
                });
            }
            while let Some(joined) = puts.join_next().await {
                let Ok((i, outcome)) = joined else { continue };
                let outcome = match outcome {
                    Ok(_) => Ok(None),
                    Err(RtdbError::Precondition { body, etag }) => {
                        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        self.replace_remnant(rtdb, &batch.changes[i], value, etag)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(None) => {
                        progress.created.insert(i, batch::Creation::Put);
                    }
                    Ok(Some(stored)) => {
                        // The stored user as it is: the cache takes it (keeping the upsert's
                        // fields), rather than the defaults it was created from here.
                        if let Change::Upsert(c) = &batch.changes[i] {
                            if let Ok(stored) = User::from_stored(c.record.token(), stored) {
                                c.record.apply_remote(&stored.user);
                            }
                        }
                        debug!(
                            "firebase: user {} exists in the database; writing the upsert's \
                             fields instead of creating it",
                            token_id(batch.changes[i].token())
                        );
                        progress.created.insert(i, batch::Creation::Existed);
                    }
                    Err(RtdbError::BadRequest(message)) => progress.rejected.push((i, message)),
                    Err(e) if e.is_database_wide() => failure = Some(e),
                    // This user's own trouble: the others are written without it.
                    Err(e) => {
                        progress
                            .held
                            .push((i, format!("creating the user: {e}"), Unwritten::Whole))
                    }
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(e) => Err(StoreError::Unavailable(format!("creating users: {e}"))),
        }
    }

    /// A conditional create found `stored` at the user's path. A user there is kept
    /// (`Some`); a remnant (leaves a deleted user's late writes left, no `createdAt`: no
    /// instance takes it for a user) is replaced by the whole new user, by compare-and-set on
    /// its ETag, so the upsert does not end as a user nobody can use (`None`: created).
    async fn replace_remnant(
        &self,
        rtdb: &Rtdb,
        change: &Change,
        mut stored: Value,
        mut etag: Option<String>,
    ) -> Result<Option<Value>, RtdbError> {
        let Some(body) = batch::create_body(change) else {
            return Ok(Some(stored));
        };
        let path = self.layout.user(change.token());
        for _ in 0..5 {
            if !stream::is_remnant(&stored) {
                return Ok(Some(stored));
            }
            let mut put = Request::new(Method::PUT, &path).json(body.to_string().into_bytes());
            put.if_match = Some(etag.take().unwrap_or_else(|| "null_etag".into()));
            match rtdb.call(put).await {
                Ok(_) => return Ok(None),
                Err(RtdbError::Precondition { body, etag: tag }) => {
                    stored = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    etag = tag;
                }
                Err(e) => return Err(e),
            }
        }
        // Not permanent: the engine retries the batch later.
        Err(RtdbError::Contended(
            "the user's node kept changing (5 attempts)".into(),
        ))
    }

    /// Adds the addresses requests recorded here (`added`, not the whole local list) to the
    /// stored `ip` list by compare-and-set, so addresses other instances added meanwhile are
    /// kept and addresses an admin removed elsewhere do not come back. The list keeps the older
    /// layout.
    async fn merge_ip(&self, rtdb: &Rtdb, token: &str, added: &[String]) -> Result<(), RtdbError> {
        // A user removed elsewhere is not re-created by its ip list.
        let user_path = self.layout.user(token);
        let exists = rtdb
            .call(Request::new(Method::GET, &user_path).query("shallow", "true"))
            .await?
            .json()?;
        if exists.is_null() {
            return Ok(());
        }
        let path = self.layout.leaf(token, "ip");
        let mut read = Request::new(Method::GET, &path);
        read.etag = true;
        let reply = rtdb.call(read).await?;
        let mut current = stored_list(reply.json()?);
        let mut etag = reply.etag.unwrap_or_else(|| "null_etag".into());
        for _ in 0..25 {
            let Some(merged) = batch::merge_ips(&current, added) else {
                return Ok(());
            };
            let body = serde_json::to_vec(&merged).unwrap_or_default();
            let mut put = Request::new(Method::PUT, &path).json(body);
            put.if_match = Some(etag.clone());
            match rtdb.call(put).await {
                Ok(_) => return Ok(()),
                Err(RtdbError::Precondition { body, etag: tag }) => {
                    current = stored_list(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    etag = tag.unwrap_or_else(|| "null_etag".into());
                }
                Err(e) => return Err(e),
            }
        }
        // Not permanent: the engine retries the batch later instead of dropping the address.
        Err(RtdbError::Contended(
            "the ip list kept changing (25 attempts)".into(),
        ))
    }
}

#[async_trait]
impl StoreBackend for FirebaseStore {
    fn name(&self) -> &'static str {
        "firebase_rtdb"
    }

    /// Over the network: `store.firebase.startup_timeout_seconds`.
    fn startup_timeout(&self) -> Option<Duration> {
        Some(self.startup_timeout)
    }

    /// Through the stream's follower, which applies its mirror of the database: a value read
    /// here could be older than a change the stream applies meanwhile.
    async fn restore(&self, cache: &UserCache, refused: &[&Change]) -> Result<(), StoreError> {
        cache.reread(refused.iter().map(|change| Reread {
            token: Arc::clone(change.token()),
            creation_refused: change.is_creation(),
        }));
        Ok(())
    }

    /// For callers that want the users themselves; start-up takes
    /// [`load_cache`](StoreBackend::load_cache), which does not hold them all at once.
    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        Ok(self.load_cache().await?.snapshot())
    }

    /// [`load_cache_until`](StoreBackend::load_cache_until) the end of `startup_timeout`
    /// from now.
    async fn load_cache(&self) -> Result<UserCache, StoreError> {
        self.load_cache_until(Instant::now() + self.startup_timeout)
            .await
    }

    /// One GET of the users path. Transient failures are retried until a tenth of
    /// `startup_timeout` before `deadline`, so that the error names what did not answer; a
    /// refused key or permission fails at once. The bound is the loader's deadline, not
    /// counted from here: the client below is built first (it reads the system's root
    /// certificates), and on a loaded machine that took long enough for the loader's timeout
    /// to cut off a bound counted after it.
    async fn load_cache_until(&self, deadline: Instant) -> Result<UserCache, StoreError> {
        let deadline = deadline
            .checked_sub(self.startup_timeout / 10)
            .unwrap_or(deadline);
        // This runs on the loader's short-lived runtime: its own client, dropped with it.
        let rtdb = Rtdb::new(Arc::clone(&self.target), Arc::clone(&self.auth))
            .map_err(StoreError::Fatal)?;
        let mut wait = Duration::from_millis(250);
        let where_ = format!("{}{}", self.target.base, self.layout.users);
        loop {
            let last = match self.startup_read(&rtdb, deadline).await {
                Ok(Ok(reply)) => {
                    return self
                        .load_body(&reply.body)
                        .map_err(|e| StoreError::Unavailable(e.to_string()));
                }
                Ok(Err(e)) if e.is_permanent() => {
                    return Err(StoreError::Fatal(startup_problem(&e, &where_)));
                }
                Ok(Err(e)) => format!("{e}{}", setting_to_check(&e)),
                Err(silent) => silent,
            };
            if Instant::now() + wait >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "cannot read {where_} in the {} s of store.firebase.startup_timeout_seconds: \
                     {last}",
                    self.startup_timeout.as_secs()
                )));
            }
            debug!("firebase: start-up read failed ({last}); retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        let rtdb = self.client(&self.engine_client)?;
        let mut progress = self.progress.lock().await;
        if progress.seq != batch.seq {
            *progress = Progress {
                seq: batch.seq,
                ..Progress::default()
            };
        }
        progress.held.clear();
        if let Some(unresolved) = progress.unresolved.as_mut() {
            let settles_at = *unresolved
                .settles_at
                .get_or_insert_with(|| Instant::now() + SETTLE);
            let (no, group) = (unresolved.no, unresolved.group.clone());
            let applied = self.was_applied(rtdb, no, settles_at).await.map_err(|e| {
                StoreError::Unavailable(format!("the batch marker cannot be read yet: {e}"))
            })?;
            if applied {
                info!("firebase: an unfinished write turned out applied; not resending");
                progress.done.extend(group);
            }
            progress.unresolved = None;
        }
        self.create_upserted(rtdb, batch, &mut progress).await?;
        let mut to_write = Vec::new();
        for (i, change) in batch.changes.iter().enumerate() {
            if progress.done.contains(&i)
                || progress.rejected.iter().any(|(j, _)| *j == i)
                || progress.is_held(i)
            {
                continue;
            }
            if batch::entries(&self.layout, change, progress.created.get(&i).copied()).is_empty() {
                progress.done.insert(i);
            } else {
                to_write.push(i);
            }
        }
        let mut bisection = Bisection::new(to_write);
        while let Some(group) = bisection.next_group() {
            match self.write_group(rtdb, batch, &group, &mut progress).await? {
                Ok(()) => progress.done.extend(group),
                Err(message) => {
                    if group.len() > 1 {
                        warn!(
                            "firebase: a batch of {} users cannot be written whole ({message}); \
                             splitting it",
                            group.len()
                        );
                    }
                    if let Some(bad) = bisection.refused(group) {
                        progress.rejected.push((bad, message));
                    }
                }
            }
        }
        for (i, change) in batch.changes.iter().enumerate() {
            if !progress.done.contains(&i)
                || progress.ips_done.contains(&i)
                || !batch::needs_ip_merge(change, progress.created.get(&i).copied())
            {
                continue;
            }
            let Change::Upsert(c) = change else { continue };
            match self.merge_ip(rtdb, c.record.token(), &c.ip_added).await {
                Ok(()) => {}
                Err(RtdbError::BadRequest(e)) => warn!(
                    "firebase: the ip list of user {} cannot be written: {e}",
                    token_id(c.record.token())
                ),
                Err(e) if e.is_database_wide() => {
                    return Err(StoreError::Unavailable(format!("ip list: {e}")))
                }
                // The user's list alone: its addresses go with the next batch, and the other
                // users' lists are merged now.
                Err(e) => {
                    progress
                        .held
                        .push((i, format!("ip list: {e}"), Unwritten::IpAdditions));
                    continue;
                }
            }
            progress.ips_done.insert(i);
        }
        let rejected = progress
            .rejected
            .iter()
            .map(|(i, message)| (Arc::clone(batch.changes[*i].token()), message.clone()))
            .collect();
        let held_back = progress
            .held
            .iter()
            .map(|(i, reason, part)| HeldBack {
                token: Arc::clone(batch.changes[*i].token()),
                reason: reason.clone(),
                part: *part,
            })
            .collect();
        Ok(ApplyReport {
            rejected,
            held_back,
        })
    }

    fn echoes_counters(&self) -> bool {
        true
    }

    async fn follow(
        &self,
        cache: Arc<UserCache>,
        status: Arc<StoreStatus>,
        mut shutdown: ShutdownWatch,
    ) {
        let rtdb = match self.client(&self.engine_client) {
            Ok(rtdb) => rtdb.clone(),
            Err(e) => {
                log::error!("firebase stream cannot start: {e}");
                let _ = shutdown.changed().await;
                return;
            }
        };
        stream::Follower {
            rtdb,
            users_path: self.layout.users.clone(),
            keepalive: self.keepalive,
            cache,
            status,
        }
        .run(shutdown)
        .await
    }

    async fn lead(&self, job: &str, ttl: Duration) -> bool {
        let rtdb = match self.client(&self.lease_client) {
            Ok(rtdb) => rtdb,
            Err(e) => {
                warn!("firebase: cannot take the {job} lease: {e}");
                return false;
            }
        };
        match lease::acquire(rtdb, &self.instance, job, ttl, crate::clock::now_ms()).await {
            Ok(held) => held,
            Err(e) => {
                warn!("firebase: cannot take the {job} lease: {e}");
                false
            }
        }
    }

    async fn housekeeping(&self, now_ms: u64) -> Result<usize, StoreError> {
        if now_ms < self.next_housekeeping_ms.load(Ordering::Acquire) {
            return Ok(0);
        }
        let rtdb = self.client(&self.lease_client)?;
        let removed = markers::remove_stale(rtdb, &self.instance, now_ms)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot remove stale markers: {e}")))?;
        self.next_housekeeping_ms
            .store(now_ms + HOUSEKEEPING_EVERY_MS, Ordering::Release);
        Ok(removed)
    }
}

/// How long a write the client gave up on is given to land before it counts as lost.
const SETTLE: Duration = Duration::from_secs(1);

/// Conditional creations (`PUT` with `if-match`, one per user) sent at once.
const CREATE_CONCURRENCY: usize = 16;

/// How often the leader looks for stale markers.
const HOUSEKEEPING_EVERY_MS: u64 = 3_600_000;

impl FirebaseStore {
    /// One start-up read of the users path, cut off at `deadline`. The access token is fetched
    /// first, on its own: a token endpoint that never answers (an egress firewall dropping
    /// it) must be named as such, not taken for the database. `Err`: nothing came back in
    /// time, and from where.
    async fn startup_read(
        &self,
        rtdb: &Rtdb,
        deadline: Instant,
    ) -> Result<Result<client::Reply, RtdbError>, String> {
        match tokio::time::timeout_at(deadline, rtdb.auth().token(rtdb.http())).await {
            Err(_) => {
                return Err(format!(
                    "no answer from the token endpoint {} (check the token_uri in \
                     FIREBASE_KEY, and that it can be reached)",
                    rtdb.auth().endpoint().unwrap_or("?")
                ))
            }
            Ok(Err(e)) => return Ok(Err(e.into())),
            Ok(Ok(_)) => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let request = Request::new(Method::GET, &self.layout.users).timeout(
            remaining
                .min(REQUEST_TIMEOUT)
                .max(Duration::from_millis(100)),
        );
        tokio::time::timeout(remaining, rtdb.call(request))
            .await
            .map_err(|_| "no answer (check FIREBASE_RTDB_URL)".to_string())
    }

    /// The users of the users path's JSON, in a new cache sized for them. Each user is parsed
    /// on its own and put in the cache before the next is read: the whole path as one tree
    /// would take about ten times the text's size at the peak of start-up, and even a list of
    /// every parsed user about three times.
    fn load_body(&self, body: &[u8]) -> Result<UserCache, RtdbError> {
        let invalid = |e: serde_json::Error| {
            RtdbError::Ambiguous(format!("the database sent invalid JSON: {e}"))
        };
        let raw: Option<&RawValue> = if body.is_empty() {
            None
        } else {
            serde_json::from_slice(body).map_err(invalid)?
        };
        // An array is how Firebase renders users whose tokens are all small integers.
        let Some(users) = raw.and_then(mirror::children) else {
            if raw.is_some() {
                warn!(
                    "firebase: /{} is not an object or array; starting with no users",
                    self.layout.users
                );
            } else {
                warn!(
                    "firebase: no users in /{} (FIREBASE_USERS_REF_NAME); starting with none",
                    self.layout.users
                );
            }
            return Ok(UserCache::default());
        };
        let total = users.len();
        let cache = UserCache::with_capacity(total);
        let (loaded, remnants) = load_users(users, &cache);
        if remnants > 0 {
            info!(
                "firebase: {remnants} entries under /{} are leftovers of deleted users (no \
                 createdAt) and are ignored",
                self.layout.users
            );
        }
        if loaded + remnants < total {
            warn!(
                "firebase: {} of {total} stored users could not be read (see above)",
                total - loaded - remnants
            );
        }
        Ok(cache)
    }
}

/// Puts the users among `children` into `cache`, one at a time, reporting every problem;
/// returns how many users were loaded, and how many children were remnants.
fn load_users(children: mirror::Children<'_>, cache: &UserCache) -> (usize, usize) {
    let (mut loaded, mut remnants) = (0, 0);
    let visited = children.try_for_each(|token, raw| {
        let value = match serde_json::from_str::<Value>(raw.get()) {
            Ok(value) => value,
            Err(e) => {
                warn!(
                    "firebase: user {} cannot be read and is skipped: {e}",
                    token_id(token)
                );
                return Ok(());
            }
        };
        match stream::read_node(token, value, stream::Report::Everything) {
            stream::Node::User(user) => {
                cache.load([*user]);
                loaded += 1;
            }
            stream::Node::Remnant => remnants += 1,
            stream::Node::Unreadable => {}
        }
        Ok::<(), std::convert::Infallible>(())
    });
    let Ok(()) = visited;
    (loaded, remnants)
}

/// Which setting a start-up failure points at: the database's address, or the key's
/// `token_uri` (the access token is fetched there before the database is asked).
fn setting_to_check(e: &RtdbError) -> &'static str {
    match e {
        RtdbError::Auth(_) => " (check the token_uri in FIREBASE_KEY, and that it can be reached)",
        RtdbError::Connect(_) | RtdbError::Ambiguous(_) => " (check FIREBASE_RTDB_URL)",
        _ => "",
    }
}

/// One line for an operator: what failed at start-up and what to check.
fn startup_problem(e: &RtdbError, where_: &str) -> String {
    match e {
        RtdbError::Auth(a) => format!("{a} (check FIREBASE_KEY)"),
        RtdbError::Denied { status, message } => format!(
            "permission denied reading {where_} ({status}: {message}); the service account \
             needs access to the Realtime Database"
        ),
        RtdbError::Other { status: 404, .. } => {
            format!("{where_} answered 404: FIREBASE_RTDB_URL does not name a database")
        }
        other => format!("cannot read {where_}: {other}"),
    }
}

/// The database's base URL, namespace and mode from the configuration.
fn target(config: &FirebaseConfig) -> Result<(Target, bool), String> {
    let raw = config
        .rtdb_url
        .as_deref()
        .ok_or("FIREBASE_RTDB_URL: is not set")?;
    let url = Url::parse(raw.trim()).map_err(|e| format!("FIREBASE_RTDB_URL: not a URL ({e})"))?;
    // Firebase authenticates with FIREBASE_KEY; a user or password here would only be printed
    // wherever the URL is (start-up errors, the log).
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "FIREBASE_RTDB_URL: must not contain a user or password (the database is accessed \
             with FIREBASE_KEY's service account)"
                .into(),
        );
    }
    let ns = url
        .query_pairs()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned());
    if let Some(host) = &config.emulator_host {
        // As the Firebase tools do: talk plain http to the emulator, with the namespace taken
        // from the database URL, and `Bearer owner`.
        let base = Url::parse(&format!("http://{}", host.trim()))
            .map_err(|e| format!("FIREBASE_DATABASE_EMULATOR_HOST: not host:port ({e})"))?;
        let ns = ns.or_else(|| {
            url.host_str()
                .and_then(|h| h.split('.').next())
                .map(str::to_string)
        });
        return Ok((
            Target {
                base: origin(&base),
                ns,
                local: true,
            },
            true,
        ));
    }
    let Some(host) = url.host_str() else {
        return Err("FIREBASE_RTDB_URL: has no host".into());
    };
    let local = match url.scheme() {
        "https" => false,
        // Every request carries the service account's access token (read and write access to
        // the whole database for an hour): in clear only to this machine.
        "http" if client::is_loopback(host.trim_start_matches('[').trim_end_matches(']')) => true,
        "http" => {
            return Err(format!(
                "FIREBASE_RTDB_URL: must be https:// (got http://{host}): plain http, which would \
                 send the access token in clear, is only for a database on this machine (an \
                 emulator or stand-in on localhost)"
            ))
        }
        other => return Err(format!("FIREBASE_RTDB_URL: unsupported scheme {other}")),
    };
    if !matches!(url.path(), "" | "/") {
        return Err(
            "FIREBASE_RTDB_URL: must be the database's root URL (https://<db>.firebaseio.com)"
                .into(),
        );
    }
    Ok((
        Target {
            base: origin(&url),
            ns,
            local,
        },
        false,
    ))
}

fn origin(url: &Url) -> Url {
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    base.set_fragment(None);
    base
}

/// The key's `token_uri` gets the signed assertion: https, or loopback for a local database.
fn check_token_uri(uri: &str, local: bool) -> Result<(), String> {
    let url = Url::parse(uri).map_err(|_| "FIREBASE_KEY: token_uri is not a URL".to_string())?;
    let loopback = url.host_str().is_some_and(|h| {
        let h = h.trim_start_matches('[').trim_end_matches(']');
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match url.scheme() {
        "https" => Ok(()),
        "http" if local && loopback => Ok(()),
        _ => Err(format!(
            "FIREBASE_KEY: token_uri must be https (plain http only on loopback with a local \
             database), got {}://{}",
            url.scheme(),
            url.host_str().unwrap_or("?")
        )),
    }
}

/// `FIREBASE_USERS_REF_NAME` as a path: segments that are valid Firebase keys.
fn users_path(name: &str) -> Result<String, String> {
    let segments: Vec<&str> = name.split('/').filter(|s| !s.is_empty()).collect();
    if segments.is_empty() {
        return Err("FIREBASE_USERS_REF_NAME: must name a path".into());
    }
    for s in &segments {
        crate::users::model::validate_key(s, &format!("FIREBASE_USERS_REF_NAME: segment {s:?}"))?;
        if *s == "_sync" {
            return Err("FIREBASE_USERS_REF_NAME: must not be _sync (tollgate's own data)".into());
        }
    }
    Ok(segments.join("/"))
}

/// `<host>-<random>`: unique per boot, a valid Firebase key.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    let host = if host.is_empty() { "tollgate" } else { &host };
    format!("{host}-{}", &random[..12])
}

/// A list as stored: an array (with holes) or an index-keyed object.
fn stored_list(value: Value) -> Vec<String> {
    match User::from_stored("_", serde_json::json!({ "ip": value })) {
        Ok(stored) => stored.user.ip,
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> FirebaseConfig {
        FirebaseConfig {
            rtdb_url: Some(url.into()),
            key: None,
            users_ref: "users".into(),
            emulator_host: None,
            startup_timeout: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(75),
            temporary_user_purge: Duration::from_secs(48 * 3600),
        }
    }

    #[test]
    fn targets() {
        let (t, emulator) = target(&config("https://my-db.firebaseio.com/")).unwrap();
        assert!(!emulator && !t.local && t.ns.is_none());
        assert_eq!(t.base.as_str(), "https://my-db.firebaseio.com/");
        let (t, _) = target(&config("http://127.0.0.1:9000/?ns=x")).unwrap();
        assert!(t.local);
        assert_eq!(t.ns.as_deref(), Some("x"));
        let mut c = config("https://my-db.europe-west1.firebasedatabase.app");
        c.emulator_host = Some("localhost:9000".into());
        let (t, emulator) = target(&c).unwrap();
        assert!(emulator && t.local);
        assert_eq!(t.base.as_str(), "http://localhost:9000/");
        assert_eq!(t.ns.as_deref(), Some("my-db"));
        assert!(target(&config("https://my-db.firebaseio.com/users")).is_err());
        assert!(target(&config("ftp://x")).is_err());
    }

    /// A plain-http URL naming another machine got the service account's access token sent
    /// to it in clear (a typo'd `http://<db>.firebaseio.com` worked, over a redirect).
    #[test]
    fn plain_http_is_for_a_database_on_this_machine_only() {
        for url in [
            "http://my-db.firebaseio.com",
            "http://10.0.0.5:9000",
            "http://db.internal:9000/?ns=x",
        ] {
            let err = target(&config(url)).unwrap_err();
            assert!(err.contains("must be https://"), "{url}: {err}");
        }
        for url in [
            "http://127.0.0.1:9000",
            "http://127.0.0.2:9000",
            "http://localhost:9000",
            "http://[::1]:9000/?ns=x",
        ] {
            assert!(target(&config(url)).unwrap().0.local, "{url}");
        }
    }

    /// A user or password in the URL is no Firebase credential; it was kept in the base URL
    /// and printed whole in start-up errors ("cannot read https://u:pw@…/users").
    #[test]
    fn a_url_with_a_user_or_password_is_refused_without_printing_it() {
        for url in [
            "https://u:SEKRET@my-db.firebaseio.com",
            "https://SEKRET@my-db.firebaseio.com/",
            "http://SEKRET:@127.0.0.1:9000",
        ] {
            let err = target(&config(url)).unwrap_err();
            assert!(err.contains("user or password"), "{url}: {err}");
            assert!(!err.contains("SEKRET"), "{err}");
        }
    }

    #[test]
    fn users_paths_and_instance_ids() {
        assert_eq!(users_path("users").unwrap(), "users");
        assert_eq!(users_path("/proxy/users/").unwrap(), "proxy/users");
        assert_eq!(
            users_path("proxy/a.b").unwrap_err(),
            "FIREBASE_USERS_REF_NAME: segment \"a.b\" must not contain '.' (Firebase key rules \
             forbid . $ # [ ] /)"
        );
        assert!(users_path("_sync").is_err());
        let id = instance_id();
        assert!(crate::users::model::validate_key(&id, "id").is_ok());
        assert_ne!(id, instance_id());
    }

    #[test]
    fn token_uri_rules() {
        assert!(check_token_uri("https://oauth2.googleapis.com/token", false).is_ok());
        assert!(check_token_uri("http://127.0.0.1:1/token", true).is_ok());
        assert!(check_token_uri("http://127.0.0.1:1/token", false).is_err());
        assert!(check_token_uri("http://example.com/token", true).is_err());
    }
}

#[cfg(test)]
pub(crate) mod standin_tests;
