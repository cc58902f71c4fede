//! A seeded, randomized soak of the SQLite store: one tollgate on one file under proxied
//! traffic, admin edits, disables, creations and deletions, hand edits through another
//! SQLite connection (as an operator's `sqlite3` makes them, sometimes holding the write lock
//! for a while), and lifecycle events: SIGTERM and a restart, graceful upgrades to a new
//! process (`-u`, with SIGQUIT or `--upgrade-from`). Afterwards, once stopped: every user's
//! `prompt_count` in the file must equal the requests answered for it, the last edit of every
//! field must be what the file holds, deleted users must be absent; started again, the admin
//! view must equal the file.
//!
//! The checkable rule for edits: each field of each user has a single writer (the admin API
//! or the hand), chosen at random; the final value must be that writer's last edit.
//!
//! One iteration with a fixed seed runs in the suite. To soak:
//! `TOLLGATE_SOAK_SEED=<n> TOLLGATE_SOAK_ITERATIONS=<k> cargo nextest run --test e2e sqlite::soak`
//! (iteration `i` uses seed `n + i`; the failing seed is in the panic message;
//! `TOLLGATE_SOAK_OPS_SECONDS` sets how long the random operations run, 12 s by default).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::thread::JoinHandle;

use super::*;
use crate::support::soak::{env_u64, field_value, for_each_seed, mismatches, normalized, Rng};

/// The seed the suite runs with.
const DEFAULT_SEED: u64 = 0x5eed_2026;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Writer {
    Admin,
    Hand,
}

/// The fields edited in the soak; `disabledReason` stands for disable/enable (its presence is
/// the user's disabled state; `disabledAt` goes with it). The traffic comes from one address,
/// so any `maxIps` set here (at least 2) never disables a user by itself.
const FIELDS: [&str; 6] = [
    "nickname",
    "type",
    "maxIps",
    "adminNote",
    "tokenLimits",
    "disabledReason",
];

struct Tracked {
    writers: BTreeMap<&'static str, Writer>,
    /// The last value each field's writer set (`Null`: removed), when it set one.
    last: BTreeMap<&'static str, Value>,
}

/// A hand edit waiting for its turn: SQL with its parameters.
type Statement = (String, Vec<String>);

struct Soak {
    seed: u64,
    rng: Rng,
    /// `None` only while a lifecycle event replaces the process.
    tg: Option<Tollgate>,
    path: PathBuf,
    /// The operator's connection.
    hand: Connection,
    users: BTreeMap<String, Tracked>,
    /// Inserted by hand, not read back by tollgate yet: not edited or used until then.
    pending: Vec<String>,
    deleted: BTreeSet<String>,
    /// Tokens the traffic threads use.
    live: Arc<Mutex<Vec<String>>>,
    /// The traffic threads wait while set.
    paused: Arc<AtomicBool>,
    /// A thread holding the write lock (`BEGIN IMMEDIATE`) for a while.
    lock: Option<JoinHandle<()>>,
    step: u64,
    restarts: u32,
    upgrades: u32,
    ops: BTreeMap<&'static str, u32>,
}

impl Soak {
    fn tg(&self) -> &Tollgate {
        self.tg.as_ref().expect("running")
    }

    fn count(&mut self, op: &'static str) {
        *self.ops.entry(op).or_default() += 1;
    }

    fn new_tracked(&mut self) -> Tracked {
        let writers = FIELDS
            .iter()
            .map(|f| {
                let w = if self.rng.chance(35) {
                    Writer::Hand
                } else {
                    Writer::Admin
                };
                (*f, w)
            })
            .collect();
        Tracked {
            writers,
            last: BTreeMap::new(),
        }
    }

    fn track(&mut self, token: String) {
        let tracked = self.new_tracked();
        self.users.insert(token.clone(), tracked);
        self.live.lock().unwrap().push(token);
    }

    fn pick_user(&mut self) -> Option<String> {
        self.rng.pick_key(&self.users)
    }

