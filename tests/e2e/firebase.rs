//! The Firebase RTDB store on the real binary, against the local stand-in
//! (`crates/rtdb-standin`): the older proxy's layout, both sync directions across instances,
//! exact counters under faults, shutdown, and start-up failures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use rtdb_standin::{
    FaultAction, FaultRule, Options, PatchEventKeys, RedirectScope, StandIn, StreamAction,
};
use serde_json::{json, Value};

use crate::support::tollgate::Tollgate;
use crate::support::{client, metric_sample, wait_until, Origin, TollgateBuilder};

mod soak;

/// Edits made elsewhere must be live within this.
const PROPAGATION: Duration = Duration::from_secs(2);

fn standin() -> StandIn {
    StandIn::start(Options::default().keepalive(Duration::from_millis(200)))
}

/// tollgate on the stand-in: 1 s flushes, a 2 s stream watchdog, no rate limit.
fn builder(origin: &Origin, db: &StandIn) -> TollgateBuilder {
    builder_flushing(origin, db, 1)
}

fn builder_flushing(origin: &Origin, db: &StandIn, flush_seconds: u64) -> TollgateBuilder {
    TollgateBuilder::new(origin.addr)
        .env("GATEKEEPER_STORE", "firebase_rtdb")
        .env("FIREBASE_RTDB_URL", &db.db_url())
        .env("FIREBASE_KEY", &db.firebase_key_b64())
        .yaml(&format!(
            "store:\n  flush_interval_seconds: {flush_seconds}\n  firebase:\n    \
             keepalive_timeout_seconds: 2\n    startup_timeout_seconds: 5\n"
        ))
        .yaml("rate_limit:\n  requests_per_minute: 0\n")
}

fn start(origin: &Origin, db: &StandIn) -> Tollgate {
    start_streaming(builder(origin, db), db)
}

/// Starts an instance and waits until its change stream is open and it is ready.
fn start_streaming(builder: TollgateBuilder, db: &StandIn) -> Tollgate {
    let streams = db.open_streams();
    let tg = builder.start();
    assert!(
        wait_until(Duration::from_secs(10), || db.open_streams() > streams),
        "no stream opened:\n{}",
        tg.log()
    );
    wait_ready(&tg);
    tg
}

fn wait_ready(tg: &Tollgate) {
    let ready = wait_until(Duration::from_secs(15), || {
        client()
            .get(tg.admin_url("/ready"))
            .send()
            .is_ok_and(|r| r.status() == StatusCode::OK)
    });
    assert!(ready, "not ready:\n{}", tg.log());
}

fn proxy(tg: &Tollgate, token: &str) -> StatusCode {
    client()
        .get(tg.url("/v1/models"))
        .bearer_auth(token)
        .send()
        .map(|r| r.status())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

fn stored(db: &StandIn, path: &str) -> Value {
    db.get(path).unwrap()
}

/// Polls until `check` holds, for at most `within`; panics with `what` otherwise.
fn eventually(within: Duration, what: &str, tg: &Tollgate, check: impl FnMut() -> bool) {
    assert!(wait_until(within, check), "{what}\n{}", tg.log());
}

fn older_user(token: &str, extra: Value) -> Value {
    let mut user = json!({
        "token": token, "type": "normal", "promptCount": 0, "createdAt": 1700000000000u64,
        "tokenCounts": {"turbo": 0}, "tokenLimits": {"turbo": 0}, "ip": [], "meta": {},
    });
    for (k, v) in extra.as_object().unwrap() {
        user[k] = v.clone();
    }
    user
}

#[test]
fn older_layout_loads_and_every_user_works() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently(
        "/users",
        json!({
            "full": older_user("full", json!({"ip": ["1.2.3.4", "::ffff:5.6.7.8"], "nickname": "bob",
                "type": "special", "promptCount": 12, "tokenCounts": {"turbo": 1200, "gpt4": 0.5},
                "tokenLimits": {"gpt4": 100000}, "lastUsedAt": 1700000001000u64,
                "meta": {"refreshable": true}, "adminNote": "n"})),
            // RTDB dropped its empty containers; no token field either.
            "bare": {"type": "normal", "promptCount": 3, "createdAt": 1},
            // Fields tollgate does not know, from another fork of the older proxy.
            "legacy": older_user("legacy", json!({"legacyQuota": {"a": 1}, "quotaResetAt": 5})),
            // An ip list with a hole reads back with null in it.
            "holes": older_user("holes", json!({"ip": {"0": "9.9.9.9", "2": "8.8.8.8"}})),
            "broken": {"type": "normal", "promptCount": "lots", "createdAt": 1},
            // What late counter writes leave of a deleted user: not a user.
            "leftover": {"promptCount": 7, "lastUsedAt": 1700000001000u64, "ip": ["1.1.1.1"]},
        }),
    )
    .unwrap();
    let tg = start(&origin, &db);
    assert!(tg.log().contains("loaded 4 users"), "{}", tg.log());
    for token in ["full", "bare", "legacy", "holes"] {
        assert_eq!(proxy(&tg, token), StatusCode::OK, "{token}");
    }
    assert_eq!(proxy(&tg, "broken"), StatusCode::UNAUTHORIZED);
    assert_eq!(proxy(&tg, "leftover"), StatusCode::UNAUTHORIZED);
    let log = tg.log();
    assert!(log.contains("cannot be read and is skipped"), "{log}");
    assert!(
        log.contains("1 entries under /users are leftovers"),
        "{log}"
    );
    assert!(
        log.contains("legacyQuota"),
        "unknown fields are named: {log}"
    );
    assert!(
        !log.contains("\"broken\"") && !log.contains(" broken "),
        "no tokens in logs"
    );
    // Reported at load, not again when the stream's snapshot brings the same values.
    eventually(Duration::from_secs(5), "stream connected", &tg, || {
        tg.log().contains("firebase stream connected")
    });
    let log = tg.log();
    assert_eq!(
        log.matches("cannot be read and is skipped").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("legacyQuota").count(), 1, "{log}");

    let full = tg.user("full");
    assert_eq!(full["nickname"], "bob");
    assert_eq!(full["tokenCounts"], json!({"turbo": 1200, "gpt4": 0.5}));
    assert_eq!(tg.user("holes")["ip"].as_array().unwrap().len(), 3);

    // Counters go up in the database; the ip list stays a list; unknown fields stay.
    eventually(Duration::from_secs(10), "counters written", &tg, || {
        stored(&db, "/users/bare/promptCount") == json!(4)
            && stored(&db, "/users/full/promptCount") == json!(13)
    });
    eventually(Duration::from_secs(10), "ip lists merged", &tg, || {
        stored(&db, "/users/bare/ip") == json!(["127.0.0.1"])
            && stored(&db, "/users/full/ip") == json!(["1.2.3.4", "::ffff:5.6.7.8", "127.0.0.1"])
    });
    assert_eq!(stored(&db, "/users/legacy/legacyQuota"), json!({"a": 1}));
    assert_eq!(stored(&db, "/users/full/nickname"), json!("bob"));
    assert_eq!(stored(&db, "/users/broken/promptCount"), json!("lots"));
    // Leaves only: nobody rewrote a whole user.
    let writes: Vec<_> = db
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert!(!writes.is_empty());
    for w in &writes {
        let body: Value = serde_json::from_str(&w.body).unwrap();
        for key in body.as_object().unwrap().keys() {
            assert!(
                key.starts_with("_sync/instances/") || key.matches('/').count() >= 2,
                "whole-user write {key}"
            );
        }
    }
}

