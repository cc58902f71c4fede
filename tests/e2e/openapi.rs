//! `docs/openapi.yaml` must describe exactly what the admin listener serves.

use std::collections::BTreeSet;

use serde_yaml::Value;

use crate::support::{Origin, TollgateBuilder};

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("docs/openapi.yaml"))
        .expect("valid YAML")
}

fn documented_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in spec["paths"].as_mapping().expect("paths") {
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if method != "parameters" {
                routes.insert((method.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    routes
}

#[test]
fn documented_routes_are_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = tollgate::admin::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented_routes(&spec()), served);
}

/// Every route that reads a body can answer 408 (body too slow) and 413 (body too large):
/// `read_body` runs for each POST and PUT, so the spec must say so for each.
#[test]
fn body_reading_routes_document_408_and_413() {
    let spec = spec();
    for (method, path) in tollgate::admin::ROUTES {
        if !matches!(*method, "POST" | "PUT") {
            continue;
        }
        let responses = &spec["paths"][*path][method.to_lowercase()]["responses"];
        for status in ["408", "413"] {
            assert!(
                responses.get(status).is_some(),
                "{method} {path} does not document {status}"
            );
        }
    }
}

#[test]
fn user_schema_lists_exactly_the_user_fields() {
    let spec = spec();
    let documented: BTreeSet<String> = spec["components"]["schemas"]["User"]["properties"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let full = serde_json::json!({
        "token": "t", "ip": ["1.2.3.4"], "nickname": "n", "type": "normal", "promptCount": 1,
        "tokenCount": 1, "tokenCounts": {"a": 1}, "tokenLimits": {"a": 1}, "tokenRefresh": {"a": 1},
        "createdAt": 1, "lastUsedAt": 1, "disabledAt": 1, "disabledReason": "r", "expiresAt": 1,
        "maxIps": 1, "adminNote": "n", "meta": {"k": 1}
    });
    let user: tollgate::users::User = serde_json::from_value(full).unwrap();
    let served: BTreeSet<String> = serde_json::to_value(user)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(documented, served);
    let patch: BTreeSet<String> = spec["components"]["schemas"]["UserPatch"]["properties"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(patch, served, "every User field can be patched");
}

#[test]
fn every_documented_route_answers_on_the_real_binary() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr).start();
    for (method, path) in documented_routes(&spec()) {
        let path = path.replace("{token}", "some-token");
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = tg.admin_request(method.clone(), &path);
        if method == reqwest::Method::PUT {
            request = request.json(&serde_json::json!({"users": []}));
        }
        let resp = request.send().unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().unwrap();
        assert!(
            status != 405 && !body.contains("no such endpoint"),
            "{method} {path}: {status} {body}"
        );
    }
}
