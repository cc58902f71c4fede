//! Remote to local: the SSE stream on the users path. Every connection starts with a full
//! snapshot (`put /`), which replaces the mirror and the cache's remote state, so deletions
//! made while disconnected apply. Later `put`/`patch` events re-read only the users they touch.
//! Reconnects back off with jitter; a watchdog drops a stream that stays silent; `auth_revoked`
//! reconnects at once with a new token; `cancel` is reported and backed off.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, error, info, warn};
use pingora::server::ShutdownWatch;
use reqwest::Method;

use super::client::{Request, Rtdb, RtdbError};
use super::mirror::{Mirror, Touched};
use super::sse::{SseEvent, SseParser};
use crate::observe::token_id;
use crate::store::StoreStatus;
use crate::users::{KeptAbsent, Reread, Settled, User, UserCache};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// After a `cancel` (the rules revoked the read) retry no faster than this.
const CANCEL_BACKOFF: Duration = Duration::from_secs(5);
/// How long to wait for the stream's response headers.
const CONNECT_BOUND: Duration = Duration::from_secs(30);
/// A connection that lasted this long after its snapshot was a working one.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);
/// Users a snapshot lacked but kept are looked up this many at a time.
const SETTLE_CONCURRENCY: usize = 8;
/// Attempts per user kept after a snapshot (failed reads, or writes confirmed meanwhile);
/// one still unsettled after them is settled by the next snapshot.
const SETTLE_ATTEMPTS: u32 = 5;

/// The failures in a row counted before the next reconnect's backoff. Only a connection that
/// delivered its snapshot and then lasted starts afresh: one closed right after its snapshot
/// keeps backing off, instead of downloading the whole users path four times a second.
fn failures_so_far(failures: u32, snapshot_seen: bool, lived: Duration) -> u32 {
    if snapshot_seen && lived >= STABLE_CONNECTION {
        0
    } else {
        failures
    }
}

pub struct Follower {
    pub rtdb: Rtdb,
    pub users_path: String,
    pub keepalive: Duration,
    pub cache: Arc<UserCache>,
    pub status: Arc<StoreStatus>,
}

/// Why a connection ended.
enum End {
    Shutdown,
    /// `auth_revoked` or a 401: reconnect now with a new token.
    Revoked(Arc<str>),
    Cancelled,
    Failed(String),
}

