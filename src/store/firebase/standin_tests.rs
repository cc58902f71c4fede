//! The backend's writes against the local stand-in (`crates/rtdb-standin`), below the engine:
//! batches are taken from a cache and applied as the engine would, faults in between.

use std::time::Duration;

use rtdb_standin::{FaultAction, FaultRule, Options, StandIn};
use serde_json::{json, Value};

use super::*;
use crate::config::FirebaseConfig;
use crate::secret::Secret;
use crate::store::Batch;
use crate::users::UserCache;

pub(super) fn standin() -> StandIn {
    StandIn::start(Options::default())
}

/// The configuration of a store on `db`, with the defaults' timeouts.
pub(crate) fn config(db: &StandIn) -> FirebaseConfig {
    FirebaseConfig {
        rtdb_url: Some(db.db_url()),
        key: Secret::new(db.firebase_key_b64()),
        users_ref: "users".into(),
        emulator_host: None,
        startup_timeout: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(75),
        temporary_user_purge: Duration::from_secs(48 * 3600),
    }
}

pub(super) fn store(db: &StandIn) -> FirebaseStore {
    FirebaseStore::open(&config(db)).unwrap()
}

/// Everything queued in `cache`, as the engine's next batch.
pub(super) fn take(cache: &UserCache, seq: u64) -> Batch {
    let taken = cache.take_changes(1000);
    Batch {
        seq,
        changes: taken.changes,
        covers: taken.covers,
    }
}

pub(super) fn stored_user(token: &str, extra: Value) -> Value {
    let mut user = json!({
        "token": token, "type": "normal", "promptCount": 0, "createdAt": 1700000000000u64,
        "tokenCounts": {"turbo": 0}, "tokenLimits": {"turbo": 0},
    });
    for (k, v) in extra.as_object().unwrap() {
        user[k] = v.clone();
    }
    user
}

/// The users at `/users`, loaded into a fresh cache as at start-up.
pub(super) async fn loaded(store: &FirebaseStore) -> UserCache {
    store.load_cache().await.unwrap()
}

/// The sync engine over `store`, as the running proxy has it (flushes by hand here).
fn engine(
    store: FirebaseStore,
    cache: UserCache,
) -> (
    crate::store::SyncEngine,
    Arc<UserCache>,
    Arc<crate::store::StoreStatus>,
) {
    let cache = Arc::new(cache);
    let status = crate::store::StoreStatus::new("firebase_rtdb", Arc::clone(&cache));
    let engine = crate::store::SyncEngine::new(
        Arc::new(store),
        Arc::clone(&status),
        Duration::from_secs(3600),
        Duration::from_secs(5),
    );
    (engine, cache, status)
}

/// One user's `ip` list kept changing under its compare-and-set (25 lost races in a row):
/// the whole batch used to fail and be retried, and every other user's later counts and
/// edits queued behind it for as long as the race went on. Now that user's addresses alone
/// are held back, and written once the list settles.
#[tokio::test]
async fn an_ip_list_that_keeps_changing_holds_back_only_its_user() {
    let db = standin();
    db.set("/users/a", stored_user("a", json!({}))).unwrap();
    db.set("/users/b", stored_user("b", json!({"ip": ["1.1.1.1"]})))
        .unwrap();
    let store = store(&db);
    let loaded = loaded(&store).await;
    let (engine, cache, status) = engine(store, loaded);
    let (a, b) = (cache.get("a").unwrap(), cache.get("b").unwrap());
    let race = db.add_fault(FaultRule::new(
        "PUT",
        "/users/b/ip.json",
        FaultAction::status(412),
    ));
    cache.count_request(&a, 1);
    cache.admit_ip(&b, "2.2.2.2".parse().unwrap(), 0, 0);
    cache.count_request(&b, 1);
    engine.flush().await.unwrap();
    cache.count_request(&a, 2);
    let ticket = cache.upsert("a", &patch(json!({"nickname": "later"})), 3).1;
    engine.flush().await.unwrap();
    assert_eq!(db.get("/users/a/promptCount").unwrap(), 2);
    assert_eq!(db.get("/users/a/nickname").unwrap(), "later");
    assert_eq!(
        db.get("/users/b/promptCount").unwrap(),
        1,
        "b's count is written"
    );
    assert_eq!(db.get("/users/b/ip").unwrap(), json!(["1.1.1.1"]));
    assert!(
        status
            .wait_written(ticket, &["a"], Duration::from_secs(5))
            .await
    );
    assert_eq!(status.gauges().held_back_users, 1);
    assert!(
        status.gauges().pending_changes >= 1,
        "b's address is not written"
    );

    db.remove_fault(race);
    engine.flush().await.unwrap();
    assert_eq!(
        db.get("/users/b/ip").unwrap(),
        json!(["1.1.1.1", "2.2.2.2"])
    );
    assert_eq!(db.get("/users/b/promptCount").unwrap(), 1, "counted once");
    assert_eq!(status.gauges().held_back_users, 0);
    assert_eq!(status.gauges().pending_changes, 0);
}

