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
/// The longest access-token lifetime believed.
const MAX_TOKEN_LIFETIME_SECONDS: u64 = 24 * 3600;

/// Refresh this long before expiry (or after 80 % of a short lifetime).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed refresh the cached token is used this long before the next attempt, so that
/// requests do not each wait for a token endpoint that is down.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15);
/// A cached token is not sent this close to its expiry (clock skew, time on the wire).
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

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
    /// Past this the token is not sent, whatever a refresh did.
    expires_at: Instant,
    /// A failed refresh was logged (once per token).
    refresh_failed: bool,
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
        self.token_at(http, Instant::now()).await
    }

    /// [`token`](Self::token) at `now`. A refresh that fails while the cached token is still
    /// valid is not an error: the token endpoint being down for a few minutes must not stop
    /// the writes and the stream, so the cached token is used until it expires.
    async fn token_at(&self, http: &reqwest::Client, now: Instant) -> Result<Arc<str>, AuthError> {
        let (account, cached) = match self {
            TokenSource::Emulator => return Ok(Arc::from("owner")),
            TokenSource::ServiceAccount { account, cached } => (account, cached),
        };
        let mut slot = cached.lock().await;
        if let Some(c) = slot.as_ref() {
            if now < c.refresh_at {
                return Ok(Arc::clone(&c.token));
            }
        }
        let (token, lifetime) = match fetch(account, http).await {
            Ok(fetched) => fetched,
            Err(e) => {
                let Some(c) = slot.as_mut().filter(|c| now < c.expires_at) else {
                    return Err(e);
                };
                if !c.refresh_failed {
                    c.refresh_failed = true;
                    log::warn!(
                        "firebase: cannot refresh the access token ({e}); using the current one \
                         until it expires in {} s",
                        c.expires_at.saturating_duration_since(now).as_secs()
                    );
                }
                c.refresh_at = (now + RETRY_AFTER_FAILURE).min(c.expires_at);
                return Ok(Arc::clone(&c.token));
            }
        };
        let early = lifetime
            .saturating_sub(REFRESH_MARGIN)
            .max(lifetime.mul_f64(0.8));
        let usable = lifetime
            .saturating_sub(EXPIRY_MARGIN)
            .max(lifetime.mul_f64(0.9));
        let token: Arc<str> = Arc::from(token);
        *slot = Some(Cached {
            token: Arc::clone(&token),
            refresh_at: now + early,
            expires_at: now + usable,
            refresh_failed: false,
        });
        Ok(token)
    }

    /// Where access tokens are fetched (the key's `token_uri`), for messages; `None` for the
    /// emulator, which needs none.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            TokenSource::ServiceAccount { account, .. } => Some(&account.token_uri),
            TokenSource::Emulator => None,
        }
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
        // Google's tokens last an hour; a day bounds what a broken endpoint may claim (a
        // lifetime near u64::MAX overflowed the clock and killed the task asking).
        let lifetime = Duration::from_secs(
            reply
                .expires_in
                .unwrap_or(3600)
                .clamp(1, MAX_TOKEN_LIFETIME_SECONDS),
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use rtdb_standin::{FaultAction, FaultRule, Options, StandIn};

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_valid_token_until_it_expires() {
        let db = StandIn::start(Options::default());
        let account = super::super::key::decode(&db.firebase_key_b64()).unwrap();
        let source = TokenSource::service_account(account);
        let http = super::super::client::http_client().unwrap();
        let t0 = Instant::now();
        let first = source.token_at(&http, t0).await.unwrap();
        // The stand-in's tokens live 3599 s: due for refresh at 3299 s, sent until 3589 s.
        db.add_fault(FaultRule::new("POST", "/token", FaultAction::status(503)));
        let due = t0 + Duration::from_secs(3300);
        assert_eq!(source.token_at(&http, due).await.unwrap(), first);
        assert_eq!(db.counters().faults_triggered, 1, "the refresh was tried");
        let soon = due + Duration::from_secs(1);
        assert_eq!(source.token_at(&http, soon).await.unwrap(), first);
        assert_eq!(
            db.counters().faults_triggered,
            1,
            "not retried on every call while the endpoint is down"
        );
        let later = due + RETRY_AFTER_FAILURE;
        assert_eq!(source.token_at(&http, later).await.unwrap(), first);
        assert_eq!(db.counters().faults_triggered, 2);
        let expired = t0 + Duration::from_secs(3590);
        assert!(source.token_at(&http, expired).await.is_err());
        db.clear_faults();
        let fresh = source.token_at(&http, expired).await.unwrap();
        assert_ne!(fresh, first);
    }

    /// A token endpoint claiming a lifetime near u64::MAX overflowed the clock (a panic in
    /// whichever store task asked for the token); the claim is cut to a day.
    #[tokio::test]
    async fn an_absurd_token_lifetime_is_cut_to_a_day() {
        let db = StandIn::start(Options::default());
        let account = super::super::key::decode(&db.firebase_key_b64()).unwrap();
        let source = TokenSource::service_account(account);
        let http = super::super::client::http_client().unwrap();
        db.add_fault(FaultRule::new(
            "POST",
            "/token",
            FaultAction::Status {
                status: 200,
                retry_after: None,
                body: Some(r#"{"access_token":"x","expires_in":18446744073709551615}"#.into()),
            },
        ));
        let t0 = Instant::now();
        assert_eq!(&*source.token_at(&http, t0).await.unwrap(), "x");
        db.clear_faults();
        // Still cached well within the day, fetched anew after it.
        let hour = Duration::from_secs(3600);
        assert_eq!(&*source.token_at(&http, t0 + hour).await.unwrap(), "x");
        assert_ne!(&*source.token_at(&http, t0 + 24 * hour).await.unwrap(), "x");
    }
}
