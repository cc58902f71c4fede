use std::time::Duration;

use rusqlite::Connection;
use serde_json::json;

use super::*;
use crate::store::{StoreStatus, SyncEngine};
use crate::users::{UserCache, UserPatch, UserType};

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("tollgate.db");
    (dir, path)
}

fn engine(store: &Arc<SqliteStore>) -> (SyncEngine, Arc<UserCache>) {
    let cache = Arc::new(UserCache::default());
    let status = StoreStatus::new("sqlite", Arc::clone(&cache));
    let backend: Arc<dyn StoreBackend> = Arc::clone(store) as _;
    let engine = SyncEngine::new(
        backend,
        status,
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    (engine, cache)
}

/// A store at `path` with an engine, and user "a" created and written.
async fn with_user_a(path: &Path) -> (Arc<SqliteStore>, SyncEngine, Arc<UserCache>) {
    let store = Arc::new(SqliteStore::open(path).unwrap());
    let (engine, cache) = engine(&store);
    create(&cache, "a");
    engine.flush().await.unwrap();
    (store, engine, cache)
}

fn create(cache: &UserCache, token: &str) {
    cache
        .create(&User::new(token.into(), UserType::Normal, 1))
        .unwrap();
}

/// The stored users' tokens, sorted.
async fn stored_tokens(store: &SqliteStore) -> Vec<String> {
    let mut tokens: Vec<_> = store
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.token)
        .collect();
    tokens.sort();
    tokens
}

/// A user with every field set, as the older proxy exports them.
fn full_user(token: &str) -> User {
    serde_json::from_value(json!({
        "token": token, "ip": ["1.2.3.4", "::ffff:5.6.7.8"], "nickname": "bob",
        "type": "temporary", "promptCount": 12, "tokenCount": 0,
        "tokenCounts": {"turbo": 1200, "gpt4": 0.5}, "tokenLimits": {"gpt4": 100000},
        "tokenRefresh": {"gpt4": 5}, "createdAt": 1700000000000u64,
        "lastUsedAt": 1700000001000u64, "disabledAt": 1700000002000u64,
        "disabledReason": "bye", "expiresAt": 1700000003000u64, "maxIps": 2,
        "adminNote": "n", "meta": {"refreshable": true}
    }))
    .unwrap()
}

fn raw(path: &Path) -> Connection {
    Connection::open(path).unwrap()
}

fn column<T: rusqlite::types::FromSql>(path: &Path, sql: &str) -> T {
    raw(path).query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn a_new_file_gets_the_current_schema_in_wal_mode() {
    let (_dir, path) = temp();
    SqliteStore::open(&path).unwrap();
    assert!(path.exists(), "directory and file created");
    assert_eq!(column::<u32>(&path, "PRAGMA user_version"), SCHEMA_VERSION);
    assert_eq!(
        column::<i32>(&path, "PRAGMA application_id"),
        APPLICATION_ID
    );
    assert_eq!(column::<String>(&path, "PRAGMA journal_mode"), "wal");
    // Opening again is a no-op.
    SqliteStore::open(&path).unwrap();
    assert_eq!(column::<u32>(&path, "PRAGMA user_version"), SCHEMA_VERSION);
}

#[tokio::test]
async fn users_round_trip_with_every_field() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let (engine, cache) = engine(&store);
    let user = full_user("tok-1");
    cache.create(&user).unwrap();
    engine.flush().await.unwrap();
    let loaded = store.load_all().await.unwrap();
    assert_eq!(loaded, vec![user]);
    let doc: String = column(&path, "SELECT doc FROM users");
    assert!(
        !doc.contains("promptCount") && !doc.contains("lastUsedAt"),
        "counters live in their columns only: {doc}"
    );
    assert_eq!(column::<i64>(&path, "SELECT prompt_count FROM users"), 12);
}

