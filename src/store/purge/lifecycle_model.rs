//! A model-based test of the user lifecycle over time: a reference model of the documented
//! rules (docs/user-management.md: who is admitted when, and the purge of temporary users
//! `POW_TOKEN_PURGE_HOURS` after they expired or were disabled) is driven by a seeded random
//! sequence of creations (`POST`, and `PUT` upserts of a missing token, also after a hard
//! delete), `PUT` edits of `type`, `expiresAt`, `disabledAt`, `disabledReason` and
//! `promptCount`, soft and hard deletes, requests (IP limit and auto-ban included), clock moves
//! onto and around expiries and purge deadlines, purge rounds, purges with an admin edit
//! between their snapshot and their removals, and restarts (the memory store forgets every
//! user; the SQLite store and the Firebase stand-in keep them, counts included). Every answer
//! and, after every step, every user as the admin API shows it, must equal the model's.
//!
//! `TOLLGATE_MODEL_SEED=N` replays one run; `TOLLGATE_MODEL_RUNS` and `TOLLGATE_MODEL_STEPS`
//! size the search (defaults: 30 runs of 300 steps, about 6 s in a debug build). The
//! concurrent test takes the seed too, and `TOLLGATE_MODEL_STEPS` as each admin thread's
//! number of actions (default 3000).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rtdb_standin::{Options, StandIn};
use serde_json::{json, Map, Value};

use super::{purge_temporary_users, purgeable, remove_still_purgeable};
use crate::config::{GatekeeperConfig, GatekeeperMode, Secrets};
use crate::proxy::gatekeeper::{Gatekeeper, Identity, Refusal, AUTO_BAN_REASON};
use crate::soak::{env_u64, model_seeds, Rng};
use crate::store::firebase::standin_tests;
use crate::store::firebase::FirebaseStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{StoreBackend, StoreStatus, SyncEngine};
use crate::users::{User, UserCache, UserPatch, UserType};

const HOUR: u64 = 3_600_000;
const T0: u64 = 1_700_000_000_000;
const TOKENS: [&str; 4] = ["t0", "t1", "t2", "t3"];
const IPS: [&str; 3] = ["198.51.100.1", "198.51.100.2", "2001:db8::1"];
const TYPES: [UserType; 3] = [UserType::Normal, UserType::Special, UserType::Temporary];

/// The lifecycle fields of one user, as the documents define them.
#[derive(Clone, Debug, PartialEq)]
struct Expected {
    user_type: UserType,
    expires_at: Option<u64>,
    disabled_at: Option<u64>,
    disabled_reason: Option<String>,
    prompt_count: u64,
    ip: Vec<String>,
}

impl Expected {
    fn new(user_type: UserType) -> Self {
        Self {
            user_type,
            expires_at: None,
            disabled_at: None,
            disabled_reason: None,
            prompt_count: 0,
            ip: Vec::new(),
        }
    }

    fn of(user: &User) -> Self {
        Self {
            user_type: user.user_type,
            expires_at: user.expires_at,
            disabled_at: user.disabled_at,
            disabled_reason: user.disabled_reason.clone(),
            prompt_count: user.prompt_count,
            ip: user.ip.clone(),
        }
    }

    /// docs/user-management.md: "Temporary users that expired or were disabled more than
    /// `POW_TOKEN_PURGE_HOURS` hours ago are removed"; never a normal or special user.
    fn purgeable(&self, now: u64, after: u64) -> bool {
        if self.user_type != UserType::Temporary {
            return false;
        }
        let expired_long_ago = self.expires_at.is_some_and(|e| e + after < now);
        let disabled_long_ago = self.disabled_at.is_some_and(|d| d + after < now);
        expired_long_ago || disabled_long_ago
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    Memory,
    Sqlite,
    /// The local Firebase stand-in (`crates/rtdb-standin`), one instance.
    Firebase,
}

/// One run: the real cache, gatekeeper and store beside the model.
struct Run {
    seed: u64,
    rng: Rng,
    now: u64,
    after: u64,
    max_ips: u32,
    auto_ban: bool,
    store: Store,
    dir: tempfile::TempDir,
    /// The database of a `Firebase` run.
    db: Option<StandIn>,
    runtime: tokio::runtime::Runtime,
    cache: Arc<UserCache>,
    gate: Gatekeeper,
    engine: Option<SyncEngine>,
    model: BTreeMap<String, Expected>,
    log: Vec<String>,
}

impl Run {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let after = *pick(&mut rng, &[48 * HOUR, HOUR, 0]);
        let max_ips = *pick(&mut rng, &[0, 1, 2]);
        let auto_ban = rng.chance(40);
        let store = *pick(&mut rng, &[Store::Memory, Store::Sqlite, Store::Firebase]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(UserCache::default());
        let gate = gatekeeper(max_ips, auto_ban, &cache);
        let mut run = Self {
            seed,
            rng,
            now: T0,
            after,
            max_ips,
            auto_ban,
            store,
            dir,
            db: (store == Store::Firebase).then(|| StandIn::start(Options::default())),
            runtime,
            cache,
            gate,
            engine: None,
            model: BTreeMap::new(),
            log: vec![format!(
                "after={after} max_ips={max_ips} auto_ban={auto_ban} store={store:?}"
            )],
        };
        run.open_store();
        run
    }