#[test]
fn console_edits_reach_the_cache_quickly() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently("/users/alice", older_user("alice", json!({})))
        .unwrap();
    let tg = start(&origin, &db);
    assert_eq!(proxy(&tg, "alice"), StatusCode::OK);

    // A console edit of one leaf.
    db.set("/users/alice/disabledAt", json!(1700000000000u64))
        .unwrap();
    db.set("/users/alice/disabledReason", json!("console"))
        .unwrap();
    eventually(PROPAGATION, "console disable visible", &tg, || {
        tg.user("alice")["disabledReason"] == "console"
    });
    assert_eq!(proxy(&tg, "alice"), StatusCode::FORBIDDEN);
    // A user added in the console works; one removed there stops working.
    db.set("/users/carol", older_user("carol", json!({})))
        .unwrap();
    eventually(PROPAGATION, "console user visible", &tg, || {
        proxy(&tg, "carol") == StatusCode::OK
    });
    db.delete("/users/carol").unwrap();
    eventually(PROPAGATION, "console delete visible", &tg, || {
        proxy(&tg, "carol") == StatusCode::UNAUTHORIZED
    });
    // Another instance's counter write lands after the delete: RTDB re-creates the node with
    // just that leaf, which must not bring carol back. (Events arrive in order: once the
    // nickname shows, the leaf's event was handled.)
    db.update(
        "/",
        json!({"users/carol/promptCount": 4, "users/carol/lastUsedAt": 1700000009000u64}),
    )
    .unwrap();
    db.set("/users/alice/nickname", json!("sync point"))
        .unwrap();
    eventually(
        PROPAGATION,
        "the edit after the leftover visible",
        &tg,
        || tg.user("alice")["nickname"] == "sync point",
    );
    assert_eq!(proxy(&tg, "carol"), StatusCode::UNAUTHORIZED);
    // A multi-path update in the nested event form.
    db.update_knobs(|k| k.patch_event_keys = PatchEventKeys::Nest);
    db.update(
        "/",
        json!({"users/alice/disabledAt": null, "users/alice/disabledReason": null,
               "users/alice/nickname": "al", "users/dave": older_user("dave", json!({}))}),
    )
    .unwrap();
    eventually(PROPAGATION, "multi-path update visible", &tg, || {
        tg.user("alice")["nickname"] == "al" && proxy(&tg, "dave") == StatusCode::OK
    });
    assert_eq!(proxy(&tg, "alice"), StatusCode::OK);
}

/// `lastUsedAt` is written last-writer-wins: a time in the database older than this
/// instance's (another instance's write landed last) or none at all (cleared in the console)
/// is what the instance shows, as every other instance does.
#[test]
fn an_older_or_cleared_last_use_in_the_database_is_taken() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently("/users/u", older_user("u", json!({})))
        .unwrap();
    let tg = start(&origin, &db);
    assert_eq!(proxy(&tg, "u"), StatusCode::OK);
    eventually(Duration::from_secs(10), "the request written", &tg, || {
        stored(&db, "/users/u/promptCount") == json!(1)
    });
    assert!(tg.user("u")["lastUsedAt"].as_u64() > Some(1700000005000));
    db.set("/users/u/lastUsedAt", json!(1700000005000u64))
        .unwrap();
    eventually(PROPAGATION, "the older time taken", &tg, || {
        tg.user("u")["lastUsedAt"] == json!(1700000005000u64)
    });
    db.delete("/users/u/lastUsedAt").unwrap();
    eventually(PROPAGATION, "the cleared time taken", &tg, || {
        tg.user("u")["lastUsedAt"].is_null()
    });
}

