//! What tests can observe: counters, the request log and open streams.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Running totals since start (or the last reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests seen on the database and token routes (control requests excluded).
    pub requests: u64,
    /// `POST /token` requests.
    pub token_requests: u64,
    /// Tokens issued (by the endpoint or the control API).
    pub tokens_issued: u64,
    /// Token requests refused.
    pub token_failures: u64,
    /// Database requests refused with 401.
    pub permission_denied: u64,
    /// Database writes applied (PUT, PATCH, POST, DELETE).
    pub writes: u64,
    /// Database reads answered (plain GETs).
    pub reads: u64,
    /// Streams opened.
    pub streams_opened: u64,
    /// Streams ended, for any reason.
    pub streams_closed: u64,
    /// `keep-alive` events sent.
    pub keepalives_sent: u64,
    /// `put` and `patch` events sent.
    pub data_events_sent: u64,
    /// 307 redirects sent.
    pub redirects: u64,
    /// Requests that matched a fault rule.
    pub faults_triggered: u64,
    /// Connections reset on purpose (faults and outages).
    pub connections_dropped: u64,
}

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedRequest {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Fake-clock time of arrival, ms since the epoch.
    pub at_ms: i64,
    /// `primary` or `secondary` listener.
    pub listener: String,
    /// HTTP method as sent.
    pub method: String,
    /// URL path as sent (still percent-encoded).
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Selected headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// Body as (lossy) UTF-8, cut at 1 MiB.
    pub body: String,
    /// Status sent, or `None` when the connection was dropped instead.
    pub status: Option<u16>,
    /// `responded`, `stream`, `dropped`, `applied_then_dropped (<status it would have had>)`
    /// or `outage`.
    pub outcome: String,
}

/// Headers copied into the log.
pub const LOGGED_HEADERS: [&str; 10] = [
    "accept",
    "authorization",
    "cache-control",
    "content-type",
    "if-match",
    "if-none-match",
    "user-agent",
    "x-firebase-etag",
    "x-http-method-override",
    "host",
];

/// Longest body kept in a log entry.
pub const MAX_LOGGED_BODY: usize = 1024 * 1024;

/// A bounded log of requests, oldest first.
#[derive(Debug, Default)]
pub struct RequestLog {
    next_seq: u64,
    entries: VecDeque<LoggedRequest>,
}

impl RequestLog {
    /// Appends an entry (assigning its `seq`), dropping the oldest beyond `limit`.
    pub fn push(&mut self, mut entry: LoggedRequest, limit: usize) {
        self.next_seq += 1;
        entry.seq = self.next_seq;
        self.entries.push_back(entry);
        while self.entries.len() > limit {
            self.entries.pop_front();
        }
    }

    /// Entries with `seq > after`.
    pub fn since(&self, after: u64) -> Vec<LoggedRequest> {
        self.entries
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect()
    }

    /// Empties the log (sequence numbers keep increasing).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// An open stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream id.
    pub id: u64,
    /// The streamed location, e.g. `/users`.
    pub path: String,
    /// `primary` or `secondary` listener.
    pub listener: String,
    /// How the stream authenticated: `token`, `secret` or `public`.
    pub auth: String,
}