/// An upsert of a token whose node is a deleted user's leftovers, which keeps changing while
/// tollgate replaces it: its creation failed for its own reason, and the whole batch with
/// every other user's counts used to wait for it. Now it alone is held back, with the
/// requests counted for it, its admin write is not reported persisted until it is written,
/// and it is created, counted once, when the node settles.
#[tokio::test]
async fn a_creation_that_keeps_failing_holds_back_only_its_user() {
    let db = standin();
    db.set("/users/a", stored_user("a", json!({}))).unwrap();
    db.set("/users/n", json!({"promptCount": 5})).unwrap();
    let store = store(&db);
    let loaded = loaded(&store).await;
    let (engine, cache, status) = engine(store, loaded);
    let a = cache.get("a").unwrap();
    let race = db.add_fault(FaultRule::new(
        "PUT",
        "/users/n.json",
        FaultAction::status(412),
    ));
    let created = cache.upsert("n", &patch(json!({"type": "special"})), 1).1;
    let n = cache.get("n").unwrap();
    cache.count_request(&n, 2);
    cache.count_request(&a, 2);
    engine.flush().await.unwrap();
    cache.count_request(&n, 3);
    let ticket = cache.upsert("a", &patch(json!({"nickname": "later"})), 3).1;
    cache.count_request(&a, 3);
    engine.flush().await.unwrap();
    assert_eq!(db.get("/users/a/promptCount").unwrap(), 2);
    assert_eq!(db.get("/users/a/nickname").unwrap(), "later");
    assert!(
        status
            .wait_written(ticket, &["a"], Duration::from_secs(5))
            .await
    );
    assert!(
        !status
            .wait_written(created, &["n"], Duration::from_millis(50))
            .await,
        "n is not written"
    );
    assert_eq!(db.get("/users/n").unwrap(), json!({"promptCount": 5}));
    assert_eq!(status.gauges().held_back_users, 1);
    assert_eq!(n.prompt_count(), 2, "its requests are kept");

    db.remove_fault(race);
    engine.flush().await.unwrap();
    assert!(
        status
            .wait_written(created, &["n"], Duration::from_secs(5))
            .await
    );
    let stored = db.get("/users/n").unwrap();
    assert_eq!(stored["type"], "special");
    assert_eq!(stored["promptCount"], 2, "counted once: {stored}");
    assert_eq!(status.gauges().held_back_users, 0);
}

/// Admin on another instance cleared the list (`ip: []`, to reset maxIps); this instance still
/// knew the old addresses and had a new one pending: only the new one is added.
#[tokio::test]
async fn an_ip_merge_adds_only_the_new_addresses() {
    let db = standin();
    db.set(
        "/users/t",
        stored_user("t", json!({"ip": ["1.1.1.1", "2.2.2.2"]})),
    )
    .unwrap();
    let store = store(&db);
    let cache = loaded(&store).await;
    db.set("/users/t/ip", Value::Null).unwrap();
    let record = cache.get("t").unwrap();
    cache.admit_ip(&record, "3.3.3.3".parse().unwrap(), 0, 0);
    store.apply(&take(&cache, 1)).await.unwrap();
    assert_eq!(db.get("/users/t/ip").unwrap(), json!(["3.3.3.3"]));
}

