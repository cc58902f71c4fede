//! The fake Google OAuth2 token endpoint (JWT bearer grant) and the store of issued tokens.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::{Method, StatusCode};
use jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::real_now_ms;
use crate::fixture::{PRIVATE_KEY_ID, REQUIRED_SCOPES, TEST_ONLY_PUBLIC_KEY_PEM};
use crate::http::{error_response, json_response, HttpResponse, Req};
use crate::state::Shared;

/// The only grant type the endpoint accepts.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Longest assertion lifetime Google accepts, in seconds.
const MAX_ASSERTION_LIFETIME_S: i64 = 3600;

/// Access tokens issued so far, with their expiry on the fake clock.
#[derive(Debug, Default)]
pub struct TokenStore {
    issued: u64,
    expiry_ms: HashMap<String, i64>,
}

impl TokenStore {
    /// Issues `fake-<n>`, valid for `lifetime_s` from `now_ms`.
    pub fn issue(&mut self, now_ms: i64, lifetime_s: u64) -> String {
        self.issued += 1;
        let token = format!("fake-{}", self.issued);
        let lifetime_ms = i64::try_from(lifetime_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.expiry_ms
            .insert(token.clone(), now_ms.saturating_add(lifetime_ms));
        token
    }

    /// The expiry of a known, unrevoked token.
    pub fn expiry_ms(&self, token: &str) -> Option<i64> {
        self.expiry_ms.get(token).copied()
    }

    /// True if `token` was issued, is not revoked and has not expired at `now_ms`.
    pub fn is_valid(&self, token: &str, now_ms: i64) -> bool {
        self.expiry_ms(token).is_some_and(|exp| exp > now_ms)
    }

    /// Forgets every token (they all become invalid).
    pub fn revoke_all(&mut self) {
        self.expiry_ms.clear();
    }

    /// Makes every token expire at `now_ms`.
    pub fn expire_all(&mut self, now_ms: i64) {
        self.expiry_ms.values_mut().for_each(|exp| *exp = now_ms);
    }
}

/// Why a token request was refused; maps to Google's error bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A required form field was absent.
    #[error("Missing required parameter: {0}")]
    MissingParameter(&'static str),
    /// `grant_type` was not the JWT bearer grant.
    #[error("Invalid grant_type: {0}")]
    UnsupportedGrantType(String),
    /// The JWT was not three base64url segments of JSON.
    #[error("Invalid JWT: malformed token")]
    Malformed,
    /// Wrong algorithm, wrong key id, or a signature that does not verify.
    #[error("Invalid JWT Signature.")]
    BadSignature,
    /// `iss` is not the fixture's `client_email`.
    #[error("Invalid grant: account not found")]
    UnknownIssuer,
    /// `aud` is not this endpoint.
    #[error("Invalid JWT: Failed audience check.")]
    WrongAudience,
    /// `iat`/`exp` missing, in the future, expired, or more than an hour apart.
    #[error("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.")]
    BadLifetime,
    /// `scope` lacks a required scope.
    #[error("Invalid OAuth scope or ID token audience provided.")]
    MissingScope,
}

impl GrantError {
    /// The OAuth `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            GrantError::MissingParameter(_) => "invalid_request",
            GrantError::UnsupportedGrantType(_) => "unsupported_grant_type",
            GrantError::MissingScope => "invalid_scope",
            _ => "invalid_grant",
        }
    }

    /// The 400 body Google sends for this error.
    pub fn body(&self) -> Value {
        json!({"error": self.code(), "error_description": self.to_string()})
    }
}

/// What an assertion must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// `iss`.
    pub client_email: &'a str,
    /// `aud`.
    pub token_uri: &'a str,
    /// Real time, seconds since the epoch.
    pub now_s: i64,
    /// Clock skew tolerated on `iat` (a client clock slightly ahead), in seconds.
    pub skew_s: i64,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    exp: Option<i64>,
}

/// Checks the form fields of a token request and returns the assertion.
pub fn parse_form(body: &[u8]) -> Result<String, GrantError> {
    let fields: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let grant = fields
        .get("grant_type")
        .ok_or(GrantError::MissingParameter("grant_type"))?;
    if grant != JWT_BEARER_GRANT {
        return Err(GrantError::UnsupportedGrantType(grant.clone()));
    }
    fields
        .get("assertion")
        .cloned()
        .ok_or(GrantError::MissingParameter("assertion"))
}

