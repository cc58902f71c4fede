//! What operators see: Prometheus metrics, the optional JSON access log, the process log.

mod access_log;
pub mod logging;
mod metrics;

pub use access_log::{token_id, AccessLog, AccessLogWriter};
pub use metrics::{Metrics, Outcome, StoreGauges};
