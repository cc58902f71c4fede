use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{send_json, Fixture};
use rtdb_standin::fixture::{assertion_claims, sign_assertion};

#[tokio::test]
async fn jwt_bearer_flow_issues_tokens_that_open_the_database() {
    let f = Fixture::new();
    for padded in [false, true] {
        let resp = f.fetch_token(padded).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3599);
        let token = body["access_token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("fake-"));
        let (status, _) = send_json(f.client.get(f.url("/.json")).bearer_auth(&token)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let counters = f.standin.counters();
    assert_eq!(counters.token_requests, 2);
    assert_eq!(
        counters.tokens_issued, 3,
        "two from the endpoint, one from the fixture"
    );
}

#[tokio::test]
async fn token_endpoint_refuses_bad_assertions_with_google_errors() {
    let f = Fixture::new();
    let uri = f.standin.token_uri();
    let now = rtdb_standin_now_s();
    let post = |form: Vec<(&'static str, String)>| send_json(f.client.post(&uri).form(&form));
    let grant = "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned();

    let good = sign_assertion(&assertion_claims("tollgate-standin", &uri, now), false).unwrap();
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    let (status, body) = post(vec![
        ("grant_type", grant.clone()),
        ("assertion", parts.join(".")),
    ])
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    );

    let wrong_aud = assertion_claims(
        "tollgate-standin",
        "https://oauth2.googleapis.com/token",
        now,
    );
    let (status, body) = post(vec![
        ("grant_type", grant.clone()),
        ("assertion", sign_assertion(&wrong_aud, true).unwrap()),
    ])
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    let mut too_long = assertion_claims("tollgate-standin", &uri, now);
    too_long["exp"] = json!(now + 7200);
    let (_, body) = post(vec![
        ("grant_type", grant.clone()),
        ("assertion", sign_assertion(&too_long, false).unwrap()),
    ])
    .await;
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("short-lived token (60 minutes)"));

    let mut no_scope = assertion_claims("tollgate-standin", &uri, now);
    no_scope["scope"] = json!("https://www.googleapis.com/auth/cloud-platform");
    let (_, body) = post(vec![
        ("grant_type", grant.clone()),
        ("assertion", sign_assertion(&no_scope, false).unwrap()),
    ])
    .await;
    assert_eq!(body["error"], "invalid_scope");

    let (status, body) = post(vec![("grant_type", "password".to_owned())]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
    );
    let (status, _) = send_json(f.client.post(&uri).body(vec![0xff, 0x00, b'&', b'='])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send_json(f.client.request(Method::GET, &uri)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(f.standin.counters().token_failures, 6);
}

#[tokio::test]
async fn firebase_key_is_a_service_account_pointing_here() {
    let f = Fixture::new();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(f.standin.firebase_key_b64())
        .unwrap();
    let account: Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!(account["type"], "service_account");
    assert_eq!(account["token_uri"], f.standin.token_uri());
    assert_eq!(account["client_email"], f.standin.client_email());
    assert!(account["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    for field in [
        "project_id",
        "private_key_id",
        "client_id",
        "auth_uri",
        "universe_domain",
    ] {
        assert!(account[field].is_string(), "{field}");
    }
    assert_eq!(
        account.to_string(),
        f.standin
            .service_account_json()
            .parse::<Value>()
            .unwrap()
            .to_string()
    );
}

fn rtdb_standin_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
