//! State shared by the listeners, the stream tasks and the [`crate::StandIn`] handle.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::database::{Database, WriteError};
use crate::faults::FaultSet;
use crate::introspect::{Counters, LoggedRequest, RequestLog};
use crate::oauth::TokenStore;
use crate::options::{Knobs, Options};
use crate::path::DbPath;
use crate::sse::{Auth, StreamAction};
use crate::tree::WriteContext;

/// Locks a mutex, recovering the data if a previous holder panicked.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The addresses the stand-in serves.
#[derive(Debug, Clone)]
pub struct Urls {
    /// `http://127.0.0.1:PORT`.
    pub db: String,
    /// `http://127.0.0.1:PORT/token`.
    pub token: String,
    /// `http://127.0.0.2:PORT2`, if the secondary listener is up.
    pub secondary: Option<String>,
}

/// A full outage in progress.
#[derive(Debug, Clone, Copy, Default)]
pub enum Outage {
    /// Serving normally.
    #[default]
    Off,
    /// Resetting requests until the instant.
    Until(Instant),
    /// Resetting requests until ended.
    Indefinite,
}

/// Credentials presented with a database request.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// `Authorization` header value.
    pub authorization: Option<&'a str>,
    /// `access_token=`.
    pub access_token: Option<&'a str>,
    /// `auth=`.
    pub auth: Option<&'a str>,
}

/// Everything behind the listeners.
pub struct Shared {
    /// Start-up options.
    pub options: Options,
    /// Database name for `ns=`.
    pub namespace: String,
    /// Served addresses.
    pub urls: Urls,
    /// The fake service-account JSON.
    pub service_account_json: String,
    /// Its `client_email`.
    pub client_email: String,
    knobs: Mutex<Knobs>,
    db: Mutex<Database>,
    tokens: Mutex<TokenStore>,
    faults: Mutex<FaultSet>,
    log: Mutex<RequestLog>,
    counters: Mutex<Counters>,
    clock: Mutex<Clock>,
    outage: Mutex<Outage>,
}

impl Shared {
    /// Fresh state.
    pub fn new(
        options: Options,
        urls: Urls,
        service_account_json: String,
        client_email: String,
    ) -> Self {
        Shared {
            namespace: options.namespace_or_default(),
            knobs: Mutex::new(options.knobs.clone()),
            options,
            urls,
            service_account_json,
            client_email,
            db: Mutex::default(),
            tokens: Mutex::default(),
            faults: Mutex::default(),
            log: Mutex::default(),
            counters: Mutex::default(),
            clock: Mutex::default(),
            outage: Mutex::default(),
        }
    }

