//! The compact, immutable in-memory form of a user's non-counter fields. A profile is replaced
//! whole (copy-on-write) on every edit, so readers never see half an update and never lock.

use std::net::IpAddr;
use std::sync::Arc;

use once_cell::sync::Lazy;
use parking_lot::Mutex;
use serde_json::{Map, Value};

use super::model::{FamilyValues, JsNumber, User, UserType};

/// One entry of a user's `ip` list. Addresses are kept parsed so the per-request "seen this IP?"
/// check is a comparison, not a parse; anything else (e.g. `risu<id>-<ip>`) is kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpEntry {
    Addr(IpAddr),
    Text(Box<str>),
}

impl IpEntry {
    pub fn from_text(text: &str) -> Self {
        match text.parse::<IpAddr>() {
            // Only when printing it back gives the same text, so exports stay byte-identical.
            Ok(addr) if addr.to_string() == text => Self::Addr(addr),
            _ => Self::Text(text.into()),
        }
    }

    /// Same client? IPv4-mapped IPv6 (`::ffff:1.2.3.4`, as Node reported) equals the IPv4 form.
    #[inline]
    pub fn is(&self, ip: IpAddr) -> bool {
        match self {
            Self::Addr(addr) => addr.to_canonical() == ip.to_canonical(),
            Self::Text(text) => text
                .parse::<IpAddr>()
                .is_ok_and(|a| a.to_canonical() == ip.to_canonical()),
        }
    }

    pub fn to_text(&self) -> String {
        match self {
            Self::Addr(addr) => addr.to_string(),
            Self::Text(text) => text.to_string(),
        }
    }
}

/// A family map stored as a slice in the order given: most users have none or a few families, and a slice
/// costs 16 bytes where a `BTreeMap` costs a node allocation. Zero entries are not stored:
/// in the older proxy a missing family and a 0 mean the same (no usage, or no limit).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FamilyMap(Box<[(Arc<str>, f64)]>);

/// Family names repeat across millions of users; share one allocation per name.
static FAMILY_NAMES: Lazy<Mutex<FamilyNames>> = Lazy::new(Default::default);

/// The interned names, and the count at which names no user holds any more are dropped: every
/// name ever seen was kept, so imports of users with ever new family keys, deleted again,
/// grew the process by about 160 bytes a name.
#[derive(Default)]
struct FamilyNames {
    names: std::collections::HashSet<Arc<str>>,
    prune_at: usize,
}

/// Fewest names before the first prune.
const FAMILY_NAMES_PRUNE_MIN: usize = 1024;

fn intern(name: &str) -> Arc<str> {
    let mut table = FAMILY_NAMES.lock();
    if let Some(existing) = table.names.get(name) {
        return existing.clone();
    }
    if table.names.len() >= table.prune_at.max(FAMILY_NAMES_PRUNE_MIN) {
        // Only this set holds a name whose count is 1, and it hands out clones under the lock.
        table.names.retain(|n| Arc::strong_count(n) > 1);
        table.prune_at = table.names.len() * 2;
    }
    let interned: Arc<str> = Arc::from(name);
    table.names.insert(interned.clone());
    interned
}

impl FamilyMap {
    pub fn from_values(values: &FamilyValues) -> Self {
        let entries: Vec<(Arc<str>, f64)> = values
            .iter()
            .filter(|(_, v)| v.0 != 0.0)
            .map(|(k, v)| (intern(k), v.0))
            .collect();
        Self(entries.into_boxed_slice())
    }

    pub fn to_values(&self) -> FamilyValues {
        self.0
            .iter()
            .map(|(k, v)| (k.to_string(), JsNumber(*v)))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Rarely-set fields, boxed so that a typical user pays 8 bytes for all of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extra {
    pub nickname: Option<Box<str>>,
    pub disabled_reason: Option<Box<str>>,
    pub admin_note: Option<Box<str>>,
    pub meta: Option<Map<String, Value>>,
    pub token_refresh: FamilyMap,
    pub token_count: Option<Value>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        *self == Extra::default()
    }
}

/// Everything about a user except the token and the counters (which live in atomics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub ips: Box<[IpEntry]>,
    pub user_type: UserType,
    pub created_at: u64,
    pub disabled_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub max_ips: Option<u32>,
    /// `meta: {}` (what creation sets) without paying for an `Extra` box.
    pub empty_meta: bool,
    pub token_counts: FamilyMap,
    pub token_limits: FamilyMap,
    pub extra: Option<Box<Extra>>,
}