#[tokio::test]
async fn counted_requests_update_only_the_counter_columns() {
    let (_dir, path) = temp();
    let (_store, engine, cache) = with_user_a(&path).await;
    // Mark the stored document so a rewrite would show.
    raw(&path)
        .execute(
            "UPDATE users SET doc = json_set(doc, '$.adminNote', 'marker')",
            [],
        )
        .unwrap();
    let rec = cache.get("a").unwrap();
    for _ in 0..5 {
        cache.count_request(&rec, 42);
    }
    engine.flush().await.unwrap();
    let (count, last, doc): (i64, Option<i64>, String) = raw(&path)
        .query_row(
            "SELECT prompt_count, last_used_at, doc FROM users",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((count, last), (5, Some(42)));
    assert!(doc.contains("marker"), "document untouched: {doc}");
}

fn counted_batch(cache: &UserCache, token: &str, requests: usize, seq: u64) -> Batch {
    let rec = cache.get(token).unwrap();
    for _ in 0..requests {
        cache.count_request(&rec, 7);
    }
    let taken = cache.take_changes(10);
    Batch {
        seq,
        changes: taken.changes,
        covers: taken.covers,
    }
}

#[tokio::test]
async fn a_retried_batch_does_not_count_twice() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let cache = UserCache::default();
    cache
        .create(&User::new("a".into(), UserType::Normal, 1))
        .unwrap();
    let created = counted_batch(&cache, "a", 0, 1);
    store.apply(&created).await.unwrap();
    cache.acknowledge(&created.changes, true);
    let first = counted_batch(&cache, "a", 3, 2);
    store.apply(&first).await.unwrap();
    cache.acknowledge(&first.changes, true);
    let second = counted_batch(&cache, "a", 2, 3);
    store.apply(&second).await.unwrap();
    // The commit happened but, say, its success was not reported: the same batch again.
    store.apply(&second).await.unwrap();
    store.apply(&first).await.unwrap();
    let users = store.load_all().await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].prompt_count, 5);
    assert_eq!(users[0].last_used_at, Some(7));
}

/// A graceful upgrade's two processes on one file holding `tokens`: (old, new), each a store,
/// its engine and a cache loaded from the file.
async fn two_processes(
    path: &Path,
    tokens: &[&str],
) -> [(Arc<SqliteStore>, SyncEngine, Arc<UserCache>); 2] {
    let setup = Arc::new(SqliteStore::open(path).unwrap());
    let (setup_engine, cache) = engine(&setup);
    for t in tokens {
        cache
            .create(&User::new((*t).into(), UserType::Normal, 1))
            .unwrap();
    }
    setup_engine.flush().await.unwrap();
    let mut processes = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(SqliteStore::open(path).unwrap());
        let (engine, cache) = engine(&store);
        cache.load(store.load_all().await.unwrap());
        processes.push((store, engine, cache));
    }
    processes.try_into().ok().unwrap()
}

#[tokio::test]
async fn two_processes_on_one_file_add_up_their_counts() {
    // A graceful upgrade: the new process loaded the users, then the old one kept counting
    // until it exited. Neither overwrites the other's requests.
    let (_dir, path) = temp();
    let [(_, old_engine, old_cache), (new, new_engine, new_cache)] =
        two_processes(&path, &["a"]).await;
    for _ in 0..4 {
        old_cache.count_request(&old_cache.get("a").unwrap(), 10);
    }
    for _ in 0..3 {
        new_cache.count_request(&new_cache.get("a").unwrap(), 20);
    }
    new_engine.flush().await.unwrap();
    old_engine.flush().await.unwrap();
    let users = new.load_all().await.unwrap();
    assert_eq!(users[0].prompt_count, 7);
    // An admin's absolute value still replaces the count.
    new_cache.upsert(
        "a",
        &serde_json::from_str(r#"{"promptCount": 100}"#).unwrap(),
        30,
    );
    new_engine.flush().await.unwrap();
    assert_eq!(new.load_all().await.unwrap()[0].prompt_count, 100);
}

#[tokio::test]
async fn counts_from_the_old_process_do_not_bring_back_a_user_the_new_one_deleted() {
    // A graceful upgrade: an admin hard-deletes a user on the new process while the old one
    // still answers (and counts) a last request of that user.
    let (_dir, path) = temp();
    let [(_, old_engine, old_cache), (new, new_engine, new_cache)] =
        two_processes(&path, &["gone", "kept"]).await;
    new_cache.remove("gone").unwrap();
    new_engine.flush().await.unwrap();
    for t in ["gone", "kept"] {
        old_cache.count_request(&old_cache.get(t).unwrap(), 10);
    }
    old_engine.flush().await.unwrap();
    let users = new.load_all().await.unwrap();
    assert_eq!(
        users
            .iter()
            .map(|u| (u.token.as_str(), u.prompt_count))
            .collect::<Vec<_>>(),
        vec![("kept", 1)]
    );
}

#[tokio::test]
async fn a_large_file_loads_on_several_threads_with_every_user_once() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let (engine, cache) = engine(&store);
    for i in 0..1000 {
        cache
            .create(&User::new(format!("u{i:04}"), UserType::Normal, i))
            .unwrap();
    }
    engine.flush().await.unwrap();
    // Holes in the rowids, and rows past the first range's end.
    for i in (0..1000).step_by(7) {
        cache.remove(&format!("u{i:04}")).unwrap();
    }
    for i in 1000..1100 {
        cache
            .create(&User::new(format!("u{i:04}"), UserType::Normal, i))
            .unwrap();
    }
    engine.flush().await.unwrap();
    let mut expected: Vec<String> = cache.snapshot().into_iter().map(|u| u.token).collect();
    expected.sort();
    if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
        let mut loaded: Vec<String> = load_with(&path, "me", 10)
            .unwrap()
            .0
            .into_iter()
            .map(|u| u.token)
            .collect();
        loaded.sort();
        assert_eq!(loaded, expected);
    }
    let mut single: Vec<String> = load_with(&path, "me", usize::MAX)
        .unwrap()
        .0
        .into_iter()
        .map(|u| u.token)
        .collect();
    single.sort();
    assert_eq!(single, expected);
}

