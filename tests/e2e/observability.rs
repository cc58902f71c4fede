//! Observability accuracy and secret hygiene, randomized: in each gatekeeper mode a seeded mix
//! of traffic (passing requests, bad and missing credentials, rate-limited and blocked clients,
//! oversize bodies, clients that abort mid-request or mid-response, upstream errors, timeouts
//! and refused connections, pipelined and kept-alive requests, `100-continue`, `HEAD`, admin
//! calls) goes through the real binary on raw sockets, recording what each client saw. Then
//! `/metrics` must agree exactly with those observations, the access log must hold one line per
//! request that matches it, and no secret may appear in any output (process log, access log,
//! `/metrics`, admin answers) other than as the documented `tok:` id.
//! `TOLLGATE_SOAK_SEED` / `TOLLGATE_SOAK_ITERATIONS` replay a seed or soak longer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use rtdb_standin::{Options, StandIn};

use crate::support::origin::{Script, ScriptedOrigin};
use crate::support::soak::{for_each_seed, Rng};
use crate::support::tollgate::Tollgate;
use crate::support::wire::{self, Head};
use crate::support::{free_port, metric_sample, wait_until, TollgateBuilder};

/// Each gatekeeper mode, and user_token mode once more on the Firebase stand-in (the store
/// whose credentials and HTTP traffic could reach the log), at trace level.
const RUNS: [(&str, Store); 4] = [
    ("none", Store::Memory),
    ("proxy_key", Store::Memory),
    ("user_token", Store::MemoryOrSqlite),
    ("user_token", Store::Firebase),
];

/// The user store of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    Memory,
    /// SQLite for half the seeds.
    MemoryOrSqlite,
    /// The Firebase stand-in, with the process log at trace level.
    Firebase,
}

const MAX_BODY: usize = 2000;
/// Answers slower than this are the upstream's timeout (504).
const READ_TIMEOUT_MS: u64 = 300;

/// The secrets of one run: every one distinct and random, so that finding one in an output
/// can only mean it leaked.
struct Secrets {
    admin_key: String,
    proxy_key: String,
    /// Tokens of users (user_token mode), with a nickname or not.
    users: Vec<(String, Option<String>)>,
    /// A disabled user's token (refused 403).
    disabled: String,
    /// Tokens nobody has.
    guesses: Vec<String>,
    /// The Firebase key, its parts, and the access tokens the stand-in issued.
    firebase: Vec<String>,
}

fn secret(rng: &mut Rng, kind: &str) -> String {
    format!("{kind}-{:016x}{:08x}", rng.next(), rng.next() as u32)
}

impl Secrets {
    fn new(rng: &mut Rng) -> Self {
        Self {
            admin_key: secret(rng, "adm"),
            proxy_key: secret(rng, "pxk"),
            users: (0..3)
                .map(|i| (secret(rng, "usr"), (i != 1).then(|| format!("nick{i}"))))
                .collect(),
            disabled: secret(rng, "dis"),
            guesses: (0..3).map(|_| secret(rng, "gss")).collect(),
            firebase: Vec::new(),
        }
    }

    fn all(&self) -> Vec<&str> {
        let mut all = vec![self.admin_key.as_str(), self.proxy_key.as_str()];
        all.extend(self.users.iter().map(|(t, _)| t.as_str()));
        all.push(&self.disabled);
        all.extend(self.guesses.iter().map(String::as_str));
        all
    }

    /// A token the gatekeeper of `mode` admits.
    fn valid(&self, mode: &str, rng: &mut Rng) -> Option<&str> {
        match mode {
            "proxy_key" => Some(&self.proxy_key),
            "user_token" => Some(&self.users[rng.below(self.users.len())].0),
            _ => None,
        }
    }

    fn any(&self, rng: &mut Rng) -> String {
        let all = self.all();
        all[rng.below(all.len())].to_string()
    }
}

