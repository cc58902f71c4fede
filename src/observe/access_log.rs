//! The optional access log: one JSON line per request, on stdout or appended to a file.
//! Requests only push a line into a bounded channel; a background service writes them, so a
//! slow terminal, pipe or disk never slows the proxy (lines are dropped and counted when the
//! channel is full, or holds [`QUEUED_BYTES_MAX`]).

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::users::UserRecord;

const CHANNEL_LINES: usize = 65_536;
/// Most bytes of lines waiting for the writer. The line count alone let a client that chose
/// long paths (a request target may be 64 KiB) queue gigabytes while the output was stuck;
/// 16 MiB is the 65,536 lines' worth at about 250 bytes a line, as ordinary requests write.
const QUEUED_BYTES_MAX: usize = 16 << 20;
/// The batch buffer's capacity kept between batches.
const BATCH_CAPACITY: usize = 64 * 1024;
/// A batch is written once it holds this much, so that lines taken from the queue while
/// requests keep adding to it do not pile up in the buffer instead.
const BATCH_MAX: usize = 1 << 20;
/// How often a log file's path is checked for rotation.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    client_ip: IpAddr,
    /// The token's short id: unique per user, and not something an admin can choose.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nickname: Option<&'a str>,
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
    /// Bytes of the lines in the channel.
    queued: Arc<AtomicUsize>,
}

/// The writer side: a Pingora background service while the process serves, and
/// [`AccessLogWriter::finish`] once every service stopped, for the lines of requests that
/// ended during the shutdown.
#[derive(Clone)]
pub struct AccessLogWriter {
    inner: Arc<WriterInner>,
}

struct WriterInner {
    /// Held by the writing task for its whole life; free again once its runtime is gone.
    receiver: tokio::sync::Mutex<mpsc::Receiver<String>>,
    sink: parking_lot::Mutex<Sink>,
    dropped: Arc<AtomicU64>,
    queued: Arc<AtomicUsize>,
}

impl AccessLog {
    /// `path`: append to this file (created if missing); `None`: stdout.
    pub fn new(path: Option<&Path>) -> std::io::Result<(Self, AccessLogWriter)> {
        let sink = Sink::new(match path {
            Some(path) => Target::File(LogFile::open(&std::path::absolute(path)?)?),
            None => Target::Stdout,
        });
        let (sender, receiver) = mpsc::channel(CHANNEL_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = AccessLogWriter {
            inner: Arc::new(WriterInner {
                receiver: tokio::sync::Mutex::new(receiver),
                sink: parking_lot::Mutex::new(sink),
                dropped: Arc::clone(&dropped),
                queued: Arc::clone(&queued),
            }),
        };
        Ok((
            Self {
                sender,
                dropped,
                queued,
            },
            writer,
        ))
    }

    pub fn write(
        &self,
        req: &RequestHeader,
        client_ip: IpAddr,
        user: Option<&UserRecord>,
        status: u16,
        upstream: Option<Duration>,
    ) {
        let profile = user.map(UserRecord::profile);
        let line = Line {
            time: rfc3339_now(),
            client_ip,
            user: user.map(|u| token_id(u.token())),
            nickname: profile.as_ref().and_then(|p| p.nickname()),
            method: req.method.as_str(),
            // The path only: the query may carry `key=<token>`.
            path: req.uri.path(),
            status,
            upstream_ms: upstream.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
        };
        let Ok(json) = serde_json::to_string(&line) else {
            return;
        };
        self.enqueue(json);
    }

    /// Queues `line` unless the queue is full (in lines or bytes); a dropped line is counted.
    fn enqueue(&self, line: String) {
        let len = line.len();
        let queued = self.queued.fetch_add(len, Ordering::Relaxed);
        if queued + len > QUEUED_BYTES_MAX || self.sender.try_send(line).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `tok:` and the first 12 hex digits of the token's SHA-256: enough to tell users apart in a
/// log, useless for getting in.
pub fn token_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("tok:{hex}")
}

impl AccessLogWriter {
    /// Writes the lines still queued (the writing task has stopped with its runtime) and
    /// reports lines dropped along the way. Call once every service has stopped.
    pub fn finish(&self) {
        if let Ok(mut receiver) = self.inner.receiver.try_lock() {
            self.inner
                .sink
                .lock()
                .write_queued(None, &mut receiver, &self.inner.queued);
        }
        let dropped = self.inner.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("access log: {dropped} lines dropped because the writer could not keep up");
        }
    }
}

#[async_trait]
impl BackgroundService for AccessLogWriter {
    /// Writes until the runtime stops, shutdown included: requests that end during the grace
    /// period are logged too. Each batch is flushed before the next wait, so stopping the
    /// task (only ever at that wait) loses nothing.
    async fn start(&self, _shutdown: ShutdownWatch) {
        let mut receiver = self.inner.receiver.lock().await;
        while let Some(line) = receiver.recv().await {
            self.inner
                .sink
                .lock()
                .write_queued(Some(line), &mut receiver, &self.inner.queued);
        }
    }
}

/// Lines of one batch, written with one call.
struct Sink {
    buffer: Vec<u8>,
    target: Target,
}

enum Target {
    Stdout,
    File(LogFile),
}

impl Sink {
    fn new(target: Target) -> Self {
        Self {
            buffer: Vec::with_capacity(BATCH_CAPACITY),
            target,
        }
    }

