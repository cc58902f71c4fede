//! Who may pass: the older proxy's decision flow (contract §2.3), with its bugs fixed:
//! constant-time key checks, expiry checked at request time, auto-ban that records why.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{GatekeeperConfig, GatekeeperMode, Secrets};
use crate::secret::Secret;
use crate::users::{IpAdmission, Lookup, UserCache, UserRecord, UserType};

/// The reason recorded when auto-ban disables a user.
pub const AUTO_BAN_REASON: &str = "IP address limit exceeded.";

/// Who the request is from, once admitted.
#[derive(Clone)]
pub enum Identity {
    /// No user: `none` mode, `PROXY_KEY`, or `ADMIN_KEY`. Limited per client IP.
    Anonymous,
    User(Arc<UserRecord>),
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no credential at all.
    MissingToken,
    /// 401: a credential that matches nothing.
    UnknownToken,
    /// 403: the user is disabled; carries the message shown to the client.
    Disabled(String),
    /// 403: a new IP beyond the user's limit (not recorded).
    IpLimit,
    /// 403: a new IP beyond the limit, and auto-ban just disabled the user.
    IpLimitBanned,
    /// 403: a temporary user past `expiresAt`.
    Expired,
}

pub struct Gatekeeper {
    mode: GatekeeperMode,
    admin_key: Option<Secret>,
    proxy_key: Option<Secret>,
    max_ips_per_user: u32,
    max_recorded_ips: u32,
    auto_ban: bool,
    cache: Arc<UserCache>,
}

impl Gatekeeper {
    pub fn new(config: &GatekeeperConfig, secrets: &Secrets, cache: Arc<UserCache>) -> Self {
        Self {
            mode: config.mode,
            admin_key: secrets.admin_key.clone(),
            proxy_key: secrets.proxy_key.clone(),
            max_ips_per_user: config.max_ips_per_user,
            max_recorded_ips: config.max_recorded_ips,
            auto_ban: config.max_ips_auto_ban,
            cache,
        }
    }

    pub fn mode(&self) -> GatekeeperMode {
        self.mode
    }

    /// Decides for one request. `token` is the credential found, if any.
    #[inline]
    pub fn admit(&self, token: Option<&str>, ip: IpAddr, now_ms: u64) -> Result<Identity, Refusal> {
        self.admit_with(token, None, ip, now_ms)
    }

    /// [`admit`](Self::admit), with the user's lookup already started: `lookup` is
    /// `UserCache::lookup` of this very `token` (or `None`: it is looked up here).
    #[inline]
    pub fn admit_with(
        &self,
        token: Option<&str>,
        lookup: Option<Lookup<'_>>,
        ip: IpAddr,
        now_ms: u64,
    ) -> Result<Identity, Refusal> {
        if let (Some(token), Some(admin)) = (token, &self.admin_key) {
            if admin.matches(token) {
                return Ok(Identity::Anonymous);
            }
        }
        match self.mode {
            GatekeeperMode::None => Ok(Identity::Anonymous),
            GatekeeperMode::ProxyKey => match (token, &self.proxy_key) {
                (None, _) => Err(Refusal::MissingToken),
                (Some(t), Some(key)) if key.matches(t) => Ok(Identity::Anonymous),
                _ => Err(Refusal::UnknownToken),
            },
            GatekeeperMode::UserToken => {
                let token = token.ok_or(Refusal::MissingToken)?;
                // A keyed-hash lookup: its timing says nothing about stored tokens.
                let record = match lookup {
                    Some(lookup) => lookup.get(),
                    None => self.cache.get(token),
                };
                self.admit_user(record.ok_or(Refusal::UnknownToken)?, ip, now_ms)
            }
        }
    }

