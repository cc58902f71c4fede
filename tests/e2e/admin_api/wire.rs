//! A seeded raw-socket soak of the admin listener's HTTP layer and the authentication in front
//! of the API (the JSON semantics are `model.rs`'s): random sequences of requests on kept-alive
//! connections from several loopback addresses, some pipelined, as curl, Python `requests`,
//! Node `fetch` and hand-written scripts send them: other spellings of methods and paths,
//! absolute-form and `*` targets, percent-encoded tokens, queries, `Content-Length` and chunked
//! bodies (with extensions and trailers), bodies on `GET` and `DELETE`, `Expect: 100-continue`,
//! content types with and without a charset, bodies over `admin.max_body_bytes`, HTTP/1.0 with
//! and without keep-alive, `Connection: close`, half-closed sockets, and the admin key sent
//! right, wrong, in another scheme or not at all. Each request must get exactly one well-framed
//! answer, in order, with the status, error `type` and headers docs/admin-api.md promises
//! (`WWW-Authenticate` on 401, `Allow` on 405, `Retry-After` on 429); the connection must stay
//! open or close as the answer announces; failures lock an address out as documented; and
//! neither the admin key nor a user's token may appear in the log. Requests Pingora refuses
//! while reading their header (two `Host` headers, differing `Content-Length`s, a line without
//! a colon, an absolute URL for another host) must get a 400 and the end.
//!
//! The suite runs one seed. To soak:
//! `TOLLGATE_SOAK_SEED=<n> TOLLGATE_SOAK_ITERATIONS=<k> cargo nextest run --test e2e admin_api::wire`
//! (`TOLLGATE_SOAK_STEPS` sets the exchanges per seed, 400 by default).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{IpAddr, Shutdown, TcpStream};

use serde_json::Value;

use super::*;
use crate::support::soak::{env_u64, for_each_seed, Rng};
use crate::support::sockets::connect_from;
use crate::support::wire::{chunked, read_head, read_response_body, show, Head};

const DEFAULT_SEED: u64 = 0x3a1e_2026;
const DEFAULT_STEPS: u64 = 400;
const MAX_BODY: usize = 2048;
const LOCKOUT_AFTER: u32 = 5;
/// The client addresses (127.0.0.2 …): each has its own failure count.
const CLIENTS: u8 = 8;
/// The client that never has the key.
const GUESSER: u8 = CLIENTS - 1;

/// What one request must get.
#[derive(Clone, Debug)]
struct Expect {
    status: u16,
    /// The error `type` of an error answer.
    kind: Option<&'static str>,
    /// The connection ends after this answer (`Connection: close` announced).
    closes: bool,
    /// The answer may close the connection, if it says so (a body left unread).
    may_close: bool,
    /// The answer must not carry a body (HEAD).
    head: bool,
    /// A `100 Continue` comes first.
    interim: bool,
}

impl Expect {
    fn status(status: u16, kind: Option<&'static str>) -> Self {
        Expect {
            status,
            kind,
            closes: false,
            may_close: false,
            head: false,
            interim: false,
        }
    }
}

/// One request's bytes and what it must get, and what it does to the model if it succeeds.
struct Request {
    bytes: Vec<u8>,
    expect: Expect,
    /// Shut down our sending side after it (the answer must still come, then the end).
    half_close: bool,
    /// Sent alone: the body follows the `100 Continue`.
    body_after_continue: Option<Vec<u8>>,
    /// A user this request creates or changes when it succeeds (its token).
    creates: Option<String>,
    /// Whether the request presented the right key in a way the API reads (for the lockout).
    auth: Auth,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    /// Not an `/admin/users` request, or refused before authentication (404, 405).
    NotChecked,
    Good,
    Bad,
}

/// The lockout as documented: failures per address, the `LOCKOUT_AFTER`th locks it (for
/// longer than the run), the right key forgets them while not locked.
#[derive(Default)]
struct Lockout {
    failures: BTreeMap<u8, u32>,
}

