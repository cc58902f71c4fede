//! Guards on the proxy listener's connections, which Pingora's hooks cannot give: every hook
//! runs after a whole request header has arrived, and Pingora times single reads only. So a
//! client sending its header a byte at a time (Slowloris) kept its connection, memory and file
//! descriptor for as long as it kept sending, and nothing capped how many connections one
//! address held. [`ConnectionGuard`] wraps Pingora's proxy application and each accepted
//! connection:
//!
//! - a **header deadline** (proxy and admin listeners): once the first bytes of a request
//!   header arrived, the rest must follow within `clients.header_timeout_seconds` (nginx's
//!   `client_header_timeout`), else the connection is closed. The listeners' handlers say when
//!   a header was read and when its request ended ([`header_received`], [`request_finished`]);
//!   between requests, the idle wait stays the keep-alive timeout.
//! - the **first request's idle wait**: Pingora gives a new connection 60 s for its first
//!   byte whatever `clients.keepalive_timeout_seconds` says (it applies that setting from the
//!   second request on); a connection that sends nothing is closed after the keep-alive
//!   timeout instead.
//! - a **send deadline** (proxy and admin listeners): a client that takes none of its answer
//!   for `clients.send_timeout_seconds` is disconnected (nginx's `send_timeout`). Pingora's own
//!   write timeout times a whole write (a 64 KiB piece of a proxied answer, a whole admin
//!   answer of maybe hundreds of megabytes), so a slow reader making progress would be cut; this
//!   one restarts whenever any bytes are taken.
//! - a **per-address connection cap** (proxy listener, `clients.max_connections_per_ip`; an
//!   IPv6 /64 counts as one address): a connection over it is answered `429` and closed, before any request is
//!   read. Trusted proxies carry many clients' connections and are exempt.
//!
//! Normal requests arrive in one read and cost no timer: a timer is only set when a read leaves
//! a header incomplete, or finds a new connection silent.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN, IO};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use super::rate_limit::{ConcurrencyLimiter, ConcurrencySlot, KeyHasher, LimitKey};
use super::respond::ErrorReply;
use crate::config::Config;
use crate::net::CidrSet;
use crate::observe::Metrics;

/// What the guard enforces; all off means connections are passed through untouched.
pub struct ConnectionLimits {
    pub timeouts: Timeouts,
    /// Open connections per client address (0: no cap).
    pub max_per_ip: u32,
    /// Peers exempt from the cap (`trusted_proxies`).
    pub trusted_proxies: CidrSet,
    /// Width of the per-address count (`rate_limit.estimator_slots`).
    pub slots: usize,
    /// Whether replies carry `Access-Control-Allow-Origin: *` (`cors.enabled`).
    pub cors: bool,
}

impl ConnectionLimits {
    /// The proxy listener's, from `clients`, `trusted_proxies`, `rate_limit` and `cors`.
    pub fn proxy(config: &Config) -> Self {
        let keepalive = config.clients.keepalive_timeout_seconds;
        Self {
            timeouts: Timeouts {
                header: config.clients.header_timeout,
                first_byte: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
                send: config.clients.send_timeout,
            },
            max_per_ip: config.clients.max_connections_per_ip,
            trusted_proxies: config.trusted_proxies.clone(),
            slots: config.rate_limit.estimator_slots,
            cors: config.cors,
        }
    }

    /// The admin listener's: the proxy's deadlines, no per-address cap.
    pub fn admin(config: &Config) -> Self {
        Self {
            max_per_ip: 0,
            ..Self::proxy(config)
        }
    }
}

/// The deadlines of a connection's reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first bytes of a request header to its end (`None`: no deadline).
    pub header: Option<Duration>,
    /// A new connection's wait for its first byte (`None`: Pingora's 60 s).
    pub first_byte: Option<Duration>,
    /// A write's wait for the client to take any bytes (`None`: no deadline).
    pub send: Option<Duration>,
}

impl Timeouts {
    fn any(self) -> bool {
        self.header.is_some() || self.first_byte.is_some() || self.send.is_some()
    }
}

/// How long a refused connection's request is read and discarded after the reply, so that
/// closing with unread data (a TCP reset) does not destroy the reply before the client read it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// Wraps a Pingora application `A`, the proxy or the admin API (see the module documentation).
pub struct ConnectionGuard<A> {
    app: Arc<A>,
    timeouts: Timeouts,
    per_ip: Option<ConcurrencyLimiter>,
    hasher: KeyHasher,
    trusted_proxies: CidrSet,
    refusal: Vec<u8>,
    metrics: Arc<Metrics>,
}

impl<A> ConnectionGuard<A> {
    pub fn new(app: A, limits: ConnectionLimits, metrics: Arc<Metrics>) -> Self {
        let reply = ErrorReply::new(
            429,
            "too_many_connections",
            "Too many open connections from this address; reuse one or close some",
        );
        Self {
            app: Arc::new(app),
            timeouts: limits.timeouts,
            per_ip: (limits.max_per_ip > 0)
                .then(|| ConcurrencyLimiter::new(limits.max_per_ip, limits.slots)),
            hasher: KeyHasher::default(),
            trusted_proxies: limits.trusted_proxies,
            refusal: reply.to_http1_close(limits.cors),
            metrics,
        }
    }