#[tokio::test]
async fn removed_users_are_deleted_and_others_kept() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let (engine, cache) = engine(&store);
    for t in ["a", "b", "c"] {
        create(&cache, t);
    }
    engine.flush().await.unwrap();
    cache.remove("b").unwrap();
    engine.flush().await.unwrap();
    assert_eq!(stored_tokens(&store).await, ["a", "c"]);
}

#[tokio::test]
async fn a_full_disk_fails_the_flush_and_the_retry_loses_nothing() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let (engine, cache) = engine(&store);
    cache
        .create(&User::new("first".into(), UserType::Normal, 1))
        .unwrap();
    engine.flush().await.unwrap();
    // Cap the writer's file at its current size: the next big write hits SQLITE_FULL.
    {
        let slot = store.writer.lock();
        let conn = &slot
            .current
            .as_ref()
            .expect("connected by the first flush")
            .conn;
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "max_page_count", pages).unwrap();
    }
    for i in 0..500 {
        let mut user = User::new(format!("user-{i}"), UserType::Normal, 1);
        user.admin_note = Some("x".repeat(200));
        cache.create(&user).unwrap();
    }
    let err = engine.flush().await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{message}");
    assert!(
        message.contains("disk is full") && message.contains(&path.display().to_string()),
        "{message}"
    );
    assert_eq!(
        column::<i64>(&path, "SELECT count(*) FROM users"),
        1,
        "nothing of the failed transaction is visible"
    );
    // The failed write dropped its connection; the new one has no cap: the retry succeeds.
    engine.flush().await.unwrap();
    assert_eq!(store.load_all().await.unwrap().len(), 501);
}

/// The version-1 layout exactly as it was, written by hand (not from the migration list).
fn make_v1(path: &Path, docs: &[&str]) {
    let conn = raw(path);
    conn.execute_batch(
        "CREATE TABLE users (token TEXT NOT NULL PRIMARY KEY, doc TEXT NOT NULL) STRICT;
         PRAGMA application_id = 1416382324;
         PRAGMA user_version = 1;",
    )
    .unwrap();
    for doc in docs {
        let token: String = serde_json::from_str::<serde_json::Value>(doc)
            .map(|v| v["token"].as_str().unwrap_or("broken").to_string())
            .unwrap_or_else(|_| "broken".into());
        conn.execute(
            "INSERT INTO users (token, doc) VALUES (?1, ?2)",
            (token, doc),
        )
        .unwrap();
    }
}

