//! The User object as the older proxy's admin API, exports and Firebase layout spell it.
//! Field names, types and units (epoch milliseconds) are kept so existing data imports
//! unchanged; optional fields that are absent are omitted, never sent as `null`.

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// What a user may do; see `docs/user-management.md`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserType {
    #[default]
    Normal,
    /// Exempt from the IP limit, auto-ban and rate limiting; not from being disabled.
    Special,
    /// Expires at `expiresAt`; purged `POW_TOKEN_PURGE_HOURS` after it expired or was disabled.
    Temporary,
}

impl UserType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Special => "special",
            Self::Temporary => "temporary",
        }
    }
}

/// A model-family map (`tokenCounts`, `tokenLimits`, `tokenRefresh`). JavaScript numbers are
/// doubles, so values are kept as `f64` and written back as integers when they are integral,
/// exactly as `JSON.stringify` would. Key order is kept, as JavaScript keeps it.
pub type FamilyValues = IndexMap<String, JsNumber>;

/// A non-negative JSON number with JavaScript's formatting.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct JsNumber(pub f64);

/// Integers beyond 2^53 are not exact in JavaScript either.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// The largest count or time the API takes (2^53 - 1), so the largest one it may show.
pub const MAX_SAFE_COUNT: u64 = MAX_SAFE_INTEGER as u64;

/// The longest string a user holds (`adminNote`, `disabledReason`, any string inside `meta` or
/// `tokenCount`): far above any note, far below what a store refuses (Firebase: 10 MB per
/// string), so a write the API accepted is never dropped by the store.
pub const MAX_NOTE_BYTES: usize = 1 << 20;

impl Serialize for JsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.fract() == 0.0 && v.abs() <= MAX_SAFE_INTEGER {
            s.serialize_i64(v as i64)
        } else {
            s.serialize_f64(v)
        }
    }
}

impl<'de> Deserialize<'de> for JsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 {
            return Err(serde::de::Error::custom(format!(
                "expected a non-negative number, got {v}"
            )));
        }
        Ok(JsNumber(v))
    }
}

/// The full user, as exported by `GET /admin/users` and stored in every backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    pub token: String,
    /// Every IP seen; RTDB drops empty arrays, hence the default.
    #[serde(default)]
    pub ip: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
    #[serde(rename = "type", default)]
    pub user_type: UserType,
    #[serde(default)]
    pub prompt_count: u64,
    /// Deprecated in the older proxy; kept verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_count: Option<Value>,
    #[serde(default)]
    pub token_counts: FamilyValues,
    #[serde(default)]
    pub token_limits: FamilyValues,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub token_refresh: FamilyValues,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ips: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Map<String, Value>>,
}

impl User {
    /// A fresh user as `POST /admin/users` makes it.
    pub fn new(token: String, user_type: UserType, now_ms: u64) -> Self {
        Self {
            token,
            ip: Vec::new(),
            nickname: None,
            user_type,
            prompt_count: 0,
            token_count: None,
            token_counts: FamilyValues::new(),
            token_limits: FamilyValues::new(),
            token_refresh: FamilyValues::new(),
            created_at: now_ms,
            last_used_at: None,
            disabled_at: None,
            disabled_reason: None,
            expires_at: None,
            max_ips: None,
            admin_note: None,
            meta: Some(Map::new()),
        }
    }

