//! A seeded, randomized differential check of what passes through tollgate: a scripted origin
//! records every request byte for byte and answers with a randomly chosen shape; a client on
//! raw sockets sends randomized requests through tollgate (mode `none`, and `proxy_key` and
//! `user_token` where every credential is stripped), on kept-alive connections, sometimes
//! pipelined, sometimes as an HTTP/1.0 client, with `Expect: 100-continue` or
//! `Connection: close`, or giving up halfway through its body. Per exchange:
//!
//! - the origin got the client's request (method, target, each header's lines in order and
//!   case, body bytes) except the documented changes: the credential removed (all of them in
//!   `proxy_key` and `user_token`, the one read in `none`), `Host` the upstream's own, one
//!   `X-Forwarded-For` that tollgate set, forwarding headers from an untrusted peer removed,
//!   hop-by-hop headers (and those `Connection` names) removed, a chunked body re-chunked
//!   (extensions and trailers dropped: Pingora's);
//! - the client got the origin's answer (interim `100`/`103` answers, status, each header's
//!   lines in order and case, `Set-Cookie` lines apart, body bytes, the `Content-Length` of
//!   `HEAD` and `304` answers) except the documented changes: `Access-Control-Allow-Origin`,
//!   the rate headers, `Date` (Pingora's own, as nginx's), `Connection`, `Keep-Alive` and the
//!   fields the origin's `Connection` names, and a body the origin ended by closing sent
//!   chunked (to an HTTP/1.0 client: as it came, without interim answers);
//! - an origin that closes mid-body leaves the client a visibly cut answer (never a complete
//!   one); one that closes without answering a `502`; the client's connection then serves the
//!   next request, and the answer to every request carries that request's own number (no
//!   pooled upstream connection carries what is left of another request or answer).
//!
//! The suite runs one seed (a few seconds per mode). To soak:
//! `TOLLGATE_SOAK_SEED=<n> TOLLGATE_SOAK_ITERATIONS=<k> TOLLGATE_SOAK_EXCHANGES=<m> cargo
//! nextest run --test e2e proxying::soak` (iteration `i` uses seed `n + i`; the failing seed
//! is in the panic message).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::origin::{RawRequest, Script, ScriptedOrigin};
use crate::support::soak::{env_u64, for_each_seed, Rng};
use crate::support::tollgate::{Tollgate, PROXY_KEY};
use crate::support::wire::{self, Body, Head, Lines};
use crate::support::TollgateBuilder;

/// The seed the suite runs with.
const DEFAULT_SEED: u64 = 0x7011_6a7e;
/// Exchanges per mode and seed in the suite.
const DEFAULT_EXCHANGES: u64 = 200;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    None,
    ProxyKey,
    UserToken,
}

/// How the request body is framed by the client.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ReqFraming {
    None,
    Length,
    Chunked,
}

/// How the origin frames its answer's body.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RespFraming {
    /// No body by its status or the method (`HEAD`, 204, 304), with or without length headers.
    Bodiless,
    Length,
    Chunked,
    /// No length: the origin ends the body by closing.
    Close,
}

/// How the origin's answer ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    /// Complete; the origin keeps the connection.
    Complete,
    /// Complete, then the origin closes without saying so (a pooled connection goes stale).
    SilentClose,
    /// Part of the body, then the origin closes.
    Truncated,
    /// The origin closes without answering.
    Dropped,
}

struct Exchange {
    id: String,
    method: &'static str,
    /// What the client writes, its body from `body_at` on.
    request: Vec<u8>,
    body_at: usize,
    /// The client waits for `100 Continue` before it sends the body.
    expect_continue: bool,
    /// The client says `Connection: close`: the answer ends its connection.
    close: bool,
    /// An HTTP/1.0 client (the upstream still gets HTTP/1.1).
    http10: bool,
    /// The client closes its connection halfway through the body.
    abort: bool,
    /// What the origin must get: target, header lines (without `Host`, `X-Forwarded-For`
    /// and the framing headers, checked apart), body.
    target: Vec<u8>,
    headers: Lines,
    framing: ReqFraming,
    body: Vec<u8>,
    /// What the origin answers.
    interim: Vec<Head>,
    head: Head,
    resp_framing: RespFraming,
    resp_body: Vec<u8>,
    end: End,
    script: Script,
}

/// What the client read for one request.
#[derive(Debug)]
struct Received {
    interim: Vec<Head>,
    head: Head,
    body: Body,
}

fn pick<'a, T: ?Sized>(rng: &mut Rng, items: &[&'a T]) -> &'a T {
    items[rng.below(items.len())]
}

