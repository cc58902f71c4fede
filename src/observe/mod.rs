//! What operators see: Prometheus metrics and the optional JSON access log.

mod access_log;
mod metrics;

pub use access_log::{token_id, AccessLog, AccessLogWriter};
pub use metrics::{Metrics, Outcome, StoreGauges};