    /// (Re)opens the store and loads its users; the memory store starts empty.
    fn open_store(&mut self) {
        let backend: Arc<dyn StoreBackend> = match (self.store, &self.db) {
            (Store::Sqlite, _) => {
                Arc::new(SqliteStore::open(&self.dir.path().join("tollgate.db")).unwrap())
            }
            (Store::Firebase, Some(db)) => {
                let _context = self.runtime.enter();
                Arc::new(FirebaseStore::open(&standin_tests::config(db)).unwrap())
            }
            _ => {
                self.cache = Arc::new(UserCache::default());
                self.gate = gatekeeper(self.max_ips, self.auto_ban, &self.cache);
                return;
            }
        };
        {
            let cache = Arc::new(self.runtime.block_on(backend.load_cache()).unwrap());
            let status = StoreStatus::new(backend.name(), Arc::clone(&cache));
            self.engine = Some(SyncEngine::new(
                backend,
                status,
                Duration::from_secs(3600),
                Duration::from_secs(1),
            ));
            self.cache = cache;
        }
        self.gate = gatekeeper(self.max_ips, self.auto_ban, &self.cache);
    }

    fn fail(&self, what: &str) -> ! {
        let tail = self.log.iter().rev().take(40).rev().cloned();
        panic!(
            "{what}\nreplay: TOLLGATE_MODEL_SEED={} cargo test --lib lifecycle_model\n{}",
            self.seed,
            tail.collect::<Vec<_>>().join("\n")
        );
    }

    fn note(&mut self, line: String) {
        self.log.push(format!("t=T0+{}: {line}", self.now - T0));
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=9 => self.create(),
            10..=29 => {
                let token = self.token();
                self.put(&token);
            }
            30..=35 => self.disable(),
            36..=39 => self.hard_delete(),
            40..=64 => self.request(),
            65..=79 => self.advance(),
            80..=89 => self.purge(),
            90..=97 => self.purge_racing_an_edit(),
            _ => self.restart(),
        }
        self.compare();
    }

    fn token(&mut self) -> String {
        pick(&mut self.rng, &TOKENS).to_string()
    }

    /// A time near now, or near a deadline of the model: where the rules change their answer.
    fn instant(&mut self) -> u64 {
        let base = match self.rng.below(3) {
            0 => self.now,
            1 => self.now.saturating_sub(self.after),
            _ => self.now.saturating_sub(49 * HOUR),
        };
        let delta = *pick(&mut self.rng, &[0i64, 1, -1, 1000, -1000, HOUR as i64]);
        base.saturating_add_signed(delta)
    }

    // ------------------------------------------------------------------------- admin actions

    /// `POST /admin/users` (under a chosen token, so that a token can come back).
    fn create(&mut self) {
        let token = self.token();
        let user_type = *pick(&mut self.rng, &TYPES);
        let mut user = User::new(token.clone(), user_type, self.now);
        if user_type == UserType::Temporary {
            user.expires_at = Some(self.instant());
        }
        self.note(format!(
            "POST {token} {user_type:?} expiresAt={:?}",
            user.expires_at
        ));
        let created = self.cache.create(&user).is_ok();
        let expected = !self.model.contains_key(&token);
        if created != expected {
            self.fail(&format!("create {token}: created={created}"));
        }
        if created {
            let mut m = Expected::new(user_type);
            m.expires_at = user.expires_at;
            self.model.insert(token, m);
        }
    }