#[test]
fn admin_edits_on_one_instance_reach_the_other() {
    let db = standin();
    let origin = Origin::start();
    let a = start(&origin, &db);
    let b = start(&origin, &db);

    // Only temporary users take tokenLimits at creation (as in the older proxy).
    let expires_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 86_400_000;
    let resp = a
        .admin_request(Method::POST, "/admin/users")
        .json(&json!({"type": "temporary", "expiresAt": expires_at,
                      "tokenLimits": {"gpt4": 1000}}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-tollgate-persisted"],
        "true",
        "acknowledged by the database"
    );
    let token = resp.json::<Value>().unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        stored(&db, &format!("/users/{token}/tokenLimits")),
        json!({"gpt4": 1000})
    );
    eventually(PROPAGATION, "created on A, works on B", &b, || {
        proxy(&b, &token) == StatusCode::OK
    });

    // Different fields edited on both at once: both edits stay (per-field last writer wins).
    let path = format!("/admin/users/{token}");
    let (sa, _) = a.admin_call(Method::PUT, &path, Some(json!({"nickname": "from-a"})));
    let (sb, _) = b.admin_call(Method::PUT, &path, Some(json!({"maxIps": 7})));
    assert_eq!((sa, sb), (200, 200));
    for tg in [&a, &b] {
        eventually(PROPAGATION, "both edits everywhere", tg, || {
            let u = tg.user(&token);
            u["nickname"] == "from-a" && u["maxIps"] == 7
        });
    }
    // The same field edited on both: the later write wins everywhere.
    a.admin_call(Method::PUT, &path, Some(json!({"adminNote": "first"})));
    b.admin_call(Method::PUT, &path, Some(json!({"adminNote": "second"})));
    for tg in [&a, &b] {
        eventually(PROPAGATION, "last writer wins", tg, || {
            tg.user(&token)["adminNote"] == "second"
        });
    }
    // An absolute promptCount set by an admin replaces the counter everywhere.
    b.admin_call(Method::PUT, &path, Some(json!({"promptCount": 100})));
    eventually(PROPAGATION, "admin count visible on A", &a, || {
        a.user(&token)["promptCount"] == 100
    });
    // Disable on A; B refuses the user; a hard delete removes it everywhere.
    let (status, _) = a.admin_call(Method::DELETE, &path, None);
    assert_eq!(status, 200);
    eventually(PROPAGATION, "disabled on B", &b, || {
        proxy(&b, &token) == StatusCode::FORBIDDEN
    });
    let (status, _) = b.admin_call(Method::DELETE, &format!("{path}?hard=true"), None);
    assert_eq!(status, 200);
    eventually(PROPAGATION, "deleted on A", &a, || {
        proxy(&a, &token) == StatusCode::UNAUTHORIZED
    });
    assert_eq!(stored(&db, &format!("/users/{token}")), Value::Null);
}

/// An admin clears a user's `ip` list on B (the usual way to reset `maxIps`) while A has a new
/// address pending for that user: A's merge adds only that address, and the old ones stay
/// gone everywhere.
#[test]
fn clearing_an_ip_list_is_not_undone_by_another_instance() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently(
        "/users",
        json!({"u": older_user("u", json!({"ip": ["1.1.1.1", "2.2.2.2"]}))}),
    )
    .unwrap();
    // A flushes only when asked, so the new address stays pending across B's reset.
    let streams = db.open_streams();
    let a = builder_flushing(&origin, &db, 600)
        .yaml("trusted_proxies: [\"127.0.0.1\"]")
        .start();
    assert!(wait_until(Duration::from_secs(10), || db.open_streams() > streams));
    wait_ready(&a);
    let b = start(&origin, &db);
    let status = client()
        .get(a.url("/v1/models"))
        .bearer_auth("u")
        .header("x-forwarded-for", "3.3.3.3")
        .send()
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    let path = "/admin/users/u";
    let (status, _) = b.admin_call(
        Method::PUT,
        path,
        Some(json!({"ip": [], "nickname": "reset"})),
    );
    assert_eq!(status, 200);
    eventually(PROPAGATION, "B's reset reached A", &a, || {
        a.user("u")["nickname"] == "reset"
    });
    assert_eq!(a.user("u")["ip"], json!(["3.3.3.3"]), "{}", a.log());
    // Any admin write on A waits for a flush of everything queued, the ip merge included.
    let (status, _) = a.admin_call(Method::POST, "/admin/users", Some(json!({})));
    assert_eq!(status, 200);
    assert_eq!(stored(&db, "/users/u/ip"), json!(["3.3.3.3"]));
    eventually(PROPAGATION, "B sees only the new address", &b, || {
        b.user("u")["ip"] == json!(["3.3.3.3"])
    });
}

