//! Store benchmarks: the SQLite start-up load (in process, and the real binary until `/ready`
//! answers 200) and the admin bulk import, at the sizes the issue names (1,000,000 users
//! loaded, 100,000 imported), and a steady-state counter flush. Results: `docs/performance.md`.
//!
//! ```text
//! cargo bench --bench store                    # full size
//! TOLLGATE_BENCH_USERS=20000 cargo bench --bench store -- --quick
//! cargo test --benches                         # CI: each benchmark once, on 2,000 users
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use tollgate::store::sqlite::{SqliteStore, BATCH_USERS};
use tollgate::store::{StoreBackend, StoreStatus, SyncEngine};
use tollgate::users::{User, UserCache, UserPatch, UserType};

/// Full sizes under `cargo bench`; small ones when `cargo test --benches` runs each once.
fn sizes() -> (usize, usize) {
    let benching = std::env::args().any(|a| a == "--bench");
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
    };
    let load = env("TOLLGATE_BENCH_USERS").unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let import =
        env("TOLLGATE_BENCH_IMPORT_USERS").unwrap_or(if benching { 100_000 } else { 1_000 });
    (load, import)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A user as the older proxy's users look after some use.
fn realistic_user(i: usize) -> User {
    let mut user = User::new(
        format!(
            "{:08x}-2a55-4f6e-9d7a-{:012x}",
            i,
            i.wrapping_mul(2_654_435_761)
        ),
        if i.is_multiple_of(50) {
            UserType::Special
        } else {
            UserType::Normal
        },
        1_700_000_000_000 + i as u64,
    );
    user.ip = vec![format!(
        "10.{}.{}.{}",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )];
    user.prompt_count = (i % 997) as u64;
    user.last_used_at = Some(1_710_000_000_000 + i as u64);
    user.token_counts.insert(
        "turbo".into(),
        tollgate::users::model::JsNumber((i % 5000) as f64),
    );
    if i.is_multiple_of(10) {
        user.nickname = Some(format!("user {i}"));
    }
    user
}

fn engine(store: Arc<SqliteStore>, cache: &Arc<UserCache>) -> SyncEngine {
    let status = StoreStatus::new("sqlite", Arc::clone(cache));
    SyncEngine::new(
        store as Arc<dyn StoreBackend>,
        status,
        Duration::from_secs(3600),
        Duration::from_secs(5),
    )
    .with_batch_users(BATCH_USERS)
}

/// Writes `n` users to a new file through the store itself.
fn populate(path: &Path, n: usize) {
    let rt = runtime();
    let store = Arc::new(SqliteStore::open(path).unwrap());
    let cache = Arc::new(UserCache::with_capacity(n));
    let engine = engine(store, &cache);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        for &i in chunk {
            cache.create(&realistic_user(i)).unwrap();
        }
        rt.block_on(engine.flush()).unwrap();
    }
}

/// The start-up path of `main.rs`: open (check and migrate), load every user, fill the cache.
fn load(c: &mut Criterion) {
    let (n, _) = sizes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.db");
    populate(&path, n);
    let rt = runtime();
    let mut group = c.benchmark_group("sqlite");
    group.sample_size(10);
    group.bench_function(format!("startup_load_{n}_users"), |b| {
        // The cache is dropped outside the measurement: start-up never frees it.
        b.iter_with_large_drop(|| {
            let store = SqliteStore::open(&path).unwrap();
            let users = rt.block_on(store.load_all()).unwrap();
            let cache = UserCache::with_capacity(users.len());
            assert_eq!(cache.load(users), n);
            cache
        })
    });
    // The real binary on the same file: from exec until `/ready` answers 200.
    group.bench_function(format!("binary_startup_{n}_users"), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| time_binary_startup(dir.path(), &path))
                .sum()
        })
    });
    group.finish();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `GET /ready`; its status, if tollgate answered.
fn ready_status(admin: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
    stream
        .write_all(b"GET /ready HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Starts `tollgate` on `db`, waits for `/ready` = 200, stops it; the time to ready.
fn time_binary_startup(dir: &Path, db: &Path) -> Duration {
    let (proxy, admin) = (free_port(), free_port());
    let config = dir.join("startup.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [\"127.0.0.1:{proxy}\"]\nupstream:\n  addrs: [\"127.0.0.1:9\"]\n\
             admin:\n  listen: \"127.0.0.1:{admin}\"\n\
             pingora:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n\
             store:\n  kind: sqlite\n  sqlite:\n    path: {}\n",
            db.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("-c")
        .arg(&config)
        .env("ADMIN_KEY", "bench-admin-key-0123456789")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(60);
    while ready_status(admin) != Some(200) {
        assert!(Instant::now() < deadline, "tollgate did not become ready");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("tollgate exited during start-up: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().unwrap();
    elapsed
}

/// `PUT /admin/users` with `n` new users: the cache applies the patches, then the engine
/// writes them to a new file (the admin answers once that is durable).
fn import(c: &mut Criterion) {
    let (_, n) = sizes();
    let rt = runtime();
    let items: Vec<(String, UserPatch)> = (0..n)
        .map(|i| {
            let user = realistic_user(i);
            let mut patch: UserPatch =
                serde_json::from_value(serde_json::to_value(&user).unwrap()).unwrap();
            patch.token = Default::default();
            (user.token, patch)
        })
        .collect();
    let mut group = c.benchmark_group("sqlite");
    group.sample_size(10);
    group.bench_function(format!("bulk_import_{n}_users"), |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(SqliteStore::open(&dir.path().join("import.db")).unwrap());
                let cache = Arc::new(UserCache::default());
                let engine = engine(store, &cache);
                (dir, cache, engine)
            },
            |(dir, cache, engine)| {
                let (users, _ticket) = cache.upsert_many(&items, 1_700_000_000_000);
                assert_eq!(users.len(), n);
                rt.block_on(engine.flush()).unwrap();
                dir
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// A steady-state flush: `n / 10` users each counted some requests since the last flush.
fn flush_counters(c: &mut Criterion) {
    let (_, n) = sizes();
    let active = (n / 10).max(1);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counters.db");
    populate(&path, active);
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let cache = Arc::new(UserCache::default());
    cache.load(rt.block_on(store.load_all()).unwrap());
    let engine = engine(store, &cache);
    let records: Vec<_> = (0..active)
        .map(|i| cache.get(&realistic_user(i).token).unwrap())
        .collect();
    let mut group = c.benchmark_group("sqlite");
    group.sample_size(20);
    group.bench_function(format!("flush_counters_of_{active}_users"), |b| {
        b.iter_batched(
            || {
                for r in &records {
                    cache.count_request(r, 1_720_000_000_000);
                }
            },
            |()| rt.block_on(engine.flush()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, load, import, flush_counters);
criterion_main!(benches);
