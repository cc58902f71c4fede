//! OAuth2 access tokens for the service account: an RS256 JWT assertion posted to the key's
//! `token_uri` (the JWT bearer grant), cached, refreshed before it expires and after the
//! database refused it (401, `auth_revoked`). One source is shared by every task.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::key::ServiceAccount;

/// The two scopes the RTDB REST API requires.
pub const SCOPES: &str =
    "https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/firebase.database";
/// Assertions are valid for just under Google's 1 h maximum.
const ASSERTION_LIFETIME_S: u64 = 3_540;
/// Refresh this long before expiry (or after 80 % of a short lifetime).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The token endpoint refused the key: retrying will not help.
    #[error("the token endpoint refused the service account ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// Network trouble or a 5xx: retry later.
    #[error("cannot get an access token: {0}")]
    Unavailable(String),
    #[error("cannot sign the token request: {0}")]
    Signing(String),
}

impl AuthError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, AuthError::Rejected { .. } | AuthError::Signing(_))
    }
}

/// Where access tokens come from.
pub enum TokenSource {
    ServiceAccount {
        account: Box<ServiceAccount>,
        cached: Mutex<Option<Cached>>,
    },
    /// The database emulator accepts `Bearer owner` as an administrator, as the Admin SDKs send.
    Emulator,
}

pub struct Cached {
    token: Arc<str>,
    refresh_at: Instant,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct TokenErrorReply {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

impl TokenSource {
    pub fn service_account(account: ServiceAccount) -> Self {
        Self::ServiceAccount {
            account: Box::new(account),
            cached: Mutex::new(None),
        }
    }

    /// A valid access token; fetches one when none is cached or the cached one is due.
    /// Concurrent callers wait for one fetch instead of each starting their own.
    pub async fn token(&self, http: &reqwest::Client) -> Result<Arc<str>, AuthError> {
        let (account, cached) = match self {
            TokenSource::Emulator => return Ok(Arc::from("owner")),
            TokenSource::ServiceAccount { account, cached } => (account, cached),
        };
        let mut slot = cached.lock().await;
        if let Some(c) = slot.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(Arc::clone(&c.token));
            }
        }
        let (token, lifetime) = fetch(account, http).await?;
        let early = lifetime
            .saturating_sub(REFRESH_MARGIN)
            .max(lifetime.mul_f64(0.8));
        let token: Arc<str> = Arc::from(token);
        *slot = Some(Cached {
            token: Arc::clone(&token),
            refresh_at: Instant::now() + early,
        });
        Ok(token)
    }

    /// The database refused `used` (401, `auth_revoked`): the next `token` fetches a new one,
    /// unless another task already replaced it.
    pub async fn invalidate(&self, used: &str) {
        if let TokenSource::ServiceAccount { cached, .. } = self {
            let mut slot = cached.lock().await;
            if slot.as_ref().is_some_and(|c| &*c.token == used) {
                *slot = None;
            }
        }
    }
}

/// Signs an assertion and exchanges it for an access token and its lifetime.
async fn fetch(
    account: &ServiceAccount,
    http: &reqwest::Client,
) -> Result<(String, Duration), AuthError> {
    let assertion = sign_assertion(account, crate::clock::now_ms() / 1000)?;
    let response = http
        .post(&account.token_uri)
        .timeout(TOKEN_REQUEST_TIMEOUT)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ])
        .send()
        .await
        .map_err(|e| AuthError::Unavailable(super::client::describe(&e)))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| AuthError::Unavailable(super::client::describe(&e)))?;
    if status == 200 {
        let reply: TokenReply = serde_json::from_slice(&body).map_err(|_| {
            AuthError::Unavailable("the token endpoint answered 200 without a token".into())
        })?;
        let lifetime = Duration::from_secs(reply.expires_in.unwrap_or(3600).max(1));
        return Ok((reply.access_token, lifetime));
    }
    let message = match serde_json::from_slice::<TokenErrorReply>(&body) {
        Ok(TokenErrorReply {
            error: Some(error),
            error_description,
        }) => match error_description {
            Some(d) => format!("{error}: {d}"),
            None => error,
        },
        _ => super::client::snippet(&body),
    };
    if (400..500).contains(&status) && status != 408 && status != 429 {
        Err(AuthError::Rejected { status, message })
    } else {
        Err(AuthError::Unavailable(format!(
            "token endpoint answered {status}: {message}"
        )))
    }
}

/// The JWT bearer grant's assertion: RS256 over `iss`, `scope`, `aud`, `iat`, `exp`.
pub fn sign_assertion(account: &ServiceAccount, now_s: u64) -> Result<String, AuthError> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = account.key_id.clone();
    let claims = Claims {
        iss: &account.client_email,
        scope: SCOPES,
        aud: &account.token_uri,
        iat: now_s,
        exp: now_s + ASSERTION_LIFETIME_S,
    };
    jsonwebtoken::encode(&header, &claims, &account.signing_key)
        .map_err(|e| AuthError::Signing(e.to_string()))
}
