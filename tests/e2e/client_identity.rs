//! Who the client is, end to end: the client address tollgate resolves (from the TCP peer and,
//! behind trusted proxies, `X-Forwarded-For`) and what hangs on it: the block list, per-IP
//! rate and auth-failure limits, the connection cap, users' `ip` lists, the admin lockout, and
//! the `X-Forwarded-For` the upstream receives. Several clients come from loopback addresses
//! (127.0.0.x, `::1`), and IPv4-mapped peers from a dual-stack `[::]` listener.

use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::forwarding::{
    address_pool, expected_client, random_chain, random_length, random_net, Chain, Net,
};
use crate::support::soak::{for_each_seed, Rng};
use crate::support::sockets::connect_from;
use crate::support::tollgate::{Tollgate, ADMIN_KEY};
use crate::support::{error_type, one_exchange, read_answer, wait_until, Origin, TollgateBuilder};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// One request from `from` to `to`, with `head` (whole header lines) added: its status and
/// JSON body (the origin's echo of what it received, or tollgate's error).
fn request_from(from: &str, to: SocketAddr, head: &[u8]) -> (u16, Value) {
    let mut conn = connect_from(ip(from), to);
    let mut bytes = b"GET /who HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n".to_vec();
    bytes.extend_from_slice(head);
    bytes.extend_from_slice(b"\r\n");
    conn.write_all(&bytes).unwrap();
    let answer = read_answer(&mut BufReader::new(conn));
    let status = answer
        .status
        .split(' ')
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap();
    (
        status,
        serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
    )
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Authorization: Bearer {token}\r\n").into_bytes()
}

/// The `X-Forwarded-For` lines an answer says the origin received.
fn forwarded_seen(body: &Value) -> Value {
    body["headers"]["x-forwarded-for"].clone()
}

/// A new user allowed `max_ips` addresses; its token.
fn user_with_max_ips(tg: &Tollgate, max_ips: u32) -> String {
    let token = tg.create_user(json!({}));
    let (status, _) = tg.admin_call(
        reqwest::Method::PUT,
        &format!("/admin/users/{token}"),
        Some(json!({ "maxIps": max_ips })),
    );
    assert_eq!(status, 200);
    token
}

fn proxy_v4(tg: &Tollgate) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], tg.proxy_port))
}

/// The header lines of `chain`, as a trusted proxy (or a client) would send them.
fn forwarded_lines(chain: &Chain) -> Vec<u8> {
    let mut head = Vec::new();
    for line in &chain.lines {
        head.extend_from_slice(b"X-Forwarded-For: ");
        head.extend_from_slice(line);
        head.extend_from_slice(b"\r\n");
    }
    head
}

/// The client-IP model's spot check through the binary: random `trusted_proxies` (over loopback
/// and other addresses, mapped entries included), peers 127.0.0.x, their IPv4-mapped forms and
/// `::1`, and random `X-Forwarded-For` chains; the upstream must receive exactly one
/// `X-Forwarded-For`, the client the reference rule names. `TOLLGATE_SOAK_SEED` and
/// `TOLLGATE_SOAK_ITERATIONS` (support/soak.rs) replay or lengthen it.
#[test]
fn the_client_the_upstream_is_told_of_follows_the_model() {
    let origin = Origin::start();
    for_each_seed(1, |seed| {
        let mut rng = Rng::new(seed);
        let pool = address_pool();
        let loopback = [ip("127.0.0.1"), ip("127.0.0.2"), ip("::1")];
        let nets: Vec<Net> = (0..1 + rng.below(3))
            .map(|i| random_net(&mut rng, if i == 0 { &loopback } else { &pool }))
            .collect();
        let texts: Vec<String> = nets.iter().map(|n| format!("\"{}\"", n.text)).collect();
        let tg = TollgateBuilder::new(origin.addr)
            .mode("none")
            .dual_stack_listener()
            .yaml(&format!("trusted_proxies: [{}]", texts.join(", ")))
            .yaml("rate_limit:\n  requests_per_minute: 0")
            .start();
        let dual = tg.dual_stack_port.expect("a dual-stack listener");
        for step in 0..40 {
            let source = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"][rng.below(4)];
            let (to, peer) = match (source, rng.chance(50)) {
                ("::1", _) => (SocketAddr::new(ip("::1"), dual), ip("::1")),
                (v4, true) => (
                    SocketAddr::new(ip("127.0.0.1"), dual),
                    ip(&format!("::ffff:{v4}")),
                ),
                (v4, false) => (proxy_v4(&tg), ip(v4)),
            };
            let length = random_length(&mut rng);
            let chain = random_chain(&mut rng, &pool, length);
            let (status, body) = request_from(source, to, &forwarded_lines(&chain));
            let want = expected_client(peer, &chain, &nets);
            assert_eq!(
                (status, forwarded_seen(&body)),
                (200, json!([want.to_string()])),
                "seed {seed} step {step}: peer {peer} trusted_proxies {texts:?} \
                 X-Forwarded-For {:?}\nreplay: TOLLGATE_SOAK_SEED={seed}",
                chain
                    .lines
                    .iter()
                    .map(|l| String::from_utf8_lossy(l))
                    .collect::<Vec<_>>()
            );
        }
    });
}