    /// The connection's place in its address's count; `Err` when the address is at its cap.
    fn admit(&self, stream: &Stream) -> Result<Option<ConcurrencySlot>, ()> {
        let Some(per_ip) = &self.per_ip else {
            return Ok(None);
        };
        let Some(ip) = peer_ip(stream) else {
            return Ok(None);
        };
        if self.trusted_proxies.contains(ip) {
            return Ok(None);
        }
        per_ip
            .acquire(self.hasher.hash(LimitKey::Ip(ip)))
            .map(Some)
            .ok_or(())
    }

    /// Answers 429 without reading the request, then drains what the client sent for a moment.
    async fn refuse(&self, mut stream: Stream) {
        self.metrics.record_connection_refused();
        if stream.write_all(&self.refusal).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        let _ = AsyncWriteExt::shutdown(&mut stream).await;
        let drain = async {
            let mut buf = [0u8; 4096];
            let mut total = 0;
            while total < LINGER_BYTES {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionGuard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let slot = match self.admit(&stream) {
            Ok(slot) => slot,
            Err(()) => {
                self.refuse(stream).await;
                return None;
            }
        };
        let stream = if slot.is_some() || self.timeouts.any() {
            Box::new(GuardedStream::new(
                stream,
                self.timeouts,
                slot,
                Arc::clone(&self.metrics),
            ))
        } else {
            stream
        };
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    digest.peer_addr()?.as_inet().map(|a| a.ip())
}

/// A request's header was read: reads until [`request_finished`] belong to its body.
#[inline]
pub fn header_received(session: &ServerSession) {
    if let Some(guarded) = guarded(session) {
        guarded.phase.set(true);
    }
}

/// The request ended: the next bytes start a new header (or are what is left of a body that
/// was not read, which Pingora drains before reusing the connection, under the same deadline).
#[inline]
pub fn request_finished(session: &ServerSession) {
    if let Some(guarded) = guarded(session) {
        guarded.phase.set(false);
    }
}

fn guarded(session: &ServerSession) -> Option<&GuardedStream> {
    let stream: &dyn IO = &**session.stream()?;
    stream.as_any().downcast_ref::<GuardedStream>()
}

/// Whether a request is between its header and its end, told by the proxy's hooks on the same
/// task as the reads. Each change also bumps a count in the upper bits, so the stream notices
/// a change it did not read in between (a request with no body read at all).
#[derive(Debug, Default)]
struct RequestPhase(AtomicU32);

impl RequestPhase {
    fn set(&self, in_request: bool) {
        let old = self.0.load(Ordering::Relaxed);
        let changes = (old >> 1).wrapping_add(1);
        self.0
            .store((changes << 1) | u32::from(in_request), Ordering::Relaxed);
    }

    fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A client connection with its read deadlines and its place in the per-address count.
pub struct GuardedStream {
    inner: Stream,
    timeouts: Timeouts,
    phase: RequestPhase,
    /// The phase this stream last acted on.
    seen_phase: u32,
    /// Bytes of the current header have arrived (the header deadline runs from the next wait).
    header_started: bool,
    /// The armed deadline: the header's, or a new connection's wait for its first byte.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Armed while a write waits for the client to take bytes ([`Timeouts::send`]).
    send_deadline: Option<Pin<Box<Sleep>>>,
    _slot: Option<ConcurrencySlot>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("header_started", &self.header_started)
            .finish_non_exhaustive()
    }
}

impl GuardedStream {
    fn new(
        inner: Stream,
        timeouts: Timeouts,
        slot: Option<ConcurrencySlot>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner,
            timeouts,
            phase: RequestPhase::default(),
            seen_phase: 0,
            header_started: false,
            deadline: None,
            send_deadline: None,
            _slot: slot,
            metrics,
        }
    }

    /// Whether the armed deadline (set to `timeout` from now if none is) has passed.
    fn deadline_passed(&mut self, timeout: Duration, cx: &mut Context<'_>) -> bool {
        self.deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    /// A read found no bytes in the phase `phase`: waits, unless a deadline has passed. In the
    /// middle of a header that is an error; a new connection silent too long reads as closed
    /// (as Pingora ends a kept-alive wait), so it closes quietly.
    fn poll_wait(&mut self, phase: u32, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.header_started {
            if let Some(timeout) = self.timeouts.header {
                if self.deadline_passed(timeout, cx) {
                    self.metrics.record_header_timeout();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("request header not complete within {timeout:?}"),
                    )));
                }
            }
        } else if phase == 0 {
            if let Some(timeout) = self.timeouts.first_byte {
                if self.deadline_passed(timeout, cx) {
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Poll::Pending
    }
}

impl GuardedStream {
    /// A write's outcome `written`: a write that waits arms the send deadline, and fails once
    /// it passed; any bytes taken disarm it.
    fn poll_sent(
        &mut self,
        written: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if !written.is_pending() {
            self.send_deadline = None;
            return written;
        }
        let Some(timeout) = self.timeouts.send else {
            return Poll::Pending;
        };
        let deadline = self
            .send_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.send_deadline = None;
        self.metrics.record_send_timeout();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took none of its answer for {timeout:?}"),
        )))
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.get();
        if phase != this.seen_phase {
            this.seen_phase = phase;
            this.header_started = false;
            this.deadline = None;
        }
        if phase & 1 == 1 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !this.header_started && buf.filled().len() > before {
                    this.header_started = true;
                    // The first byte's wait is over; the header's deadline starts later.
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_wait(phase, cx),
            other => other,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.poll_sent(written, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.poll_sent(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
