#![no_main]
//! Admin API body handling: parse_json / form_to_json / looks_like_json / query_params and the
//! user payload types, with properties:
//! - parse_json never accepts a body whose JSON is not one object;
//! - a patch that validates yields a user that validates and round-trips through JSON;
//! - form_to_json's output is a JSON object of strings.
use libfuzzer_sys::fuzz_target;
use tollgate::admin::http::{form_to_json, looks_like_json, parse_json, query_params, JsonObject};
use tollgate::admin::users::{BulkRequest, CreateRequest};
use tollgate::users::{Patch, User, UserPatch, UserType};

fn is_one_object(body: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<serde_json::Value>(body),
        Ok(serde_json::Value::Object(_))
    )
}

fn check_patch(patch: &UserPatch, at: &str) {
    if patch.validate(at).is_err() {
        return;
    }
    let mut user = User::new("probe".into(), UserType::Normal, 1);
    patch.apply_to(&mut user);
    if let Patch::Set(t) = &patch.token {
        user.token = t.clone();
    }
    user.validate("")
        .unwrap_or_else(|e| panic!("patch validated but user does not: {e}"));
    let text = serde_json::to_string(&user).expect("serialize");
    let back: User = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("validated user does not read back: {e}\n{text}"));
    assert_eq!(back, user, "round trip changed the user: {text}");
    // As the SQLite store keeps it, and as Firebase returns it.
    let stored = User::from_stored(&user.token, serde_json::from_str(&text).unwrap())
        .unwrap_or_else(|e| panic!("validated user not readable as stored: {e}\n{text}"));
    assert_eq!(stored.user, user);
    let _ = tollgate::admin::http::ApiError::bad_request("x", "y").into_response();
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let (sel, body) = (data[0], &data[1..]);
    let _ = looks_like_json(body);
    let body: Vec<u8> = if sel & 0x80 != 0 {
        match form_to_json(body) {
            Ok(json) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&json).expect("form_to_json gives JSON");
                let obj = v.as_object().expect("object");
                assert!(obj.values().all(|v| v.is_string()));
                json
            }
            Err(e) => {
                let _ = e.into_response();
                return;
            }
        }
    } else {
        body.to_vec()
    };
    if let Ok(q) = std::str::from_utf8(&body) {
        let _ = query_params(Some(q));
    }
    match sel % 4 {
        0 => match parse_json::<UserPatch>(&body) {
            Ok(p) => {
                assert!(
                    is_one_object(&body),
                    "accepted a non-object: {:?}",
                    String::from_utf8_lossy(&body)
                );
                check_patch(&p, "");
            }
            Err(e) => {
                let _ = e.into_response();
            }
        },
        1 => match parse_json::<BulkRequest>(&body) {
            Ok(r) => {
                assert!(is_one_object(&body));
                for (i, JsonObject(p)) in r.users.iter().enumerate() {
                    check_patch(p, &format!("users[{i}]"));
                }
            }
            Err(e) => {
                let _ = e.into_response();
            }
        },
        2 => match parse_json::<CreateRequest>(&body) {
            Ok(_) => assert!(is_one_object(&body)),
            Err(e) => {
                let _ = e.into_response();
            }
        },
        _ => {
            if let Ok(user) = parse_json::<User>(&body) {
                assert!(is_one_object(&body));
                if user.validate("").is_ok() {
                    let text = serde_json::to_string(&user).unwrap();
                    let back: User = serde_json::from_str(&text).unwrap();
                    assert_eq!(back, user, "{text}");
                }
            }
        }
    }
});
