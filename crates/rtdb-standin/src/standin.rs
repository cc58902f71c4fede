//! The [`StandIn`] handle: starts the servers on a background thread with their own tokio
//! runtime, exposes the Rust control API, and shuts everything down on drop.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::oneshot;

use crate::database::WriteError;
use crate::faults::{FaultRule, InstalledFault};
use crate::fixture::{client_email, firebase_key_b64, service_account};
use crate::http::serve;
use crate::introspect::{Counters, LoggedRequest, StreamInfo};
use crate::options::{Knobs, Options, RedirectScope};
use crate::path::{DbPath, PathError};
use crate::sse::{Listener, StreamAction};
use crate::state::{Shared, Urls};

/// Why the stand-in could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("could not bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The runtime or its thread could not be started.
    #[error("could not start the server runtime: {0}")]
    Runtime(io::Error),
}

/// Why a direct tree operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    /// The path broke the key rules.
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    /// The value could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// A running stand-in for Firebase RTDB and the Google token endpoint, on loopback.
///
/// Created from synchronous code; it serves from its own thread and runtime. The handle is
/// `Send + Sync`; dropping it stops the servers and closes every connection.
pub struct StandIn {
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("db_url", &self.shared.urls.db)
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr) -> Result<StdListener, StartError> {
    let listener = StdListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(listener)
}

