//! What reaches the upstream, and what clients get when the upstream fails.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::tollgate::{Tollgate, ADMIN_KEY, PROXY_KEY};
use crate::support::{
    client, closed_within, error_type, free_port, free_ports, one_exchange, read_answer,
    wait_until, Origin, TollgateBuilder,
};

#[test]
fn the_credential_used_is_stripped_before_the_upstream() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).start();
    let token = tg.create_user(json!({}));
    let http = client();

    http.get(tg.url("/a")).bearer_auth(&token).send().unwrap();
    assert_eq!(origin.last().header("authorization"), None);

    http.get(tg.url("/a"))
        .header("x-api-key", &token)
        .send()
        .unwrap();
    assert_eq!(origin.last().header("x-api-key"), None);

    http.get(tg.url(&format!("/v1/models?key={token}&limit=5")))
        .send()
        .unwrap();
    assert_eq!(origin.last().uri, "/v1/models?limit=5");
}

/// A key sent in several places reaches the upstream through none of them, in both modes that
/// protect a key; another `Authorization` scheme is not a credential and is passed on.
#[test]
fn a_credential_sent_in_every_place_reaches_the_upstream_from_none() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).start();
    let token = tg.create_user(json!({}));
    let keyed = TollgateBuilder::new(origin.addr)
        .mode("proxy_key")
        .env("PROXY_KEY", PROXY_KEY)
        .start();
    let http = client();
    for (url, key) in [
        (tg.url("/v1/chat"), token.as_str()),
        (keyed.url("/v1/chat"), PROXY_KEY),
    ] {
        let resp = http
            .get(format!("{url}?key={key}&stream=true&key={key}"))
            .bearer_auth(key)
            .header("x-api-key", key)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let seen = origin.last();
        assert_eq!(seen.header("authorization"), None, "{seen:?}");
        assert_eq!(seen.header("x-api-key"), None, "{seen:?}");
        assert_eq!(seen.uri, "/v1/chat?stream=true");
    }

    http.get(tg.url("/a"))
        .header("authorization", "Basic dXNlcjpw")
        .header("x-api-key", &token)
        .send()
        .unwrap();
    let seen = origin.last();
    assert_eq!(seen.header("authorization"), Some("Basic dXNlcjpw"));
    assert_eq!(seen.header("x-api-key"), None);
}

/// `none` protects no key: as in the older proxy, only the credential read is removed.
#[test]
fn in_none_mode_only_the_credential_read_is_stripped() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    client()
        .get(tg.url("/a?key=q"))
        .bearer_auth("a")
        .header("x-api-key", "unrelated")
        .send()
        .unwrap();
    let seen = origin.last();
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("x-api-key"), Some("unrelated"));
    assert_eq!(seen.uri, "/a?key=q");
}

#[test]
fn forwarded_for_is_set_by_tollgate_not_the_client() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    client()
        .get(tg.url("/a"))
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .unwrap();
    let seen = origin.last();
    assert_eq!(
        seen.headers["x-forwarded-for"],
        vec!["127.0.0.1".to_string()]
    );
    // Behind a load balancer not listed in trusted_proxies (the older proxy trusted one hop
    // by default), every client would be the balancer: the operator is told, once.
    client()
        .get(tg.url("/a"))
        .header("x-forwarded-for", "7.7.7.7")
        .send()
        .unwrap();
    let log = tg.log();
    assert_eq!(
        log.matches("is not in trusted_proxies").count(),
        1,
        "warned once:\n{log}"
    );
    assert!(log.contains("requests from 127.0.0.1 carry X-Forwarded-For"));
}

#[test]
fn forwarded_for_from_a_trusted_proxy_is_believed_rightmost_untrusted_first() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("trusted_proxies: [\"127.0.0.1\", \"10.0.0.0/8\"]")
        .start();
    client()
        .get(tg.url("/a"))
        .header("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")
        .send()
        .unwrap();
    assert_eq!(origin.last().header("x-forwarded-for"), Some("203.0.113.9"));
}

/// `Forwarded`, `X-Real-IP` and the like from a client are not believed: removed, unless the
/// peer is a trusted proxy, whose own forwarding headers go on.
#[test]
fn other_forwarding_headers_pass_only_from_trusted_proxies() {
    let spoofed = [
        ("forwarded", "for=6.6.6.6;proto=https"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
    ];
    let send = |tg: &crate::support::tollgate::Tollgate| {
        let mut req = client().get(tg.url("/a")).header("x-request-id", "r1");
        for (name, value) in spoofed {
            req = req.header(name, value);
        }
        assert_eq!(req.send().unwrap().status(), 200);
    };
    let origin = Origin::start();
    let untrusted = TollgateBuilder::new(origin.addr).mode("none").start();
    send(&untrusted);
    let seen = origin.last();
    for (name, _) in spoofed {
        assert_eq!(seen.header(name), None, "{name} from an untrusted peer");
    }
    assert_eq!(seen.header("x-request-id"), Some("r1"));

    let trusted = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("trusted_proxies: [\"127.0.0.1\"]")
        .start();
    send(&trusted);
    let seen = origin.last();
    for (name, value) in spoofed {
        assert_eq!(
            seen.header(name),
            Some(value),
            "{name} from a trusted proxy"
        );
    }
}

#[test]
fn set_headers_reach_the_upstream_with_env_values() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml(
            "set_headers:\n  authorization: \"Bearer ${UPSTREAM_KEY}\"\n  x-tenant: edge",
        )
        .env("UPSTREAM_KEY", "sk-upstream")
        .start();
    client()
        .get(tg.url("/a"))
        .bearer_auth("client-token")
        .send()
        .unwrap();
    let seen = origin.last();
    assert_eq!(seen.header("authorization"), Some("Bearer sk-upstream"));
    assert_eq!(seen.header("x-tenant"), Some("edge"));
    assert!(
        !tg.log().contains("sk-upstream"),
        "secrets stay out of logs"
    );
}

