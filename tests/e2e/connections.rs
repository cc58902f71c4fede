//! Guards on client connections: the deadline for a whole request header and the cap on
//! connections per client address.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::tollgate::Tollgate;
use crate::support::{
    closed_within, metric_sample, one_exchange, wait_until, Origin, TollgateBuilder,
};

fn metric(tg: &Tollgate, name: &str) -> u64 {
    tg.metrics()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Sends a request header a byte per 250 ms (about 20 s) on `conn`, and checks the server
/// closed the connection well before it was all sent.
fn assert_trickle_cut(conn: &mut TcpStream, what: &str) {
    let header = format!(
        "GET /a HTTP/1.1\r\nHost: tollgate\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(40)
    );
    let started = Instant::now();
    for byte in header.as_bytes().chunks(1) {
        if conn.write_all(byte).is_err() || closed_within(conn, Duration::from_millis(250)) {
            let elapsed = started.elapsed();
            assert!(
                elapsed < Duration::from_secs(10),
                "{what}: cut only after {elapsed:?}"
            );
            return;
        }
    }
    panic!("{what}: the whole trickled header was read");
}

/// Pingora times each read of a request header (60 s), not the whole header: a client sending
/// a byte every quarter second kept its connection for as long as it liked (Slowloris). The
/// first request of a connection and a later one are cut alike, on both listeners.
#[test]
fn a_header_trickled_past_the_header_timeout_is_cut() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  header_timeout_seconds: 2\n")
        .start();
    assert_trickle_cut(&mut tg.proxy_connection(), "a first request");
    assert_eq!(origin.count(), 0);

    let mut conn = tg.proxy_connection();
    assert!(one_exchange(&mut conn, "/first").starts_with("HTTP/1.1 200"));
    assert_trickle_cut(&mut conn, "a second request");
    assert_eq!(origin.count(), 1);

    // The admin listener's second request alike.
    let mut conn = tg.admin_connection();
    assert!(one_exchange(&mut conn, "/health").starts_with("HTTP/1.1 200"));
    assert_trickle_cut(&mut conn, "the admin listener's second request");
    assert_eq!(metric(&tg, "tollgate_client_header_timeouts_total"), 3);
}

/// The deadline covers a header only: the idle wait between two requests is the keep-alive
/// timeout's, a body may arrive slowly, and a header in several reads within the deadline
/// passes.
#[test]
fn the_header_timeout_spares_idle_connections_slow_bodies_and_split_headers() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  header_timeout_seconds: 1\n  keepalive_timeout_seconds: 30\n")
        .start();
    let mut conn = tg.proxy_connection();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(one_exchange(&mut conn, "/a").starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        one_exchange(&mut conn, "/b").starts_with("HTTP/1.1 200"),
        "idle longer than the header timeout, then a request"
    );

    // A body of 8 bytes over about 2.4 s, after a header sent at once.
    conn.write_all(b"POST /upload HTTP/1.1\r\nHost: tollgate\r\nContent-Length: 8\r\n\r\n")
        .unwrap();
    for byte in b"abcdefgh".chunks(1) {
        std::thread::sleep(Duration::from_millis(300));
        conn.write_all(byte).unwrap();
    }
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer).unwrap();
    // The origin answers once it has read the whole body.
    assert_eq!(&answer, b"HTTP/1.1 200", "slow body");
    assert!(origin.seen().iter().any(|r| r.uri == "/upload"));

    // A header in two parts, 300 ms apart.
    let mut conn = tg.proxy_connection();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /split HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    conn.write_all(b"st: tollgate\r\n\r\n").unwrap();
    conn.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200", "split header");
    assert_eq!(metric(&tg, "tollgate_client_header_timeouts_total"), 0);
}