/// From a peer that is not a trusted proxy, `X-Forwarded-For`, `Forwarded` and `X-Real-IP`
/// are the client's own words: they change neither the block list's answer, nor the per-IP
/// budget, nor a user's `ip` list and address limit, nor what the upstream is told.
#[test]
fn a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("trusted_proxies: [\"10.0.0.0/8\", \"::ffff:127.0.0.9\"]")
        .yaml("rate_limit:\n  requests_per_minute: 3")
        .env("IP_BLACKLIST", "203.0.113.0/24")
        .start();
    let to = proxy_v4(&tg);
    let forged = |i: usize| {
        format!(
            "X-Forwarded-For: 203.0.113.{i}, 10.0.0.1\r\nForwarded: for=203.0.113.{i}\r\n\
             X-Real-IP: 203.0.113.{i}\r\n"
        )
        .into_bytes()
    };
    // Anonymous (the admin key): limited per IP, by the peer, whatever the header says.
    let admin = bearer(ADMIN_KEY);
    for i in 1..=3 {
        let (status, body) = request_from("127.0.0.2", to, &[&admin[..], &forged(i)].concat());
        assert_eq!(
            (
                status,
                forwarded_seen(&body),
                body["headers"]["x-real-ip"].clone()
            ),
            (200, json!(["127.0.0.2"]), Value::Null),
            "request {i}: not blocked, the peer is the client"
        );
    }
    let (status, body) = request_from("127.0.0.2", to, &[&admin[..], &forged(4)].concat());
    assert_eq!((status, error_type(&body)), (429, "proxy_rate_limited"));
    assert_eq!(
        request_from("127.0.0.3", to, &admin).0,
        200,
        "another peer's own budget"
    );
    // A user allowed one address: rotating forged addresses neither trips the limit nor is
    // recorded.
    let token = user_with_max_ips(&tg, 1);
    for i in 5..=7 {
        let (status, _) =
            request_from("127.0.0.4", to, &[&bearer(&token)[..], &forged(i)].concat());
        assert_eq!(status, 200, "request {i}");
    }
    assert_eq!(tg.user(&token)["ip"], json!(["127.0.0.4"]));
}

