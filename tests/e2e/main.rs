//! Black-box tests: the real `tollgate` binary on real sockets, in front of a real origin.
//! One test binary (modules below) so the suite links once.

mod support;

mod admin_api;
mod client_identity;
mod config_cli;
mod connections;
mod deploy;
mod firebase;
mod gatekeeper;
mod observability;
mod openapi;
mod operations;
mod proxying;
mod rate_limit;
mod resources;
mod scripts;
mod sqlite;