    /// The database (tree and streams). Hold the guard briefly and never across an await.
    pub fn db(&self) -> MutexGuard<'_, Database> {
        lock(&self.db)
    }

    /// The fault rules.
    pub fn faults(&self) -> MutexGuard<'_, FaultSet> {
        lock(&self.faults)
    }

    /// The request log.
    pub fn log(&self) -> MutexGuard<'_, RequestLog> {
        lock(&self.log)
    }

    /// The clock.
    pub fn clock(&self) -> MutexGuard<'_, Clock> {
        lock(&self.clock)
    }

    /// The issued tokens.
    pub fn tokens(&self) -> MutexGuard<'_, TokenStore> {
        lock(&self.tokens)
    }

    /// A copy of the current knobs.
    pub fn knobs(&self) -> Knobs {
        lock(&self.knobs).clone()
    }

    /// Changes the knobs.
    pub fn update_knobs<R>(&self, f: impl FnOnce(&mut Knobs) -> R) -> R {
        f(&mut lock(&self.knobs))
    }

    /// Updates the counters.
    pub fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut lock(&self.counters));
    }

    /// A copy of the counters.
    pub fn counters(&self) -> Counters {
        lock(&self.counters).clone()
    }

    /// Appends to the request log.
    pub fn record(&self, entry: LoggedRequest) {
        self.log().push(entry, self.options.request_log_limit);
    }

    /// The fake clock, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.clock().now_ms()
    }

    /// Inputs for resolving server values now.
    pub fn write_ctx(&self) -> WriteContext {
        WriteContext {
            now_ms: self.now_ms(),
        }
    }

    /// Issues an access token; returns it with its `expires_in`.
    pub fn issue_token(&self) -> (String, u64) {
        let lifetime = self.knobs().token_expires_in_s;
        let now = self.now_ms();
        let token = self.tokens().issue(now, lifetime);
        self.count(|c| c.tokens_issued += 1);
        (token, lifetime)
    }

    /// Decides whether a database request may proceed. Credentials, when present, must be
    /// valid even under public rules.
    pub fn authorize(&self, creds: &Credentials<'_>) -> Option<Auth> {
        let bearer = creds.authorization.map(|h| match h.trim().split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
            _ => None,
        });
        let token = match (bearer, creds.access_token) {
            (Some(Some(t)), _) | (None, Some(t)) => Some(t),
            (Some(None), _) => return None,
            (None, None) => None,
        };
        if let Some(token) = token {
            let now = self.now_ms();
            return self
                .tokens()
                .is_valid(token, now)
                .then(|| Auth::Token(token.to_owned()));
        }
        if let Some(secret) = creds.auth {
            return (self.options.database_secret.as_deref() == Some(secret))
                .then_some(Auth::Secret);
        }
        self.knobs().public_rules.then_some(Auth::Public)
    }

    /// When a stream authorised by `auth` must be revoked, on the real-time clock.
    pub fn auth_deadline(&self, auth: &Auth) -> Option<Instant> {
        let Auth::Token(token) = auth else {
            return None;
        };
        let expiry = self.tokens().expiry_ms(token)?;
        let left = u64::try_from(expiry.saturating_sub(self.now_ms())).unwrap_or(0);
        // Beyond what an Instant can represent means "never".
        Instant::now().checked_add(Duration::from_millis(left))
    }

    /// Sends `auth_revoked` to every token-authorised stream whose token is no longer valid.
    pub fn revoke_invalid_streams(&self) -> usize {
        let now = self.now_ms();
        // Lock order: tokens before db (nothing locks them the other way round).
        let tokens = self.tokens();
        let db = self.db();
        db.streams
            .act(StreamAction::AuthRevoked, None, |auth| match auth {
                Auth::Token(t) => !tokens.is_valid(t, now),
                _ => false,
            })
    }

    /// Revokes every token; their streams get `auth_revoked`. Returns how many streams.
    pub fn revoke_tokens(&self) -> usize {
        self.tokens().revoke_all();
        self.revoke_invalid_streams()
    }

    /// Expires every token now; their streams get `auth_revoked`. Returns how many streams.
    pub fn expire_tokens(&self) -> usize {
        let now = self.now_ms();
        self.tokens().expire_all(now);
        self.revoke_invalid_streams()
    }

    /// Sends `action` to the open streams at `path` (all when `None`).
    pub fn stream_action(&self, action: StreamAction, path: Option<&DbPath>) -> usize {
        self.db().streams.act(action, path, |_| true)
    }

    /// Writes `value` at `path` as a console edit would, optionally notifying streams.
    pub fn set_value(
        &self,
        path: &DbPath,
        value: Value,
        notify: bool,
    ) -> Result<Value, WriteError> {
        let ctx = self.write_ctx();
        let style = notify.then(|| self.knobs().patch_event_keys);
        self.db().set(path, value, ctx, style)
    }

    /// A multi-path update at `path`, optionally notifying streams.
    pub fn update_values(
        &self,
        path: &DbPath,
        value: Value,
        notify: bool,
    ) -> Result<Value, WriteError> {
        let ctx = self.write_ctx();
        let style = notify.then(|| self.knobs().patch_event_keys);
        self.db().update(path, value, ctx, style).map(Value::Object)
    }

    /// True while an outage is in progress.
    pub fn in_outage(&self) -> bool {
        let mut outage = lock(&self.outage);
        match *outage {
            Outage::Off => false,
            Outage::Indefinite => true,
            Outage::Until(end) if Instant::now() < end => true,
            Outage::Until(_) => {
                *outage = Outage::Off;
                false
            }
        }
    }

    /// Starts an outage (for `duration`, or until ended) and drops every open stream.
    pub fn begin_outage(&self, duration: Option<Duration>) {
        *lock(&self.outage) = match duration {
            Some(d) => Instant::now()
                .checked_add(d)
                .map_or(Outage::Indefinite, Outage::Until),
            None => Outage::Indefinite,
        };
        self.stream_action(StreamAction::Drop, None);
    }

    /// Ends an outage early.
    pub fn end_outage(&self) {
        *lock(&self.outage) = Outage::Off;
    }

    /// Back to a fresh state: empty tree, no tokens, faults, log entries or counts; start-up
    /// knobs; real clock; no outage. Open streams are closed.
    pub fn reset(&self) {
        self.stream_action(StreamAction::Close, None);
        self.db().tree = Default::default();
        self.tokens().revoke_all();
        self.faults().clear();
        self.log().clear();
        *lock(&self.counters) = Counters::default();
        *lock(&self.knobs) = self.options.knobs.clone();
        self.clock().reset();
        self.end_outage();
    }
}
