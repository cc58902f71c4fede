//! Test support: a real origin server, the real `tollgate` binary as a child process, and an
//! HTTP client. Everything talks over loopback sockets.
#![allow(dead_code)]

pub mod origin;
pub mod sockets;
pub mod tollgate;

pub use origin::Origin;
pub use tollgate::TollgateBuilder;

use std::time::Duration;

/// A port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A blocking HTTP client that neither follows redirects nor uses a system proxy.
pub fn client() -> reqwest::blocking::Client {
    // reqwest is built with rustls and no built-in provider (tollgate installs ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Polls `check` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// The JSON error body's `error.type`.
pub fn error_type(body: &serde_json::Value) -> &str {
    body["error"]["type"].as_str().unwrap_or("<none>")
}