impl Lockout {
    fn locked(&self, client: u8) -> bool {
        self.failures.get(&client).copied().unwrap_or(0) >= LOCKOUT_AFTER
    }
    /// The status an authenticated request from `client` gets, and records it.
    fn decide(&mut self, client: u8, auth: Auth) -> Option<Expect> {
        if auth == Auth::NotChecked {
            return None;
        }
        if self.locked(client) {
            return Some(Expect::status(429, Some("too_many_attempts")));
        }
        match auth {
            Auth::Good => {
                self.failures.remove(&client);
                None
            }
            _ => {
                *self.failures.entry(client).or_default() += 1;
                Some(Expect::status(401, Some("unauthorized")))
            }
        }
    }
}

struct Soak<'a> {
    tg: &'a Tollgate,
    rng: Rng,
    /// Users created so far (their tokens).
    users: Vec<String>,
    lockout: Lockout,
    /// Wrong keys sent (none may be logged either).
    secrets: Vec<String>,
    step: u64,
    /// How many answers of each status came, for the coverage check.
    seen: BTreeMap<u16, u32>,
}

impl Soak<'_> {
    fn client_ip(client: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, 2 + client])
    }

    /// The `Authorization` lines of a request and how the API reads them. The `guesser`
    /// never has the key (and is soon locked out).
    fn authorization(&mut self, guesser: bool) -> (String, Auth) {
        let key = ADMIN_KEY;
        let wrong = format!("wrong-{}", self.rng.next());
        let variant = if guesser {
            [0, 1, 2, 5, 6, 7, 8][self.rng.below(7)]
        } else {
            self.rng.below(40)
        };
        let (lines, auth) = match variant {
            0 => (String::new(), Auth::Bad),
            1 => (format!("Authorization: Basic {key}\r\n"), Auth::Bad),
            2 => (format!("Authorization: Bearer {wrong}\r\n"), Auth::Bad),
            3 => (format!("Authorization: bearer   {key}  \r\n"), Auth::Good),
            4 => (format!("authorization: BEARER {key}\r\n"), Auth::Good),
            5 => (
                format!("Authorization: Bearer {}\r\n", "k".repeat(6000)),
                Auth::Bad,
            ),
            6 => (format!("Authorization: Bearer {key}x\r\n"), Auth::Bad),
            7 => ("Authorization: Bearer\r\n".to_string(), Auth::Bad),
            8 => (format!("X-Api-Key: {key}\r\n"), Auth::Bad),
            9 => (
                format!("Authorization: Bearer {key}\r\nAuthorization: Bearer {key}\r\n"),
                Auth::Good,
            ),
            _ => (format!("Authorization: Bearer {key}\r\n"), Auth::Good),
        };
        if auth == Auth::Bad {
            self.secrets.push(wrong);
        }
        (lines, auth)
    }

    /// A token of a created user, sometimes percent-encoded whole (the path decodes it).
    fn user_path(&mut self) -> (String, Option<String>) {
        match (self.rng.below(4), self.users.is_empty()) {
            (0, _) | (_, true) => {
                let ghost = format!("ghost-{}", self.rng.below(1000));
                (format!("/admin/users/{ghost}"), None)
            }
            (1, false) => {
                let token = self.users[self.rng.below(self.users.len())].clone();
                let encoded: String = token.bytes().map(|b| format!("%{b:02X}")).collect();
                (format!("/admin/users/{encoded}"), Some(token))
            }
            (2, false) => {
                // Double-encoded: `%2561` is the token `%61…`, which is nobody.
                let token = self.users[self.rng.below(self.users.len())].clone();
                let encoded: String = token.bytes().map(|b| format!("%25{b:02X}")).collect();
                (format!("/admin/users/{encoded}"), None)
            }
            _ => {
                let token = self.users[self.rng.below(self.users.len())].clone();
                let slash = if self.rng.chance(30) { "/" } else { "" };
                (format!("/admin/users/{token}{slash}"), Some(token))
            }
        }
    }

    /// Another spelling of `/admin/users` the router takes (the older proxy's express did).
    fn users_path(&mut self) -> String {
        let path = [
            "/admin/users",
            "/Admin/Users",
            "/admin/users/",
            "/ADMIN/users",
        ][self.rng.below(4)];
        let query = [
            "",
            "?sort=createdAt",
            "?sort=",
            "?sort=promptCount,lastUsedAt",
        ][self.rng.below(4)];
        format!("{path}{query}")
    }

    /// The request target for `path`: origin-form, or absolute-form as proxies send it.
    fn target(&mut self, path: &str) -> String {
        if path.starts_with('/') && self.rng.chance(15) {
            format!(
                "http://{}{path}",
                self.tg.admin.trim_start_matches("http://")
            )
        } else {
            path.to_string()
        }
    }

    /// A random request and what it must get from `client`.
    fn request(&mut self, client: u8) -> Request {
        let (authorization, auth) = self.authorization(client == GUESSER);
        let mut request = Request {
            bytes: Vec::new(),
            expect: Expect::status(200, None),
            half_close: false,
            body_after_continue: None,
            creates: None,
            auth,
        };
        let authority = self.tg.admin.trim_start_matches("http://").to_string();
        let host = format!("Host: {authority}\r\n");
        let mut version = "HTTP/1.1";
        let mut extra = String::new();
        let (method, path, body, kind): (&str, String, Option<Vec<u8>>, &str) =
            match self.rng.below(23) {
                0..=2 => ("GET", self.users_path(), None, "list"),
                3 => ("HEAD", self.users_path(), None, "list"),
                4..=5 => {
                    let (path, token) = self.user_path();
                    let kind = if token.is_some() { "get" } else { "missing" };
                    ("GET", path, None, kind)
                }
                6 => {
                    let (path, token) = self.user_path();
                    let kind = if token.is_some() { "get" } else { "missing" };
                    ("HEAD", path, None, kind)
                }
                7..=8 => {
                    let body = if self.rng.chance(50) {
                        br#"{"type":"special"}"#.to_vec()
                    } else {
                        Vec::new()
                    };
                    ("POST", "/admin/users".to_string(), Some(body), "create")
                }
                9..=10 => {
                    let token = format!("wire-{}-{}", self.rng.below(1 << 20), self.step);
                    let body = format!(r#"{{"nickname":"n{}"}}"#, self.step).into_bytes();
                    request.creates = Some(token.clone());
                    ("PUT", format!("/admin/users/{token}"), Some(body), "put")
                }
                11 => {
                    let body = vec![b' '; MAX_BODY + 1 + self.rng.below(4000)];
                    ("PUT", "/admin/users/too-big".to_string(), Some(body), "big")
                }
                12 => {
                    let method = ["TRACE", "OPTIONS", "get", "PATCH", "CONNECT"][self.rng.below(5)];
                    let path = if self.rng.chance(50) {
                        self.users_path()
                    } else {
                        "/admin/users/some-token".to_string()
                    };
                    (method, path, None, "method")
                }
                13 => {
                    let path = [
                        "*",
                        "/admin",
                        "/admin/users/a/b",
                        "/admin/us%65rs",
                        "/HEALTH",
                    ][self.rng.below(5)];
                    let method = if path == "*" { "OPTIONS" } else { "GET" };
                    (method, path.to_string(), None, "nowhere")
                }
                14 => ("GET", "/health".to_string(), None, "health"),
                15 => ("HEAD", "/ready".to_string(), None, "ready"),
                16 => ("GET", "/metrics".to_string(), None, "metrics"),
                17 => {
                    // A body on DELETE or GET (some clients send `{}`).
                    let (path, _) = self.user_path();
                    let method = ["GET", "DELETE"][self.rng.below(2)];
                    let ghost = path.contains("ghost-") || path.contains("%25");
                    let path = if method == "DELETE" && !ghost {
                        "/admin/users/ghost-delete".to_string()
                    } else {
                        path
                    };
                    let kind = if method == "GET" && !ghost {
                        "get"
                    } else {
                        "missing"
                    };
                    (method, path, Some(b"{}".to_vec()), kind)
                }
                18 => {
                    version = "HTTP/1.0";
                    if self.rng.chance(50) {
                        extra.push_str("Connection: keep-alive\r\n");
                    }
                    ("GET", "/health".to_string(), None, "health")
                }
                19 => {
                    extra.push_str("Connection: close\r\n");
                    ("GET", self.users_path(), None, "list")
                }
                20 => {
                    request.half_close = true;
                    ("GET", "/health".to_string(), None, "health")
                }
                21 => {
                    // Refused by Pingora while reading the header: a 400 and the end.
                    let (path, line) = [
                        ("/admin/users", "Host: other.example\r\n"),
                        ("/admin/users", "Content-Length: 1\r\nContent-Length: 2\r\n"),
                        ("/admin/users", "Not a header line\r\n"),
                        ("http://elsewhere.example/admin/users", ""),
                    ][self.rng.below(4)];
                    extra.push_str(line);
                    ("GET", path.to_string(), None, "malformed")
                }
                _ => {
                    // `?key=` is no way to send the admin key.
                    request.auth = Auth::Bad;
                    (
                        "GET",
                        format!("/admin/users/x?key={ADMIN_KEY}"),
                        None,
                        "missing",
                    )
                }
            };
        // Wrong methods sometimes come without a key; `?key=` stands for the key alone.
        let authorization = if (kind == "method" && self.rng.chance(50)) || path.contains("?key=") {
            String::new()
        } else {
            authorization
        };
        let checked = path.to_ascii_lowercase().starts_with("/admin/users")
            && !matches!(kind, "method" | "nowhere" | "malformed");
        if !checked {
            request.auth = Auth::NotChecked;
        }
        // The body's framing and type.
        let mut framed = Vec::new();
        let mut expect_continue = false;
        if let Some(body) = &body {
            match self.rng.below(4) {
                0 if !body.is_empty() => {
                    let piece = 1 + self.rng.below(body.len());
                    extra.push_str("Transfer-Encoding: chunked\r\n");
                    framed = chunked(body, piece, ";ext=1", &[("X-Trailer", "t")]);
                }
                1 if version == "HTTP/1.1" && !body.is_empty() => {
                    extra.push_str(&format!("Content-Length: {}\r\n", body.len()));
                    extra.push_str("Expect: 100-continue\r\n");
                    expect_continue = true;
                }
                _ => {
                    extra.push_str(&format!("Content-Length: {}\r\n", body.len()));
                    framed = body.clone();
                }
            }
            if !body.is_empty() {
                let content_type = [
                    "Content-Type: application/json\r\n",
                    "Content-Type: application/json; charset=utf-8\r\n",
                    "content-type: text/plain\r\n",
                    "",
                ][self.rng.below(4)];
                extra.push_str(content_type);
            }
        }
        // What it must get.
        let mut expect = match kind {
            "list" | "get" | "create" | "put" | "health" | "metrics" => Expect::status(200, None),
            "ready" => Expect::status(200, None),
            "missing" => Expect::status(404, Some("not_found")),
            "big" => Expect::status(413, Some("payload_too_large")),
            "method" => Expect::status(405, Some("method_not_allowed")),
            "malformed" => Expect {
                closes: true,
                ..Expect::status(400, Some("invalid_request"))
            },
            _ => Expect::status(404, Some("not_found")),
        };
        if kind == "method" {
            request.auth = Auth::NotChecked;
        }
        if let Some(refused) = self.lockout.decide(client, request.auth) {
            expect = refused;
        }
        expect.head = method == "HEAD";
        // A refused request with a body held back gets its answer at once and the end.
        let refused = expect.status >= 400;
        if expect_continue {
            // Answered without its body (refused, or a method whose body is not read): the
            // client may still send it or not, so the connection cannot be reused.
            if refused || !matches!(method, "POST" | "PUT") {
                expect.closes = true;
            } else {
                expect.interim = true;
                request.body_after_continue = body.clone();
            }
        } else if kind == "big" || (refused && body.as_ref().is_some_and(|b| !b.is_empty())) {
            // An unread body: the answer may close the connection (413 must).
            expect.may_close = true;
            expect.closes = kind == "big" && expect.status == 413;
        } else if matches!(method, "GET" | "DELETE") && body.is_some() {
            expect.may_close = true;
        }
        if version == "HTTP/1.0" && !extra.contains("keep-alive") {
            expect.closes = true;
        }
        if extra.contains("Connection: close") || request.half_close {
            expect.closes = true;
        }
        if expect.status != 200 {
            request.creates = None;
        }
        let target = self.target(&path);
        let mut bytes =
            format!("{method} {target} {version}\r\n{host}{authorization}{extra}\r\n").into_bytes();
        bytes.extend_from_slice(&framed);
        request.bytes = bytes;
        request.expect = expect;
        request
    }

    /// Sends a pipeline of requests on `conn` and checks their answers. Returns whether the
    /// connection is still open.
    fn exchange(
        &mut self,
        conn: &mut TcpStream,
        reader: &mut BufReader<TcpStream>,
        client: u8,
    ) -> bool {
        let count = 1 + self.rng.below(3);
        let mut batch = Vec::new();
        for _ in 0..count {
            let request = self.request(client);
            let last = request.expect.closes
                || request.expect.may_close
                || request.half_close
                || request.body_after_continue.is_some()
                || request.expect.interim;
            batch.push(request);
            if last {
                break;
            }
        }
        let mut bytes = Vec::new();
        for request in &batch {
            bytes.extend_from_slice(&request.bytes);
        }
        let step = self.step;
        let context = |request: &Request| {
            format!(
                "step {} from 127.0.0.{}: {}",
                step,
                2 + client,
                show(&request.bytes)
            )
        };
        conn.write_all(&bytes).unwrap();
        let last = batch.len() - 1;
        if batch[last].half_close {
            conn.shutdown(Shutdown::Write).unwrap();
        }
        for (i, request) in batch.iter().enumerate() {
            let what = format!(
                "{} (request {} of a pipeline of {})",
                context(request),
                i + 1,
                last + 1
            );
            if request.expect.interim {
                let head = read_head(reader)
                    .unwrap_or_else(|e| panic!("{what}: no 100 Continue: {e}"))
                    .unwrap_or_else(|| panic!("{what}: closed before 100 Continue"));
                assert_eq!(head.status(), 100, "{what}: {}", show(&head.line));
                *self.seen.entry(100).or_default() += 1;
                conn.write_all(request.body_after_continue.as_deref().unwrap())
                    .unwrap();
            }
            let head = read_head(reader)
                .unwrap_or_else(|e| panic!("{what}: no answer: {e}"))
                .unwrap_or_else(|| panic!("{what}: the connection closed without an answer"));
            let method = std::str::from_utf8(&request.bytes)
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string();
            let closing = self.check(&what, &head, &method, &request.expect, reader);
            if head.status() == 200 {
                if let Some(token) = &request.creates {
                    self.users.push(token.clone());
                }
            }
            if closing || request.half_close {
                assert!(
                    i == last,
                    "{what}: closed with {} pipelined requests unanswered",
                    last - i
                );
                assert!(
                    ends(reader),
                    "{what}: announced close, then left the connection open"
                );
                return false;
            }
            assert!(
                !request.expect.closes,
                "{what}: must close the connection, announced {:?}",
                head.get("connection").map(show)
            );
        }
        true
    }

    /// Checks one answer; returns whether it announced the connection's end.
    fn check(
        &mut self,
        what: &str,
        head: &Head,
        method: &str,
        expect: &Expect,
        reader: &mut BufReader<TcpStream>,
    ) -> bool {
        let status = head.status();
        *self.seen.entry(status).or_default() += 1;
        assert!(
            head.line.starts_with(b"HTTP/1.1 "),
            "{what}: {}",
            show(&head.line)
        );
        assert_eq!(
            head.all("content-length").len(),
            1,
            "{what}: {status} needs exactly one Content-Length: {}",
            show_head(head)
        );
        assert!(
            head.get("transfer-encoding").is_none(),
            "{what}: {}",
            show_head(head)
        );
        let body = read_response_body(reader, head, method);
        assert!(!body.truncated, "{what}: the body was cut short");
        if expect.head {
            assert!(body.bytes.is_empty(), "{what}: HEAD answered with a body");
        }
        assert_eq!(
            status,
            expect.status,
            "{what}: got {} {}",
            show(&head.line),
            show(&body.bytes)
        );
        if let Some(kind) = expect.kind {
            if !expect.head {
                let json: Value = serde_json::from_slice(&body.bytes)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", show(&body.bytes)));
                assert_eq!(error_type(&json), kind, "{what}: {json}");
                assert!(json["error"]["message"].is_string(), "{what}: {json}");
            }
            let content_type = head.get("content-type").map(show);
            assert_eq!(content_type.as_deref(), Some("application/json"), "{what}");
        }
        let needs = |name: &str| {
            assert!(
                head.get(name).is_some(),
                "{what}: {status} without {name}: {:?}",
                head.headers
            )
        };
        match status {
            401 => {
                needs("www-authenticate");
                let challenge = show(head.get("www-authenticate").unwrap());
                assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
            }
            405 => needs("allow"),
            429 => needs("retry-after"),
            _ => {}
        }
        let announced_close = head
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        if announced_close && !expect.closes && !expect.may_close {
            panic!(
                "{what}: closed a connection that should stay open: {:?}",
                head.headers
            );
        }
        announced_close
    }
}

