use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use rtdb_standin::{FaultAction, FaultRule};
use serde_json::{json, Value};

use crate::common::{send_full, send_json, Fixture, Item, PATIENCE};

fn increment() -> Value {
    json!({"users/a/n": {".sv": {"increment": 1}}})
}

#[tokio::test]
async fn scripted_statuses_with_retry_after_then_recovery() {
    let f = Fixture::new();
    f.standin.add_fault(
        FaultRule::new("PATCH", "/.json", FaultAction::status_retry_after(503, "1")).times(2),
    );
    for _ in 0..2 {
        let (status, headers, body) =
            send_full(f.req(Method::PATCH, "/.json").json(&increment())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(body, r#"{"error":"Service Unavailable"}"#);
    }
    assert_eq!(
        f.get_json("/users/a/n.json").await.1,
        Value::Null,
        "faulted writes are not applied"
    );
    assert_eq!(
        f.write(Method::PATCH, "/.json", increment()).await.0,
        StatusCode::OK
    );
    assert_eq!(f.get_json("/users/a/n.json").await.1, json!(1));
    assert!(f.standin.faults().is_empty(), "used-up rules are removed");
    assert_eq!(f.standin.counters().faults_triggered, 2);

    // Other methods and paths are unaffected; custom bodies are sent verbatim.
    let id = f.standin.add_fault(FaultRule::new(
        "GET",
        "/users/*",
        FaultAction::Status {
            status: 429,
            retry_after: None,
            body: Some("slow down".into()),
        },
    ));
    let (status, _, body) = send_full(f.req(Method::GET, "/users/a.json")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "slow down")
    );
    assert_eq!(f.get_json("/users.json").await.0, StatusCode::OK);
    assert!(f.standin.remove_fault(id));
}

#[tokio::test]
async fn ambiguous_and_lost_writes() {
    let f = Fixture::new();
    f.standin
        .add_fault(FaultRule::new("PATCH", "/.json", FaultAction::ApplyThenDrop).times(1));
    assert!(f
        .req(Method::PATCH, "/.json")
        .json(&increment())
        .send()
        .await
        .is_err());
    assert_eq!(
        f.get_json("/users/a/n.json").await.1,
        json!(1),
        "applied although never acknowledged"
    );

    f.standin
        .add_fault(FaultRule::new("PATCH", "/.json", FaultAction::DropBeforeApply).times(1));
    assert!(f
        .req(Method::PATCH, "/.json")
        .json(&increment())
        .send()
        .await
        .is_err());
    assert_eq!(
        f.get_json("/users/a/n.json").await.1,
        json!(1),
        "never applied"
    );

    let log = f.standin.requests();
    let outcomes: Vec<_> = log
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| (r.outcome.as_str(), r.status))
        .collect();
    assert_eq!(
        outcomes,
        [("applied_then_dropped (200)", None), ("dropped", None)]
    );
    assert_eq!(f.standin.counters().connections_dropped, 2);
}

#[tokio::test]
async fn faulted_412_carries_the_current_value_and_etag() {
    let f = Fixture::new();
    f.standin.set_silently("/users/u/ip", json!(["a"])).unwrap();
    f.standin
        .add_fault(FaultRule::new("PUT", "*", FaultAction::status(412)).times(1));
    let req = f
        .req(Method::PUT, "/users/u/ip.json")
        .header("if-match", "whatever")
        .json(&json!(["b"]));
    let (status, headers, body) = send_full(req).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(headers["etag"].len(), 28);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!(["a"]));
}

#[tokio::test]
async fn delay_and_trickle() {
    let f = Fixture::new();
    f.standin
        .add_fault(FaultRule::new("*", "/slow.json", FaultAction::Delay { ms: 60 }).times(1));
    let started = Instant::now();
    assert_eq!(f.get_json("/slow.json").await.0, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(60));

    f.standin
        .set_silently("/big", json!("0123456789".repeat(10)))
        .unwrap();
    f.standin.add_fault(
        FaultRule::new(
            "GET",
            "/big.json",
            FaultAction::Trickle {
                chunk_bytes: 7,
                interval_ms: 1,
            },
        )
        .times(1),
    );
    assert_eq!(
        f.get_json("/big.json").await.1,
        json!("0123456789".repeat(10))
    );
}

#[tokio::test]
async fn a_delayed_write_is_applied_even_if_its_client_gives_up() {
    // As a real server does with a request it has read: the client's timeout makes the
    // write's outcome unknown to the client, not undone.
    //
    // The client gives up once the stand-in has read the request: its one-time rule is used
    // up when the whole request is read, in the same step as the delayed handling starts. A
    // client timeout of 50 ms used to stand for that, and on a loaded machine it ran out
    // before the stand-in had read the request, which no server applies.
    let f = Fixture::new();
    f.standin
        .add_fault(FaultRule::new("PATCH", "/.json", FaultAction::Delay { ms: 2000 }).times(1));
    let write = f.req(Method::PATCH, "/.json").json(&increment()).send();
    let read = async {
        while !f.standin.faults().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        answered = write => panic!("answered before its delay: {answered:?}"),
        () = read => {} // `write` is dropped: the client gives up
    }
    // The bound only catches a write that never lands.
    let started = Instant::now();
    while f.get_json("/users/a/n.json").await.1 != json!(1) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the delayed write never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn faults_also_apply_to_the_token_endpoint() {
    let f = Fixture::new();
    f.standin
        .add_fault(FaultRule::new("POST", "/token", FaultAction::status(500)).times(1));
    assert_eq!(
        f.fetch_token(false).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(f.fetch_token(false).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn outage_resets_everything_then_resumes_on_the_same_port() {
    let f = Fixture::new();
    let mut s = f.stream("/.json").await;
    s.next().await;
    f.standin.begin_outage();
    assert_eq!(s.next().await, Item::Error, "open streams are dropped");
    assert!(f.req(Method::GET, "/.json").send().await.is_err());
    assert!(f.fetch_token_result().await.is_err());
    // The control API stays reachable during an outage.
    let info = send_json(f.client.get(f.url("/_fake/info"))).await;
    assert_eq!(info.0, StatusCode::OK);
    f.standin.end_outage();
    assert_eq!(f.get_json("/.json").await.0, StatusCode::OK);

    // A timed outage ends by itself.
    f.standin.outage(Duration::from_millis(100));
    assert!(f.req(Method::GET, "/.json").send().await.is_err());
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(resp) = f.req(Method::GET, "/.json").send().await {
            assert_eq!(resp.status(), StatusCode::OK);
            break;
        }
        assert!(Instant::now() < deadline, "outage never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Fixture {
    async fn fetch_token_result(&self) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(self.standin.token_uri())
            .form(&[("grant_type", "x")])
            .send()
            .await
    }
}
