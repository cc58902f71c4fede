//! The `/_fake/*` API, driven over HTTP as another process would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use rtdb_standin::{Options, StandIn};
use serde_json::{json, Value};

use crate::common::{event, send_json, Fixture, Item};

impl Fixture {
    async fn ctl(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, self.url(&format!("/_fake/{path}")));
        if let Some(body) = body {
            req = req.json(&body);
        }
        send_json(req).await
    }
}

#[tokio::test]
async fn info_and_tree() {
    let f = Fixture::new();
    let (status, info) = f.ctl(Method::GET, "info", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["db_url"], f.standin.db_url());
    assert_eq!(info["token_uri"], f.standin.token_uri());
    assert_eq!(info["firebase_key"], f.standin.firebase_key_b64());

    let mut s = f.stream("/users.json").await;
    s.next().await;
    f.ctl(
        Method::PUT,
        "tree/users/a?notify=false",
        Some(json!({"n": 1})),
    )
    .await;
    let (_, echo) = f
        .ctl(
            Method::PUT,
            "tree/users/b",
            Some(json!({"at": {".sv": "timestamp"}})),
        )
        .await;
    assert!(echo["at"].is_i64());
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/b", "data": echo}))
    );
    f.ctl(Method::PATCH, "tree/users", Some(json!({"a/n": 2})))
        .await;
    assert_eq!(
        s.next().await,
        event("patch", json!({"path": "/", "data": {"a/n": 2}}))
    );
    assert_eq!(
        f.ctl(Method::GET, "tree/users/a", None).await.1,
        json!({"n": 2})
    );
    f.ctl(Method::DELETE, "tree/users/a", None).await;
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/a", "data": null}))
    );
    assert_eq!(
        f.ctl(Method::PUT, "tree/bad.key", Some(json!(1))).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.ctl(Method::PUT, "tree/x", None).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn streams_auth_faults_outage_and_clock() {
    let f = Fixture::new();
    let mut s = f.stream("/.json").await;
    s.next().await;
    let (_, streams) = f.ctl(Method::GET, "streams", None).await;
    assert_eq!(streams["open"], 1);
    assert_eq!(streams["streams"][0]["auth"], "token");
    assert_eq!(
        f.ctl(Method::POST, "streams/keep-alive?path=/", None)
            .await
            .1,
        json!({"affected": 1})
    );
    assert_eq!(s.next().await, event("keep-alive", json!(null)));
    assert_eq!(
        f.ctl(Method::POST, "streams/bogus", None).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.ctl(Method::POST, "auth/revoke", None).await.1,
        json!({"streams_revoked": 1})
    );
    assert_eq!(
        s.next().await,
        event("auth_revoked", json!("credential is no longer valid"))
    );

    let (_, token) = f.ctl(Method::POST, "auth/token", None).await;
    let token = token["access_token"].as_str().unwrap().to_owned();
    let get = || send_json(f.client.get(f.url("/.json")).bearer_auth(&token));
    assert_eq!(get().await.0, StatusCode::OK);

    let rule = json!({"method": "GET", "path": "/.json", "times": 1, "action": {"type": "status", "status": 500}});
    let (_, added) = f.ctl(Method::POST, "faults", Some(rule)).await;
    assert!(added["id"].is_u64());
    assert_eq!(f.ctl(Method::GET, "faults", None).await.1[0]["times"], 1);
    assert_eq!(get().await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(get().await.0, StatusCode::OK);
    let bad_rule = json!({"path": "*", "action": {"type": "explode"}});
    assert_eq!(
        f.ctl(Method::POST, "faults", Some(bad_rule)).await.0,
        StatusCode::BAD_REQUEST
    );

    f.ctl(Method::POST, "outage", None).await;
    assert!(f
        .client
        .get(f.url("/.json"))
        .bearer_auth(&token)
        .send()
        .await
        .is_err());
    f.ctl(Method::DELETE, "outage", None).await;
    assert_eq!(get().await.0, StatusCode::OK);

    let (_, now) = f
        .ctl(Method::POST, "clock", Some(json!({"set_ms": 1000})))
        .await;
    assert_eq!(now, json!({"now_ms": 1000}));
    f.ctl(
        Method::POST,
        "clock",
        Some(json!({"real": true, "advance_ms": 4_000_000})),
    )
    .await;
    assert_eq!(
        get().await.0,
        StatusCode::UNAUTHORIZED,
        "token expired on the fake clock"
    );
    assert_eq!(
        f.ctl(Method::POST, "clock", Some(json!({"warp": 1})))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn config_requests_counters_and_reset() {
    let f = Fixture::new();
    let (status, knobs) = f
        .ctl(
            Method::PATCH,
            "config",
            Some(json!({"public_rules": true, "keepalive_ms": 50})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (knobs["public_rules"].clone(), knobs["keepalive_ms"].clone()),
        (json!(true), json!(50))
    );
    assert_eq!(f.standin.knobs().keepalive_ms, 50);
    assert_eq!(
        f.ctl(Method::PATCH, "config", Some(json!({"nope": 1})))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.ctl(
            Method::PATCH,
            "config",
            Some(json!({"patch_event_keys": "nest"}))
        )
        .await
        .1["patch_event_keys"],
        "nest"
    );

    f.write(Method::PUT, "/a.json?print=silent", json!({"b": 1}))
        .await;
    let (_, log) = f.ctl(Method::GET, "requests", None).await;
    let entry = &log[0];
    assert_eq!(entry["method"], "PUT");
    assert_eq!(entry["path"], "/a.json");
    assert_eq!(entry["query"], "print=silent");
    assert_eq!(entry["body"], r#"{"b":1}"#);
    assert_eq!(entry["status"], 204);
    assert_eq!(
        entry["headers"]["authorization"],
        format!("Bearer {}", f.token)
    );
    let seq = entry["seq"].as_u64().unwrap();
    assert_eq!(
        f.ctl(Method::GET, &format!("requests?since={seq}"), None)
            .await
            .1,
        json!([])
    );
    let (_, counters) = f.ctl(Method::GET, "counters", None).await;
    assert_eq!(counters["writes"], 1);

    f.ctl(Method::POST, "reset", None).await;
    assert_eq!(f.ctl(Method::GET, "tree", None).await.1, Value::Null);
    assert_eq!(f.ctl(Method::GET, "requests", None).await.1, json!([]));
    assert_eq!(
        f.standin.knobs(),
        rtdb_standin::Knobs {
            keepalive_ms: 30_000,
            ..Default::default()
        }
    );
    assert_eq!(
        f.get_json("/.json").await.0,
        StatusCode::UNAUTHORIZED,
        "tokens were cleared"
    );
    assert_eq!(
        f.ctl(Method::GET, "nothing", None).await.0,
        StatusCode::NOT_FOUND
    );
}

/// The handle works from plain synchronous code, and dropping it frees the port.
#[test]
fn synchronous_use_and_shutdown_on_drop() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<StandIn>();

    let standin = StandIn::start(Options::default().public_rules(true));
    standin.set("/greeting", json!("hi")).unwrap();
    let addr = standin.db_url().trim_start_matches("http://").to_owned();
    let response = raw_get(&addr, "/greeting.json");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("\"hi\""), "{response}");

    // Garbage on the wire gets an error response or a closed connection, never a crash.
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.write_all(b"\x00\x01 NOT HTTP\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = conn.read_to_end(&mut sink);
    assert!(raw_get(&addr, "/greeting.json").starts_with("HTTP/1.1 200 OK"));

    drop(standin);
    assert!(TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_err());
}

fn raw_get(addr: &str, path: &str) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test]
async fn stream_ends_when_the_standin_is_dropped() {
    let f = Fixture::new();
    let mut s = f.stream("/.json").await;
    s.next().await;
    let Fixture { standin, .. } = f;
    tokio::task::spawn_blocking(move || drop(standin))
        .await
        .unwrap();
    assert!(matches!(s.next().await, Item::Error | Item::Eof { .. }));
}

#[tokio::test]
async fn extreme_knob_values_do_not_crash() {
    let f = Fixture::new();
    let huge = json!({"keepalive_ms": u64::MAX, "token_expires_in_s": u64::MAX});
    assert_eq!(
        f.ctl(Method::PATCH, "config", Some(huge)).await.0,
        StatusCode::OK
    );
    let (_, token) = f.ctl(Method::POST, "auth/token", None).await;
    let token = token["access_token"].as_str().unwrap().to_owned();
    let resp = f
        .client
        .get(f.url("/.json"))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut s = crate::common::Sse::new(resp);
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/", "data": null}))
    );
    f.ctl(
        Method::POST,
        "outage",
        Some(json!({"duration_ms": u64::MAX})),
    )
    .await;
    f.ctl(Method::DELETE, "outage", None).await;
    let delay = json!({"path": "/x.json", "times": 1, "action": {"type": "delay", "ms": u64::MAX}});
    f.ctl(Method::POST, "faults", Some(delay)).await;
    f.ctl(Method::POST, "clock", Some(json!({"set_ms": i64::MIN})))
        .await;
    f.ctl(Method::POST, "clock", Some(json!({"advance_ms": i64::MAX})))
        .await;
    assert_eq!(
        f.ctl(Method::GET, "info", None).await.0,
        StatusCode::OK,
        "still serving"
    );
}
