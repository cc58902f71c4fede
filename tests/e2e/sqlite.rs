//! The SQLite store on the real binary: users and counters survive restarts, admin writes are
//! durable when they answer, `kill -9` under traffic loses at most one flush interval and
//! leaves a file that opens clean, SIGTERM loses nothing, damaged or unusable files stop
//! start-up with one clear line, a full disk during flushes is retried without loss, an older
//! schema is migrated, and users move between stores by export and import.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};

use crate::support::tollgate::{binary, Tollgate, ADMIN_KEY};
use crate::support::{client, wait_until, Origin, TollgateBuilder};

mod soak;

/// The database file relative to tollgate's working directory.
const DB: &str = "data/tollgate.db";

fn sqlite(origin: &Origin, flush_interval_seconds: u64) -> TollgateBuilder {
    TollgateBuilder::new(origin.addr).yaml(&format!(
        "store:\n  kind: sqlite\n  flush_interval_seconds: {flush_interval_seconds}\n  sqlite:\n    path: {DB}\n"
    ))
}

fn db_path(tg: &Tollgate) -> PathBuf {
    tg.dir.path().join(DB)
}

/// A read-only connection from the test, beside a running tollgate (WAL allows it).
fn reader(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

fn stored_prompt_count(path: &Path, token: &str) -> Option<u64> {
    reader(path)
        .query_row(
            "SELECT prompt_count FROM users WHERE token = ?1",
            [token],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(|n| u64::try_from(n).unwrap())
}

fn stored_users(path: &Path) -> i64 {
    reader(path)
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap()
}

fn integrity(path: &Path) -> String {
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn proxied(tg: &Tollgate, token: &str) -> u16 {
    client()
        .get(tg.url("/v1/models"))
        .bearer_auth(token)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn export(tg: &Tollgate) -> Value {
    let mut body: Value = tg
        .admin_request(Method::GET, "/admin/users")
        .send()
        .unwrap()
        .json()
        .unwrap();
    body["users"]
        .as_array_mut()
        .unwrap()
        .sort_by(|a, b| a["token"].as_str().cmp(&b["token"].as_str()));
    body
}

fn import(tg: &Tollgate, body: &Value) -> (u16, Option<String>) {
    let resp = tg
        .admin_request(Method::PUT, "/admin/users")
        .json(body)
        .send()
        .unwrap();
    let persisted = resp
        .headers()
        .get("x-tollgate-persisted")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), persisted)
}

/// A new process started with `-u` beside `old`, once it has loaded the file's one user (it
/// takes over the listeners when `old` gets SIGQUIT).
fn upgrade_once_loaded(old: &Tollgate) -> Tollgate {
    let new = old.spawn_upgrade();
    assert!(
        wait_until(Duration::from_secs(20), || old
            .log()
            .contains("loaded 1 users from the sqlite store")),
        "{}",
        old.log()
    );
    new
}

/// Client threads sending requests as one user, each answer timestamped.
struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(tg: &Tollgate, token: &str, threads: usize, origin_delay_ms: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
                let (url, token) = (tg.url("/v1/chat"), token.to_string());
                std::thread::spawn(move || {
                    let http = client();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                        let sent = http
                            .get(&url)
                            .bearer_auth(&token)
                            .header("x-origin-delay-ms", origin_delay_ms.to_string())
                            .send();
                        match sent {
                            Ok(r) if r.status() == 200 => {
                                // The body is read: the request was answered in full.
                                if r.bytes().is_ok() {
                                    answered.lock().unwrap().push(Instant::now());
                                }
                            }
                            Ok(r) => panic!("unexpected status {}", r.status()),
                            // tollgate is gone (killed or stopped): this client is done.
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            answered,
            threads,
        }
    }

    fn answered(&self) -> usize {
        self.answered.lock().unwrap().len()
    }

    /// Stops the clients; every answer's time.
    fn finish(self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().expect("client thread");
        }
        Arc::try_unwrap(self.answered)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

#[test]
fn restart_keeps_users_and_counters() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .env("GATEKEEPER_STORE", "sqlite")
        .start();
    let first = tg.create_user(json!({"type": "special"}));
    let second = tg.create_user(json!({}));
    let resp = tg
        .admin_request(Method::PUT, &format!("/admin/users/{second}"))
        .json(&json!({"maxIps": 3, "tokenLimits": {"gpt4": 100}, "adminNote": "kept"}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    for _ in 0..7 {
        assert_eq!(proxied(&tg, &first), 200);
    }
    for _ in 0..3 {
        assert_eq!(proxied(&tg, &second), 200);
    }
    let before = export(&tg);
    assert_eq!(before["users"].as_array().unwrap().len(), 2);
    assert!(
        db_path(&tg).exists(),
        "the default path under the working directory"
    );

    let tg = tg.restart();
    assert!(tg.log().contains("loaded 2 users from the sqlite store"));
    assert_eq!(export(&tg), before, "every user and counter is back");
    assert_eq!(tg.user(&first)["promptCount"], 7);
    assert_eq!(tg.user(&second)["promptCount"], 3);
    assert_eq!(tg.user(&second)["adminNote"], "kept");
    assert_eq!(proxied(&tg, &first), 200, "and the tokens still work");
    let tg = tg.restart();
    assert_eq!(tg.user(&first)["promptCount"], 8);
}

#[test]
fn admin_writes_are_durable_when_they_answer() {
    let origin = Origin::start();
    // An hour between flushes: only the forced flush can have written these.
    let mut tg = sqlite(&origin, 3600).start();
    let token = tg.create_user(json!({}));
    let resp = tg
        .admin_request(Method::PUT, &format!("/admin/users/{token}"))
        .json(&json!({"nickname": "after", "promptCount": 41}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-persisted"], "true");
    let bulk: Vec<Value> = (0..50)
        .map(|i| json!({"token": format!("bulk-{i:02}"), "nickname": format!("n{i}")}))
        .collect();
    assert_eq!(
        import(&tg, &json!({ "users": bulk })),
        (200, Some("true".to_string()))
    );

    tg.kill();
    let tg = tg.restart();
    let user = tg.user(&token);
    assert_eq!(
        (user["nickname"].as_str(), user["promptCount"].as_u64()),
        (Some("after"), Some(41))
    );
    assert_eq!(tg.user("bulk-49")["nickname"], "n49");
    assert_eq!(export(&tg)["users"].as_array().unwrap().len(), 51);
}

/// What the API accepts, the store can write: a count or time beyond 2^53 - 1 (SQLite keeps
/// up to 2^63 - 1, JavaScript 2^53 exactly) is refused with a 400 naming the field, where it
/// used to be answered "persisted" and then dropped by the store, taking later edits of the
/// user with it.
#[test]
fn values_the_store_cannot_keep_are_refused_and_the_largest_kept_one_persists() {
    let origin = Origin::start();
    let mut tg = sqlite(&origin, 3600).start();
    let token = tg.create_user(json!({}));
    for (field, value) in [
        ("promptCount", json!(9_223_372_036_854_775_808u64)),
        ("lastUsedAt", json!(9_007_199_254_740_992u64)),
        ("expiresAt", json!(u64::MAX)),
        ("adminNote", json!("x".repeat((1 << 20) + 1))),
    ] {
        let resp = tg
            .admin_request(Method::PUT, &format!("/admin/users/{token}"))
            .json(&json!({ field: value }))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 400, "{field}");
        assert_eq!(resp.json::<Value>().unwrap()["error"]["field"], field);
    }
    let resp = tg
        .admin_request(Method::PUT, &format!("/admin/users/{token}"))
        .json(&json!({"promptCount": 9_007_199_254_740_991u64}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-persisted"], "true");
    assert_eq!(
        stored_prompt_count(&db_path(&tg), &token),
        Some(9_007_199_254_740_991)
    );
    tg.kill();
    let tg = tg.restart();
    assert_eq!(tg.user(&token)["promptCount"], 9_007_199_254_740_991u64);
}

#[test]
fn kill_9_under_traffic_loses_at_most_one_flush_interval_and_the_file_opens_clean() {
    const INTERVAL: Duration = Duration::from_secs(1);
    let origin = Origin::start();
    let mut tg = sqlite(&origin, INTERVAL.as_secs()).start();
    let token = tg.create_user(json!({"type": "special"}));
    let db = db_path(&tg);
    let mut base = 0u64;
    for round in 0..3u64 {
        let traffic = Traffic::start(&tg, &token, 4, 0);
        // Traffic across several flushes: the committed count moved four times.
        let mut seen = vec![stored_prompt_count(&db, &token).unwrap()];
        assert!(
            wait_until(Duration::from_secs(30), || {
                let now = stored_prompt_count(&db, &token).unwrap();
                if now != *seen.last().unwrap() {
                    seen.push(now);
                }
                seen.len() >= 5
            }),
            "flushes under traffic: {seen:?}\n{}",
            tg.log()
        );
        // Then kill at some moment within a flush interval.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        let offset = (nanos / 1_000_000 + round * 337) % 1000;
        std::thread::sleep(Duration::from_millis(offset));
        let committed_before_kill = stored_prompt_count(&db, &token).unwrap();
        tg.kill();
        let killed_at = Instant::now();
        let answers = traffic.finish();
        let answered = answers.len() as u64;

        // The crashed file as it is, copied aside: it opens clean.
        let copy = tempfile::tempdir().unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", db.display()));
            if from.exists() {
                std::fs::copy(&from, copy.path().join(format!("copy.db{suffix}"))).unwrap();
            }
        }
        assert_eq!(integrity(&copy.path().join("copy.db")), "ok");

        tg = tg.restart();
        assert_eq!(integrity(&db), "ok", "and beside the restarted tollgate");
        let count = tg.user(&token)["promptCount"].as_u64().unwrap();
        // The last completed flush took its snapshot at most one interval plus one flush
        // before the kill; allow one more interval for the flush itself on a busy machine.
        let window_start = killed_at - 2 * INTERVAL;
        let recent = answers.iter().filter(|&&t| t >= window_start).count() as u64;
        let report = format!(
            "round {round}: base {base}, answered {answered} ({recent} in the last two \
             intervals), committed before the kill {committed_before_kill}, after restart {count}"
        );
        assert!(count <= base + answered, "counted twice? {report}");
        assert!(
            count >= committed_before_kill,
            "a commit was lost: {report}"
        );
        assert!(
            count + recent >= base + answered,
            "lost more than a flush interval: {report}"
        );
        assert!(answered > 0 && count > base, "{report}");
        base = count;
    }
}

#[test]
fn sigterm_under_traffic_loses_nothing() {
    let origin = Origin::start();
    // Flushes every 20 s: what is written, SIGTERM wrote. Slow answers keep requests in
    // flight when the signal arrives; they finish during the grace period and count too.
    let mut tg = sqlite(&origin, 20).start();
    let token = tg.create_user(json!({"type": "special"}));
    let traffic = Traffic::start(&tg, &token, 4, 30);
    assert!(wait_until(Duration::from_secs(20), || traffic.answered() >= 100));
    tg.signal(libc::SIGTERM);
    let status = tg
        .wait_exit(Duration::from_secs(20))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", tg.log());
    let answered = traffic.finish().len() as u64;
    let db = db_path(&tg);
    assert_eq!(stored_prompt_count(&db, &token), Some(answered));
    let tg = tg.restart();
    assert_eq!(
        tg.user(&token)["promptCount"].as_u64(),
        Some(answered),
        "{}",
        tg.log()
    );
}

/// Changes the store does not take before the shutdown deadline are lost: the stop is then
/// reported as failed (exit status 1 and a line saying so), not as a clean one, and within the
/// documented bound (grace period, Pingora's runtime timeout, then the last write's deadline):
/// the last write's blocked statement used to hold the exit for its 5 s busy timeout.
#[test]
fn a_stop_that_cannot_write_its_changes_exits_non_zero() {
    let origin = Origin::start();
    let mut tg = sqlite(&origin, 3600).start();
    let token = tg.create_user(json!({"type": "special"}));
    for _ in 0..5 {
        assert_eq!(proxied(&tg, &token), 200);
    }
    // Another program holds the write lock through the whole shutdown.
    let lock = Connection::open(db_path(&tg)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    tg.signal(libc::SIGTERM);
    // grace_period_seconds 1 + graceful_shutdown_timeout_seconds 2 + the last write's 1 s,
    // and 3 s to spare for a loaded machine.
    let status = tg
        .wait_exit(Duration::from_secs(7))
        .unwrap_or_else(|| panic!("no exit within the shutdown bound:\n{}", tg.log()));
    drop(lock);
    let log = tg.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("could not be written before shutdown"),
        "{log}"
    );
    assert!(log.contains("tollgate: store sqlite: "), "{log}");
    assert_eq!(stored_prompt_count(&db_path(&tg), &token), Some(0));
}

#[test]
fn sigint_writes_pending_changes_too() {
    let origin = Origin::start();
    // Pingora's SIGINT is a fast shutdown (no grace period); tollgate still writes what it
    // counted once the services have stopped.
    let mut tg = sqlite(&origin, 3600).start();
    let token = tg.create_user(json!({"type": "special"}));
    for _ in 0..20 {
        assert_eq!(proxied(&tg, &token), 200);
    }
    tg.signal(libc::SIGINT);
    tg.wait_exit(Duration::from_secs(20))
        .expect("exits after SIGINT");
    assert_eq!(
        stored_prompt_count(&db_path(&tg), &token),
        Some(20),
        "{}",
        tg.log()
    );
}

#[test]
fn a_graceful_upgrade_keeps_the_counts_of_both_processes() {
    let origin = Origin::start();
    // Long flush interval: the old process writes its requests only as it exits, after the
    // new one has loaded the users.
    let mut old = sqlite(&origin, 60).start();
    let token = old.create_user(json!({"type": "special"}));
    for _ in 0..5 {
        assert_eq!(proxied(&old, &token), 200);
    }
    let mut new = upgrade_once_loaded(&old);
    for _ in 0..3 {
        assert_eq!(proxied(&old, &token), 200);
    }
    old.signal(libc::SIGQUIT);
    new.wait_until_serving();
    assert!(old.wait_exit(Duration::from_secs(20)).is_some());
    for _ in 0..4 {
        assert_eq!(proxied(&new, &token), 200);
    }
    new.stop();
    assert_eq!(stored_prompt_count(&db_path(&new), &token), Some(12));
    let new = new.restart();
    assert_eq!(new.user(&token)["promptCount"], 12);
}

#[test]
fn admin_changes_the_old_process_made_during_an_upgrade_reach_the_new_one() {
    let origin = Origin::start();
    let mut old = sqlite(&origin, 60).start();
    let known = old.create_user(json!({}));
    assert_eq!(proxied(&old, &known), 200);
    let mut new = upgrade_once_loaded(&old);
    // After the new process loaded the file: the old one disables a user and creates one.
    let disabled = old
        .admin_request(
            Method::DELETE,
            &format!("/admin/users/{known}?disabledReason=leaked"),
        )
        .send()
        .unwrap();
    assert_eq!(disabled.status(), 200);
    let created = old.create_user(json!({"type": "special"}));
    old.signal(libc::SIGQUIT);
    new.wait_until_serving();
    assert!(old.wait_exit(Duration::from_secs(20)).is_some());
    // The new process reads back what the old one wrote.
    assert!(
        wait_until(Duration::from_secs(10), || proxied(&new, &created) == 200),
        "the user created in the old process: {}",
        new.log()
    );
    assert_eq!(proxied(&new, &known), 403, "disabled in the old process");
    // An edit in the new process keeps the old process's disable in the file.
    let edited = new
        .admin_request(Method::PUT, &format!("/admin/users/{known}"))
        .json(&json!({"adminNote": "checked"}))
        .send()
        .unwrap();
    assert_eq!(edited.status(), 200);
    let new = new.restart();
    let user = new.user(&known);
    assert_eq!(user["disabledReason"], "leaked", "{user}");
    assert_eq!(user["adminNote"], "checked", "{user}");
    assert_eq!(new.user(&created)["type"], "special");
}

#[test]
fn a_version_1_database_is_migrated_and_its_users_served() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        // Version 1 as that layout was: the whole user as JSON, counters included.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE users (token TEXT NOT NULL PRIMARY KEY, doc TEXT NOT NULL) STRICT;
             PRAGMA application_id = 1416382324;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        for (token, count) in [("v1-user-a", 17), ("v1-user-b", 0)] {
            let doc = json!({"token": token, "ip": [], "type": "normal", "promptCount": count,
                "tokenCounts": {}, "tokenLimits": {}, "createdAt": 1700000000000u64,
                "lastUsedAt": 1700000005000u64, "nickname": "from v1"});
            conn.execute(
                "INSERT INTO users (token, doc) VALUES (?1, ?2)",
                (token, doc.to_string()),
            )
            .unwrap();
        }
    }
    let tg = sqlite(&origin, 1).dir(dir).start();
    assert!(
        tg.log()
            .contains("migrating the schema from version 1 to 2"),
        "{}",
        tg.log()
    );
    let user = tg.user("v1-user-a");
    assert_eq!(
        (
            user["promptCount"].as_u64(),
            user["lastUsedAt"].as_u64(),
            user["nickname"].as_str()
        ),
        (Some(17), Some(1700000005000), Some("from v1"))
    );
    assert_eq!(proxied(&tg, "v1-user-b"), 200, "served");
    let version: u32 = reader(&db_path(&tg))
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
    let tg = tg.restart();
    assert_eq!(tg.user("v1-user-b")["promptCount"], 1);
    assert_eq!(tg.user("v1-user-a")["promptCount"], 17);
}

// ---------------------------------------------------------------- files that cannot be used

/// Runs tollgate to its exit with `adjust` applied to the command (uid, limits); the output.
fn run_to_exit_with(
    mut builder: TollgateBuilder,
    adjust: impl FnOnce(&mut Command),
) -> (ExitStatus, String) {
    let config = builder.write_config();
    let dir = config.parent().unwrap().to_path_buf();
    let mut cmd = Command::new(binary());
    cmd.arg("-c")
        .arg(&config)
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().expect("spawn tollgate");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tollgate did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    drop(builder);
    (
        status,
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The start-up failure: a non-zero exit, no panic, and one `tollgate:` line naming `file`.
fn refused_line(status: ExitStatus, output: &str, file: &str) -> String {
    assert!(!status.success(), "started anyway:\n{output}");
    assert!(!output.contains("panicked"), "{output}");
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("tollgate: "))
        .collect();
    assert_eq!(lines.len(), 1, "one line for the operator:\n{output}");
    assert!(lines[0].contains(file), "names the file: {}", lines[0]);
    lines[0].to_string()
}

/// A directory the test owns, with a config for `path` and a stopped tollgate's database.
fn prepared_dir(origin: &Origin, with_user: bool) -> tempfile::TempDir {
    let tg = sqlite(origin, 1).start();
    if with_user {
        tg.create_user(json!({}));
    }
    let mut tg = tg;
    tg.stop();
    let dir = Arc::try_unwrap(std::mem::replace(
        &mut tg.dir,
        Arc::new(tempfile::tempdir().unwrap()),
    ))
    .expect("only this handle");
    drop(tg);
    dir
}

/// Root ignores file permissions: run as `nobody` then, with a copy of the binary it can run.
fn unprivileged(dir: &Path) -> impl FnOnce(&mut Command) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let own_binary = dir.join("tollgate-bin");
    if root {
        std::fs::copy(binary(), &own_binary).unwrap();
        chmod(dir, 0o755);
    }
    move |cmd: &mut Command| {
        if root {
            let mut replaced = Command::new(&own_binary);
            replaced.args(cmd.get_args());
            if let Some(d) = cmd.get_current_dir() {
                replaced.current_dir(d);
            }
            replaced.env_clear();
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    replaced.env(k, v);
                }
            }
            replaced
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .uid(65534)
                .gid(65534);
            *cmd = replaced;
        }
    }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_database_from_a_newer_tollgate_is_refused() {
    let origin = Origin::start();
    let dir = prepared_dir(&origin, true);
    let path = dir.path().join(DB);
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let (status, output) = run_to_exit_with(sqlite(&origin, 1).dir(dir), |_| {});
    let line = refused_line(status, &output, DB);
    assert!(
        line.contains("schema version 99, newer than this tollgate supports (2)"),
        "{line}"
    );
}

#[test]
fn a_corrupt_database_is_refused_clearly() {
    let origin = Origin::start();
    // Not a database at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join(DB), b"users,tokens\n".repeat(1000)).unwrap();
    let (status, output) = run_to_exit_with(sqlite(&origin, 1).dir(dir), |_| {});
    let line = refused_line(status, &output, DB);
    assert!(line.contains("not an SQLite database"), "{line}");

    // A real one whose users table is damaged.
    let dir = prepared_dir(&origin, false);
    let tg = sqlite(&origin, 1).dir(dir).start();
    let users: Vec<Value> = (0..400)
        .map(|i| json!({"token": format!("user-{i:03}"), "adminNote": "x".repeat(100)}))
        .collect();
    assert_eq!(import(&tg, &json!({ "users": users })).0, 200);
    let mut tg = tg;
    tg.stop();
    let path = db_path(&tg);
    let (root, page_size): (i64, i64) = {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let root = conn
            .query_row(
                "SELECT rootpage FROM sqlite_schema WHERE name = 'users'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let size = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        (root, size)
    };
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
            .unwrap();
        file.write_all(&vec![0xa5; page_size as usize]).unwrap();
    }
    let dir = Arc::try_unwrap(std::mem::replace(
        &mut tg.dir,
        Arc::new(tempfile::tempdir().unwrap()),
    ))
    .unwrap();
    drop(tg);
    let (status, output) = run_to_exit_with(sqlite(&origin, 1).dir(dir), |_| {});
    let line = refused_line(status, &output, DB);
    assert!(line.contains("corrupt"), "{line}");
}

#[test]
fn a_read_only_database_file_is_refused_clearly() {
    let origin = Origin::start();
    let dir = prepared_dir(&origin, true);
    assert!(
        !dir.path().join(format!("{DB}-wal")).exists(),
        "a clean stop closes the database"
    );
    chmod(&dir.path().join("data"), 0o777);
    chmod(&dir.path().join(DB), 0o444);
    let adjust = unprivileged(dir.path());
    let (status, output) = run_to_exit_with(sqlite(&origin, 1).dir(dir), adjust);
    let line = refused_line(status, &output, DB);
    assert!(line.contains("read-only"), "{line}");
}

#[test]
fn an_unwritable_directory_is_refused_clearly() {
    let origin = Origin::start();
    for path in ["locked/data/tollgate.db", "locked/tollgate.db"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("locked")).unwrap();
        chmod(&dir.path().join("locked"), 0o555);
        let adjust = unprivileged(dir.path());
        let builder = TollgateBuilder::new(origin.addr)
            .yaml(&format!(
                "store:\n  kind: sqlite\n  sqlite:\n    path: {path}\n"
            ))
            .dir(dir);
        let (status, output) = run_to_exit_with(builder, adjust);
        let line = refused_line(status, &output, path);
        assert!(
            line.contains("Permission denied") || line.contains("cannot open"),
            "{line}"
        );
    }
}

fn set_file_size_limit(pid: i32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child with a valid struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_full_disk_during_flushes_is_retried_and_loses_nothing() {
    let origin = Origin::start();
    let tg = sqlite(&origin, 1)
        .admin_yaml("persist_timeout_ms: 1500")
        .start();
    let token = tg.create_user(json!({}));
    let db = db_path(&tg);
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    // No file of this process may grow past what it has now (plus a little for the log):
    // the import's write fails as on a full disk.
    let biggest = [&db, &wal, &tg.log_path]
        .into_iter()
        .map(|p| file_len(p))
        .max()
        .unwrap();
    set_file_size_limit(tg.pid(), Some(biggest + 16 * 1024));
    let users: Vec<Value> = (0..2000)
        .map(|i| json!({"token": format!("full-{i:04}"), "adminNote": "x".repeat(300)}))
        .collect();
    assert_eq!(
        import(&tg, &json!({ "users": users })),
        (202, Some("false".to_string())),
        "accepted, not yet durable"
    );
    assert!(
        wait_until(Duration::from_secs(10), || tg
            .log()
            .contains("sqlite store write failed")),
        "{}",
        tg.log()
    );
    let log = tg.log();
    let warning = log
        .lines()
        .find(|l| l.contains("sqlite store write failed"))
        .unwrap();
    assert!(
        warning.contains(DB) && warning.contains("File too large"),
        "{warning}"
    );
    assert!(!log.contains("panicked"), "{log}");
    // The proxy keeps serving, old and new users alike.
    assert_eq!(proxied(&tg, &token), 200);
    assert_eq!(proxied(&tg, "full-1999"), 200);
    assert_eq!(stored_users(&db), 1, "nothing half-written");

    set_file_size_limit(tg.pid(), None);
    assert!(
        wait_until(Duration::from_secs(30), || stored_users(&db) == 2001),
        "the retry writes everything once the disk has room:\n{}",
        tg.log()
    );
    assert!(wait_until(Duration::from_secs(10), || tg
        .log()
        .contains("sqlite store writes recovered")));
    let tg = tg.restart();
    assert_eq!(export(&tg)["users"].as_array().unwrap().len(), 2001);
    assert_eq!(tg.user("full-1999")["promptCount"], 1);
}

#[test]
fn a_full_disk_at_start_up_is_refused_clearly() {
    let origin = Origin::start();
    let builder = sqlite(&origin, 1);
    let (status, output) = run_to_exit_with(builder, |cmd| {
        // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    let line = refused_line(status, &output, DB);
    assert!(line.contains("File too large"), "{line}");
}

// ---------------------------------------------------------------- moving users between stores

#[test]
fn users_move_from_the_memory_store_and_the_older_proxy_into_sqlite() {
    let origin = Origin::start();
    let memory = TollgateBuilder::new(origin.addr).start();
    let a = memory.create_user(json!({"type": "special"}));
    let b = memory.create_user(json!({"tokenLimits": {"gpt4": 5}}));
    for _ in 0..4 {
        assert_eq!(proxied(&memory, &a), 200);
    }
    assert_eq!(proxied(&memory, &b), 200);
    let exported = export(&memory);
    drop(memory);

    let tg = sqlite(&origin, 1).start();
    assert_eq!(import(&tg, &exported), (200, Some("true".to_string())));
    assert_eq!(export(&tg), exported, "an export imports unchanged");
    // The older proxy's export: same shape, its own fields.
    let older = json!({"users": [{
        "token": "older-proxy-user", "ip": ["1.2.3.4"], "type": "temporary",
        "promptCount": 12, "tokenCount": 0, "tokenCounts": {"turbo": 1200, "gpt4": 0.5},
        "tokenLimits": {"gpt4": 100000}, "tokenRefresh": {"gpt4": 5},
        "createdAt": 1700000000000u64, "lastUsedAt": 1700000001000u64,
        "expiresAt": 4102444800000u64, "maxIps": 2, "adminNote": "n",
        "meta": {"refreshable": true}
    }]});
    assert_eq!(import(&tg, &older).0, 200);
    let tg = tg.restart();
    let after = export(&tg);
    assert_eq!(after["users"].as_array().unwrap().len(), 3);
    assert_eq!(tg.user(&a)["promptCount"], 4);
    assert_eq!(tg.user("older-proxy-user"), older["users"][0]);
}

/// A read-write connection of another SQLite client (an operator's `sqlite3` shell).
fn operator(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

#[test]
fn edits_made_with_another_sqlite_client_are_served_and_not_written_over() {
    let origin = Origin::start();
    let tg = sqlite(&origin, 60).start();
    let edited = tg.create_user(json!({}));
    let deleted = tg.create_user(json!({}));
    for token in [&edited, &deleted] {
        assert_eq!(proxied(&tg, token), 200);
    }
    let ops = operator(&db_path(&tg));
    let update = |sql: &str, token: &str| ops.execute(sql, [token]).unwrap();
    update(
        "UPDATE users SET doc = json_set(doc, '$.adminNote', 'by hand') WHERE token = ?1",
        &edited,
    );
    // An admin edit of the same user right away: the write must not put back the old note.
    let resp = tg
        .admin_request(Method::PUT, &format!("/admin/users/{edited}"))
        .json(&json!({"nickname": "api"}))
        .send()
        .unwrap();
    assert_eq!(resp.headers()["x-tollgate-persisted"], "true");
    let seen = |check: &dyn Fn() -> bool, what: &str| {
        assert!(
            wait_until(Duration::from_secs(10), check),
            "{what}: {}",
            tg.log()
        );
    };
    seen(&|| tg.user(&edited)["adminNote"] == "by hand", "a field");
    update(
        "UPDATE users SET doc = json_set(doc, '$.disabledAt', 1, '$.disabledReason', 'ops')
         WHERE token = ?1",
        &edited,
    );
    seen(&|| proxied(&tg, &edited) == 403, "a user disabled by hand");
    update(
        "INSERT INTO users (token, doc, prompt_count) VALUES (?1, json_object('token', ?1,
         'type', 'special', 'createdAt', 1), 0)",
        "inserted-by-hand",
    );
    seen(
        &|| proxied(&tg, "inserted-by-hand") == 200,
        "a user inserted by hand",
    );
    update("DELETE FROM users WHERE token = ?1", &deleted);
    seen(&|| proxied(&tg, &deleted) == 401, "a user deleted by hand");

    let tg = tg.restart();
    let user = tg.user(&edited);
    assert_eq!(
        (
            &user["adminNote"],
            &user["nickname"],
            &user["disabledReason"]
        ),
        (&json!("by hand"), &json!("api"), &json!("ops")),
        "{user}"
    );
    assert_eq!(tg.user("inserted-by-hand")["type"], "special");
    assert_eq!(proxied(&tg, &deleted), 401, "not written back");
}

/// The new process of a graceful upgrade reads the file at start-up, then waits for the
/// hand-over: an edit made by hand in between is served by it, even when the old process has
/// nothing left to write (whose last flush would otherwise make the new one read again).
#[test]
fn a_hand_edit_made_while_an_upgrade_waits_for_the_hand_over_is_served() {
    let origin = Origin::start();
    let mut old = sqlite(&origin, 1).start();
    let token = old.create_user(json!({}));
    let mut new = upgrade_once_loaded(&old);
    operator(&db_path(&old))
        .execute(
            "UPDATE users SET doc = json_set(doc, '$.adminNote', 'by hand') WHERE token = ?1",
            [&token],
        )
        .unwrap();
    old.signal(libc::SIGQUIT);
    new.wait_until_serving();
    assert!(old.wait_exit(Duration::from_secs(20)).is_some());
    assert!(
        wait_until(Duration::from_secs(10), || new.user(&token)["adminNote"]
            == "by hand"),
        "{}",
        new.log()
    );
}