impl Follower {
    pub async fn run(self, mut shutdown: ShutdownWatch) {
        self.status.set_stream_connected(false);
        let mut failures: u32 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut snapshot_seen = false;
            let started = tokio::time::Instant::now();
            let end = self.connection(&mut shutdown, &mut snapshot_seen).await;
            self.status.set_stream_connected(false);
            failures = failures_so_far(failures, snapshot_seen, started.elapsed());
            let wait = match end {
                End::Shutdown => return,
                End::Revoked(token) => {
                    info!("firebase stream: credential revoked; reconnecting with a new token");
                    self.rtdb.auth().invalidate(&token).await;
                    failures += 1;
                    if failures == 1 {
                        Duration::ZERO
                    } else {
                        backoff(failures - 1)
                    }
                }
                End::Cancelled => {
                    error!(
                        "firebase stream cancelled by the database (security rules no longer allow \
                         reading /{}); the cache is stale until the stream is back",
                        self.users_path
                    );
                    failures += 1;
                    backoff(failures).max(CANCEL_BACKOFF)
                }
                End::Failed(reason) => {
                    failures += 1;
                    let wait = backoff(failures);
                    if failures == 1 || failures.is_power_of_two() {
                        warn!(
                            "firebase stream lost ({reason}); reconnecting in {} ms ({} in a row)",
                            wait.as_millis(),
                            failures
                        );
                    }
                    wait
                }
            };
            self.status.count_reconnect();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn connection(&self, shutdown: &mut ShutdownWatch, snapshot_seen: &mut bool) -> End {
        let mut req = Request::new(Method::GET, &self.users_path);
        req.stream = true;
        req.timeout = None;
        let token = match self.rtdb.auth().token(self.rtdb.http()).await {
            Ok(t) => t,
            Err(e) => return End::Failed(e.to_string()),
        };
        // Before the listen is asked for: writes confirmed after this may be missing from its
        // snapshot (see `UserCache::remove_absent_remote`).
        let opened_at = self.cache.confirmations();
        let connect = tokio::time::timeout(CONNECT_BOUND, self.rtdb.execute(&req));
        let response = tokio::select! {
            r = connect => r,
            _ = shutdown.changed() => return End::Shutdown,
        };
        let mut response = match response {
            Err(_) => return End::Failed("no response to the stream request".into()),
            Ok(Err(RtdbError::Denied { status: 401, .. })) => return End::Revoked(token),
            Ok(Err(e)) => return End::Failed(e.to_string()),
            Ok(Ok(r)) => r,
        };
        if !response.status().is_success() {
            let status = response.status();
            // The body only explains the status: one that stalls (a proxy in between) must not
            // keep the stream from reconnecting.
            let body = tokio::select! {
                b = tokio::time::timeout(self.keepalive, response.bytes()) => {
                    b.ok().and_then(Result::ok).unwrap_or_default()
                }
                _ = shutdown.changed() => return End::Shutdown,
            };
            return End::Failed(super::client::status_error(status, body, None).to_string());
        }
        let mut parser = SseParser::new();
        let mut mirror = Mirror::new();
        loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(self.keepalive, response.chunk()) => c,
                _ = self.cache.reread_wanted(), if *snapshot_seen => {
                    self.reread(&mirror);
                    continue;
                }
                _ = shutdown.changed() => return End::Shutdown,
            };
            let chunk = match chunk {
                Err(_) => {
                    return End::Failed(format!(
                        "nothing received for {} s",
                        self.keepalive.as_secs_f32()
                    ))
                }
                Ok(Err(e)) => return End::Failed(super::client::describe(&e)),
                Ok(Ok(None)) => return End::Failed("the database closed the stream".into()),
                Ok(Ok(Some(bytes))) => bytes,
            };
            for event in parser.feed(&chunk) {
                match self.handle(event, &mut mirror, snapshot_seen, opened_at) {
                    Ok(()) => {}
                    Err(end) => {
                        if let End::Revoked(_) = end {
                            return End::Revoked(Arc::clone(&token));
                        }
                        return end;
                    }
                }
            }
        }
    }

    fn handle(
        &self,
        event: SseEvent,
        mirror: &mut Mirror,
        snapshot_seen: &mut bool,
        opened_at: u64,
    ) -> Result<(), End> {
        let touched = match event.event.as_str() {
            "put" => mirror.put(&event.data),
            "patch" => mirror.patch(&event.data),
            "keep-alive" => return Ok(()),
            "cancel" => return Err(End::Cancelled),
            "auth_revoked" => return Err(End::Revoked(Arc::from(""))),
            other => {
                debug!("firebase stream: ignoring an unknown event {other:?}");
                return Ok(());
            }
        };
        // A snapshot's text is as large as the users path: freed before the cache is updated.
        drop(event);
        let touched = touched.map_err(|e| End::Failed(format!("a malformed event: {e}")))?;
        match touched {
            Touched::All => {
                let cached = self.cache.len();
                // The whole store is applied: any re-read asked for is in it.
                drop(self.cache.take_rereads());
                let users = self.apply_snapshot(mirror, opened_at);
                if users == 0 && cached > 0 {
                    warn!(
                        "firebase stream: /{} holds no users now; the {cached} cached users are \
                         removed (was the database emptied or replaced?)",
                        self.users_path
                    );
                }
                if !*snapshot_seen {
                    *snapshot_seen = true;
                    self.status.set_stream_connected(true);
                    info!(
                        "firebase stream connected: {users} users in /{}",
                        self.users_path
                    );
                }
            }
            Touched::Users(tokens) => {
                self.apply_users(mirror, tokens.iter().map(String::as_str));
            }
        }
        Ok(())
    }

    /// Applies a snapshot the mirror now holds whole: each user as it is read from the mirror,
    /// so that its users are not all held parsed at once; then the cached users it does not
    /// hold as users are removed (remnants and unreadable users included), except those this
    /// instance may know more recently than the snapshot, which are looked up in the database
    /// ([`settle_kept`]). Returns how many users it holds.
    fn apply_snapshot(&self, mirror: &Mirror, opened_at: u64) -> usize {
        let mut users = 0;
        // Tokens the mirror holds that are not users: usually none.
        let mut not_users = HashSet::new();
        for token in mirror.tokens() {
            // Problems with stored users were reported at load, or when they were written.
            let node = mirror
                .user(token)
                .map(|value| read_node(token, value, Report::Nothing));
            match node {
                Some(Node::User(user)) => {
                    self.cache.apply_remote(token, Some(&*user));
                    users += 1;
                }
                _ => {
                    not_users.insert(token);
                }
            }
        }
        let kept = self.cache.remove_absent_remote(
            |token| mirror.contains(token) && !not_users.contains(token),
            opened_at,
        );
        if !kept.tokens.is_empty() {
            debug!(
                "firebase stream: {} users the snapshot lacks were confirmed or edited here \
                 since it was asked for; reading them from the database",
                kept.tokens.len()
            );
            tokio::spawn(settle_kept(
                self.rtdb.clone(),
                self.users_path.clone(),
                Arc::clone(&self.cache),
                kept,
            ));
        }
        users
    }

    /// Applies the mirror's value again to users whose write was just confirmed while a store
    /// change had been kept out, or whose change the database refused. A user the mirror does
    /// not hold is removed only when its creation was refused: otherwise its creation may not
    /// have come back on the stream yet, and deletions come as events.
    fn reread(&self, mirror: &Mirror) {
        for Reread {
            token,
            creation_refused,
        } in self.cache.take_rereads()
        {
            match mirror.user(&token) {
                Some(value) => {
                    if let Node::User(user) = read_node(&token, value, Report::Unreadable) {
                        self.cache.apply_remote(&token, Some(&*user));
                    }
                }
                None if creation_refused => self.cache.undo_refused_creation(&token),
                None => {}
            }
        }
    }

    /// Applies the mirror's value of each user to the cache.
    fn apply_users<'a>(&self, mirror: &Mirror, tokens: impl Iterator<Item = &'a str>) {
        for token in tokens {
            let Some(value) = mirror.user(token) else {
                self.cache.apply_remote(token, None);
                continue;
            };
            match read_node(token, value, Report::Unreadable) {
                Node::User(user) => self.cache.apply_remote(token, Some(&*user)),
                Node::Remnant => self.cache.apply_remote(token, None),
                Node::Unreadable => {}
            }
        }
    }
}

