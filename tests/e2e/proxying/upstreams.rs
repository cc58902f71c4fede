//! The upstream side of proxying: the request target and `Host` an upstream gets, and a seeded
//! soak of upstreams that fail at random (refused connections, closes before answering, slow
//! answers, kept-alive connections closed between requests, 5xx, upstreams that die and come
//! back), checked against what configuration.md (`upstream`) and operations.md ("What passes
//! through") promise.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::support::soak::{env_u64, for_each_seed, Rng};
use crate::support::wire::{read_head, read_request_body, read_response_body};
use crate::support::{read_answer, wait_until, Origin, TollgateBuilder};

/// An absolute-form target (`GET http://host/p`, as a client configured with tollgate as its
/// HTTP proxy sends) names the same host as the `Host` the upstream gets, both ways of
/// `preserve_host`: an upstream takes the host of an absolute target over `Host` (RFC 9112,
/// 3.2.2), so the client's host left in it would defeat `preserve_host: false`.
#[test]
fn an_absolute_target_names_the_host_the_upstream_gets() {
    let origin = Origin::start();
    for (preserve, host) in [
        (false, origin.addr.to_string()),
        (true, "proxy.example.org".to_string()),
    ] {
        let tg = TollgateBuilder::new(origin.addr)
            .mode("none")
            .upstream_yaml(&format!("preserve_host: {preserve}"))
            .start();
        let mut conn = tg.proxy_connection();
        write!(
            conn,
            "GET http://proxy.example.org/a/b?x=1 HTTP/1.1\r\nHost: proxy.example.org\r\n\r\n"
        )
        .unwrap();
        let answer = read_answer(&mut std::io::BufReader::new(conn));
        assert!(answer.status.contains(" 200 "), "{}", answer.status);
        let seen = origin.last();
        assert_eq!(
            seen.uri,
            format!("http://{host}/a/b?x=1"),
            "preserve_host: {preserve}"
        );
        assert_eq!(seen.header("host"), Some(host.as_str()));
    }
}

/// How a [`Chaos`] origin treats the requests it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Answers `200`, keeps the connection.
    Up,
    /// Nothing listens: connections are refused.
    Down,
    /// Reads the request, then closes without answering.
    Hangup,
    /// Reads the request, then answers after the read timeout.
    Slow,
    /// Answers `503`, keeps the connection.
    Fails,
    /// Answers `200`, then closes the connection (without saying so).
    OneShot,
    /// Answers a connection's first request `200`; closes it when the next one arrives,
    /// unread: the upstream closed an idle kept-alive connection just as it was reused.
    Stale,
}

const MODES: [Mode; 7] = [
    Mode::Up,
    Mode::Down,
    Mode::Hangup,
    Mode::Slow,
    Mode::Fails,
    Mode::OneShot,
    Mode::Stale,
];

/// What a [`Chaos`] origin read of one request.
#[derive(Clone, Debug)]
struct Received {
    tag: String,
    method: String,
    body: Vec<u8>,
    host: String,
}

type Conns = Arc<Mutex<Vec<(TcpStream, Arc<AtomicBool>)>>>;

/// An origin on loopback whose behaviour the test switches between requests ([`Mode`]); it
/// counts the connections it accepted, records each request it read by its `x-tag`, and can
/// close its idle kept-alive connections (the stale pooled connection case).
struct Chaos {
    id: usize,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    accepted: Arc<AtomicUsize>,
    /// Each open connection, and whether it waits for its next request.
    conns: Conns,
    received: Arc<Mutex<Vec<Received>>>,
    /// Set to stop the current accept loop (the origin dies).
    stop: Arc<AtomicBool>,
}

/// The read timeout the soak gives tollgate; a [`Mode::Slow`] origin answers after twice that.
const READ_TIMEOUT: Duration = Duration::from_millis(300);

