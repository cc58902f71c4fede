use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use rtdb_standin::{Options, PatchEventKeys, RedirectScope, StreamAction};
use serde_json::json;

use crate::common::{event, send_json, Fixture, Item, Sse};

fn fast() -> Options {
    Options::default().keepalive(Duration::from_millis(50))
}

#[tokio::test]
async fn stream_starts_with_put_root_and_follows_writes() {
    let f = Fixture::new();
    f.standin.set_silently("/users/a", json!({"n": 1})).unwrap();
    let resp = f
        .req(Method::GET, "/users.json")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["connection"], "close");
    assert!(h.get("content-length").is_none());
    let mut s = Sse::new(resp);
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/", "data": {"a": {"n": 1}}}))
    );
    assert_eq!(f.standin.open_streams(), 1);

    f.write(Method::PUT, "/users/b.json", json!({"n": 2})).await;
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/b", "data": {"n": 2}}))
    );
    f.write(Method::PATCH, "/users/a.json", json!({"n": 5, "m": null}))
        .await;
    assert_eq!(
        s.next().await,
        event("patch", json!({"path": "/a", "data": {"n": 5, "m": null}}))
    );
    f.write(Method::DELETE, "/users/b.json", json!(null)).await;
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/b", "data": null}))
    );
    // A console edit notifies; a silent set does not; writes elsewhere are not seen.
    f.standin.set_silently("/users/quiet", json!(1)).unwrap();
    f.write(Method::PUT, "/other.json", json!(1)).await;
    f.standin.set("/users/a/n", json!(6)).unwrap();
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/a/n", "data": 6}))
    );
    // A write above the stream arrives as put / with the new value.
    f.write(Method::PUT, "/.json", json!({"users": {"z": true}}))
        .await;
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/", "data": {"z": true}}))
    );
    let posted = f.write(Method::POST, "/users.json", json!("x")).await.1;
    let name = posted["name"].as_str().unwrap();
    assert_eq!(
        s.next().await,
        event("put", json!({"path": format!("/{name}"), "data": "x"}))
    );
}

#[tokio::test]
async fn keep_alives_follow_the_configured_interval() {
    let f = Fixture::with(fast());
    let mut s = f.stream("/.json").await;
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/", "data": null}))
    );
    for _ in 0..3 {
        assert_eq!(s.next().await, event("keep-alive", json!(null)));
    }
    assert!(f.standin.counters().keepalives_sent >= 3);
}

#[tokio::test]
async fn root_multi_path_patch_reaches_a_users_stream_as_one_patch() {
    let f = Fixture::new();
    let mut s = f.stream("/users.json").await;
    s.next().await;
    let body = json!({
        "users/a/promptCount": {".sv": {"increment": 2}},
        "users/b/tokenCounts/gpt": {".sv": {"increment": 7}},
        "_sync/instances/i1": {"seq": 1}
    });
    f.write(Method::PATCH, "/.json?print=silent", body).await;
    assert_eq!(
        s.next().await,
        event(
            "patch",
            json!({"path": "/", "data": {"a/promptCount": 2, "b/tokenCounts/gpt": 7}})
        )
    );
}

#[tokio::test]
async fn nest_style_splits_multi_segment_keys_into_per_parent_events() {
    let f = Fixture::with(Options::default().patch_event_keys(PatchEventKeys::Nest));
    let mut s = f.stream("/users.json").await;
    s.next().await;
    f.write(
        Method::PATCH,
        "/.json",
        json!({"users/a/n": 1, "users/a/m": 2, "users/b": {"n": 3}}),
    )
    .await;
    assert_eq!(
        s.next().await,
        event("patch", json!({"path": "/a", "data": {"m": 2, "n": 1}}))
    );
    assert_eq!(
        s.next().await,
        event("patch", json!({"path": "/", "data": {"b": {"n": 3}}}))
    );
}

#[tokio::test]
async fn revoking_or_expiring_tokens_sends_auth_revoked_then_closes() {
    let f = Fixture::new();
    let mut s = f.stream("/.json").await;
    s.next().await;
    assert_eq!(f.standin.revoke_tokens(), 1);
    assert_eq!(
        s.next().await,
        event("auth_revoked", json!("credential is no longer valid"))
    );
    assert_eq!(
        s.next().await,
        Item::Eof {
            rest: String::new()
        }
    );

    let token = f.standin.issue_token();
    let resp = f
        .client
        .get(f.url("/.json"))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut s = Sse::new(resp);
    s.next().await;
    f.standin.advance_clock(Duration::from_secs(3600));
    assert_eq!(
        s.next().await,
        event("auth_revoked", json!("credential is no longer valid"))
    );
    assert_eq!(
        s.next().await,
        Item::Eof {
            rest: String::new()
        }
    );
}

#[tokio::test]
async fn token_expiry_in_real_time_revokes_the_stream() {
    let f = Fixture::new();
    f.standin.update_knobs(|k| k.token_expires_in_s = 1);
    let token = f.standin.issue_token();
    f.standin.advance_clock(Duration::from_millis(900));
    let resp = f
        .client
        .get(f.url("/.json"))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut s = Sse::new(resp);
    s.next().await;
    assert_eq!(
        s.next_data().await,
        event("auth_revoked", json!("credential is no longer valid"))
    );
}