    /// `maxIps` of at least 2: the traffic comes from one address.
    fn value_for(&mut self, field: &str) -> Value {
        field_value(&mut self.rng, field, self.step, 2)
    }

    /// One edit of one field of a random user by that field's writer.
    fn edit(&mut self) {
        let Some(token) = self.pick_user() else {
            return;
        };
        let field = FIELDS[self.rng.below(FIELDS.len())];
        let value = self.value_for(field);
        let writer = self.users[&token].writers[field];
        match writer {
            Writer::Admin => {
                self.count(if field != "disabledReason" {
                    "admin edit"
                } else if value.is_null() {
                    "admin enable"
                } else {
                    "admin disable"
                });
                let status = admin_edit(self.tg(), &token, field, &value);
                assert!(
                    status == 200 || status == 202,
                    "seed {}: admin {field}={value} on {token}: {status}\n{}",
                    self.seed,
                    self.tg().log()
                );
            }
            // A user created moments ago whose write is still queued (answered 202 while the
            // write lock was held) has no row yet: the hand's UPDATE changes nothing.
            Writer::Hand if !self.in_file(&token) => {
                self.count("hand edit of a row not written yet");
                return;
            }
            Writer::Hand => {
                let statement = hand_edit(&token, field, &value, self.step);
                if self.lock.is_none() && self.rng.chance(15) {
                    self.count("hand edit in a held write lock");
                    self.hold_lock(vec![statement]);
                } else {
                    self.count("hand edit");
                    assert_eq!(run(&self.hand, &statement), 1, "seed {}", self.seed);
                }
            }
        }
        self.users
            .get_mut(&token)
            .unwrap()
            .last
            .insert(field, value);
    }

    /// The file has the user's row (rows are removed only from this thread).
    fn in_file(&self, token: &str) -> bool {
        self.hand
            .query_row(
                "SELECT count(*) FROM users WHERE token = ?1",
                [token],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 1
    }

    fn create(&mut self) {
        match self.rng.below(3) {
            0 => {
                self.count("admin create (POST)");
                let (status, body) = self.tg().admin_call(
                    Method::POST,
                    "/admin/users",
                    Some(json!({"type": "normal"})),
                );
                assert!(
                    status == 200 || status == 202,
                    "seed {}: POST {status}",
                    self.seed
                );
                self.track(body["token"].as_str().unwrap().to_string());
            }
            1 => {
                self.count("admin create (PUT)");
                let token = format!("put-{}-{}", self.seed, self.step);
                let path = format!("/admin/users/{token}");
                let (status, _) = self.tg().admin_call(Method::PUT, &path, Some(json!({})));
                assert!(
                    status == 200 || status == 202,
                    "seed {}: PUT {status}",
                    self.seed
                );
                self.track(token);
            }
            _ => {
                self.count("hand insert");
                let token = format!("hand-{}-{}", self.seed, self.step);
                let statement = (
                    "INSERT INTO users (token, doc, prompt_count) VALUES (?1, \
                     json_object('token', ?1, 'type', 'normal', 'createdAt', 1700000000000), 0)"
                        .to_string(),
                    vec![token.clone()],
                );
                run(&self.hand, &statement);
                self.pending.push(token);
            }
        }
    }

    /// Users inserted by hand join the soak once tollgate serves them.
    fn admit_pending(&mut self) {
        for token in std::mem::take(&mut self.pending) {
            let path = format!("/admin/users/{token}");
            if self.tg().admin_call(Method::GET, &path, None).0 == 200 {
                self.track(token);
            } else {
                self.pending.push(token);
            }
        }
    }

    fn delete(&mut self) {
        if self.users.len() <= 3 {
            return;
        }
        let Some(token) = self.pick_user() else {
            return;
        };
        self.live.lock().unwrap().retain(|t| *t != token);
        // By hand only when the file has the row (a user created here moments ago may not
        // be written yet: deleting nothing by hand deletes nothing).
        let by_hand = self.rng.chance(35)
            && self
                .hand
                .execute("DELETE FROM users WHERE token = ?1", [&token])
                .unwrap()
                == 1;
        if by_hand {
            self.count("hand delete");
        } else {
            self.count("admin delete");
            let path = format!("/admin/users/{token}?hard=true");
            let (status, _) = self.tg().admin_call(Method::DELETE, &path, None);
            assert!(
                status == 200 || status == 202,
                "seed {}: hard delete {status}",
                self.seed
            );
        }
        self.users.remove(&token);
        self.deleted.insert(token);
    }

    /// Another connection takes the write lock, runs `statements` in it, and keeps it for up
    /// to 2.5 s (less than the 5 s tollgate's writes wait for it).
    fn hold_lock(&mut self, statements: Vec<Statement>) {
        self.release_lock();
        let path = self.path.clone();
        let hold = Duration::from_millis(200 + self.rng.below(2300) as u64);
        self.lock = Some(std::thread::spawn(move || {
            let conn = operator(&path);
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            // (A delete from the soak's thread may take the lock first: then the user is
            // gone and its edit does not matter.)
            for statement in &statements {
                run(&conn, statement);
            }
            std::thread::sleep(hold);
            conn.execute_batch("COMMIT").unwrap();
        }));
    }

    fn release_lock(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.join().expect("the lock holder");
        }
    }