fn local_addr(listener: &StdListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

impl StandIn {
    /// Starts the stand-in. Panics if it cannot (e.g. the port is taken); use
    /// [`StandIn::try_start`] to handle that.
    pub fn start(options: Options) -> StandIn {
        Self::try_start(options).unwrap_or_else(|e| panic!("rtdb-standin failed to start: {e}"))
    }

    /// Starts the stand-in. The secondary (redirect) listener is best effort: if its address
    /// cannot be bound, [`StandIn::secondary_url`] is `None` and redirect mode does nothing.
    pub fn try_start(options: Options) -> Result<StandIn, StartError> {
        let primary_addr = SocketAddr::new(options.host, options.port);
        let primary = bind(primary_addr)?;
        let secondary = options
            .secondary_host
            .and_then(|host| bind(SocketAddr::new(host, 0)).ok());
        let db = format!("http://{}", local_addr(&primary, primary_addr));
        let urls = Urls {
            token: format!("{db}/token"),
            secondary: secondary
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| format!("http://{a}")),
            db,
        };
        let account = service_account(&options.project_id, &urls.token).to_string();
        let email = client_email(&options.project_id);
        let shared = Arc::new(Shared::new(options, urls, account, email));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rtdb-standin".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    spawn_listener(&server_shared, primary, Listener::Primary);
                    if let Some(secondary) = secondary {
                        spawn_listener(&server_shared, secondary, Listener::Secondary);
                    }
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_millis(500));
            })
            .map_err(StartError::Runtime)?;
        Ok(StandIn {
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    // ---- addresses and credentials ----

    /// `http://127.0.0.1:PORT` (no trailing slash); the value for `FIREBASE_RTDB_URL`.
    pub fn db_url(&self) -> String {
        self.shared.urls.db.clone()
    }

    /// `http://127.0.0.2:PORT2`, the redirect target, if that listener is up.
    pub fn secondary_url(&self) -> Option<String> {
        self.shared.urls.secondary.clone()
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn token_uri(&self) -> String {
        self.shared.urls.token.clone()
    }

    /// The database name used in redirect `ns=` parameters.
    pub fn namespace(&self) -> String {
        self.shared.namespace.clone()
    }

    /// The service account's `client_email`.
    pub fn client_email(&self) -> String {
        self.shared.client_email.clone()
    }

    /// The fake service-account JSON (TEST-ONLY key; `token_uri` points here).
    pub fn service_account_json(&self) -> String {
        self.shared.service_account_json.clone()
    }

    /// Base64 of [`StandIn::service_account_json`]; the value for `FIREBASE_KEY`.
    pub fn firebase_key_b64(&self) -> String {
        firebase_key_b64(&self.shared.service_account_json)
    }

    // ---- the tree ----

    /// The value at `path` (e.g. `"/users/abc"`), in read form; `null` when empty.
    pub fn get(&self, path: &str) -> Result<Value, StandInError> {
        let path = DbPath::parse(path)?;
        Ok(self.shared.db().tree.get(&path))
    }

    /// Writes `value` at `path` and notifies open streams, like an edit in the console.
    /// Server values are resolved. Returns the stored value.
    pub fn set(&self, path: &str, value: Value) -> Result<Value, StandInError> {
        Ok(self.shared.set_value(&DbPath::parse(path)?, value, true)?)
    }

    /// Writes `value` at `path` without notifying streams (seeding state, or simulating a
    /// change the streams never heard about).
    pub fn set_silently(&self, path: &str, value: Value) -> Result<Value, StandInError> {
        Ok(self.shared.set_value(&DbPath::parse(path)?, value, false)?)
    }

    /// A multi-path update at `path` (keys may contain `/`), notifying streams once.
    pub fn update(&self, path: &str, entries: Value) -> Result<Value, StandInError> {
        Ok(self
            .shared
            .update_values(&DbPath::parse(path)?, entries, true)?)
    }

    /// Deletes `path`, notifying streams.
    pub fn delete(&self, path: &str) -> Result<(), StandInError> {
        self.shared
            .set_value(&DbPath::parse(path)?, Value::Null, true)?;
        Ok(())
    }

    // ---- auth ----

    /// Issues a valid access token without the JWT flow.
    pub fn issue_token(&self) -> String {
        self.shared.issue_token().0
    }

    /// Revokes every issued token; token-authorised streams get `auth_revoked` and close.
    /// Returns how many streams were told.
    pub fn revoke_tokens(&self) -> usize {
        self.shared.revoke_tokens()
    }

    /// Makes every issued token expire now; token-authorised streams get `auth_revoked`.
    pub fn expire_tokens(&self) -> usize {
        self.shared.expire_tokens()
    }

    /// Turns public rules (no credentials needed) on or off.
    pub fn set_public_rules(&self, public: bool) {
        self.shared.update_knobs(|k| k.public_rules = public);
    }

    // ---- streams ----

    /// Number of open streams.
    pub fn open_streams(&self) -> usize {
        self.shared.db().streams.count()
    }

    /// The open streams.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.shared.db().streams.infos()
    }

    /// Applies `action` to the open streams at `path` (`None`: all). Returns how many.
    pub fn stream_action(
        &self,
        action: StreamAction,
        path: Option<&str>,
    ) -> Result<usize, StandInError> {
        let path = path.map(DbPath::parse).transpose()?;
        Ok(self.shared.stream_action(action, path.as_ref()))
    }

    /// Blocks until at least `n` streams are open, or `timeout` passes; returns whether they
    /// are. Do not call from a single-threaded async runtime that also drives the client.
    pub fn wait_for_streams(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if self.open_streams() >= n {
                return true;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    // ---- faults and outages ----

    /// Installs a fault rule; returns its id.
    pub fn add_fault(&self, rule: FaultRule) -> u64 {
        self.shared.faults().add(rule)
    }

    /// Removes one fault rule; false if it was not installed (or used up).
    pub fn remove_fault(&self, id: u64) -> bool {
        self.shared.faults().remove(id)
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.shared.faults().clear();
    }

    /// The installed fault rules, with remaining counts.
    pub fn faults(&self) -> Vec<InstalledFault> {
        self.shared.faults().list()
    }

    /// A full outage for `duration`: every database and token request is answered with a TCP
    /// reset and every open stream is dropped. The port stays bound, so service resumes on
    /// the same URL. The control API keeps working.
    pub fn outage(&self, duration: Duration) {
        self.shared.begin_outage(Some(duration));
    }

    /// An outage until [`StandIn::end_outage`].
    pub fn begin_outage(&self) {
        self.shared.begin_outage(None);
    }

    /// Ends an outage.
    pub fn end_outage(&self) {
        self.shared.end_outage();
    }

    /// Redirects the next `times` matching requests (`None`: until turned off) from the
    /// primary listener to the secondary one with a 307.
    pub fn set_redirect(&self, scope: RedirectScope, times: Option<u32>) {
        self.shared.update_knobs(|k| {
            k.redirect = scope;
            k.redirect_remaining = times;
        });
    }

    // ---- clock and knobs ----

    /// The fake server clock, ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.shared.now_ms()
    }

    /// Moves the fake clock forward; tokens that expire as a result revoke their streams.
    pub fn advance_clock(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.shared.clock().advance(ms);
        self.shared.revoke_invalid_streams();
    }

    /// Freezes the fake clock at `ms`.
    pub fn freeze_clock_at(&self, ms: i64) {
        self.shared.clock().freeze_at(ms);
        self.shared.revoke_invalid_streams();
    }

    /// The current knobs.
    pub fn knobs(&self) -> Knobs {
        self.shared.knobs()
    }

    /// Changes knobs, e.g. `s.update_knobs(|k| k.keepalive_ms = 50)`.
    pub fn update_knobs(&self, f: impl FnOnce(&mut Knobs)) {
        self.shared.update_knobs(f);
    }

    // ---- introspection ----

    /// The logged requests (database and token routes), oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.log().since(0)
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.shared.log().clear();
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// Back to a fresh state (see `POST /_fake/reset`), keeping the ports.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

fn spawn_listener(shared: &Arc<Shared>, listener: StdListener, kind: Listener) {
    match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => {
            tokio::spawn(serve(shared.clone(), listener, kind));
        }
        Err(e) => eprintln!(
            "rtdb-standin: cannot serve the {} listener: {e}",
            kind.name()
        ),
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
