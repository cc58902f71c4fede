//! Server-sent event streams: the registry of open streams, the events a committed write
//! produces for each of them, and the task that writes one stream.

use std::future::pending;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::introspect::StreamInfo;
use crate::options::PatchEventKeys;
use crate::path::DbPath;
use crate::state::Shared;
use crate::tree::Tree;

/// Something tests can make open streams do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamAction {
    /// Send a `keep-alive` event now.
    KeepAlive,
    /// Send `cancel` (`data: null`), then close.
    Cancel,
    /// Send `auth_revoked` (`"credential is no longer valid"`), then close.
    AuthRevoked,
    /// Go silent: no more events or keep-alives, but the connection stays open.
    Stall,
    /// End the response cleanly.
    Close,
    /// Send the first part of a `put` event, then end the response.
    CloseMidEvent,
    /// Reset the connection without ending the response.
    Drop,
    /// Send a `:` comment line.
    Comment,
    /// Send an event with a name clients do not know (`event: rtdb-standin-unknown`).
    UnknownEvent,
    /// Send a `put` event whose data is not valid JSON.
    MalformedEvent,
    /// Send the last `put`/`patch` event again.
    Duplicate,
}

impl StreamAction {
    /// True for actions after which the stream ends.
    fn ends_stream(self) -> bool {
        matches!(
            self,
            StreamAction::Cancel
                | StreamAction::AuthRevoked
                | StreamAction::Close
                | StreamAction::CloseMidEvent
                | StreamAction::Drop
        )
    }
}

/// Line endings used on the wire (clients must accept all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineEnding {
    /// `\n`, as the real service sends.
    #[default]
    Lf,
    /// `\r\n`.
    Crlf,
    /// `\r`.
    Cr,
}

impl LineEnding {
    /// Rewrites the `\n` line endings of formatted events. Event data is compact JSON, whose
    /// strings escape newlines, so every raw `\n` is a line ending.
    pub fn apply(self, bytes: Bytes) -> Bytes {
        let replacement: &[u8] = match self {
            LineEnding::Lf => return bytes,
            LineEnding::Crlf => b"\r\n",
            LineEnding::Cr => b"\r",
        };
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8);
        for &b in bytes.iter() {
            if b == b'\n' {
                out.extend_from_slice(replacement);
            } else {
                out.push(b);
            }
        }
        Bytes::from(out)
    }
}

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The database URL's listener.
    Primary,
    /// The redirect target on the second loopback address.
    Secondary,
}

impl Listener {
    /// `primary` or `secondary`.
    pub fn name(self) -> &'static str {
        match self {
            Listener::Primary => "primary",
            Listener::Secondary => "secondary",
        }
    }
}

/// How a request or stream was authorised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// An issued access token.
    Token(String),
    /// The legacy database secret.
    Secret,
    /// No credentials, allowed by public rules.
    Public,
}

impl Auth {
    fn name(&self) -> &'static str {
        match self {
            Auth::Token(_) => "token",
            Auth::Secret => "secret",
            Auth::Public => "public",
        }
    }
}

/// A message to one stream's task.
#[derive(Debug)]
pub enum StreamCmd {
    /// A pre-formatted `put` or `patch` event.
    Data(Bytes),
    /// A test-driven action.
    Action(StreamAction),
}

struct StreamHandle {
    id: u64,
    path: DbPath,
    listener: Listener,
    auth: Auth,
    tx: mpsc::UnboundedSender<StreamCmd>,
}

/// The open streams.
#[derive(Default)]
pub struct StreamRegistry {
    next_id: u64,
    streams: Vec<StreamHandle>,
}

impl StreamRegistry {
    /// Registers a stream; its task reads the returned receiver.
    pub fn register(
        &mut self,
        path: DbPath,
        listener: Listener,
        auth: Auth,
    ) -> (u64, mpsc::UnboundedReceiver<StreamCmd>) {
        self.next_id += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.streams.push(StreamHandle {
            id: self.next_id,
            path,
            listener,
            auth,
            tx,
        });
        (self.next_id, rx)
    }

    /// Forgets a stream whose task ended.
    pub fn remove(&mut self, id: u64) {
        self.streams.retain(|s| s.id != id);
    }