/// `PUT /admin/users/<t>` for a token this instance does not have (here: stored without
/// notifying the stream) updates the stored user; it does not replace it with defaults.
#[test]
fn an_upsert_of_a_token_unknown_here_keeps_the_stored_user() {
    let db = standin();
    let origin = Origin::start();
    let tg = start(&origin, &db);
    db.set_silently(
        "/users/quiet",
        older_user(
            "quiet",
            json!({"type": "special", "promptCount": 40, "tokenLimits": {"gpt4": 9},
                   "legacyQuota": {"a": 1}}),
        ),
    )
    .unwrap();
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/quiet",
        Some(json!({"nickname": "n"})),
    );
    assert_eq!(status, 200);
    let user = stored(&db, "/users/quiet");
    assert_eq!(user["nickname"], "n");
    assert_eq!(user["type"], "special");
    assert_eq!(user["promptCount"], 40);
    assert_eq!(user["createdAt"], 1700000000000u64);
    assert_eq!(user["tokenLimits"], json!({"gpt4": 9}));
    assert_eq!(user["legacyQuota"], json!({"a": 1}), "{}", tg.log());
}

/// Three instances under traffic while the database fails in every way the issue names;
/// afterwards each user's stored `promptCount` equals the requests answered for it.
#[test]
fn three_instances_keep_exact_counters_under_faults() {
    let db = standin();
    let origin = Origin::start();
    let tokens: Vec<String> = (0..6).map(|i| format!("user-{i}")).collect();
    let seed: serde_json::Map<String, Value> = tokens
        .iter()
        .map(|t| (t.clone(), older_user(t, json!({}))))
        .collect();
    db.set_silently("/users", Value::Object(seed)).unwrap();
    let mut instances: Vec<Tollgate> = (0..3).map(|_| start(&origin, &db)).collect();

    let answered: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = instances
        .iter()
        .enumerate()
        .map(|(n, tg)| {
            let (url, tokens) = (tg.url("/v1/chat"), tokens.clone());
            let (answered, stop) = (Arc::clone(&answered), Arc::clone(&stop));
            std::thread::spawn(move || {
                let http = client();
                let mut i = n;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let token = &tokens[i % tokens.len()];
                    i += 1;
                    let ok = http
                        .post(&url)
                        .bearer_auth(token)
                        .body("{}")
                        .send()
                        .is_ok_and(|r| r.status() == StatusCode::OK);
                    if ok {
                        *answered.lock().unwrap().entry(token.clone()).or_default() += 1;
                    }
                    std::thread::sleep(Duration::from_millis(4));
                }
            })
        })
        .collect();

    let pause = |ms| std::thread::sleep(Duration::from_millis(ms));
    pause(1_200);
    // 5xx on writes: not applied, retried.
    db.add_fault(
        FaultRule::new("PATCH", "/.json", FaultAction::status_retry_after(503, "1")).times(3),
    );
    pause(1_500);
    // Writes applied but never acknowledged: the marker tells them apart from lost ones.
    db.add_fault(FaultRule::new("PATCH", "/.json", FaultAction::ApplyThenDrop).times(3));
    pause(2_000);
    db.add_fault(FaultRule::new("PATCH", "/.json", FaultAction::DropBeforeApply).times(2));
    pause(1_500);
    // Every token revoked: streams get auth_revoked, writes get 401.
    db.revoke_tokens();
    pause(1_500);
    // A 10 s outage: every request and stream reset; the proxies keep serving.
    db.begin_outage();
    pause(10_000);
    db.end_outage();
    pause(2_000);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    db.clear_faults();
    let answered = answered.lock().unwrap().clone();
    let total: u64 = answered.values().sum();
    assert!(total > 300, "too little traffic: {total}");

    let log = db.requests();
    assert!(
        log.iter()
            .any(|r| r.outcome.starts_with("applied_then_dropped")),
        "no ambiguous write happened"
    );
    let stored_counts = || -> HashMap<String, u64> {
        tokens
            .iter()
            .map(|t| {
                let v = stored(&db, &format!("/users/{t}/promptCount"));
                (t.clone(), v.as_u64().unwrap_or(0))
            })
            .collect()
    };
    let expected: HashMap<String, u64> = tokens
        .iter()
        .map(|t| (t.clone(), answered.get(t).copied().unwrap_or(0)))
        .collect();
    // Give the instances' retries time to land, then stop them: SIGTERM flushes the rest.
    wait_until(Duration::from_secs(40), || stored_counts() == expected);
    for tg in &mut instances {
        assert!(tg.stop().success(), "{}", tg.log());
    }
    assert_eq!(
        stored_counts(),
        expected,
        "stored counts vs answered requests"
    );
    for t in &tokens {
        assert_eq!(stored(&db, &format!("/users/{t}/ip")), json!(["127.0.0.1"]));
    }
    let logs: String = instances.iter().map(|tg| tg.log()).collect();
    assert!(logs.contains("marker shows it applied"), "{logs}");
    assert!(logs.contains("credential revoked"), "{logs}");
    assert!(db.counters().tokens_issued > 3, "tokens were refreshed");
}

#[test]
fn graceful_shutdown_writes_everything() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently("/users/u", older_user("u", json!({})))
        .unwrap();
    let mut tg = builder_flushing(&origin, &db, 3600).start();
    for _ in 0..25 {
        assert_eq!(proxy(&tg, "u"), StatusCode::OK);
    }
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/u",
        Some(json!({"nickname": "n"})),
    );
    assert_eq!(status, 200, "an admin write is flushed at once");
    // The admin write flushed everything queued before it; count some more after it.
    for _ in 0..5 {
        assert_eq!(proxy(&tg, "u"), StatusCode::OK);
    }
    assert!(tg.stop().success());
    assert_eq!(stored(&db, "/users/u/promptCount"), json!(30));
    assert_eq!(stored(&db, "/users/u/nickname"), json!("n"));
    assert!(tg.log().contains("all changes written before shutdown"));
}

