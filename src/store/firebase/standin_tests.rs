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

pub(super) fn store(db: &StandIn) -> FirebaseStore {
    FirebaseStore::open(&FirebaseConfig {
        rtdb_url: Some(db.db_url()),
        key: Secret::new(db.firebase_key_b64()),
        users_ref: "users".into(),
        emulator_host: None,
        startup_timeout: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(75),
        temporary_user_purge: Duration::from_secs(48 * 3600),
    })
    .unwrap()
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
    let cache = UserCache::default();
    cache.load(store.load_all().await.unwrap());
    cache
}

#[tokio::test]
async fn an_ip_list_that_keeps_changing_is_retried_not_dropped() {
    let db = standin();
    db.set("/users/t", stored_user("t", json!({"ip": ["1.1.1.1"]})))
        .unwrap();
    let store = store(&db);
    let cache = loaded(&store).await;
    let record = cache.get("t").unwrap();
    cache.admit_ip(&record, "2.2.2.2".parse().unwrap(), 0);
    let batch = take(&cache, 1);
    db.add_fault(FaultRule::new("PUT", "/users/t/ip.json", FaultAction::status(412)).times(25));
    match store.apply(&batch).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a lost race must be retried, got {other:?}"),
    }
    store.apply(&batch).await.unwrap();
    assert_eq!(
        db.get("/users/t/ip").unwrap(),
        json!(["1.1.1.1", "2.2.2.2"])
    );
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
    cache.admit_ip(&record, "3.3.3.3".parse().unwrap(), 0);
    store.apply(&take(&cache, 1)).await.unwrap();
    assert_eq!(db.get("/users/t/ip").unwrap(), json!(["3.3.3.3"]));
}