    /// Number of open streams.
    pub fn count(&self) -> usize {
        self.streams.len()
    }

    /// Descriptions of the open streams.
    pub fn infos(&self) -> Vec<StreamInfo> {
        self.streams
            .iter()
            .map(|s| StreamInfo {
                id: s.id,
                path: s.path.to_string(),
                listener: s.listener.name().to_owned(),
                auth: s.auth.name().to_owned(),
            })
            .collect()
    }

    /// Sends a command to one stream.
    pub fn send(&self, id: u64, cmd: StreamCmd) {
        if let Some(s) = self.streams.iter().find(|s| s.id == id) {
            let _ = s.tx.send(cmd);
        }
    }

    /// Sends `action` to every stream at `path` (all streams when `None`) for which `select`
    /// holds; returns how many were told.
    pub fn act(
        &self,
        action: StreamAction,
        path: Option<&DbPath>,
        select: impl Fn(&Auth) -> bool,
    ) -> usize {
        self.streams
            .iter()
            .filter(|s| path.is_none_or(|p| *p == s.path) && select(&s.auth))
            .filter(|s| s.tx.send(StreamCmd::Action(action)).is_ok())
            .count()
    }

    /// The paths of the open streams, with their ids.
    pub fn paths(&self) -> Vec<(u64, DbPath)> {
        self.streams
            .iter()
            .map(|s| (s.id, s.path.clone()))
            .collect()
    }
}

/// A committed write, as far as streams are concerned.
#[derive(Debug, Clone)]
pub enum Change {
    /// PUT, POST or DELETE at `path`.
    Put {
        /// Location written.
        path: DbPath,
    },
    /// A (multi-path) PATCH at `base` with relative `keys`.
    Patch {
        /// Location of the request.
        base: DbPath,
        /// The relative paths written, in request order.
        keys: Vec<DbPath>,
    },
}

impl Change {
    fn written(&self) -> Vec<DbPath> {
        match self {
            Change::Put { path } => vec![path.clone()],
            Change::Patch { base, keys } => keys.iter().map(|k| base.join(k)).collect(),
        }
    }

    /// True when a stream at `stream` can only be told about this change by comparing its
    /// value before and after (a write strictly above it).
    pub fn needs_snapshot(&self, stream: &DbPath) -> bool {
        self.written()
            .iter()
            .any(|w| w.is_strict_ancestor_of(stream))
    }
}

/// The events a stream at `stream` gets for `change`, given the tree after the change and,
/// when [`Change::needs_snapshot`], the stream's value before it.
pub fn plan_events(
    change: &Change,
    stream: &DbPath,
    before: Option<&Value>,
    after: &Tree,
    style: PatchEventKeys,
) -> Vec<Bytes> {
    let replaced_from_above = || {
        let now = after.get(stream);
        let changed = before.is_none_or(|b| *b != now);
        if changed {
            vec![put_event(&DbPath::root(), &now)]
        } else {
            Vec::new()
        }
    };
    match change {
        Change::Put { path } => match path.relative_to(stream) {
            Some(rel) => vec![put_event(&rel, &after.get(path))],
            None if path.is_strict_ancestor_of(stream) => replaced_from_above(),
            None => Vec::new(),
        },
        Change::Patch { base, keys } => {
            if let Some(rel) = base.relative_to(stream) {
                let entries = keys.iter().map(|k| (k.clone(), after.get(&base.join(k))));
                return patch_events(&rel, entries.collect(), style);
            }
            let full: Vec<DbPath> = keys.iter().map(|k| base.join(k)).collect();
            if full.iter().any(|f| f.contains(stream)) {
                return replaced_from_above();
            }
            let below: Vec<(DbPath, Value)> = full
                .iter()
                .filter_map(|f| f.relative_to(stream).map(|rel| (rel, after.get(f))))
                .collect();
            if below.is_empty() {
                Vec::new()
            } else {
                patch_events(&DbPath::root(), below, style)
            }
        }
    }
}