#[test]
fn a_write_cut_off_by_the_shutdown_deadline_is_not_sent_twice() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently("/users/u", older_user("u", json!({})))
        .unwrap();
    let mut tg = builder_flushing(&origin, &db, 3600)
        .yaml("pingora:\n  grace_period_seconds: 2\n  graceful_shutdown_timeout_seconds: 1")
        .start();
    for _ in 0..25 {
        assert_eq!(proxy(&tg, "u"), StatusCode::OK);
    }
    // The shutdown flush's write reaches the database but is applied only after 2.1 s, past
    // the 2 s shutdown deadline that cuts the request off: its outcome is unknown to tollgate,
    // which finds it applied (within its 1 s settle time) instead of sending it again.
    db.add_fault(FaultRule::new("PATCH", "/.json", FaultAction::Delay { ms: 2100 }).times(1));
    assert!(tg.stop().success());
    // tollgate has exited; the delayed write lands meanwhile (and a resend would have too).
    assert!(
        wait_until(Duration::from_secs(10), || stored(
            &db,
            "/users/u/promptCount"
        ) != json!(0)),
        "{}",
        tg.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stored(&db, "/users/u/promptCount"),
        json!(25),
        "{}",
        tg.log()
    );
    assert!(tg.log().contains("turned out applied"), "{}", tg.log());
}

#[test]
fn a_request_in_flight_at_sigterm_is_counted_too() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently("/users/u", older_user("u", json!({})))
        .unwrap();
    let mut tg = builder_flushing(&origin, &db, 3600)
        .yaml("pingora:\n  threads: 2\n  grace_period_seconds: 3\n  graceful_shutdown_timeout_seconds: 2")
        .start();
    assert_eq!(proxy(&tg, "u"), StatusCode::OK);
    let url = tg.url("/slow");
    let slow = std::thread::spawn(move || {
        crate::support::client()
            .get(url)
            .bearer_auth("u")
            .header("x-origin-delay-ms", "1500")
            .send()
            .map(|r| r.status().as_u16())
    });
    assert!(crate::support::wait_until(
        Duration::from_secs(5),
        || origin.count() == 2
    ));
    // The engine's shutdown flush runs at once; the slow request is answered after it.
    assert!(tg.stop().success());
    assert_eq!(slow.join().unwrap().expect("answered"), 200);
    assert_eq!(stored(&db, "/users/u/promptCount"), json!(2));
}

#[test]
fn stream_survives_redirects_revocation_cancel_and_stalls() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently("/users/u", older_user("u", json!({})))
        .unwrap();
    // Every database request is redirected to another host (127.0.0.2).
    db.set_redirect(RedirectScope::All, None);
    let tg = start(&origin, &db);
    let redirected: Vec<_> = db
        .requests()
        .into_iter()
        .filter(|r| r.listener == "secondary")
        .collect();
    assert!(!redirected.is_empty(), "redirects were followed");
    assert!(
        redirected.iter().all(|r| r
            .headers
            .get("authorization")
            .is_some_and(|a| a.starts_with("Bearer "))),
        "Authorization kept across hosts"
    );
    let nick = |n: &str| {
        db.set("/users/u/nickname", json!(n)).unwrap();
        eventually(PROPAGATION, &format!("edit {n} visible"), &tg, || {
            tg.user("u")["nickname"] == n
        });
    };
    nick("after-redirect");
    // Writes go through the redirect too.
    assert_eq!(proxy(&tg, "u"), StatusCode::OK);
    eventually(
        Duration::from_secs(10),
        "write through redirect",
        &tg,
        || stored(&db, "/users/u/promptCount") == json!(1),
    );
    db.set_redirect(RedirectScope::Off, None);

    let issued = db.counters().tokens_issued;
    db.stream_action(StreamAction::AuthRevoked, None).unwrap();
    assert!(wait_until(Duration::from_secs(5), || db
        .counters()
        .tokens_issued
        > issued));
    nick("after-revoke");

    db.stream_action(StreamAction::Stall, None).unwrap();
    nick_after_watchdog(&db, &tg);

    db.stream_action(StreamAction::MalformedEvent, None)
        .unwrap();
    wait_ready(&tg);
    nick("after-malformed");

    for action in [
        StreamAction::Comment,
        StreamAction::UnknownEvent,
        StreamAction::Duplicate,
        StreamAction::CloseMidEvent,
    ] {
        db.stream_action(action, None).unwrap();
    }
    wait_ready(&tg);
    nick("after-noise");

    db.stream_action(StreamAction::Cancel, None).unwrap();
    eventually(Duration::from_secs(2), "cancel reported", &tg, || {
        tg.log().contains("firebase stream cancelled")
    });
    // A deletion while the stream is away applies from the next snapshot.
    db.delete("/users/u").unwrap();
    wait_ready(&tg);
    eventually(PROPAGATION, "deletion made while away applied", &tg, || {
        proxy(&tg, "u") == StatusCode::UNAUTHORIZED
    });
    let metrics = tg.metrics();
    let reconnects = crate::support::metric_sample(
        &metrics,
        r#"tollgate_store_stream_reconnects_total{store="firebase_rtdb"}"#,
    );
    assert!(reconnects >= Some(1.0), "{metrics}");
}

/// A stalled stream is dropped by the watchdog (2 s here) and the edit arrives after it.
fn nick_after_watchdog(db: &StandIn, tg: &Tollgate) {
    db.set("/users/u/nickname", json!("after-stall")).unwrap();
    eventually(Duration::from_secs(8), "watchdog reconnect", tg, || {
        tg.user("u")["nickname"] == "after-stall"
    });
    assert!(tg.log().contains("nothing received for"), "{}", tg.log());
}