#[tokio::test]
async fn a_version_1_file_is_migrated_and_serves_its_users() {
    assert_eq!(APPLICATION_ID, 1416382324, "the literal in make_v1");
    let (_dir, path) = temp();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let with_counters = full_user("old-1");
    let fresh = User::new("old-2".into(), UserType::Special, 5);
    make_v1(
        &path,
        &[
            &serde_json::to_string(&with_counters).unwrap(),
            &serde_json::to_string(&fresh).unwrap(),
        ],
    );
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(column::<u32>(&path, "PRAGMA user_version"), 2);
    let mut users = store.load_all().await.unwrap();
    users.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(users, vec![with_counters, fresh]);
    let (count, last): (i64, Option<i64>) = raw(&path)
        .query_row(
            "SELECT prompt_count, last_used_at FROM users WHERE token = 'old-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((count, last), (12, Some(1700000001000)));
    let docs_with_counters: i64 = column(
        &path,
        "SELECT count(*) FROM users WHERE doc LIKE '%promptCount%' OR doc LIKE '%lastUsedAt%'",
    );
    assert_eq!(docs_with_counters, 0);

    // The migrated file has exactly the layout of a new one.
    let (_fresh_dir, fresh) = temp();
    SqliteStore::open(&fresh).unwrap();
    assert_eq!(layout(&path), layout(&fresh));
}

/// Every table's columns: (table, name, type, not null, default, primary key).
fn layout(path: &Path) -> Vec<(String, String, String, bool, Option<String>, i64)> {
    let conn = raw(path);
    let mut stmt = conn
        .prepare(
            "SELECT m.name, c.name, c.type, c.\"notnull\", c.dflt_value, c.pk
             FROM sqlite_schema m JOIN pragma_table_info(m.name) c
             WHERE m.type = 'table' ORDER BY m.name, c.cid",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn a_failed_migration_leaves_the_file_at_its_old_version() {
    let (_dir, path) = temp();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    make_v1(
        &path,
        &[
            r#"{"token":"ok","type":"normal","promptCount":1,"createdAt":1}"#,
            "{not json",
        ],
    );
    let err = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("from version 1 to 2") && err.contains("still version 1"),
        "{err}"
    );
    assert_eq!(column::<u32>(&path, "PRAGMA user_version"), 1);
    let cols: i64 = column(
        &path,
        "SELECT count(*) FROM pragma_table_info('users') WHERE name = 'prompt_count'",
    );
    assert_eq!(cols, 0, "the ALTER TABLE was rolled back too");
}

#[test]
fn a_file_from_a_newer_tollgate_is_refused() {
    let (_dir, path) = temp();
    SqliteStore::open(&path).unwrap();
    raw(&path)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, SqliteError::TooNew { .. }));
    let message = err.to_string();
    assert!(
        message.starts_with(&path.display().to_string())
            && message.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
        "{message}"
    );
    assert_eq!(
        column::<u32>(&path, "PRAGMA user_version"),
        SCHEMA_VERSION + 1,
        "left alone"
    );
}

#[test]
fn another_applications_database_is_refused() {
    let (_dir, path) = temp();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    raw(&path)
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, SqliteError::Foreign { .. }), "{err}");
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_clearly() {
    let (_dir, path) = temp();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![b'z'; 8192]).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(err.is_fatal());
    let message = err.to_string();
    assert!(
        message.starts_with(&path.display().to_string())
            && message.contains("not an SQLite database"),
        "{message}"
    );
}

#[tokio::test]
async fn a_damaged_row_stops_the_load_naming_the_row_not_the_token() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let (engine, cache) = engine(&store);
    cache
        .create(&User::new("secret-token".into(), UserType::Normal, 1))
        .unwrap();
    engine.flush().await.unwrap();
    raw(&path)
        .execute("UPDATE users SET doc = '{\"token\": 5}'", [])
        .unwrap();
    let err = store.load_all().await.unwrap_err().to_string();
    assert!(err.contains("row 1") && err.contains("tok:"), "{err}");
    assert!(!err.contains("secret-token"), "{err}");
}

#[test]
fn a_directory_that_cannot_be_created_is_named() {
    let (dir, _) = temp();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let path = blocker.join("sub").join("tollgate.db");
    let message = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(
        message.contains("cannot create the directory") && message.contains("file/sub"),
        "{message}"
    );
}

#[test]
fn oversized_counters_are_rejected_not_retried_forever() {
    let cache = UserCache::default();
    let mut user = User::new("big".into(), UserType::Normal, 1);
    user.prompt_count = u64::MAX;
    cache.create(&user).unwrap();
    let change = cache.take_changes(1).changes.pop().unwrap();
    let Err(reason) = rows::encode(&change) else {
        panic!("encoded")
    };
    assert!(reason.contains("promptCount"), "{reason}");
}