/// A hand-edited entry that is not a string neither keeps the user from loading nor, read back
/// before an address is added, empties the stored list: the addresses in it are kept.
#[tokio::test]
async fn a_stored_ip_list_with_a_non_string_entry_keeps_its_addresses() {
    let db = standin();
    db.set(
        "/users/t",
        stored_user("t", json!({"ip": ["1.1.1.1", 7, "2.2.2.2"]})),
    )
    .unwrap();
    let store = store(&db);
    let cache = loaded(&store).await;
    let record = cache.get("t").expect("the user loads");
    cache.admit_ip(&record, "3.3.3.3".parse().unwrap(), 0, 0);
    store.apply(&take(&cache, 1)).await.unwrap();
    assert_eq!(
        db.get("/users/t/ip").unwrap(),
        json!(["1.1.1.1", "2.2.2.2", "3.3.3.3"])
    );
}

/// Starts following the database's change stream into `cache`, as the running proxy does:
/// the store's status, the sender that stops it, and its task.
fn follow(
    store: &Arc<FirebaseStore>,
    cache: &Arc<UserCache>,
) -> (
    Arc<crate::store::StoreStatus>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let status = crate::store::StoreStatus::new("firebase_rtdb", Arc::clone(cache));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let follower = {
        let (store, cache, status) = (Arc::clone(store), Arc::clone(cache), Arc::clone(&status));
        tokio::spawn(async move { store.follow(cache, status, shutdown).await })
    };
    (status, stop, follower)
}

fn patch(value: Value) -> crate::users::UserPatch {
    serde_json::from_value(value).unwrap()
}

/// An upsert of a token this instance does not have (not streamed yet, or unreadable here)
/// updates the stored user instead of replacing it with defaults.
#[tokio::test]
async fn an_upsert_of_an_unknown_token_updates_the_stored_user() {
    let db = standin();
    let store = store(&db);
    let cache = loaded(&store).await;
    db.set(
        "/users/t",
        stored_user(
            "t",
            json!({"type": "temporary", "expiresAt": 1900000000000u64, "promptCount": 10,
                   "tokenLimits": {"gpt4": 5}, "legacyQuota": {"a": 1}, "ip": ["1.1.1.1"]}),
        ),
    )
    .unwrap();
    cache.upsert("t", &patch(json!({"nickname": "n"})), 1);
    let record = cache.get("t").unwrap();
    cache.count_request(&record, 2);
    cache.count_request(&record, 3);
    cache.admit_ip(&record, "2.2.2.2".parse().unwrap(), 0, 0);
    store.apply(&take(&cache, 1)).await.unwrap();
    let stored = db.get("/users/t").unwrap();
    assert_eq!(stored["nickname"], "n");
    assert_eq!(stored["type"], "temporary");
    assert_eq!(stored["expiresAt"], 1900000000000u64);
    assert_eq!(stored["createdAt"], 1700000000000u64);
    assert_eq!(stored["tokenLimits"], json!({"gpt4": 5}));
    assert_eq!(stored["legacyQuota"], json!({"a": 1}));
    assert_eq!(stored["promptCount"], 12, "requests counted once, on top");
    assert_eq!(stored["lastUsedAt"], 3);
    assert_eq!(stored["ip"], json!(["1.1.1.1", "2.2.2.2"]));
}

/// A genuinely new user from an upsert is created whole with its requests counted once, even
/// when the creating PUT's answer is lost.
#[tokio::test]
async fn an_upserted_new_user_is_created_and_counted_exactly_once() {
    let db = standin();
    let store = store(&db);
    let cache = loaded(&store).await;
    cache.upsert("n", &patch(json!({"type": "special", "maxIps": 2})), 1);
    let record = cache.get("n").unwrap();
    for now in 2..5 {
        cache.count_request(&record, now);
    }
    let batch = take(&cache, 1);
    db.add_fault(FaultRule::new("PUT", "/users/n.json", FaultAction::ApplyThenDrop).times(1));
    assert!(store.apply(&batch).await.is_err(), "no answer: retried");
    store.apply(&batch).await.unwrap();
    let stored = db.get("/users/n").unwrap();
    assert_eq!(stored["type"], "special");
    assert_eq!(stored["maxIps"], 2);
    assert_eq!(stored["createdAt"], 1);
    assert_eq!(stored["promptCount"], 3);
}