    /// Checks what serde cannot: key rules, lengths. `at` prefixes field names in errors.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        validate_token(&self.token).map_err(|p| FieldError::new(at, "token", p))?;
        validate_ips(&self.ip, at)?;
        if let Some(nick) = &self.nickname {
            validate_nickname(nick).map_err(|p| FieldError::new(at, "nickname", p))?;
        }
        for (name, value) in [
            ("promptCount", Some(self.prompt_count)),
            ("createdAt", Some(self.created_at)),
            ("lastUsedAt", self.last_used_at),
            ("disabledAt", self.disabled_at),
            ("expiresAt", self.expires_at),
        ] {
            if value.is_some_and(|v| v > MAX_SAFE_INTEGER as u64) {
                return Err(FieldError::new(
                    at,
                    name,
                    "is larger than 9007199254740991 (2^53 - 1), the largest integer JavaScript \
                     and the stores keep exactly",
                ));
            }
        }
        for (name, text) in [
            ("adminNote", &self.admin_note),
            ("disabledReason", &self.disabled_reason),
        ] {
            if text.as_ref().is_some_and(|t| t.len() > MAX_NOTE_BYTES) {
                return Err(FieldError::new(
                    at,
                    name,
                    format!("is longer than {MAX_NOTE_BYTES} bytes"),
                ));
            }
        }
        for (name, map) in [
            ("tokenCounts", &self.token_counts),
            ("tokenLimits", &self.token_limits),
            ("tokenRefresh", &self.token_refresh),
        ] {
            validate_families(map, at, name)?;
        }
        if let Some(meta) = &self.meta {
            validate_tree_keys(meta, at, "meta", 1)?;
        }
        if let Some(count) = &self.token_count {
            validate_tree_value(count, at, "tokenCount", 1)?;
        }
        Ok(())
    }
}

/// Every field name of the stored user, as the older proxy's layout spells it.
pub const STORED_FIELDS: &[&str] = &[
    "token",
    "ip",
    "nickname",
    "type",
    "promptCount",
    "tokenCount",
    "tokenCounts",
    "tokenLimits",
    "tokenRefresh",
    "createdAt",
    "lastUsedAt",
    "disabledAt",
    "disabledReason",
    "expiresAt",
    "maxIps",
    "adminNote",
    "meta",
];

/// A stored user that could be read, and what had to be left out of it.
#[derive(Debug)]
pub struct StoredUser {
    pub user: User,
    /// Fields tollgate does not know (kept in the store, not in the cache).
    pub unknown_fields: Vec<String>,
    /// `ip` entries left out because they are not strings (so not addresses).
    pub non_string_ips: usize,
}

impl User {
    /// Reads a user as a shared store (Firebase) holds it, leniently: the key is the token,
    /// unknown fields are left out (and named), an `ip` list stored as an index-keyed object
    /// or with holes is read as a list, and its entries that are not strings are left out
    /// (counted): one hand-edited entry must neither lock the user out nor, read back before
    /// an address is added, empty the list. Only a user whose known fields are malformed fails.
    pub fn from_stored(token: &str, value: Value) -> Result<StoredUser, String> {
        let Value::Object(mut fields) = value else {
            return Err("the stored value is not an object".into());
        };
        let mut unknown_fields = Vec::new();
        fields.retain(|name, _| {
            let known = STORED_FIELDS.contains(&name.as_str());
            if !known {
                unknown_fields.push(name.clone());
            }
            known
        });
        fields.insert("token".into(), Value::String(token.to_string()));
        let mut non_string_ips = 0;
        if let Some(ip) = fields.get_mut("ip") {
            let (addresses, others): (Vec<Value>, Vec<Value>) = stored_list(std::mem::take(ip))
                .into_iter()
                .partition(Value::is_string);
            non_string_ips = others.len();
            *ip = Value::Array(addresses);
        }
        for name in STORED_MAPS {
            if let Some(map) = fields.get_mut(*name) {
                index_keyed(map);
            }
        }
        for name in STORED_WHOLE_NUMBERS {
            if let Some(number) = fields.get_mut(*name) {
                truncate_float(number);
            }
        }
        let user = serde_json::from_value::<User>(Value::Object(fields))
            .map_err(|e| format!("malformed field: {e}"))?;
        Ok(StoredUser {
            user,
            unknown_fields,
            non_string_ips,
        })
    }
}

/// Whole numbers here, JavaScript numbers in the older proxy: its admin API stored what it was
/// sent (`expiresAt: 1700000000000.5` from a script doing float arithmetic), and Firebase
/// returns a large or fractional number in exponent form (`1.7000000000005E12`).
const STORED_WHOLE_NUMBERS: &[&str] = &[
    "promptCount",
    "createdAt",
    "lastUsedAt",
    "disabledAt",
    "expiresAt",
    "maxIps",
];

/// A non-negative float becomes its whole part (a fraction of a millisecond or of a count means
/// nothing here), so such a user loads instead of being left out. Anything else is left for
/// deserialization to refuse.
fn truncate_float(number: &mut Value) {
    if let Some(v) = number.as_f64().filter(|_| number.is_f64()) {
        if v.is_finite() && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
            *number = Value::from(v.trunc() as u64);
        }
    }
}

