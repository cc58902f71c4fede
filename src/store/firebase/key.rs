//! `FIREBASE_KEY`: a base64-encoded service-account JSON, decoded as leniently as Node's
//! `Buffer.from(key, "base64")` (padding optional, URL-safe alphabet, embedded whitespace).

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::EncodingKey;
use serde::Deserialize;

/// Google's token endpoint, for keys that do not name one.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// Why `FIREBASE_KEY` cannot be used. Never contains any part of the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("FIREBASE_KEY: not base64 (standard or URL-safe) nor a JSON object")]
    NotBase64,
    #[error("FIREBASE_KEY: does not decode to a service-account JSON object: {0}")]
    NotJson(String),
    #[error("FIREBASE_KEY: not a service-account key (\"type\" is {0:?})")]
    WrongType(String),
    #[error("FIREBASE_KEY: private_key is not an RSA private key in PEM form: {0}")]
    BadPrivateKey(String),
}

/// The parts of a service-account key tollgate uses. `Debug` leaves the private key out.
pub struct ServiceAccount {
    pub client_email: String,
    pub token_uri: String,
    pub project_id: Option<String>,
    pub key_id: Option<String>,
    pub signing_key: EncodingKey,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct KeyJson {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
}

/// Decodes `FIREBASE_KEY` (base64 of the JSON; the JSON itself is accepted too).
pub fn decode(raw: &str) -> Result<ServiceAccount, KeyError> {
    let json = lenient_base64(raw)?;
    let key: KeyJson = serde_json::from_slice(&json).map_err(|e| {
        // serde's message names the field and position, never the value.
        KeyError::NotJson(e.to_string())
    })?;
    if let Some(kind) = key.kind.as_deref() {
        if kind != "service_account" {
            return Err(KeyError::WrongType(kind.to_string()));
        }
    }
    // Keys pasted through shells sometimes keep `\n` as two characters.
    let pem = if key.private_key.contains('\n') {
        key.private_key
    } else {
        key.private_key.replace("\\n", "\n")
    };
    let signing_key = EncodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
    Ok(ServiceAccount {
        client_email: key.client_email,
        token_uri: key
            .token_uri
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string()),
        project_id: key.project_id,
        key_id: key.private_key_id.filter(|k| !k.is_empty()),
        signing_key,
    })
}

/// Bytes of `raw`: whitespace removed, then standard, unpadded, URL-safe and URL-safe
/// unpadded base64 in turn. A value that already is a JSON object is taken as is.
pub fn lenient_base64(raw: &str) -> Result<Vec<u8>, KeyError> {
    let trimmed = raw.trim();
    if trimmed.starts_with('{') {
        return Ok(trimmed.as_bytes().to_vec());
    }
    let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    let unpadded = compact.trim_end_matches('=');
    for (engine, text) in [
        (&STANDARD, compact.as_str()),
        (&STANDARD_NO_PAD, unpadded),
        (&URL_SAFE, compact.as_str()),
        (&URL_SAFE_NO_PAD, unpadded),
    ] {
        if let Ok(bytes) = engine.decode(text) {
            return Ok(bytes);
        }
    }
    Err(KeyError::NotBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_json() -> String {
        let pem =
            include_str!("../../../crates/rtdb-standin/fixtures/TEST-ONLY-service-account-key.pem");
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": "sa@p.iam.gserviceaccount.com",
            "token_uri": "http://127.0.0.1:1/token",
        })
        .to_string()
    }

    #[test]
    fn decodes_every_base64_flavour() {
        let json = fixture_json();
        let std = STANDARD.encode(&json);
        let variants = [
            std.clone(),
            std.trim_end_matches('=').to_string(),
            URL_SAFE.encode(&json),
            URL_SAFE_NO_PAD.encode(&json),
            std.as_bytes()
                .chunks(60)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n"),
            format!("  {std}\r\n"),
            json.clone(),
        ];
        for v in variants {
            let account = decode(&v).unwrap();
            assert_eq!(account.client_email, "sa@p.iam.gserviceaccount.com");
            assert_eq!(account.token_uri, "http://127.0.0.1:1/token");
            assert_eq!(account.key_id.as_deref(), Some("k1"));
        }
    }

    #[test]
    fn explains_bad_keys_without_echoing_them() {
        assert_eq!(
            decode("not base64 at all!!").unwrap_err(),
            KeyError::NotBase64
        );
        assert!(matches!(
            decode(&STANDARD.encode("[1,2]")).unwrap_err(),
            KeyError::NotJson(_)
        ));
        let bad_pem = serde_json::json!({"client_email": "a", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"});
        let err = decode(&STANDARD.encode(bad_pem.to_string())).unwrap_err();
        assert!(matches!(err, KeyError::BadPrivateKey(_)), "{err}");
        let user_key =
            serde_json::json!({"type": "authorized_user", "client_email": "a", "private_key": "x"});
        assert!(matches!(
            decode(&STANDARD.encode(user_key.to_string())).unwrap_err(),
            KeyError::WrongType(_)
        ));
    }

    #[test]
    fn default_token_uri() {
        let mut json: serde_json::Value = serde_json::from_str(&fixture_json()).unwrap();
        json.as_object_mut().unwrap().remove("token_uri");
        let account = decode(&STANDARD.encode(json.to_string())).unwrap();
        assert_eq!(account.token_uri, DEFAULT_TOKEN_URI);
        assert!(!format!("{account:?}").contains("PRIVATE"));
    }
}
