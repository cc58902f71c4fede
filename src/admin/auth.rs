//! Admin authentication: the optional CIDR allow list, then `Authorization: Bearer <ADMIN_KEY>`
//! compared in constant time. Repeated failures lock the IP out for a while (15 minutes by
//! default); unlike the older proxy the lock expires and failures are forgotten after it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::http::ApiError;
use crate::net::CidrSet;
use crate::proxy::credential::bearer;
use crate::secret::Secret;

/// Entries kept before stale ones are swept.
const SWEEP_ABOVE: usize = 10_000;

pub struct AdminAuth {
    key: Option<Secret>,
    /// `None` = any address; `Some(empty)` = nobody (an explicitly empty `ADMIN_WHITELIST`).
    allow: Option<CidrSet>,
    max_failures: u32,
    lockout: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
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
        allow: Option<CidrSet>,
        max_failures: u32,
        lockout: Duration,
    ) -> Self {
        Self {
            key,
            allow,
            max_failures,
            lockout,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may reach admin endpoints at all (`ADMIN_WHITELIST`).
    pub fn allowed(&self, ip: IpAddr) -> Result<(), ApiError> {
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
            return Err(ApiError::new(
                401,
                "unauthorized",
                "the admin API is disabled: ADMIN_KEY is not set",
            ));
        };
        let presented = authorization.and_then(bearer);
        if presented.is_some_and(|p| key.matches(p)) {
            self.failures.lock().remove(&ip);
            return Ok(());
        }
        self.record_failure(ip, now);
        Err(ApiError::new(
            401,
            "unauthorized",
            "send the admin key as 'Authorization: Bearer <ADMIN_KEY>'",
        ))
    }

    fn locked_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock();
        let until = failures.get(&ip)?.locked_until?;
        (until > now).then(|| until - now)
    }

    fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.failures.lock();
        if failures.len() > SWEEP_ABOVE {
            let lockout = self.lockout;
            failures.retain(|_, f| {
                now.duration_since(f.last) < lockout || f.locked_until.is_some_and(|u| u > now)
            });
        }
        let entry = failures.entry(ip).or_insert(Failures {
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
            entry.locked_until = Some(now + self.lockout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `allow` as `ADMIN_WHITELIST`; `""` here means unset (any address).
    fn auth(allow: &str) -> AdminAuth {
        AdminAuth::new(
            Secret::new("sekrit"),
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
        let a = AdminAuth::new(None, None, 5, Duration::from_secs(1));
        assert_eq!(
            a.authorize(ip(), Some(b"Bearer anything"), Instant::now())
                .unwrap_err()
                .status,
            401
        );
    }
}