#[test]
fn a_refused_write_is_split_and_the_rest_applied_once() {
    let db = standin();
    let origin = Origin::start();
    let tokens = ["a", "b", "c", "d"];
    for t in tokens {
        db.set_silently(&format!("/users/{t}"), older_user(t, json!({})))
            .unwrap();
    }
    let tg = builder_flushing(&origin, &db, 3600).start();
    for t in tokens {
        assert_eq!(proxy(&tg, t), StatusCode::OK);
        assert_eq!(proxy(&tg, t), StatusCode::OK);
    }
    // The whole batch is refused once: it is split and its halves go through.
    db.add_fault(FaultRule::new("PATCH", "/.json", FaultAction::status(400)).times(1));
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/a",
        Some(json!({"nickname": "x"})),
    );
    assert_eq!(status, 200);
    for t in tokens {
        assert_eq!(
            stored(&db, &format!("/users/{t}/promptCount")),
            json!(2),
            "{t}"
        );
    }
    assert!(tg.log().contains("splitting it"), "{}", tg.log());
    // A change refused on its own is dropped and reported, to the log and to the admin write
    // that waited for it (not "persisted"); later changes still flow.
    db.add_fault(FaultRule::new("PATCH", "/.json", FaultAction::status(400)).times(1));
    let (status, body) = tg.admin_call(
        Method::PUT,
        "/admin/users/b",
        Some(json!({"nickname": "y"})),
    );
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "store_refused", "{body}");
    assert!(tg.log().contains("it is dropped"), "{}", tg.log());
    // ... and undone here: the instance serves what the database holds, as the others do.
    eventually(Duration::from_secs(5), "refused edit undone", &tg, || {
        tg.user("b")["nickname"].is_null()
    });
    db.add_fault(
        FaultRule::new(
            "PUT",
            "/users/refused-creation.json",
            FaultAction::status(400),
        )
        .times(1),
    );
    let (status, body) = tg.admin_call(
        Method::PUT,
        "/admin/users/refused-creation",
        Some(json!({"nickname": "new"})),
    );
    assert_eq!(status, 500, "{body}");
    eventually(
        Duration::from_secs(5),
        "refused creation undone",
        &tg,
        || proxy(&tg, "refused-creation") == StatusCode::UNAUTHORIZED,
    );
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/b",
        Some(json!({"nickname": "z"})),
    );
    assert_eq!(status, 200);
    assert_eq!(stored(&db, "/users/b/nickname"), json!("z"));
}

/// One user's write keeps failing on its own (its `ip` list, and another's creation, keep
/// changing under tollgate's compare-and-set): every other user's counts and edits are
/// written all the while, the failing users' changes are kept and written once their nodes
/// settle, and the operator sees who and why. Before, the whole batch was retried, and every
/// later change of every user queued behind it.
#[test]
fn one_users_failing_write_holds_back_only_that_user() {
    let db = standin();
    let origin = Origin::start();
    for t in ["a", "b"] {
        db.set_silently(&format!("/users/{t}"), older_user(t, json!({})))
            .unwrap();
    }
    // A deleted user's leftovers, which an upsert replaces by compare-and-set.
    db.set_silently("/users/n", json!({"promptCount": 5}))
        .unwrap();
    let tg = start_streaming(
        builder(&origin, &db).admin_yaml("persist_timeout_ms: 1500"),
        &db,
    );
    let races = [
        db.add_fault(FaultRule::new(
            "PUT",
            "/users/b/ip.json",
            FaultAction::status(412),
        )),
        db.add_fault(FaultRule::new(
            "PUT",
            "/users/n.json",
            FaultAction::status(412),
        )),
    ];
    // b's first request adds this client's address to its list.
    assert_eq!(proxy(&tg, "b"), StatusCode::OK);
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/n",
        Some(json!({"type": "special"})),
    );
    assert_eq!(status, 202, "n is not written: {}", tg.log());
    for _ in 0..3 {
        assert_eq!(proxy(&tg, "a"), StatusCode::OK);
    }
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/a",
        Some(json!({"nickname": "written"})),
    );
    assert_eq!(status, 200, "{}", tg.log());
    assert_eq!(stored(&db, "/users/a/promptCount"), json!(3));
    assert_eq!(stored(&db, "/users/a/nickname"), json!("written"));
    eventually(PROPAGATION, "b's count written", &tg, || {
        stored(&db, "/users/b/promptCount") == json!(1)
    });
    let held = metric_sample(
        &tg.metrics(),
        r#"tollgate_store_held_back_users{store="firebase_rtdb"}"#,
    );
    assert_eq!(held, Some(2.0), "{}", tg.metrics());
    assert!(
        tg.log().contains("tried again with the next write"),
        "{}",
        tg.log()
    );
    assert_eq!(stored(&db, "/users/b/ip"), Value::Null);
    assert_eq!(stored(&db, "/users/n"), json!({"promptCount": 5}));

    for race in races {
        db.remove_fault(race);
    }
    eventually(
        Duration::from_secs(10),
        "held-back changes written",
        &tg,
        || {
            stored(&db, "/users/b/ip") == json!(["127.0.0.1"])
                && stored(&db, "/users/n/type") == json!("special")
        },
    );
    assert_eq!(stored(&db, "/users/b/promptCount"), json!(1), "once");
    assert_eq!(stored(&db, "/users/n/promptCount"), json!(0));
    eventually(Duration::from_secs(5), "no user held back", &tg, || {
        metric_sample(
            &tg.metrics(),
            r#"tollgate_store_held_back_users{store="firebase_rtdb"}"#,
        ) == Some(0.0)
    });
}