/// Users created by `POST` (fresh UUIDs, which cannot exist) stay in the one PATCH: no
/// request per user.
#[tokio::test]
async fn posted_users_are_written_in_the_batch_patch() {
    let db = standin();
    let store = store(&db);
    let cache = loaded(&store).await;
    for t in ["p1", "p2", "p3"] {
        cache
            .create(&crate::users::User::new(
                t.into(),
                crate::users::UserType::Normal,
                1,
            ))
            .unwrap();
    }
    db.clear_requests();
    store.apply(&take(&cache, 1)).await.unwrap();
    let writes: Vec<_> = db
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| r.method)
        .collect();
    assert_eq!(writes, vec!["PATCH"]);
    assert_eq!(db.get("/users/p2/createdAt").unwrap(), 1);
}

/// An edit made elsewhere (the console re-enables a user) that reaches an instance while its
/// own write of the same field is on the wire is kept out then, and applied once the write is
/// confirmed: the instance ends with the database's value, not its own older one.
/// A write that failed ambiguously, whose marker could not be read then (the database was
/// away), is settled by one read of the marker once its settle time has passed, not by a new
/// wait at every attempt: a wait started afresh at each attempt took all of a short shutdown
/// deadline, and the requests the write counted were lost.
#[tokio::test]
async fn a_write_given_up_on_long_ago_is_settled_by_one_marker_read() {
    let db = standin();
    db.set("/users/t", stored_user("t", json!({}))).unwrap();
    let store = store(&db);
    let cache = loaded(&store).await;
    let record = cache.get("t").unwrap();
    for _ in 0..3 {
        cache.count_request(&record, 10);
    }
    let batch = take(&cache, 1);
    db.add_fault(FaultRule::new("PATCH", "/.json", FaultAction::DropBeforeApply).times(1));
    db.add_fault(FaultRule::new("GET", "/_sync/*", FaultAction::status(503)).times(1));
    match store.apply(&batch).await {
        Err(StoreError::Unavailable(e)) => assert!(e.contains("marker cannot be read"), "{e}"),
        other => panic!("the write's outcome is unknown, got {other:?}"),
    }
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    db.clear_requests();
    store.apply(&batch).await.unwrap();
    let marker_reads = db
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/_sync/"))
        .count();
    assert_eq!(
        marker_reads, 1,
        "the settle time had passed: no second wait"
    );
    assert_eq!(db.get("/users/t/promptCount").unwrap(), json!(3));
}

#[tokio::test]
async fn a_store_edit_arriving_during_a_write_of_the_same_field_wins_after_it() {
    let db = standin();
    db.set("/users/x", stored_user("x", json!({}))).unwrap();
    db.set("/users/y", stored_user("y", json!({}))).unwrap();
    let store = Arc::new(store(&db));
    let cache = Arc::new(loaded(&store).await);
    let (status, stop, follower) = follow(&store, &cache);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !status.cache_is_current() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream connects"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // This instance disables x; the batch also merges an address of y, held up on the wire.
    cache.disable("x", Some("abuse"), 5).unwrap();
    let y = cache.get("y").unwrap();
    cache.admit_ip(&y, "9.9.9.9".parse().unwrap(), 0, 0);
    let batch = take(&cache, 1);
    db.add_fault(
        FaultRule::new("PUT", "/users/y/ip.json", FaultAction::Delay { ms: 1500 }).times(1),
    );
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { (store.apply(&batch).await.map(|_| ()), batch) })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while db.get("/users/x/disabledAt").unwrap() != json!(5) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the disable is written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now the console re-enables x, after the disable landed: the database's last word.
    db.update(
        "/users/x",
        json!({"disabledAt": null, "disabledReason": null}),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cache.user("x").unwrap().disabled_at,
        Some(5),
        "kept out while the write is in flight"
    );
    let (written, batch) = writer.await.unwrap();
    written.unwrap();
    cache.acknowledge(&batch.changes, !store.echoes_counters());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cache.user("x").unwrap().disabled_at.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the instance still refuses x, which the database re-enabled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(db.get("/users/x/disabledAt").unwrap().is_null());
    stop.send(true).unwrap();
    follower.await.unwrap();
}

