//! Fleet-wide jobs run on one instance: a lease at `_sync/leader/<job> = {id, until}` taken
//! and renewed by compare-and-set (ETag `if-match`), so two instances never both hold it.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{Request, Rtdb, RtdbError};

/// Takes or renews the lease on `job` for `ttl`; true when this instance holds it now.
pub async fn acquire(
    rtdb: &Rtdb,
    instance: &str,
    job: &str,
    ttl: Duration,
    now_ms: u64,
) -> Result<bool, RtdbError> {
    let path = format!("_sync/leader/{job}");
    let mut read = Request::new(Method::GET, &path);
    read.etag = true;
    let reply = rtdb.call(read).await?;
    let mut current = reply.json()?;
    let mut etag = reply.etag.unwrap_or_else(|| "null_etag".into());
    for _ in 0..3 {
        if !may_take(&current, instance, now_ms) {
            return Ok(false);
        }
        let lease = json!({"id": instance, "until": now_ms + ttl.as_millis() as u64});
        let mut write = Request::new(Method::PUT, &path).json(lease.to_string().into_bytes());
        write.if_match = Some(etag.clone());
        match rtdb.call(write).await {
            Ok(_) => return Ok(true),
            Err(RtdbError::Precondition { body, etag: tag }) => {
                current = serde_json::from_slice(&body).unwrap_or(Value::Null);
                etag = tag.unwrap_or_else(|| "null_etag".into());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Free, expired, or already ours.
fn may_take(current: &Value, instance: &str, now_ms: u64) -> bool {
    let holder = current.get("id").and_then(Value::as_str);
    let until = current.get("until").and_then(Value::as_u64).unwrap_or(0);
    holder.is_none() || holder == Some(instance) || until < now_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_rules() {
        assert!(may_take(&Value::Null, "a", 10));
        assert!(may_take(&json!({"id": "a", "until": 99}), "a", 10));
        assert!(!may_take(&json!({"id": "b", "until": 99}), "a", 10));
        assert!(may_take(&json!({"id": "b", "until": 9}), "a", 10));
    }
}