impl Chaos {
    fn start(id: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut chaos = Chaos {
            id,
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(Mode::Up as u8)),
            accepted: Arc::default(),
            conns: Arc::default(),
            received: Arc::default(),
            stop: Arc::default(),
        };
        chaos.serve(listener);
        chaos
    }

    fn mode(&self) -> Mode {
        MODES[self.mode.load(Ordering::SeqCst) as usize]
    }

    /// Switches to `mode`: into [`Mode::Down`] the listener and every connection close; out
    /// of it the same address listens again.
    fn set(&mut self, mode: Mode) {
        let was = self.mode();
        self.mode.store(mode as u8, Ordering::SeqCst);
        if was != Mode::Down && mode == Mode::Down {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so that it sees the flag and drops the listener; wait
            // until it did, so that the next connection is refused.
            let _ = TcpStream::connect(self.addr);
            assert!(wait_until(Duration::from_secs(5), || {
                TcpStream::connect(self.addr).is_err()
            }));
            self.close_connections(false);
        } else if was == Mode::Down && mode != Mode::Down {
            let listener = TcpListener::bind(self.addr).expect("the origin's address again");
            self.stop = Arc::default();
            self.serve(listener);
        }
    }

    /// Closes the connections waiting for a request (`idle_only`), or all of them.
    fn close_connections(&self, idle_only: bool) {
        for (stream, idle) in self.conns.lock().unwrap().iter() {
            if !idle_only || idle.load(Ordering::SeqCst) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Connections accepted so far, and those still open.
    fn connections(&self) -> (usize, usize) {
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|(stream, _)| {
            // An open connection has no error and no pending EOF the peer could have sent;
            // `peek` without blocking tells.
            stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let open = match stream.peek(&mut byte) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            };
            let _ = stream.set_nonblocking(false);
            open
        });
        (self.accepted.load(Ordering::SeqCst), conns.len())
    }

    fn received(&self, tag: &str) -> Vec<Received> {
        let all = self.received.lock().unwrap();
        all.iter().filter(|r| r.tag == tag).cloned().collect()
    }

    fn serve(&mut self, listener: TcpListener) {
        let (id, mode, accepted, conns, received, stop) = (
            self.id,
            Arc::clone(&self.mode),
            Arc::clone(&self.accepted),
            Arc::clone(&self.conns),
            Arc::clone(&self.received),
            Arc::clone(&self.stop),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let idle = Arc::new(AtomicBool::new(true));
                conns
                    .lock()
                    .unwrap()
                    .push((stream.try_clone().unwrap(), Arc::clone(&idle)));
                let (mode, received) = (Arc::clone(&mode), Arc::clone(&received));
                std::thread::spawn(move || {
                    let closer = stream.try_clone().unwrap();
                    serve_chaos(id, stream, &mode, &idle, &received);
                    // The clone kept in `conns` would hold the connection open.
                    let _ = closer.shutdown(std::net::Shutdown::Both);
                });
            }
        });
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        self.close_connections(false);
    }
}

fn serve_chaos(
    id: usize,
    stream: TcpStream,
    mode: &AtomicU8,
    idle: &AtomicBool,
    received: &Mutex<Vec<Received>>,
) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for reused in 0.. {
        idle.store(true, Ordering::SeqCst);
        let Ok(Some(head)) = read_head(&mut reader) else {
            return;
        };
        idle.store(false, Ordering::SeqCst);
        if reused > 0 && MODES[mode.load(Ordering::SeqCst) as usize] == Mode::Stale {
            return;
        }
        let body = read_request_body(&mut reader, &head);
        if body.truncated {
            return;
        }
        let text =
            |name: &str| String::from_utf8_lossy(head.get(name).unwrap_or_default()).into_owned();
        let method =
            String::from_utf8_lossy(head.line.split(|&b| b == b' ').next().unwrap()).into_owned();
        let tag = text("x-tag");
        received.lock().unwrap().push(Received {
            tag: tag.clone(),
            method: method.clone(),
            body: body.bytes,
            host: text("host"),
        });
        let mode = MODES[mode.load(Ordering::SeqCst) as usize];
        let status = match mode {
            Mode::Hangup | Mode::Down => return,
            Mode::Slow => {
                std::thread::sleep(READ_TIMEOUT * 2);
                200
            }
            Mode::Fails => 503,
            Mode::Up | Mode::OneShot | Mode::Stale => 200,
        };
        let payload = format!("{tag}/{id}");
        let mut answer = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nx-tag: {tag}\r\nx-origin: {id}\r\n\r\n",
            payload.len()
        );
        if method != "HEAD" {
            answer.push_str(&payload);
        }
        if writer.write_all(answer.as_bytes()).is_err() || mode == Mode::OneShot {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// One request of the soak and what came of it.
struct Sent {
    tag: String,
    method: &'static str,
    body: Vec<u8>,
}

/// A client on one kept-alive raw connection, opened again after tollgate closed it.
struct Client<'a> {
    tg: &'a crate::support::tollgate::Tollgate,
    conn: Option<(TcpStream, BufReader<TcpStream>)>,
}

