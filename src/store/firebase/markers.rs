//! Every tollgate run leaves a batch marker at `_sync/instances/<id>`, and every start has a new
//! id, so markers of stopped runs pile up. A marker only matters to its own run (to tell
//! whether an ambiguous write was applied), so one that has not been written for
//! [`STALE_AFTER`] belongs to a run that stopped long ago. The instance leading the fleet's
//! housekeeping removes those, each by a compare-and-set delete, so a marker its run rewrote
//! between the read and the delete is kept.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::client::{Request, Rtdb, RtdbError};

/// A marker not written for this long is a stopped run's: a running instance rewrites its
/// marker with every flush that has changes, and a write is given up after 30 s.
pub const STALE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

const INSTANCES: &str = "_sync/instances";

/// Removes the stale markers of other runs; returns how many were removed.
pub async fn remove_stale(rtdb: &Rtdb, own: &str, now_ms: u64) -> Result<usize, RtdbError> {
    let Value::Object(markers) = rtdb
        .call(Request::new(Method::GET, INSTANCES))
        .await?
        .json()?
    else {
        return Ok(0);
    };
    let mut removed = 0;
    for (id, marker) in markers {
        if id == own || !is_stale(&marker, now_ms) {
            continue;
        }
        let path = format!("{INSTANCES}/{id}");
        let mut read = Request::new(Method::GET, &path);
        read.etag = true;
        let reply = rtdb.call(read).await?;
        let Some(etag) = reply.etag.clone() else {
            continue;
        };
        if !is_stale(&reply.json()?, now_ms) {
            continue;
        }
        let mut delete = Request::new(Method::DELETE, &path);
        delete.if_match = Some(etag);
        match rtdb.call(delete).await {
            Ok(_) => removed += 1,
            // Rewritten meanwhile: its run is alive after all.
            Err(RtdbError::Precondition { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Written (server time, `at`) longer than [`STALE_AFTER`] ago. A marker without a readable
/// time is left alone: it is not known to be old.
fn is_stale(marker: &Value, now_ms: u64) -> bool {
    let stale_ms = STALE_AFTER.as_millis() as u64;
    marker
        .get("at")
        .and_then(Value::as_u64)
        .is_some_and(|at| at.saturating_add(stale_ms) < now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_markers_known_to_be_old_are_stale() {
        let week = STALE_AFTER.as_millis() as u64;
        let now = 10 * week;
        assert!(is_stale(&json!({"seq": 3, "at": now - week - 1}), now));
        assert!(!is_stale(&json!({"seq": 3, "at": now - week}), now));
        assert!(!is_stale(&json!({"seq": 3, "at": now}), now));
        assert!(!is_stale(&json!({"seq": 3}), now), "no time");
        assert!(!is_stale(&json!({"at": "yesterday"}), now));
        assert!(!is_stale(&Value::Null, now));
    }
}