/// The upstream gets its own name in `Host` (as from the older proxy's `changeOrigin` and
/// nginx), so a virtual host or TLS front end answers; `preserve_host` forwards the client's,
/// and `set_headers` wins over both.
#[test]
fn the_upstream_gets_its_own_host_unless_told_otherwise() {
    let origin = Origin::start();
    let seen_host = |tg: &Tollgate| {
        client()
            .get(tg.url("/a"))
            .header("host", "proxy.example.org")
            .send()
            .unwrap();
        origin.last().header("host").map(str::to_string)
    };
    let own = TollgateBuilder::new(origin.addr).mode("none").start();
    assert_eq!(seen_host(&own), Some(origin.addr.to_string()));
    let preserving = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("preserve_host: true")
        .start();
    assert_eq!(seen_host(&preserving).as_deref(), Some("proxy.example.org"));
    let set = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("set_headers:\n  host: api.example")
        .start();
    assert_eq!(seen_host(&set).as_deref(), Some("api.example"));
}

#[test]
fn requests_rotate_over_upstreams() {
    let (a, b) = (Origin::start(), Origin::start());
    let tg = TollgateBuilder::new(a.addr)
        .mode("none")
        .upstreams(&[a.addr.to_string(), b.addr.to_string()])
        .start();
    let http = client();
    for _ in 0..20 {
        assert_eq!(http.get(tg.url("/a")).send().unwrap().status(), 200);
    }
    assert!(
        a.count() >= 5 && b.count() >= 5,
        "a={} b={}",
        a.count(),
        b.count()
    );
}

#[test]
fn a_dead_upstream_is_skipped_when_another_is_up() {
    let live = Origin::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let tg = TollgateBuilder::new(live.addr)
        .mode("none")
        .upstreams(&[dead, live.addr.to_string()])
        .start();
    for _ in 0..6 {
        assert_eq!(client().get(tg.url("/a")).send().unwrap().status(), 200);
    }
}

/// Pingora logs a connection attempt that fails and is retried; it names the request without
/// its query string, where the client's key may be (it printed the raw path).
#[test]
fn a_retried_upstream_failure_is_logged_without_the_query_string() {
    let live = Origin::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let tg = TollgateBuilder::new(live.addr)
        .mode("proxy_key")
        .env("PROXY_KEY", PROXY_KEY)
        .upstreams(&[dead, live.addr.to_string()])
        .start();
    for _ in 0..2 {
        let resp = client()
            .get(tg.url(&format!("/retried?key={PROXY_KEY}")))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let log = tg.log();
    assert!(log.contains("Fail to proxy"), "no retry was logged:\n{log}");
    assert!(log.contains("GET /retried"), "{log}");
    assert!(!log.contains(PROXY_KEY), "the key leaked into:\n{log}");
}

/// With every upstream down, a request tries each one once, then answers 502 (it used to
/// retry up to Pingora's 16 times, possibly on the same dead upstream).
#[test]
fn each_upstream_is_tried_once_before_a_502() {
    let dead: Vec<String> = free_ports::<2>()
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let tg = TollgateBuilder::new(dead[0].parse().unwrap())
        .mode("none")
        .upstreams(&dead)
        .start();
    for _ in 0..3 {
        assert_eq!(client().get(tg.url("/a")).send().unwrap().status(), 502);
    }
    let metrics = tg.metrics();
    assert!(
        metrics.contains("tollgate_upstream_connect_failures_total 6"),
        "two attempts per request:\n{metrics}"
    );
}

/// tollgate's own 502 is JSON, logged once without the query, and shows the rate budget the
/// request was counted against, as any other answer does.
#[test]
fn upstream_down_is_a_502_json_error() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tg = TollgateBuilder::new(dead)
        .mode("none")
        .yaml("rate_limit:\n  requests_per_minute: 600\n")
        .start();
    let resp = client()
        .get(tg.url("/a?key=secret-in-query"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 502);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(header("x-ratelimit-limit").as_deref(), Some("600"));
    assert_eq!(header("x-ratelimit-remaining").as_deref(), Some("599"));
    assert!(header("x-ratelimit-reset").is_some());
    let body: Value = resp.json().unwrap();
    assert_eq!(error_type(&body), "upstream_error");
    let log = tg.log();
    assert_eq!(
        log.matches("upstream failure").count(),
        1,
        "logged once:\n{log}"
    );
    assert!(!log.contains("secret-in-query"));
}

#[test]
fn slow_upstream_is_a_504() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("read_timeout_ms: 200")
        .start();
    let resp = client()
        .get(tg.url("/slow"))
        .header("x-origin-delay-ms", "2000")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(error_type(&resp.json().unwrap()), "upstream_timeout");
}

