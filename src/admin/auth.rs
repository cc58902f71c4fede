//! Admin authentication: the IP block list (`IP_BLACKLIST`, which the older proxy applied to
//! every route, `/admin` included) and the optional CIDR allow list, then
//! `Authorization: Bearer <ADMIN_KEY>`
//! compared in constant time. Repeated failures lock the IP out for a while (15 minutes by
//! default); unlike the older proxy the lock expires and failures are forgotten after it. IPv6
//! clients count by their /64, and the table of failures is bounded.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::http::ApiError;
use crate::net::CidrSet;
use crate::proxy::credential::bearer;
use crate::secret::Secret;

/// Most addresses (or IPv6 /64s) whose failures are remembered. Past it the entry whose last
/// failure is oldest is forgotten, so rotating addresses cannot grow the table (or the cost of
/// a failure) without bound; a client with this many addresses gains little from a lockout.
const MAX_TRACKED: usize = 10_000;

pub struct AdminAuth {
    key: Option<Secret>,
    /// `ip_blocklist` / `IP_BLACKLIST`: refused before the allow list is consulted.
    blocklist: CidrSet,
    /// `None` = any address; `Some(empty)` = nobody (an explicitly empty `ADMIN_WHITELIST`).
    allow: Option<CidrSet>,
    max_failures: u32,
    lockout: Duration,
    failures: Mutex<FailureTable>,
}

/// Failures by throttle key, with the keys in the order of their last failure so that expired
/// and oldest entries are dropped from the front in amortised O(1), never by a full sweep.
#[derive(Default)]
struct FailureTable {
    entries: HashMap<IpAddr, Failures>,
    /// `(key, failure time)`, oldest first. An item whose time is not its entry's `last` (the
    /// key failed again later, succeeded, or was dropped) is stale and skipped.
    order: VecDeque<(IpAddr, Instant)>,
    max_entries: usize,
}

