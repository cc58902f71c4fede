//! Shared helpers: a stand-in per test, an HTTP client, and a tiny SSE reader.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::redirect::Policy;
use reqwest::{Client, Method, Response, StatusCode};
use rtdb_standin::fixture::{assertion_claims, sign_assertion};
use rtdb_standin::{Options, StandIn};
use serde_json::Value;

/// Upper bound on any single wait; only reached when a test is failing.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// In a workspace build reqwest gets tollgate's features (rustls without a built-in crypto
/// provider), so a provider must be installed before building a client.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A stand-in with fast keep-alives and a client that does not follow redirects.
pub struct Fixture {
    pub standin: StandIn,
    pub client: Client,
    pub token: String,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with(Options::default().keepalive(Duration::from_secs(30)))
    }

    pub fn with(options: Options) -> Self {
        let standin = StandIn::start(options);
        let token = standin.issue_token();
        tls_provider();
        let client = Client::builder().redirect(Policy::none()).build().unwrap();
        Fixture {
            standin,
            client,
            token,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.standin.db_url(), path)
    }

    /// A request to `path` with the fixture's bearer token.
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        send_json(self.req(Method::GET, path)).await
    }

    pub async fn write(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        send_json(self.req(method, path).json(&body)).await
    }

    /// Opens a stream at `path` with the fixture's token.
    pub async fn stream(&self, path: &str) -> Sse {
        let resp = self
            .req(Method::GET, path)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        Sse::new(resp)
    }

    /// Gets a token through the real JWT bearer flow.
    pub async fn fetch_token(&self, padded: bool) -> Response {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = assertion_claims("tollgate-standin", &self.standin.token_uri(), now);
        let assertion = sign_assertion(&claims, padded).unwrap();
        self.client
            .post(self.standin.token_uri())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .unwrap()
    }
}

pub async fn send_json(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, value)
}

pub async fn send_full(req: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, String) {
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap())
}

/// What the SSE reader saw next.
#[derive(Debug, PartialEq)]
pub enum Item {
    Event(String, Value),
    /// Clean end of the body; `rest` is any unterminated event text.
    Eof {
        rest: String,
    },
    /// The connection failed.
    Error,
}

/// Reads `event:`/`data:` pairs separated by blank lines.
pub struct Sse {
    pub resp: Response,
    buf: String,
}

impl Sse {
    pub fn new(resp: Response) -> Self {
        Sse {
            resp,
            buf: String::new(),
        }
    }

    pub async fn next(&mut self) -> Item {
        tokio::time::timeout(PATIENCE, self.next_inner())
            .await
            .expect("timed out waiting for an SSE event")
    }

    async fn next_inner(&mut self) -> Item {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                return parse_block(&block);
            }
            match self.resp.chunk().await {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) => {
                    return Item::Eof {
                        rest: std::mem::take(&mut self.buf),
                    }
                }
                Err(_) => return Item::Error,
            }
        }
    }

    /// The next event that is not a keep-alive.
    pub async fn next_data(&mut self) -> Item {
        loop {
            match self.next().await {
                Item::Event(name, _) if name == "keep-alive" => continue,
                other => return other,
            }
        }
    }
}

fn parse_block(block: &str) -> Item {
    let mut name = String::new();
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event: ") {
            name = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.to_owned();
        }
    }
    Item::Event(name, serde_json::from_str(&data).expect("data is JSON"))
}

pub fn event(name: &str, data: Value) -> Item {
    Item::Event(name.to_owned(), data)
}
