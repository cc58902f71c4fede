//! Rate limits as clients see them: headers, 429s, recovery, exemptions, concurrency caps and
//! throttled token guessing. Windows are shortened to seconds so recovery is observable.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::tollgate::Tollgate;
use crate::support::{client, error_type, Origin, TollgateBuilder};

fn header(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// The status of `GET /a` with `token` as the Bearer token.
fn status_with(tg: &Tollgate, token: &str) -> u16 {
    client()
        .get(tg.url("/a"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// Starts a request to `/slow` that the origin holds for 1.5 s (with `token`, if any), and
/// returns once the origin has it: the request holds a concurrency slot until joined.
fn hold_a_slot(
    tg: &Tollgate,
    origin: &Origin,
    token: Option<&str>,
) -> std::thread::JoinHandle<u16> {
    let seen = origin.count();
    let (url, token) = (tg.url("/slow"), token.map(str::to_string));
    let held = std::thread::spawn(move || {
        let mut request = client().get(url).header("x-origin-delay-ms", "1500");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        // The whole response, as a client finishing one request before its next one: the
        // slot must be free once the last byte arrived.
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        response.bytes().unwrap();
        status
    });
    assert!(crate::support::wait_until(
        Duration::from_secs(5),
        || origin.count() > seen
    ));
    held
}

#[test]
fn flood_gets_429_with_headers_then_recovers() {
    let origin = Origin::start();
    // 3 requests per 2-second window.
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 90\n  window_seconds: 2")
        .start();
    let http = client();
    let mut last_remaining = u32::MAX;
    for _ in 0..3 {
        let resp = http.get(tg.url("/a")).send().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit").as_deref(), Some("3"));
        let remaining: u32 = header(&resp, "x-ratelimit-remaining")
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < last_remaining);
        if last_remaining == u32::MAX {
            // Counted after this request (the older proxy said 3 here: before it).
            assert_eq!(remaining, 2);
        }
        last_remaining = remaining;
        assert!(
            header(&resp, "x-ratelimit-reset")
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 1_700_000_000_000
        );
    }
    let resp = http.get(tg.url("/a")).send().unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = header(&resp, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!((1..=4).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&resp, "x-ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(header(&resp, "x-ratelimit-limit").as_deref(), Some("3"));
    let body: Value = resp.json().unwrap();
    assert_eq!(error_type(&body), "proxy_rate_limited");
    assert_eq!(
        origin.count(),
        3,
        "refused requests never reach the upstream"
    );
    std::thread::sleep(Duration::from_secs(retry_after));
    assert_eq!(
        http.get(tg.url("/a")).send().unwrap().status(),
        200,
        "back after Retry-After"
    );
}

#[test]
fn users_are_limited_per_token_and_special_users_are_exempt() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("rate_limit:\n  requests_per_minute: 2")
        .start();
    let (a, b) = (tg.create_user(json!({})), tg.create_user(json!({})));
    let special = tg.create_user(json!({"type": "special"}));
    let status = |token: &str| status_with(&tg, token);
    assert_eq!((status(&a), status(&a), status(&a)), (200, 200, 429));
    assert_eq!(
        status(&b),
        200,
        "another user on the same IP has its own budget"
    );
    for _ in 0..5 {
        assert_eq!(status(&special), 200);
    }
}

/// As in the older proxy: a user's budget follows its token across addresses, and a request
/// carrying `ADMIN_KEY` is anonymous, limited per client IP like one without a user.
#[test]
fn a_users_budget_follows_its_token_across_ips_and_the_admin_key_is_limited_per_ip() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("trusted_proxies: [\"127.0.0.1\"]")
        .yaml("rate_limit:\n  requests_per_minute: 2")
        .start();
    let token = tg.create_user(json!({}));
    let from = |bearer: &str, ip: &str| {
        client()
            .get(tg.url("/a"))
            .bearer_auth(bearer)
            .header("x-forwarded-for", ip)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        (
            from(&token, "198.51.100.1"),
            from(&token, "198.51.100.2"),
            from(&token, "198.51.100.3")
        ),
        (200, 200, 429),
        "one budget for the token, whatever the address"
    );
    let admin_key = crate::support::tollgate::ADMIN_KEY;
    assert_eq!(
        (
            from(admin_key, "203.0.113.1"),
            from(admin_key, "203.0.113.1"),
            from(admin_key, "203.0.113.1")
        ),
        (200, 200, 429)
    );
    assert_eq!(
        from(admin_key, "203.0.113.2"),
        200,
        "another address has its own budget"
    );
}

#[test]
fn special_users_are_exempt_from_the_rate_but_not_from_max_inflight() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("rate_limit:\n  requests_per_minute: 1\n  max_inflight: 1")
        .start();
    let special = tg.create_user(json!({"type": "special"}));
    let slow = hold_a_slot(&tg, &origin, Some(&special));
    let resp = client()
        .get(tg.url("/a"))
        .bearer_auth(&special)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(
        header(&resp, "x-ratelimit-limit").is_none(),
        "no rate budget applies"
    );
    assert_eq!(
        error_type(&resp.json().unwrap()),
        "proxy_concurrency_limited"
    );
    assert_eq!(slow.join().unwrap(), 200);
    for _ in 0..3 {
        let resp = client()
            .get(tg.url("/a"))
            .bearer_auth(&special)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200, "over 1 per minute, one at a time");
    }
}

#[test]
fn failed_authentications_throttle_the_ip() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("rate_limit:\n  requests_per_minute: 1000\n  auth_failures_per_minute: 3")
        .start();
    let token = tg.create_user(json!({}));
    let http = client();
    for i in 0..3 {
        let resp = http
            .get(tg.url("/a"))
            .bearer_auth(format!("guess-{i}"))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let resp = http
        .get(tg.url("/a"))
        .bearer_auth("guess-4")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(header(&resp, "retry-after").is_some());
    let resp = http.get(tg.url("/a")).bearer_auth(&token).send().unwrap();
    assert_eq!(resp.status(), 429, "the IP is throttled, whatever it sends");
}

#[test]
fn concurrent_requests_beyond_max_inflight_get_429_and_slots_come_back() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 0\n  max_inflight: 2")
        .start();
    let slow: Vec<_> = (0..2).map(|_| hold_a_slot(&tg, &origin, None)).collect();
    let resp = client().get(tg.url("/a")).send().unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(
        error_type(&resp.json().unwrap()),
        "proxy_concurrency_limited"
    );
    for handle in slow {
        assert_eq!(handle.join().unwrap(), 200);
    }
    assert_eq!(
        client().get(tg.url("/a")).send().unwrap().status(),
        200,
        "slots released"
    );
    let metrics = tg.metrics();
    assert!(
        metrics.contains("\ntollgate_rate_limited_clients 1\n"),
        "the IP refused for concurrency: {metrics}"
    );
}