impl FailureTable {
    fn with_max_entries(max_entries: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            ..Self::default()
        }
    }

    fn is_live(&self, key: IpAddr, at: Instant) -> bool {
        self.entries.get(&key).is_some_and(|f| f.last == at)
    }

    /// Drops stale items and entries whose last failure is a lockout old (their count would
    /// restart and any lock has ended) from the front of the order.
    fn expire(&mut self, now: Instant, lockout: Duration) {
        while let Some(&(key, at)) = self.order.front() {
            if self.is_live(key, at) {
                if now.saturating_duration_since(at) < lockout {
                    break;
                }
                self.entries.remove(&key);
            }
            self.order.pop_front();
        }
    }

    /// Makes room for one new key: forgets the entry whose last failure is oldest.
    fn evict_oldest(&mut self) {
        while self.entries.len() >= self.max_entries {
            let Some((key, at)) = self.order.pop_front() else {
                break;
            };
            if self.is_live(key, at) {
                self.entries.remove(&key);
            }
        }
    }

    /// Records that `key` failed at `now`, keeping the order short: repeated failures of one
    /// key leave stale items behind, so the order is rebuilt once it is twice the bound.
    fn touch(&mut self, key: IpAddr, now: Instant) {
        self.order.push_back((key, now));
        if self.order.len() > 2 * self.max_entries {
            let mut live: Vec<(IpAddr, Instant)> =
                self.entries.iter().map(|(k, f)| (*k, f.last)).collect();
            live.sort_by_key(|(_, at)| *at);
            self.order = live.into();
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

impl AdminAuth {
    pub fn new(
        key: Option<Secret>,
        blocklist: CidrSet,
        allow: Option<CidrSet>,
        max_failures: u32,
        lockout: Duration,
    ) -> Self {
        Self {
            key,
            blocklist,
            allow,
            max_failures,
            lockout,
            failures: Mutex::new(FailureTable::with_max_entries(MAX_TRACKED)),
        }
    }

    /// Whether `ip` may reach admin endpoints at all (`IP_BLACKLIST`, then `ADMIN_WHITELIST`).
    pub fn allowed(&self, ip: IpAddr) -> Result<(), ApiError> {
        if !self.blocklist.is_empty() && self.blocklist.contains(ip) {
            return Err(ApiError::new(
                403,
                "forbidden",
                "Forbidden (by IP blocklist)",
            ));
        }
        if self.allow.as_ref().is_none_or(|allow| allow.contains(ip)) {
            Ok(())
        } else {
            Err(ApiError::new(
                403,
                "forbidden",
                "Forbidden (by ADMIN_WHITELIST)",
            ))
        }
    }

    /// Checks the `Authorization` header of a request from `ip`.
    pub fn authorize(
        &self,
        ip: IpAddr,
        authorization: Option<&[u8]>,
        now: Instant,
    ) -> Result<(), ApiError> {
        self.allowed(ip)?;
        if let Some(wait) = self.locked_for(ip, now) {
            let secs = wait.as_secs().max(1);
            return Err(ApiError::new(
                429,
                "too_many_attempts",
                format!("too many failed attempts from this IP; try again in {secs} seconds"),
            )
            .with_header("retry-after", secs));
        }
        let Some(key) = &self.key else {
            return Err(unauthorized(
                "the admin API is disabled: ADMIN_KEY is not set",
            ));
        };
        let presented = authorization.and_then(bearer);
        if presented.is_some_and(|p| key.matches(p)) {
            self.failures
                .lock()
                .entries
                .remove(&crate::net::subscriber(ip));
            return Ok(());
        }
        self.record_failure(ip, now);
        // Which of the two went wrong tells nothing about the key, and saves an operator
        // with a stale key from checking their header's syntax.
        let message = if presented.is_some() {
            "the admin key is not valid"
        } else {
            "send the admin key as 'Authorization: Bearer <ADMIN_KEY>'"
        };
        Err(unauthorized(message))
    }

    fn locked_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock();
        let until = failures
            .entries
            .get(&crate::net::subscriber(ip))?
            .locked_until?;
        (until > now).then(|| until - now)
    }

    fn record_failure(&self, ip: IpAddr, now: Instant) {
        let key = crate::net::subscriber(ip);
        let mut failures = self.failures.lock();
        failures.expire(now, self.lockout);
        if !failures.entries.contains_key(&key) {
            failures.evict_oldest();
        }
        let entry = failures.entries.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: None,
        });
        // Failures decay: a quiet period as long as the lockout starts the count afresh.
        if now.duration_since(entry.last) >= self.lockout
            || entry.locked_until.is_some_and(|u| u <= now)
        {
            entry.count = 0;
            entry.locked_until = None;
        }
        entry.count += 1;
        entry.last = now;
        if entry.count >= self.max_failures {
            if entry.locked_until.is_none() {
                let who = match key {
                    IpAddr::V6(_) => format!("{key}/64"),
                    IpAddr::V4(_) => key.to_string(),
                };
                log::warn!(
                    "admin API: {who} locked out for {} s after {} failed authentications",
                    self.lockout.as_secs(),
                    entry.count
                );
            }
            entry.locked_until = Some(now + self.lockout);
        }
        failures.touch(key, now);
    }
}