impl Client<'_> {
    /// Sends `sent` and returns the answer's head and body.
    fn send(&mut self, sent: &Sent, host: &str) -> (crate::support::wire::Head, Vec<u8>) {
        let (mut writer, mut reader) = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let conn = self.tg.proxy_connection();
                (conn.try_clone().unwrap(), BufReader::new(conn))
            }
        };
        let mut request = format!(
            "{} /soak HTTP/1.1\r\nHost: {host}\r\nx-tag: {}\r\n",
            sent.method, sent.tag
        )
        .into_bytes();
        if sent.method != "GET" && sent.method != "HEAD" {
            request.extend(format!("Content-Length: {}\r\n", sent.body.len()).bytes());
        }
        request.extend(b"\r\n");
        request.extend(&sent.body);
        writer.write_all(&request).unwrap();
        let head = read_head(&mut reader)
            .unwrap()
            .unwrap_or_else(|| panic!("{}: no answer", sent.tag));
        let body = read_response_body(&mut reader, &head, sent.method);
        assert!(!body.truncated, "{}: a cut answer {head:?}", sent.tag);
        let closes = head
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        if !closes {
            self.conn = Some((writer, reader));
        }
        (head, body.bytes)
    }
}

/// Upstreams that fail at random, checked against the documented promises: a connection
/// failure (refused) moves on to the next upstream, and an idempotent request whose kept-alive
/// connection the upstream closed is sent again, so while every upstream is up or down (one
/// up) an idempotent request gets `200`; a `POST` or `PATCH` reaches at most one upstream,
/// once (a `PUT` is idempotent: sent on a kept-alive connection the upstream closed without
/// answering, it is sent again); an upstream that closes without answering gives `502` and one that is
/// slow `504`, as JSON; an upstream's `5xx` is passed on; every answer is the one to its own
/// request (tagged); `Host` is the upstream's own (or the client's with `preserve_host`);
/// a recovered upstream is used again; upstream connections are reused and not leaked.
/// `TOLLGATE_SOAK_SEED`/`TOLLGATE_SOAK_ITERATIONS` replay or lengthen it,
/// `TOLLGATE_SOAK_EXCHANGES` sets the rounds per seed.
#[test]
fn upstreams_failing_at_random_keep_the_documented_promises() {
    for_each_seed(0x5eed_0f0a, |seed| {
        let mut rng = Rng::new(seed);
        let mut origins: Vec<Chaos> = (0..2 + rng.below(2)).map(Chaos::start).collect();
        let preserve_host = rng.chance(30);
        let addrs: Vec<String> = origins.iter().map(|o| o.addr.to_string()).collect();
        let tg = TollgateBuilder::new(origins[0].addr)
            .mode("none")
            .yaml("rate_limit:\n  requests_per_minute: 0\n")
            .upstreams(&addrs)
            .upstream_yaml(&format!("read_timeout_ms: {}", READ_TIMEOUT.as_millis()))
            .upstream_yaml(&format!("preserve_host: {preserve_host}"))
            .start();
        let mut client = Client {
            tg: &tg,
            conn: None,
        };
        let rounds = env_u64("TOLLGATE_SOAK_EXCHANGES").unwrap_or(25);
        let mut n = 0;
        for round in 0..rounds {
            for origin in origins.iter_mut() {
                let mode = match rng.below(100) {
                    0..=44 => Mode::Up,
                    45..=64 => Mode::Down,
                    65..=74 => Mode::Hangup,
                    75..=77 => Mode::Slow,
                    78..=85 => Mode::Fails,
                    86..=92 => Mode::OneShot,
                    _ => Mode::Stale,
                };
                origin.set(mode);
            }
            let modes: Vec<Mode> = origins.iter().map(Chaos::mode).collect();
            for _ in 0..1 + rng.below(5) {
                for origin in &origins {
                    if rng.chance(25) {
                        origin.close_connections(true);
                    }
                }
                n += 1;
                let method = ["GET", "HEAD", "POST", "PUT", "PATCH"][rng.below(5)];
                let body = if ["POST", "PUT", "PATCH"].contains(&method) {
                    (0..rng.below(3000))
                        .map(|i| b'a' + ((i + n) % 26) as u8)
                        .collect()
                } else {
                    Vec::new()
                };
                let sent = Sent {
                    tag: format!("{seed}-{n}"),
                    method,
                    body,
                };
                let (head, body) = client.send(&sent, "client.example");
                let context = format!(
                    "seed {seed} round {round} {} {} modes {modes:?}",
                    sent.method, sent.tag
                );
                check(&origins, &sent, &head, &body, preserve_host, &context);
            }
        }
        // Clients at once on the shared pool: every answer is still its own request's.
        for origin in origins.iter_mut() {
            let modes = [Mode::Up, Mode::Up, Mode::Stale, Mode::OneShot, Mode::Fails];
            origin.set(modes[rng.below(modes.len())]);
        }
        let modes: Vec<Mode> = origins.iter().map(Chaos::mode).collect();
        std::thread::scope(|scope| {
            for worker in 0..3 {
                let (origins, tg, modes) = (&origins, &tg, &modes);
                let mut rng = Rng::new(seed ^ (worker + 1));
                scope.spawn(move || {
                    let mut client = Client { tg, conn: None };
                    for i in 0..15 {
                        let method = ["GET", "HEAD", "POST", "PUT"][rng.below(4)];
                        let sent = Sent {
                            tag: format!("{seed}-w{worker}-{i}"),
                            method,
                            body: match method {
                                "GET" | "HEAD" => Vec::new(),
                                _ => vec![b'a' + (i % 26) as u8; rng.below(2000)],
                            },
                        };
                        let (head, body) = client.send(&sent, "client.example");
                        let context =
                            format!("seed {seed} at once {method} {} modes {modes:?}", sent.tag);
                        check(origins, &sent, &head, &body, preserve_host, &context);
                    }
                });
            }
        });
        // Every upstream up again: each is used again, over reused connections.
        for origin in origins.iter_mut() {
            origin.set(Mode::Up);
        }
        let before: Vec<(usize, usize)> = origins.iter().map(Chaos::connections).collect();
        let requests = 12 * origins.len();
        for i in 0..requests {
            let sent = Sent {
                tag: format!("{seed}-after-{i}"),
                method: "GET",
                body: Vec::new(),
            };
            let (head, _) = client.send(&sent, "client.example");
            assert_eq!(head.status(), 200, "seed {seed}: {head:?}");
        }
        let after: Vec<(usize, usize)> = origins.iter().map(Chaos::connections).collect();
        for (origin, (before, after)) in origins.iter().zip(before.iter().zip(&after)) {
            let got = origin
                .received
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.tag.starts_with(&format!("{seed}-after-")))
                .count();
            assert!(
                got > 0,
                "seed {seed}: upstream {} not used again: {after:?}",
                origin.id
            );
            assert!(
                after.0 - before.0 < got,
                "seed {seed}: upstream {} took {got} requests on {} new connections",
                origin.id,
                after.0 - before.0
            );
            assert!(
                after.1 <= 4,
                "seed {seed}: upstream {} holds {} connections",
                origin.id,
                after.1
            );
        }
    });
}

