//! A faithful local stand-in for Firebase Realtime Database (REST + SSE) and the Google
//! OAuth2 token endpoint, speaking real HTTP/1.1 on loopback, for tests that must run offline.
//!
//! ```no_run
//! use rtdb_standin::{Options, StandIn};
//! use std::time::Duration;
//!
//! let standin = StandIn::start(Options::default().keepalive(Duration::from_millis(100)));
//! std::env::set_var("FIREBASE_RTDB_URL", standin.db_url());
//! std::env::set_var("FIREBASE_KEY", standin.firebase_key_b64());
//! standin.set("/users/abc", serde_json::json!({"promptCount": 1})).unwrap();
//! ```
//!
//! See `docs/firebase-standin.md` for the HTTP control API under `/_fake/*` and the fidelity
//! caveats.

mod clock;
mod control;
mod database;
pub mod faults;
pub mod fixture;
mod http;
pub mod introspect;
mod oauth;
pub mod options;
pub mod path;
mod pushid;
mod query;
mod rest;
mod sse;
mod standin;
mod state;
pub mod tree;

pub use database::WriteError;
pub use faults::{FaultAction, FaultRule, InstalledFault};
pub use introspect::{Counters, LoggedRequest, StreamInfo};
pub use options::{Knobs, LineEnding, Options, PatchEventKeys, RedirectScope};
pub use path::PathError;
pub use sse::StreamAction;
pub use standin::{StandIn, StandInError, StartError};
pub use tree::DataError;