/// A 401 with the challenge RFC 9110 (§11.6.1) requires of one: the scheme the key is sent in.
fn unauthorized(message: &str) -> ApiError {
    ApiError::new(401, "unauthorized", message)
        .with_header("www-authenticate", "Bearer realm=\"tollgate admin\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    /// `allow` as `ADMIN_WHITELIST`; `""` here means unset (any address).
    fn auth(allow: &str) -> AdminAuth {
        AdminAuth::new(
            Secret::new("sekrit"),
            CidrSet::default(),
            (!allow.is_empty()).then(|| CidrSet::parse_csv(allow).unwrap()),
            5,
            Duration::from_secs(900),
        )
    }

    const IP: &str = "192.0.2.1";

    fn ip() -> IpAddr {
        IP.parse().unwrap()
    }

    #[test]
    fn a_wrong_key_is_told_apart_from_a_missing_one() {
        let a = auth("");
        let now = Instant::now();
        let wrong = a.authorize(ip(), Some(b"Bearer stale"), now).unwrap_err();
        assert_eq!(
            (wrong.status, wrong.message.as_str()),
            (401, "the admin key is not valid")
        );
        for header in [None, Some(&b"sekrit"[..]), Some(&b"Basic c2Vrcml0"[..])] {
            let missing = a.authorize(ip(), header, now).unwrap_err();
            assert!(
                missing.message.starts_with("send the admin key as"),
                "{header:?}"
            );
        }
    }

    #[test]
    fn the_failure_table_is_bounded_and_forgets_the_oldest() {
        let a = auth("");
        *a.failures.lock() = FailureTable::with_max_entries(100);
        let t0 = Instant::now();
        for i in 0..5 {
            let _ = a.authorize(ip(), Some(b"Bearer x"), t0 + Duration::from_millis(i));
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            a.authorize(ip(), Some(b"Bearer sekrit"), t1)
                .unwrap_err()
                .status,
            429
        );
        // Fewer other addresses than the bound: the lock holds.
        for n in 0..98u32 {
            let other = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            let _ = a.authorize(other, Some(b"Bearer x"), t1);
        }
        assert_eq!(
            a.authorize(ip(), Some(b"Bearer sekrit"), t1)
                .unwrap_err()
                .status,
            429
        );
        // Rotating through many addresses (here IPv6 /64s): the table never exceeds the bound.
        for n in 0..10_000u128 {
            let other = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | (n << 64)));
            let _ = a.authorize(other, Some(b"Bearer x"), t1 + Duration::from_millis(1));
            let table = a.failures.lock();
            assert!(table.entries.len() <= 100, "{}", table.entries.len());
            assert!(table.order.len() <= 200, "{}", table.order.len());
        }
        let table = a.failures.lock();
        let newest = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | (9_999 << 64)));
        assert!(table.entries.contains_key(&newest), "the newest is kept");
        assert!(!table.entries.contains_key(&ip()), "the oldest went first");
    }

    #[test]
    fn expired_entries_are_dropped_without_a_sweep() {
        let a = auth("");
        let t0 = Instant::now();
        for n in 0..50u32 {
            let other = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            let _ = a.authorize(other, Some(b"Bearer x"), t0);
        }
        assert_eq!(a.failures.lock().entries.len(), 50);
        let _ = a.authorize(ip(), Some(b"Bearer x"), t0 + Duration::from_secs(900));
        let table = a.failures.lock();
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.order.len(), 1);
    }

    #[test]
    fn ipv6_clients_are_throttled_by_their_64() {
        let a = auth("");
        let t0 = Instant::now();
        for n in 0..5u16 {
            let addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, n, 1, 2, 3));
            let _ = a.authorize(addr, Some(b"Bearer x"), t0);
        }
        let same_64: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert_eq!(
            a.authorize(same_64, Some(b"Bearer sekrit"), t0)
                .unwrap_err()
                .status,
            429
        );
        let next_64: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert!(a.authorize(next_64, Some(b"Bearer sekrit"), t0).is_ok());
        assert_eq!(a.failures.lock().entries.len(), 1);
        // An IPv4-mapped address is the IPv4 client.
        for _ in 0..5 {
            let _ = a.authorize(ip(), Some(b"Bearer x"), t0);
        }
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            a.authorize(mapped, Some(b"Bearer sekrit"), t0)
                .unwrap_err()
                .status,
            429
        );
        assert_eq!(
            crate::net::subscriber("2001:db8::1".parse().unwrap()),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn right_key_passes_wrong_key_fails() {
        let a = auth("");
        let now = Instant::now();
        assert!(a.authorize(ip(), Some(b"Bearer sekrit"), now).is_ok());
        assert_eq!(
            a.authorize(ip(), Some(b"Bearer nope"), now)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(a.authorize(ip(), None, now).unwrap_err().status, 401);
        assert_eq!(
            a.authorize(ip(), Some(b"sekrit"), now).unwrap_err().status,
            401,
            "scheme required"
        );
    }

    #[test]
    fn five_failures_lock_out_even_the_right_key_then_decay() {
        let a = auth("");
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(
                a.authorize(ip(), Some(b"Bearer x"), t0).unwrap_err().status,
                401
            );
        }
        let locked = a.authorize(ip(), Some(b"Bearer sekrit"), t0).unwrap_err();
        assert_eq!(locked.status, 429);
        assert_eq!(locked.headers[0], ("retry-after", "900".to_string()));
        assert!(
            a.authorize("192.0.2.2".parse().unwrap(), Some(b"Bearer sekrit"), t0)
                .is_ok(),
            "per IP"
        );
        let later = t0 + Duration::from_secs(901);
        assert!(
            a.authorize(ip(), Some(b"Bearer sekrit"), later).is_ok(),
            "lock expires"
        );
    }

    #[test]
    fn old_failures_are_forgotten() {
        let a = auth("");
        let t0 = Instant::now();
        for _ in 0..4 {
            let _ = a.authorize(ip(), Some(b"Bearer x"), t0);
        }
        let later = t0 + Duration::from_secs(900);
        let _ = a.authorize(ip(), Some(b"Bearer x"), later);
        assert!(a.authorize(ip(), Some(b"Bearer sekrit"), later).is_ok());
    }

    /// Failures add up while they keep coming less than a lockout apart, however long ago the
    /// first was (a slow guesser is still locked out); a quiet lockout forgets them.
    #[test]
    fn failures_are_forgotten_after_a_quiet_period_not_one_by_one() {
        let a = auth("");
        let t0 = Instant::now();
        let at = |minutes: u64| t0 + Duration::from_secs(60 * minutes);
        for i in 0..5 {
            let _ = a.authorize(ip(), Some(b"Bearer x"), at(14 * i));
        }
        assert_eq!(
            a.authorize(ip(), Some(b"Bearer sekrit"), at(56))
                .unwrap_err()
                .status,
            429,
            "five failures 14 minutes apart"
        );
        let b = auth("");
        for i in 0..4 {
            let _ = b.authorize(ip(), Some(b"Bearer x"), at(i));
        }
        let _ = b.authorize(ip(), Some(b"Bearer x"), at(18));
        assert!(b.authorize(ip(), Some(b"Bearer sekrit"), at(18)).is_ok());
    }

    #[test]
    fn success_resets_the_count() {
        let a = auth("");
        let t0 = Instant::now();
        for _ in 0..4 {
            let _ = a.authorize(ip(), Some(b"Bearer x"), t0);
        }
        assert!(a.authorize(ip(), Some(b"Bearer sekrit"), t0).is_ok());
        for _ in 0..4 {
            let _ = a.authorize(ip(), Some(b"Bearer x"), t0);
        }
        assert!(a.authorize(ip(), Some(b"Bearer sekrit"), t0).is_ok());
    }

    #[test]
    fn allow_list_is_checked_first() {
        let a = auth("10.0.0.0/8");
        let err = a
            .authorize(ip(), Some(b"Bearer sekrit"), Instant::now())
            .unwrap_err();
        assert_eq!(
            (err.status, err.message.as_str()),
            (403, "Forbidden (by ADMIN_WHITELIST)")
        );
        assert!(a
            .authorize(
                "10.1.1.1".parse().unwrap(),
                Some(b"Bearer sekrit"),
                Instant::now()
            )
            .is_ok());
    }

    #[test]
    fn explicitly_empty_allow_list_refuses_everyone() {
        let a = AdminAuth::new(
            Secret::new("sekrit"),
            CidrSet::default(),
            Some(CidrSet::default()),
            5,
            Duration::from_secs(900),
        );
        for addr in ["192.0.2.1", "127.0.0.1", "::1"] {
            let err = a
                .authorize(
                    addr.parse().unwrap(),
                    Some(b"Bearer sekrit"),
                    Instant::now(),
                )
                .unwrap_err();
            assert_eq!(err.status, 403, "{addr}");
        }
    }

    #[test]
    fn missing_admin_key_refuses_everything() {
        let a = AdminAuth::new(None, CidrSet::default(), None, 5, Duration::from_secs(1));
        assert_eq!(
            a.authorize(ip(), Some(b"Bearer anything"), Instant::now())
                .unwrap_err()
                .status,
            401
        );
    }

    #[test]
    fn the_block_list_refuses_before_the_allow_list_and_the_key() {
        let a = AdminAuth::new(
            Secret::new("sekrit"),
            CidrSet::parse_csv("192.0.2.0/24").unwrap(),
            None,
            5,
            Duration::from_secs(900),
        );
        let err = a
            .authorize(ip(), Some(b"Bearer sekrit"), Instant::now())
            .unwrap_err();
        assert_eq!(err.status, 403);
        assert!(a
            .authorize(
                "198.51.100.1".parse().unwrap(),
                Some(b"Bearer sekrit"),
                Instant::now()
            )
            .is_ok());
    }
}
