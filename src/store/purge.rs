//! Temporary users are removed `POW_TOKEN_PURGE_HOURS` (default 48) after they stopped working
//! (expired or disabled), as in the older proxy. Stores shared by a fleet elect one instance
//! to do it, so deletes are not issued once per instance. The same leader does the store's own
//! housekeeping ([`StoreBackend::housekeeping`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{StoreBackend, StoreStatus};
use crate::clock::now_ms;
use crate::users::{UserCache, UserRecord, UserType};

const JOB: &str = "purge-temporary-users";

pub struct TemporaryUserPurge {
    cache: Arc<UserCache>,
    backend: Arc<dyn StoreBackend>,
    status: Arc<StoreStatus>,
    after: Duration,
    every: Duration,
}

impl TemporaryUserPurge {
    pub fn new(
        cache: Arc<UserCache>,
        backend: Arc<dyn StoreBackend>,
        status: Arc<StoreStatus>,
        after: Duration,
        every: Duration,
    ) -> Self {
        Self {
            cache,
            backend,
            status,
            after,
            every,
        }
    }

    /// One round; `None` when this instance may not purge now. While a change stream is down
    /// the cache may be stale (an admin elsewhere may have re-enabled a user or extended its
    /// expiry), and a delete from a stale view would remove that user from every instance; the
    /// lease is then left to an instance whose view is current.
    async fn round(&self) -> Option<usize> {
        if !self.status.cache_is_current() {
            return None;
        }
        if !self.backend.lead(JOB, self.every * 2).await {
            return None;
        }
        let now = now_ms();
        let purged = purge_temporary_users(&self.cache, now, self.after);
        if purged > 0 {
            info!(
                "purged {purged} temporary users unusable for over {} h",
                self.after.as_secs() / 3600
            );
        }
        match self.backend.housekeeping(now).await {
            Ok(0) => {}
            Ok(removed) => info!("{}: removed {removed} stale entries", self.backend.name()),
            Err(e) => warn!(
                "{}: housekeeping failed, retried later: {e}",
                self.backend.name()
            ),
        }
        Some(purged)
    }
}

/// Removes temporary users unusable for longer than `after`; returns how many.
pub fn purge_temporary_users(cache: &UserCache, now_ms: u64, after: Duration) -> usize {
    let doomed = purgeable(cache, now_ms, after);
    remove_still_purgeable(cache, &doomed, now_ms, after)
}

/// The tokens of the temporary users unusable for longer than `after`, from a snapshot.
fn purgeable(cache: &UserCache, now_ms: u64, after: Duration) -> Vec<Arc<str>> {
    let mut doomed = Vec::new();
    cache.for_each(|record| {
        if is_purgeable(record, now_ms, after) {
            doomed.push(Arc::clone(record.token()));
        }
    });
    doomed
}

/// Removes `doomed` users that are still purgeable when removed: an admin may have re-enabled
/// one or extended its expiry since the snapshot.
fn remove_still_purgeable(
    cache: &UserCache,
    doomed: &[Arc<str>],
    now_ms: u64,
    after: Duration,
) -> usize {
    doomed
        .iter()
        .filter(|t| {
            cache
                .remove_if(t, |record| is_purgeable(record, now_ms, after))
                .is_ok()
        })
        .count()
}

fn is_purgeable(record: &UserRecord, now_ms: u64, after: Duration) -> bool {
    let profile = record.profile();
    if profile.user_type != UserType::Temporary {
        return false;
    }
    let unusable_since = match (profile.expires_at, profile.disabled_at) {
        (Some(e), Some(d)) => Some(e.min(d)),
        (e, d) => e.or(d),
    };
    // Saturating: `POW_TOKEN_PURGE_HOURS` set very high means "never", not a wrapped-around age.
    let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    unusable_since.is_some_and(|since| since.saturating_add(after_ms) < now_ms)
}

#[async_trait]
impl BackgroundService for TemporaryUserPurge {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            self.round().await;
        }
    }
}