/// A head's lines as text, for failure messages.
fn show_head(head: &Head) -> String {
    let mut text = show(&head.line);
    for (name, value) in &head.headers {
        text.push_str(&format!(" | {}: {}", show(name), show(value)));
    }
    text
}

/// Whether the server ends the connection (rather than leaving it open until our timeout).
fn ends(reader: &mut BufReader<TcpStream>) -> bool {
    use std::io::Read;
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn run(seed: u64) {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .admin_yaml(&format!(
            "max_body_bytes: {MAX_BODY}\nlockout_after_failures: {LOCKOUT_AFTER}"
        ))
        .start();
    let steps = env_u64("TOLLGATE_SOAK_STEPS").unwrap_or(DEFAULT_STEPS);
    let mut soak = Soak {
        tg: &tg,
        rng: Rng::new(seed),
        users: Vec::new(),
        lockout: Lockout::default(),
        secrets: Vec::new(),
        step: 0,
        seen: BTreeMap::new(),
    };
    let admin: std::net::SocketAddr = tg.admin.trim_start_matches("http://").parse().unwrap();
    let mut open: BTreeMap<u8, (TcpStream, BufReader<TcpStream>)> = BTreeMap::new();
    while soak.step < steps {
        soak.step += 1;
        let client = soak.rng.below(CLIENTS as usize) as u8;
        let (mut conn, mut reader) = open.remove(&client).unwrap_or_else(|| {
            let conn = connect_from(Soak::client_ip(client), admin);
            let reader = BufReader::new(conn.try_clone().unwrap());
            (conn, reader)
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            soak.exchange(&mut conn, &mut reader, client)
        }));
        match result {
            Ok(true) => {
                open.insert(client, (conn, reader));
            }
            Ok(false) => {}
            Err(panic) => {
                eprintln!("admin_api::wire: seed {seed} failed");
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!(
        "admin_api::wire: seed {seed}: answers by status {:?}",
        soak.seen
    );
    if steps >= DEFAULT_STEPS {
        for status in [100, 200, 400, 401, 404, 405, 413, 429] {
            assert!(
                soak.seen.contains_key(&status),
                "seed {seed}: no {status} in {steps} steps"
            );
        }
    }
    // Neither the admin key nor a user's token (nor a wrong key) is ever logged.
    drop(open);
    let log = tg.log();
    assert!(
        !log.contains(ADMIN_KEY),
        "seed {seed}: the admin key is in the log"
    );
    for secret in soak.users.iter().chain(&soak.secrets) {
        assert!(
            !log.contains(secret.as_str()),
            "seed {seed}: {secret} is in the log"
        );
    }
    assert!(
        !log.contains(&"k".repeat(100)),
        "seed {seed}: a presented key is in the log"
    );
}

#[test]
fn the_admin_listener_frames_every_answer_and_guards_its_key() {
    for_each_seed(DEFAULT_SEED, run);
}