    /// SIGTERM (its shutdown flush writes what was counted), then the same configuration
    /// started again.
    fn restart(&mut self) {
        self.count("SIGTERM + restart");
        self.release_lock();
        let mut tg = self.tg.take().unwrap();
        let status = tg.stop();
        assert!(
            status.success(),
            "seed {}: SIGTERM exit {status}\n{}",
            self.seed,
            tg.log()
        );
        self.tg = Some(tg.restart());
    }

    /// A graceful upgrade to a new process. With SIGQUIT from here, the old process takes
    /// admin edits after the new one has loaded the file (the new one must read them back);
    /// with `--upgrade-from`, the new process signals the old one itself once ready.
    fn upgrade(&mut self) {
        self.release_lock();
        let loads = |tg: &Tollgate| tg.log().matches("users from the sqlite store").count();
        let before = loads(self.tg());
        // Sometimes quiet: no traffic, and everything flushed, so that the old process has
        // nothing left to write (its last write would make the new one read the file again).
        let quiet = self.rng.chance(30);
        if quiet {
            self.count("quiet upgrade");
            self.paused.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2500));
        }
        let mut old = self.tg.take().unwrap();
        let mut new = if self.rng.chance(50) {
            self.count("upgrade (--upgrade-from)");
            let new = old.spawn_upgrade_with(&["--upgrade-from", &old.pid().to_string()]);
            // Edits racing the new process's load of the file and the hand-over.
            self.tg = Some(old);
            for _ in 0..self.rng.below(3) {
                self.count("edit during an upgrade");
                self.step += 1;
                self.hand_only_edit();
            }
            old = self.tg.take().unwrap();
            new
        } else {
            self.count("upgrade (SIGQUIT)");
            let new = old.spawn_upgrade();
            assert!(
                wait_until(Duration::from_secs(20), || loads(&old) > before),
                "seed {}: the new process did not load the file\n{}",
                self.seed,
                old.log()
            );
            self.tg = Some(old);
            // Edits while the new process waits for the hand-over: the admin's go to the old
            // process, and both must reach the new one.
            for _ in 0..self.rng.below(5) + usize::from(quiet) {
                self.count("edit during an upgrade");
                self.step += 1;
                if quiet {
                    self.hand_only_edit();
                } else {
                    self.edit();
                }
            }
            old = self.tg.take().unwrap();
            old.signal(libc::SIGQUIT);
            new
        };
        let status = old
            .wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("seed {}: the old process stays\n{}", self.seed, old.log()));
        assert!(
            status.success(),
            "seed {}: old process exit {status}\n{}",
            self.seed,
            old.log()
        );
        new.wait_until_serving();
        self.tg = Some(new);
        self.paused.store(false, Ordering::Relaxed);
    }

    /// An edit by hand of a random field whose writer is the hand, if there is one.
    fn hand_only_edit(&mut self) {
        let candidates: Vec<(String, &'static str)> = self
            .users
            .iter()
            .flat_map(|(t, u)| {
                u.writers
                    .iter()
                    .filter(|(_, w)| **w == Writer::Hand)
                    .map(move |(f, _)| (t.clone(), *f))
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (token, field) = candidates[self.rng.below(candidates.len())].clone();
        let value = self.value_for(field);
        if run(&self.hand, &hand_edit(&token, field, &value, self.step)) == 0 {
            return;
        }
        self.users
            .get_mut(&token)
            .unwrap()
            .last
            .insert(field, value);
    }

    /// Several fields of one user edited at once, each by its own writer: hand edits race
    /// the admin's writes and the flushes.
    fn burst(&mut self) {
        let Some(token) = self.pick_user() else {
            return;
        };
        self.count("burst");
        let mut fields: Vec<&'static str> = FIELDS.to_vec();
        let mut plan = Vec::new();
        for _ in 0..2 + self.rng.below(3) {
            let field = fields.remove(self.rng.below(fields.len()));
            let value = self.value_for(field);
            plan.push((field, value, self.users[&token].writers[field]));
        }
        let (tg, path, step, seed) = (self.tg(), &self.path, self.step, self.seed);
        let in_file = self.in_file(&token);
        plan.retain(|(_, _, writer)| *writer == Writer::Admin || in_file);
        std::thread::scope(|scope| {
            for (field, value, writer) in &plan {
                let token = &token;
                scope.spawn(move || match writer {
                    Writer::Admin => {
                        let status = admin_edit(tg, token, field, value);
                        assert!(
                            status == 200 || status == 202,
                            "seed {seed}: admin {field}={value} on {token}: {status}"
                        );
                    }
                    Writer::Hand => {
                        let conn = operator(path);
                        conn.busy_timeout(Duration::from_secs(20)).unwrap();
                        assert_eq!(run(&conn, &hand_edit(token, field, value, step)), 1);
                    }
                });
            }
        });
        let user = self.users.get_mut(&token).unwrap();
        for (field, value, _) in plan {
            user.last.insert(field, value);
        }
    }

    /// The write lock held for a while with nothing changed, or with several hand edits.
    fn lock_only(&mut self) {
        if self.lock.is_some() {
            return;
        }
        self.count("write lock held");
        self.hold_lock(Vec::new());
    }

    /// What differs from the rules in the stopped file; empty when all holds.
    fn file_mismatches(&self, answered: &HashMap<String, u64>) -> Vec<String> {
        let file = file_users(&self.path);
        let mut out = Vec::new();
        for token in &self.deleted {
            if file.contains_key(token) {
                out.push(format!("deleted {token} is in the file"));
            }
        }
        for (token, user) in &self.users {
            let Some(stored) = file.get(token) else {
                out.push(format!("{token} missing from the file"));
                continue;
            };
            let want = answered.get(token).copied().unwrap_or(0);
            out.extend(mismatches(token, stored, want, &user.last, &user.writers));
        }
        out
    }
}

/// The admin API's edit of `field`; the HTTP status.
fn admin_edit(tg: &Tollgate, token: &str, field: &str, value: &Value) -> u16 {
    let path = format!("/admin/users/{token}");
    match field {
        "disabledReason" if !value.is_null() => {
            let query = format!("{path}?disabledReason={}", value.as_str().unwrap());
            tg.admin_call(Method::DELETE, &query, None).0
        }
        "disabledReason" => {
            let body = json!({"disabledAt": null, "disabledReason": null});
            tg.admin_call(Method::PUT, &path, Some(body)).0
        }
        _ => {
            tg.admin_call(Method::PUT, &path, Some(json!({ field: value })))
                .0
        }
    }
}

/// The hand's edit of `field`, as an operator would write it in `sqlite3`.
fn hand_edit(token: &str, field: &str, value: &Value, step: u64) -> Statement {
    let token = token.to_string();
    match (field, value) {
        ("disabledReason", Value::Null) => (
            "UPDATE users SET doc = json_remove(doc, '$.disabledAt', '$.disabledReason') \
             WHERE token = ?1"
                .into(),
            vec![token],
        ),
        ("disabledReason", reason) => (
            "UPDATE users SET doc = json_set(doc, '$.disabledAt', ?2 + 0, \
             '$.disabledReason', ?3) WHERE token = ?1"
                .into(),
            vec![
                token,
                (1_700_000_000_000u64 + step).to_string(),
                reason.as_str().unwrap().to_string(),
            ],
        ),
        (field, Value::Null) => (
            format!("UPDATE users SET doc = json_remove(doc, '$.{field}') WHERE token = ?1"),
            vec![token],
        ),
        (field, value) => (
            format!("UPDATE users SET doc = json_set(doc, '$.{field}', json(?2)) WHERE token = ?1"),
            vec![token, value.to_string()],
        ),
    }
}

/// Runs a hand edit; the rows it changed.
fn run(conn: &Connection, (sql, params): &Statement) -> usize {
    conn.execute(sql, rusqlite::params_from_iter(params.iter()))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Every user in the file as the API shows users (the counter columns as fields), normalized.
fn file_users(path: &Path) -> BTreeMap<String, Value> {
    let conn = reader(path);
    let mut stmt = conn
        .prepare("SELECT token, doc, prompt_count, last_used_at FROM users")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .unwrap();
    rows.map(|row| {
        let (token, doc, count, last_used) = row.unwrap();
        let mut user: Value = serde_json::from_str(&doc).unwrap();
        user["promptCount"] = json!(count);
        if let Some(at) = last_used {
            user["lastUsedAt"] = json!(at);
        }
        (token, normalized(&user))
    })
    .collect()
}

/// Panics with `what`, keeping the instance's log in a file named in the message.
fn fail(seed: u64, what: &str, tg: &Tollgate, soak: &Soak) -> ! {
    let log = std::env::temp_dir().join(format!("tollgate-sqlite-soak-{seed}.log"));
    std::fs::write(&log, tg.log()).unwrap();
    panic!(
        "sqlite soak seed {seed} (ops {:?}): {what}\ninstance log: {}",
        soak.ops,
        log.display()
    );
}

/// Where the instance's admin view and the file differ; empty when they agree.
fn view_vs_file(tg: &Tollgate, path: &Path) -> Vec<String> {
    let file = file_users(path);
    let (status, body) = tg.admin_call(Method::GET, "/admin/users", None);
    if status != 200 {
        return vec![format!("GET /admin/users: {status}")];
    }
    let seen: BTreeMap<String, Value> = body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["token"].as_str().unwrap().to_string(), normalized(u)))
        .collect();
    file.keys()
        .chain(seen.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|t| file.get(*t) != seen.get(*t))
        .map(|t| format!("{t}: file {:?}, admin view {:?}", file.get(t), seen.get(t)))
        .collect()
}

fn soak_once(seed: u64, ops_time: Duration) {
    let started = Instant::now();
    let origin = Origin::start();
    let tg = sqlite(&origin, 1)
        .admin_yaml("persist_timeout_ms: 2000")
        .start();
    let path = db_path(&tg);
    let initial: Vec<String> = (0..5).map(|_| tg.create_user(json!({}))).collect();
    let live = Arc::new(Mutex::new(Vec::new()));
    let mut soak = Soak {
        seed,
        rng: Rng::new(seed),
        tg: Some(tg),
        hand: operator(&path),
        path,
        users: BTreeMap::new(),
        pending: Vec::new(),
        deleted: BTreeSet::new(),
        live: Arc::clone(&live),
        paused: Arc::new(AtomicBool::new(false)),
        lock: None,
        step: 0,
        restarts: 0,
        upgrades: 0,
        ops: BTreeMap::new(),
    };
    soak.hand.busy_timeout(Duration::from_secs(20)).unwrap();
    for t in initial {
        soak.track(t);
    }

    let answered: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..2u64)
        .map(|n| {
            let url = soak.tg().url("/v1/models");
            let (answered, stop, live, paused) = (
                Arc::clone(&answered),
                Arc::clone(&stop),
                Arc::clone(&live),
                Arc::clone(&soak.paused),
            );
            let mut rng = Rng::new(seed ^ (0x1000 + n));
            std::thread::spawn(move || {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    let token = {
                        let live = live.lock().unwrap();
                        if live.is_empty() {
                            None
                        } else {
                            Some(live[rng.below(live.len())].clone())
                        }
                    };
                    let Some(token) = token.filter(|_| !paused.load(Ordering::Relaxed)) else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let ok = http
                        .get(&url)
                        .bearer_auth(&token)
                        .send()
                        .is_ok_and(|r| r.status() == 200);
                    if ok {
                        *answered.lock().unwrap().entry(token).or_default() += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    // One restart and one upgrade per 12 s of operations, at least one of each.
    let lifecycles = (ops_time.as_secs() / 12).max(1) as u32;
    let ops_until = Instant::now() + ops_time;
    while Instant::now() < ops_until {
        soak.step += 1;
        soak.admit_pending();
        match soak.rng.below(100) {
            0..=39 => soak.edit(),
            40..=49 => soak.burst(),
            50..=59 => soak.create(),
            60..=65 => soak.delete(),
            66..=68 => soak.lock_only(),
            69..=71 if soak.restarts < lifecycles => {
                soak.restarts += 1;
                soak.restart();
            }
            72..=74 if soak.upgrades < lifecycles => {
                soak.upgrades += 1;
                soak.upgrade();
            }
            _ => std::thread::sleep(Duration::from_millis(20 + soak.rng.below(80) as u64)),
        }
    }
    if soak.restarts == 0 {
        soak.restart();
    }
    if soak.upgrades == 0 {
        soak.upgrade();
    }
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.join().unwrap();
    }
    soak.release_lock();
    assert!(
        wait_until(Duration::from_secs(10), || {
            soak.admit_pending();
            soak.pending.is_empty()
        }),
        "seed {seed}: users inserted by hand never served: {:?}\n{}",
        soak.pending,
        soak.tg().log()
    );

    // Everything written by hand is served within about a second (and flushed counters
    // reach the file): the running instance's view converges on the file.
    let mut differ = Vec::new();
    let converged = wait_until(Duration::from_secs(10), || {
        differ = view_vs_file(soak.tg(), &soak.path);
        differ.is_empty()
    });
    if !converged {
        fail(
            seed,
            &format!(
                "the running instance's view does not converge on the file:\n  {}",
                differ.join("\n  ")
            ),
            soak.tg(),
            &soak,
        );
    }
    let answered = answered.lock().unwrap().clone();
    let mut tg = soak.tg.take().unwrap();
    let status = tg.stop();
    if !status.success() {
        fail(seed, &format!("the last stop exited {status}"), &tg, &soak);
    }
    let mismatches = soak.file_mismatches(&answered);
    if !mismatches.is_empty() {
        fail(
            seed,
            &format!("the file after the stop:\n  {}", mismatches.join("\n  ")),
            &tg,
            &soak,
        );
    }
    let tg = tg.restart();
    let differ = view_vs_file(&tg, &soak.path);
    if !differ.is_empty() {
        fail(
            seed,
            &format!(
                "restarted, the admin view differs from the file:\n  {}",
                differ.join("\n  ")
            ),
            &tg,
            &soak,
        );
    }
    let total: u64 = answered.values().sum();
    eprintln!(
        "sqlite soak seed {seed}: {} s, {total} requests answered, {} users live, {} deleted, \
         ops {:?}",
        started.elapsed().as_secs(),
        soak.users.len(),
        soak.deleted.len(),
        soak.ops
    );
}

#[test]
fn randomized_sqlite_soak_across_restarts_upgrades_and_hand_edits() {
    let ops_time = Duration::from_secs(env_u64("TOLLGATE_SOAK_OPS_SECONDS").unwrap_or(12));
    for_each_seed(DEFAULT_SEED, |seed| soak_once(seed, ops_time));
}