/// The forms a secret could leak in.
fn encodings(secret: &str) -> Vec<String> {
    use base64::Engine;
    [
        secret.to_string(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        percent_all(secret),
    ]
    .into_iter()
    // The middle of a long one: a cut or reformatted copy.
    .chain((secret.len() > 16).then(|| secret[4..secret.len() - 4].to_string()))
    .collect()
}

fn percent_all(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// `tok:` and 12 hex digits of SHA-256: how the docs say a user is named in the access log.
fn token_id(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("tok:{hex}")
}

/// How the credential is presented.
#[derive(Clone, Copy, Debug)]
enum Place {
    Bearer,
    BearerDoubleSpace,
    LowercaseBearer,
    ApiKey,
    Query,
    QueryEncoded,
    /// `?key=` in an absolute-form target (`http://host/path?key=…`).
    AbsoluteQuery,
    /// `?key=` in a target tollgate cannot read (no leading `/`): refused 400.
    UnreadableTarget,
}

const PLACES: [Place; 8] = [
    Place::Bearer,
    Place::BearerDoubleSpace,
    Place::LowercaseBearer,
    Place::ApiKey,
    Place::Query,
    Place::QueryEncoded,
    Place::AbsoluteQuery,
    Place::UnreadableTarget,
];

/// What a request does to its connection.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    /// Sends it whole and reads the answer.
    Normal,
    /// `Expect: 100-continue`: the body only after the interim answer.
    Continue,
    /// Sends the head and part of the declared body, then closes.
    AbortRequest,
    /// Reads the answer's head, then closes.
    AbortResponse,
    /// Closes before any answer (the upstream is slow).
    AbortWaiting,
    /// `Expect: 100-continue`, then closes once told to continue.
    AbortAfterContinue,
    /// Stops sending its body: `clients.body_timeout_seconds` ends it (408).
    StallBody,
    /// A body in a transfer coding besides `chunked`: refused 400.
    GzipCoding,
    /// A CORS preflight.
    Preflight,
    /// HTTP/1.0, answered and closed.
    Http10,
    /// A header line Pingora refuses (a space before the colon), or `CONNECT`: answered by
    /// Pingora before any of tollgate's hooks, so neither counted nor logged (documented).
    Malformed,
    /// A chunked body over `clients.max_body_bytes`.
    ChunkedTooLarge,
}

/// One request as sent and as its client saw it.
#[derive(Debug)]
struct Exchange {
    path: String,
    method: &'static str,
    act: Act,
    /// The scripted origin's answer (`x-exchange`).
    script: &'static str,
    /// The credential presented, and where (for failure messages).
    #[allow(dead_code)]
    credential: Option<(String, Place)>,
    /// The user token presented, when it is one of the users'.
    token: Option<String>,
    client_ip: String,
    /// The final status the client read (0: none).
    status: u16,
    /// The answer's JSON error type, when it had one.
    error: String,
    /// The body ended before its framing said (the upstream cut it).
    truncated: bool,
    /// The client left before tollgate's answer came (a machine slower than the client's
    /// patience); `status` is then the access log's, and the answer's write may have failed
    /// (counted `client_closed`) or not (counted by its status).
    unread: bool,
}

/// The scripted origin's answers, by `x-exchange`.
fn scripts(origin: &ScriptedOrigin) {
    let plain = |status: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let script = |pieces: Vec<Vec<u8>>| Script {
        pieces,
        ..Script::default()
    };
    origin.script("ok", script(vec![plain("200 OK", "hello")]));
    origin.script(
        "err500",
        script(vec![plain("500 Internal Server Error", "boom")]),
    );
    origin.script(
        "interim",
        script(vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".to_vec(),
            plain("201 Created", "made"),
        ]),
    );
    origin.script(
        "head",
        script(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()
        ]),
    );
    origin.script(
        "cut",
        Script {
            pieces: vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly-part"
                    .to_vec(),
            ],
            close: true,
            ..Script::default()
        },
    );
    origin.script(
        "noanswer",
        Script {
            close: true,
            ..Script::default()
        },
    );
    origin.script(
        "slow",
        Script {
            pieces: vec![Vec::new(), plain("200 OK", "late")],
            pause: Duration::from_millis(READ_TIMEOUT_MS * 3),
            ..Script::default()
        },
    );
    // A long answer in pieces (2 s of them): a client that stops after the head leaves
    // mid-answer, even when tollgate is slow to notice.
    let mut drip = vec![b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n".to_vec()];
    drip.extend((0..200).map(|_| vec![b'd'; 1000]));
    origin.script(
        "drip",
        Script {
            pieces: drip,
            pause: Duration::from_millis(10),
            ..Script::default()
        },
    );
}

/// Everything of one mode's run that the checks need.
struct Run {
    mode: &'static str,
    exchanges: Vec<Exchange>,
    /// Admin answers (status line, headers and body), to search for secrets.
    admin_answers: Vec<String>,
}

fn start(
    (mode, store): (&str, Store),
    secrets: &Secrets,
    origin: &ScriptedOrigin,
    firebase: Option<&StandIn>,
    rng: &mut Rng,
) -> Tollgate {
    let dead = format!("127.0.0.1:{}", free_port());
    let log_level = match firebase {
        Some(_) => "trace",
        None => ["info", "debug", "trace"][rng.below(3)],
    };
    let mut builder = TollgateBuilder::new(origin.addr)
        .mode(mode)
        .upstreams(&[origin.addr.to_string(), dead])
        .upstream_yaml(&format!("read_timeout_ms: {READ_TIMEOUT_MS}"))
        .env("ADMIN_KEY", &secrets.admin_key)
        .env("RUST_LOG", log_level)
        .admin_yaml("lockout_after_failures: 1000")
        .yaml("access_log:\n  enabled: true\n  path: access.log")
        .yaml("trusted_proxies: [\"127.0.0.1\"]")
        .yaml("ip_blocklist: [\"10.66.0.0/16\"]")
        .yaml("rate_limit:\n  requests_per_minute: 10\n  auth_failures_per_minute: 8")
        .yaml(&format!(
            "clients:\n  max_body_bytes: {MAX_BODY}\n  header_timeout_seconds: 1"
        ));
    if mode == "proxy_key" {
        builder = builder.env("PROXY_KEY", &secrets.proxy_key);
    }
    if let Some(db) = firebase {
        builder = builder
            .env("GATEKEEPER_STORE", "firebase_rtdb")
            .env("FIREBASE_RTDB_URL", &db.db_url())
            .env("FIREBASE_KEY", &db.firebase_key_b64())
            .yaml("store:\n  flush_interval_seconds: 1");
    } else if store == Store::MemoryOrSqlite && rng.chance(50) {
        builder = builder.yaml("store:\n  kind: sqlite\n  sqlite:\n    path: users.db");
    }
    builder.start()
}