#[tokio::test]
async fn forced_cancel_keepalive_close_mid_event_and_drop() {
    let f = Fixture::new();
    let mut a = f.stream("/a.json").await;
    let mut b = f.stream("/b.json").await;
    a.next().await;
    b.next().await;
    let act = |action, path| f.standin.stream_action(action, path).unwrap();
    assert_eq!(act(StreamAction::KeepAlive, None), 2);
    assert_eq!(a.next().await, event("keep-alive", json!(null)));
    assert_eq!(b.next().await, event("keep-alive", json!(null)));
    assert_eq!(act(StreamAction::Cancel, Some("/a")), 1);
    assert_eq!(a.next().await, event("cancel", json!(null)));
    assert_eq!(
        a.next().await,
        Item::Eof {
            rest: String::new()
        }
    );
    act(StreamAction::CloseMidEvent, Some("/b"));
    assert_eq!(
        b.next().await,
        Item::Eof {
            rest: "event: put\ndata: {\"path\":\"/\",\"da".into()
        }
    );

    let mut c = f.stream("/c.json").await;
    c.next().await;
    act(StreamAction::Drop, None);
    assert_eq!(c.next().await, Item::Error);
}

#[tokio::test]
async fn stalled_stream_stays_open_and_silent() {
    let f = Fixture::new();
    let mut s = f.stream("/.json").await;
    s.next().await;
    f.standin.stream_action(StreamAction::Stall, None).unwrap();
    f.write(Method::PUT, "/x.json", json!(1)).await;
    f.standin
        .stream_action(StreamAction::KeepAlive, None)
        .unwrap();
    f.standin.stream_action(StreamAction::Cancel, None).unwrap();
    assert_eq!(f.standin.open_streams(), 1, "a stall is not a close");
    f.standin.stream_action(StreamAction::Close, None).unwrap();
    assert_eq!(
        s.next().await,
        Item::Eof {
            rest: String::new()
        },
        "nothing was sent while stalled"
    );
}

#[tokio::test]
async fn closing_the_client_side_unregisters_the_stream() {
    let f = Fixture::new();
    let mut s = f.stream("/.json").await;
    s.next().await;
    drop(s);
    // The server notices on its next write; nudge it with keep-alives until it does.
    let deadline = std::time::Instant::now() + crate::common::PATIENCE;
    while f.standin.open_streams() > 0 && std::time::Instant::now() < deadline {
        f.standin
            .stream_action(StreamAction::KeepAlive, None)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(f.standin.open_streams(), 0);
    let c = f.standin.counters();
    assert_eq!((c.streams_opened, c.streams_closed), (1, 1));
}

#[tokio::test]
async fn redirect_to_another_host_catches_clients_that_drop_authorization() {
    let f = Fixture::new();
    let secondary = f
        .standin
        .secondary_url()
        .expect("127.0.0.2 is bindable on Linux");
    assert!(secondary.starts_with("http://127.0.0.2:"));
    f.standin.set_redirect(RedirectScope::Streams, Some(2));

    // A client that follows redirects itself loses the header on the host change.
    crate::common::tls_provider();
    let following = Client::new();
    let resp = following
        .get(f.url("/users.json"))
        .bearer_auth(&f.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.url().as_str().starts_with(&secondary));

    // Following by hand with the header re-added works, on the secondary listener.
    let resp = f
        .req(Method::GET, "/users.json")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(
        location,
        format!(
            "{secondary}/users.json?ns={}&sse=true",
            f.standin.namespace()
        )
    );
    let resp = f
        .client
        .get(&location)
        .bearer_auth(&f.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut s = Sse::new(resp);
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/", "data": null}))
    );
    assert_eq!(f.standin.streams()[0].listener, "secondary");
    f.standin.set("/users/a", json!(1)).unwrap();
    assert_eq!(
        s.next().await,
        event("put", json!({"path": "/a", "data": 1}))
    );

    // The count is used up: the next stream is served directly; plain reads never redirect.
    let direct = f
        .req(Method::GET, "/users.json")
        .header("accept", "text/event-stream");
    assert_eq!(direct.send().await.unwrap().status(), StatusCode::OK);
    f.standin.set_redirect(RedirectScope::All, None);
    let (status, _) = send_json(f.req(Method::GET, "/users.json")).await;
    assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(f.standin.counters().redirects, 3);
}

#[tokio::test]
async fn wire_format_variations_for_parser_tests() {
    let f = Fixture::new();
    f.standin
        .update_knobs(|k| k.sse_line_ending = rtdb_standin::LineEnding::Crlf);
    let mut s = f.stream("/.json").await;
    for action in [
        StreamAction::Comment,
        StreamAction::UnknownEvent,
        StreamAction::MalformedEvent,
        StreamAction::Duplicate,
        StreamAction::Close,
    ] {
        f.standin.stream_action(action, None).unwrap();
    }
    let mut raw = String::new();
    while let Some(chunk) = s.resp.chunk().await.unwrap() {
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    let put = "event: put\r\ndata: {\"path\":\"/\",\"data\":null}\r\n\r\n";
    assert_eq!(
        raw,
        [
            put,
            ": rtdb-standin comment\r\n\r\n",
            "event: rtdb-standin-unknown\r\ndata: {\"path\":\"/\"}\r\n\r\n",
            "event: put\r\ndata: {\"path\":\"/\",\"data\":\r\n\r\n",
            put,
        ]
        .concat()
    );
}