/// Reads what the server sends until it closes the connection.
fn read_to_close(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// One address could open connections without limit, each holding a file descriptor and
/// memory. Over `clients.max_connections_per_ip` a connection is answered 429 and closed; a
/// closed connection frees its place.
#[test]
fn connections_over_the_per_address_cap_are_refused_with_429() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  max_connections_per_ip: 2\n")
        .start();
    let mut first = tg.proxy_connection();
    let mut second = tg.proxy_connection();
    assert!(one_exchange(&mut first, "/a").starts_with("HTTP/1.1 200"));
    assert!(one_exchange(&mut second, "/a").starts_with("HTTP/1.1 200"));

    let mut third = tg.proxy_connection();
    third
        .write_all(b"GET /a HTTP/1.1\r\nHost: tollgate\r\n\r\n")
        .unwrap();
    let answer = read_to_close(&mut third);
    assert!(
        answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["type"], "too_many_connections", "{answer}");
    assert_eq!(metric(&tg, "tollgate_client_connections_refused_total"), 1);
    assert_eq!(origin.count(), 2, "the refused request was not proxied");

    drop(first);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut conn = tg.proxy_connection();
            one_exchange(&mut conn, "/b").starts_with("HTTP/1.1 200")
        }),
        "a closed connection gives its place back"
    );
    assert!(one_exchange(&mut second, "/c").starts_with("HTTP/1.1 200"));
}

/// A trusted proxy (a load balancer) carries many clients' connections: it is not capped.
#[test]
fn trusted_proxies_are_exempt_from_the_connection_cap() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  max_connections_per_ip: 1\ntrusted_proxies: [\"127.0.0.1\"]\n")
        .start();
    let mut conns: Vec<TcpStream> = (0..3).map(|_| tg.proxy_connection()).collect();
    for conn in &mut conns {
        assert!(one_exchange(conn, "/a").starts_with("HTTP/1.1 200"));
    }
    assert!(!closed_within(&mut conns[0], Duration::from_millis(200)));
    assert_eq!(metric(&tg, "tollgate_client_connections_refused_total"), 0);
}

/// Pingora gives a new connection 60 s for its first byte whatever
/// `clients.keepalive_timeout_seconds` says, and the header deadline needs a first byte: a
/// connection that sends nothing was held 60 s. It is closed after the keep-alive timeout, on
/// both listeners, with the header deadline off too.
#[test]
fn a_fresh_connection_that_sends_nothing_is_closed_after_the_keepalive_timeout() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  keepalive_timeout_seconds: 2\n  header_timeout_seconds: 0\n")
        .start();
    let mut conn = tg.proxy_connection();
    let mut admin = tg.admin_connection();
    assert!(
        closed_within(&mut conn, Duration::from_secs(8)),
        "a silent new connection still open after 8 s (keep-alive timeout 2 s)"
    );
    assert!(
        closed_within(&mut admin, Duration::from_secs(2)),
        "a silent new admin connection still open"
    );
    assert_eq!(metric(&tg, "tollgate_client_header_timeouts_total"), 0);
}

/// Sends a GET for an answer of `bytes` bytes on a new connection and never reads it.
fn request_without_reading(tg: &Tollgate, bytes: usize) -> TcpStream {
    let mut conn = tg.proxy_connection();
    write!(
        conn,
        "GET /big HTTP/1.1\r\nHost: tollgate\r\nx-origin-body-bytes: {bytes}\r\n\r\n"
    )
    .unwrap();
    conn
}

