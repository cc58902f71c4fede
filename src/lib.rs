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