/// A header name in a random spelling (tollgate and Pingora keep the case).
fn spelled(rng: &mut Rng, name: &str) -> String {
    match rng.below(3) {
        0 => name.to_ascii_lowercase(),
        1 => name.to_string(),
        _ => name
            .chars()
            .map(|c| {
                if rng.chance(50) {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
    }
}

/// A header value: visible ASCII with inner spaces and tabs, sometimes obs-text bytes.
fn value(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = 1 + rng.below(max);
    let mut v: Vec<u8> = (0..len)
        .map(|_| match rng.below(20) {
            0 => b' ',
            1 => b'\t',
            2 if rng.chance(40) => 0x80 + rng.below(0x80) as u8,
            _ => b'!' + rng.below(94) as u8,
        })
        .collect();
    // No whitespace at either end: parsers trim it.
    for end in [0, v.len() - 1] {
        if v[end] == b' ' || v[end] == b'\t' {
            v[end] = b'v';
        }
    }
    v
}

fn body_bytes(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1 => 64 * 1024 + rng.below(400 * 1024),
        _ => 1 + rng.below(3000),
    };
    (0..len).map(|_| rng.next() as u8).collect()
}

/// A path and query with percent-encoded and reserved characters.
fn target(rng: &mut Rng) -> (String, Vec<String>) {
    let segments = [
        "v1",
        "a%20b",
        "%E2%82%AC",
        "x-y_z.~",
        "chat",
        "%2F",
        "a+b",
        "!$&'()*,;=:@",
    ];
    let mut path = String::new();
    for _ in 0..1 + rng.below(4) {
        path.push('/');
        path.push_str(pick(rng, &segments));
    }
    let params = [
        "a=1",
        "b=%2F%3F",
        "c=",
        "d=x+y",
        "e=%E2%82%AC",
        "monkey=1",
        "keys=2",
        "f",
    ];
    let query = (0..rng.below(4))
        .map(|_| pick(rng, &params).to_string())
        .collect();
    (path, query)
}

fn query_string(params: &[String]) -> String {
    if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    }
}

/// A random request and the origin's answer to it, with what each side must see.
/// `key`: the credential a protected mode takes (the proxy key, a user's token).
fn exchange(rng: &mut Rng, mode: Mode, key: &str, n: usize) -> Exchange {
    let id = format!("{n}");
    let method = pick(
        rng,
        &[
            "GET", "GET", "HEAD", "POST", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
        ],
    );
    let (path, mut query) = target(rng);
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    // Headers the origin must not get, by lowercase name.
    let mut removed: Vec<String> = Vec::new();
    sent.push(("Host".into(), b"tollgate.test".to_vec()));
    sent.push(("x-exchange".into(), id.clone().into_bytes()));
    let names = [
        "Accept",
        "Accept-Language",
        "Cache-Control",
        "User-Agent",
        "Cookie",
        "X-Request-Id",
        "X-Custom",
        "Content-Type",
        "If-None-Match",
        "Authorization-Extra",
    ];
    for _ in 0..rng.below(8) {
        let name = pick(rng, &names);
        let name = spelled(rng, name);
        for _ in 0..1 + usize::from(rng.chance(20)) * rng.below(4) {
            sent.push((name.clone(), value(rng, 60)));
        }
    }
    if rng.chance(5) {
        sent.push(("X-Big".into(), vec![b'b'; 4000 + rng.below(40_000)]));
    }
    if rng.chance(5) {
        for i in 0..50 + rng.below(150) {
            sent.push((format!("X-Many-{i}"), value(rng, 10)));
        }
    }
    if rng.chance(15) {
        sent.push(("Connection".into(), b"keep-alive, X-Hop".to_vec()));
        sent.push(("X-Hop".into(), b"for tollgate only".to_vec()));
        removed.extend(["connection".into(), "x-hop".into()]);
    }
    for (name, v) in [
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
    ] {
        if rng.chance(5) {
            sent.push((name.into(), v.as_bytes().to_vec()));
            removed.push(name.to_ascii_lowercase());
        }
    }
    // Credentials: in proxy_key mode at least one place holds the key and every place is
    // stripped; in none mode any junk, and only the place read (the first) is stripped.
    let key = match mode {
        Mode::None => format!("junk-{n}"),
        _ => key.to_string(),
    };
    let mut places: Vec<usize> = (0..3).filter(|_| rng.chance(40)).collect();
    if mode != Mode::None && places.is_empty() {
        places.push(rng.below(3));
    }
    let bearer = places.contains(&0);
    let api_key = places.contains(&1);
    let query_key = places.contains(&2);
    if bearer {
        let scheme = pick(rng, &["Bearer", "bearer", "BEARER"]);
        sent.push((
            spelled(rng, "Authorization"),
            format!("{scheme} {key}").into_bytes(),
        ));
    } else if rng.chance(15) {
        // Another scheme is not a tollgate credential: it goes on.
        sent.push(("Authorization".into(), b"Basic dXNlcjpwYXNz".to_vec()));
    }
    if api_key {
        sent.push((spelled(rng, "X-Api-Key"), key.clone().into_bytes()));
    }
    let mut expected_query = query.clone();
    if query_key {
        let at = rng.below(query.len() + 1);
        query.insert(at, format!("key={key}"));
    }
    let read = if bearer {
        0
    } else if api_key {
        1
    } else {
        2
    };
    let strip = |place: usize| match mode {
        Mode::None => place == read,
        _ => true,
    };
    if bearer && strip(0) {
        removed.push("authorization".into());
    }
    if api_key && strip(1) {
        removed.push("x-api-key".into());
    }
    if !(query_key && strip(2)) {
        expected_query = query.clone();
    }
    // Shuffle all but `Host` (first, as clients send it).
    for i in (2..sent.len()).rev() {
        let j = 1 + rng.below(i);
        sent.swap(i, j);
    }

    // Sometimes an HTTP/1.0 client: no chunked body, and a body ended by the close is all
    // it can be sent.
    let http10 = rng.chance(6);
    let framing = match (method, rng.below(10)) {
        ("POST" | "PUT" | "PATCH", 0) | ("GET" | "HEAD" | "DELETE" | "OPTIONS", 0..=6) => {
            ReqFraming::None
        }
        (_, n) if n % 2 == 0 && !http10 => ReqFraming::Chunked,
        _ => ReqFraming::Length,
    };
    let body = match framing {
        ReqFraming::None => Vec::new(),
        _ => body_bytes(rng),
    };
    // tollgate answers `100 Continue` itself; the origin gets no `Expect`.
    let expect_continue = !http10 && !body.is_empty() && rng.chance(8);
    if expect_continue {
        sent.push(("Expect".into(), b"100-continue".to_vec()));
        removed.push("expect".into());
    }
    // Sometimes the client gives up halfway through its body and closes.
    let abort = !expect_continue && body.len() > 10 && rng.chance(3);
    let close = !removed.iter().any(|r| r == "connection") && rng.chance(5);
    if close {
        sent.push((spelled(rng, "Connection"), b"close".to_vec()));
        removed.push("connection".into());
    }
    let version = if http10 { "1.0" } else { "1.1" };
    let mut request =
        format!("{method} {path}{} HTTP/{version}\r\n", query_string(&query)).into_bytes();
    for (name, v) in &sent {
        request.extend_from_slice(name.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(v);
        request.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length => {
            request.extend_from_slice(content_length(rng, body.len()).as_bytes());
        }
        ReqFraming::Chunked => request.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    request.extend_from_slice(b"\r\n");
    let body_at = request.len();
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length => request.extend_from_slice(&body),
        ReqFraming::Chunked => {
            let extension = if rng.chance(30) { ";ext=1" } else { "" };
            let trailers: &[(&str, &str)] = if rng.chance(30) {
                &[("X-Trailer", "t")]
            } else {
                &[]
            };
            let piece = 1 + rng.below(body.len().max(1) + 10);
            request.extend_from_slice(&wire::chunked(&body, piece, extension, trailers));
        }
    }
    let headers = sent
        .iter()
        .filter(|(name, _)| {
            let lower = name.to_ascii_lowercase();
            !removed.contains(&lower) && lower != "host"
        })
        .map(|(name, v)| (name.clone().into_bytes(), v.clone()))
        .collect();
    let (interim, head, resp_framing, resp_body, end, script) = answer(rng, method, &id);
    Exchange {
        id,
        method,
        request,
        body_at,
        expect_continue,
        close,
        http10,
        abort,
        target: format!("{path}{}", query_string(&expected_query)).into_bytes(),
        headers,
        framing,
        body,
        interim,
        head,
        resp_framing,
        resp_body,
        end,
        script,
    }
}

/// `Content-Length` header lines for `length`: mostly one, sometimes the same number twice,
/// as a list or on two lines (the upstream and the client must get one value).
fn content_length(rng: &mut Rng, length: usize) -> String {
    match rng.below(20) {
        0 => format!("Content-Length: {length}, {length}\r\n"),
        1 => format!("Content-Length: {length}\r\ncontent-length: {length}\r\n"),
        _ => format!("Content-Length: {length}\r\n"),
    }
}

fn head_bytes(head: &Head) -> Vec<u8> {
    let mut out = head.line.clone();
    out.extend_from_slice(b"\r\n");
    for (name, v) in &head.headers {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

type Answer = (Vec<Head>, Head, RespFraming, Vec<u8>, End, Script);

/// The origin's answer to a request of `method`, as a script and as the parts to check.
fn answer(rng: &mut Rng, method: &str, id: &str) -> Answer {
    let mut interim = Vec::new();
    if rng.chance(10) {
        interim.push(Head {
            line: b"HTTP/1.1 100 Continue".to_vec(),
            headers: Vec::new(),
        });
    }
    if rng.chance(10) {
        interim.push(Head {
            line: b"HTTP/1.1 103 Early Hints".to_vec(),
            headers: vec![(
                b"Link".to_vec(),
                b"</style.css>; rel=preload; as=style".to_vec(),
            )],
        });
    }
    let (status, reason) = pick(
        rng,
        &[
            &(200, "OK"),
            &(200, "OK"),
            &(200, "Totally Fine"),
            &(201, "Created"),
            &(204, "No Content"),
            &(206, "Partial Content"),
            &(299, "Custom"),
            &(301, "Moved Permanently"),
            &(304, "Not Modified"),
            &(404, "Not Found"),
            &(418, "I'm a teapot"),
            &(500, "Internal Server Error"),
            &(503, "Service Unavailable"),
        ],
    );
    let mut headers: Lines = vec![(
        spelled(rng, "X-Exchange-Reply").into_bytes(),
        id.as_bytes().to_vec(),
    )];
    for i in 0..rng.below(5) {
        headers.push((
            spelled(rng, "Set-Cookie").into_bytes(),
            format!("c{i}=v{i}, w{i}; Path=/; HttpOnly").into_bytes(),
        ));
    }
    let names = [
        "Content-Type",
        "Cache-Control",
        "ETag",
        "Vary",
        "X-Origin",
        "Server",
        "Link",
    ];
    for _ in 0..rng.below(6) {
        let name = pick(rng, &names);
        let name = spelled(rng, name);
        headers.push((name.into_bytes(), value(rng, 50)));
    }
    if rng.chance(10) {
        headers.push((b"Date".to_vec(), b"Sun, 06 Nov 1994 08:49:37 GMT".to_vec()));
    }
    if rng.chance(5) {
        headers.push((b"X-Big".to_vec(), vec![b'r'; 4000 + rng.below(60_000)]));
    }
    if rng.chance(5) {
        for i in 0..50 + rng.below(150) {
            headers.push((format!("X-Many-{i}").into_bytes(), value(rng, 10)));
        }
    }
    if rng.chance(5) {
        headers.push((b"Keep-Alive".to_vec(), b"timeout=5, max=100".to_vec()));
    }
    if rng.chance(8) {
        // About the origin's connection only: not for the client.
        headers.push((
            spelled(rng, "Connection").into_bytes(),
            b"keep-alive, X-Hop-Answer".to_vec(),
        ));
        headers.push((b"X-Hop-Answer".to_vec(), b"for tollgate only".to_vec()));
    }
    for i in (1..headers.len()).rev() {
        let j = rng.below(i + 1);
        headers.swap(i, j);
    }
    let bodiless = method == "HEAD" || *status == 204 || *status == 304;
    let resp_framing = if bodiless {
        RespFraming::Bodiless
    } else {
        match rng.below(10) {
            0..=3 => RespFraming::Length,
            4..=7 => RespFraming::Chunked,
            _ => RespFraming::Close,
        }
    };
    let body = if bodiless {
        Vec::new()
    } else {
        body_bytes(rng)
    };
    let end = match (resp_framing, rng.below(100)) {
        (RespFraming::Close, _) => End::SilentClose,
        (_, 0..=3) => End::Dropped,
        (RespFraming::Length | RespFraming::Chunked, 4..=10) if body.len() > 1 => End::Truncated,
        (_, 11..=20) => End::SilentClose,
        _ => End::Complete,
    };
    match resp_framing {
        RespFraming::Length => {
            let name = spelled(rng, "Content-Length").into_bytes();
            let length = body.len().to_string().into_bytes();
            match rng.below(20) {
                0 => headers.push((name, [&length[..], b", ", &length].concat())),
                1 => headers.extend([(name.clone(), length.clone()), (name, length)]),
                _ => headers.push((name, length)),
            }
        }
        RespFraming::Chunked => headers.push((
            spelled(rng, "Transfer-Encoding").into_bytes(),
            b"chunked".to_vec(),
        )),
        RespFraming::Bodiless if *status != 204 => match rng.below(3) {
            // The length the body would have had.
            0 => headers.push((
                b"Content-Length".to_vec(),
                rng.below(5000).to_string().into_bytes(),
            )),
            1 if method == "HEAD" => {
                headers.push((b"Transfer-Encoding".to_vec(), b"chunked".to_vec()))
            }
            _ => {}
        },
        _ => {}
    }
    let head = Head {
        line: format!("HTTP/1.1 {status} {reason}").into_bytes(),
        headers,
    };
    let mut pieces: Vec<Vec<u8>> = interim.iter().map(head_bytes).collect();
    pieces.push(head_bytes(&head));
    let mut wire_body = match resp_framing {
        RespFraming::Chunked => {
            let extension = if rng.chance(30) { ";x=y" } else { "" };
            let trailers: &[(&str, &str)] = if rng.chance(30) {
                &[("X-Checksum", "abc")]
            } else {
                &[]
            };
            wire::chunked(
                &body,
                1 + rng.below(body.len().max(1) + 10),
                extension,
                trailers,
            )
        }
        _ => body.clone(),
    };
    if end == End::Truncated {
        wire_body.truncate(1 + rng.below(wire_body.len().min(body.len()) - 1));
    }
    // The body in up to four writes.
    let parts = 1 + rng.below(4);
    let size = wire_body.len().div_ceil(parts).max(1);
    pieces.extend(wire_body.chunks(size).map(<[u8]>::to_vec));
    if end == End::Dropped {
        interim.clear();
        pieces.clear();
    }
    let script = Script {
        pieces,
        pause: Duration::from_millis(if rng.chance(10) {
            1 + rng.below(30) as u64
        } else {
            0
        }),
        read_pause: Duration::from_millis(if rng.chance(5) {
            1 + rng.below(30) as u64
        } else {
            0
        }),
        close: end != End::Complete,
    };
    (interim, head, resp_framing, body, end, script)
}

/// A client connection to tollgate and its reader (answers to pipelined requests may be
/// buffered there).
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(tg: &Tollgate) -> Self {
        let stream = tg.proxy_connection();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    /// The answer to a request of `method`; `None` when the connection ended before one.
    fn receive(&mut self, method: &str) -> Option<Received> {
        let mut interim = Vec::new();
        loop {
            let head = wire::read_head(&mut self.reader).ok()??;
            if (100..200).contains(&head.status()) {
                interim.push(head);
                continue;
            }
            let body = wire::read_response_body(&mut self.reader, &head, method);
            return Some(Received {
                interim,
                head,
                body,
            });
        }
    }
}

fn lower(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_ascii_lowercase()
}

fn without(headers: &[(Vec<u8>, Vec<u8>)], names: &[&str]) -> Lines {
    headers
        .iter()
        .filter(|(n, _)| !names.contains(&lower(n).as_str()))
        .cloned()
        .collect()
}

/// Header lines by lowercase name, each name's lines in their order. HTTP gives no meaning to
/// the order of lines with different names, and Pingora's header map moves a repeated name's
/// lines together; the order of one name's lines is kept, as it must be (`Set-Cookie`).
fn grouped(headers: &[(Vec<u8>, Vec<u8>)]) -> BTreeMap<String, Lines> {
    let mut map: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for (name, v) in headers {
        map.entry(lower(name))
            .or_default()
            .push((name.clone(), v.clone()));
    }
    map
}

fn show_headers(headers: &[(Vec<u8>, Vec<u8>)]) -> String {
    headers
        .iter()
        .map(|(n, v)| format!("{}: {}", wire::show(n), wire::show(v)))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// How what the origin received differs from what it should have.
fn check_request(ex: &Exchange, got: &RawRequest, upstream_host: &str, out: &mut Vec<String>) {
    let id = &ex.id;
    let expected_line = [ex.method.as_bytes(), b" ", &ex.target, b" HTTP/1.1"].concat();
    if got.head.line != expected_line {
        out.push(format!(
            "#{id}: origin got request line {:?}, expected {:?}",
            wire::show(&got.head.line),
            wire::show(&expected_line)
        ));
    }
    if got.head.all("host") != [upstream_host.as_bytes()] {
        out.push(format!("#{id}: origin got Host {:?}", got.head.all("host")));
    }
    if got.head.all("x-forwarded-for") != [b"127.0.0.1"] {
        out.push(format!(
            "#{id}: origin got X-Forwarded-For {:?}",
            got.head.all("x-forwarded-for")
        ));
    }
    let framing = [
        "host",
        "x-forwarded-for",
        "content-length",
        "transfer-encoding",
    ];
    let headers = without(&got.head.headers, &framing);
    if grouped(&headers) != grouped(&ex.headers) {
        out.push(format!(
            "#{id}: origin got headers\n    {}\n  expected\n    {}",
            show_headers(&headers),
            show_headers(&ex.headers)
        ));
    }
    let (cl, te) = (
        got.head.all("content-length"),
        got.head.all("transfer-encoding"),
    );
    let framing_ok = match ex.framing {
        ReqFraming::None => cl.is_empty() && te.is_empty(),
        ReqFraming::Length => cl == [ex.body.len().to_string().as_bytes()] && te.is_empty(),
        ReqFraming::Chunked => te == [b"chunked"] && cl.is_empty(),
    };
    // An empty chunked body sent again after a stale pooled connection goes without framing:
    // the same empty body.
    let retried_empty =
        ex.framing == ReqFraming::Chunked && ex.body.is_empty() && cl.is_empty() && te.is_empty();
    if !framing_ok && !retried_empty {
        out.push(format!(
            "#{id}: origin got Content-Length {cl:?} Transfer-Encoding {te:?} for a {:?} body of {}",
            ex.framing,
            ex.body.len()
        ));
    }
    if got.body.bytes != ex.body || got.body.truncated {
        out.push(format!(
            "#{id}: origin got a body of {} bytes (truncated: {}), sent {}",
            got.body.bytes.len(),
            got.body.truncated,
            ex.body.len()
        ));
    }
}

/// Headers tollgate adds to a relayed answer.
const ADDED: [&str; 5] = [
    "access-control-allow-origin",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "connection",
];

/// How an answer's head differs from the origin's, apart from framing.
fn check_head(id: &str, what: &str, sent: &Head, got: &Head, out: &mut Vec<String>) {
    let status_of = |line: &[u8]| line.splitn(2, |&b| b == b' ').nth(1).map(<[u8]>::to_vec);
    if status_of(&got.line) != status_of(&sent.line) || !got.line.starts_with(b"HTTP/1.1 ") {
        out.push(format!(
            "#{id}: {what}: status line {:?}, the origin's {:?}",
            wire::show(&got.line),
            wire::show(&sent.line)
        ));
    }
    // Pingora writes its own `Date` over the origin's, as nginx does.
    let own = [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
    ];
    let got_headers = without(&without(&got.headers, &ADDED), &own);
    // Nor does any field the origin's `Connection` names.
    let named: Vec<String> = sent
        .all("connection")
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|name| lower(name.trim_ascii()))
        .collect();
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    let sent_headers = without(&without(&sent.headers, &own), &named);
    if grouped(&got_headers) != grouped(&sent_headers) {
        out.push(format!(
            "#{id}: {what}: client got headers\n    {}\n  origin sent\n    {}",
            show_headers(&got_headers),
            show_headers(&sent_headers)
        ));
    }
    if got.all("access-control-allow-origin") != [b"*"] {
        out.push(format!(
            "#{id}: {what}: no single Access-Control-Allow-Origin"
        ));
    }
}

/// Pingora keeps the first 64 KiB of a request body to send it again when a pooled upstream
/// connection turns out closed; a larger body cannot be sent again (see operations.md).
const RETRY_BUFFER: usize = 64 * 1024;

/// Whether a request that met a pooled upstream connection the upstream had just closed is
/// sent again on a new one (Pingora's rule, as nginx's `proxy_next_upstream`): only an
/// idempotent one whose body fits the retry buffer. Others get tollgate's 502.
fn retried_after_a_stale_connection(ex: &Exchange) -> bool {
    ex.method != "POST" && ex.method != "PATCH" && ex.body.len() <= RETRY_BUFFER
}

/// How the client's answer differs from the origin's; whether the connection may serve the
/// next request. `stale`: the origin closed the pooled connection this request may reuse, and
/// it would not be sent again, so tollgate's 502 is a possible answer.
fn check_answer(ex: &Exchange, got: Option<Received>, stale: bool, out: &mut Vec<String>) -> bool {
    let id = &ex.id;
    let Some(got) = got else {
        out.push(format!(
            "#{id}: the connection ended without an answer ({:?})",
            ex.end
        ));
        return false;
    };
    let status = got.head.status();
    let tollgate_502 = status == 502 && got.head.get("x-exchange-reply").is_none();
    if tollgate_502 {
        // Only an answer that never came complete may become tollgate's own 502.
        if !matches!(ex.end, End::Dropped | End::Truncated) && !stale {
            out.push(format!(
                "#{id}: 502 for a {:?} answer to {} with a {:?} body of {}",
                ex.end,
                ex.method,
                ex.framing,
                ex.body.len()
            ));
        }
        return false;
    }
    if got.head.get("x-exchange-reply") != Some(ex.id.as_bytes()) {
        out.push(format!(
            "#{id}: got the answer of {:?} (status {status})",
            got.head.get("x-exchange-reply").map(wire::show)
        ));
        return false;
    }
    if ex.end == End::Dropped {
        out.push(format!("#{id}: an answer though the origin sent none"));
        return false;
    }
    let interim_lines: Vec<_> = got.interim.iter().map(|h| wire::show(&h.line)).collect();
    // HTTP/1.0 has no interim answers: its clients get none.
    let expected_interim = if ex.http10 { 0 } else { ex.interim.len() };
    if got.interim.len() != expected_interim {
        out.push(format!(
            "#{id}: interim answers {interim_lines:?}, the origin sent {}",
            ex.interim.len()
        ));
    } else {
        for (sent, received) in ex.interim.iter().zip(&got.interim) {
            let mut received = received.clone();
            received
                .headers
                .retain(|(n, _)| lower(n) != "access-control-allow-origin");
            received
                .headers
                .push((b"access-control-allow-origin".to_vec(), b"*".to_vec()));
            check_head(id, "interim", sent, &received, out);
        }
    }
    check_head(id, "answer", &ex.head, &got.head, out);
    let (cl, te) = (
        got.head.all("content-length"),
        got.head.all("transfer-encoding"),
    );
    let (sent_cl, sent_te) = (
        ex.head.all("content-length"),
        ex.head.all("transfer-encoding"),
    );
    let framing_ok = match ex.resp_framing {
        RespFraming::Bodiless if ex.http10 => cl == sent_cl && te.is_empty(),
        RespFraming::Bodiless => cl == sent_cl && te == sent_te,
        RespFraming::Length => cl == [ex.resp_body.len().to_string().as_bytes()] && te.is_empty(),
        // An HTTP/1.0 client cannot read chunks: the body ends with the connection.
        RespFraming::Chunked | RespFraming::Close if ex.http10 => te.is_empty() && cl.is_empty(),
        RespFraming::Chunked | RespFraming::Close => te == [b"chunked"] && cl.is_empty(),
    };
    if !framing_ok {
        out.push(format!(
            "#{id}: framing Content-Length {cl:?} Transfer-Encoding {te:?}, origin sent {sent_cl:?} {sent_te:?} ({:?})",
            ex.resp_framing
        ));
    }
    let body = &got.body;
    // A cut body ended by the close looks complete to an HTTP/1.0 client: HTTP/1.0 has no way
    // to tell it (nor has any proxy).
    let cut_visible = !(ex.http10 && ex.resp_framing != RespFraming::Length);
    if ex.end == End::Truncated {
        if !body.truncated && cut_visible {
            out.push(format!(
                "#{id}: the origin cut its body, the client got a complete one of {} bytes",
                body.bytes.len()
            ));
        }
        if !ex.resp_body.starts_with(&body.bytes) {
            out.push(format!(
                "#{id}: the cut body is not a prefix of the origin's"
            ));
        }
        return false;
    }
    if body.truncated || body.bytes != ex.resp_body {
        out.push(format!(
            "#{id}: body of {} bytes (truncated: {}), the origin sent {}",
            body.bytes.len(),
            body.truncated,
            ex.resp_body.len()
        ));
        return false;
    }
    let closing = got
        .head
        .get("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case(b"close"));
    if ex.close || ex.http10 {
        if !closing {
            out.push(format!(
                "#{id}: the client said Connection: close, the answer did not"
            ));
        }
        return false;
    }
    if closing {
        out.push(format!(
            "#{id}: the client connection was closed after a complete answer"
        ));
        return false;
    }
    true
}

/// Runs `exchanges` randomized exchanges through tollgate in `mode`; the mismatches found.
fn soak_mode(seed: u64, mode: Mode, exchanges: usize) -> (Vec<String>, usize) {
    let mut rng = Rng::new(seed ^ mode as u64);
    let origin = ScriptedOrigin::start();
    let mut builder = TollgateBuilder::new(origin.addr).upstream_yaml("read_timeout_ms: 10000");
    builder = match mode {
        Mode::None => builder
            .mode("none")
            .yaml("rate_limit:\n  requests_per_minute: 0\n"),
        Mode::ProxyKey => builder
            .mode("proxy_key")
            .env("PROXY_KEY", PROXY_KEY)
            .yaml("rate_limit:\n  requests_per_minute: 10000000\n"),
        Mode::UserToken => builder
            .mode("user_token")
            .yaml("rate_limit:\n  requests_per_minute: 10000000\n"),
    };
    let tg = builder.start();
    let key = match mode {
        Mode::UserToken => tg.create_user(serde_json::json!({})),
        _ => PROXY_KEY.to_string(),
    };
    let upstream_host = origin.addr.to_string();
    let mut out = Vec::new();
    let mut conn = Conn::open(&tg);
    let mut n = 0;
    let mut reconnects = 0;
    let mut previous = End::Complete;
    let mut logged = 0;
    while n < exchanges {
        // Sometimes a pipeline of requests that all end cleanly.
        let mut batch = vec![exchange(&mut rng, mode, &key, n)];
        // Not right after a stale connection: a refused first request (502) closes the
        // client's connection under the others.
        if rng.chance(15) && previous != End::SilentClose {
            while batch.len() < 4 && rng.chance(60) {
                batch.push(exchange(&mut rng, mode, &key, n + batch.len()));
            }
            if batch.iter().any(|ex| {
                ex.end != End::Complete
                    || ex.expect_continue
                    || ex.close
                    || ex.http10
                    || ex.abort
                    || ex.request.len() > 16_384
                    || ex.resp_body.len() > 16_384
            }) {
                batch.truncate(1);
            }
        }
        n += batch.len();
        let mut wire = Vec::new();
        for ex in &batch {
            origin.script(&ex.id, ex.script.clone());
            wire.extend_from_slice(&ex.request);
        }
        let first = &batch[0];
        if first.abort {
            // Half the body, then the connection is gone: what tollgate does with the upstream
            // connection that got the head is checked by the exchanges that follow (a pooled
            // connection with half a body on it would garble the next request).
            let half = first.body_at + (wire.len() - first.body_at) / 2;
            let _ = conn.stream.write_all(&wire[..half]);
            reconnects += 1;
            conn = Conn::open(&tg);
            continue;
        }
        if first.expect_continue {
            // The head, tollgate's `100 Continue`, then the body.
            let continued = conn.stream.write_all(&wire[..first.body_at]).is_ok()
                && wire::read_head(&mut conn.reader)
                    .ok()
                    .flatten()
                    .is_some_and(|head| head.status() == 100);
            if !continued {
                out.push(format!("#{}: no 100 Continue from tollgate", first.id));
            }
            wire.drain(..first.body_at);
        }
        if conn.stream.write_all(&wire).is_err() {
            out.push(format!(
                "#{}: the kept-alive connection refused the request",
                batch[0].id
            ));
            reconnects += 1;
            conn = Conn::open(&tg);
            continue;
        }
        let mut keep = true;
        for ex in &batch {
            let before = out.len();
            let got = conn.receive(ex.method);
            let stale = previous == End::SilentClose && !retried_after_a_stale_connection(ex);
            let tollgate_502 = got.as_ref().is_some_and(|g| {
                g.head.status() == 502 && g.head.get("x-exchange-reply").is_none()
            });
            keep &= check_answer(ex, got, stale, &mut out);
            let received = origin.received(&ex.id);
            // An origin that closed without answering may get the request once more (Pingora
            // retries a request that failed on a reused connection before any answer).
            let copies_ok = match ex.end {
                _ if stale && tollgate_502 => received.len() <= 1,
                End::Dropped => (1..=2).contains(&received.len()),
                _ => received.len() == 1,
            };
            if !copies_ok {
                out.push(format!(
                    "#{}: the origin got {} copies",
                    ex.id,
                    received.len()
                ));
            }
            for got in &received {
                check_request(ex, got, &upstream_host, &mut out);
            }
            if out.len() > before {
                out.push(format!(
                    "  (#{} in a batch of {}; the origin's answer before ended {previous:?})",
                    ex.id,
                    batch.len()
                ));
            }
            previous = ex.end;
        }
        if out.len() > logged {
            // tollgate's warnings so far, for the diagnosis.
            let log = tg.log();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            out.push(format!(
                "  tollgate warned: {:?}",
                &warnings[warnings.len().saturating_sub(3)..]
            ));
            logged = out.len();
        }
        if !keep {
            reconnects += 1;
            conn = Conn::open(&tg);
        }
    }
    (out, reconnects)
}

fn soak_once(seed: u64, exchanges: usize) {
    for mode in [Mode::None, Mode::ProxyKey, Mode::UserToken] {
        let started = Instant::now();
        let (mismatches, reconnects) = soak_mode(seed, mode, exchanges);
        eprintln!(
            "proxy soak seed {seed} {mode:?}: {exchanges} exchanges, {reconnects} reconnects, {} s",
            started.elapsed().as_secs_f32()
        );
        assert!(
            mismatches.is_empty(),
            "seed {seed}, {mode:?}: {} mismatches:\n{}",
            mismatches.len(),
            mismatches
                .iter()
                .take(15)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn randomized_exchanges_pass_through_as_the_origin_and_client_sent_them() {
    let exchanges = env_u64("TOLLGATE_SOAK_EXCHANGES").unwrap_or(DEFAULT_EXCHANGES) as usize;
    for_each_seed(DEFAULT_SEED, |seed| soak_once(seed, exchanges));
}