#[tokio::test]
async fn a_refused_change_is_undone_from_the_file() {
    let (_dir, path) = temp();
    let (store, engine, cache) = with_user_a(&path).await;
    let edit: UserPatch =
        serde_json::from_value(json!({"nickname": "n", "promptCount": u64::MAX})).unwrap();
    cache.upsert("a", &edit, 2);
    let mut big = User::new("big".into(), UserType::Normal, 1);
    big.prompt_count = u64::MAX;
    cache.create(&big).unwrap();
    engine.flush().await.unwrap();
    let a = cache.user("a").unwrap();
    assert_eq!(
        (a.nickname, a.prompt_count),
        (None, 0),
        "back to the stored row"
    );
    assert!(cache.user("big").is_none(), "never stored, so gone");
    assert_eq!(stored_tokens(&store).await, ["a"]);
}

#[test]
fn a_step_another_process_took_meanwhile_is_skipped() {
    // Two tollgates starting on one new file: both saw it empty, the first created the schema.
    let (_dir, path) = temp();
    SqliteStore::open(&path).unwrap();
    let mut conn = raw(&path);
    schema::migrate(&mut conn, &path, 0).unwrap();
    assert_eq!(column::<u32>(&path, "PRAGMA user_version"), SCHEMA_VERSION);
}

/// One user "a" flushed, then a second row "b" at `rowid`. SQLite rowids are any i64 (a hand
/// edit, rows copied with their rowids, SQLite's random choice once max(rowid) is i64::MAX),
/// and a long-lived file's range grows apart as users come and go.
async fn file_with_rowid(rowid: i64) -> (tempfile::TempDir, PathBuf, Arc<SqliteStore>) {
    let (dir, path) = temp();
    let (store, _, _) = with_user_a(&path).await;
    insert_copy_of_a(&path, rowid, "b");
    (dir, path, store)
}

fn insert_copy_of_a(path: &Path, rowid: i64, token: &str) {
    raw(path)
        .execute(
            "INSERT INTO users (rowid, token, doc, prompt_count)
             SELECT ?1, ?2, replace(doc, '\"a\"', '\"' || ?2 || '\"'), 0 FROM users WHERE token = 'a'",
            (rowid, token),
        )
        .unwrap();
}

#[tokio::test]
async fn rowids_far_apart_load_without_reserving_their_span() {
    // The load once sized its buffers by max(rowid) - min(rowid): 2^62 panicked with a
    // capacity overflow, 2^40 aborted the process on a failed allocation.
    for rowid in [1 << 40, 1 << 62] {
        let (_dir, _path, store) = file_with_rowid(rowid).await;
        let users = store.load_all().await.expect("two valid rows load");
        assert_eq!(users.len(), 2, "rowid {rowid}");
    }
}

#[tokio::test]
async fn the_extreme_rowids_load_on_several_threads() {
    // The span of i64::MIN..=i64::MAX overflowed the range arithmetic.
    let (_dir, path, _store) = file_with_rowid(i64::MIN).await;
    insert_copy_of_a(&path, i64::MAX, "c");
    for rows_per_thread in [1, usize::MAX] {
        let (users, _) = load_with(&path, "me", rows_per_thread).expect("three valid rows");
        let mut tokens: Vec<_> = users.into_iter().map(|u| u.token).collect();
        tokens.sort();
        assert_eq!(tokens, ["a", "b", "c"], "{rows_per_thread} rows per thread");
    }
}

#[tokio::test]
async fn a_bad_row_found_by_a_decoding_thread_names_it() {
    let (_dir, path, _store) = file_with_rowid(7).await;
    raw(&path)
        .execute("UPDATE users SET doc = '{' WHERE token = 'b'", [])
        .unwrap();
    let e = load_with(&path, "me", 1).unwrap_err().to_string();
    assert!(
        e.contains("row 7") && e.contains("doc is not a valid user"),
        "{e}"
    );
}

#[test]
fn a_new_database_and_its_directory_are_private_to_their_owner() {
    // The file holds every user's bearer token in clear text.
    let (dir, _) = temp();
    let path = dir.path().join("new").join("dir").join("tollgate.db");
    SqliteStore::open(&path).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(path.parent().unwrap().parent().unwrap()), 0o700);
    // While a connection is open (the last one to close removes them).
    let conn = raw(&path);
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    for file in ["db-wal", "db-shm"] {
        let mode = mode(&path.with_extension(file));
        assert_eq!(
            mode & 0o077,
            0,
            "{file} follows the database's mode: {mode:o}"
        );
    }
    drop(conn);
}

