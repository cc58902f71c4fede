//! Microbenchmarks of the proxy's hot path and of the admin bulk import.
//!
//! `cargo bench --bench decision` measures; `cargo test --benches` (CI) runs every benchmark
//! once with small user counts so that they keep compiling and running.
//!
//! - `decision/user_token/N`: `Proxy::decide`, the whole admission decision of
//!   `request_filter` (client IP, credential extraction from the `RequestHeader`, user cache
//!   lookup, IP check, auth-failure and rate-limit checks), for a uniformly random user among
//!   N cached ones (1,000, 100,000, 1,000,000) whose IP is already recorded and who has made
//!   a request from it before (steady state: every user is admitted once before measuring).
//! - `decision/user_token_1000_active/1000000`: the same 1,000,000 cached users, requests from
//!   1,000 of them: the cost of the cache's size apart from that of the working set's.
//! - `decision/8_threads_during_import/100000`: the same with 8 threads deciding at once while
//!   another thread keeps bulk-importing users; the time is wall time per decision.
//! - `admin/bulk_import/100000`: `PUT /admin/users` with 100,000 new users: JSON parsing,
//!   validation, cache inserts and the JSON reply.
//! - `rate_limit/window_start/SLOTS`: the check of the first request of a new window, which
//!   clears the half of the sketch that becomes the current window (`estimator_slots` = 131,072,
//!   the default, and 1,048,576); the request that does it waits that long.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use pingora::http::RequestHeader;
use pingora::proxy::ProxyHttp;
use tollgate::admin::users::UsersApi;
use tollgate::clock::now_ms;
use tollgate::config::Config;
use tollgate::observe::Metrics;
use tollgate::proxy::Proxy;
use tollgate::store::StoreStatus;
use tollgate::users::{User, UserCache, UserPatch, UserType};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

/// `cargo bench` passes `--bench`; `cargo test --benches` does not (criterion's test mode).
fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test")
}

/// A small, fast generator (xorshift); the benchmark needs spread, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn tokens(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// What the admin API creates, with the benchmark client's IP already recorded.
fn user(token: &str) -> User {
    let mut user = User::new(token.to_string(), UserType::Normal, now_ms());
    user.ip = vec![CLIENT.to_string()];
    user
}

/// tollgate in `user_token` mode with rate limiting on (high enough never to refuse).
fn proxy(cache: Arc<UserCache>) -> Proxy {
    let yaml = "listen: [\"127.0.0.1:7860\"]\n\
                upstream:\n  addrs: [\"127.0.0.1:8080\"]\n\
                gatekeeper:\n  mode: user_token\n\
                rate_limit:\n  requests_per_minute: 1000000000\n\
                store:\n  kind: memory\n";
    let env: HashMap<String, String> = [("ADMIN_KEY".to_string(), "bench-admin-key".to_string())]
        .into_iter()
        .collect();
    let config = Config::from_yaml(yaml, "bench", &env).expect("valid configuration");
    let metrics = Arc::new(Metrics::new("user_token", "memory"));
    let status = StoreStatus::new("memory", Arc::clone(&cache));
    Proxy::new(&config, cache, status, metrics, None)
}

fn request(token: &str) -> RequestHeader {
    let mut req = RequestHeader::build("POST", b"/v1/chat/completions", Some(4)).unwrap();
    req.append_header("host", "api.example.com").unwrap();
    req.append_header("authorization", format!("Bearer {token}"))
        .unwrap();
    req.append_header("content-type", "application/json")
        .unwrap();
    req
}

/// One request's admission, as `request_filter` makes it.
#[inline]
fn decide(proxy: &Proxy, req: &RequestHeader) {
    let mut ctx = proxy.new_ctx();
    let outcome = proxy.decide(req, CLIENT, now_ms(), &mut ctx);
    assert!(outcome.is_ok(), "the benchmark's requests are all admitted");
    black_box(&ctx);
}

/// Steady state: every user made a request from its IP since the start (what a restart
/// forgets), as any user that sends traffic has. One request, its credential replaced for each
/// user: a million requests built at once would leave the heap unlike a proxy's.
fn warm_up(proxy: &Proxy, tokens: &[String]) {
    let mut req = request("");
    for token in tokens {
        req.insert_header("authorization", format!("Bearer {token}"))
            .unwrap();
        decide(proxy, &req);
    }
}

fn decision(c: &mut Criterion) {
    let sizes: &[usize] = if measuring() {
        &[1_000, 100_000, 1_000_000]
    } else {
        &[1_000]
    };
    let mut group = c.benchmark_group("decision/user_token");
    let mut largest = None;
    for &n in sizes {
        let tokens = tokens(n);
        let cache = Arc::new(UserCache::default());
        cache.load(tokens.iter().map(|t| user(t)));
        let proxy = proxy(Arc::clone(&cache));
        warm_up(&proxy, &tokens);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_batched_ref(
                || request(&tokens[rng.below(n)]),
                |req| decide(&proxy, req),
                BatchSize::SmallInput,
            )
        });
        largest = Some((proxy, tokens));
    }
    group.finish();
    if let Some((proxy, tokens)) = largest {
        active_users(c, &proxy, &tokens);
    }
}