#[test]
fn successful_requests_count_for_the_user_and_every_one_marks_it_used() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).start();
    let token = tg.create_user(json!({}));
    let http = client();
    for _ in 0..3 {
        http.get(tg.url("/a")).bearer_auth(&token).send().unwrap();
    }
    assert!(wait_until(Duration::from_secs(2), || tg.user(&token)
        ["promptCount"]
        == 3));
    let used = tg.user(&token)["lastUsedAt"].as_u64().unwrap();
    assert!(used > 0);
    // An upstream error is no successful generation (the older proxy's promptCount), but
    // the token was used.
    std::thread::sleep(Duration::from_millis(5));
    http.get(tg.url("/a"))
        .bearer_auth(&token)
        .header("x-origin-status", "500")
        .send()
        .unwrap();
    assert!(wait_until(Duration::from_secs(2), || tg.user(&token)
        ["lastUsedAt"]
        .as_u64()
        .unwrap()
        > used));
    assert_eq!(tg.user(&token)["promptCount"], 3);
}

#[test]
fn the_admin_api_is_not_served_on_the_proxy_listener() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).start();
    let resp = client()
        .get(tg.url("/admin/users"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().unwrap();
    assert_eq!(
        body["uri"], "/admin/users",
        "it went to the origin like any path"
    );
    assert!(body.get("users").is_none());
}

#[test]
fn tokens_never_reach_the_logs() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("access_log:\n  enabled: true")
        .start();
    let token = tg.create_user(json!({}));
    let http = client();
    http.get(tg.url("/a")).bearer_auth(&token).send().unwrap();
    http.get(tg.url(&format!("/a?key={token}"))).send().unwrap();
    http.get(tg.url("/a"))
        .bearer_auth("guess-123")
        .send()
        .unwrap();
    http.get(tg.admin_url("/admin/users"))
        .bearer_auth("wrong-admin-guess")
        .send()
        .unwrap();
    assert!(wait_until(Duration::from_secs(3), || tg
        .log()
        .matches("\"status\":")
        .count()
        >= 3));
    let log = tg.log();
    for secret in [token.as_str(), ADMIN_KEY, "guess-123", "wrong-admin-guess"] {
        assert!(!log.contains(secret), "{secret} leaked into:\n{log}");
    }
    let line = log
        .lines()
        .find(|l| l.contains("\"status\":200"))
        .expect("an access log line");
    let entry: Value = serde_json::from_str(line).unwrap();
    assert!(entry["user"].as_str().unwrap().starts_with("tok:"));
    assert_eq!(entry["path"], "/a");
}