#[tokio::test]
async fn a_file_moved_away_while_running_is_not_recreated_and_nothing_is_lost() {
    let (dir, path) = temp();
    let (store, engine, cache) = with_user_a(&path).await;
    let aside = dir.path().join("aside.db");
    std::fs::rename(&path, &aside).unwrap();
    create(&cache, "b");
    let e = engine.flush().await.unwrap_err().to_string();
    assert!(e.contains("moved, deleted or replaced"), "{e}");
    assert!(!path.exists(), "no empty file in its place");
    // Put back, the queued change is written to it.
    std::fs::rename(&aside, &path).unwrap();
    engine.flush().await.unwrap();
    assert_eq!(stored_tokens(&store).await, ["a", "b"]);
}

#[tokio::test]
async fn changes_another_process_writes_are_read_back_and_not_written_over() {
    // Two instances on one file, as the old and the new process during a graceful upgrade.
    let (_dir, path) = temp();
    let (old, old_engine, old_cache) = with_user_a(&path).await;
    let new = Arc::new(SqliteStore::open(&path).unwrap());
    let (new_engine, new_cache) = engine(&new);
    new_cache.load(new.load_all().await.unwrap());
    old_cache.load(old.load_all().await.unwrap());
    new_engine.read_back().await;
    assert_eq!(new_cache.len(), 1, "nothing new to read");

    // The old process disables "a" and creates "b" after the new one loaded.
    old_cache.disable("a", Some("abuse"), 10).unwrap();
    create(&old_cache, "b");
    let a = old_cache.get("a").unwrap();
    old_cache.count_request(&a, 20);
    old_engine.flush().await.unwrap();
    // Meanwhile the new process counted a request of "a" (not written yet).
    let a = new_cache.get("a").unwrap();
    new_cache.count_request(&a, 30);

    new_engine.read_back().await;
    let a = new_cache.user("a").unwrap();
    assert_eq!(
        a.disabled_reason.as_deref(),
        Some("abuse"),
        "the old process's edit"
    );
    assert_eq!(a.prompt_count, 2, "its count and this one's");
    assert!(
        new_cache.user("b").is_some(),
        "the user the old process created"
    );

    // The new process edits "a": its write keeps the old process's disable.
    new_cache.upsert(
        "a",
        &serde_json::from_value(json!({"nickname": "x"})).unwrap(),
        40,
    );
    new_engine.flush().await.unwrap();
    let stored: Vec<User> = new.load_all().await.unwrap();
    let a = stored.iter().find(|u| u.token == "a").unwrap();
    assert_eq!(a.disabled_reason.as_deref(), Some("abuse"));
    assert_eq!(a.nickname.as_deref(), Some("x"));
    assert_eq!(a.prompt_count, 2);
}
/// When [`Hooked`] runs its hook around the next write.
#[derive(Clone, Copy, PartialEq)]
enum HookAt {
    /// Just before the write: an edit by another client committed after the engine's
    /// read-back, before its flush.
    BeforeWrite,
    /// While the write is in flight (after the rows are written, before the engine hears
    /// back): an admin's edit arriving meanwhile.
    DuringWrite,
}

/// A SQLite store that runs `hook` once, around its next write.
struct Hooked {
    inner: Arc<SqliteStore>,
    at: HookAt,
    hook: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Hooked {
    fn new(inner: Arc<SqliteStore>, at: HookAt, hook: impl FnOnce() + Send + 'static) -> Self {
        Self {
            inner,
            at,
            hook: parking_lot::Mutex::new(Some(Box::new(hook))),
        }
    }

    fn run_hook(&self, at: HookAt) {
        if self.at == at {
            if let Some(hook) = self.hook.lock().take() {
                hook();
            }
        }
    }
}

#[async_trait::async_trait]
impl StoreBackend for Hooked {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        self.inner.load_all().await
    }
    async fn apply(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        self.run_hook(HookAt::BeforeWrite);
        let report = self.inner.apply(batch).await;
        self.run_hook(HookAt::DuringWrite);
        report
    }
    async fn restore(&self, cache: &UserCache, refused: &[&Change]) -> Result<(), StoreError> {
        self.inner.restore(cache, refused).await
    }
    async fn reload_if_changed(&self) -> Result<Option<Vec<User>>, StoreError> {
        self.inner.reload_if_changed().await
    }
}