/// The checks of one answer against what the origins received (see the soak above).
fn check(
    origins: &[Chaos],
    sent: &Sent,
    head: &crate::support::wire::Head,
    body: &[u8],
    preserve_host: bool,
    context: &str,
) {
    let received: Vec<(usize, Received)> = origins
        .iter()
        .flat_map(|o| o.received(&sent.tag).into_iter().map(|r| (o.id, r)))
        .collect();
    for (id, r) in &received {
        assert_eq!(r.method, sent.method, "{context}");
        assert!(
            r.body == sent.body,
            "{context}: upstream {id} got another body"
        );
        let host = if preserve_host {
            "client.example".to_string()
        } else {
            origins[*id].addr.to_string()
        };
        assert_eq!(r.host, host, "{context}: upstream {id}");
    }
    if sent.method == "POST" || sent.method == "PATCH" {
        assert!(
            received.len() <= 1,
            "{context}: sent {} times: {received:?}",
            received.len()
        );
    }
    let status = head.status();
    let mode_of = |id: usize| origins[id].mode();
    let text =
        |name: &str| String::from_utf8_lossy(head.get(name).unwrap_or_default()).into_owned();
    let only_up_or_down = origins
        .iter()
        .all(|o| matches!(o.mode(), Mode::Up | Mode::Down))
        && origins.iter().any(|o| o.mode() == Mode::Up);
    match status {
        200 | 503 => {
            assert_eq!(
                text("x-tag"),
                sent.tag,
                "{context}: another request's answer"
            );
            let id: usize = text("x-origin").parse().unwrap();
            let expected: &[Mode] = if status == 200 {
                &[Mode::Up, Mode::OneShot, Mode::Stale]
            } else {
                &[Mode::Fails]
            };
            assert!(
                expected.contains(&mode_of(id)),
                "{context}: {status} from upstream {id}"
            );
            assert!(
                received.iter().any(|(r, _)| *r == id),
                "{context}: upstream {id} answered unseen"
            );
            if sent.method != "HEAD" {
                assert_eq!(body, format!("{}/{id}", sent.tag).as_bytes(), "{context}");
            }
        }
        502 | 504 => {
            if sent.method != "HEAD" {
                let json: Value = serde_json::from_slice(body).unwrap();
                let kind = if status == 502 {
                    "upstream_error"
                } else {
                    "upstream_timeout"
                };
                assert_eq!(crate::support::error_type(&json), kind, "{context}");
            }
            let failing = if status == 502 {
                Mode::Hangup
            } else {
                Mode::Slow
            };
            let by_failing = received.iter().any(|(id, _)| mode_of(*id) == failing);
            if status == 504 {
                assert!(by_failing, "{context}: 504 without a slow upstream");
            } else if !by_failing {
                assert!(
                    received.is_empty(),
                    "{context}: 502 though received: {received:?}"
                );
            }
            if only_up_or_down && !["POST", "PATCH"].contains(&sent.method) {
                panic!("{context}: {status} though an upstream is up and the request idempotent");
            }
        }
        _ => panic!("{context}: unexpected {head:?}"),
    }
}

