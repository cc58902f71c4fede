//! tollgate: an edge HTTP proxy on Pingora that admits clients by Bearer token, rate limits
//! them and proxies them upstream. See `README.md` and `docs/`.

pub mod admin;
pub mod clock;
pub mod config;
pub mod encoding;
pub mod net;
pub mod observe;
pub mod proxy;
pub mod secret;
pub mod store;
pub mod upgrade;
pub mod users;

/// The soaks' seeded generator and knobs (tests/e2e/support/soak.rs), shared by the unit-level
/// models rather than copied; its other helpers are for stored users.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/e2e/support/soak.rs"]
mod soak;