/// An admin creates a user with a promptCount SQLite cannot store (refused), and corrects it
/// (a PUT with a new nickname and promptCount) while that write is in flight: the correction,
/// confirmed to the admin, is kept and written whole, not removed with the refused creation.
#[tokio::test]
async fn an_edit_queued_behind_a_refused_creation_is_kept_and_written() {
    let (_dir, path) = temp();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let cache = Arc::new(UserCache::default());
    let status = StoreStatus::new("sqlite", Arc::clone(&cache));
    let edit_cache = Arc::clone(&cache);
    let backend = Arc::new(Hooked::new(
        Arc::clone(&store),
        HookAt::DuringWrite,
        move || {
            let fix: UserPatch =
                serde_json::from_value(json!({"nickname": "fixed", "promptCount": 5})).unwrap();
            let (user, _ticket) = edit_cache.upsert("big", &fix, 3);
            assert_eq!(
                user.prompt_count, 5,
                "the admin is answered with the fixed user"
            );
        },
    ));
    let engine = SyncEngine::new(
        backend,
        Arc::clone(&status),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let mut big = User::new("big".into(), UserType::Normal, 1);
    big.prompt_count = u64::MAX;
    cache.create(&big).unwrap();
    engine.flush().await.unwrap(); // refused; the correction arrives meanwhile
    engine.flush().await.unwrap(); // writes the correction
    assert_eq!(
        cache.user("big").map(|u| (u.nickname, u.prompt_count)),
        Some((Some("fixed".to_string()), 5)),
        "the correction made during the refused write is kept in the cache"
    );
    assert_eq!(stored_tokens(&store).await, ["big"], "and written");
}

/// A connection of another SQLite client (an operator's `sqlite3` shell) on the file.
fn operator(path: &Path) -> Connection {
    let conn = raw(path);
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

/// A running instance holding "a", loaded and watching the file as after start-up.
async fn watching_user_a(path: &Path) -> (Arc<SqliteStore>, SyncEngine, Arc<UserCache>) {
    let (store, engine, cache) = with_user_a(path).await;
    store.load_all().await.unwrap();
    engine.read_back().await;
    (store, engine, cache)
}

#[tokio::test]
async fn edits_made_with_another_sqlite_client_are_read_back() {
    let (_dir, path) = temp();
    let (_store, engine, cache) = watching_user_a(&path).await;
    let ops = operator(&path);
    ops.execute(
        "UPDATE users SET doc = json_set(doc, '$.adminNote', 'ops', '$.disabledAt', 5,
             '$.disabledReason', 'by hand'), prompt_count = 40 WHERE token = 'a'",
        [],
    )
    .unwrap();
    ops.execute(
        "INSERT INTO users (token, doc, prompt_count) VALUES ('b', ?1, 3)",
        [r#"{"token":"b","type":"special","createdAt":1}"#],
    )
    .unwrap();
    engine.read_back().await;
    let a = cache.user("a").unwrap();
    assert_eq!(a.admin_note.as_deref(), Some("ops"));
    assert_eq!(a.disabled_reason.as_deref(), Some("by hand"));
    assert_eq!(a.prompt_count, 40);
    let b = cache.user("b").expect("the user inserted by hand");
    assert_eq!((b.user_type, b.prompt_count), (UserType::Special, 3));

    ops.execute("DELETE FROM users WHERE token = 'a'", [])
        .unwrap();
    engine.read_back().await;
    assert!(cache.user("a").is_none(), "the user deleted by hand");
    assert!(cache.user("b").is_some());
}

#[tokio::test]
async fn nothing_is_read_again_while_nobody_else_writes() {
    let (_dir, path) = temp();
    let (store, engine, cache) = watching_user_a(&path).await;
    // This process's own writes do not count as another's.
    create(&cache, "b");
    engine.flush().await.unwrap();
    assert!(store.reload_if_changed().await.unwrap().is_none());
    operator(&path)
        .execute("UPDATE users SET prompt_count = 9 WHERE token = 'a'", [])
        .unwrap();
    assert!(store.reload_if_changed().await.unwrap().is_some());
    assert!(store.reload_if_changed().await.unwrap().is_none(), "once");
}

/// The instance holding `cache` again, its next write preceded by `sql` on another connection
/// (a new store: a new writer, whose batches are numbered from 1 again).
async fn engine_edited_before_write(
    cache: &Arc<UserCache>,
    path: &Path,
    sql: &'static str,
) -> SyncEngine {
    let store = Arc::new(SqliteStore::open(path).unwrap());
    store.load_all().await.unwrap();
    let path = path.to_path_buf();
    let backend = Arc::new(Hooked::new(store, HookAt::BeforeWrite, move || {
        operator(&path).execute_batch(sql).unwrap();
    }));
    let status = StoreStatus::new("sqlite", Arc::clone(cache));
    SyncEngine::new(
        backend,
        status,
        Duration::from_secs(3600),
        Duration::from_secs(1),
    )
}

#[tokio::test]
async fn a_flush_does_not_write_over_an_edit_it_has_not_read_back_yet() {
    let (_dir, path) = temp();
    let (store, _engine, cache) = watching_user_a(&path).await;
    let engine = engine_edited_before_write(
        &cache,
        &path,
        "UPDATE users SET doc = json_set(doc, '$.disabledAt', 5, '$.disabledReason', 'by hand',
             '$.ip', json_array('9.9.9.9')) WHERE token = 'a'",
    )
    .await;
    engine.read_back().await;
    edit_user_a_here(&cache);
    engine.flush().await.unwrap();
    let stored = store.load_all().await.unwrap();
    let a = &stored[0];
    assert_eq!(a.disabled_reason.as_deref(), Some("by hand"), "{a:?}");
    assert_eq!(a.admin_note.as_deref(), Some("checked"));
    assert_eq!(a.ip.len(), 2, "both addresses: {:?}", a.ip);
    // And the edit reaches the cache.
    engine.read_back().await;
    assert_eq!(
        cache.user("a").unwrap().disabled_reason.as_deref(),
        Some("by hand")
    );
}

/// This process's changes to user "a" meanwhile: a request from a new address, and an
/// admin's note.
fn edit_user_a_here(cache: &UserCache) {
    let a = cache.get("a").unwrap();
    cache.admit_ip(&a, "1.2.3.4".parse().unwrap(), 0, 0);
    cache.upsert(
        "a",
        &serde_json::from_value(json!({"adminNote": "checked"})).unwrap(),
        5,
    );
}

#[tokio::test]
async fn a_flush_does_not_bring_back_a_user_deleted_by_hand() {
    let (_dir, path) = temp();
    let (store, _engine, cache) = watching_user_a(&path).await;
    let engine =
        engine_edited_before_write(&cache, &path, "DELETE FROM users WHERE token = 'a'").await;
    engine.read_back().await;
    edit_user_a_here(&cache);
    engine.flush().await.unwrap();
    assert!(stored_tokens(&store).await.is_empty());
    engine.read_back().await;
    assert!(cache.user("a").is_none());
}

/// Moves the file away for one failed check and back, then runs `edit` on it before the
/// writer connects again (at the next check): the new connection starts counting after it.
async fn away_and_back(store: &SqliteStore, path: &Path, aside: &Path, edit: Option<&str>) {
    std::fs::rename(path, aside).unwrap();
    assert!(store.reload_if_changed().await.is_err());
    std::fs::rename(aside, path).unwrap();
    if let Some(sql) = edit {
        operator(path).execute(sql, []).unwrap();
    }
}

/// Start-up's read of every user is the baseline of the process's first writer connection:
/// no second full read right after start (for a million users, about 8 s of CPU and 1 GB of
/// memory), while edits after it are seen.
#[tokio::test]
async fn the_first_writer_connection_takes_the_start_up_read_as_its_baseline() {
    let (_dir, path) = temp();
    drop(with_user_a(&path).await);
    let store = SqliteStore::open(&path).unwrap();
    store.load_all().await.unwrap();
    assert!(store.reload_if_changed().await.unwrap().is_none());
    operator(&path)
        .execute("UPDATE users SET prompt_count = 3 WHERE token = 'a'", [])
        .unwrap();
    let users = store
        .reload_if_changed()
        .await
        .unwrap()
        .expect("read again");
    assert_eq!(users[0].prompt_count, 3);
}

#[tokio::test]
async fn a_new_writer_connection_still_notices_edits_made_before_it_and_only_those() {
    let (dir, path) = temp();
    let (store, _engine, _cache) = watching_user_a(&path).await;
    let aside = dir.path().join("aside.db");
    away_and_back(&store, &path, &aside, None).await;
    assert!(
        store.reload_if_changed().await.unwrap().is_none(),
        "nobody wrote it: the old connection says so"
    );
    let edit = "UPDATE users SET prompt_count = 5 WHERE token = 'a'";
    away_and_back(&store, &path, &aside, Some(edit)).await;
    let users = store
        .reload_if_changed()
        .await
        .unwrap()
        .expect("read again");
    assert_eq!(users[0].prompt_count, 5);
}