/// Maps keyed by names an admin or the older proxy chose. Firebase returns an object whose
/// keys are all small integers (`meta: {"1": "x"}`) as an array, with `null` holes.
const STORED_MAPS: &[&str] = &["tokenCounts", "tokenLimits", "tokenRefresh", "meta"];

/// An array Firebase made of an index-keyed object becomes that object again (holes left
/// out). Anything else is left for deserialization.
fn index_keyed(value: &mut Value) {
    if let Value::Array(items) = value {
        let map = std::mem::take(items)
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_null())
            .map(|(i, v)| (i.to_string(), v))
            .collect();
        *value = Value::Object(map);
    }
}

/// A list as Firebase may return it: an array with `null` holes, or an object keyed by index.
fn stored_list(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items.into_iter().filter(|v| !v.is_null()).collect(),
        Value::Object(map) => {
            let mut items: Vec<(u64, Value)> = map
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.parse().unwrap_or(u64::MAX), v))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            items.into_iter().map(|(_, v)| v).collect()
        }
        Value::Null => Vec::new(),
        single => vec![single],
    }
}

/// A validation failure naming the field (`users[3].maxIps`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(at: &str, field: &str, problem: impl Into<String>) -> Self {
        let field = if at.is_empty() {
            field.to_string()
        } else {
            format!("{at}.{field}")
        };
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Longest token, in bytes: a Firebase key's limit.
pub const MAX_TOKEN_BYTES: usize = 768;
pub const MAX_NICKNAME_CHARS: usize = 80;
/// An `ip` entry is an address or the older proxy's `risu<id>-<ip>` key; anything longer is junk.
const MAX_IP_ENTRY_BYTES: usize = 256;

/// Tokens become Firebase keys (`/users/<token>`), so they follow Firebase's key rules. They
/// are credentials too, and a presented one is trimmed (`Authorization`, `x-api-key`): a token
/// with leading or trailing white space could never be presented that way.
pub fn validate_token(token: &str) -> Result<(), String> {
    validate_key(token, "token")?;
    if token.trim() != token {
        return Err(
            "token must not start or end with white space (presented tokens are \
                    trimmed, so it could never match)"
                .into(),
        );
    }
    Ok(())
}

/// Firebase key rules: non-empty, at most 768 bytes, none of `. $ # [ ] /`, no control characters.
pub fn validate_key(key: &str, what: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if key.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "{what} is {} bytes; at most {MAX_TOKEN_BYTES} are allowed",
            key.len()
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| matches!(c, '.' | '$' | '#' | '[' | ']' | '/'))
    {
        return Err(format!(
            "{what} must not contain '{c}' (Firebase key rules forbid . $ # [ ] /)"
        ));
    }
    if key.chars().any(|c| c.is_control()) {
        return Err(format!("{what} must not contain control characters"));
    }
    Ok(())
}

