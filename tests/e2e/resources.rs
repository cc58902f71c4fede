//! Resource bounds under hostile or unlucky input: what a client can make tollgate hold stays
//! bounded, measured on the process (resident memory, descriptors) and its metrics.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::tollgate::Tollgate;
use crate::support::{read_answer, wait_until, Origin, TollgateBuilder};

/// The largest resident memory seen while sampling for `window`.
fn peak_rss_kib(tg: &Tollgate, window: Duration) -> u64 {
    let end = Instant::now() + window;
    let mut peak = tg.rss_kib();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        peak = peak.max(tg.rss_kib());
    }
    peak
}

/// Clients that ask for large answers and read none of them cost tollgate a few buffers each,
/// not the answers: the upstream is read only as fast as the client takes the bytes.
#[test]
fn clients_that_do_not_read_large_answers_do_not_make_tollgate_hold_them() {
    const ANSWER: usize = 64 << 20;
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    let before = tg.rss_kib();
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut conn = tg.proxy_connection();
            write!(
                conn,
                "GET /big HTTP/1.1\r\nHost: tollgate\r\nx-origin-body-bytes: {ANSWER}\r\n\r\n"
            )
            .unwrap();
            conn
        })
        .collect();
    assert!(wait_until(Duration::from_secs(20), || origin.count() == 8));
    let grown_kib = peak_rss_kib(&tg, Duration::from_secs(3)).saturating_sub(before);
    // 8 answers held would be 512 MiB; one is the bound.
    assert!(
        grown_kib < (ANSWER as u64 >> 10),
        "{grown_kib} KiB more resident memory with 8 clients not reading 64 MiB answers"
    );
    drop(stalled);
}

/// Sends `count` GETs of `path` on one connection (answers of 2 bytes), each answer read
/// before the next request.
fn requests_on_one_connection(tg: &Tollgate, path: &str, count: usize) {
    let conn = tg.proxy_connection();
    conn.set_nodelay(true).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let mut reader = std::io::BufReader::new(conn);
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: tollgate\r\nx-origin-body-bytes: 2\r\n\r\n");
    for _ in 0..count {
        writer.write_all(request.as_bytes()).unwrap();
        let answer = read_answer(&mut reader);
        assert!(answer.status.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
}

/// Access log lines wait in a queue for the writer. With the output stuck (a pipe nobody
/// reads, a hung disk) the queue was bounded by its 65,536 lines only, and a client chooses
/// how long its lines are: a path may be 64 KiB, so gigabytes could wait. The queue holds a
/// bounded number of bytes; lines past it are dropped and counted.
#[test]
fn a_stuck_access_log_output_queues_a_bounded_amount_of_lines() {
    use std::os::unix::fs::OpenOptionsExt;
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("access.pipe");
    let c_path = std::ffi::CString::new(pipe.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Opened for reading (so that tollgate's open for writing does not wait) and never read.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&pipe)
        .unwrap();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .dir(dir)
        .yaml("access_log:\n  enabled: true\n  path: access.pipe\n")
        .yaml("rate_limit:\n  requests_per_minute: 0\n")
        .start();
    let before = tg.rss_kib();
    let path = format!("/{}", "p".repeat(60_000));
    // 120 MB of lines.
    requests_on_one_connection(&tg, &path, 2_000);
    let grown_kib = tg.rss_kib().saturating_sub(before);
    assert!(
        grown_kib < 64 << 10,
        "{grown_kib} KiB more resident memory after 120 MB of access log lines nobody took"
    );
    requests_on_one_connection(&tg, "/after", 1);
}

/// Every upstream failure is logged with its request's path, which a client chooses and may
/// make 64 KiB long: a line that size per request (a log shipper may drop or split it). The
/// path is cut to 512 bytes in the log.
#[test]
fn log_lines_about_a_request_do_not_carry_its_whole_long_path() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tg = TollgateBuilder::new(dead).mode("none").start();
    let path = format!("/{}", "p".repeat(60_000));
    let mut conn = tg.proxy_connection();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: tollgate\r\n\r\n").unwrap();
    let answer = read_answer(&mut std::io::BufReader::new(conn));
    assert!(answer.status.starts_with("HTTP/1.1 502"), "{answer:?}");
    assert!(
        wait_until(Duration::from_secs(5), || tg
            .log()
            .contains("upstream failure")),
        "{}",
        tg.log()
    );
    let longest = tg.log().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a log line of {longest} bytes");
}
