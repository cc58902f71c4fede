//! Resident memory per cached user, measured (not estimated): fills the real `UserCache` with
//! users created the way `POST /admin/users` creates them (uuid v4 tokens, `User::new`
//! defaults, `meta: {}`), lets the store sync take and confirm the changes as it would, and
//! reads `VmRSS` from `/proc/self/status` before and after.
//!
//! `cargo bench --bench memory` uses 1,000,000 users (`USERS=n` overrides); `cargo test
//! --benches` (CI) runs it with 10,000 so that it keeps compiling and running.

use std::sync::Arc;
use std::time::Instant;

use tollgate::clock::now_ms;
use tollgate::users::{User, UserCache, UserType};

// The same allocator as the tollgate binary: its size classes are part of what is measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Per-user budget at 1,000,000 users (issue 5).
const TARGET_BYTES_PER_USER: f64 = 400.0;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let users: usize = std::env::var("USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 1_000_000 } else { 10_000 });

    // Tokens are made (and freed) first, in chunks, so that only the cache's own copies count.
    let cache = Arc::new(UserCache::default());
    let before = rss_bytes();
    let started = Instant::now();
    let now = now_ms();
    let mut created = 0;
    while created < users {
        let chunk = (users - created).min(10_000);
        for _ in 0..chunk {
            let user = User::new(uuid::Uuid::new_v4().to_string(), UserType::Normal, now);
            cache.create(&user).expect("uuid v4 tokens do not collide");
        }
        // What the store sync does after each flush: take the queued changes, confirm them.
        let taken = cache.take_changes(usize::MAX);
        cache.acknowledge(&taken.changes, true);
        created += chunk;
    }
    let fill = started.elapsed();
    let after = rss_bytes();
    assert_eq!(cache.len(), users);
    let per_user = (after.saturating_sub(before)) as f64 / users as f64;
    println!(
        "memory: {users} users cached in {:.2} s; VmRSS {:.1} MiB -> {:.1} MiB: {per_user:.0} bytes per user (target < {TARGET_BYTES_PER_USER:.0} at 1,000,000)",
        fill.as_secs_f64(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
    );
    // What each user is made of, for reading the figure (the allocator rounds each up).
    println!(
        "memory: per user: UserRecord {} B and Profile {} B (each in an Arc: +16 B), token {} B + 16 B (Arc<str>), and a slot of the map's table (record pointer and token word, 16 B, in 128-byte buckets of 7 kept at most 3/4 full)",
        std::mem::size_of::<tollgate::users::UserRecord>(),
        std::mem::size_of::<tollgate::users::profile::Profile>(),
        36,
    );
    if measuring && users >= 1_000_000 {
        println!(
            "memory: target {}",
            if per_user < TARGET_BYTES_PER_USER {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    drop(cache);
}