#[cfg(test)]
mod lifecycle_model;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::User;

    #[test]
    fn purges_only_long_unusable_temporary_users() {
        let cache = UserCache::default();
        let hour = 3_600_000;
        let mut expired_long_ago = User::new("old".into(), UserType::Temporary, 0);
        expired_long_ago.expires_at = Some(0);
        let mut expired_recently = User::new("recent".into(), UserType::Temporary, 0);
        expired_recently.expires_at = Some(49 * hour);
        let mut disabled_long_ago = User::new("disabled".into(), UserType::Temporary, 0);
        disabled_long_ago.disabled_at = Some(hour);
        disabled_long_ago.expires_at = Some(100 * hour);
        let mut normal_disabled = User::new("normal".into(), UserType::Normal, 0);
        normal_disabled.disabled_at = Some(0);
        let live = User::new("live".into(), UserType::Temporary, 0);
        cache.load([
            expired_long_ago,
            expired_recently,
            disabled_long_ago,
            normal_disabled,
            live,
        ]);
        let purged = purge_temporary_users(&cache, 50 * hour, Duration::from_secs(48 * 3600));
        assert_eq!(purged, 2);
        assert!(cache.get("old").is_none() && cache.get("disabled").is_none());
        assert!(
            cache.get("recent").is_some()
                && cache.get("normal").is_some()
                && cache.get("live").is_some()
        );
        assert_eq!(
            cache.take_changes(10).changes.len(),
            2,
            "removals reach the store"
        );
    }

    #[test]
    fn a_very_long_purge_age_means_never() {
        // This many hours is 34 minutes once its milliseconds were cast to u64: it purged.
        let cache = UserCache::default();
        let mut expired = User::new("expired".into(), UserType::Temporary, 0);
        expired.expires_at = Some(0);
        cache.load([expired]);
        let hours: u64 = 5_124_095_576_031;
        let after = Duration::from_secs(hours.saturating_mul(3600));
        assert_eq!(purge_temporary_users(&cache, 10 * 3_600_000, after), 0);
        assert!(cache.get("expired").is_some());
    }

    #[test]
    fn a_user_revived_after_the_snapshot_is_kept() {
        let cache = UserCache::default();
        let hour = 3_600_000;
        let after = Duration::from_secs(48 * 3600);
        let mut disabled = User::new("disabled".into(), UserType::Temporary, 0);
        disabled.disabled_at = Some(0);
        let mut expired = User::new("expired".into(), UserType::Temporary, 0);
        expired.expires_at = Some(0);
        let mut untouched = User::new("untouched".into(), UserType::Temporary, 0);
        untouched.expires_at = Some(0);
        cache.load([disabled, expired, untouched]);
        let mut doomed = purgeable(&cache, 50 * hour, after);
        doomed.sort();
        assert_eq!(doomed.len(), 3);
        // An admin acts between the snapshot and the removal.
        let patch = |json: &str| serde_json::from_str::<crate::users::UserPatch>(json).unwrap();
        cache.upsert("disabled", &patch(r#"{"disabledAt":null}"#), 50 * hour);
        cache.upsert(
            "expired",
            &patch(&format!(r#"{{"expiresAt":{}}}"#, 60 * hour)),
            1,
        );
        assert_eq!(remove_still_purgeable(&cache, &doomed, 50 * hour, after), 1);
        assert!(cache.get("disabled").is_some() && cache.get("expired").is_some());
        assert!(cache.get("untouched").is_none());
    }

    #[tokio::test]
    async fn nothing_is_purged_while_the_cache_may_be_stale() {
        let cache = Arc::new(UserCache::default());
        let mut expired = User::new("expired".into(), UserType::Temporary, 0);
        expired.expires_at = Some(0);
        cache.load([expired]);
        let status = StoreStatus::new("memory", Arc::clone(&cache));
        let purge = TemporaryUserPurge::new(
            Arc::clone(&cache),
            Arc::new(crate::store::memory::MemoryStore),
            Arc::clone(&status),
            Duration::from_secs(3600),
            Duration::from_secs(60),
        );
        status.set_stream_connected(false);
        assert_eq!(purge.round().await, None);
        assert!(cache.get("expired").is_some());
        status.set_stream_connected(true);
        assert_eq!(purge.round().await, Some(1));
        assert!(cache.get("expired").is_none());
    }
}