/// One IPv6 subscriber (a /64) rotating its addresses is one client for the request budget
/// and for failed authentications, while a user's `maxIps` counts its distinct addresses (as
/// documented), and an IPv4-mapped address is the IPv4 address it maps.
#[test]
fn an_ipv6_64_is_one_client_for_limits_and_mapped_addresses_are_ipv4() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("trusted_proxies: [\"127.0.0.1\"]")
        .yaml("rate_limit:\n  requests_per_minute: 2\n  auth_failures_per_minute: 2")
        .start();
    let to = proxy_v4(&tg);
    let via = |client: &str, credential: &str| {
        let head = format!("X-Forwarded-For: {client}\r\nAuthorization: Bearer {credential}\r\n");
        request_from("127.0.0.1", to, head.as_bytes())
    };
    let statuses = |clients: &[&str], credential: &str| -> Vec<u16> {
        clients.iter().map(|c| via(c, credential).0).collect()
    };
    assert_eq!(
        statuses(
            &["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2::3"],
            ADMIN_KEY
        ),
        [200, 200, 429],
        "one budget for the /64"
    );
    assert_eq!(
        via("2001:db8:1:3::1", ADMIN_KEY).0,
        200,
        "the next /64 is another client"
    );
    assert_eq!(
        statuses(
            &[
                "198.51.100.7",
                "::ffff:198.51.100.7",
                "[::ffff:198.51.100.7]:99"
            ],
            ADMIN_KEY
        ),
        [200, 200, 429],
        "a mapped address shares its IPv4 address's budget"
    );
    assert_eq!(
        statuses(
            &["2001:db8:5:5::1", "2001:db8:5:5::2", "2001:db8:5:5::3"],
            "guess"
        ),
        [401, 401, 429],
        "failed authentications count per /64"
    );
    assert_eq!(via("2001:db8:5:6::1", "guess").0, 401);
    // maxIps counts addresses, not /64s; a mapped address is its IPv4 address. With the
    // user's budget of two spent, a known address gets 429 from the rate limit, and a new one
    // 403 from the gatekeeper, which comes first.
    let token = user_with_max_ips(&tg, 2);
    assert_eq!(
        statuses(
            &["2001:db8:9:9::1", "::ffff:192.0.2.1", "192.0.2.1"],
            &token
        ),
        [200, 200, 429]
    );
    let (status, body) = via("2001:db8:9:9::2", &token);
    assert_eq!(
        (status, body["error"]["message"].clone()),
        (
            403,
            json!("Forbidden: no more IP addresses allowed for this user token")
        )
    );
    assert_eq!(
        tg.user(&token)["ip"],
        json!(["2001:db8:9:9::1", "192.0.2.1"])
    );
}

/// On a dual-stack listener an IPv4 client is an IPv4-mapped IPv6 peer: it is its IPv4
/// address for the block list (CIDR edges included, and entries written mapped), the request
/// budget, the connection cap, a user's `ip` list and the upstream's `X-Forwarded-For`.
#[test]
fn an_ipv4_mapped_peer_is_its_ipv4_address() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .dual_stack_listener()
        .yaml("rate_limit:\n  requests_per_minute: 3")
        .yaml("clients:\n  max_connections_per_ip: 1")
        .env("IP_BLACKLIST", "127.0.0.2/31, ::ffff:127.0.0.6")
        .start();
    let v4 = proxy_v4(&tg);
    let mapped = SocketAddr::from(([127, 0, 0, 1], tg.dual_stack_port.unwrap()));
    for (client, blocked) in [
        ("127.0.0.1", false),
        ("127.0.0.2", true),
        ("127.0.0.3", true),
        ("127.0.0.4", false),
        ("127.0.0.5", false),
        ("127.0.0.6", true),
    ] {
        for to in [v4, mapped] {
            let (status, body) = request_from(client, to, b"");
            let want = if blocked {
                (403, Value::Null)
            } else {
                (200, json!([client]))
            };
            assert_eq!((status, forwarded_seen(&body)), want, "{client} to {to}");
        }
    }
    // 127.0.0.1 spent two of its three requests above, one per listener.
    assert_eq!(request_from("127.0.0.1", mapped, b"").0, 200);
    assert_eq!(
        request_from("127.0.0.1", v4, b"").0,
        429,
        "one budget on both listeners"
    );
    // One connection per address: held on one listener, refused on the other.
    let mut held = connect_from(ip("127.0.0.7"), v4);
    assert!(
        one_exchange(&mut held, "/held").ends_with("200 OK"),
        "counted once answered"
    );
    let (status, body) = request_from("127.0.0.7", mapped, b"");
    assert_eq!((status, error_type(&body)), (429, "too_many_connections"));
    drop(held);
}

/// A mapped peer's address is recorded in its IPv4 form, and known as such.
#[test]
fn a_user_reached_through_a_mapped_peer_records_its_ipv4_address() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .dual_stack_listener()
        .start();
    let mapped = SocketAddr::from(([127, 0, 0, 1], tg.dual_stack_port.unwrap()));
    let token = user_with_max_ips(&tg, 1);
    assert_eq!(request_from("127.0.0.8", mapped, &bearer(&token)).0, 200);
    assert_eq!(
        request_from("127.0.0.8", proxy_v4(&tg), &bearer(&token)).0,
        200
    );
    assert_eq!(
        request_from("127.0.0.9", proxy_v4(&tg), &bearer(&token)).0,
        403
    );
    assert_eq!(tg.user(&token)["ip"], json!(["127.0.0.8"]));
}