/// A concurrency refusal carries the request-rate headers a success would (the rate did not
/// refuse it) and is not counted against the rate.
#[test]
fn a_concurrency_refusal_reports_the_rate_budget_and_is_not_counted() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 60\n  max_inflight: 1")
        .start();
    let slow = hold_a_slot(&tg, &origin, None);
    let resp = client().get(tg.url("/a")).send().unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("1"));
    assert_eq!(header(&resp, "x-ratelimit-limit").as_deref(), Some("60"));
    assert_eq!(
        header(&resp, "x-ratelimit-remaining").as_deref(),
        Some("59"),
        "only the running request is counted"
    );
    assert!(header(&resp, "x-ratelimit-reset").is_some());
    assert_eq!(
        error_type(&resp.json().unwrap()),
        "proxy_concurrency_limited"
    );
    assert_eq!(slow.join().unwrap(), 200);
    let resp = client().get(tg.url("/a")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-ratelimit-remaining").as_deref(),
        Some("58"),
        "the refused request was not counted"
    );
}

#[test]
fn a_client_that_disconnects_releases_its_slot() {
    use std::io::Write;
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 0\n  max_inflight: 1")
        .start();
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", tg.proxy_port)).unwrap();
        write!(
            s,
            "GET /slow HTTP/1.1\r\nHost: x\r\nx-origin-delay-ms: 500\r\n\r\n"
        )
        .unwrap();
        assert!(crate::support::wait_until(
            Duration::from_secs(5),
            || origin.count() == 1
        ));
    } // dropped mid-request
    assert!(crate::support::wait_until(Duration::from_secs(5), || {
        client().get(tg.url("/a")).send().unwrap().status() == 200
    }));
}

#[test]
fn metrics_count_each_rate_limited_client_once() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("rate_limit:\n  requests_per_minute: 1\n  auth_failures_per_minute: 1")
        .start();
    let (a, b, c) = (
        tg.create_user(json!({})),
        tg.create_user(json!({})),
        tg.create_user(json!({})),
    );
    let status = |token: &str| status_with(&tg, token);
    let statuses: Vec<u16> = [&a, &a, &a, &a, &b, &b, &c].map(|t| status(t)).to_vec();
    assert_eq!(statuses, [200, 429, 429, 429, 200, 429, 200]);
    let scrape = || tg.metrics();
    assert!(
        scrape().contains("\ntollgate_rate_limited_clients 2\n"),
        "two users refused, one of them three times: {}",
        scrape()
    );
    // A throttled IP (failed authentications) is a client too.
    assert_eq!((status("guess-1"), status("guess-2")), (401, 429));
    assert!(
        scrape().contains("\ntollgate_rate_limited_clients 3\n"),
        "{}",
        scrape()
    );
}

/// A client that sends each request on a new connection once it has the whole previous
/// answer never runs two at once: under `max_inflight: 1` none of them is refused. The slot
/// is freed before the answer's last byte is written; freed after it (when the request's
/// context goes, after `logging`), the next request could arrive first.
#[test]
fn sequential_requests_never_find_their_own_slot_taken() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 0\n  max_inflight: 1")
        .start();
    let refused = (0..1000)
        .filter(|_| {
            let mut conn = tg.proxy_connection();
            crate::support::one_exchange(&mut conn, "/a") != "HTTP/1.1 200 OK"
        })
        .count();
    assert_eq!(
        refused, 0,
        "requests refused while the client had none running"
    );
}