#[test]
fn the_access_log_file_follows_rotation_and_logs_requests_that_end_during_shutdown() {
    let origin = Origin::start();
    let mut tg = TollgateBuilder::new(origin.addr)
        .yaml("access_log:\n  enabled: true\n  path: access.log")
        .yaml("pingora:\n  threads: 2\n  grace_period_seconds: 3\n  graceful_shutdown_timeout_seconds: 1")
        .start();
    let token = tg.create_user(json!({}));
    // A nickname made to look like another user's id cannot pass for one.
    let named = tg
        .admin_request(reqwest::Method::PUT, &format!("/admin/users/{token}"))
        .json(&json!({"nickname": "tok:000000000000"}))
        .send()
        .unwrap();
    assert_eq!(named.status(), 200);
    let log_path = tg.dir.path().join("access.log");
    let lines = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let http = client();
    http.get(tg.url("/first"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert!(wait_until(Duration::from_secs(3), || lines(&log_path)
        .len()
        == 1));
    let first = &lines(&log_path)[0];
    assert_eq!(first["path"], "/first");
    assert_eq!(first["nickname"], "tok:000000000000");
    let id = first["user"].as_str().unwrap();
    assert!(
        id.starts_with("tok:") && id != "tok:000000000000",
        "{first}"
    );

    // logrotate's default: the file is moved away, the next lines go to a new one.
    let rotated = tg.dir.path().join("access.log.1");
    std::fs::rename(&log_path, &rotated).unwrap();
    let mut sent = 1;
    assert!(
        wait_until(Duration::from_secs(5), || {
            http.get(tg.url("/second"))
                .bearer_auth(&token)
                .send()
                .unwrap();
            sent += 1;
            lines(&log_path).iter().any(|l| l["path"] == "/second")
        }),
        "no new file after rotation"
    );
    // Until tollgate noticed (within a second), lines still went to the moved file; none lost.
    let total = || lines(&rotated).len() + lines(&log_path).len();
    assert!(
        wait_until(Duration::from_secs(3), || total() == sent),
        "{} lines for {sent} requests",
        total()
    );

    // A request still in flight at SIGTERM is logged when it ends, during the grace period.
    let url = tg.url("/at-shutdown");
    let slow_token = token.clone();
    let slow = std::thread::spawn(move || {
        client()
            .get(url)
            .bearer_auth(slow_token)
            .header("x-origin-delay-ms", "1500")
            .send()
            .map(|r| r.status().as_u16())
    });
    assert!(wait_until(Duration::from_secs(5), || origin
        .seen()
        .iter()
        .any(|r| r.uri == "/at-shutdown")));
    tg.signal(libc::SIGTERM);
    assert_eq!(slow.join().unwrap().expect("answered"), 200);
    assert!(tg.wait_exit(Duration::from_secs(15)).is_some());
    assert!(
        lines(&log_path).iter().any(|l| l["path"] == "/at-shutdown"),
        "{:?}",
        lines(&log_path)
    );
}

#[test]
fn tokens_never_reach_the_logs_even_at_trace_level() {
    // Pingora prints whole request headers at trace level, and admin request lines (which
    // hold tokens) when a reply cannot be written.
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .env("RUST_LOG", "trace")
        .start();
    let token = tg.create_user(json!({}));
    let http = client();
    http.get(tg.url("/a")).bearer_auth(&token).send().unwrap();
    http.get(tg.url(&format!("/a?key={token}"))).send().unwrap();
    let resp = tg
        .admin_request(reqwest::Method::GET, &format!("/admin/users/{token}"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let log = tg.log();
    assert!(log.contains("DEBUG"), "verbose logging is on:\n{log}");
    for secret in [token.as_str(), ADMIN_KEY] {
        assert!(!log.contains(secret), "{secret} leaked into:\n{log}");
    }
}

/// The upstream's key (`set_headers`) is written to the upstream as raw bytes, which Pingora's
/// HTTP client logs at trace level; no redaction of header values reaches those lines.
#[test]
fn the_upstream_key_never_reaches_the_logs_even_at_trace_level() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("set_headers:\n  authorization: \"Bearer ${UPSTREAM_KEY}\"")
        .env("UPSTREAM_KEY", "sk-upstream-secret")
        .env("RUST_LOG", "trace")
        .start();
    client().get(tg.url("/a")).send().unwrap();
    assert_eq!(
        origin.last().header("authorization"),
        Some("Bearer sk-upstream-secret")
    );
    let log = tg.log();
    assert!(log.contains("DEBUG"), "verbose logging is on:\n{log}");
    assert!(!log.contains("sk-upstream-secret"), "leaked into:\n{log}");
}

#[test]
fn tls_upstream_with_sni_and_certificate_verification() {
    use crate::support::origin::TestPki;
    let pki = TestPki::new(&["api.test"]);
    let origin = Origin::start_tls(&pki);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let pingora = format!(
        "pingora:\n  threads: 2\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n  ca_file: {}",
        ca_file.display()
    );
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("tls: true\nsni: api.test")
        .yaml(&pingora)
        .start();
    let resp = client().get(tg.url("/secure")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.last().header("x-seen-sni"), Some("api.test"));

    // A name the certificate does not cover fails verification: 502, not a silent downgrade.
    let wrong = TollgateBuilder::new(origin.addr)
        .mode("none")
        .upstream_yaml("tls: true\nsni: other.test")
        .yaml(&pingora)
        .start();
    assert_eq!(
        client().get(wrong.url("/secure")).send().unwrap().status(),
        502
    );
}

/// An origin that speaks HTTP/1.0 and closes each connection after one answer: `/framed`
/// with a Content-Length, anything else ended by the close.
fn http_10_origin() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let answer = if request_line.contains(" /framed ") {
                "HTTP/1.0 200 OK\r\nContent-Length: 6\r\nKeep-Alive: timeout=5\r\n\r\nframed"
            } else {
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nended by the close"
            };
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    addr
}

/// Behind an HTTP/1.0 origin, HTTP/1.1 clients are answered in HTTP/1.1 (Pingora passed the
/// origin's version on), a body ended by the origin's close is sent chunked (Pingora does
/// that), and the client's connection is kept for its next request; the origin's
/// `Keep-Alive` header is not passed on.
#[test]
fn an_http_10_origin_is_answered_to_http_11_clients_in_http_11() {
    use std::io::{BufRead, BufReader, Read, Write};
    let tg = TollgateBuilder::new(http_10_origin()).mode("none").start();
    let mut conn = tg.proxy_connection();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    for (path, body) in [
        ("/framed", "framed"),
        ("/close", "ended by the close"),
        ("/framed", "framed"),
    ] {
        write!(conn, "GET {path} HTTP/1.1\r\nHost: tollgate\r\n\r\n").unwrap();
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push(line.trim_end().to_ascii_lowercase());
        }
        assert_eq!(
            head.first().map(String::as_str),
            Some("http/1.1 200 ok"),
            "{path}: {head:?}"
        );
        let received = if head.iter().any(|h| h == "transfer-encoding: chunked") {
            let mut received = String::new();
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                reader.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                received.push_str(std::str::from_utf8(&chunk[..size]).unwrap());
            }
            received
        } else {
            let length: usize = head
                .iter()
                .find_map(|h| h.strip_prefix("content-length: "))
                .unwrap_or_else(|| panic!("{path}: neither chunked nor a length: {head:?}"))
                .parse()
                .unwrap();
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            String::from_utf8(body).unwrap()
        };
        assert_eq!(received, body, "{path}");
    }
}