/// Verifies an RS256 assertion against the TEST-ONLY public key and the expected claims.
/// Segments may be padded or unpadded base64url; the signature covers them as sent.
pub fn verify_assertion(assertion: &str, expected: Expected<'_>) -> Result<(), GrantError> {
    let mut parts = assertion.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(GrantError::Malformed);
    };
    let header: JwtHeader = decode_json_segment(header_b64)?;
    if header.alg != "RS256" || header.kid.as_deref().is_some_and(|k| k != PRIVATE_KEY_ID) {
        return Err(GrantError::BadSignature);
    }
    let signature = decode_segment(sig_b64).map_err(|_| GrantError::BadSignature)?;
    let signed_len = header_b64.len() + 1 + claims_b64.len();
    verify_signature(&assertion.as_bytes()[..signed_len], signature)?;
    let claims: Claims = decode_json_segment(claims_b64)?;
    check_claims(&claims, expected)
}

fn decode_segment(segment: &str) -> Result<Vec<u8>, GrantError> {
    URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| GrantError::Malformed)
}

fn decode_json_segment<T: serde::de::DeserializeOwned>(segment: &str) -> Result<T, GrantError> {
    serde_json::from_slice(&decode_segment(segment)?).map_err(|_| GrantError::Malformed)
}

fn verify_signature(message: &[u8], signature: Vec<u8>) -> Result<(), GrantError> {
    let key = DecodingKey::from_rsa_pem(TEST_ONLY_PUBLIC_KEY_PEM.as_bytes())
        .map_err(|_| GrantError::BadSignature)?;
    // The provider is named explicitly so a process-wide default (or both jsonwebtoken
    // backends being enabled elsewhere in the build) cannot change or break verification.
    let verifier = (DEFAULT_PROVIDER.verifier_factory)(&Algorithm::RS256, &key)
        .map_err(|_| GrantError::BadSignature)?;
    verifier
        .verify(message, &signature)
        .map_err(|_| GrantError::BadSignature)
}

fn check_claims(claims: &Claims, expected: Expected<'_>) -> Result<(), GrantError> {
    if claims.iss.as_deref() != Some(expected.client_email) {
        return Err(GrantError::UnknownIssuer);
    }
    if claims.aud.as_deref() != Some(expected.token_uri) {
        return Err(GrantError::WrongAudience);
    }
    let (Some(iat), Some(exp)) = (claims.iat, claims.exp) else {
        return Err(GrantError::BadLifetime);
    };
    let lifetime = exp.saturating_sub(iat);
    let sane = iat <= expected.now_s.saturating_add(expected.skew_s)
        && exp > expected.now_s
        && lifetime > 0
        && lifetime <= MAX_ASSERTION_LIFETIME_S;
    if !sane {
        return Err(GrantError::BadLifetime);
    }
    let scopes: Vec<&str> = claims
        .scope
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    if !REQUIRED_SCOPES.iter().all(|s| scopes.contains(s)) {
        return Err(GrantError::MissingScope);
    }
    Ok(())
}

