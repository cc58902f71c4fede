use reqwest::{Method, StatusCode};
use rtdb_standin::Options;
use serde_json::{json, Value};

use crate::common::{send_full, send_json, Fixture};

#[tokio::test]
async fn requests_need_a_valid_token_unless_rules_are_public() {
    let f = Fixture::new();
    let denied = json!({"error": "Permission denied"});
    assert_eq!(
        send_json(f.client.get(f.url("/.json"))).await,
        (StatusCode::UNAUTHORIZED, denied.clone())
    );
    assert_eq!(
        send_json(f.client.get(f.url("/.json")).bearer_auth("fake-999")).await,
        (StatusCode::UNAUTHORIZED, denied.clone())
    );
    let by_param = f.url(&format!("/.json?access_token={}", f.token));
    assert_eq!(send_json(f.client.get(by_param)).await.0, StatusCode::OK);
    assert_eq!(
        send_json(f.client.get(f.url("/.json")).basic_auth("u", Some("p")))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    f.standin.set_public_rules(true);
    assert_eq!(
        send_json(f.client.get(f.url("/.json"))).await.0,
        StatusCode::OK
    );
    // Credentials that are sent must still be valid.
    assert_eq!(
        send_json(f.client.get(f.url("/.json")).bearer_auth("junk"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    f.standin.set_public_rules(false);

    f.standin
        .advance_clock(std::time::Duration::from_secs(3600));
    assert_eq!(
        f.get_json("/.json").await.0,
        StatusCode::UNAUTHORIZED,
        "token expired on the fake clock"
    );
    let fresh = f.standin.issue_token();
    assert_eq!(
        send_json(f.client.get(f.url("/.json")).bearer_auth(&fresh))
            .await
            .0,
        StatusCode::OK
    );
    f.standin.revoke_tokens();
    assert_eq!(
        send_json(f.client.get(f.url("/.json")).bearer_auth(&fresh))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(f.standin.counters().permission_denied, 6);
}

#[tokio::test]
async fn legacy_secret_is_accepted_when_configured() {
    let f = Fixture::with(Options::default().database_secret("s3cret"));
    assert_eq!(
        send_json(f.client.get(f.url("/.json?auth=s3cret"))).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send_json(f.client.get(f.url("/.json?auth=nope"))).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn put_normalises_and_get_reads_back_arrays() {
    let f = Fixture::new();
    let (status, echo) = f
        .write(
            Method::PUT,
            "/users/a.json",
            json!({"ip": [], "list": ["x", null, "z"], "gone": null, "meta": {}, "n": 1.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo, json!({"list": ["x", null, "z"], "n": 1}));
    assert_eq!(
        f.get_json("/users.json").await.1,
        json!({"a": {"list": ["x", null, "z"], "n": 1}})
    );
    assert_eq!(f.get_json("/users/a/list/2.json").await.1, json!("z"));
    assert_eq!(
        f.get_json("/users/a%2Fb.json").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.get_json("/nothing/here.json").await,
        (StatusCode::OK, Value::Null)
    );
    assert_eq!(
        f.get_json("/users.json?shallow=true").await.1,
        json!({"a": true})
    );
    assert_eq!(f.get_json("/users/a/n.json?shallow=true").await.1, json!(1));
    // Deleting the last child prunes the empty parents.
    assert_eq!(
        f.write(Method::DELETE, "/users/a.json", Value::Null).await,
        (StatusCode::OK, Value::Null)
    );
    assert_eq!(f.get_json("/.json").await.1, Value::Null);
}

#[tokio::test]
async fn print_silent_and_pretty() {
    let f = Fixture::new();
    let (status, _, body) = send_full(
        f.req(Method::PUT, "/a.json?print=silent")
            .json(&json!({"b": 1})),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
    let (status, _, body) = send_full(
        f.req(Method::PATCH, "/a.json?print=silent")
            .json(&json!({"c": 2})),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
    let (_, _, body) = send_full(f.req(Method::GET, "/a.json?print=pretty")).await;
    assert!(body.contains("\n  \"b\": 1"), "{body}");
}

#[tokio::test]
async fn bad_requests_are_400_and_never_crash() {
    let f = Fixture::new();
    for path in [
        "/.json?cachebust=1",
        "/a.json?timeout=16min",
        "/a.json?timeout=abc",
        "/a.json?limitToFirst=1",
        "/a.json?writeSizeLimit=huge",
        "/a$b.json",
        "/a%23b.json",
        "/a%5Bb.json",
        "/%FF%FE.json",
        "/a%01.json",
    ] {
        let (status, body) = f.get_json(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(body["error"].is_string(), "{path}");
    }
    let (status, body) = f.get_json("/a$b.json").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("Invalid path: Invalid token in path")
        )
    );
    let deep = format!("/{}.json", vec!["k"; 33].join("/"));
    assert_eq!(f.get_json(&deep).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        f.get_json("/a.json?timeout=3s&writeSizeLimit=tiny&ns=x")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(f.get_json("/no-suffix").await.0, StatusCode::NOT_FOUND);

    let (status, body) = send_json(f.req(Method::PUT, "/a.json").body("{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "Invalid data; couldn't parse JSON object, array, or value."
    );
    assert_eq!(
        send_json(f.req(Method::PUT, "/a.json").body(vec![0xff, 0xfe]))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.write(Method::PUT, "/a.json", json!({"b.c": 1})).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.write(Method::PUT, "/a.json", json!({".sv": "nonsense"}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send_json(f.req(Method::OPTIONS, "/a.json")).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        f.get_json("/.json").await.1,
        Value::Null,
        "nothing was written"
    );
}

#[tokio::test]
async fn server_values_resolve_on_the_fake_clock() {
    let f = Fixture::new();
    f.standin.freeze_clock_at(1_700_000_000_000);
    let (_, echo) = f
        .write(Method::PUT, "/t.json", json!({"at": {".sv": "timestamp"}}))
        .await;
    assert_eq!(echo, json!({"at": 1_700_000_000_000i64}));
    let inc = json!({".sv": {"increment": 5}});
    assert_eq!(
        f.write(Method::PUT, "/n.json", inc.clone()).await.1,
        json!(5)
    );
    assert_eq!(f.write(Method::PUT, "/n.json", inc).await.1, json!(10));
    assert_eq!(
        f.write(Method::PUT, "/n.json", json!({".sv": {"increment": 0.5}}))
            .await
            .1,
        json!(10.5)
    );
}

#[tokio::test]
async fn multi_path_patch_is_atomic_and_validated_up_front() {
    let f = Fixture::new();
    f.standin
        .set_silently("/users/a", json!({"promptCount": 1, "type": "normal"}))
        .unwrap();
    let before = f.get_json("/.json").await.1;
    for bad in [
        json!({"users/a/promptCount": {".sv": {"increment": 1}}, "users/b.c": 1}),
        json!({"users/a": {"x": 1}, "users/a/type": "special"}),
        json!({"users/a/promptCount": 2, "users/a/meta": {"k$": 1}}),
    ] {
        let (status, body) = f.write(Method::PATCH, "/.json", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body["error"].is_string());
        assert_eq!(
            f.get_json("/.json").await.1,
            before,
            "nothing applied for {bad}"
        );
    }
    let (status, body) = f.write(Method::PATCH, "/users.json", json!([1, 2])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "Invalid data; couldn't parse JSON object. Are you sending a JSON object with valid key names?"
    );

    let (status, echo) = f
        .write(
            Method::PATCH,
            "/.json",
            json!({
                "users/a/promptCount": {".sv": {"increment": 3}},
                "users/a/type": null,
                "users/b": {"promptCount": 1},
                "_sync/instances/i1": {"seq": 1}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["users/a/promptCount"], json!(4));
    assert_eq!(
        f.get_json("/.json").await.1,
        json!({"users": {"a": {"promptCount": 4}, "b": {"promptCount": 1}}, "_sync": {"instances": {"i1": {"seq": 1}}}})
    );
}

#[tokio::test]
async fn etag_compare_and_set() {
    let f = Fixture::new();
    let etag_of =
        |h: &reqwest::header::HeaderMap| h.get("etag").unwrap().to_str().unwrap().to_owned();

    // Create-if-absent with null_etag.
    let create = || {
        f.req(Method::PUT, "/users/u/ip.json")
            .header("if-match", "null_etag")
            .json(&json!(["1.1.1.1"]))
    };
    let (status, headers, _) = send_full(create()).await;
    assert_eq!(status, StatusCode::OK);
    let tag1 = etag_of(&headers);
    assert_eq!(tag1.len(), 28);
    let (status, headers, body) = send_full(create()).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(etag_of(&headers), tag1);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!(["1.1.1.1"])
    );

    // GET with X-Firebase-ETag, then a conditional PUT.
    let (_, headers, _) = send_full(
        f.req(Method::GET, "/users/u/ip.json")
            .header("x-firebase-etag", "true"),
    )
    .await;
    assert_eq!(etag_of(&headers), tag1);
    let (status, _, _) = send_full(
        f.req(Method::GET, "/users/u/ip.json")
            .header("if-none-match", &tag1),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let cas = |tag: &str| {
        f.req(Method::PUT, "/users/u/ip.json")
            .header("if-match", tag)
            .json(&json!(["1.1.1.1", "2.2.2.2"]))
    };
    let (status, headers, _) = send_full(cas(&tag1)).await;
    assert_eq!(status, StatusCode::OK);
    let tag2 = etag_of(&headers);
    assert_ne!(tag1, tag2);
    let (status, headers, body) = send_full(cas(&tag1)).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(etag_of(&headers), tag2);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!(["1.1.1.1", "2.2.2.2"])
    );

    // Combinations modelled as 400s.
    let silent = f
        .req(Method::PUT, "/users/u/ip.json?print=silent")
        .header("if-match", &tag2)
        .json(&json!(1));
    assert_eq!(send_json(silent).await.0, StatusCode::BAD_REQUEST);
    let patch = f
        .req(Method::PATCH, "/users/u.json")
        .header("if-match", &tag2)
        .json(&json!({"x": 1}));
    assert_eq!(send_json(patch).await.0, StatusCode::BAD_REQUEST);
    let shallow = f
        .req(Method::GET, "/users.json?shallow=true")
        .header("x-firebase-etag", "true");
    assert_eq!(send_json(shallow).await.0, StatusCode::BAD_REQUEST);

    // Conditional DELETE.
    let (status, headers, _) = send_full(
        f.req(Method::DELETE, "/users/u/ip.json")
            .header("if-match", &tag2),
    )
    .await;
    assert_eq!(
        (status, etag_of(&headers).as_str()),
        (StatusCode::OK, "null_etag")
    );
    assert_eq!(f.get_json("/users.json").await.1, Value::Null);
}

#[tokio::test]
async fn post_push_ids_and_method_override() {
    let f = Fixture::new();
    let mut names = Vec::new();
    for i in 0..3 {
        let (status, body) = f.write(Method::POST, "/log.json", json!({"i": i})).await;
        assert_eq!(status, StatusCode::OK);
        names.push(body["name"].as_str().unwrap().to_owned());
    }
    assert!(names.iter().all(|n| n.len() == 20));
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, names, "push ids sort in creation order");
    let log = f.get_json("/log.json").await.1;
    assert_eq!(log[&names[2]], json!({"i": 2}));

    let overridden = f
        .req(Method::POST, "/o.json")
        .header("x-http-method-override", "PUT")
        .json(&json!(7));
    assert_eq!(send_json(overridden).await, (StatusCode::OK, json!(7)));
    let overridden = f
        .req(Method::POST, "/o.json")
        .header("X-HTTP-Method-Override", "DELETE");
    assert_eq!(send_json(overridden).await, (StatusCode::OK, Value::Null));
}

#[tokio::test]
async fn order_by_key_with_ranges_and_limits() {
    let f = Fixture::new();
    f.standin
        .set_silently("/u", json!({"a": 1, "b": 2, "c": 3, "d": 4}))
        .unwrap();
    let q = |s: &str| format!("/u.json?orderBy=%22$key%22&{s}");
    assert_eq!(
        f.get_json(&q("limitToFirst=2")).await.1,
        json!({"a": 1, "b": 2})
    );
    assert_eq!(
        f.get_json(&q("startAfter=%22b%22&limitToFirst=1")).await.1,
        json!({"c": 3})
    );
    assert_eq!(
        f.get_json(&q("limitToLast=1&shallow=true")).await.1,
        json!({"d": true})
    );
    let (status, body) = f.get_json("/u.json?orderBy=%22age%22&limitToFirst=1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "Index not defined, add \".indexOn\": \"age\", for path \"/u\", to the rules"
    );
    assert_eq!(
        f.get_json("/u.json?orderBy=%22$value%22").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.get_json("/u.json?orderBy=$key").await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn write_size_cap_is_a_400() {
    let f = Fixture::new();
    f.standin.update_knobs(|k| k.max_write_bytes = Some(16));
    assert_eq!(
        f.write(Method::PUT, "/a.json", json!("short")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        f.write(Method::PUT, "/a.json", json!("x".repeat(32)))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
}
