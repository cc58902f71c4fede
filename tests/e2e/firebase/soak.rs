//! A seeded, randomized soak of the Firebase store: 2–3 instances on one stand-in, proxied
//! traffic on every instance, admin edits, disables, creations and deletions spread over the
//! instances, console edits written straight into the database, and the stand-in's faults
//! (5xx, lost and unacknowledged writes, slow writes, dropped and stalled streams, revoked
//! tokens, outages). Afterwards, with the faults healed, every instance must converge on the
//! database, every user's `promptCount` must equal the requests answered for it, the last
//! edit of every field must be what is stored, and deleted users must stay deleted.
//!
//! The checkable rule for edits: each field of each user has a single writer (one instance,
//! or the console), chosen at random; the final value must be that writer's last edit. Users
//! are deleted only when none of their edits is still unconfirmed (a 202), since a queued
//! upsert landing after a delete legitimately re-creates or touches the user.
//!
//! One iteration with a fixed seed runs in the suite. To soak:
//! `TOLLGATE_SOAK_SEED=<n> TOLLGATE_SOAK_ITERATIONS=<k> cargo nextest run --test e2e soak`
//! (iteration `i` uses seed `n + i`; the failing seed is in the panic message).

use std::collections::{BTreeMap, BTreeSet};

use rtdb_standin::LineEnding;

use super::*;
use crate::support::soak::{env_u64, field_value, for_each_seed, mismatches, normalized, Rng};

/// Stream faults (besides outages and revocations) in one run. Every stream lost in a row
/// lengthens tollgate's reconnect backoff (to 30 s; only a connection that lasts 30 s resets
/// it), and convergence then waits on it: with more, runs took up to 35 s to converge.
const STREAM_FAULTS: u32 = 4;

/// The seed the suite runs with.
const DEFAULT_SEED: u64 = 0x5eed_2026;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Writer {
    Instance(usize),
    Console,
}

/// The client addresses the traffic comes from (`X-Forwarded-For` from a trusted proxy), so
/// that instances add addresses to the same users' `ip` lists concurrently.
const ADDRESSES: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];

/// The fields edited in the soak; `disabledReason` stands for disable/enable (its presence is
/// the user's disabled state). `ip` is only ever cleared (as an admin resets `maxIps`); the
/// traffic adds its address again, so its final value is checked by convergence alone.
/// (`meta` is left out: a disable writes it too.)
const FIELDS: [&str; 7] = [
    "nickname",
    "type",
    "maxIps",
    "adminNote",
    "tokenLimits",
    "ip",
    "disabledReason",
];

struct Tracked {
    writers: BTreeMap<&'static str, Writer>,
    /// The last value each field's writer set (`Null`: removed), when it set one.
    last: BTreeMap<&'static str, Value>,
    /// Some edit of this user answered 202 (still queued when answered).
    unconfirmed: bool,
}

struct Soak {
    seed: u64,
    rng: Rng,
    db: StandIn,
    instances: Vec<Tollgate>,
    users: BTreeMap<String, Tracked>,
    /// Created but not yet seen in the database: not edited until then.
    pending: Vec<String>,
    deleted: BTreeSet<String>,
    /// Tokens the traffic threads use.
    live: Arc<Mutex<Vec<String>>>,
    step: u64,
    stream_faults: u32,
    outages: u32,
    restarts: u32,
    ops: BTreeMap<&'static str, u32>,
}

impl Soak {
    fn new_tracked(&mut self) -> Tracked {
        let n = self.instances.len();
        let writers = FIELDS
            .iter()
            .map(|f| {
                let w = if self.rng.chance(25) {
                    Writer::Console
                } else {
                    Writer::Instance(self.rng.below(n))
                };
                (*f, w)
            })
            .collect();
        Tracked {
            writers,
            last: BTreeMap::new(),
            unconfirmed: false,
        }
    }

    /// Stops one instance (SIGTERM: its shutdown flush writes what it counted) and starts it
    /// again, with a new instance id. The faults are healed first: a shutdown flush that
    /// cannot reach the database loses its changes, by design.
    fn restart(&mut self) {
        self.count("restart");
        self.db.clear_faults();
        self.db.end_outage();
        let i = self.rng.below(self.instances.len());
        let tg = self.instances.remove(i).restart();
        wait_ready(&tg);
        self.instances.insert(i, tg);
    }

    fn count(&mut self, op: &'static str) {
        *self.ops.entry(op).or_default() += 1;
    }

    fn pick_user(&mut self) -> Option<String> {
        self.rng.pick_key(&self.users)
    }

