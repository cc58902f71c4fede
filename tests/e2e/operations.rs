//! Running tollgate: graceful shutdown, graceful upgrade with traffic flowing, daemon mode.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::tollgate::Tollgate;
use crate::support::{client, free_ports, wait_until, Origin, TollgateBuilder};

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

/// Client threads sending requests through `tg` until stopped, counting the outcomes.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    retried: Arc<AtomicUsize>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(tg: &Tollgate) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, retried) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let clients = (0..4)
            .map(|_| {
                let (url, stop, ok, failed, retried) = (
                    tg.url("/a"),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    retried.clone(),
                );
                std::thread::spawn(move || {
                    let http = client();
                    while !stop.load(Ordering::Relaxed) {
                        // A keep-alive connection the old process closes while a request is on
                        // the wire fails without an answer; HTTP clients retry idempotent
                        // requests then (RFC 9112 §9.3.1), once, on a new connection. That is
                        // not a failed request.
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
        let traffic = Self {
            stop,
            ok,
            failed,
            retried,
            clients,
        };
        traffic.wait_for_more(100);
        traffic
    }

    /// Waits until `more` requests more have been answered. The bound only catches a process
    /// that stopped answering (a failed request is counted, and `stop_and_check` fails on it):
    /// it is no rate. 5 s for 200 was one, and a loaded machine running the debug build fell
    /// short of it with nothing failing.
    fn wait_for_more(&self, more: usize) {
        let from = self.ok.load(Ordering::Relaxed);
        let answered = || self.ok.load(Ordering::Relaxed) >= from + more;
        wait_until(Duration::from_secs(60), || {
            answered() || self.failed.load(Ordering::Relaxed) > 0
        });
        assert!(
            answered(),
            "requests keep being answered: {} more of {more}, {} failed",
            self.ok.load(Ordering::Relaxed) - from,
            self.failed.load(Ordering::Relaxed)
        );
    }

    /// Stops the clients; asserts that no request failed.
    fn stop_and_check(self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.join().unwrap();
        }
        let (ok, retried) = (
            self.ok.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
        );
        assert_eq!(
            self.failed.load(Ordering::Relaxed),
            0,
            "{ok} ok, {retried} retried"
        );
        eprintln!(
            "upgrade: {ok} requests answered, {retried} retried on a closed keep-alive connection"
        );
    }
}

/// A tollgate whose upstream header `x-config-generation` shows which configuration is live.
fn generation_one(origin: &Origin) -> Tollgate {
    TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("set_headers:\n  x-config-generation: \"1\"")
        .yaml("rate_limit:\n  requests_per_minute: 0")
        .start()
}

/// Rewrites `tg`'s configuration with `x-config-generation: "2"`.
fn roll_out_generation_two(tg: &Tollgate) {
    let config = std::fs::read_to_string(&tg.config).unwrap();
    std::fs::write(
        &tg.config,
        config.replace("x-config-generation: \"1\"", "x-config-generation: \"2\""),
    )
    .unwrap();
}

/// Upgrades `old` under traffic, `hand_over` starting the new process (and signalling the old
/// one if it does not); checks that no request failed and the new configuration is live.
fn upgrade_under_traffic(hand_over: impl FnOnce(&Tollgate) -> Tollgate) {
    let origin = Origin::start();
    let mut old = generation_one(&origin);
    let traffic = Traffic::start(&old);
    roll_out_generation_two(&old);
    let mut new = hand_over(&old);
    new.wait_until_serving();
    assert!(
        old.wait_exit(Duration::from_secs(20)).is_some(),
        "old process exits"
    );
    traffic.wait_for_more(200);
    traffic.stop_and_check();
    assert_eq!(
        origin.last().header("x-config-generation"),
        Some("2"),
        "the new config is live"
    );
}

#[test]
fn graceful_upgrade_applies_a_changed_config_with_no_failed_request() {
    upgrade_under_traffic(|old| {
        let new = old.spawn_upgrade();
        std::thread::sleep(Duration::from_millis(500)); // let it reach the socket hand-over
        old.signal(libc::SIGQUIT);
        new
    });
}

#[test]
fn upgrade_from_signals_the_old_process_once_the_new_one_is_ready() {
    // What `systemctl reload` runs: no SIGQUIT from outside.
    upgrade_under_traffic(|old| {
        old.spawn_upgrade_with(&["--upgrade-from", &old.pid().to_string()])
    });
}

#[test]
fn an_upgrade_that_cannot_start_leaves_the_old_process_serving() {
    let origin = Origin::start();
    let mut old = generation_one(&origin);
    let traffic = Traffic::start(&old);
    // The new configuration is valid, but its store cannot be opened: the new process fails
    // while loading users, before the hand-over.
    let garbage = old.config.with_file_name("not-a-database.db");
    std::fs::write(&garbage, b"this is not an SQLite file, just text").unwrap();
    let config = std::fs::read_to_string(&old.config).unwrap();
    std::fs::write(
        &old.config,
        format!(
            "{config}\nstore:\n  kind: sqlite\n  sqlite:\n    path: {}\n",
            garbage.display()
        ),
    )
    .unwrap();
    let mut new = old.spawn_upgrade_with(&["--upgrade-from", &old.pid().to_string()]);
    let status = new
        .wait_exit(Duration::from_secs(20))
        .expect("the new process gives up");
    assert!(!status.success(), "{status}");
    assert!(
        new.log().contains("not an SQLite database"),
        "{}",
        new.log()
    );
    // The old process was never asked to hand over: it is still there, serving.
    traffic.wait_for_more(200);
    assert!(
        old.wait_exit(Duration::from_secs(1)).is_none(),
        "old still running"
    );
    traffic.stop_and_check();
    assert_eq!(origin.last().header("x-config-generation"), Some("1"));
}

/// Daemons this test started, stopped however the test ends: those it saw, and the one the
/// pid file names (a launcher that timed out or failed its checks never told the test its
/// daemon's pid).
struct Daemons {
    pid_file: std::path::PathBuf,
    seen: Vec<i32>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        let named = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .filter(|&pid| pid > 0);
        for pid in self.seen.iter().copied().chain(named) {
            // SAFETY: signalling a daemon this test started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn a_process_handing_over_refuses_admin_writes_and_still_answers_reads() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    // A client's keep-alive connection, opened before the hand-over.
    let mut conn = tg.proxy_connection();
    let mut exchange = || {
        use std::io::{Read, Write};
        conn.write_all(b"GET /a HTTP/1.1\r\nHost: tollgate\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(conn.read(&mut byte).unwrap(), 1, "closed before an answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a length")
            .trim()
            .parse()
            .unwrap();
        conn.read_exact(&mut vec![0; length]).unwrap();
        head
    };
    assert!(exchange().contains("connection: keep-alive"));
    // No new process takes the listeners: Pingora keeps trying for a few seconds, then
    // waits 5 s more with its listeners open, as during a real hand-over.
    tg.signal(libc::SIGQUIT);
    let mut answer = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let response = tg
                .admin_request(reqwest::Method::POST, "/admin/users")
                .json(&serde_json::json!({}))
                .send()
                .unwrap();
            let refused = response.status() == 503;
            answer = Some(response);
            refused
        }),
        "{}",
        tg.log()
    );
    let answer = answer.unwrap();
    assert_eq!(answer.headers()["retry-after"], "1");
    assert_eq!(answer.headers()["connection"], "close");
    let body: serde_json::Value = answer.json().unwrap();
    assert_eq!(body["error"]["type"], "shutting_down", "{body}");
    let list = tg
        .admin_request(reqwest::Method::GET, "/admin/users")
        .send()
        .unwrap();
    assert_eq!(list.status(), 200);
    // Proxying goes on, and the client is told to take its next request elsewhere rather
    // than find its connection closed under it when the hand-over ends.
    let head = exchange();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn daemon_mode_returns_once_serving_and_a_reload_moves_the_pid_file_to_the_successor() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("tollgate.pid");
    let [proxy_port, admin_port] = free_ports();
    let pingora = format!(
        "pingora:\n  threads: 1\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {}\n  error_log: {}\n  upgrade_sock: {}",
        pid_file.display(),
        dir.path().join("error.log").display(),
        dir.path().join("upgrade.sock").display(),
    );
    // What systemd runs: `ExecStart` (-d), then `ExecReload` (-u -d --upgrade-from $MAINPID).
    let run_with = |yaml: &str, args: &[&str]| {
        let (status, output) = TollgateBuilder::new(origin.addr)
            .mode("none")
            .ports(proxy_port, admin_port)
            .yaml(yaml)
            .run_to_exit(args, Duration::from_secs(30));
        assert!(status.success(), "{args:?}: the launcher exits 0: {output}");
        // It waited for its daemon's word, rather than racing it.
        assert!(
            output.contains("tollgate -d: the daemon signaled readiness, launcher exiting"),
            "{output}"
        );
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("the pid file is written when the launcher returns")
            .trim()
            .parse()
            .unwrap();
        pid
    };
    let run = |args: &[&str]| run_with(&pingora, args);
    let serves = || {
        let http = client();
        let health = http
            .get(format!("http://127.0.0.1:{admin_port}/health"))
            .send();
        let proxied = http.get(format!("http://127.0.0.1:{proxy_port}/a")).send();
        matches!((health, proxied), (Ok(h), Ok(p)) if h.status() == 200 && p.status() == 200)
    };
    let mut daemons = Daemons {
        pid_file: pid_file.clone(),
        seen: Vec::new(),
    };

    let first = run(&["-d"]);
    daemons.seen.push(first);
    assert!(alive(first));
    assert!(serves(), "serving as soon as `tollgate -d` returns");

    // A reload onto an error log the daemon cannot open is refused before the running process
    // is asked for its sockets (Pingora would panic after the fork, leaving nobody serving),
    // and `-t -d` (the unit's check) says so first.
    let unwritable = pingora.replace(
        &dir.path().join("error.log").display().to_string(),
        "/nonexistent-dir/error.log",
    );
    for args in [
        &["-t", "-d"][..],
        &["-u", "-d", "--upgrade-from", &first.to_string()],
    ] {
        let (status, output) = TollgateBuilder::new(origin.addr)
            .mode("none")
            .ports(proxy_port, admin_port)
            .yaml(&unwritable)
            .run_to_exit(args, Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert!(
            output.contains("pingora.error_log: /nonexistent-dir/error.log: its directory"),
            "{args:?}: {output}"
        );
    }
    assert!(alive(first), "the running daemon was not asked to leave");
    assert!(serves());

    let second = run(&["-u", "-d", "--upgrade-from", &first.to_string()]);
    daemons.seen.push(second);
    assert_ne!(second, first, "the pid file names the successor");
    assert!(alive(second));
    assert!(
        serves(),
        "the successor serves as soon as the reload returns"
    );
    assert!(
        wait_until(Duration::from_secs(20), || !alive(first)),
        "the old daemon exits after the hand-over"
    );
    assert!(serves());
    // SAFETY: signalling the daemon this test started.
    unsafe {
        libc::kill(second, libc::SIGTERM);
    }
    assert!(
        wait_until(Duration::from_secs(10), || !alive(second)),
        "daemon stops on SIGTERM"
    );

    // `pingora.daemon: true` without `-d` is the same: the launcher waits for readiness.
    let third = run_with(&format!("{pingora}\n  daemon: true"), &[]);
    daemons.seen.push(third);
    assert!(serves(), "serving as soon as the launcher returns");
}

/// A relative `pingora.pid_file` is checked where the daemon creates it: after changing to
/// `pingora.working_directory` (by default `/`), not in the directory tollgate starts in.
/// Here `piddir/` exists where tollgate starts and not under `/`.
#[test]
fn a_relative_pid_file_is_checked_where_the_daemon_writes_it() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let sub = "tollgate-e2e-piddir";
    assert!(!std::path::Path::new("/").join(sub).exists());
    std::fs::create_dir(dir.path().join(sub)).unwrap();
    let pingora = format!(
        "pingora:\n  threads: 1\n  pid_file: {sub}/tollgate.pid\n  error_log: {}\n  upgrade_sock: {}\n  daemon_ready_timeout_seconds: 5",
        dir.path().join("error.log").display(),
        dir.path().join("upgrade.sock").display(),
    );
    let (status, output) = TollgateBuilder::new(origin.addr)
        .mode("none")
        .dir(dir)
        .yaml(&pingora)
        .run_to_exit(&["-t", "-d"], Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains(&format!("(the daemon writes it at /{sub}/tollgate.pid)")),
        "{output}"
    );
}

/// The store gauges an operator alerts on tell a store that does not take writes (another
/// program holds the SQLite file's write lock) and its recovery once it does again.
#[test]
fn store_gauges_show_writes_failing_and_catching_up() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("store:\n  kind: sqlite\n  flush_interval_seconds: 1\n  sqlite:\n    path: data/tollgate.db\n")
        .admin_yaml("persist_timeout_ms: 500")
        .start();
    let gauge = |name: &str| {
        let scrape = tg.metrics();
        crate::support::metric_sample(&scrape, &format!("{name}{{store=\"sqlite\"}}"))
            .unwrap_or_else(|| panic!("no {name} in:\n{scrape}"))
    };
    tg.create_user(serde_json::json!({}));
    assert!(
        wait_until(Duration::from_secs(10), || gauge(
            "tollgate_store_last_flush_timestamp_seconds"
        ) > 0.0),
        "a write confirmed"
    );
    let lock = rusqlite::Connection::open(tg.dir.path().join("data/tollgate.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let token = tg.create_user(serde_json::json!({}));
    assert!(
        wait_until(Duration::from_secs(30), || gauge(
            "tollgate_store_flush_failures_total"
        ) >= 1.0),
        "the failed write counted"
    );
    assert_eq!(
        gauge("tollgate_store_pending_changes"),
        1.0,
        "{token} waits"
    );
    assert_eq!(
        gauge("tollgate_ready"),
        1.0,
        "a slow store does not take it out"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    assert!(
        wait_until(Duration::from_secs(30), || gauge(
            "tollgate_store_pending_changes"
        ) == 0.0),
        "the queued change written once the lock is gone"
    );
}
