//! Test support: a real origin server, the real `tollgate` binary as a child process, and an
//! HTTP client. Everything talks over loopback sockets.
#![allow(dead_code)]

pub mod forwarding;
pub mod origin;
pub mod soak;
pub mod sockets;
pub mod tollgate;
pub mod wire;

pub use origin::Origin;
pub use tollgate::TollgateBuilder;

use std::time::Duration;

/// A port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` different ports that were free a moment ago. They are all held while the others are
/// chosen: released one at a time, the kernel could hand the same port out twice in a row
/// (it did, on a busy machine, to a proxy and an admin listener, and tollgate refused the
/// config: "admin.listen ... is also listen[0]").
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] = std::array::from_fn(|_| {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")
    });
    held.each_ref()
        .map(|l| l.local_addr().expect("the bound address").port())
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

/// One HTTP/1.1 answer as read from a raw connection.
#[derive(Debug)]
pub struct Answer {
    /// The status line without its CRLF; empty when the connection closed instead.
    pub status: String,
    /// The header lines, lowercased.
    pub head: String,
    pub body: Vec<u8>,
}

/// The value of the sample `series` (name and labels, as rendered) in a `/metrics` scrape.
pub fn metric_sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Reads one answer from `reader`, its body by its `Content-Length` (an interim `100
/// Continue` is an answer of its own).
pub fn read_answer(reader: &mut impl std::io::BufRead) -> Answer {
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut head = String::new();
    let mut length = 0;
    while !status.is_empty() {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let line = line.to_ascii_lowercase();
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Answer {
        status: status.trim_end().to_string(),
        head,
        body,
    }
}

/// Sends one HTTP/1.1 GET of `path` on `conn` and returns its answer's status line.
pub fn one_exchange(conn: &mut std::net::TcpStream, path: &str) -> String {
    use std::io::Write;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: tollgate\r\n\r\n").unwrap();
    // Nothing follows the answer, so this reader buffers nothing the next call needs.
    read_answer(&mut std::io::BufReader::new(conn.try_clone().unwrap())).status
}

/// Whether the server closed `conn` (a read ends) within `wait`.
pub fn closed_within(conn: &mut std::net::TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    conn.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected bytes from the server"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(_) => false, // timed out: still open
    }
}