    /// `PUT /admin/users/{token}` with a random subset of the lifecycle fields.
    fn put(&mut self, token: &str) {
        let mut body = Map::new();
        while body.is_empty() || self.rng.chance(30) {
            match self.rng.below(5) {
                0 => {
                    let t = *pick(&mut self.rng, &["normal", "special", "temporary"]);
                    body.insert("type".into(), json!(t));
                }
                1 => {
                    let v = self.nullable_instant();
                    body.insert("expiresAt".into(), v);
                }
                2 => {
                    let v = self.nullable_instant();
                    body.insert("disabledAt".into(), v);
                }
                3 => {
                    let r = pick(&mut self.rng, &[json!(null), json!(""), json!("abuse")]).clone();
                    body.insert("disabledReason".into(), r);
                }
                _ => {
                    body.insert("promptCount".into(), json!(self.rng.below(5)));
                }
            }
        }
        let body = Value::Object(body);
        self.note(format!("PUT {token} {body}"));
        let patch: UserPatch = serde_json::from_value(body.clone()).unwrap();
        let (user, _) = self.cache.upsert(token, &patch, self.now);
        let m = self
            .model
            .entry(token.to_string())
            .or_insert_with(|| Expected::new(UserType::Normal));
        for (field, value) in body.as_object().unwrap() {
            match field.as_str() {
                "type" => m.user_type = serde_json::from_value(value.clone()).unwrap(),
                "expiresAt" => m.expires_at = value.as_u64(),
                "disabledAt" => m.disabled_at = value.as_u64(),
                "disabledReason" => m.disabled_reason = value.as_str().map(String::from),
                _ => m.prompt_count = value.as_u64().unwrap(),
            }
        }
        let shown = Expected::of(&user);
        if shown != *m {
            let m = m.clone();
            self.fail(&format!("PUT answered {shown:?}, expected {m:?}"));
        }
    }

    fn nullable_instant(&mut self) -> Value {
        if self.rng.chance(25) {
            Value::Null
        } else {
            json!(self.instant())
        }
    }

    /// `DELETE /admin/users/{token}[?disabledReason=…]`: disables.
    fn disable(&mut self) {
        let token = self.token();
        let reason = *pick(&mut self.rng, &[None, Some("bye"), Some("")]);
        self.note(format!("DELETE {token} reason={reason:?}"));
        let answer = self.cache.disable(&token, reason, self.now);
        match (answer, self.model.get_mut(&token)) {
            (Err(_), None) => {}
            (Ok((user, _)), Some(m)) => {
                m.disabled_at = Some(self.now);
                m.disabled_reason = reason.map(String::from);
                if Expected::of(&user) != *m {
                    let m = m.clone();
                    self.fail(&format!("DELETE answered {user:?}, expected {m:?}"));
                }
            }
            (answer, m) => {
                let found = answer.is_ok();
                let expected = m.is_some();
                self.fail(&format!(
                    "DELETE {token}: found={found}, expected {expected}"
                ));
            }
        }
    }

    /// `DELETE /admin/users/{token}?hard=true`.
    fn hard_delete(&mut self) {
        let token = self.token();
        self.note(format!("DELETE {token}?hard=true"));
        let removed = self.cache.remove(&token).is_ok();
        if removed != self.model.remove(&token).is_some() {
            self.fail(&format!("hard delete {token}: removed={removed}"));
        }
    }

    // ---------------------------------------------------------------------------- requests

    fn request(&mut self) {
        let token = self.token();
        let ip_text = *pick(&mut self.rng, &IPS);
        let ip: IpAddr = ip_text.parse().unwrap();
        let expected = self.expect_admission(&token, ip_text);
        let outcome = self.gate.admit(Some(&token), ip, self.now);
        self.note(format!("request {token} from {ip_text}: {expected:?}"));
        let got = match outcome {
            Ok(Identity::User(record)) => {
                // The upstream answered 2xx: the request counts.
                self.cache.count_request(&record, self.now);
                Ok(())
            }
            Ok(Identity::Anonymous) => self.fail("a user's token admitted as anonymous"),
            Err(refusal) => Err(refusal),
        };
        if got != expected {
            self.fail(&format!(
                "request {token}: got {got:?}, expected {expected:?}"
            ));
        }
    }