/// Reads from the database each user a snapshot lacked but the cache kept, and hands the
/// answer to [`UserCache::settle_absent`]: a user the database does not hold is removed then.
/// A removal made elsewhere before the snapshot brings no event after it, so only this read
/// catches it.
async fn settle_kept(rtdb: Rtdb, users_path: String, cache: Arc<UserCache>, kept: KeptAbsent) {
    let snapshot = kept.snapshot;
    let tokens = Arc::new(parking_lot::Mutex::new(kept.tokens));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..SETTLE_CONCURRENCY {
        let (rtdb, users_path, cache, tokens) = (
            rtdb.clone(),
            users_path.clone(),
            Arc::clone(&cache),
            Arc::clone(&tokens),
        );
        workers.spawn(async move {
            loop {
                let Some(token) = tokens.lock().pop() else {
                    return;
                };
                settle_one(&rtdb, &users_path, &cache, snapshot, &token).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

async fn settle_one(rtdb: &Rtdb, users_path: &str, cache: &UserCache, snapshot: u64, token: &str) {
    let path = format!("{users_path}/{token}");
    for attempt in 1..=SETTLE_ATTEMPTS {
        let asked_at = cache.confirmations();
        let answer = rtdb
            .call(Request::new(Method::GET, &path))
            .await
            .and_then(|reply| reply.json());
        let held = match answer {
            Ok(value) => matches!(read_node(token, value, Report::Nothing), Node::User(_)),
            Err(e) => {
                if attempt == SETTLE_ATTEMPTS {
                    warn!(
                        "firebase stream: cannot read user {} from the database ({e}); it stays \
                         cached until the next snapshot",
                        token_id(token)
                    );
                    return;
                }
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
        };
        if cache.settle_absent(token, snapshot, held, asked_at) == Settled::Done {
            return;
        }
    }
}

/// What a node under the users path holds.
#[derive(Debug)]
pub enum Node {
    User(Box<User>),
    /// Leaves without a user: counters, `lastUsedAt` or an `ip` list that another
    /// instance's write added after the user was deleted (RTDB creates the parents of any
    /// leaf written). Every user tollgate or the older proxy creates is written whole, with
    /// `createdAt`; a node without it is not a user and must not bring one back.
    Remnant,
    /// A user whose known fields are malformed: logged and skipped.
    Unreadable,
}

/// A node without `createdAt`: what deleted users' late leaf writes leave ([`Node::Remnant`]).
pub fn is_remnant(value: &serde_json::Value) -> bool {
    value.is_object() && value.get("createdAt").is_none()
}

/// Which problems with stored users [`read_node`] logs: everything at load; a user that cannot
/// be read when its value arrives; nothing for the stream's snapshots, which hold the values
/// already reported (at every connection).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Everything,
    Unreadable,
    Nothing,
}

/// Parses one stored user; logs (by token id, never the token) as `report` says, and skips one
/// that cannot be read.
pub fn read_node(token: &str, value: serde_json::Value, report: Report) -> Node {
    if is_remnant(&value) {
        debug!(
            "firebase: /users entry {} has no createdAt: leftovers of a deleted user, ignored",
            token_id(token)
        );
        return Node::Remnant;
    }
    match User::from_stored(token, value) {
        Ok(stored) => {
            if report == Report::Everything && !stored.unknown_fields.is_empty() {
                warn!(
                    "firebase: user {} has fields tollgate does not know ({}); they stay in the \
                     database but are not used",
                    token_id(token),
                    stored.unknown_fields.join(", ")
                );
            }
            if report == Report::Everything && stored.non_string_ips > 0 {
                warn!(
                    "firebase: user {} has {} ip entries that are not strings; they are not \
                     used, and are left out when its list is next written",
                    token_id(token),
                    stored.non_string_ips
                );
            }
            Node::User(Box::new(stored.user))
        }
        Err(problem) => {
            if report != Report::Nothing {
                warn!(
                    "firebase: user {} cannot be read and is skipped: {problem}",
                    token_id(token)
                );
            }
            Node::Unreadable
        }
    }
}

/// 0.25 s doubling to 30 s, jittered ([`crate::store::backoff::jittered`]).
fn backoff(failures: u32) -> Duration {
    crate::store::backoff::jittered(BACKOFF_START, BACKOFF_CAP, failures)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use reqwest::Url;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::auth::TokenSource;
    use super::super::client::Target;
    use super::*;

    /// A server that answers every request with a 502 whose body never comes; counts requests.
    async fn stalling_server() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100\r\n\r\n{\"error\":";
                let _ = socket.write_all(head).await;
                held.push(socket);
            }
        });
        (port, accepted)
    }

    fn follower(cache: &Arc<UserCache>) -> Follower {
        let target = Arc::new(Target {
            base: Url::parse("http://127.0.0.1:9/").unwrap(),
            ns: None,
            local: true,
        });
        Follower {
            rtdb: Rtdb::new(target, Arc::new(TokenSource::Emulator)).unwrap(),
            users_path: "users".into(),
            keepalive: Duration::from_secs(75),
            status: StoreStatus::new("firebase_rtdb", Arc::clone(cache)),
            cache: Arc::clone(cache),
        }
    }

    /// Hands the follower a `put` of the whole users path, as the stream does.
    fn snapshot(follower: &Follower, mirror: &mut Mirror, data: serde_json::Value) {
        let event = SseEvent {
            event: "put".into(),
            data: serde_json::json!({"path": "/", "data": data}).to_string(),
        };
        let mut snapshot_seen = false;
        assert!(follower
            .handle(event, mirror, &mut snapshot_seen, 0)
            .is_ok());
        assert!(snapshot_seen);
    }

    fn stored(nickname: &str) -> serde_json::Value {
        serde_json::json!({"type": "normal", "createdAt": 1, "nickname": nickname})
    }

    fn user(token: &str, nickname: &str) -> User {
        User::from_stored(token, stored(nickname)).unwrap().user
    }

    /// A snapshot, applied one user at a time, ends as the cache's whole remote state: users
    /// it holds are added or updated; users it does not hold as users (absent, remnants,
    /// unreadable) are removed, except one created here and not written yet.
    #[tokio::test]
    async fn a_snapshot_replaces_the_remote_state_of_the_cache() {
        let cache = Arc::new(UserCache::default());
        for token in ["kept", "gone", "remnant", "broken"] {
            cache.load([user(token, "old")]);
        }
        cache.create(&user("fresh", "local")).unwrap();
        cache.reread([Reread {
            token: Arc::from("kept"),
            creation_refused: false,
        }]);
        let follower = follower(&cache);
        let mut mirror = Mirror::new();
        snapshot(
            &follower,
            &mut mirror,
            serde_json::json!({
                "kept": stored("new"), "added": stored("added"),
                "remnant": {"promptCount": 3},
                "broken": {"type": "normal", "createdAt": 1, "promptCount": "lots"},
            }),
        );
        let nickname = |t: &str| cache.user(t).and_then(|u| u.nickname);
        assert_eq!(nickname("kept").as_deref(), Some("new"));
        assert_eq!(nickname("added").as_deref(), Some("added"));
        assert_eq!(nickname("fresh").as_deref(), Some("local"));
        for token in ["gone", "remnant", "broken"] {
            assert!(cache.get(token).is_none(), "{token}");
        }
        assert_eq!(cache.len(), 3);
        assert!(
            cache.take_rereads().is_empty(),
            "the snapshot answers re-reads"
        );
        assert!(follower.status.cache_is_current());

        // Numeric tokens: Firebase renders the path as an array.
        snapshot(
            &follower,
            &mut mirror,
            serde_json::json!([null, stored("one"), null, stored("three")]),
        );
        assert_eq!(nickname("1").as_deref(), Some("one"));
        assert_eq!(nickname("3").as_deref(), Some("three"));
        assert!(cache.get("kept").is_none());
        // An emptied database leaves only the user not written yet.
        snapshot(&follower, &mut mirror, serde_json::Value::Null);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("fresh").is_some());
    }

    #[test]
    fn only_a_lasting_connection_resets_the_backoff() {
        let brief = Duration::from_millis(50);
        assert_eq!(failures_so_far(3, true, STABLE_CONNECTION), 0);
        assert_eq!(
            failures_so_far(3, true, brief),
            3,
            "closed right after its snapshot"
        );
        assert_eq!(
            failures_so_far(3, false, STABLE_CONNECTION * 10),
            3,
            "no snapshot"
        );
        // A stream that keeps closing right after its snapshot backs off like any failure.
        let mut failures = 0;
        let waits: Vec<Duration> = (0..4)
            .map(|_| {
                failures = failures_so_far(failures, true, brief) + 1;
                backoff(failures)
            })
            .collect();
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
    }

    #[tokio::test]
    async fn an_error_reply_whose_body_stalls_does_not_stop_reconnects() {
        let (port, accepted) = stalling_server().await;
        let target = Arc::new(Target {
            base: Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap(),
            ns: None,
            local: true,
        });
        let cache = Arc::new(UserCache::default());
        let follower = Follower {
            rtdb: Rtdb::new(target, Arc::new(TokenSource::Emulator)).unwrap(),
            users_path: "users".into(),
            keepalive: Duration::from_millis(300),
            status: StoreStatus::new("firebase_rtdb", Arc::clone(&cache)),
            cache,
        };
        let (_shutdown, watch) = tokio::sync::watch::channel(false);
        let _ = tokio::time::timeout(Duration::from_secs(3), follower.run(watch)).await;
        let attempts = accepted.load(Ordering::SeqCst);
        assert!(attempts >= 2, "{attempts} stream request(s) in 3 s");
    }
}