/// Pingora waits without limit for a client to take its answer: a client that stopped reading
/// held its connection and the upstream connection feeding it (two descriptors) for good,
/// whatever the other timeouts said. After `clients.send_timeout_seconds` both are closed, the
/// request counts as `client_closed` and gives its `max_inflight` slot back.
#[test]
fn a_client_that_stops_reading_its_answer_is_cut_after_the_send_timeout() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  send_timeout_seconds: 1\n")
        .yaml("rate_limit:\n  max_inflight: 4\n")
        .start();
    let before = tg.open_fds();
    // Far more than the loopback sockets' buffers take.
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| request_without_reading(&tg, 32 << 20))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || origin.count() == 4),
        "the origin saw {} requests",
        origin.count()
    );
    assert!(
        wait_until(Duration::from_secs(20), || tg.open_fds() <= before),
        "{} descriptors held by 4 clients that stopped reading ({before} before)",
        tg.open_fds()
    );
    let scrape = tg.metrics();
    assert_eq!(
        metric_sample(&scrape, "tollgate_client_send_timeouts_total"),
        Some(4.0)
    );
    assert_eq!(
        metric_sample(
            &scrape,
            r#"tollgate_requests_total{mode="none",result="client_closed"}"#
        ),
        Some(4.0),
        "{scrape}"
    );
    assert!(
        one_exchange(&mut tg.proxy_connection(), "/after").starts_with("HTTP/1.1 200"),
        "the address's 4 slots are free again"
    );
    drop(stalled);
}

/// Imports `count` users with a 1,000-byte note each: a user list of about a kilobyte per user.
fn import_users_with_notes(tg: &Tollgate, count: usize) {
    let note = "n".repeat(1000);
    let users: Vec<serde_json::Value> = (0..count)
        .map(|i| serde_json::json!({"token": format!("user-{i:05}"), "adminNote": note}))
        .collect();
    let (status, _) = tg.admin_call(
        reqwest::Method::PUT,
        "/admin/users",
        Some(serde_json::json!({ "users": users })),
    );
    assert_eq!(status, 200);
}

/// Asks for the whole user list on a new admin connection.
fn list_users(tg: &Tollgate) -> TcpStream {
    let mut conn = tg.admin_connection();
    write!(
        conn,
        "GET /admin/users HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {}\r\n\r\n",
        crate::support::tollgate::ADMIN_KEY
    )
    .unwrap();
    conn
}

/// The admin listener alike: a client that stops reading a full user list (here 16 MB) does
/// not hold the list and its connection for good.
#[test]
fn an_admin_client_that_stops_reading_its_answer_is_cut_after_the_send_timeout() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("clients:\n  send_timeout_seconds: 1\n")
        .start();
    import_users_with_notes(&tg, 16_000);
    let before = tg.open_fds();
    let conn = list_users(&tg);
    assert!(
        wait_until(Duration::from_secs(10), || tg.open_fds() > before),
        "the admin connection was accepted"
    );
    assert!(
        wait_until(Duration::from_secs(20), || tg.open_fds() <= before),
        "{} descriptors held by an admin client that stopped reading ({before} before)",
        tg.open_fds()
    );
    assert_eq!(metric(&tg, "tollgate_client_send_timeouts_total"), 1);
    let (status, _) = tg.admin_call(reqwest::Method::GET, "/admin/users/user-00001", None);
    assert_eq!(status, 200);
    drop(conn);
}

/// The send timeout bounds a wait without progress, not the answer: a client reading an 8 MB
/// user list slowly (64 KiB every 30 ms, through a 64 KiB receive buffer: seconds, far past the
/// 1 s timeout) gets all of it. Pingora's own write timeout, which times a whole write, cut it.
#[test]
fn a_client_reading_slowly_gets_its_whole_answer() {
    use std::os::fd::AsRawFd;
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("clients:\n  send_timeout_seconds: 1\n")
        .start();
    import_users_with_notes(&tg, 8_000);
    let conn = list_users(&tg);
    let size: libc::c_int = 64 * 1024;
    // SAFETY: setsockopt(2) on an open socket with a c_int option value.
    let set = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, conn);
    let mut length = None;
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let length = length.expect("a content-length");
    assert!(length > 8_000_000, "{length}");
    let mut received = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while received < length {
        std::thread::sleep(Duration::from_millis(30));
        let n = reader.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {received} of {length} bytes");
        received += n;
    }
    assert_eq!(metric(&tg, "tollgate_client_send_timeouts_total"), 0);
}