fn patch_events(at: &DbPath, entries: Vec<(DbPath, Value)>, style: PatchEventKeys) -> Vec<Bytes> {
    match style {
        PatchEventKeys::Keep => {
            let data: Map<String, Value> =
                entries.into_iter().map(|(k, v)| (k.to_key(), v)).collect();
            vec![patch_event(at, &data)]
        }
        PatchEventKeys::Nest => {
            let mut groups: Vec<(DbPath, Map<String, Value>)> = Vec::new();
            for (key, value) in entries {
                let (Some(parent), Some(leaf)) = (key.parent(), key.last()) else {
                    continue;
                };
                let parent = at.join(&parent);
                match groups.iter_mut().find(|(p, _)| *p == parent) {
                    Some((_, data)) => {
                        data.insert(leaf.to_owned(), value);
                    }
                    None => groups.push((parent, Map::from_iter([(leaf.to_owned(), value)]))),
                }
            }
            groups
                .iter()
                .map(|(p, data)| patch_event(p, data))
                .collect()
        }
    }
}

fn event_data(path: &DbPath, data: &Value) -> String {
    // Written by hand so `path` precedes `data`, as on the wire from the real service.
    format!(
        "{{\"path\":{},\"data\":{}}}",
        Value::String(path.to_string()),
        data
    )
}