    /// `maxIps` above the traffic's addresses, so that it never disables a user by itself.
    fn value_for(&mut self, field: &str) -> Value {
        field_value(&mut self.rng, field, self.step, ADDRESSES.len() + 1)
    }

    fn edit(&mut self) {
        let Some(token) = self.pick_user() else {
            return;
        };
        let field = FIELDS[self.rng.below(FIELDS.len())];
        let value = self.value_for(field);
        let writer = self.users[&token].writers[field];
        let status = apply_edit(
            &self.db,
            &self.instances,
            &token,
            field,
            &value,
            writer,
            self.step,
        );
        self.record_edit(&token, field, value, writer, status);
    }

    /// Several fields of one user edited at once, each by its own writer: edits on different
    /// instances (and the console) race each other's writes and stream echoes.
    fn burst(&mut self) {
        let Some(token) = self.pick_user() else {
            return;
        };
        let k = 2 + self.rng.below(3);
        let mut fields: Vec<&'static str> = FIELDS.to_vec();
        let mut plan = Vec::new();
        for _ in 0..k {
            let field = fields.remove(self.rng.below(fields.len()));
            let value = self.value_for(field);
            plan.push((field, value, self.users[&token].writers[field]));
        }
        self.count("burst");
        let (db, instances, step) = (&self.db, &self.instances, self.step);
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = plan
                .iter()
                .map(|(field, value, writer)| {
                    let token = &token;
                    scope.spawn(move || {
                        apply_edit(db, instances, token, field, value, *writer, step)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((field, value, writer), status) in plan.into_iter().zip(statuses) {
            self.record_edit(&token, field, value, writer, status);
        }
    }

    fn record_edit(
        &mut self,
        token: &str,
        field: &'static str,
        value: Value,
        writer: Writer,
        status: u16,
    ) {
        let op = match (writer, field, value.is_null()) {
            (Writer::Console, "disabledReason", _) => "console disable/enable",
            (Writer::Console, ..) => "console edit",
            (_, "disabledReason", false) => "admin disable",
            (_, "disabledReason", true) => "admin enable",
            _ => "admin edit",
        };
        self.count(op);
        if status == 404 && field == "disabledReason" && !value.is_null() {
            // Created on another instance moments ago and not streamed here yet: a disable
            // needs the user (a PUT would create it), so nothing changed.
            self.count("disable of a user not here yet");
            return;
        }
        assert!(
            status == 200 || status == 202,
            "seed {}: {writer:?} {field}={value} on {token}: {status}",
            self.seed
        );
        let user = self.users.get_mut(token).unwrap();
        if field != "ip" {
            user.last.insert(field, value);
        }
        user.unconfirmed |= status == 202;
    }

    fn create(&mut self) {
        let i = self.rng.below(self.instances.len());
        let token = if self.rng.chance(50) {
            self.count("admin create (POST)");
            let (status, body) = self.instances[i].admin_call(
                Method::POST,
                "/admin/users",
                Some(json!({"type": "normal"})),
            );
            assert!(
                status == 200 || status == 202,
                "seed {}: POST {status}",
                self.seed
            );
            body["token"].as_str().unwrap().to_string()
        } else {
            self.count("admin create (PUT)");
            let token = format!("put-{}-{}", self.seed, self.step);
            let (status, _) = self.instances[i].admin_call(
                Method::PUT,
                &format!("/admin/users/{token}"),
                Some(json!({})),
            );
            assert!(
                status == 200 || status == 202,
                "seed {}: PUT {status}",
                self.seed
            );
            token
        };
        self.pending.push(token);
    }

    /// Created users join the soak once the database has them.
    fn admit_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for token in pending {
            if stored(&self.db, &format!("/users/{token}/createdAt")).is_null() {
                self.pending.push(token);
            } else {
                let tracked = self.new_tracked();
                self.users.insert(token.clone(), tracked);
                self.live.lock().unwrap().push(token);
            }
        }
    }

    fn delete(&mut self) {
        let candidates: Vec<String> = self
            .users
            .iter()
            .filter(|(_, u)| !u.unconfirmed)
            .map(|(t, _)| t.clone())
            .collect();
        if self.users.len() <= 3 || candidates.is_empty() {
            return;
        }
        let token = candidates[self.rng.below(candidates.len())].clone();
        self.live.lock().unwrap().retain(|t| *t != token);
        if self.rng.chance(25) {
            self.count("console delete");
            self.db.delete(&format!("/users/{token}")).unwrap();
        } else {
            self.count("admin delete");
            let i = self.rng.below(self.instances.len());
            let (status, _) = self.instances[i].admin_call(
                Method::DELETE,
                &format!("/admin/users/{token}?hard=true"),
                None,
            );
            // 404: the instance had not heard of it yet (only when created elsewhere).
            assert!(
                [200, 202, 404].contains(&status),
                "seed {}: hard delete {status}",
                self.seed
            );
            if status == 404 {
                self.db.delete(&format!("/users/{token}")).unwrap();
            }
        }
        self.users.remove(&token);
        self.deleted.insert(token);
    }

    fn fault(&mut self) {
        let times = 1 + self.rng.below(3) as u32;
        let rule = match self.rng.below(16) {
            0 => FaultRule::new("PATCH", "/.json", FaultAction::status(503)),
            1 => FaultRule::new("PATCH", "/.json", FaultAction::ApplyThenDrop),
            2 => FaultRule::new("PATCH", "/.json", FaultAction::DropBeforeApply),
            3 => FaultRule::new("PATCH", "/.json", FaultAction::Delay { ms: 700 }),
            4 => FaultRule::new("GET", "/_sync/*", FaultAction::status(503)),
            5 => FaultRule::new("PUT", "/users/*", FaultAction::ApplyThenDrop),
            6 => FaultRule::new("GET", "/users/*", FaultAction::status(500)),
            7 if self.stream_faults < STREAM_FAULTS => {
                self.stream_faults += 1;
                let actions = [
                    StreamAction::Drop,
                    StreamAction::Close,
                    StreamAction::CloseMidEvent,
                    StreamAction::Duplicate,
                    StreamAction::AuthRevoked,
                    StreamAction::Stall,
                ];
                let action = actions[self.rng.below(actions.len())];
                self.count("stream fault");
                let _ = self.db.stream_action(action, None);
                return;
            }
            8 => {
                self.count("tokens revoked");
                self.db.revoke_tokens();
                return;
            }
            9 if self.outages < 2 => {
                self.outages += 1;
                self.count("outage");
                self.db
                    .outage(Duration::from_millis(500 + self.rng.below(1500) as u64));
                return;
            }
            10 if self.restarts < 1 => {
                self.restarts += 1;
                self.restart();
                return;
            }
            // The next stream (or read of the users) slow to start, or slow to arrive.
            11 if self.stream_faults < STREAM_FAULTS => {
                self.stream_faults += 1;
                FaultRule::new("GET", "/users.json", FaultAction::Delay { ms: 1500 })
            }
            // (The stand-in buffers a trickled stream until it ends: its snapshot arrives
            // late, older than what the instance knows by then.)
            12 if self.stream_faults < STREAM_FAULTS => {
                self.stream_faults += 1;
                FaultRule::new(
                    "GET",
                    "/users.json",
                    FaultAction::Trickle {
                        chunk_bytes: 16,
                        interval_ms: 2,
                    },
                )
            }
            // The access token refused: a new one, and the write again.
            13 => FaultRule::new("PATCH", "/.json", FaultAction::status(401)),
            // Requests about one user alone failing (its conditional create, its `ip` list's
            // merge): refused, or losing every compare-and-set until the instance gives up on
            // it. That user's change is held back while the others' are written.
            14 => FaultRule::new("PUT", "/users/*", FaultAction::status(403)),
            15 => {
                self.count("held back");
                let rule = FaultRule::new("PUT", "/users/*/ip.json", FaultAction::status(412));
                self.db
                    .add_fault(rule.times(26 + self.rng.below(10) as u32));
                return;
            }
            _ => return,
        };
        self.count("fault rule");
        self.db.add_fault(rule.times(times));
    }

    /// What differs from the rules; empty once converged.
    fn mismatches(&self, answered: &HashMap<String, u64>) -> Vec<String> {
        let mut out = Vec::new();
        let all = stored(&self.db, "/users");
        let empty = serde_json::Map::new();
        let all = all.as_object().unwrap_or(&empty);
        let db_users: BTreeMap<&String, Value> = all
            .iter()
            .filter(|(_, u)| !u["createdAt"].is_null())
            .map(|(t, u)| (t, normalized(u)))
            .collect();
        for (n, tg) in self.instances.iter().enumerate() {
            let (status, body) = tg.admin_call(Method::GET, "/admin/users", None);
            if status != 200 {
                out.push(format!("instance {n}: GET /admin/users {status}"));
                continue;
            }
            let seen: BTreeMap<String, Value> = body["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| (u["token"].as_str().unwrap().to_string(), normalized(u)))
                .collect();
            for (t, u) in &db_users {
                match seen.get(*t) {
                    None => out.push(format!("instance {n} lacks {t}")),
                    Some(v) if v != u => {
                        out.push(format!("instance {n} has {t} as {v}, the database {u}"))
                    }
                    _ => {}
                }
            }
            for t in seen.keys() {
                if !db_users.contains_key(t) {
                    out.push(format!("instance {n} has {t}, the database does not"));
                }
            }
        }
        for token in &self.deleted {
            if db_users.contains_key(token) {
                out.push(format!("deleted {token} is back in the database"));
            }
        }
        for (token, user) in &self.users {
            let Some(stored) = db_users.get(token) else {
                out.push(format!("{token} missing from the database"));
                continue;
            };
            let ips = stored["ip"].as_array().cloned().unwrap_or_default();
            let distinct: BTreeSet<String> = ips.iter().map(Value::to_string).collect();
            if distinct.len() != ips.len() {
                out.push(format!(
                    "{token}: ip list with duplicates: {}",
                    stored["ip"]
                ));
            }
            let want = answered.get(token).copied().unwrap_or(0);
            out.extend(mismatches(token, stored, want, &user.last, &user.writers));
        }
        out
    }
}

/// One edit of `field` by its writer: an admin write on that instance, or a console write
/// straight into the database. Returns the HTTP status (200 for the console).
fn apply_edit(
    db: &StandIn,
    instances: &[Tollgate],
    token: &str,
    field: &str,
    value: &Value,
    writer: Writer,
    step: u64,
) -> u16 {
    let path = format!("/admin/users/{token}");
    match (writer, field) {
        (Writer::Console, "disabledReason") => {
            let at = if value.is_null() {
                Value::Null
            } else {
                json!(1_700_000_000_000u64 + step)
            };
            db.update(
                "/",
                json!({format!("users/{token}/disabledAt"): at,
                       format!("users/{token}/disabledReason"): value}),
            )
            .unwrap();
            200
        }
        (Writer::Console, _) => {
            db.update("/", json!({format!("users/{token}/{field}"): value}))
                .unwrap();
            200
        }
        (Writer::Instance(i), "disabledReason") if !value.is_null() => {
            let reason = value.as_str().unwrap();
            let query = format!("{path}?disabledReason={reason}");
            instances[i].admin_call(Method::DELETE, &query, None).0
        }
        (Writer::Instance(i), "disabledReason") => {
            let body = json!({"disabledAt": null, "disabledReason": null});
            instances[i].admin_call(Method::PUT, &path, Some(body)).0
        }
        (Writer::Instance(i), _) => {
            let body = json!({ field: value });
            instances[i].admin_call(Method::PUT, &path, Some(body)).0
        }
    }
}

fn soak_once(seed: u64, ops_time: Duration) {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let db = standin();
    let origin = Origin::start();
    let initial: Vec<String> = (0..6).map(|i| format!("seeded-{i}")).collect();
    let users: serde_json::Map<String, Value> = initial
        .iter()
        .map(|t| (t.clone(), older_user(t, json!({}))))
        .collect();
    db.set_silently("/users", Value::Object(users)).unwrap();
    // The forms the real service may use: multi-path patch events kept or nested, other SSE
    // line endings, streams redirected to another host.
    let (keys, ending, redirect) = (rng.below(2), rng.below(3), rng.chance(30));
    // Short-lived access tokens: refreshed (and streams re-authorised) during the run.
    let token_lifetime = rng.chance(30).then(|| 4 + rng.below(5) as u64);
    db.update_knobs(|k| {
        if let Some(seconds) = token_lifetime {
            k.token_expires_in_s = seconds;
        }
        k.patch_event_keys = [PatchEventKeys::Keep, PatchEventKeys::Nest][keys];
        k.sse_line_ending = [LineEnding::Lf, LineEnding::Crlf, LineEnding::Cr][ending];
    });
    if redirect {
        db.set_redirect(RedirectScope::Streams, None);
    }
    let knobs = (keys, ending, redirect, token_lifetime);
    let n = 2 + rng.below(2);
    let instances: Vec<Tollgate> = (0..n)
        .map(|_| {
            start_streaming(
                builder(&origin, &db)
                    .admin_yaml("persist_timeout_ms: 2000")
                    .yaml("trusted_proxies: [\"127.0.0.1\"]"),
                &db,
            )
        })
        .collect();
    let live = Arc::new(Mutex::new(initial.clone()));
    let mut soak = Soak {
        seed,
        rng,
        db,
        instances,
        users: BTreeMap::new(),
        pending: Vec::new(),
        deleted: BTreeSet::new(),
        live: Arc::clone(&live),
        step: 0,
        stream_faults: 0,
        outages: 0,
        restarts: 0,
        ops: BTreeMap::new(),
    };
    for t in &initial {
        let tracked = soak.new_tracked();
        soak.users.insert(t.clone(), tracked);
    }

    let answered: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = soak
        .instances
        .iter()
        .enumerate()
        .map(|(n, tg)| {
            let url = tg.url("/v1/models");
            let (answered, stop, live) =
                (Arc::clone(&answered), Arc::clone(&stop), Arc::clone(&live));
            let mut rng = Rng::new(seed ^ (0x1000 + n as u64));
            std::thread::spawn(move || {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    let token = {
                        let live = live.lock().unwrap();
                        live[rng.below(live.len())].clone()
                    };
                    let ok = http
                        .get(&url)
                        .bearer_auth(&token)
                        .header("x-forwarded-for", ADDRESSES[rng.below(ADDRESSES.len())])
                        .send()
                        .is_ok_and(|r| r.status() == StatusCode::OK);
                    if ok {
                        let mut answered = answered.lock().unwrap();
                        *answered.entry(format!("{token}@{n}")).or_default() += 1;
                        *answered.entry(token).or_default() += 1;
                    }
                    std::thread::sleep(Duration::from_millis(8));
                }
            })
        })
        .collect();

    // Some runs much more faulty than others.
    let fault_share = 8 + soak.rng.below(30);
    let ops_until = Instant::now() + ops_time;
    while Instant::now() < ops_until {
        soak.step += 1;
        soak.admit_pending();
        match soak.rng.below(100) {
            0..=34 => soak.edit(),
            35..=44 => soak.burst(),
            45..=52 => soak.create(),
            53..=56 => soak.delete(),
            n if n < 57 + fault_share => soak.fault(),
            _ => std::thread::sleep(Duration::from_millis(20 + soak.rng.below(100) as u64)),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.join().unwrap();
    }
    // Heal, then wait for convergence.
    soak.db.clear_faults();
    soak.db.end_outage();
    let answered = answered.lock().unwrap().clone();
    let mut last = Vec::new();
    let healed = Instant::now();
    let converged = wait_until(Duration::from_secs(60), || {
        soak.admit_pending();
        last = soak.mismatches(&answered);
        last.is_empty() && soak.pending.is_empty()
    });
    if !converged {
        let dir = std::env::temp_dir();
        let mut logs = Vec::new();
        for (n, tg) in soak.instances.iter().enumerate() {
            let path = dir.join(format!("tollgate-soak-{seed}-{n}.log"));
            std::fs::write(&path, tg.log()).unwrap();
            logs.push(path.display().to_string());
        }
        let requests = dir.join(format!("tollgate-soak-{seed}-requests.json"));
        let log: Vec<Value> = soak
            .db
            .requests()
            .iter()
            .map(|r| {
                json!({"seq": r.seq, "at_ms": r.at_ms, "method": r.method, "path": r.path,
                       "body": r.body, "status": r.status, "outcome": r.outcome})
            })
            .collect();
        std::fs::write(&requests, serde_json::to_string_pretty(&log).unwrap()).unwrap();
        let by_instance: Vec<(&String, &u64)> =
            answered.iter().filter(|(k, _)| k.contains('@')).collect();
        panic!(
            "soak seed {seed} ({n} instances, knobs {knobs:?}, ops {:?}, pending {:?}) did not \
             converge:\n  {}\nanswered per instance: {by_instance:?}\n\
             instance logs: {logs:?}; database requests: {}",
            soak.ops,
            soak.pending,
            last.join("\n  "),
            requests.display()
        );
    }
    let total: u64 = answered
        .iter()
        .filter(|(k, _)| !k.contains('@'))
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "soak seed {seed}: {n} instances, {} s (converged {} ms after healing), {total} requests \
         answered, {} users live, {} deleted, ops {:?}",
        started.elapsed().as_secs(),
        healed.elapsed().as_millis(),
        soak.users.len(),
        soak.deleted.len(),
        soak.ops
    );
}

#[test]
fn randomized_multi_instance_soak_converges() {
    let ops_time = Duration::from_secs(env_u64("TOLLGATE_SOAK_OPS_SECONDS").unwrap_or(15));
    for_each_seed(DEFAULT_SEED, |seed| soak_once(seed, ops_time));
}