/// A raw admin call: its whole answer as text, and its status.
fn admin_call(tg: &Tollgate, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    let mut conn = tg.admin_connection();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Creates the users of user_token mode under the run's tokens.
fn create_users(tg: &Tollgate, secrets: &Secrets, run: &mut Run) {
    let bearer = format!("Bearer {}", secrets.admin_key);
    for (token, nickname) in &secrets.users {
        let body = match nickname {
            Some(n) => format!(r#"{{"nickname":"{n}"}}"#),
            None => "{}".to_string(),
        };
        let (status, text) =
            admin_call(tg, "PUT", &format!("/admin/users/{token}"), &bearer, &body);
        assert!(status < 300, "{text}");
        run.admin_answers.push(text);
    }
    let path = format!("/admin/users/{}", secrets.disabled);
    for (method, path, body) in [
        ("PUT", path.clone(), "{}"),
        ("DELETE", format!("{path}?disabledReason=off"), ""),
    ] {
        let (status, text) = admin_call(tg, method, &path, &bearer, body);
        assert!(status < 300, "{text}");
        run.admin_answers.push(text);
    }
}

/// Random admin calls: good, with a wrong or malformed key, and with bad JSON.
fn admin_traffic(tg: &Tollgate, secrets: &Secrets, rng: &mut Rng, run: &mut Run) {
    for _ in 0..6 {
        let wrong = secrets.any(rng);
        let key = match rng.below(6) {
            0 => format!("Bearer {}", secrets.admin_key),
            1 => format!("Bearer {wrong}"),
            2 => format!("Basic {}", {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(format!("admin:{wrong}"))
            }),
            3 => format!("bearer  {}x", secrets.admin_key),
            4 => wrong.clone(),
            _ => format!(
                "Bearer {}",
                &secrets.admin_key[..secrets.admin_key.len() - 1]
            ),
        };
        let (method, path, body) = match rng.below(4) {
            0 => ("GET", "/admin/users".to_string(), String::new()),
            1 => (
                "POST",
                "/admin/users".to_string(),
                format!("{{\"nickname\": \"{wrong}"),
            ),
            2 => ("GET", format!("/admin/users/{wrong}"), String::new()),
            _ => (
                "PUT",
                format!("/admin/users/{}", secrets.guesses[0]),
                "{not json".to_string(),
            ),
        };
        let (_, text) = admin_call(tg, method, &path, &key, &body);
        run.admin_answers.push(text);
    }
}

/// One random request (or a pipelined pair) on `conn`; `false` once the connection is over.
fn request(
    mode: &str,
    secrets: &Secrets,
    rng: &mut Rng,
    conn: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    number: usize,
    run: &mut Run,
) -> bool {
    let blocked = rng.chance(8);
    let client_ip = if blocked {
        format!("10.66.0.{}", 1 + rng.below(3))
    } else {
        format!("10.1.0.{}", 1 + rng.below(6))
    };
    let act = match rng.below(100) {
        0..=49 => Act::Normal,
        50..=56 => Act::Continue,
        57..=62 => Act::AbortRequest,
        63..=68 => Act::AbortResponse,
        69..=74 => Act::AbortWaiting,
        75..=79 => Act::ChunkedTooLarge,
        80..=84 => Act::AbortAfterContinue,
        85 => Act::StallBody,
        86 => Act::Malformed,
        87..=89 => Act::GzipCoding,
        90..=94 => Act::Preflight,
        _ => Act::Http10,
    };
    let script = match act {
        Act::AbortResponse => "drip",
        Act::AbortWaiting => "slow",
        _ => [
            "ok", "ok", "ok", "err500", "interim", "cut", "noanswer", "slow",
        ][rng.below(8)],
    };
    let method = match act {
        Act::Normal | Act::Http10 if rng.chance(15) => "HEAD",
        Act::Normal | Act::Http10 if rng.chance(50) => "GET",
        Act::Preflight => "OPTIONS",
        Act::Malformed if rng.chance(30) => "CONNECT",
        _ => "POST",
    };
    let script = if method == "HEAD" { "head" } else { script };
    // The credential: valid, wrong, or none, in one of the places a client may put it.
    let credential = match rng.below(10) {
        0..=5 => secrets.valid(mode, rng).map(str::to_string),
        6 => Some(secrets.disabled.clone()),
        7 | 8 => Some(secrets.any(rng)),
        _ => None,
    };
    let place = PLACES[rng.below(PLACES.len())];
    let mut path = format!("/obs/{number}");
    let mut headers =
        format!("Host: tollgate\r\nX-Forwarded-For: {client_ip}\r\nx-exchange: {script}\r\n");
    if let Some(token) = &credential {
        match place {
            Place::Bearer => headers += &format!("Authorization: Bearer {token}\r\n"),
            Place::BearerDoubleSpace => headers += &format!("Authorization: Bearer  {token}\r\n"),
            Place::LowercaseBearer => headers += &format!("authorization: bearer {token}\r\n"),
            Place::ApiKey => headers += &format!("x-api-key: {token}\r\n"),
            Place::Query => path += &format!("?a=1&key={token}"),
            Place::QueryEncoded => path += &format!("?key={}", percent_all(token)),
            Place::AbsoluteQuery => path = format!("http://tollgate{path}?key={token}"),
            Place::UnreadableTarget => path = format!("obs{number}?key={token}"),
        }
    }
    if act == Act::Malformed {
        headers += &format!("X-Bad-Line : {}\r\n", secrets.any(rng));
    }
    if act == Act::Preflight {
        headers += "Origin: https://example.com\r\nAccess-Control-Request-Method: POST\r\n";
    }
    // Secrets where they are no credential: other headers, a non-Bearer scheme, the body.
    let decoy = secrets.any(rng);
    if rng.chance(30) {
        headers += &format!("Cookie: session={decoy}\r\nX-Token: {decoy}\r\n");
    }
    if rng.chance(15)
        && !matches!(
            place,
            Place::Bearer | Place::BearerDoubleSpace | Place::LowercaseBearer
        )
    {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{decoy}"));
        headers += &format!("Authorization: Basic {basic}\r\n");
    }
    let body = if method == "HEAD" {
        String::new()
    } else if rng.chance(10) {
        "b".repeat(MAX_BODY + 1 + rng.below(100))
    } else {
        format!("{{\"secret\":\"{decoy}\"}}")
    };
    let presented = credential.clone().map(|c| (c, place));
    let token =
        credential.filter(|t| mode == "user_token" && secrets.users.iter().any(|(u, _)| u == t));
    // What the access log names the target by: its path, without the query.
    let logged_path = match path.split('?').next().unwrap() {
        absolute if absolute.starts_with("http://") => {
            absolute["http://tollgate".len()..].to_string()
        }
        readable if readable.starts_with('/') => readable.to_string(),
        _ => "/".to_string(),
    };
    let mut exchange = Exchange {
        path: logged_path,
        method,
        act,
        script,
        credential: presented,
        token,
        client_ip,
        status: 0,
        error: String::new(),
        truncated: false,
        unread: false,
    };
    let bodiless = matches!(method, "HEAD" | "OPTIONS")
        || (method == "GET" && body.len() <= MAX_BODY && rng.chance(50));
    let pipelined = act == Act::Normal && method == "GET" && bodiless && rng.chance(25);
    let version = if act == Act::Http10 { "1.0" } else { "1.1" };
    let head = format!("{method} {path} HTTP/{version}\r\n{headers}");
    let sent = match act {
        Act::ChunkedTooLarge => {
            let chunks = wire::chunked(&vec![b'c'; MAX_BODY + 500], 700, "", &[]);
            conn.write_all(format!("{head}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
                .and_then(|()| conn.write_all(&chunks))
        }
        Act::AbortRequest => conn.write_all(
            format!("{head}Content-Length: {}\r\n\r\n{}", body.len() + 10, body).as_bytes(),
        ),
        Act::GzipCoding => {
            let chunks = wire::chunked(body.as_bytes(), 700, "", &[]);
            conn.write_all(format!("{head}Transfer-Encoding: gzip, chunked\r\n\r\n").as_bytes())
                .and_then(|()| conn.write_all(&chunks))
        }
        Act::StallBody => conn.write_all(
            format!("{head}Content-Length: {}\r\n\r\n{}", body.len() + 10, body).as_bytes(),
        ),
        Act::Continue | Act::AbortAfterContinue => conn.write_all(
            format!(
                "{head}Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        ),
        _ if bodiless => conn.write_all(format!("{head}\r\n").as_bytes()),
        _ => {
            conn.write_all(format!("{head}Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        }
    };
    if sent.is_err() {
        run.exchanges.push(exchange);
        return false;
    }
    if matches!(act, Act::AbortWaiting | Act::AbortRequest) {
        // Gone before the upstream answers (well within its timeout) or the body is complete,
        // unless tollgate answered at once (a refusal): then the client saw that answer.
        conn.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let answered = matches!(reader.fill_buf(), Ok(bytes) if !bytes.is_empty());
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        if answered {
            read_answer(reader, &mut exchange, conn, "");
        }
        run.exchanges.push(exchange);
        return false;
    }
    let mut second = None;
    if pipelined {
        let path = format!("/obs/{number}p");
        let _ = conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: tollgate\r\nX-Forwarded-For: {}\r\nx-exchange: ok\r\n\r\n", exchange.client_ip).as_bytes(),
        );
        second = Some(Exchange {
            path,
            method: "GET",
            act: Act::Normal,
            script: "ok",
            credential: None,
            token: None,
            client_ip: exchange.client_ip.clone(),
            status: 0,
            error: String::new(),
            truncated: false,
            unread: false,
        });
    }
    let (open, mut reusable) = read_answer(reader, &mut exchange, conn, &body);
    reusable &= exchange.act == Act::Normal;
    run.exchanges.push(exchange);
    // A second request after a closing answer was never read by tollgate.
    if let Some(mut second) = second.filter(|_| open) {
        (_, reusable) = read_answer(reader, &mut second, conn, "");
        run.exchanges.push(second);
    }
    reusable
}

/// Reads `exchange`'s answer (interim ones first): whether the connection stays open, and
/// whether it may carry another request.
fn read_answer(
    reader: &mut BufReader<TcpStream>,
    exchange: &mut Exchange,
    conn: &mut TcpStream,
    body: &str,
) -> (bool, bool) {
    let final_head: Head = loop {
        let head = match wire::read_head(reader) {
            Ok(Some(head)) => head,
            _ => return (false, false),
        };
        let status = head.status();
        if status == 100 && exchange.act == Act::AbortAfterContinue {
            return (false, false);
        }
        if status == 100 && exchange.act == Act::Continue {
            if conn.write_all(body.as_bytes()).is_err() {
                return (false, false);
            }
            continue;
        }
        if (100..200).contains(&status) {
            continue;
        }
        break head;
    };
    exchange.status = final_head.status();
    if exchange.act == Act::AbortResponse && exchange.status == 200 {
        return (false, false);
    }
    let answer = wire::read_response_body(reader, &final_head, exchange.method);
    exchange.truncated = answer.truncated;
    if let Ok(json) = serde_json::from_slice::<Value>(&answer.bytes) {
        exchange.error = json["error"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("failed authentication"))
        {
            exchange.error = "auth_failures".to_string();
        }
    }
    let closing = final_head
        .get("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    // A refused request's unread body would be taken for the next request: only a connection
    // whose request went upstream (its body read) is used again.
    let upstream_answered = (200..300).contains(&exchange.status) || exchange.status == 500;
    let open = !answer.truncated && !closing;
    (open, open && upstream_answered)
}

/// The `result` label each exchange must be counted under, from what its client saw.
fn expected_result(e: &Exchange) -> &'static str {
    match (e.act, e.status) {
        (Act::Malformed, 400 | 405) if e.error.is_empty() => "uncounted",
        (Act::AbortRequest | Act::AbortWaiting | Act::AbortAfterContinue, 0) => "client_closed",
        (_, 408) => "408",
        (Act::Preflight, 204) => "preflight",
        (Act::AbortResponse, 200) => "client_closed",
        (_, 0) => panic!("{e:?}: no answer to a client that waited for one"),
        (_, 401) => "401",
        (_, 403) => "403",
        (_, 429) => "429",
        (_, 413) => "413",
        (_, 400) => "400",
        (_, 502 | 504) => "502",
        (_, _) if e.truncated && e.script == "cut" => "502",
        _ => "proxied",
    }
}

fn run_mode((mode, store): (&'static str, Store), seed: u64) -> (Tollgate, Run, Secrets) {
    let mut rng = Rng::new(seed ^ mode.len() as u64);
    let mut secrets = Secrets::new(&mut rng);
    let origin = ScriptedOrigin::start();
    scripts(&origin);
    let firebase = (store == Store::Firebase).then(|| StandIn::start(Options::default()));
    let tg = start(
        (mode, store),
        &secrets,
        &origin,
        firebase.as_ref(),
        &mut rng,
    );
    let mut run = Run {
        mode,
        exchanges: Vec::new(),
        admin_answers: Vec::new(),
    };
    if mode == "user_token" {
        create_users(&tg, &secrets, &mut run);
    }
    let series_before = series(&tg.metrics());
    // A header that never ends, with a secret in it: disconnected, counted, never logged.
    let mut unfinished = tg.proxy_connection();
    write!(
        unfinished,
        "GET /obs/unfinished?key={} HTTP/1.1\r\nAuthorization: Bearer {}\r\n",
        secrets.any(&mut rng),
        secrets.any(&mut rng)
    )
    .unwrap();
    let mut number = 0;
    while number < 60 {
        let mut conn = tg.proxy_connection();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        // Kept alive for a few requests, or until the connection is over.
        for _ in 0..1 + rng.below(4) {
            number += 1;
            if !request(
                mode,
                &secrets,
                &mut rng,
                &mut conn,
                &mut reader,
                number,
                &mut run,
            ) {
                break;
            }
        }
        if rng.chance(10) {
            admin_traffic(&tg, &secrets, &mut rng, &mut run);
        }
    }
    assert!(
        crate::support::closed_within(&mut unfinished, Duration::from_secs(5)),
        "{mode}: an unfinished header is cut off"
    );
    let scrape = tg.metrics();
    assert_eq!(
        series(&scrape),
        series_before,
        "{mode}: the metrics' series stay the same"
    );
    drop(origin);
    if let Some(db) = firebase {
        // Users' changes reach the database (their tokens in its paths), then stop tollgate
        // while the stand-in still answers: its last writes are logged too.
        wait_until(Duration::from_secs(10), || {
            metric_sample(
                &tg.metrics(),
                "tollgate_store_pending_changes{store=\"firebase_rtdb\"}",
            ) == Some(0.0)
        });
        secrets.firebase = vec![db.firebase_key_b64(), db.service_account_json()];
        // The access tokens it was sent, and the signed assertions that got them.
        for request in db.requests() {
            if let Some(token) = request.headers.get("authorization") {
                let token = token.trim_start_matches("Bearer ").to_string();
                if !secrets.firebase.contains(&token) {
                    secrets.firebase.push(token);
                }
            }
            if let Some((_, assertion)) = request.body.split_once("assertion=") {
                secrets
                    .firebase
                    .push(assertion.split('&').next().unwrap().to_string());
            }
        }
        let key: Value = serde_json::from_str(&db.service_account_json()).unwrap();
        let pem = key["private_key"].as_str().unwrap();
        secrets.firebase.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 20)
                .map(str::to_string),
        );
        secrets
            .firebase
            .push(key["private_key_id"].as_str().unwrap().to_string());
    }
    (tg, run, secrets)
}

/// The series (name and labels) of a scrape.
fn series(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

fn requests_total(scrape: &str, mode: &str, result: &str) -> u64 {
    metric_sample(
        scrape,
        &format!("tollgate_requests_total{{mode=\"{mode}\",result=\"{result}\"}}"),
    )
    .unwrap_or(0.0) as u64
}

/// `/metrics` against what the clients saw: one count per request, under its result.
fn check_metrics(tg: &Tollgate, run: &Run) -> Vec<String> {
    // Unread answers count under their status or as `client_closed`: each widens the bounds.
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    let mut unread: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &run.exchanges {
        if e.unread {
            *unread.entry(expected_result(e)).or_default() += 1;
            *unread.entry("client_closed").or_default() += 1;
        }
        *expected.entry(expected_result(e)).or_default() += 1;
    }
    let certain = |result: &str| {
        let all = expected.get(result).copied().unwrap_or(0);
        let unread_here = run
            .exchanges
            .iter()
            .filter(|e| e.unread && expected_result(e) == result)
            .count() as u64;
        all - unread_here
    };
    let total: u64 = expected
        .iter()
        .filter(|(result, _)| **result != "uncounted")
        .map(|(_, n)| n)
        .sum();
    let results = [
        "proxied",
        "401",
        "403",
        "429",
        "400",
        "408",
        "413",
        "502",
        "preflight",
        "client_closed",
    ];
    let counted = |scrape: &str| -> u64 {
        results
            .iter()
            .map(|r| requests_total(scrape, run.mode, r))
            .sum()
    };
    // Requests are counted when they end, after their client has its answer (or left).
    wait_until(Duration::from_secs(5), || counted(&tg.metrics()) >= total);
    let scrape = tg.metrics();
    let mut problems = Vec::new();
    for result in results {
        let (least, got) = (certain(result), requests_total(&scrape, run.mode, result));
        let most = least + unread.get(result).copied().unwrap_or(0);
        if !(least..=most).contains(&got) {
            problems.push(format!(
                "{}: result={result}: clients saw {least} (up to {most} with answers they left \
                 before), counted {got}",
                run.mode
            ));
        }
    }
    if counted(&scrape) != total {
        problems.push(format!(
            "{}: {} counted, {total} requests",
            run.mode,
            counted(&scrape)
        ));
    }
    // The upstream latency is observed for requests the upstream answered.
    let answered = run
        .exchanges
        .iter()
        .filter(|e| {
            expected_result(e) == "proxied"
                || e.truncated
                || (e.act == Act::AbortResponse && e.status == 200)
        })
        .count() as u64;
    let observed =
        metric_sample(&scrape, "tollgate_upstream_latency_seconds_count").unwrap_or(0.0) as u64;
    if observed != answered {
        problems.push(format!(
            "{}: upstream latency observed {observed} times, the upstream answered {answered}",
            run.mode
        ));
    }
    if metric_sample(&scrape, "tollgate_client_header_timeouts_total") != Some(1.0) {
        problems.push(format!("{}: header timeouts: {scrape}", run.mode));
    }
    // Distinct clients refused with 429: users by token, others by address.
    let limited: std::collections::BTreeSet<&str> = run
        .exchanges
        .iter()
        .filter(|e| e.status == 429)
        .map(|e| match &e.token {
            Some(token) if e.error != "auth_failures" => token.as_str(),
            _ => e.client_ip.as_str(),
        })
        .collect();
    let gauge = metric_sample(&scrape, "tollgate_rate_limited_clients");
    if gauge != Some(limited.len() as f64) {
        problems.push(format!(
            "{}: tollgate_rate_limited_clients {gauge:?}, clients refused: {limited:?}",
            run.mode
        ));
    }
    for zero in [
        "tollgate_client_send_timeouts_total",
        "tollgate_client_connections_refused_total",
    ] {
        if metric_sample(&scrape, zero) != Some(0.0) {
            problems.push(format!(
                "{}: {zero} is {:?}",
                run.mode,
                metric_sample(&scrape, zero)
            ));
        }
    }
    // A connection the dead upstream refused is logged once: by Pingora when it is retried on
    // the next upstream, by tollgate when it was the last one to try.
    let refused =
        metric_sample(&scrape, "tollgate_upstream_connect_failures_total").unwrap_or(0.0) as usize;
    let retried = tg
        .log()
        .lines()
        .filter(|l| {
            l.contains("retry: true") && l.contains("ConnectRefused")
                || l.contains("upstream failure: ConnectRefused")
        })
        .count();
    if refused != retried {
        problems.push(format!(
            "{}: {refused} connect failures counted, {retried} logged:\n{}",
            run.mode,
            tg.log()
                .lines()
                .filter(|l| l.contains("Fail to proxy") || l.contains("upstream failure"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    problems
}

/// The access log against the requests: one line each, with what its client saw.
/// The access log's lines, once there is one for each request tollgate handled.
fn access_log(tg: &Tollgate, run: &Run) -> Vec<Value> {
    let path = tg.dir.path().join("access.log");
    let read = || -> Vec<Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let logged = run
        .exchanges
        .iter()
        .filter(|e| expected_result(e) != "uncounted")
        .count();
    wait_until(Duration::from_secs(5), || read().len() >= logged);
    read()
}

/// A client that leaves after 100 ms without an answer takes tollgate to have none for it; on
/// a loaded machine a refusal (or an upstream timeout) may come later than that. The access
/// log says what tollgate answered: such an exchange is judged by that status.
fn take_unread_answers(run: &mut Run, lines: &[Value]) {
    for e in run.exchanges.iter_mut() {
        if !matches!(e.act, Act::AbortRequest | Act::AbortWaiting) || e.status != 0 {
            continue;
        }
        let mut logged = lines.iter().filter(|l| l["path"] == e.path.as_str());
        if let (Some(line), None) = (logged.next(), logged.next()) {
            let status = line["status"].as_u64().unwrap_or(0) as u16;
            if status != 0 {
                (e.status, e.unread) = (status, true);
            }
        }
    }
}

fn check_access_log(run: &Run, lines: &[Value], secrets: &Secrets) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_path: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for line in lines {
        by_path
            .entry(line["path"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(line);
    }
    for e in run
        .exchanges
        .iter()
        .filter(|e| expected_result(e) != "uncounted")
    {
        // Paths are unique but for unreadable targets (logged as `/`), whose lines may come in
        // another order than their requests (each is written after its answer): the line
        // that matches, or else the first.
        let found = by_path.get_mut(&e.path).filter(|lines| !lines.is_empty());
        let Some(line) = found.map(|lines| {
            let matching = lines
                .iter()
                .position(|l| l["status"] == e.status && l["client_ip"] == e.client_ip.as_str());
            lines.remove(matching.unwrap_or(0))
        }) else {
            problems.push(format!("{}: no line for {e:?}", run.mode));
            continue;
        };
        let want_status = e.status;
        if line["status"] != want_status {
            problems.push(format!("{}: logged {line} for {e:?}", run.mode));
        }
        if line["method"] != e.method || line["client_ip"] != e.client_ip.as_str() {
            problems.push(format!("{}: logged {line} for {e:?}", run.mode));
        }
        // A user is named when the gatekeeper let the request through as that user.
        let refused_before = match e.status {
            400 | 401 | 403 => true,
            413 => e.act != Act::ChunkedTooLarge,
            _ => e.error == "auth_failures",
        };
        let admitted = !refused_before;
        if e.unread {
            // Whether a refusal came before or after the gatekeeper is unknown.
            continue;
        }
        let want_user = e
            .token
            .as_ref()
            .filter(|_| admitted && e.act != Act::Preflight);
        let nickname = want_user.and_then(|t| {
            secrets
                .users
                .iter()
                .find(|(u, _)| u == t)
                .and_then(|(_, n)| n.clone())
        });
        if line["user"].as_str() != want_user.map(|t| token_id(t)).as_deref()
            || line["nickname"].as_str() != nickname.as_deref()
        {
            problems.push(format!("{}: user of {line} for {e:?}", run.mode));
        }
        if let Some(ms) = line.get("upstream_ms") {
            if !ms.as_f64().is_some_and(|ms| (0.0..60_000.0).contains(&ms)) {
                problems.push(format!("{}: upstream_ms of {line}", run.mode));
            }
        }
    }
    for (path, extra) in by_path.into_iter().filter(|(_, l)| !l.is_empty()) {
        problems.push(format!(
            "{}: lines for no request at {path}: {extra:?}",
            run.mode
        ));
    }
    problems
}

/// No secret in any output, in any of its obvious forms.
fn check_secrets(tg: &Tollgate, run: &Run, secrets: &Secrets) -> Vec<String> {
    let outputs = [
        ("process log", tg.log()),
        (
            "access log",
            std::fs::read_to_string(tg.dir.path().join("access.log")).unwrap_or_default(),
        ),
        ("/metrics", tg.metrics()),
    ];
    let mut problems = Vec::new();
    for secret in secrets
        .all()
        .into_iter()
        .chain(secrets.firebase.iter().map(String::as_str))
    {
        for form in encodings(secret) {
            for (name, text) in &outputs {
                if text.contains(&form) {
                    problems.push(format!("{}: {secret} ({form}) in the {name}", run.mode));
                }
            }
        }
    }
    // Admin answers carry users' tokens by design (the admin reads them); never the keys, nor
    // a token nobody has.
    let mut never: Vec<&str> = vec![&secrets.admin_key, &secrets.proxy_key];
    never.extend(secrets.guesses.iter().skip(1).map(String::as_str));
    for answer in &run.admin_answers {
        for secret in &never {
            if encodings(secret)
                .iter()
                .any(|f| answer.contains(f.as_str()))
            {
                problems.push(format!(
                    "{}: {secret} in an admin answer: {answer}",
                    run.mode
                ));
            }
        }
    }
    problems
}

#[test]
fn metrics_and_access_log_match_what_clients_saw_and_hold_no_secret() {
    for_each_seed(0x0b5e_57ab, |seed| {
        let mut problems = Vec::new();
        for (mode, store) in RUNS {
            let (tg, mut run, secrets) = run_mode((mode, store), seed);

            let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
            for e in &run.exchanges {
                *tally.entry(expected_result(e)).or_default() += 1;
            }
            eprintln!("seed {seed} {mode}: {tally:?}");
            let lines = access_log(&tg, &run);
            take_unread_answers(&mut run, &lines);
            problems.extend(check_metrics(&tg, &run));
            problems.extend(check_access_log(&run, &lines, &secrets));

            problems.extend(check_secrets(&tg, &run, &secrets));
        }
        assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    });
}

/// Sends `request` on a new connection and resets it (`SO_LINGER` 0: an RST, not a FIN) at
/// once, as a cancelled browser request or a scanner does: tollgate's answer cannot be written.
fn send_and_reset(tg: &Tollgate, request: &str) {
    use std::os::fd::AsRawFd;
    let mut conn = tg.proxy_connection();
    conn.write_all(request.as_bytes()).unwrap();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket this function owns, with a valid `linger`.
    let set = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
}

/// A client that resets its connection while tollgate writes its own answer (a refusal, a
/// preflight's, a `100 Continue`) left: it is counted `client_closed`. It was counted
/// `result="502"`, the upstream-failure alert's series, and logged as an internal error.
#[test]
fn clients_that_reset_the_connection_before_their_answer_are_not_counted_as_502() {
    let origin = ScriptedOrigin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("proxy_key")
        .env("PROXY_KEY", crate::support::tollgate::PROXY_KEY)
        .yaml("access_log:\n  enabled: true\n  path: access.log")
        .yaml("rate_limit:\n  requests_per_minute: 0\n  auth_failures_per_minute: 0")
        .start();
    let key = crate::support::tollgate::PROXY_KEY;
    for i in 0..10 {
        send_and_reset(
            &tg,
            &format!("GET /refused{i} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong\r\n\r\n"),
        );
        send_and_reset(
            &tg,
            &format!(
                "OPTIONS /preflight{i} HTTP/1.1\r\nHost: t\r\nOrigin: https://a.example\r\n\
                 Access-Control-Request-Method: POST\r\n\r\n"
            ),
        );
        send_and_reset(
            &tg,
            &format!(
                "POST /continue{i} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
                 Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            ),
        );
    }
    // Each request handled is counted, then logged: once every line is there, so are the counts.
    let lines = || {
        std::fs::read_to_string(tg.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .count() as u64
    };
    let counted = |scrape: &str| -> u64 {
        ["401", "preflight", "client_closed", "502", "proxied"]
            .iter()
            .map(|r| requests_total(scrape, "proxy_key", r))
            .sum()
    };
    // (All 30 are, unless a reset arrives before tollgate read its request.)
    wait_until(Duration::from_secs(10), || {
        let logged = lines();
        logged == 30 && counted(&tg.metrics()) == logged
    });
    assert!(wait_until(Duration::from_secs(10), || {
        let logged = lines();
        logged > 0 && counted(&tg.metrics()) == logged
    }));
    let scrape = tg.metrics();
    assert_eq!(requests_total(&scrape, "proxy_key", "502"), 0, "{scrape}");
    assert!(
        requests_total(&scrape, "proxy_key", "client_closed") > 0,
        "some answers found the connection reset: {scrape}"
    );
    let log = tg.log();
    assert!(!log.contains("internal proxy error"), "{log}");
}

/// An origin that answers `401` as soon as it has a request's head, without waiting for its
/// body (as an upstream checking its own credential does), then reads whatever comes.
fn early_answering_origin() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                while let Ok(Some(_)) = wire::read_head(&mut reader) {
                    let mut writer = &stream;
                    let answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope";
                    if writer.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A client whose request body the upstream never needed (it answered first) has the whole
/// answer: its request was proxied, as its access log line says, whether it then stops sending
/// the body (until `clients.body_timeout_seconds`) or leaves. It was counted `408` or
/// `client_closed`.
#[test]
fn a_request_answered_whole_before_its_body_ended_counts_as_proxied() {
    let tg = TollgateBuilder::new(early_answering_origin())
        .mode("none")
        .yaml("clients:\n  body_timeout_seconds: 1")
        .yaml("access_log:\n  enabled: true\n  path: access.log")
        .start();
    for stall in [true, false] {
        let mut conn = tg.proxy_connection();
        conn.write_all(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let head = wire::read_head(&mut reader).unwrap().expect("an answer");
        assert_eq!(head.status(), 401);
        let body = wire::read_response_body(&mut reader, &head, "POST");
        assert_eq!(
            (body.bytes.as_slice(), body.truncated),
            (&b"nope"[..], false)
        );
        if stall {
            assert!(
                crate::support::closed_within(&mut conn, Duration::from_secs(10)),
                "the body timeout ends the connection"
            );
        }
    }
    let counted = |scrape: &str| -> Vec<(&str, u64)> {
        ["proxied", "408", "client_closed", "502", "400"]
            .into_iter()
            .map(|r| (r, requests_total(scrape, "none", r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    assert!(wait_until(Duration::from_secs(5), || {
        counted(&tg.metrics()).iter().map(|(_, n)| n).sum::<u64>() == 2
    }));
    assert_eq!(counted(&tg.metrics()), vec![("proxied", 2)]);
    let log = std::fs::read_to_string(tg.dir.path().join("access.log")).unwrap();
    assert_eq!(log.matches(r#""status":401"#).count(), 2, "{log}");
}