fn frame(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// `event: put` with `{"path":…,"data":…}`.
pub fn put_event(path: &DbPath, data: &Value) -> Bytes {
    frame("put", &event_data(path, data))
}

/// `event: patch` with `{"path":…,"data":{…}}`.
pub fn patch_event(path: &DbPath, data: &Map<String, Value>) -> Bytes {
    frame("patch", &event_data(path, &Value::Object(data.clone())))
}

/// The bytes written for a stream action, if any.
fn action_frame(action: StreamAction) -> Option<Bytes> {
    match action {
        StreamAction::KeepAlive => Some(frame("keep-alive", "null")),
        StreamAction::Cancel => Some(frame("cancel", "null")),
        StreamAction::AuthRevoked => {
            Some(frame("auth_revoked", "\"credential is no longer valid\""))
        }
        StreamAction::CloseMidEvent => Some(Bytes::from_static(
            b"event: put\ndata: {\"path\":\"/\",\"da",
        )),
        StreamAction::Comment => Some(Bytes::from_static(b": rtdb-standin comment\n\n")),
        StreamAction::UnknownEvent => Some(frame("rtdb-standin-unknown", "{\"path\":\"/\"}")),
        StreamAction::MalformedEvent => Some(frame("put", "{\"path\":\"/\",\"data\":")),
        StreamAction::Stall
        | StreamAction::Close
        | StreamAction::Drop
        | StreamAction::Duplicate => None,
    }
}

/// Chunks of a stream's response body; an `Err` aborts the connection.
pub type BodySender = mpsc::Sender<Result<Bytes, io::Error>>;

/// The task serving one stream's response body.
pub struct StreamTask {
    shared: Arc<Shared>,
    id: u64,
    cmds: mpsc::UnboundedReceiver<StreamCmd>,
    out: BodySender,
    abort: Arc<AtomicBool>,
    auth_deadline: Option<Instant>,
    last_data: Option<Bytes>,
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl StreamTask {
    /// A task for registry stream `id`, reading `cmds` and writing `out`. Setting `abort`
    /// makes the connection close with a reset; `auth_deadline` is when its token expires.
    pub fn new(
        shared: Arc<Shared>,
        id: u64,
        cmds: mpsc::UnboundedReceiver<StreamCmd>,
        out: BodySender,
        abort: Arc<AtomicBool>,
        auth_deadline: Option<Instant>,
    ) -> Self {
        StreamTask {
            shared,
            id,
            cmds,
            out,
            abort,
            auth_deadline,
            last_data: None,
        }
    }

    /// Serves the stream until it is closed by either side.
    pub async fn run(mut self) {
        let mut stalled = false;
        let mut last_keepalive = Instant::now();
        loop {
            let keepalive_at = last_keepalive + self.shared.knobs().keepalive();
            let cmd = tokio::select! {
                biased;
                cmd = self.cmds.recv() => cmd.unwrap_or(StreamCmd::Action(StreamAction::Close)),
                _ = self.out.closed() => break,
                _ = sleep_until(keepalive_at), if !stalled => {
                    last_keepalive = Instant::now();
                    StreamCmd::Action(StreamAction::KeepAlive)
                }
                _ = deadline(self.auth_deadline), if !stalled => {
                    StreamCmd::Action(StreamAction::AuthRevoked)
                }
            };
            if let StreamCmd::Action(StreamAction::Stall) = cmd {
                stalled = true;
            } else if self.step(cmd, stalled).await == Flow::Stop {
                break;
            }
        }
        self.shared.db().streams.remove(self.id);
        self.shared.count(|c| c.streams_closed += 1);
    }

    async fn step(&mut self, cmd: StreamCmd, stalled: bool) -> Flow {
        if stalled {
            return self.ends_even_when_stalled(cmd);
        }
        let action = match cmd {
            StreamCmd::Data(bytes) => {
                self.shared.count(|c| c.data_events_sent += 1);
                self.last_data = Some(bytes.clone());
                return self.write(bytes).await;
            }
            StreamCmd::Action(action) => action,
        };
        if action == StreamAction::Drop {
            return self.drop_connection().await;
        }
        if action == StreamAction::KeepAlive {
            self.shared.count(|c| c.keepalives_sent += 1);
        }
        let bytes = match action {
            StreamAction::Duplicate => self.last_data.clone(),
            other => action_frame(other),
        };
        if let Some(bytes) = bytes {
            if self.write(bytes).await == Flow::Stop {
                return Flow::Stop;
            }
        }
        if action.ends_stream() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// A stalled stream ignores everything except being closed or dropped.
    fn ends_even_when_stalled(&mut self, cmd: StreamCmd) -> Flow {
        match cmd {
            StreamCmd::Action(StreamAction::Close | StreamAction::CloseMidEvent) => Flow::Stop,
            StreamCmd::Action(StreamAction::Drop) => {
                self.abort.store(true, Ordering::SeqCst);
                let _ = self.out.try_send(Err(io::Error::other("stream dropped")));
                Flow::Stop
            }
            _ => Flow::Continue,
        }
    }

    async fn drop_connection(&mut self) -> Flow {
        self.abort.store(true, Ordering::SeqCst);
        let _ = self.out.send(Err(io::Error::other("stream dropped"))).await;
        Flow::Stop
    }

    async fn write(&mut self, bytes: Bytes) -> Flow {
        let bytes = self.shared.knobs().sse_line_ending.apply(bytes);
        match self.out.send(Ok(bytes)).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}

async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> DbPath {
        DbPath::parse(s).unwrap()
    }

    fn text(events: Vec<Bytes>) -> Vec<String> {
        events
            .into_iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    fn tree(v: Value) -> Tree {
        let mut t = Tree::new();
        t.set(
            &DbPath::root(),
            crate::tree::prepare(v, None, 0, crate::tree::WriteContext { now_ms: 0 }).unwrap(),
        );
        t
    }

    #[test]
    fn put_at_or_below_the_stream_is_relative() {
        let after = tree(json!({"users": {"a": {"n": 1}}}));
        let change = Change::Put { path: p("users/a") };
        assert_eq!(
            text(plan_events(
                &change,
                &p("users"),
                None,
                &after,
                PatchEventKeys::Keep
            )),
            ["event: put\ndata: {\"path\":\"/a\",\"data\":{\"n\":1}}\n\n"]
        );
        assert_eq!(
            text(plan_events(
                &change,
                &p("users/a"),
                None,
                &after,
                PatchEventKeys::Keep
            )),
            ["event: put\ndata: {\"path\":\"/\",\"data\":{\"n\":1}}\n\n"]
        );
        assert!(plan_events(&change, &p("other"), None, &after, PatchEventKeys::Keep).is_empty());
    }

    #[test]
    fn put_above_the_stream_sends_put_root_only_when_changed() {
        let after = tree(json!({"users": {"a": 1}, "x": 2}));
        let change = Change::Put {
            path: DbPath::root(),
        };
        let stream = p("users");
        assert!(change.needs_snapshot(&stream));
        let same = json!({"a": 1});
        assert!(
            plan_events(&change, &stream, Some(&same), &after, PatchEventKeys::Keep).is_empty()
        );
        let old = json!({"a": 0});
        assert_eq!(
            text(plan_events(
                &change,
                &stream,
                Some(&old),
                &after,
                PatchEventKeys::Keep
            )),
            ["event: put\ndata: {\"path\":\"/\",\"data\":{\"a\":1}}\n\n"]
        );
    }

    #[test]
    fn root_multi_path_patch_on_a_users_stream() {
        let after = tree(json!({"users": {"a": {"n": 4}, "b": {"m": 1}}, "_sync": {"i": 1}}));
        let change = Change::Patch {
            base: DbPath::root(),
            keys: vec![p("users/a/n"), p("users/b/m"), p("users/c"), p("_sync/i")],
        };
        let stream = p("users");
        assert!(!change.needs_snapshot(&stream));
        assert_eq!(
            text(plan_events(&change, &stream, None, &after, PatchEventKeys::Keep)),
            ["event: patch\ndata: {\"path\":\"/\",\"data\":{\"a/n\":4,\"b/m\":1,\"c\":null}}\n\n"]
        );
        assert_eq!(
            text(plan_events(
                &change,
                &stream,
                None,
                &after,
                PatchEventKeys::Nest
            )),
            [
                "event: patch\ndata: {\"path\":\"/a\",\"data\":{\"n\":4}}\n\n",
                "event: patch\ndata: {\"path\":\"/b\",\"data\":{\"m\":1}}\n\n",
                "event: patch\ndata: {\"path\":\"/\",\"data\":{\"c\":null}}\n\n",
            ]
        );
        // A stream that no key touches gets nothing.
        assert!(
            plan_events(&change, &p("elsewhere"), None, &after, PatchEventKeys::Keep).is_empty()
        );
    }

    #[test]
    fn patch_at_or_below_the_stream_keeps_its_keys() {
        let after = tree(json!({"users": {"a": {"x": 1, "y": {"z": 2}}}}));
        let change = Change::Patch {
            base: p("users/a"),
            keys: vec![p("x"), p("y/z")],
        };
        assert_eq!(
            text(plan_events(
                &change,
                &p("users"),
                None,
                &after,
                PatchEventKeys::Keep
            )),
            ["event: patch\ndata: {\"path\":\"/a\",\"data\":{\"x\":1,\"y/z\":2}}\n\n"]
        );
    }

    #[test]
    fn patch_key_above_the_stream_replaces_it() {
        let after = tree(json!({"users": {"a": {"x": 1}}}));
        let change = Change::Patch {
            base: DbPath::root(),
            keys: vec![p("users/a")],
        };
        let stream = p("users/a/x");
        assert!(change.needs_snapshot(&stream));
        assert_eq!(
            text(plan_events(
                &change,
                &stream,
                Some(&json!(0)),
                &after,
                PatchEventKeys::Keep
            )),
            ["event: put\ndata: {\"path\":\"/\",\"data\":1}\n\n"]
        );
    }

    #[test]
    fn line_endings() {
        let b = Bytes::from_static(b"event: put\ndata: {\"s\":\"a\\nb\"}\n\n");
        assert_eq!(LineEnding::Lf.apply(b.clone()), b);
        assert_eq!(
            LineEnding::Crlf.apply(b.clone()),
            "event: put\r\ndata: {\"s\":\"a\\nb\"}\r\n\r\n"
        );
        assert_eq!(
            LineEnding::Cr.apply(b),
            "event: put\rdata: {\"s\":\"a\\nb\"}\r\r"
        );
    }

    #[test]
    fn action_frames() {
        assert_eq!(
            action_frame(StreamAction::KeepAlive).unwrap(),
            "event: keep-alive\ndata: null\n\n"
        );
        assert_eq!(
            action_frame(StreamAction::AuthRevoked).unwrap(),
            "event: auth_revoked\ndata: \"credential is no longer valid\"\n\n"
        );
        assert_eq!(
            action_frame(StreamAction::Cancel).unwrap(),
            "event: cancel\ndata: null\n\n"
        );
        assert!(action_frame(StreamAction::Close).is_none());
    }
}