/// A deleted user's late counter writes (another instance's batch landing after the delete)
/// leave a node without `createdAt`, which no instance takes for a user. An upsert of that
/// token later replaces it with the whole user; it used to write only its leaves into the
/// remnant, so the admin got a user no instance would admit.
#[tokio::test]
async fn an_upsert_over_a_deleted_users_leftovers_creates_the_user() {
    let db = standin();
    db.set("/users/x", stored_user("x", json!({"promptCount": 7})))
        .unwrap();
    let (a, b, c) = (store(&db), store(&db), store(&db));
    let (cache_a, cache_b) = (loaded(&a).await, loaded(&b).await);
    // B counts requests for x and takes them into a batch; A deletes x and lands first.
    let on_b = cache_b.get("x").unwrap();
    cache_b.count_request(&on_b, 10);
    let batch_b = take(&cache_b, 1);
    cache_a.remove("x").unwrap();
    a.apply(&take(&cache_a, 1)).await.unwrap();
    b.apply(&batch_b).await.unwrap();
    let leftovers = db.get("/users/x").unwrap();
    assert!(
        stream::is_remnant(&leftovers),
        "B's late write left: {leftovers}"
    );

    let cache_c = loaded(&c).await;
    assert!(cache_c.get("x").is_none());
    let patch = serde_json::from_value(json!({"type": "special"})).unwrap();
    cache_c.upsert("x", &patch, 1);
    let batch_c = take(&cache_c, 1);
    c.apply(&batch_c).await.unwrap();
    cache_c.acknowledge(&batch_c.changes, false);

    let stored = db.get("/users/x").unwrap();
    assert!(!stream::is_remnant(&stored), "a whole user: {stored}");
    assert_eq!(stored["type"], "special");
    assert_eq!(
        stored["promptCount"], 0,
        "the deleted user's counts are gone"
    );
    let fresh = loaded(&store(&db)).await;
    assert_eq!(
        fresh.user("x").unwrap().user_type,
        crate::users::UserType::Special
    );
}

/// Start-up puts the stored users into the cache one at a time, with the same users as before:
/// remnants and unreadable users left out, and numeric tokens kept though Firebase renders
/// the users path as an array.
#[tokio::test]
async fn start_up_loads_every_readable_user_of_an_array_rendered_path() {
    let db = standin();
    db.set("/users/1", stored_user("1", json!({"nickname": "one"})))
        .unwrap();
    db.set("/users/2", json!({"promptCount": 7})).unwrap();
    db.set("/users/3", stored_user("3", json!({"promptCount": "lots"})))
        .unwrap();
    db.set("/users/4", stored_user("4", json!({}))).unwrap();
    let store = store(&db);
    let cache = loaded(&store).await;
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.user("1").unwrap().nickname.as_deref(), Some("one"));
    assert!(cache.get("4").is_some());
    let mut tokens: Vec<String> = store
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.token)
        .collect();
    tokens.sort();
    assert_eq!(tokens, ["1", "4"]);
}

/// Start-up's load is bounded by the loader's deadline, not by one counted from the load's
/// own start: a load that starts late (building its client took over half a second on a
/// loaded machine) still gives up before that deadline, with its own message naming the token
/// endpoint that never answered, instead of being cut off by the loader's bare timeout.
#[tokio::test]
async fn a_start_up_load_that_starts_late_still_names_what_did_not_answer() {
    let db = standin();
    db.add_fault(FaultRule::new(
        "POST",
        "/token",
        FaultAction::Delay { ms: 60_000 },
    ));
    let store = store(&db); // startup_timeout: 5 s, so the load stops 0.5 s before the deadline
    let deadline = Instant::now() + Duration::from_secs(2);
    tokio::time::sleep(Duration::from_millis(500)).await; // the late start
    match tokio::time::timeout_at(deadline, store.load_cache_until(deadline)).await {
        Ok(Err(StoreError::Unavailable(message))) => {
            assert!(
                message.contains("no answer from the token endpoint"),
                "{message}"
            )
        }
        Ok(other) => panic!("{:?}", other.map(|cache| cache.len())),
        Err(_) => panic!("the load ran past the loader's deadline"),
    }
}