/// `POST /token`: verifies the assertion and issues `fake-<n>`.
pub fn handle_http(shared: &Shared, req: &Req) -> HttpResponse {
    if req.method != Method::POST {
        return error_response(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
    }
    shared.count(|c| c.token_requests += 1);
    match grant(shared, &req.body) {
        Ok(()) => {
            let (token, expires_in) = shared.issue_token();
            let body =
                json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"});
            json_response(StatusCode::OK, &body, false)
        }
        Err(e) => {
            shared.count(|c| c.token_failures += 1);
            json_response(StatusCode::BAD_REQUEST, &e.body(), false)
        }
    }
}

fn grant(shared: &Shared, body: &[u8]) -> Result<(), GrantError> {
    let assertion = parse_form(body)?;
    let expected = Expected {
        client_email: &shared.client_email,
        token_uri: &shared.urls.token,
        // JWTs are signed with the client's real clock, not the fake one.
        now_s: real_now_ms() / 1000,
        skew_s: shared.options.jwt_clock_skew_s,
    };
    verify_assertion(&assertion, expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{assertion_claims, client_email, sign_assertion};

    const URI: &str = "http://127.0.0.1:1/token";
    const NOW: i64 = 1_700_000_000;

    fn expected(email: &str) -> Expected<'_> {
        Expected {
            client_email: email,
            token_uri: URI,
            now_s: NOW,
            skew_s: 300,
        }
    }

    fn check(claims: &Value, padded: bool) -> Result<(), GrantError> {
        let email = client_email("p");
        verify_assertion(&sign_assertion(claims, padded).unwrap(), expected(&email))
    }

    #[test]
    fn accepts_padded_and_unpadded_assertions() {
        let claims = assertion_claims("p", URI, NOW);
        assert_eq!(check(&claims, false), Ok(()));
        assert_eq!(check(&claims, true), Ok(()));
    }

    #[test]
    fn rejects_tampering_and_wrong_claims() {
        let email = client_email("p");
        let good = sign_assertion(&assertion_claims("p", URI, NOW), false).unwrap();
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(assertion_claims("p", URI, NOW + 1).to_string());
        parts[1] = &other;
        assert_eq!(
            verify_assertion(&parts.join("."), expected(&email)),
            Err(GrantError::BadSignature)
        );
        for bad in ["", "a.b", "a.b.c.d", "!!.??.**"] {
            assert_eq!(
                verify_assertion(bad, expected(&email)),
                Err(GrantError::Malformed)
            );
        }
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = assertion_claims("p", URI, NOW);
            f(&mut c);
            check(&c, false)
        };
        assert_eq!(
            with(&|c| c["iss"] = json!("x@y")),
            Err(GrantError::UnknownIssuer)
        );
        assert_eq!(
            with(&|c| c["aud"] = json!("https://oauth2.googleapis.com/token")),
            Err(GrantError::WrongAudience)
        );
        assert_eq!(
            with(&|c| c["scope"] = json!(REQUIRED_SCOPES[0])),
            Err(GrantError::MissingScope)
        );
        assert_eq!(
            with(&|c| c["exp"] = json!(NOW + 3601)),
            Err(GrantError::BadLifetime)
        );
        assert_eq!(
            with(&|c| c["iat"] = json!(NOW + 3600)),
            Err(GrantError::BadLifetime)
        );
        assert_eq!(
            with(&|c| {
                c["iat"] = json!(NOW - 3600);
                c["exp"] = json!(NOW)
            }),
            Err(GrantError::BadLifetime),
            "expired exactly now"
        );
        assert_eq!(
            with(&|c| c["iat"] = json!(NOW + 200)),
            Ok(()),
            "iat within the skew"
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            Err(GrantError::BadLifetime)
        );
    }

    #[test]
    fn parses_form_fields() {
        let ok = format!(
            "grant_type={}&assertion=abc",
            JWT_BEARER_GRANT.replace(':', "%3A")
        );
        assert_eq!(parse_form(ok.as_bytes()), Ok("abc".to_owned()));
        assert_eq!(
            parse_form(b"assertion=x"),
            Err(GrantError::MissingParameter("grant_type"))
        );
        assert!(matches!(
            parse_form(b"grant_type=password"),
            Err(GrantError::UnsupportedGrantType(_))
        ));
        assert_eq!(
            parse_form(format!("grant_type={JWT_BEARER_GRANT}").as_bytes()),
            Err(GrantError::MissingParameter("assertion"))
        );
    }

    #[test]
    fn token_store_lifecycle() {
        let mut s = TokenStore::default();
        let a = s.issue(1000, 10);
        let b = s.issue(1000, 10);
        assert_eq!((a.as_str(), b.as_str()), ("fake-1", "fake-2"));
        assert!(s.is_valid(&a, 10_999) && !s.is_valid(&a, 11_000));
        assert!(!s.is_valid("nope", 0));
        s.expire_all(5000);
        assert!(!s.is_valid(&b, 5000));
        let c = s.issue(5000, 10);
        s.revoke_all();
        assert!(!s.is_valid(&c, 5000));
    }
}