    fn admit_user(
        &self,
        record: Arc<UserRecord>,
        ip: IpAddr,
        now_ms: u64,
    ) -> Result<Identity, Refusal> {
        // The common case, a user neither disabled nor expiring who comes from the address
        // it came from last time, is answered from the record's admission word: the profile
        // is not read.
        let admission = record.admission();
        if !admission.disabled() && !admission.expires() && record.knows_ip(ip, admission) {
            return Ok(Identity::User(record));
        }
        let (_, profile, known) = record.profile_with_ip(ip);
        if profile.disabled_at.is_some() {
            // The older proxy's `disabledReason || "User token disabled"`: an empty reason
            // falls back too, so the message is never a bare "Forbidden: ".
            let reason = profile
                .disabled_reason()
                .filter(|r| !r.is_empty())
                .unwrap_or("User token disabled");
            return Err(Refusal::Disabled(format!("Forbidden: {reason}")));
        }
        if profile.is_expired(now_ms) {
            return Err(Refusal::Expired);
        }
        let exempt = profile.user_type == UserType::Special;
        // Per-user maxIps overrides the global limit; 0 means unlimited, not "use the global".
        let limit = if exempt {
            0
        } else {
            profile.max_ips.unwrap_or(self.max_ips_per_user)
        };
        drop(profile);
        if known {
            return Ok(Identity::User(record));
        }
        match self
            .cache
            .admit_ip(&record, ip, limit, self.max_recorded_ips)
        {
            IpAdmission::Known | IpAdmission::Added | IpAdmission::Unrecorded => {
                Ok(Identity::User(record))
            }
            IpAdmission::OverLimit if self.auto_ban => {
                self.cache.ban_for_ips(&record, ip, AUTO_BAN_REASON, now_ms);
                Err(Refusal::IpLimitBanned)
            }
            IpAdmission::OverLimit => Err(Refusal::IpLimit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::User;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn gate(mode: GatekeeperMode, max_ips: u32, auto_ban: bool) -> (Gatekeeper, Arc<UserCache>) {
        gate_recording(mode, max_ips, auto_ban, 1000)
    }

    fn gate_recording(
        mode: GatekeeperMode,
        max_ips: u32,
        auto_ban: bool,
        max_recorded_ips: u32,
    ) -> (Gatekeeper, Arc<UserCache>) {
        let cache = Arc::new(UserCache::default());
        let config = GatekeeperConfig {
            mode,
            max_ips_per_user: max_ips,
            max_ips_auto_ban: auto_ban,
            max_recorded_ips,
        };
        let secrets = Secrets {
            proxy_key: Secret::new("pk"),
            admin_key: Secret::new("ak"),
        };
        (Gatekeeper::new(&config, &secrets, cache.clone()), cache)
    }

    fn add(cache: &UserCache, token: &str, edit: impl FnOnce(&mut User)) {
        let mut u = User::new(token.into(), UserType::Normal, 1);
        edit(&mut u);
        cache.load([u]);
    }

    fn refusal(r: Result<Identity, Refusal>) -> Refusal {
        r.err().expect("refused")
    }

    #[test]
    fn none_mode_admits_everyone() {
        let (g, _) = gate(GatekeeperMode::None, 0, false);
        assert!(g.admit(None, ip(1), 0).is_ok());
        assert!(g.admit(Some("whatever"), ip(1), 0).is_ok());
    }

    #[test]
    fn proxy_key_mode() {
        let (g, _) = gate(GatekeeperMode::ProxyKey, 0, false);
        assert!(g.admit(Some("pk"), ip(1), 0).is_ok());
        assert_eq!(
            refusal(g.admit(Some("pk2"), ip(1), 0)),
            Refusal::UnknownToken
        );
        assert_eq!(refusal(g.admit(None, ip(1), 0)), Refusal::MissingToken);
    }

    #[test]
    fn admin_key_passes_in_every_mode() {
        for mode in [
            GatekeeperMode::None,
            GatekeeperMode::ProxyKey,
            GatekeeperMode::UserToken,
        ] {
            let (g, _) = gate(mode, 0, false);
            assert!(matches!(
                g.admit(Some("ak"), ip(1), 0),
                Ok(Identity::Anonymous)
            ));
        }
    }

    #[test]
    fn user_token_mode_looks_users_up() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 0, false);
        add(&cache, "u1", |_| {});
        assert!(matches!(
            g.admit(Some("u1"), ip(1), 0),
            Ok(Identity::User(_))
        ));
        assert_eq!(
            refusal(g.admit(Some("u2"), ip(1), 0)),
            Refusal::UnknownToken
        );
        assert_eq!(refusal(g.admit(None, ip(1), 0)), Refusal::MissingToken);
        assert_eq!(
            refusal(g.admit(Some("pk"), ip(1), 0)),
            Refusal::UnknownToken,
            "PROXY_KEY is not a user"
        );
    }

    #[test]
    fn disabled_user_gets_reason() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 0, false);
        add(&cache, "u", |u| {
            u.disabled_at = Some(1);
            u.disabled_reason = Some("abuse".into());
        });
        add(&cache, "v", |u| u.disabled_at = Some(1));
        // `special` exempts from limits, not from being disabled (as in the older proxy).
        add(&cache, "s", |u| {
            u.user_type = UserType::Special;
            u.disabled_at = Some(1);
        });
        assert_eq!(
            refusal(g.admit(Some("u"), ip(1), 0)),
            Refusal::Disabled("Forbidden: abuse".into())
        );
        assert_eq!(
            refusal(g.admit(Some("s"), ip(1), 0)),
            Refusal::Disabled("Forbidden: User token disabled".into())
        );
        assert_eq!(
            refusal(g.admit(Some("v"), ip(1), 0)),
            Refusal::Disabled("Forbidden: User token disabled".into())
        );
    }

    #[test]
    fn an_empty_disabled_reason_falls_back_to_the_default_message() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 0, false);
        add(&cache, "e", |u| {
            u.disabled_at = Some(1);
            u.disabled_reason = Some(String::new());
        });
        assert_eq!(
            refusal(g.admit(Some("e"), ip(1), 0)),
            Refusal::Disabled("Forbidden: User token disabled".into())
        );
    }

    #[test]
    fn temporary_users_expire_at_request_time() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 0, false);
        add(&cache, "t", |u| {
            u.user_type = UserType::Temporary;
            u.expires_at = Some(1000);
        });
        assert!(g.admit(Some("t"), ip(1), 999).is_ok());
        assert_eq!(refusal(g.admit(Some("t"), ip(1), 1000)), Refusal::Expired);
    }

    #[test]
    fn ip_limit_global_and_per_user() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 1, false);
        add(&cache, "u", |_| {});
        add(&cache, "two", |u| u.max_ips = Some(2));
        add(&cache, "unlimited", |u| u.max_ips = Some(0));
        assert!(g.admit(Some("u"), ip(1), 0).is_ok());
        assert!(g.admit(Some("u"), ip(1), 0).is_ok());
        assert_eq!(refusal(g.admit(Some("u"), ip(2), 0)), Refusal::IpLimit);
        assert_eq!(
            cache.user("u").unwrap().ip,
            vec!["10.0.0.1"],
            "refused IP not recorded"
        );
        assert!(g.admit(Some("two"), ip(1), 0).is_ok());
        assert!(g.admit(Some("two"), ip(2), 0).is_ok());
        assert_eq!(refusal(g.admit(Some("two"), ip(3), 0)), Refusal::IpLimit);
        for n in 1..10 {
            assert!(g.admit(Some("unlimited"), ip(n), 0).is_ok());
        }
    }

    /// A token used from thousands of addresses grew its list without bound, and every new
    /// address copied the whole list: requests slowed down for everyone on the worker thread.
    #[test]
    fn without_a_limit_only_so_many_addresses_are_recorded() {
        let (g, cache) = gate_recording(GatekeeperMode::UserToken, 0, false, 3);
        add(&cache, "shared", |_| {});
        add(&cache, "s", |u| u.user_type = UserType::Special);
        add(&cache, "five", |u| u.max_ips = Some(5));
        for n in 1..=10 {
            assert!(g.admit(Some("shared"), ip(n), 0).is_ok(), "admitted");
            assert!(g.admit(Some("s"), ip(n), 0).is_ok(), "admitted");
        }
        assert_eq!(cache.user("shared").unwrap().ip.len(), 3);
        assert_eq!(cache.user("s").unwrap().ip.len(), 3);
        // A limit above the cap is the user's own bound: every address it allows is recorded.
        for n in 1..=5 {
            assert!(g.admit(Some("five"), ip(n), 0).is_ok());
        }
        assert_eq!(refusal(g.admit(Some("five"), ip(6), 0)), Refusal::IpLimit);
        assert_eq!(cache.user("five").unwrap().ip.len(), 5);
        // 0: every address.
        let (g, cache) = gate_recording(GatekeeperMode::UserToken, 0, false, 0);
        add(&cache, "all", |_| {});
        for n in 1..=10 {
            assert!(g.admit(Some("all"), ip(n), 0).is_ok());
        }
        assert_eq!(cache.user("all").unwrap().ip.len(), 10);
    }

    #[test]
    fn special_users_are_exempt_from_ip_limits() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 1, true);
        add(&cache, "s", |u| u.user_type = UserType::Special);
        for n in 1..5 {
            assert!(g.admit(Some("s"), ip(n), 0).is_ok());
        }
        assert_eq!(
            cache.user("s").unwrap().ip.len(),
            4,
            "IPs are still recorded"
        );
    }

    fn patch(json: &str) -> crate::users::UserPatch {
        serde_json::from_str(json).unwrap()
    }

    /// The fast path (a remembered IP, no profile read) never outlives what it stands for.
    #[test]
    fn a_remembered_ip_does_not_outlive_the_profile_it_was_found_in() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 1, false);
        add(&cache, "u", |_| {});
        for _ in 0..3 {
            assert!(g.admit(Some("u"), ip(1), 0).is_ok());
        }
        assert!(cache
            .get("u")
            .unwrap()
            .knows_ip(ip(1), cache.get("u").unwrap().admission()));
        // The admin empties the list: ip(1) is new again and must be admitted (and recorded)
        // as one, so ip(2) no longer fits in the limit of 1.
        cache.upsert("u", &patch(r#"{"ip": []}"#), 1);
        assert!(g.admit(Some("u"), ip(2), 2).is_ok());
        assert_eq!(refusal(g.admit(Some("u"), ip(1), 3)), Refusal::IpLimit);
        assert_eq!(cache.user("u").unwrap().ip, vec!["10.0.0.2"]);
        // Disabled while its IP is remembered: refused with the reason.
        assert!(g.admit(Some("u"), ip(2), 4).is_ok());
        cache.disable("u", Some("abuse"), 5).unwrap();
        assert_eq!(
            refusal(g.admit(Some("u"), ip(2), 6)),
            Refusal::Disabled("Forbidden: abuse".into())
        );
        // The store confirms the local changes, then its copy re-enables the user with
        // another list: ip(2) is refused as a new IP again.
        let taken = cache.take_changes(usize::MAX);
        cache.acknowledge(&taken.changes, true);
        let mut remote = cache.user("u").unwrap();
        remote.disabled_at = None;
        remote.ip = vec!["10.0.0.3".into()];
        cache.apply_remote("u", Some(&remote));
        assert_eq!(refusal(g.admit(Some("u"), ip(2), 7)), Refusal::IpLimit);
        assert!(g.admit(Some("u"), ip(3), 8).is_ok());
    }

    #[test]
    fn a_remembered_ip_does_not_skip_expiry() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 0, false);
        add(&cache, "t", |u| {
            u.user_type = UserType::Temporary;
            u.expires_at = Some(1000);
        });
        for now in [10, 500, 999] {
            assert!(g.admit(Some("t"), ip(1), now).is_ok());
        }
        assert_eq!(refusal(g.admit(Some("t"), ip(1), 1000)), Refusal::Expired);
    }

    #[test]
    fn auto_ban_disables_with_a_reason() {
        let (g, cache) = gate(GatekeeperMode::UserToken, 1, true);
        add(&cache, "u", |_| {});
        assert!(g.admit(Some("u"), ip(1), 0).is_ok());
        assert_eq!(
            refusal(g.admit(Some("u"), ip(2), 5)),
            Refusal::IpLimitBanned
        );
        let user = cache.user("u").unwrap();
        assert_eq!(user.disabled_at, Some(5));
        assert_eq!(user.disabled_reason.as_deref(), Some(AUTO_BAN_REASON));
        assert_eq!(user.ip.len(), 2);
        assert!(matches!(
            refusal(g.admit(Some("u"), ip(1), 6)),
            Refusal::Disabled(_)
        ));
    }
}