/// A users path naming a user twice loads the user's last value, as before the start-up
/// read walked the users one at a time (the object was read into a map first): a user whose
/// last value is leftovers (no `createdAt`) is not loaded from its first one.
#[tokio::test]
async fn start_up_takes_the_last_value_of_a_user_named_twice() {
    let db = standin();
    let store = store(&db);
    let first = stored_user("t", json!({"nickname": "first"}));
    let body = format!(r#"{{"t": {first}, "t": {{"promptCount": 3}}}}"#);
    let cache = store.load_body(body.as_bytes()).unwrap();
    assert!(cache.get("t").is_none(), "{:?}", cache.user("t"));
}

/// Firebase returns an object whose keys are all small integers as an array (with `null`
/// holes). Maps keyed by whatever an admin chose (`meta`, and the family maps) come back that
/// way when their keys are numbers, and such a user must still load, with the same map.
#[tokio::test]
async fn a_user_whose_maps_have_numeric_keys_loads_with_those_maps() {
    let db = standin();
    db.set(
        "/users/t",
        stored_user(
            "t",
            json!({"meta": {"1": "one", "2": {"0": true}}, "tokenLimits": {"0": 5, "2": 7}}),
        ),
    )
    .unwrap();
    assert!(
        db.get("/users/t/meta").unwrap().is_array(),
        "as Firebase renders it"
    );
    let store = store(&db);
    let cache = loaded(&store).await;
    let user = cache.user("t").expect("the user loads");
    assert_eq!(
        Value::Object(user.meta.unwrap()),
        json!({"1": "one", "2": [true]})
    );
    assert_eq!(
        serde_json::to_value(&user.token_limits).unwrap(),
        json!({"0": 5, "2": 7})
    );
}

/// A batch larger than one request may carry is split like a refused one: its users are
/// written in smaller groups, and only a user too large on its own is refused (before, the
/// batch was sent whole again and again, the database answering 413 or closing the connection,
/// and every later change queued behind it). The limit is scaled down to 16 KiB here.
#[tokio::test]
async fn a_batch_too_large_for_one_request_is_split() {
    let db = standin();
    let mut store = store(&db);
    store.max_write_bytes = 16 * 1024;
    let cache = loaded(&store).await;
    let user = |token: &str, note_bytes: usize| {
        let mut user = crate::users::User::new(token.into(), crate::users::UserType::Normal, 1);
        user.admin_note = Some("n".repeat(note_bytes));
        user
    };
    for i in 0..20 {
        cache.create(&user(&format!("u{i}"), 2048)).unwrap();
    }
    cache.create(&user("huge", 20 * 1024)).unwrap();
    let report = store.apply(&take(&cache, 1)).await.unwrap();
    let rejected: Vec<&str> = report.rejected.iter().map(|(t, _)| t.as_ref()).collect();
    assert_eq!(rejected, vec!["huge"]);
    for i in 0..20 {
        assert_eq!(
            db.get(&format!("/users/u{i}/createdAt")).unwrap(),
            1,
            "u{i}"
        );
    }
    assert_eq!(db.get("/users/huge").unwrap(), Value::Null);
    let patches: Vec<usize> = db
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.body.len())
        .collect();
    assert!(patches.len() > 1, "{patches:?}");
    assert!(patches.iter().all(|&len| len <= 16 * 1024), "{patches:?}");
}