    /// The gatekeeper's documented decision, applied to the model.
    fn expect_admission(&mut self, token: &str, ip: &str) -> Result<(), Refusal> {
        let (now, max_ips, auto_ban) = (self.now, self.max_ips, self.auto_ban);
        let m = self.model.get_mut(token).ok_or(Refusal::UnknownToken)?;
        if m.disabled_at.is_some() {
            let reason = m.disabled_reason.as_deref().filter(|r| !r.is_empty());
            let reason = reason.unwrap_or("User token disabled");
            return Err(Refusal::Disabled(format!("Forbidden: {reason}")));
        }
        if m.user_type == UserType::Temporary && m.expires_at.is_some_and(|e| e <= now) {
            return Err(Refusal::Expired);
        }
        let limit = if m.user_type == UserType::Special {
            0
        } else {
            max_ips as usize
        };
        if !m.ip.iter().any(|known| known == ip) {
            if limit != 0 && m.ip.len() >= limit {
                if !auto_ban {
                    return Err(Refusal::IpLimit);
                }
                m.ip.push(ip.to_string());
                m.disabled_at = Some(now);
                m.disabled_reason = Some(AUTO_BAN_REASON.to_string());
                return Err(Refusal::IpLimitBanned);
            }
            m.ip.push(ip.to_string());
        }
        m.prompt_count += 1;
        Ok(())
    }

    // ------------------------------------------------------------------------ time and jobs

    /// Moves the clock forward: a little, a lot, or onto (and around) a user's expiry or
    /// purge deadline.
    fn advance(&mut self) {
        let deadlines: Vec<u64> = self
            .model
            .values()
            .flat_map(|m| [m.expires_at, m.disabled_at])
            .flatten()
            .flat_map(|at| [at, at + self.after])
            .filter(|&at| at >= self.now)
            .collect();
        let to = if !deadlines.is_empty() && self.rng.chance(50) {
            let at = deadlines[self.rng.below(deadlines.len())];
            at + *pick(&mut self.rng, &[0, 1, 2])
        } else {
            self.now + *pick(&mut self.rng, &[1, 1000, HOUR, 47 * HOUR, 49 * HOUR])
        };
        self.note(format!("clock +{}", to - self.now));
        self.now = to;
    }

    fn expected_purge(&self) -> Vec<String> {
        let (now, after) = (self.now, self.after);
        let doomed = self.model.iter().filter(|(_, m)| m.purgeable(now, after));
        doomed.map(|(t, _)| t.clone()).collect()
    }

    fn purge(&mut self) {
        let doomed = self.expected_purge();
        self.note(format!("purge: expect {doomed:?}"));
        let after = Duration::from_millis(self.after);
        let purged = purge_temporary_users(&self.cache, self.now, after);
        for token in &doomed {
            self.model.remove(token);
        }
        if purged != doomed.len() {
            self.fail(&format!("purged {purged}, expected {}", doomed.len()));
        }
    }

    /// A purge whose snapshot is taken before an admin's action and whose removals come after
    /// it: a user the admin extended, re-enabled, retyped or recreated must survive.
    fn purge_racing_an_edit(&mut self) {
        let after = Duration::from_millis(self.after);
        let snapshot = purgeable(&self.cache, self.now, after);
        let in_snapshot = self.expected_purge();
        self.note(format!(
            "purge snapshot {in_snapshot:?}, then an admin acts"
        ));
        match self.rng.below(4) {
            0 => self.create(),
            1 => self.disable(),
            2 => self.hard_delete(),
            _ => {
                let token = match in_snapshot.first() {
                    Some(t) if self.rng.chance(70) => t.clone(),
                    _ => self.token(),
                };
                self.put(&token);
            }
        }
        let (now, a) = (self.now, self.after);
        let doomed: Vec<String> = in_snapshot
            .into_iter()
            .filter(|t| self.model.get(t).is_some_and(|m| m.purgeable(now, a)))
            .collect();
        let purged = remove_still_purgeable(&self.cache, &snapshot, self.now, after);
        self.note(format!("purge removes {doomed:?}"));
        for token in &doomed {
            self.model.remove(token);
        }
        if purged != doomed.len() {
            self.fail(&format!("purged {purged}, expected {}", doomed.len()));
        }
    }

    /// Writes everything queued (as on SIGTERM) and starts again from the store.
    fn restart(&mut self) {
        self.note(format!("restart ({:?})", self.store));
        if let Some(engine) = self.engine.take() {
            self.runtime.block_on(engine.flush()).unwrap();
        } else {
            self.model.clear();
        }
        self.open_store();
    }

    // --------------------------------------------------------------------------- the check