fn validate_nickname(nick: &str) -> Result<(), String> {
    let chars = nick.chars().count();
    if chars > MAX_NICKNAME_CHARS {
        return Err(format!(
            "is {chars} characters; at most {MAX_NICKNAME_CHARS} are allowed"
        ));
    }
    if nick.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn validate_ips(ips: &[String], at: &str) -> Result<(), FieldError> {
    for (i, ip) in ips.iter().enumerate() {
        if ip.is_empty() || ip.len() > MAX_IP_ENTRY_BYTES || ip.chars().any(|c| c.is_control()) {
            return Err(FieldError::new(
                at,
                &format!("ip[{i}]"),
                format!("must be 1 to {MAX_IP_ENTRY_BYTES} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

/// Family names are Firebase keys too (`tokenCounts/<family>`).
pub fn validate_families(map: &FamilyValues, at: &str, name: &str) -> Result<(), FieldError> {
    for family in map.keys() {
        validate_key(family, "model family name")
            .map_err(|p| FieldError::new(at, &format!("{name}.{family}"), p))?;
    }
    Ok(())
}

/// Levels of nesting allowed inside a free-form field (`meta`, `tokenCount`). Firebase refuses
/// a write nested more than 32 levels below the database root; a user's field sits at
/// `/<ref>/<token>/<field>/…`, and the ref name (`FIREBASE_USERS_REF_NAME`) may itself have
/// several segments, so 16 levels keep a wide margin below Firebase's limit while allowing any
/// realistic metadata.
pub const MAX_FREE_FORM_DEPTH: usize = 16;

/// Object keys inside free-form JSON become Firebase keys too, so they follow the same rules
/// (a refused key makes Firebase drop the write after the admin was told it persisted).
/// `depth` is the level of this object's keys (1 = the field's own keys).
fn validate_tree_keys(
    map: &Map<String, Value>,
    at: &str,
    path: &str,
    depth: usize,
) -> Result<(), FieldError> {
    for (key, value) in map {
        let child = format!("{path}.{key}");
        if depth > MAX_FREE_FORM_DEPTH {
            return Err(too_deep(at, &child));
        }
        validate_key(key, "key").map_err(|p| FieldError::new(at, &child, p))?;
        validate_tree_value(value, at, &child, depth + 1)?;
    }
    Ok(())
}

/// Arrays are stored by Firebase as objects keyed by index: a level of their own.
fn validate_tree_items(
    items: &[Value],
    at: &str,
    path: &str,
    depth: usize,
) -> Result<(), FieldError> {
    for (i, value) in items.iter().enumerate() {
        let child = format!("{path}[{i}]");
        if depth > MAX_FREE_FORM_DEPTH {
            return Err(too_deep(at, &child));
        }
        validate_tree_value(value, at, &child, depth + 1)?;
    }
    Ok(())
}

fn validate_tree_value(
    value: &Value,
    at: &str,
    path: &str,
    depth: usize,
) -> Result<(), FieldError> {
    match value {
        Value::Object(map) => validate_tree_keys(map, at, path, depth),
        Value::Array(items) => validate_tree_items(items, at, path, depth),
        Value::String(text) if text.len() > MAX_NOTE_BYTES => Err(FieldError::new(
            at,
            path,
            format!("is longer than {MAX_NOTE_BYTES} bytes"),
        )),
        _ => Ok(()),
    }
}

fn too_deep(at: &str, path: &str) -> FieldError {
    FieldError::new(
        at,
        path,
        format!("nested deeper than {MAX_FREE_FORM_DEPTH} levels (Firebase limits nesting)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_proxy_export_round_trips() {
        let json = r#"{"token":"5d7c4c1e-2a55-4f6e-9d7a-0d1c2b3a4f5e","ip":["1.2.3.4","::ffff:5.6.7.8"],"nickname":"bob","type":"temporary","promptCount":12,"tokenCount":0,"tokenCounts":{"turbo":1200,"gpt4":0.5},"tokenLimits":{"gpt4":100000},"tokenRefresh":{"gpt4":5},"createdAt":1700000000000,"lastUsedAt":1700000001000,"disabledAt":1700000002000,"disabledReason":"bye","expiresAt":1700000003000,"maxIps":2,"adminNote":"n","meta":{"refreshable":true}}"#;
        let user: User = serde_json::from_str(json).unwrap();
        assert_eq!(user.prompt_count, 12);
        assert_eq!(serde_json::to_string(&user).unwrap(), json);
    }

    #[test]
    fn rtdb_dropped_collections_default() {
        let user: User =
            serde_json::from_str(r#"{"token":"t","type":"normal","promptCount":0,"createdAt":1}"#)
                .unwrap();
        assert!(user.ip.is_empty() && user.token_counts.is_empty() && user.meta.is_none());
    }

    #[test]
    fn stored_users_are_read_leniently() {
        let stored = User::from_stored(
            "key-token",
            serde_json::json!({"token": "other", "type": "special", "promptCount": 3,
                "createdAt": 1, "ip": {"0": "1.1.1.1", "2": "2.2.2.2"}, "legacyField": 7}),
        )
        .unwrap();
        assert_eq!(stored.user.token, "key-token", "the key is the token");
        assert_eq!(stored.user.ip, vec!["1.1.1.1", "2.2.2.2"]);
        assert_eq!(stored.unknown_fields, vec!["legacyField"]);
        let holes = User::from_stored("t", serde_json::json!({"ip": [null, "3.3.3.3"]})).unwrap();
        assert_eq!(holes.user.ip, vec!["3.3.3.3"]);
        let edited = User::from_stored(
            "t",
            serde_json::json!({"ip": ["1.1.1.1", 5, {"a": 1}, "2.2.2.2", true]}),
        )
        .unwrap();
        assert_eq!(
            edited.user.ip,
            vec!["1.1.1.1", "2.2.2.2"],
            "non-strings left out"
        );
        assert_eq!(edited.non_string_ips, 3);
        assert!(User::from_stored("t", serde_json::json!(5)).is_err());
        assert!(User::from_stored("t", serde_json::json!({"promptCount": "x"})).is_err());
    }

    /// A float where a whole number belongs (the older proxy stored what its API was sent, and
    /// Firebase returns it in exponent form) is read as its whole part: the user still loads.
    #[test]
    fn stored_floats_in_whole_number_fields_are_truncated() {
        let raw = r#"{"promptCount": 3.0, "createdAt": 1.7E12, "lastUsedAt": 5.9,
            "disabledAt": 1.7000000000005E12, "expiresAt": 1700000000000.5, "maxIps": 2.0}"#;
        let stored = User::from_stored("t", serde_json::from_str(raw).unwrap()).unwrap();
        let user = stored.user;
        assert_eq!(user.prompt_count, 3);
        assert_eq!(user.created_at, 1_700_000_000_000);
        assert_eq!(user.last_used_at, Some(5));
        assert_eq!(user.disabled_at, Some(1_700_000_000_000));
        assert_eq!(user.expires_at, Some(1_700_000_000_000));
        assert_eq!(user.max_ips, Some(2));
        for bad in [
            r#"{"expiresAt": -1.5}"#,
            r#"{"maxIps": 5e9}"#,
            r#"{"createdAt": 1e20}"#,
        ] {
            let value = serde_json::from_str(bad).unwrap();
            assert!(User::from_stored("t", value).is_err(), "{bad}");
        }
    }

    /// serde_json's default float parsing is not always correctly rounded: a count with 17
    /// significant digits came back one unit in the last place off after a trip through JSON
    /// (the SQLite store keeps users as JSON text; found by fuzzing). `float_roundtrip` is on.
    #[test]
    fn counts_survive_a_trip_through_json_unchanged() {
        let mut user = User::new("t".into(), UserType::Normal, 1);
        for text in [
            "1.3333333333333333e32",
            "0.30000000000000004",
            "123456.78901234567",
        ] {
            let value: f64 = text.parse().unwrap();
            user.token_counts.insert("gpt4".into(), JsNumber(value));
            let json = serde_json::to_string(&user).unwrap();
            let back: User = serde_json::from_str(&json).unwrap();
            assert_eq!(back, user, "{json}");
        }
    }

    #[test]
    fn counts_and_times_stay_within_2_pow_53_and_notes_within_a_mebibyte() {
        let mut user = User::new("t".into(), UserType::Normal, 1);
        user.prompt_count = 9_007_199_254_740_991;
        user.expires_at = Some(9_007_199_254_740_991);
        user.admin_note = Some("n".repeat(MAX_NOTE_BYTES));
        assert!(user.validate("").is_ok());
        user.expires_at = Some(9_007_199_254_740_992);
        assert_eq!(user.validate("").unwrap_err().field, "expiresAt");
        user.expires_at = None;
        user.prompt_count = u64::MAX;
        assert_eq!(user.validate("u").unwrap_err().field, "u.promptCount");
        user.prompt_count = 0;
        user.disabled_reason = Some("r".repeat(MAX_NOTE_BYTES + 1));
        assert_eq!(user.validate("").unwrap_err().field, "disabledReason");
        user.disabled_reason = None;
        // Strings anywhere in the free-form fields too: Firebase refused an 11 MB one after the
        // API had accepted it.
        let long = Value::String("m".repeat(MAX_NOTE_BYTES + 1));
        user.meta = Some(Map::from_iter([(
            "a".into(),
            serde_json::json!([{ "b": long }]),
        )]));
        assert_eq!(user.validate("").unwrap_err().field, "meta.a[0].b");
        user.meta = None;
        user.token_count = Some(long);
        assert_eq!(user.validate("").unwrap_err().field, "tokenCount");
        user.token_count = Some(Value::String("m".repeat(MAX_NOTE_BYTES)));
        assert!(user.validate("").is_ok());
    }

    #[test]
    fn integral_numbers_print_as_integers() {
        assert_eq!(serde_json::to_string(&JsNumber(4000.0)).unwrap(), "4000");
        assert_eq!(serde_json::to_string(&JsNumber(0.25)).unwrap(), "0.25");
        assert!(serde_json::from_str::<JsNumber>("-1").is_err());
    }

    #[test]
    fn token_key_rules() {
        assert!(validate_token("5d7c4c1e-2a55-4f6e-9d7a-0d1c2b3a4f5e").is_ok());
        for bad in [
            "",
            "a.b",
            "a$b",
            "a#b",
            "a[b",
            "a]b",
            "a/b",
            "a\u{7f}b",
            "a\nb",
            " a",
            "a ",
            "a\u{a0}",
            "\u{3000}a",
        ] {
            assert!(validate_token(bad).is_err(), "{bad:?}");
        }
        assert!(validate_token(&"x".repeat(768)).is_ok());
        assert!(validate_token(&"x".repeat(769)).is_err());
        assert!(
            validate_token("a b").is_ok(),
            "inner white space is presented as it is"
        );
    }

    #[test]
    fn validate_names_nested_fields() {
        let mut user = User::new("t".into(), UserType::Normal, 1);
        user.token_limits.insert("gpt.4".into(), JsNumber(1.0));
        assert_eq!(
            user.validate("users[2]").unwrap_err().field,
            "users[2].tokenLimits.gpt.4"
        );
        let mut user = User::new("t".into(), UserType::Normal, 1);
        user.nickname = Some("x".repeat(81));
        assert_eq!(user.validate("").unwrap_err().field, "nickname");
    }

    fn with_meta(meta: Value) -> User {
        let mut user = User::new("t".into(), UserType::Normal, 1);
        user.meta = Some(meta.as_object().unwrap().clone());
        user
    }

    #[test]
    fn free_form_keys_follow_firebase_key_rules() {
        for (meta, field) in [
            (serde_json::json!({"a.b": 1}), "meta.a.b"),
            (serde_json::json!({"$x": 1}), "meta.$x"),
            (serde_json::json!({"a/b": 1}), "meta.a/b"),
            (serde_json::json!({"": 1}), "meta."),
            (serde_json::json!({"ok": {"a\u{1}": 1}}), "meta.ok.a\u{1}"),
            (serde_json::json!({"ok": [{"#": 1}]}), "meta.ok[0].#"),
        ] {
            let err = with_meta(meta.clone()).validate("users[1]").unwrap_err();
            assert_eq!(err.field, format!("users[1].{field}"), "{meta}");
        }
        with_meta(serde_json::json!({"refreshable": false, "n": {"a": [1, {"b": null}]}}))
            .validate("")
            .unwrap();

        let mut user = User::new("t".into(), UserType::Normal, 1);
        user.token_count = Some(serde_json::json!({"x": {"a]": 1}}));
        assert_eq!(user.validate("").unwrap_err().field, "tokenCount.x.a]");
        user.token_count = Some(serde_json::json!([{"a[": 1}]));
        assert_eq!(user.validate("").unwrap_err().field, "tokenCount[0].a[");
        user.token_count = Some(serde_json::json!(5));
        user.validate("").unwrap();
    }

    #[test]
    fn free_form_nesting_is_bounded() {
        let nest = |levels: usize| {
            let mut v = serde_json::json!(1);
            for _ in 0..levels {
                v = serde_json::json!({ "k": v });
            }
            v
        };
        with_meta(nest(MAX_FREE_FORM_DEPTH)).validate("").unwrap();
        let err = with_meta(nest(MAX_FREE_FORM_DEPTH + 1))
            .validate("")
            .unwrap_err();
        assert_eq!(
            err.field,
            format!("meta{}", ".k".repeat(MAX_FREE_FORM_DEPTH + 1))
        );
        assert!(err.problem.contains("nested deeper"), "{err}");
    }
}
