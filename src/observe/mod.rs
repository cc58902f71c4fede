//! What operators see: Prometheus metrics, the optional JSON access log, the process log.

mod access_log;
pub mod logging;
mod metrics;
mod recent_clients;

pub use access_log::{token_id, AccessLog, AccessLogWriter};
pub use metrics::{Metrics, Outcome, StoreGauges};