/// An HTTP/1.0 client cannot read chunked framing: a body that ends with the connection is
/// sent as it came and the connection closed (Pingora sent it chunked, whatever the client).
#[test]
fn an_http_10_client_gets_a_body_ended_by_the_close_not_chunked() {
    use std::io::{Read, Write};
    let tg = TollgateBuilder::new(http_10_origin()).mode("none").start();
    for (path, body) in [("/close", "ended by the close"), ("/framed", "framed")] {
        let mut conn = tg.proxy_connection();
        write!(conn, "GET {path} HTTP/1.0\r\nHost: tollgate\r\n\r\n").unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        let (head, received) = answer.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1."), "{path}: {head}");
        assert!(!head.contains("transfer-encoding"), "{path}: {head}");
        assert!(!head.contains("keep-alive: timeout"), "{path}: {head}");
        assert_eq!(received, body, "{path}: {head}");
    }
}

/// Pingora kept an idle HTTP/1.1 client connection open forever once it had served a request:
/// silent clients held memory and a file descriptor each. `clients.keepalive_timeout_seconds`
/// bounds the wait, on the admin listener too; 0 is no limit.
#[test]
fn idle_client_connections_are_closed_after_the_keepalive_timeout() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  keepalive_timeout_seconds: 1\n")
        .start();
    let mut conn = tg.proxy_connection();
    assert!(one_exchange(&mut conn, "/a").starts_with("HTTP/1.1 200"));
    assert!(
        one_exchange(&mut conn, "/a").starts_with("HTTP/1.1 200"),
        "kept alive"
    );
    assert!(
        closed_within(&mut conn, Duration::from_secs(5)),
        "idle connection closed"
    );
    // The admin listener too (Pingora's own is 60 s).
    let mut conn = tg.admin_connection();
    assert!(one_exchange(&mut conn, "/health").starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut conn, Duration::from_secs(5)),
        "admin connection closed"
    );

    let unbounded = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  keepalive_timeout_seconds: 0\n")
        .start();
    let mut conn = unbounded.proxy_connection();
    assert!(one_exchange(&mut conn, "/a").starts_with("HTTP/1.1 200"));
    assert!(
        !closed_within(&mut conn, Duration::from_secs(3)),
        "0: no limit"
    );
    assert!(one_exchange(&mut conn, "/a").starts_with("HTTP/1.1 200"));
}

/// An origin on a raw socket for the streaming tests: it reads one request head, hands the
/// connection to `serve`, and ends.
fn raw_origin(
    serve: impl FnOnce(std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) + Send + 'static,
) -> std::net::SocketAddr {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        serve(stream, reader);
    });
    addr
}

/// tollgate in `user_token` mode in front of `origin`, a user's token, and a client connection
/// (10 s read timeout).
fn user_and_connection(origin: std::net::SocketAddr) -> (Tollgate, String, std::net::TcpStream) {
    let tg = TollgateBuilder::new(origin).start();
    let token = tg.create_user(json!({}));
    let conn = tg.proxy_connection();
    (tg, token, conn)
}

/// Reads from `reader` until `needle` has arrived (a 10 s read timeout fails the test instead
/// of hanging it); returns what was read.
fn read_until(reader: &mut impl std::io::Read, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = reader
            .read(&mut byte)
            .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}; got {seen:?}"));
        assert!(
            n > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(byte[0]);
    }
    String::from_utf8(seen).unwrap()
}

/// A streamed response (server-sent events, as completion APIs send) reaches the client event
/// by event: the origin sends its second event only once the client has received the first
/// through tollgate, so a proxy that buffered the response would never finish.
#[test]
fn a_streamed_response_reaches_the_client_as_it_is_sent() {
    use std::io::Write;
    let (seen_first, first_seen) = std::sync::mpsc::channel::<()>();
    let origin = raw_origin(move |mut stream, _| {
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Transfer-Encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n",
            )
            .unwrap();
        first_seen
            .recv_timeout(Duration::from_secs(10))
            .expect("the client never saw the first event");
        stream
            .write_all(b"b\r\ndata: two\n\n\r\n0\r\n\r\n")
            .unwrap();
    });
    let (_tg, token, mut conn) = user_and_connection(origin);
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    )
    .unwrap();
    let head = read_until(&mut conn, "data: one");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    seen_first.send(()).unwrap();
    read_until(&mut conn, "data: two");
    read_until(&mut conn, "0\r\n\r\n");
}

