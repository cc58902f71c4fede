//! TEST-ONLY credentials: the committed RSA key, the fake service-account JSON built around
//! it, and a helper that signs JWT assertions the way service-account clients do.

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};

/// TEST-ONLY RSA-2048 PKCS#8 private key (see `fixtures/README.md`). Never use it for anything real.
pub const TEST_ONLY_PRIVATE_KEY_PEM: &str =
    include_str!("../fixtures/TEST-ONLY-service-account-key.pem");

/// Public half of [`TEST_ONLY_PRIVATE_KEY_PEM`]; the token endpoint verifies assertions with it.
pub const TEST_ONLY_PUBLIC_KEY_PEM: &str =
    include_str!("../fixtures/TEST-ONLY-service-account-pub.pem");

/// `private_key_id` of the fake service account.
pub const PRIVATE_KEY_ID: &str = "0000000000000000000000000000000000test";

/// `client_id` of the fake service account.
pub const CLIENT_ID: &str = "100000000000000000000";

/// The scopes a database token needs.
pub const REQUIRED_SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/firebase.database",
    "https://www.googleapis.com/auth/userinfo.email",
];

/// `client_email` for a project.
pub fn client_email(project_id: &str) -> String {
    format!("firebase-adminsdk-standin@{project_id}.iam.gserviceaccount.com")
}

/// The service-account JSON, shaped like a real key file, whose `token_uri` is `token_uri`.
pub fn service_account(project_id: &str, token_uri: &str) -> Value {
    let email = client_email(project_id);
    json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": PRIVATE_KEY_ID,
        "private_key": TEST_ONLY_PRIVATE_KEY_PEM,
        "client_email": email,
        "client_id": CLIENT_ID,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": format!(
            "https://www.googleapis.com/robot/v1/metadata/x509/{}",
            email.replace('@', "%40")
        ),
        "universe_domain": "googleapis.com",
    })
}

/// `FIREBASE_KEY`: standard base64 of the service-account JSON.
pub fn firebase_key_b64(service_account_json: &str) -> String {
    STANDARD.encode(service_account_json)
}

/// Why [`sign_assertion`] failed.
#[derive(Debug, thiserror::Error)]
#[error("could not sign the test assertion: {0}")]
pub struct SignError(String);

/// Signs `claims` as an RS256 JWT with the TEST-ONLY key, with padded (`URL_SAFE`, as
/// gcp_auth and yup-oauth2 send) or unpadded base64url segments. Intended for tests of the
/// token endpoint.
pub fn sign_assertion(claims: &Value, padded: bool) -> Result<String, SignError> {
    let engine = if padded { URL_SAFE } else { URL_SAFE_NO_PAD };
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": PRIVATE_KEY_ID});
    let message = format!(
        "{}.{}",
        engine.encode(header.to_string()),
        engine.encode(claims.to_string())
    );
    let key = EncodingKey::from_rsa_pem(TEST_ONLY_PRIVATE_KEY_PEM.as_bytes())
        .map_err(|e| SignError(e.to_string()))?;
    let signer = (DEFAULT_PROVIDER.signer_factory)(&Algorithm::RS256, &key)
        .map_err(|e| SignError(e.to_string()))?;
    let signature: Vec<u8> = signer
        .try_sign(message.as_bytes())
        .map_err(|e| SignError(e.to_string()))?;
    Ok(format!("{message}.{}", engine.encode(signature)))
}

/// Standard claims for an assertion to `token_uri`, valid from `iat` for one hour.
pub fn assertion_claims(project_id: &str, token_uri: &str, iat: i64) -> Value {
    json!({
        "iss": client_email(project_id),
        "scope": REQUIRED_SCOPES.join(" "),
        "aud": token_uri,
        "iat": iat,
        "exp": iat + 3600,
    })
}