#[test]
fn temporary_user_purge_runs_on_one_instance() {
    let db = standin();
    let origin = Origin::start();
    let a = start(&origin, &db);
    let b = start(&origin, &db);
    // Both instances try; the lease in the database lets one of them lead.
    let lease = || stored(&db, "/_sync/leader/purge-temporary-users");
    eventually(Duration::from_secs(5), "lease taken", &a, || {
        lease()["id"].is_string()
    });
    let holder = lease()["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lease()["id"].as_str(), Some(holder.as_str()), "no flapping");
    let puts = db
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("_sync/leader") && r.status == Some(200))
        .count();
    assert_eq!(puts, 1, "one instance took the lease");
    drop((a, b));
}

#[test]
fn markers_of_runs_stopped_long_ago_are_removed_by_one_instance() {
    let db = standin();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let day = 24 * 3600 * 1000;
    db.set_silently(
        "/_sync/instances",
        json!({
            "old-host-1": {"seq": 4, "batch": 2, "at": now - 8 * day},
            "old-host-2": {"seq": 9, "batch": 9, "at": now - 30 * day},
            "recent-host": {"seq": 1, "batch": 1, "at": now - 6 * day},
            "no-time-host": {"seq": 1},
        }),
    )
    .unwrap();
    let origin = Origin::start();
    let a = start(&origin, &db);
    let b = start(&origin, &db);
    let instances = || stored(&db, "/_sync/instances");
    eventually(Duration::from_secs(5), "stale markers removed", &a, || {
        instances().get("old-host-1").is_none() && instances().get("old-host-2").is_none()
    });
    let left = instances();
    assert!(left.get("recent-host").is_some(), "{left}");
    assert!(left.get("no-time-host").is_some(), "{left}");
    // One instance does it: each stale marker is deleted once.
    let deletes = db
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE" && r.path.contains("_sync/instances"))
        .count();
    assert_eq!(deletes, 2);
    drop((a, b));
}

fn run_to_exit(builder: TollgateBuilder) -> (bool, String, Duration) {
    let started = Instant::now();
    let (status, output) = builder.run_to_exit(&[], Duration::from_secs(20));
    (status.success(), output, started.elapsed())
}

#[test]
fn bad_key_unreachable_database_and_denied_access_fail_start_up_fast() {
    let db = standin();
    let origin = Origin::start();
    let bound = Duration::from_secs(5);
    let check = |name: &str, b: TollgateBuilder, expect: &str| {
        let (ok, output, took) = run_to_exit(b);
        assert!(!ok, "{name}: start-up must fail:\n{output}");
        assert!(
            took < bound + Duration::from_secs(3),
            "{name}: took {took:?}"
        );
        let line = output
            .lines()
            .find(|l| l.starts_with("tollgate: "))
            .unwrap_or_else(|| panic!("{name}: no error line:\n{output}"));
        assert!(line.contains(expect), "{name}: {line}");
        assert!(
            !output.contains("PRIVATE KEY") && !output.contains("fake-"),
            "{name}: secrets leaked"
        );
    };
    // Not base64 at all.
    check(
        "garbage key",
        builder(&origin, &db).env("FIREBASE_KEY", "%%% not a key %%%"),
        "FIREBASE_KEY: not base64",
    );
    // A malformed key is a configuration error at a real start as under `-t`: exit 2.
    let (status, output) = builder(&origin, &db)
        .env("FIREBASE_KEY", "%%% not a key %%%")
        .run_to_exit(&[], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("configuration error"), "{output}");
    // A well-formed key the token endpoint does not know.
    let mut account: Value = serde_json::from_str(&db.service_account_json()).unwrap();
    account["client_email"] = json!("someone-else@example.iam.gserviceaccount.com");
    let foreign = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(account.to_string())
    };
    check(
        "unknown account",
        builder(&origin, &db).env("FIREBASE_KEY", &foreign),
        "refused the service account",
    );
    // Nothing listens at the database URL.
    let closed = format!("http://127.0.0.1:{}", crate::support::free_port());
    check(
        "unreachable",
        builder(&origin, &db).env("FIREBASE_RTDB_URL", &closed),
        "in the 5 s of store.firebase.startup_timeout_seconds",
    );
    check(
        "unreachable",
        builder(&origin, &db).env("FIREBASE_RTDB_URL", &closed),
        "(check FIREBASE_RTDB_URL)",
    );
    // The token endpoint never answers (an egress firewall dropping oauth2.googleapis.com):
    // the line points at the key's token_uri, not at the database URL that was never asked.
    let stalled = db.add_fault(FaultRule::new(
        "POST",
        "/token",
        FaultAction::Delay { ms: 60_000 },
    ));
    let (ok, output, _) = run_to_exit(builder(&origin, &db));
    assert!(!ok, "{output}");
    let line = output
        .lines()
        .find(|l| l.starts_with("tollgate: "))
        .unwrap_or_else(|| panic!("no error line:\n{output}"));
    assert!(
        line.contains("token endpoint") && line.contains("token_uri"),
        "{line}"
    );
    assert!(!line.contains("FIREBASE_RTDB_URL"), "{line}");
    assert!(db.remove_fault(stalled));
    // The account may not read the users.
    db.add_fault(FaultRule::new(
        "GET",
        "/users.json",
        FaultAction::status(401),
    ));
    check(
        "permission denied",
        builder(&origin, &db),
        "permission denied",
    );
}