/// An idempotent request sent on a kept-alive connection the upstream closed as it arrived is
/// sent again on a new connection (operations.md), even when the next upstream in the rotation
/// is down: the stale connection is no failed try of its upstream (as nginx gives a cached
/// connection's failure an extra try). It got a 502 when the retry went to a refused upstream
/// and the closed connection had used up the healthy upstream's one try.
#[test]
fn a_stale_pooled_connection_is_no_failed_try_of_its_upstream() {
    let (mut stale, mut other) = (Chaos::start(0), Chaos::start(1));
    stale.set(Mode::Stale);
    let addrs = [stale.addr.to_string(), other.addr.to_string()];
    let tg = TollgateBuilder::new(stale.addr)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 0\n")
        .upstreams(&addrs)
        .start();
    let mut client = Client {
        tg: &tg,
        conn: None,
    };
    let mut get = |tag: String| {
        let sent = Sent {
            tag,
            method: "GET",
            body: Vec::new(),
        };
        client.send(&sent, "client.example").0.status()
    };
    // The stale upstream keeps a connection of its own in the pool.
    for i in 0..4 {
        assert_eq!(get(format!("warm-{i}")), 200);
    }
    other.set(Mode::Down);
    let statuses: Vec<u16> = (0..8).map(|i| get(format!("down-{i}"))).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    drop(stale);
}

/// An HTTP/1.0 client may send no `Host`; the upstream still gets one (its own), as HTTP/1.1,
/// which tollgate speaks to it, requires, with `preserve_host` too.
#[test]
fn a_request_without_host_reaches_the_upstream_with_its_own() {
    let origin = Origin::start();
    for preserve in [false, true] {
        let tg = TollgateBuilder::new(origin.addr)
            .mode("none")
            .upstream_yaml(&format!("preserve_host: {preserve}"))
            .start();
        let mut conn = tg.proxy_connection();
        write!(conn, "GET /no-host HTTP/1.0\r\n\r\n").unwrap();
        let answer = read_answer(&mut std::io::BufReader::new(conn));
        assert!(answer.status.contains(" 200 "), "{}", answer.status);
        let host = origin.last().header("host").map(str::to_string);
        assert_eq!(
            host,
            Some(origin.addr.to_string()),
            "preserve_host: {preserve}"
        );
    }
}
