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