#[test]
fn access_tokens_are_refreshed_before_they_expire() {
    let db = StandIn::start(
        Options::default()
            .keepalive(Duration::from_millis(200))
            .token_expires_in(Duration::from_secs(4)),
    );
    let origin = Origin::start();
    db.set_silently("/users/u", older_user("u", json!({})))
        .unwrap();
    let tg = start(&origin, &db);
    let mut answered = 0;
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        if proxy(&tg, "u") == StatusCode::OK {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eventually(Duration::from_secs(10), "all counted", &tg, || {
        stored(&db, "/users/u/promptCount") == json!(answered)
    });
    assert!(
        db.counters().tokens_issued >= 2,
        "a new token before expiry"
    );
    let refused: Vec<_> = db
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET" && r.status == Some(401))
        .collect();
    assert!(refused.is_empty(), "writes never used an expired token");
}

/// `tollgate -t` decodes the database URL and the key (nothing is sent): a malformed one is a
/// configuration error naming the variable, not a start-up failure later.
#[test]
fn dash_t_checks_the_database_url_and_the_key() {
    let db = standin();
    let origin = Origin::start();
    for (name, value, expect) in [
        (
            "FIREBASE_RTDB_URL",
            "not-a-url",
            "environment: FIREBASE_RTDB_URL: not a URL",
        ),
        (
            "FIREBASE_RTDB_URL",
            "ftp://x.firebaseio.com",
            "environment: FIREBASE_RTDB_URL: unsupported scheme",
        ),
        (
            "FIREBASE_RTDB_URL",
            "http://x.firebaseio.com",
            "environment: FIREBASE_RTDB_URL: must be https://",
        ),
        (
            "FIREBASE_KEY",
            "%%%notbase64",
            "environment: FIREBASE_KEY: not base64",
        ),
        (
            "FIREBASE_RTDB_URL",
            "https://u:p@x.firebaseio.com",
            "environment: FIREBASE_RTDB_URL: must not contain a user or password",
        ),
        (
            "FIREBASE_RTDB_URL",
            "https://x.firebaseio.com/users",
            "environment: FIREBASE_RTDB_URL: must be the database's root URL",
        ),
    ] {
        let (status, output) = builder(&origin, &db)
            .env(name, value)
            .run_to_exit(&["-t"], Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{name}={value}: {output}");
        assert!(output.contains(expect), "{name}={value}: {output}");
    }
    let (status, output) = builder(&origin, &db).run_to_exit(&["-t"], Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(db.requests().is_empty(), "-t sent nothing to the database");
}

/// A database whose users all disappear at once (emptied, restored from nothing) empties the
/// cache as it should, and says so at warn: every client is refused from then on.
#[test]
fn a_database_emptied_at_once_is_warned_about() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently(
        "/users",
        json!({"a": older_user("a", json!({})), "b": older_user("b", json!({}))}),
    )
    .unwrap();
    let tg = start(&origin, &db);
    assert_eq!(proxy(&tg, "a"), StatusCode::OK);
    db.delete("/users").unwrap();
    eventually(
        PROPAGATION,
        "the emptied database warned about",
        &tg,
        || {
            tg.log()
                .contains("/users holds no users now; the 2 cached users are removed")
        },
    );
    assert_eq!(proxy(&tg, "a"), StatusCode::UNAUTHORIZED);
}

/// `FIREBASE_USERS_REF_NAME` (undocumented in the older proxy, default `users`) names where
/// the users are: existing users load from there and new ones are written there, as whole
/// `/<ref>/<token>` objects in the older layout, and nothing goes to `/users`.
#[test]
fn the_users_ref_name_is_where_users_load_from_and_go() {
    let db = standin();
    let origin = Origin::start();
    db.set_silently(
        "/proxy_users",
        json!({"old": older_user("old", json!({"nickname": "n"}))}),
    )
    .unwrap();
    let tg = start_streaming(
        builder(&origin, &db).env("FIREBASE_USERS_REF_NAME", "proxy_users"),
        &db,
    );
    assert_eq!(proxy(&tg, "old"), StatusCode::OK);
    assert_eq!(tg.user("old")["nickname"], "n");
    let (status, _) = tg.admin_call(
        Method::PUT,
        "/admin/users/new",
        Some(json!({"nickname": "m"})),
    );
    assert_eq!(status, 200);
    let new = stored(&db, "/proxy_users/new");
    assert_eq!(
        (new["nickname"].as_str(), new["type"].as_str()),
        (Some("m"), Some("normal")),
        "{new}"
    );
    assert!(new["createdAt"].is_u64(), "{new}");
    eventually(Duration::from_secs(10), "counter written", &tg, || {
        stored(&db, "/proxy_users/old/promptCount") == json!(1)
    });
    // A disable without a reason is written (the older proxy wrote `disabledReason:
    // undefined`, which made Firebase refuse the whole batch).
    let (status, _) = tg.admin_call(Method::DELETE, "/admin/users/new", None);
    assert_eq!(status, 200);
    let new = stored(&db, "/proxy_users/new");
    assert!(new["disabledAt"].is_u64(), "{new}");
    assert!(new.get("disabledReason").is_none(), "{new}");
    assert_eq!(new["meta"]["refreshable"], false, "{new}");
    assert_eq!(stored(&db, "/users"), Value::Null);
}