impl Profile {
    pub fn from_user(user: &User) -> Self {
        let extra = Extra {
            nickname: user.nickname.as_deref().map(Into::into),
            disabled_reason: user.disabled_reason.as_deref().map(Into::into),
            admin_note: user.admin_note.as_deref().map(Into::into),
            meta: user.meta.clone().filter(|m| !m.is_empty()),
            token_refresh: FamilyMap::from_values(&user.token_refresh),
            token_count: user.token_count.clone(),
        };
        Self {
            ips: user.ip.iter().map(|s| IpEntry::from_text(s)).collect(),
            user_type: user.user_type,
            created_at: user.created_at,
            disabled_at: user.disabled_at,
            expires_at: user.expires_at,
            max_ips: user.max_ips,
            empty_meta: user.meta.as_ref().is_some_and(Map::is_empty),
            token_counts: FamilyMap::from_values(&user.token_counts),
            token_limits: FamilyMap::from_values(&user.token_limits),
            extra: (!extra.is_empty()).then(|| Box::new(extra)),
        }
    }

    /// The wire form; counters and `lastUsedAt` come from the record's atomics.
    pub fn to_user(&self, token: &str, prompt_count: u64, last_used_at: Option<u64>) -> User {
        let extra = self.extra.as_deref();
        User {
            token: token.to_string(),
            ip: self.ips.iter().map(IpEntry::to_text).collect(),
            nickname: extra
                .and_then(|e| e.nickname.as_deref())
                .map(str::to_string),
            user_type: self.user_type,
            prompt_count,
            token_count: extra.and_then(|e| e.token_count.clone()),
            token_counts: self.token_counts.to_values(),
            token_limits: self.token_limits.to_values(),
            token_refresh: extra
                .map(|e| e.token_refresh.to_values())
                .unwrap_or_default(),
            created_at: self.created_at,
            last_used_at,
            disabled_at: self.disabled_at,
            disabled_reason: extra
                .and_then(|e| e.disabled_reason.as_deref())
                .map(str::to_string),
            expires_at: self.expires_at,
            max_ips: self.max_ips,
            admin_note: extra
                .and_then(|e| e.admin_note.as_deref())
                .map(str::to_string),
            meta: match extra.and_then(|e| e.meta.clone()) {
                Some(meta) => Some(meta),
                None if self.empty_meta => Some(Map::new()),
                None => None,
            },
        }
    }

    pub fn disabled_reason(&self) -> Option<&str> {
        self.extra
            .as_deref()
            .and_then(|e| e.disabled_reason.as_deref())
    }

    pub fn nickname(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.nickname.as_deref())
    }

    #[inline]
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips.iter().any(|e| e.is(ip))
    }

    /// A temporary user past `expiresAt` is refused at request time.
    #[inline]
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.user_type == UserType::Temporary && self.expires_at.is_some_and(|at| at <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_names_no_user_holds_are_dropped() {
        let held = intern("family-held-by-a-user");
        for i in 0..20_000 {
            drop(intern(&format!("family-{i}")));
        }
        // Other tests of this process intern a few names of their own meanwhile.
        let len = FAMILY_NAMES.lock().names.len();
        assert!(len <= 4 * FAMILY_NAMES_PRUNE_MIN, "{len} names kept");
        assert!(Arc::ptr_eq(&held, &intern("family-held-by-a-user")));
    }

    #[test]
    fn ip_entries_keep_their_text() {
        for text in [
            "1.2.3.4",
            "::ffff:1.2.3.4",
            "2001:DB8::1",
            "risu123-1.2.3.4",
        ] {
            assert_eq!(IpEntry::from_text(text).to_text(), text);
        }
        assert!(matches!(IpEntry::from_text("1.2.3.4"), IpEntry::Addr(_)));
        assert!(matches!(
            IpEntry::from_text("2001:DB8::1"),
            IpEntry::Text(_)
        ));
    }

    #[test]
    fn mapped_ipv4_is_the_same_client() {
        let entry = IpEntry::from_text("::ffff:1.2.3.4");
        assert!(entry.is("1.2.3.4".parse().unwrap()));
        assert!(IpEntry::from_text("2001:DB8::1").is("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn profile_round_trips_a_user() {
        let mut user = User::new("tok".into(), UserType::Special, 5);
        user.ip = vec!["1.2.3.4".into()];
        user.token_limits.insert("gpt4".into(), JsNumber(10.0));
        user.token_counts.insert("turbo".into(), JsNumber(0.0));
        user.nickname = Some("n".into());
        user.max_ips = Some(0);
        let back = Profile::from_user(&user).to_user("tok", 0, None);
        user.token_counts.clear(); // zero entries are not kept
        assert_eq!(back, user);
    }

    #[test]
    fn typical_user_has_no_extra_allocation() {
        let user = User::new("tok".into(), UserType::Normal, 5);
        let profile = Profile::from_user(&user);
        assert!(profile.extra.is_none());
        assert_eq!(profile.to_user("tok", 0, None).meta, Some(Map::new()));
    }
}
