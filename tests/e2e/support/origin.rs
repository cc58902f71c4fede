//! An origin server for tests: echoes what it received as JSON and records every request.
//! Request headers steer it: `x-origin-status`, `x-origin-delay-ms`, `x-origin-body-bytes`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the origin saw of one request.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    pub headers: BTreeMap<String, Vec<String>>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A certificate authority and a server certificate it signed, for TLS origins.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    /// A fresh CA and a certificate for `names` (e.g. `localhost`).
    pub fn new(names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Origin {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// An HTTPS origin presenting `pki`'s certificate; it records the SNI it was asked for in
    /// the `x-seen-sni` pseudo-header of each request.
    pub fn start_tls(pki: &TestPki) -> Self {
        use tokio_rustls::rustls;
        let certs = rustls_pemfile::certs(&mut pki.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut pki.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, mut shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let seen_srv = Arc::clone(&seen);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut shutdown_rx => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let seen = Arc::clone(&seen_srv);
                            let tls = tls.clone();
                            tokio::spawn(async move {
                                match tls {
                                    None => {
                                        let service = service_fn(move |req| handle(req, Arc::clone(&seen), None));
                                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                    }
                                    Some(acceptor) => {
                                        let Ok(stream) = acceptor.accept(stream).await else { return };
                                        let sni = stream.get_ref().1.server_name().map(str::to_string);
                                        let service = service_fn(move |req| handle(req, Arc::clone(&seen), sni.clone()));
                                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                    }
                                }
                            });
                        }
                    }
                }
            });
        });
        let addr = addr_rx.recv().expect("origin address");
        Self {
            addr,
            seen,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> SeenRequest {
        self.seen()
            .last()
            .cloned()
            .expect("the origin saw a request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    sni: Option<String>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(sni) = sni {
        headers.insert("x-seen-sni".to_string(), vec![sni]);
    }
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let record = SeenRequest {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers,
    };
    let number = |name: &str| record.header(name).and_then(|v| v.parse::<u64>().ok());
    let status = number("x-origin-status").unwrap_or(200) as u16;
    let delay = number("x-origin-delay-ms").map(Duration::from_millis);
    let body_bytes = number("x-origin-body-bytes");
    seen.lock().unwrap().push(record.clone());
    let _ = req.into_body().collect().await;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let body = match body_bytes {
        Some(n) => Bytes::from(vec![b'x'; n as usize]),
        None => Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "method": record.method,
                "uri": record.uri,
                "headers": record.headers,
            }))
            .unwrap(),
        ),
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap())
}

/// How [`ScriptedOrigin`] answers one request.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// The answer's bytes, written piece by piece (interim answers, head, body parts).
    pub pieces: Vec<Vec<u8>>,
    /// A pause before each piece after the first: a slow upstream.
    pub pause: Duration,
    /// A pause before the request body is read: an upstream slow to take it.
    pub read_pause: Duration,
    /// Close the connection once the pieces are written (else it serves the next request).
    pub close: bool,
}

/// What [`ScriptedOrigin`] received: the head as it came and the body unframed.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub head: super::wire::Head,
    pub body: super::wire::Body,
}

type Scripts = Arc<Mutex<std::collections::HashMap<Vec<u8>, Script>>>;

/// An origin on raw sockets that records each request byte for byte and answers it with the
/// [`Script`] registered for the value of its `x-exchange` header (an empty `200`
/// otherwise), so that a test controls every byte of the answer, framing and errors included.
pub struct ScriptedOrigin {
    pub addr: SocketAddr,
    scripts: Scripts,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ScriptedOrigin {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let scripts: Scripts = Arc::default();
        let seen: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (scripts_srv, seen_srv, stop_srv) =
            (Arc::clone(&scripts), Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop_srv.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (scripts, seen) = (Arc::clone(&scripts_srv), Arc::clone(&seen_srv));
                std::thread::spawn(move || serve_scripted(stream, &scripts, &seen));
            }
        });
        Self {
            addr,
            scripts,
            seen,
            stop,
        }
    }

    /// How the request carrying `x-exchange: <exchange>` is answered.
    pub fn script(&self, exchange: &str, script: Script) {
        self.scripts
            .lock()
            .unwrap()
            .insert(exchange.as_bytes().to_vec(), script);
    }

    /// Every request received with `x-exchange: <exchange>` (a retried one more than once).
    pub fn received(&self, exchange: &str) -> Vec<RawRequest> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.head.get("x-exchange") == Some(exchange.as_bytes()))
            .cloned()
            .collect()
    }
}

impl Drop for ScriptedOrigin {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn serve_scripted(stream: std::net::TcpStream, scripts: &Scripts, seen: &Mutex<Vec<RawRequest>>) {
    use std::io::Write;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = std::io::BufReader::new(stream);
    while let Ok(Some(head)) = super::wire::read_head(&mut reader) {
        let exchange = head.get("x-exchange").unwrap_or_default().to_vec();
        let script = scripts
            .lock()
            .unwrap()
            .get(&exchange)
            .cloned()
            .unwrap_or_else(|| Script {
                pieces: vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()],
                ..Script::default()
            });
        std::thread::sleep(script.read_pause);
        let body = super::wire::read_request_body(&mut reader, &head);
        let truncated = body.truncated;
        seen.lock().unwrap().push(RawRequest { head, body });
        if truncated {
            return;
        }
        for (i, piece) in script.pieces.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(script.pause);
            }
            if writer
                .write_all(piece)
                .and_then(|_| writer.flush())
                .is_err()
            {
                return;
            }
        }
        if script.close {
            let _ = writer.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}
