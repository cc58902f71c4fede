//! Running tollgate: graceful shutdown, graceful upgrade with traffic flowing, daemon mode.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{client, wait_until, Origin, TollgateBuilder};

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_within_the_grace_period() {
    let origin = Origin::start();
    let mut tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("pingora:\n  threads: 2\n  grace_period_seconds: 3\n  graceful_shutdown_timeout_seconds: 1")
        .start();
    let url = tg.url("/slow");
    let slow = std::thread::spawn(move || {
        client()
            .get(url)
            .header("x-origin-delay-ms", "1000")
            .send()
            .map(|r| r.status().as_u16())
    });
    assert!(wait_until(Duration::from_secs(5), || origin.count() == 1));
    let started = Instant::now();
    tg.signal(libc::SIGTERM);
    assert_eq!(
        slow.join().unwrap().expect("in-flight request answered"),
        200
    );
    let status = tg
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the grace period");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "bounded by grace + shutdown timeout"
    );
}

#[test]
fn graceful_upgrade_applies_a_changed_config_with_no_failed_request() {
    let origin = Origin::start();
    let mut old = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("set_headers:\n  x-config-generation: \"1\"")
        .yaml("rate_limit:\n  requests_per_minute: 0")
        .start();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, retried) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, ok, failed, retried) = (
                old.url("/a"),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                retried.clone(),
            );
            std::thread::spawn(move || {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    // A keep-alive connection the old process closes while a request is on the
                    // wire fails without an answer; HTTP clients retry idempotent requests then
                    // (RFC 9112 §9.3.1), once, on a new connection. That is not a failed request.
                    let outcome = http.get(&url).send().or_else(|_| {
                        retried.fetch_add(1, Ordering::Relaxed);
                        http.get(&url).send()
                    });
                    match outcome {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => panic!("status {} during the upgrade", r.status()),
                        Err(e) => {
                            eprintln!("request failed after a retry: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || ok
        .load(Ordering::Relaxed)
        > 100));
    // The change to roll out: a new header value.
    let config = std::fs::read_to_string(&old.config).unwrap();
    std::fs::write(
        &old.config,
        config.replace("x-config-generation: \"1\"", "x-config-generation: \"2\""),
    )
    .unwrap();
    let mut new = old.spawn_upgrade();
    std::thread::sleep(Duration::from_millis(500)); // let it reach the socket hand-over
    old.signal(libc::SIGQUIT);
    new.wait_until_serving();
    let before_exit = ok.load(Ordering::Relaxed);
    assert!(
        old.wait_exit(Duration::from_secs(20)).is_some(),
        "old process exits"
    );
    assert!(wait_until(Duration::from_secs(5), || ok
        .load(Ordering::Relaxed)
        > before_exit + 200));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        origin.last().header("x-config-generation"),
        Some("2"),
        "the new config is live"
    );
    let (ok, retried) = (ok.load(Ordering::Relaxed), retried.load(Ordering::Relaxed));
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{ok} ok, {retried} retried"
    );
    eprintln!(
        "upgrade: {ok} requests answered, {retried} retried on a closed keep-alive connection"
    );
}

#[test]
fn daemon_mode_writes_a_pid_file_and_serves() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("tollgate.pid");
    let builder = TollgateBuilder::new(origin.addr).mode("none").yaml(&format!(
        "pingora:\n  threads: 1\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {}\n  error_log: {}",
        pid_file.display(),
        dir.path().join("error.log").display()
    ));
    let (status, output) = builder.run_to_exit(&["-d"], Duration::from_secs(20));
    assert!(status.success(), "the launcher exits 0: {output}");
    assert!(wait_until(Duration::from_secs(10), || pid_file.exists()));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling the daemon this test started.
    let alive = || unsafe { libc::kill(pid, 0) == 0 };
    assert!(alive());
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    assert!(
        wait_until(Duration::from_secs(10), || !alive()),
        "daemon stops on SIGTERM"
    );
}