/// A request body reaches the origin as the client sends it (a large upload is not held in
/// tollgate's memory first): the client sends its second chunk only once the origin has
/// received the first.
#[test]
fn a_streamed_request_body_reaches_the_origin_as_it_is_sent() {
    use std::io::Write;
    let (origin_saw_first, first_arrived) = std::sync::mpsc::channel::<()>();
    let origin = raw_origin(move |mut stream, mut reader| {
        read_until(&mut reader, "first");
        origin_saw_first.send(()).unwrap();
        read_until(&mut reader, "second");
        read_until(&mut reader, "0\r\n\r\n");
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nreceived")
            .unwrap();
    });
    let (_tg, token, mut conn) = user_and_connection(origin);
    write!(
        conn,
        "POST /upload HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
    )
    .unwrap();
    first_arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("the origin never got the first chunk");
    write!(conn, "6\r\nsecond\r\n0\r\n\r\n").unwrap();
    let answer = read_until(&mut conn, "received");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Request bodies over `clients.max_body_bytes` get 413 (the older proxy refused JSON bodies
/// over 100 MB): a declared length before the gatekeeper, without reaching the origin; a
/// chunked body once it has streamed past the limit, its upstream request aborted.
#[test]
fn request_bodies_over_the_limit_get_413() {
    use std::io::{Read, Write};
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("clients:\n  max_body_bytes: 1000\n")
        .start();
    let token = tg.create_user(json!({}));
    let post = |path: &str, bytes: usize, token: Option<&str>| {
        let mut request = client().post(tg.url(path)).body(vec![b'a'; bytes]);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().unwrap()
    };
    assert_eq!(post("/fits", 1000, Some(&token)).status(), 200);
    let refused = post("/declared", 1001, Some(&token));
    assert_eq!(refused.status(), 413);
    let body: Value = refused.json().unwrap();
    assert_eq!(error_type(&body), "request_too_large", "{body}");
    assert_eq!(
        post("/anonymous", 1001, None).status(),
        413,
        "the body is refused before the gatekeeper"
    );

    let mut conn = tg.proxy_connection();
    write!(
        conn,
        "POST /chunked HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = format!("258\r\n{}\r\n", "a".repeat(600));
    conn.write_all(chunk.as_bytes()).unwrap();
    // Past the limit: tollgate answers and stops reading, so this write may fail.
    let _ = conn.write_all(chunk.as_bytes());
    let _ = conn.write_all(b"0\r\n\r\n");
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413", "chunked body past the limit");

    let paths: Vec<String> = origin.seen().into_iter().map(|r| r.uri).collect();
    assert!(paths.contains(&"/fits".to_string()));
    assert!(
        !paths.iter().any(|p| p == "/declared" || p == "/anonymous"),
        "{paths:?}"
    );
    assert!(tg
        .metrics()
        .contains(r#"tollgate_requests_total{mode="user_token",result="413"} 3"#));
}

/// A request body that stops arriving gets `408 request_timeout` after
/// `clients.body_timeout_seconds` (nginx's `client_body_timeout`: the wait for the next
/// bytes, not for the whole body), instead of Pingora's 60 s and a `400 bad_request`.
#[test]
fn a_stalled_request_body_gets_408_and_a_slow_one_passes() {
    use std::io::Write;
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .yaml("clients:\n  body_timeout_seconds: 2\n")
        .start();
    let token = tg.create_user(json!({}));
    let head = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 8\r\n\r\n"
        )
    };

    // A byte every 0.3 s: 2.4 s in all, longer than the timeout, each wait far shorter (room
    // for a loaded machine).
    let mut conn = tg.proxy_connection();
    conn.write_all(head("/slow").as_bytes()).unwrap();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        conn.write_all(b"a").unwrap();
    }
    let answer = read_until(&mut conn, "\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut conn = tg.proxy_connection();
    conn.write_all(head("/stalled").as_bytes()).unwrap();
    conn.write_all(b"abc").unwrap();
    let answer = read_until(&mut conn, "}}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""type":"request_timeout""#), "{answer}");
    assert!(tg
        .metrics()
        .contains(r#"tollgate_requests_total{mode="user_token",result="408"} 1"#));
}

/// `Expect: 100-continue` (curl sends it with large bodies): tollgate answers `100 Continue`
/// itself once the request passed, as nginx does, the upstream gets no `Expect`, and the
/// connection stays open for the next request (Pingora relayed the upstream's 100, if it sent
/// one, then closed the connection after the answer). A refused request gets its answer
/// without a 100, so the client never sends the body.
#[test]
fn expect_100_continue_is_answered_by_tollgate_and_keeps_the_connection() {
    use std::io::{BufReader, Write};
    let origin = Origin::start();
    let (tg, token, mut conn) = user_and_connection(origin.addr);
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    write!(
        conn,
        "POST /upload HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
         Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    .unwrap();
    let interim = read_answer(&mut reader);
    assert!(interim.status.starts_with("HTTP/1.1 100"), "{interim:?}");
    conn.write_all(b"hello").unwrap();
    let answer = read_answer(&mut reader);
    assert!(answer.status.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(!answer.head.contains("connection: close"), "{answer:?}");
    let seen = origin.last();
    assert_eq!(seen.uri, "/upload");
    assert_eq!(seen.header("expect"), None, "{seen:?}");
    write!(
        conn,
        "GET /next HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let next = read_answer(&mut reader);
    assert!(next.status.starts_with("HTTP/1.1 200"), "{next:?}");

    let mut refused = tg.proxy_connection();
    write!(
        refused,
        "POST /upload HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer wrong\r\n\
         Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    .unwrap();
    let answer = read_answer(&mut BufReader::new(refused));
    assert!(answer.status.starts_with("HTTP/1.1 401"), "{answer:?}");
}

/// An upgraded connection (a WebSocket, e.g. a realtime API streaming audio up) is not a
/// request body: it may carry more than `clients.max_body_bytes` without being cut, as behind
/// nginx, whose `client_max_body_size` does not apply to it either.
#[test]
fn an_upgraded_connection_is_not_held_to_the_body_limit() {
    use std::io::{Read, Write};
    let origin = raw_origin(|mut stream, mut reader| {
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\n\r\n",
            )
            .unwrap();
        // Echoes every byte back until the client closes.
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let tg = TollgateBuilder::new(origin)
        .yaml("clients:\n  max_body_bytes: 1000\n")
        .start();
    let token = tg.create_user(json!({}));
    let mut conn = tg.proxy_connection();
    write!(
        conn,
        "GET /realtime HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let head = read_until(&mut conn, "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Ten times the body limit, 500 bytes at a time, each echoed before the next is sent.
    for round in 0..20 {
        let frame = format!("{round:03}{}", "f".repeat(497));
        conn.write_all(frame.as_bytes()).unwrap();
        let mut echoed = vec![0u8; frame.len()];
        conn.read_exact(&mut echoed)
            .unwrap_or_else(|e| panic!("round {round}: the connection was cut: {e}"));
        assert_eq!(echoed, frame.as_bytes(), "round {round}");
    }
}

/// HTTP/1.1 pipelining: requests a client sends before reading the answers are each answered,
/// in order, on the same connection (as nginx does). Pingora by default answered the first
/// (saying `Connection: keep-alive`), then closed the connection and dropped the rest.
#[test]
fn pipelined_requests_are_all_answered_in_order() {
    use std::io::{BufReader, Write};
    let origin = Origin::start();
    let (tg, token, mut conn) = user_and_connection(origin.addr);
    let mut requests = String::new();
    for path in ["/first", "/second"] {
        requests.push_str(&format!(
            "GET {path} HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\r\n"
        ));
    }
    requests.push_str(&format!(
        "POST /third HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 5\r\n\r\nhello"
    ));
    // Refused by tollgate itself (no token), then one more behind it.
    requests.push_str("GET /fourth HTTP/1.1\r\nHost: tollgate\r\n\r\n");
    requests.push_str(&format!(
        "GET /fifth HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {token}\r\n\r\n"
    ));
    conn.write_all(requests.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let mut answers = Vec::new();
    for _ in 0..5 {
        let answer = read_answer(&mut reader);
        assert!(!answer.status.is_empty(), "closed after {answers:?}");
        answers.push((answer.status, String::from_utf8(answer.body).unwrap()));
    }
    let statuses: Vec<&str> = answers.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 401 Unauthorized",
            "HTTP/1.1 200 OK"
        ]
    );
    let paths: Vec<String> = origin.seen().into_iter().map(|r| r.uri).collect();
    assert_eq!(paths, ["/first", "/second", "/third", "/fifth"]);
    drop(tg);
}

/// A request body in another transfer coding besides chunked (`gzip, chunked`) reached the
/// upstream with `Transfer-Encoding: chunked` alone: Pingora decodes the chunks and drops the
/// other codings, so the upstream took the gzip-coded bytes for the body itself. tollgate does
/// not decode them and refuses the request (nginx answers 501), before the gatekeeper.
#[test]
fn a_request_body_in_another_transfer_coding_than_chunked_is_refused() {
    use std::io::{BufReader, Write};
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    for codings in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
    ] {
        let mut conn = tg.proxy_connection();
        write!(
            conn,
            "POST /coded HTTP/1.1\r\nHost: tollgate\r\n{codings}\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        .unwrap();
        let answer = read_answer(&mut BufReader::new(conn));
        assert!(
            answer.status.starts_with("HTTP/1.1 400"),
            "{codings}: {answer:?}"
        );
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(error_type(&body), "bad_request", "{codings}: {body}");
    }
    assert_eq!(origin.count(), 0, "{:?}", origin.seen());
    // A chunked body alone passes.
    let mut conn = tg.proxy_connection();
    write!(
        conn,
        "POST /chunked HTTP/1.1\r\nHost: tollgate\r\nTransfer-Encoding: chunked\r\n\r\n\
         3\r\nabc\r\n0\r\n\r\n"
    )
    .unwrap();
    let answer = read_answer(&mut BufReader::new(conn));
    assert!(answer.status.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(origin.last().uri, "/chunked");
}

/// The header fields an upstream's answer names in its `Connection` header describe the
/// upstream's connection: they were passed on to the client (Pingora removes them from
/// requests only). They are removed; the answer's framing and other fields stay, and the
/// client's connection serves its next request.
#[test]
fn fields_named_by_the_upstreams_connection_header_are_not_passed_on() {
    use crate::support::origin::{Script, ScriptedOrigin};
    use std::io::{BufReader, Write};
    let origin = ScriptedOrigin::start();
    origin.script(
        "1",
        Script {
            pieces: vec![
                b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\n\
                           X-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
                    .to_vec(),
            ],
            ..Script::default()
        },
    );
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    let mut conn = tg.proxy_connection();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    write!(
        conn,
        "GET /a HTTP/1.1\r\nHost: tollgate\r\nx-exchange: 1\r\n\r\n"
    )
    .unwrap();
    let answer = read_answer(&mut reader);
    assert!(answer.status.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(!answer.head.contains("x-hop"), "{answer:?}");
    assert!(answer.head.contains("x-kept: 1"), "{answer:?}");
    assert_eq!(answer.body, b"ok");
    write!(conn, "GET /b HTTP/1.1\r\nHost: tollgate\r\n\r\n").unwrap();
    assert!(read_answer(&mut reader).status.starts_with("HTTP/1.1 200"));
}

/// A `Content-Length` sent as a list of one number (`3, 3`) or on two lines is accepted by
/// Pingora, which frames the body by it, but was passed on as it came: the upstream got (and
/// the client, from an upstream) an invalid field that Node.js, for one, refuses. Each side
/// gets the single value instead (RFC 9110, 8.6).
#[test]
fn a_repeated_content_length_reaches_each_side_as_one_value() {
    use crate::support::origin::{Script, ScriptedOrigin};
    use crate::support::wire;
    use std::io::{BufReader, Write};
    let origin = ScriptedOrigin::start();
    let answers = [
        "Content-Length: 2, 2\r\n",
        "Content-Length: 2\r\ncontent-length: 2\r\n",
    ];
    for (i, lengths) in answers.iter().enumerate() {
        origin.script(
            &i.to_string(),
            Script {
                pieces: vec![format!("HTTP/1.1 200 OK\r\n{lengths}\r\nok").into_bytes()],
                ..Script::default()
            },
        );
    }
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    let mut conn = tg.proxy_connection();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let requests = [
        "Content-Length: 3, 3\r\n",
        "Content-Length: 3\r\nContent-Length: 3\r\n",
    ];
    for (i, lengths) in requests.iter().enumerate() {
        write!(
            conn,
            "POST /upload HTTP/1.1\r\nHost: tollgate\r\nx-exchange: {i}\r\n{lengths}\r\nabc"
        )
        .unwrap();
        let head = wire::read_head(&mut reader).unwrap().unwrap();
        assert_eq!(head.status(), 200, "{lengths}: {head:?}");
        assert_eq!(head.all("content-length"), [b"2"], "{lengths}: {head:?}");
        assert_eq!(
            wire::read_response_body(&mut reader, &head, "POST").bytes,
            b"ok"
        );
        let received = origin.received(&i.to_string());
        let seen = &received[0];
        assert_eq!(
            seen.head.all("content-length"),
            [b"3"],
            "{lengths}: {seen:?}"
        );
        assert_eq!(seen.body.bytes, b"abc");
    }
}

/// A declared length over `clients.max_body_bytes` is answered 413 without reading the body;
/// a `Content-Length` that repeats the number as a list (`2000, 2000`, which Pingora accepts)
/// was not read as a declaration: the request went upstream, and the 413 came only once the
/// body had streamed past the limit.
#[test]
fn a_content_length_list_over_the_limit_is_refused_before_the_body() {
    use std::io::{BufReader, Write};
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .yaml("clients:\n  max_body_bytes: 1000\n")
        .start();
    for lengths in ["2000", "2000, 2000"] {
        let mut conn = tg.proxy_connection();
        // The header alone: the answer must not wait for the body.
        write!(
            conn,
            "POST /big HTTP/1.1\r\nHost: tollgate\r\nContent-Length: {lengths}\r\n\r\n"
        )
        .unwrap();
        let answer = read_answer(&mut BufReader::new(conn));
        assert!(
            answer.status.starts_with("HTTP/1.1 413"),
            "{lengths}: {answer:?}"
        );
    }
    assert_eq!(origin.count(), 0, "{:?}", origin.seen());
}

/// An HTTP/1.0 client knows no interim answers: an upstream's `103 Early Hints` or unasked
/// `100 Continue` was relayed to it, and it took the first for the final answer. It gets the
/// final answer alone; an HTTP/1.1 client still gets them all.
#[test]
fn an_http_10_client_gets_no_interim_answers() {
    use crate::support::origin::{Script, ScriptedOrigin};
    use crate::support::wire;
    use std::io::{BufReader, Write};
    let origin = ScriptedOrigin::start();
    let tg = TollgateBuilder::new(origin.addr).mode("none").start();
    for (version, expected) in [("1.0", vec![200]), ("1.1", vec![103, 100, 200])] {
        origin.script(
            version,
            Script {
                pieces: vec![
                    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
                               HTTP/1.1 100 Continue\r\n\r\n\
                               HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        .to_vec(),
                ],
                ..Script::default()
            },
        );
        let mut conn = tg.proxy_connection();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        write!(
            conn,
            "GET /a HTTP/{version}\r\nHost: tollgate\r\nx-exchange: {version}\r\n\r\n"
        )
        .unwrap();
        let mut statuses = Vec::new();
        loop {
            let head = wire::read_head(&mut reader).unwrap().expect("an answer");
            statuses.push(head.status());
            if head.status() >= 200 {
                let body = wire::read_response_body(&mut reader, &head, "GET");
                assert_eq!(body.bytes, b"ok", "HTTP/{version}");
                break;
            }
        }
        assert_eq!(statuses, expected, "HTTP/{version}");
    }
}

mod soak;
mod upstreams;
