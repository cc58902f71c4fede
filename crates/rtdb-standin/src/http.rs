//! The HTTP/1.1 server: listeners, connections (with deliberate resets), request intake,
//! fault application, logging and routing to the database, token and control handlers.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::faults::FaultAction;
use crate::introspect::{LoggedRequest, LOGGED_HEADERS, MAX_LOGGED_BODY};
use crate::path::DbPath;
use crate::sse::Listener;
use crate::state::Shared;
use crate::tree::etag;
use crate::{control, oauth, rest};

/// Body of every response.
pub type ResponseBody = BoxBody<Bytes, io::Error>;
/// Every response.
pub type HttpResponse = Response<ResponseBody>;

/// Returned by the service to make hyper abandon the connection without replying.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped on purpose")]
pub struct DropConnection;

/// Per-connection context.
#[derive(Debug)]
pub struct ConnCtx {
    /// Which listener accepted the connection.
    pub listener: Listener,
    /// When set, the socket is closed with a reset (SO_LINGER 0) instead of a FIN.
    pub reset: Arc<AtomicBool>,
}

/// A request with its body read.
#[derive(Debug)]
pub struct Req {
    /// Method as sent.
    pub method: Method,
    /// URL path, still percent-encoded.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Req {
    /// A header as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Accepts connections forever (until the runtime is dropped).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, kind: Listener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(shared.clone(), stream, kind));
            }
            // Out of file descriptors or similar: back off briefly rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, listener: Listener) {
    let _ = stream.set_nodelay(true);
    let reset = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ResettableStream {
        inner: stream,
        reset: reset.clone(),
    });
    let ctx = Arc::new(ConnCtx { listener, reset });
    let service = service_fn(move |req| {
        let (shared, ctx) = (shared.clone(), ctx.clone());
        async move { handle(shared, ctx, req).await }
    });
    let _ = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service)
        .await;
}

/// A TCP stream that is closed with a reset when its flag is set before it is dropped.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn is_control(path: &str) -> bool {
    path == "/_fake" || path.starts_with("/_fake/")
}

async fn handle(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<HttpResponse, DropConnection> {
    if is_control(req.uri().path()) {
        return Ok(control::handle(&shared, req).await);
    }
    shared.count(|c| c.requests += 1);
    let (parts, body) = req.into_parts();
    let mut entry = log_entry(&shared, &ctx, &parts);
    if shared.in_outage() {
        entry.outcome = "outage".to_owned();
        return Err(drop_connection(&shared, &ctx, entry));
    }
    let body = match read_body(body, shared.options.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let response = error_response(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large");
            return Ok(finish(&shared, entry, response));
        }
        Err(BodyError::Io) => return Err(drop_connection(&shared, &ctx, entry)),
    };
    entry.body = String::from_utf8_lossy(&body[..body.len().min(MAX_LOGGED_BODY)]).into_owned();
    let req = Req {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
    };
    let fault = shared.faults().take(req.method.as_str(), &req.path);
    if fault.is_some() {
        shared.count(|c| c.faults_triggered += 1);
    }
    handle_with_fault(&shared, &ctx, req, fault, entry).await
}

async fn handle_with_fault(
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx>,
    req: Req,
    fault: Option<FaultAction>,
    entry: LoggedRequest,
) -> Result<HttpResponse, DropConnection> {
    match fault {
        Some(FaultAction::Status {
            status,
            retry_after,
            body,
        }) => {
            let response = fault_response(shared, &req, status, retry_after.as_deref(), body);
            Ok(finish(shared, entry, response))
        }
        Some(FaultAction::DropBeforeApply) => Err(drop_connection(shared, ctx, entry)),
        Some(FaultAction::ApplyThenDrop) => {
            let applied = route(shared, ctx, &req).await;
            let mut entry = entry;
            entry.outcome = format!("applied_then_dropped ({})", applied.status().as_u16());
            Err(drop_connection(shared, ctx, entry))
        }
        Some(FaultAction::Delay { ms }) => {
            // A server finishes a request it has read even if the client leaves meanwhile
            // (a client's timeout makes such a write ambiguous, not lost): the delayed
            // handling runs on its own task, which hyper cannot cancel with the connection.
            let (shared, ctx) = (Arc::clone(shared), Arc::clone(ctx));
            let handled = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let response = route(&shared, &ctx, &req).await;
                finish(&shared, entry, response)
            });
            Ok(handled.await.unwrap_or_else(|_| {
                error_response(StatusCode::INTERNAL_SERVER_ERROR, "handler failed")
            }))
        }
        Some(FaultAction::Trickle {
            chunk_bytes,
            interval_ms,
        }) => {
            let response = route(shared, ctx, &req).await;
            let response = trickle(
                response,
                chunk_bytes.max(1),
                Duration::from_millis(interval_ms),
            )
            .await;
            Ok(finish(shared, entry, response))
        }
        None => Ok(finish(shared, entry, route(shared, ctx, &req).await)),
    }
}

