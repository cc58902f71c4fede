//! The optional access log: one JSON line per request on stdout. Requests only push a line
//! into a bounded channel; a background service writes them, so a slow terminal or pipe never
//! slows the proxy (lines are dropped and counted when the channel is full).

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::users::UserRecord;

const CHANNEL_LINES: usize = 65_536;

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    client_ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    method: &'a str,
    path: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<f64>,
}

/// The request side: formats and enqueues.
#[derive(Clone)]
pub struct AccessLog {
    sender: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

/// The writer side, run as a Pingora background service.
pub struct AccessLogWriter {
    receiver: parking_lot::Mutex<Option<mpsc::Receiver<String>>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn new() -> (Self, AccessLogWriter) {
        let (sender, receiver) = mpsc::channel(CHANNEL_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        (
            Self {
                sender,
                dropped: Arc::clone(&dropped),
            },
            AccessLogWriter {
                receiver: parking_lot::Mutex::new(Some(receiver)),
                dropped,
            },
        )
    }

    pub fn write(
        &self,
        req: &RequestHeader,
        client_ip: IpAddr,
        user: Option<&UserRecord>,
        status: u16,
        upstream: Option<Duration>,
    ) {
        let line = Line {
            time: rfc3339_now(),
            client_ip,
            user: user.map(user_label),
            method: req.method.as_str(),
            // The path only: the query may carry `key=<token>`.
            path: req.uri.path(),
            status,
            upstream_ms: upstream.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
        };
        let Ok(json) = serde_json::to_string(&line) else {
            return;
        };
        if self.sender.try_send(json).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The nickname, or `tok:` and the first 12 hex digits of the token's SHA-256: enough to tell
/// users apart in a log, useless for getting in.
pub fn user_label(user: &UserRecord) -> String {
    if let Some(nick) = user.profile().nickname() {
        return nick.to_string();
    }
    token_id(user.token())
}

pub fn token_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("tok:{hex}")
}

#[async_trait]
impl BackgroundService for AccessLogWriter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut receiver) = self.receiver.lock().take() else {
            return;
        };
        let mut out = std::io::BufWriter::new(std::io::stdout());
        loop {
            tokio::select! {
                line = receiver.recv() => {
                    let Some(line) = line else { break };
                    let _ = writeln!(out, "{line}");
                    while let Ok(line) = receiver.try_recv() {
                        let _ = writeln!(out, "{line}");
                    }
                    let _ = out.flush();
                }
                _ = shutdown.changed() => break,
            }
        }
        while let Ok(line) = receiver.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("access log: {dropped} lines dropped because stdout could not keep up");
        }
        let _ = out.flush();
    }
}

/// `2026-11-26T22:07:18.123Z`, from the system clock.
fn rfc3339_now() -> String {
    let ms = crate::clock::now_ms();
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn token_id_is_short_and_stable() {
        let id = token_id("5d7c4c1e-2a55-4f6e-9d7a-0d1c2b3a4f5e");
        assert_eq!(id.len(), 16);
        assert_eq!(id, token_id("5d7c4c1e-2a55-4f6e-9d7a-0d1c2b3a4f5e"));
        assert!(!id.contains("5d7c4c1e"));
    }
}