    /// `first`, then every line already queued, written with one call per [`BATCH_MAX`]
    /// bytes (whole lines); `queued` counts the bytes of the lines still in the channel.
    fn write_queued(
        &mut self,
        first: Option<String>,
        receiver: &mut mpsc::Receiver<String>,
        queued: &AtomicUsize,
    ) {
        for line in first
            .into_iter()
            .chain(std::iter::from_fn(|| receiver.try_recv().ok()))
        {
            queued.fetch_sub(line.len(), Ordering::Relaxed);
            self.write_line(&line);
            if self.buffer.len() >= BATCH_MAX {
                self.flush();
            }
        }
        self.flush();
    }

    fn write_line(&mut self, line: &str) {
        self.buffer.extend_from_slice(line.as_bytes());
        self.buffer.push(b'\n');
    }

    fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        match &mut self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&self.buffer).and_then(|()| out.flush());
            }
            Target::File(file) => file.append(&self.buffer),
        }
        self.buffer.clear();
        self.buffer.shrink_to(BATCH_CAPACITY);
    }
}

/// An append-only log file that follows rotation: when its path names another file (or none)
/// because logrotate moved it away, the next write goes to a new file at the path.
struct LogFile {
    path: PathBuf,
    file: File,
    identity: (u64, u64),
    checked: Instant,
    /// The last write or reopen failed (reported once until it works again).
    failing: bool,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            identity: (meta.dev(), meta.ino()),
            checked: Instant::now(),
            failing: false,
        })
    }

    /// One append per batch: lines of other writers of the file never interleave with ours.
    fn append(&mut self, lines: &[u8]) {
        self.follow_rotation();
        let result = self.file.write_all(lines);
        self.report(result, "cannot write");
    }

    fn follow_rotation(&mut self) {
        if self.checked.elapsed() < ROTATION_CHECK {
            return;
        }
        self.checked = Instant::now();
        let current = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
        if current.as_ref().is_ok_and(|id| *id == self.identity) {
            return;
        }
        match LogFile::open(&self.path) {
            Ok(reopened) => {
                self.file = reopened.file;
                self.identity = reopened.identity;
            }
            Err(e) => self.report(Err(e), "cannot reopen after rotation"),
        }
    }

    fn report(&mut self, result: std::io::Result<()>, what: &str) {
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    log::warn!("access log {}: {what}: {e}", self.path.display());
                }
            }
        }
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
    fn the_queue_holds_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = AccessLog::new(Some(&dir.path().join("a.log"))).unwrap();
        let line = "x".repeat(1 << 20);
        for _ in 0..20 {
            log.enqueue(line.clone());
        }
        assert_eq!(log.queued.load(Ordering::Relaxed), QUEUED_BYTES_MAX);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 4);
        writer.finish();
        assert_eq!(
            log.queued.load(Ordering::Relaxed),
            0,
            "written, so room again"
        );
        let written = std::fs::read(dir.path().join("a.log")).unwrap();
        assert_eq!(written.len(), 16 * ((1 << 20) + 1));
        log.enqueue(line);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn token_id_is_short_and_stable() {
        let id = token_id("5d7c4c1e-2a55-4f6e-9d7a-0d1c2b3a4f5e");
        assert_eq!(id.len(), 16);
        assert_eq!(id, token_id("5d7c4c1e-2a55-4f6e-9d7a-0d1c2b3a4f5e"));
        assert!(!id.contains("5d7c4c1e"));
    }
}