    /// Every user as the admin API shows it (`GET /admin/users/{token}`) equals the model.
    fn compare(&self) {
        let mut shown = BTreeMap::new();
        self.cache.for_each(|record| {
            let user = record.to_user();
            shown.insert(user.token.clone(), Expected::of(&user));
        });
        if shown != self.model {
            self.fail(&format!(
                "users differ:\n  shown    {shown:?}\n  expected {:?}",
                self.model
            ));
        }
    }
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

fn gatekeeper(max_ips: u32, auto_ban: bool, cache: &Arc<UserCache>) -> Gatekeeper {
    let config = GatekeeperConfig {
        mode: GatekeeperMode::UserToken,
        max_ips_per_user: max_ips,
        max_ips_auto_ban: auto_ban,
        max_recorded_ips: 1000,
    };
    let secrets = Secrets {
        proxy_key: None,
        admin_key: None,
    };
    Gatekeeper::new(&config, &secrets, Arc::clone(cache))
}

#[test]
fn lifecycle_model() {
    let steps = env_u64("TOLLGATE_MODEL_STEPS").unwrap_or(300);
    for seed in model_seeds(30) {
        let mut run = Run::new(seed);
        for _ in 0..steps {
            run.step();
        }
    }
}

/// Purges, admin actions and counted requests on several threads at once, with the store
/// writing meanwhile: whatever the interleaving, the store ends holding exactly the users
/// the cache holds, with the same lifecycle fields and counts (a purge's removal is never
/// undone by a write of an edit it raced with, and never left unwritten).
#[test]
fn concurrent_purges_and_edits_leave_the_store_equal_to_the_cache() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.db");
    let backend: Arc<dyn StoreBackend> = Arc::new(SqliteStore::open(&path).unwrap());
    let cache = Arc::new(UserCache::default());
    let engine = SyncEngine::new(
        Arc::clone(&backend),
        StoreStatus::new("sqlite", Arc::clone(&cache)),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let now = T0 + 100 * HOUR;
    let after = Duration::from_secs(48 * 3600);
    let seed = env_u64("TOLLGATE_MODEL_SEED").unwrap_or(1);
    let rounds = env_u64("TOLLGATE_MODEL_STEPS").unwrap_or(3000);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let admins: Vec<_> = (0..3)
            .map(|i| {
                let cache = &cache;
                scope.spawn(move || {
                    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(i));
                    for _ in 0..rounds {
                        concurrent_admin_step(&mut rng, cache, now);
                    }
                })
            })
            .collect();
        let purger = scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                purge_temporary_users(&cache, now, after);
                std::thread::yield_now();
            }
        });
        while admins.iter().any(|a| !a.is_finished()) {
            runtime.block_on(engine.flush()).unwrap();
        }
        for admin in admins {
            admin.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        purger.join().unwrap();
    });
    runtime.block_on(engine.flush()).unwrap();
    let in_cache: BTreeMap<String, Expected> = cache
        .snapshot()
        .iter()
        .map(|u| (u.token.clone(), Expected::of(u)))
        .collect();
    let stored = runtime.block_on(backend.load_all()).unwrap();
    let in_store: BTreeMap<String, Expected> = stored
        .iter()
        .map(|u| (u.token.clone(), Expected::of(u)))
        .collect();
    assert_eq!(in_store, in_cache, "seed {seed}");
}

/// One admin action or counted request of [`concurrent_purges_and_edits_leave_the_store_equal_to_the_cache`].
fn concurrent_admin_step(rng: &mut Rng, cache: &UserCache, now: u64) {
    let token = *pick(rng, &TOKENS);
    let expired = T0;
    let live = T0 + 200 * HOUR;
    match rng.below(6) {
        0 => {
            let mut user = User::new(token.into(), *pick(rng, &TYPES), now);
            user.expires_at = Some(*pick(rng, &[expired, live]));
            let _ = cache.create(&user);
        }
        1 | 2 => {
            let body = match rng.below(4) {
                0 => json!({"expiresAt": *pick(rng, &[expired, live])}),
                1 => json!({"type": *pick(rng, &["normal", "special", "temporary"])}),
                2 => json!({"disabledAt": *pick(rng, &[json!(null), json!(T0)])}),
                _ => json!({"promptCount": rng.below(3)}),
            };
            let patch: UserPatch = serde_json::from_value(body).unwrap();
            cache.upsert(token, &patch, now);
        }
        3 => {
            let _ = cache.disable(token, Some("bye"), now);
        }
        4 => {
            let _ = cache.remove(token);
        }
        _ => {
            if let Some(record) = cache.get(token) {
                cache.count_request(&record, now);
            }
        }
    }
}