/// A stream snapshot computed when the listen starts can arrive after this instance's own
/// writes were confirmed (their events follow it): the snapshot lacks a user created here
/// meanwhile. The user must stay the same record all along (a removed record answers its
/// requests 401 until the events bring it back) and an edit of it not yet written must
/// survive; a user the snapshot lacks because it was deleted elsewhere (its edit here not
/// written) is removed once the database, read again, does not hold it either.
#[tokio::test]
async fn a_snapshot_older_than_a_confirmed_creation_keeps_the_user_and_its_edit() {
    let db = standin();
    db.set("/users/g", stored_user("g", json!({}))).unwrap();
    let store = Arc::new(store(&db));
    let cache = Arc::new(loaded(&store).await);
    // g is edited here, and deleted in the database before the stream connects.
    cache.upsert("g", &patch(json!({"nickname": "here"})), 5);
    db.delete("/users/g").unwrap();
    // The stream's body is held back until the stream ends, then trickled: its snapshot is
    // the database when the stream opened.
    db.add_fault(
        FaultRule::new(
            "GET",
            "/users.json",
            FaultAction::Trickle {
                chunk_bytes: 64,
                interval_ms: 1,
            },
        )
        .times(1),
    );
    let (status, stop, follower) = follow(&store, &cache);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.open_streams() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the stream opens");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Its snapshot is taken: u is created here and its creation confirmed, then edited.
    let u = crate::users::User::new("u".into(), crate::users::UserType::Normal, 1);
    cache.create(&u).unwrap();
    let batch = take(&cache, 1);
    store.apply(&batch).await.unwrap();
    cache.acknowledge(&batch.changes, !store.echoes_counters());
    let record = cache.get("u").unwrap();
    cache.upsert("u", &patch(json!({"nickname": "edited"})), 6);

    // The held-back snapshot and the creation's event arrive; the stream then reconnects.
    db.stream_action(rtdb_standin::StreamAction::Close, None)
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.counters().streams_opened < 2 || !status.cache_is_current() || cache.get("g").is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream reconnects and g is removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let now = cache.get("u").expect("u is cached");
    assert!(
        Arc::ptr_eq(&now, &record),
        "u was removed and brought back as a new record"
    );
    assert_eq!(cache.user("u").unwrap().nickname.as_deref(), Some("edited"));
    let batch = take(&cache, 2);
    store.apply(&batch).await.unwrap();
    assert_eq!(db.get("/users/u/nickname").unwrap(), json!("edited"));
    stop.send(true).unwrap();
    follower.await.unwrap();
}

/// The purge on one instance and an admin's extension of the same user on another, written
/// after the purge's delete (before the delete reached that instance over the stream): the
/// extension is lost with the user (docs/firebase.md, *Costs and limits*), and both instances
/// and the database agree that the user is gone; the extension's leaf is a remnant, which no
/// instance takes for a user.
#[tokio::test]
async fn a_purge_and_an_extension_on_another_instance_converge() {
    let hour = 3_600_000;
    let db = standin();
    let expired = json!({"type": "temporary", "expiresAt": 1, "promptCount": 3});
    db.set("/users/x", stored_user("x", expired)).unwrap();
    let (a, b) = (store(&db), store(&db));
    let (cache_a, cache_b) = (loaded(&a).await, loaded(&b).await);
    let after = Duration::from_secs(48 * 3600);
    assert_eq!(
        crate::store::purge::purge_temporary_users(&cache_a, 50 * hour, after),
        1
    );
    cache_b.upsert("x", &patch(json!({"expiresAt": 100 * hour})), 50 * hour);
    a.apply(&take(&cache_a, 1)).await.unwrap();
    let batch_b = take(&cache_b, 1);
    b.apply(&batch_b).await.unwrap();
    cache_b.acknowledge(&batch_b.changes, false);
    assert!(stream::is_remnant(&db.get("/users/x").unwrap()));

    let (b, cache_b) = (Arc::new(b), Arc::new(cache_b));
    let (status, stop, follower) = follow(&b, &cache_b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(status.cache_is_current() && cache_b.get("x").is_none()) {
        assert!(tokio::time::Instant::now() < deadline, "B keeps the user");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cache_a.get("x").is_none());
    assert!(loaded(&store(&db)).await.get("x").is_none());
    stop.send(true).unwrap();
    follower.await.unwrap();
}