/// The proxy's failed-authentication throttle is per client and ends: another address is
/// not throttled meanwhile, and the throttled one gets in again once its failures left the
/// window (the older proxy's lockout never ended).
#[test]
fn the_auth_failure_throttle_is_per_client_and_ends() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("rate_limit:\n  auth_failures_per_minute: 60\n  window_seconds: 1")
        .start();
    let token = tg.create_user(json!({}));
    let to = proxy_v4(&tg);
    let statuses = |client: &str, credential: &str, n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| request_from(client, to, &bearer(credential)).0)
            .collect()
    };
    // One failure per 1 s window: guessing soon gets 429 (whatever it sends then:
    // rate_limit.rs), but another client is not throttled.
    let guesses = statuses("127.0.0.2", "guess", 4);
    assert!(
        guesses.starts_with(&[401]) && guesses.contains(&429),
        "{guesses:?}"
    );
    assert_eq!(statuses("127.0.0.3", &token, 1), [200]);
    assert!(
        wait_until(Duration::from_secs(10), || statuses("127.0.0.2", &token, 1)
            == [200]),
        "the throttle never ended"
    );
}

/// The admin listener's lockout is per client and ends, and a correct key afterwards starts
/// the count afresh.
#[test]
fn the_admin_lockout_is_per_client_and_ends() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .admin_yaml("lockout_after_failures: 2\nlockout_seconds: 2")
        .start();
    let admin = SocketAddr::from(([127, 0, 0, 1], tg.admin_port));
    let list = |client: &str, key: &str| {
        let mut conn = connect_from(ip(client), admin);
        write!(
            conn,
            "GET /admin/users HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\
             Authorization: Bearer {key}\r\n\r\n"
        )
        .unwrap();
        let answer = read_answer(&mut BufReader::new(conn));
        answer
            .status
            .split(' ')
            .nth(1)
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    assert_eq!([list("127.0.0.2", "x"), list("127.0.0.2", "y")], [401, 401]);
    assert_eq!(list("127.0.0.2", ADMIN_KEY), 429, "locked out");
    assert_eq!(list("127.0.0.3", ADMIN_KEY), 200, "only that client");
    assert!(
        wait_until(Duration::from_secs(10), || list("127.0.0.2", ADMIN_KEY)
            == 200),
        "the lockout never ended"
    );
    assert_eq!(
        list("127.0.0.2", "z"),
        401,
        "one failure after a success locks nothing"
    );
    assert_eq!(list("127.0.0.2", ADMIN_KEY), 200);
}

/// CGI and WSGI servers (and the frameworks on them) read `X_Real_IP` as `X-Real-IP`: both
/// become `HTTP_X_REAL_IP`. A forwarding header spelled with underscores is the client's, from
/// any peer, and must not reach the upstream as a second source of the client address.
#[test]
fn forwarding_headers_spelled_with_underscores_never_reach_the_upstream() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("trusted_proxies: [\"127.0.0.2\"]")
        .start();
    let head = b"X_Forwarded_For: 6.6.6.6\r\nx-forwarded_for: 6.6.6.7\r\nX_Real_IP: 6.6.6.6\r\n\
        Forwarded: for=7.7.7.7\r\nX_Forwarded_Host: evil.example\r\nX_Forwarded_Proto: https\r\n\
        X_Forwarded_Port: 1\r\nX_Client_IP: 6.6.6.6\r\nTrue_Client_IP: 6.6.6.6\r\n\
        X_Request_Id: kept\r\n";
    for (peer, forwarded) in [
        ("127.0.0.1", Value::Null),
        ("127.0.0.2", json!(["for=7.7.7.7"])),
    ] {
        let (status, body) = request_from(peer, proxy_v4(&tg), head);
        assert_eq!(status, 200);
        let names: Vec<&String> = body["headers"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|name| name.contains('_'))
            .collect();
        assert_eq!(names, ["x_request_id"], "from {peer}");
        assert_eq!(forwarded_seen(&body), json!([peer]));
        assert_eq!(body["headers"]["forwarded"], forwarded, "from {peer}");
    }
}
