//! Start-up options and the knobs that can be changed while running.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::sse::LineEnding;

/// Longest keep-alive interval honoured (a day); larger values are clamped.
const MAX_KEEPALIVE_MS: u64 = 24 * 60 * 60 * 1000;

/// How the keys of a multi-path PATCH appear in the `patch` events sent to streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchEventKeys {
    /// One `patch` event whose keys are the relative paths as written (`"abc/promptCount"`),
    /// which is what the real service is reported to send.
    #[default]
    Keep,
    /// Multi-segment keys are nested into the event path instead: one `patch` event per
    /// distinct parent, with single-segment keys (`{"path":"/abc","data":{"promptCount":3}}`).
    /// A literal nested object (`{"abc":{"promptCount":3}}`) would wrongly replace `abc`'s
    /// other children, so nesting moves the prefix into `path`.
    Nest,
}

/// Which requests on the primary listener are answered with a 307 to the secondary one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectScope {
    /// No redirects.
    #[default]
    Off,
    /// Streaming GETs (`Accept: text/event-stream`) only.
    Streams,
    /// Every database request.
    All,
}

/// Behaviour that tests may change at run time (Rust API or `PATCH /_fake/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    /// Rules allow unauthenticated reads and writes (credentials, when sent, are still checked).
    pub public_rules: bool,
    /// Interval between `keep-alive` events on open streams.
    pub keepalive_ms: u64,
    /// `expires_in` of issued access tokens; tokens stop working after it (fake clock).
    pub token_expires_in_s: u64,
    /// How multi-path PATCH keys appear in stream events.
    pub patch_event_keys: PatchEventKeys,
    /// `print=silent` together with `if-match` is a 400 (as reported; unconfirmed).
    pub reject_silent_with_if_match: bool,
    /// `if-match` on PATCH or POST is a 400; when false it is ignored.
    pub reject_if_match_on_patch: bool,
    /// Which requests get a 307 to the secondary listener.
    pub redirect: RedirectScope,
    /// How many more redirects to send; `None` means until turned off.
    pub redirect_remaining: Option<u32>,
    /// Writes whose body is larger than this many bytes are a 400.
    pub max_write_bytes: Option<usize>,
    /// Line endings of stream events.
    pub sse_line_ending: LineEnding,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            public_rules: false,
            keepalive_ms: 30_000,
            token_expires_in_s: 3599,
            patch_event_keys: PatchEventKeys::Keep,
            reject_silent_with_if_match: true,
            reject_if_match_on_patch: true,
            redirect: RedirectScope::Off,
            redirect_remaining: None,
            max_write_bytes: None,
            sse_line_ending: LineEnding::Lf,
        }
    }
}

impl Knobs {
    /// [`Knobs::keepalive_ms`] as a duration, clamped to between 1 ms and a day.
    pub fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_ms.clamp(1, MAX_KEEPALIVE_MS))
    }
}

/// How to start a [`crate::StandIn`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Address of the primary listener; loopback by default.
    pub host: IpAddr,
    /// Port of the primary listener; 0 picks an ephemeral port.
    pub port: u16,
    /// Address of the redirect target listener (ephemeral port). A different host from
    /// `host`, so clients that strip `Authorization` on cross-host redirects are caught.
    /// `None` disables the secondary listener and redirect mode.
    pub secondary_host: Option<IpAddr>,
    /// `project_id` of the fake service account.
    pub project_id: String,
    /// Database name used in redirect `ns=` parameters; defaults to `<project_id>-default-rtdb`.
    pub namespace: Option<String>,
    /// A legacy database secret accepted as `?auth=`; `None` accepts none.
    pub database_secret: Option<String>,
    /// Largest request body read; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most request-log entries kept (oldest dropped first).
    pub request_log_limit: usize,
    /// Clock skew tolerated on JWT `iat`/`exp`, in seconds.
    pub jwt_clock_skew_s: i64,
    /// Initial run-time knobs.
    pub knobs: Knobs,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            secondary_host: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
            project_id: "tollgate-standin".to_owned(),
            namespace: None,
            database_secret: None,
            max_body_bytes: 64 * 1024 * 1024,
            request_log_limit: 10_000,
            jwt_clock_skew_s: 300,
            knobs: Knobs::default(),
        }
    }
}

impl Options {
    /// Sets the primary port (0 = ephemeral).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets the keep-alive interval of streams.
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.knobs.keepalive_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Turns public rules on or off.
    pub fn public_rules(mut self, public: bool) -> Self {
        self.knobs.public_rules = public;
        self
    }

    /// Sets `expires_in` of issued tokens.
    pub fn token_expires_in(mut self, lifetime: Duration) -> Self {
        self.knobs.token_expires_in_s = lifetime.as_secs();
        self
    }

    /// Sets how multi-path PATCH keys appear in stream events.
    pub fn patch_event_keys(mut self, style: PatchEventKeys) -> Self {
        self.knobs.patch_event_keys = style;
        self
    }

    /// Accepts `secret` as a legacy `?auth=` database secret.
    pub fn database_secret(mut self, secret: impl Into<String>) -> Self {
        self.database_secret = Some(secret.into());
        self
    }

    /// The database name used in redirect `ns=` parameters.
    pub fn namespace_or_default(&self) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| format!("{}-default-rtdb", self.project_id))
    }
}