async fn route(shared: &Arc<Shared>, ctx: &Arc<ConnCtx>, req: &Req) -> HttpResponse {
    if req.path == "/token" {
        oauth::handle_http(shared, req)
    } else if req.path.ends_with(".json") {
        rest::handle(shared, ctx, req).await
    } else {
        error_response(StatusCode::NOT_FOUND, "Not found")
    }
}

fn log_entry(shared: &Shared, ctx: &ConnCtx, parts: &hyper::http::request::Parts) -> LoggedRequest {
    let headers: BTreeMap<String, String> = LOGGED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = parts.headers.get(*name)?;
            Some((
                (*name).to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ))
        })
        .collect();
    LoggedRequest {
        seq: 0,
        at_ms: shared.now_ms(),
        listener: ctx.listener.name().to_owned(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        body: String::new(),
        status: None,
        outcome: "responded".to_owned(),
    }
}

fn finish(shared: &Shared, mut entry: LoggedRequest, response: HttpResponse) -> HttpResponse {
    entry.status = Some(response.status().as_u16());
    let is_stream = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_stream {
        entry.outcome = "stream".to_owned();
    }
    shared.record(entry);
    response
}

fn drop_connection(shared: &Shared, ctx: &ConnCtx, mut entry: LoggedRequest) -> DropConnection {
    ctx.reset.store(true, Ordering::SeqCst);
    shared.count(|c| c.connections_dropped += 1);
    if entry.outcome == "responded" {
        entry.outcome = "dropped".to_owned();
    }
    shared.record(entry);
    DropConnection
}

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than the limit.
    TooLarge,
    /// The connection failed while reading.
    Io,
}

/// Reads a whole request body, up to `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Io),
    }
}

fn fault_response(
    shared: &Shared,
    req: &Req,
    status: u16,
    retry_after: Option<&str>,
    body: Option<String>,
) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match body {
        Some(body) => raw_response(status, "application/json; charset=utf-8", Bytes::from(body)),
        None if status == StatusCode::PRECONDITION_FAILED => conflict_response(shared, req),
        None => error_response(
            status,
            status.canonical_reason().unwrap_or("Injected fault"),
        ),
    };
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

/// A 412 carrying the current value and its ETag, as after a lost compare-and-set race.
fn conflict_response(shared: &Shared, req: &Req) -> HttpResponse {
    let path = req
        .path
        .strip_suffix(".json")
        .and_then(|p| DbPath::from_url_path(p).ok());
    let Some(path) = path else {
        return error_response(StatusCode::PRECONDITION_FAILED, "Precondition Failed");
    };
    let current = shared.db().tree.get(&path);
    with_etag(
        json_response(StatusCode::PRECONDITION_FAILED, &current, false),
        &etag(&current),
    )
}

async fn trickle(response: HttpResponse, chunk_bytes: usize, interval: Duration) -> HttpResponse {
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal error");
    };
    let bytes = collected.to_bytes();
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for chunk in bytes.chunks(chunk_bytes) {
            if tx.send(Ok(Bytes::copy_from_slice(chunk))).await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    Response::from_parts(parts, ChannelBody::new(rx).boxed())
}

/// A response body fed from a channel; an `Err` item aborts the response.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl ChannelBody {
    /// Wraps the receiving end of a chunk channel.
    pub fn new(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Self {
        ChannelBody { rx }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A response with the headers the real service sends on JSON replies.
pub fn raw_response(status: StatusCode, content_type: &'static str, body: Bytes) -> HttpResponse {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    response
}

/// A JSON response, compact or indented.
pub fn json_response(status: StatusCode, value: &Value, pretty: bool) -> HttpResponse {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    let body = text.unwrap_or_else(|_| "null".to_owned());
    raw_response(status, "application/json; charset=utf-8", Bytes::from(body))
}

/// `{"error": message}`.
pub fn error_response(status: StatusCode, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": message }), false)
}

/// A response with no body (204, 304, 307).
pub fn empty_response(status: StatusCode) -> HttpResponse {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Adds an `ETag` header.
pub fn with_etag(mut response: HttpResponse, etag: &str) -> HttpResponse {
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(hyper::header::ETAG, value);
    }
    response
}
