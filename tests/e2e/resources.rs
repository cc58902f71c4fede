//! Resource bounds under hostile or unlucky input: what a client can make tollgate hold stays
//! bounded, measured on the process (resident memory, descriptors) and its metrics.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::tollgate::Tollgate;
use crate::support::{wait_until, Origin, TollgateBuilder};

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