/// The largest cache again, with requests from only [`ACTIVE`] of its users (uniformly random
/// among them): what the decision costs when the users sending traffic fit in the CPU caches,
/// however many are cached. Against `decision/user_token/1000` it tells the cost of the cache's
/// size from the cost of the working set's.
fn active_users(c: &mut Criterion, proxy: &Proxy, tokens: &[String]) {
    const ACTIVE: usize = 1_000;
    let active = &tokens[..ACTIVE.min(tokens.len())];
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut group = c.benchmark_group("decision/user_token_1000_active");
    group.bench_with_input(
        BenchmarkId::from_parameter(tokens.len()),
        &active,
        |b, active| {
            b.iter_batched_ref(
                || request(&active[rng.below(active.len())]),
                |req| decide(proxy, req),
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
}

/// Imports batches of new users until `stop`, as an admin bulk import (then the store sync)
/// would, removing them again once 100,000 are in so that memory stays bounded.
fn importer(cache: &UserCache, stop: &AtomicBool, batch: usize) -> usize {
    let mut imported = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut added = Vec::new();
        while added.len() < 100_000 && !stop.load(Ordering::Relaxed) {
            let items: Vec<(String, UserPatch)> = tokens(batch)
                .into_iter()
                .map(|t| (t, UserPatch::default()))
                .collect();
            cache.upsert_many(&items, now_ms());
            let taken = cache.take_changes(usize::MAX);
            cache.acknowledge(&taken.changes, true);
            imported += items.len();
            added.extend(items.into_iter().map(|(t, _)| t));
        }
        for token in &added {
            let _ = cache.remove(token);
        }
        let taken = cache.take_changes(usize::MAX);
        cache.acknowledge(&taken.changes, true);
    }
    imported
}

fn decision_under_import(c: &mut Criterion) {
    const THREADS: usize = 8;
    let n = if measuring() { 100_000 } else { 1_000 };
    let batch = if measuring() { 1_000 } else { 100 };
    let tokens = tokens(n);
    let cache = Arc::new(UserCache::default());
    cache.load(tokens.iter().map(|t| user(t)));
    let proxy = proxy(Arc::clone(&cache));
    warm_up(&proxy, &tokens);
    // Per thread, requests for 4,096 random users, cycled.
    let requests: Vec<Vec<RequestHeader>> = (0..THREADS)
        .map(|i| {
            let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ (i as u64 + 1));
            (0..4096).map(|_| request(&tokens[rng.below(n)])).collect()
        })
        .collect();
    let stop = AtomicBool::new(false);
    let measured = AtomicBool::new(false);
    std::thread::scope(|s| {
        let import = s.spawn(|| importer(&cache, &stop, batch));
        let mut group = c.benchmark_group("decision/8_threads_during_import");
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                measured.store(true, Ordering::Relaxed);
                let per_thread = iters.div_ceil(THREADS as u64) as usize;
                let start = Instant::now();
                std::thread::scope(|t| {
                    for reqs in &requests {
                        let proxy = &proxy;
                        t.spawn(move || {
                            for req in reqs.iter().cycle().take(per_thread) {
                                decide(proxy, req);
                            }
                        });
                    }
                });
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_thread * THREADS) as f64)
            })
        });
        group.finish();
        stop.store(true, Ordering::Relaxed);
        let imported = import.join().expect("importer");
        // (A filter on the command line may have skipped this benchmark.)
        assert!(
            imported > 0 || !measured.load(Ordering::Relaxed),
            "the import ran during the benchmark"
        );
    });
}

fn bulk_import(c: &mut Criterion) {
    let n = if measuring() { 100_000 } else { 1_000 };
    let users: Vec<serde_json::Value> = tokens(n)
        .into_iter()
        .map(|t| serde_json::json!({ "token": t, "meta": {} }))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "users": users })).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("admin/bulk_import");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
        b.iter_batched(
            || {
                let cache = Arc::new(UserCache::default());
                let status = StoreStatus::new("memory", Arc::clone(&cache));
                // Nothing confirms writes here: answer 202 at once instead of waiting.
                let api = UsersApi::new(cache, status, Duration::ZERO);
                // The request body is the handler's to keep (it is parsed on another thread).
                (api, body.clone())
            },
            |(api, body)| {
                let reply = runtime.block_on(api.upsert_many(body)).expect("import");
                assert_eq!(api.cache().len(), n);
                black_box(reply);
                api
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn window_start(c: &mut Criterion) {
    use tollgate::proxy::rate_limit::SlidingWindowLimiter;
    let mut group = c.benchmark_group("rate_limit/window_start");
    for slots in [131_072, 1_048_576] {
        let limiter = SlidingWindowLimiter::new(1_000, Duration::from_secs(60), slots);
        let mut now = now_ms();
        group.bench_function(BenchmarkId::from_parameter(slots), |b| {
            b.iter(|| {
                // Every check is a window later than the one before: each starts a window.
                now += 60_000;
                black_box(limiter.check_and_count(black_box(42), now))
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    decision,
    decision_under_import,
    bulk_import,
    window_start
);
criterion_main!(benches);
