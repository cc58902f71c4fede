//! Partial updates (`PUT /admin/users/{token}` and the bulk import): every field optional,
//! `null` removes an optional field, any other value replaces it. Unknown fields are refused
//! (the older proxy silently dropped them, hiding typos in import files).

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::fields::Fields;
use super::model::{validate_token, FamilyValues, FieldError, User, UserType};

/// A field of a partial update: absent, explicitly `null`, or a value.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Patch<T> {
    #[default]
    Absent,
    Null,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            Some(v) => Patch::Set(v),
            None => Patch::Null,
        })
    }
}

impl<T> Patch<T> {
    fn is_absent(&self) -> bool {
        matches!(self, Patch::Absent)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserPatch {
    #[serde(default)]
    pub token: Patch<String>,
    #[serde(default)]
    pub ip: Patch<Vec<String>>,
    #[serde(default)]
    pub nickname: Patch<String>,
    #[serde(rename = "type", default)]
    pub user_type: Patch<UserType>,
    #[serde(default, deserialize_with = "js_integer")]
    pub prompt_count: Patch<u64>,
    #[serde(default)]
    pub token_count: Patch<Value>,
    #[serde(default)]
    pub token_counts: Patch<FamilyValues>,
    #[serde(default)]
    pub token_limits: Patch<FamilyValues>,
    #[serde(default)]
    pub token_refresh: Patch<FamilyValues>,
    #[serde(default, deserialize_with = "js_integer")]
    pub created_at: Patch<u64>,
    #[serde(default, deserialize_with = "js_integer")]
    pub last_used_at: Patch<u64>,
    #[serde(default, deserialize_with = "js_integer")]
    pub disabled_at: Patch<u64>,
    #[serde(default)]
    pub disabled_reason: Patch<String>,
    #[serde(default, deserialize_with = "js_integer")]
    pub expires_at: Patch<u64>,
    /// As in the older proxy (`z.coerce.number().int().min(0)`), a string holding the number
    /// (`"3"`, as a form field or a shell script sends it) is taken as the number.
    #[serde(default, deserialize_with = "coerced_max_ips")]
    pub max_ips: Patch<u32>,
    #[serde(default)]
    pub admin_note: Patch<String>,
    #[serde(default)]
    pub meta: Patch<Map<String, Value>>,
}

impl UserPatch {
    /// Rejects `null` on required fields and values that break key or length rules.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        let required_null = [
            ("ip", matches!(self.ip, Patch::Null)),
            ("type", matches!(self.user_type, Patch::Null)),
            ("promptCount", matches!(self.prompt_count, Patch::Null)),
            ("tokenCounts", matches!(self.token_counts, Patch::Null)),
            ("tokenLimits", matches!(self.token_limits, Patch::Null)),
            ("createdAt", matches!(self.created_at, Patch::Null)),
            ("token", matches!(self.token, Patch::Null)),
        ];
        if let Some((name, _)) = required_null.iter().find(|(_, is_null)| *is_null) {
            return Err(FieldError::new(at, name, "is required and cannot be null"));
        }
        if let Patch::Set(token) = &self.token {
            validate_token(token).map_err(|p| FieldError::new(at, "token", p))?;
        }
        // Reuse the full user's checks for the fields present.
        let mut probe = User::new("probe".into(), UserType::Normal, 0);
        self.apply_to(&mut probe);
        probe.validate(at)
    }

    /// Applies the patch (not the token) to `user`.
    pub fn apply_to(&self, user: &mut User) {
        set_required(&mut user.ip, &self.ip);
        set_optional(&mut user.nickname, &self.nickname);
        set_required(&mut user.user_type, &self.user_type);
        set_required(&mut user.prompt_count, &self.prompt_count);
        set_optional(&mut user.token_count, &self.token_count);
        set_required(&mut user.token_counts, &self.token_counts);
        set_required(&mut user.token_limits, &self.token_limits);
        match &self.token_refresh {
            Patch::Absent => {}
            Patch::Null => user.token_refresh.clear(),
            Patch::Set(v) => user.token_refresh = v.clone(),
        }
        set_required(&mut user.created_at, &self.created_at);
        set_optional(&mut user.last_used_at, &self.last_used_at);
        set_optional(&mut user.disabled_at, &self.disabled_at);
        set_optional(&mut user.disabled_reason, &self.disabled_reason);
        set_optional(&mut user.expires_at, &self.expires_at);
        set_optional(&mut user.max_ips, &self.max_ips);
        set_optional(&mut user.admin_note, &self.admin_note);
        set_optional(&mut user.meta, &self.meta);
    }

    /// The fields this patch touches.
    pub fn fields(&self) -> Fields {
        let mut f = Fields::NONE;
        let mut add = |present: bool, bit: Fields| {
            if present {
                f = f | bit;
            }
        };
        add(!self.ip.is_absent(), Fields::IP | Fields::IP_REPLACED);
        add(!self.nickname.is_absent(), Fields::NICKNAME);
        add(!self.user_type.is_absent(), Fields::TYPE);
        add(!self.prompt_count.is_absent(), Fields::PROMPT_COUNT);
        add(!self.token_count.is_absent(), Fields::TOKEN_COUNT);
        add(!self.token_counts.is_absent(), Fields::TOKEN_COUNTS);
        add(!self.token_limits.is_absent(), Fields::TOKEN_LIMITS);
        add(!self.token_refresh.is_absent(), Fields::TOKEN_REFRESH);
        add(!self.created_at.is_absent(), Fields::CREATED_AT);
        add(!self.last_used_at.is_absent(), Fields::LAST_USED_AT);
        add(!self.disabled_at.is_absent(), Fields::DISABLED_AT);
        add(!self.disabled_reason.is_absent(), Fields::DISABLED_REASON);
        add(!self.expires_at.is_absent(), Fields::EXPIRES_AT);
        add(!self.max_ips.is_absent(), Fields::MAX_IPS);
        add(!self.admin_note.is_absent(), Fields::ADMIN_NOTE);
        add(!self.meta.is_absent(), Fields::META);
        f
    }
}

/// Counters and times (`promptCount`, `createdAt`, …): `null`, or a JSON number that is a
/// non-negative integer however it is spelled (`1700000000000`, `1.7e12`, `1700000000000.0` as
/// Python writes a float). JavaScript has one number type, so the older proxy took all three; a
/// fraction is refused. Values above 2^53 - 1 are refused later, by [`User::validate`].
pub fn js_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Patch<u64>, D::Error> {
    struct Integer;
    impl<'de> serde::de::Visitor<'de> for Integer {
        type Value = Patch<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Patch::Null)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Patch::Null)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Patch::Set(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Patch::Set)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.fract() == 0.0 && v >= 0.0 {
                // Saturates far above 2^53, which `User::validate` refuses.
                Ok(Patch::Set(v as u64))
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(Integer)
}

/// [`js_integer`] for a field that is either absent/`null` or set.
pub fn js_integer_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match js_integer(d)? {
        Patch::Set(v) => Some(v),
        Patch::Absent | Patch::Null => None,
    })
}

/// `maxIps`: `null`, or a non-negative integer up to `u32::MAX` given as a number (`3`, `3.0`)
/// or as a string holding one (`"3"`, `" 3 "`, `"3e0"`), as the older proxy's
/// `z.coerce.number().int().min(0)` took it. An empty or non-numeric string is refused (the
/// older proxy read `""` as 0, i.e. unlimited).
fn coerced_max_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Patch<u32>, D::Error> {
    struct MaxIps;
    impl<'de> serde::de::Visitor<'de> for MaxIps {
        type Value = Patch<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer up to 4294967295 (or a string holding one)")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Patch::Null)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Patch::Null)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(Patch::Set)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                .and_then(|v| self.visit_u64(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                Ok(Patch::Set(v as u32))
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v.trim().parse::<f64>() {
                Ok(n) if n.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&n) => {
                    Ok(Patch::Set(n as u32))
                }
                _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
            }
        }
    }
    d.deserialize_any(MaxIps)
}

fn set_required<T: Clone>(slot: &mut T, patch: &Patch<T>) {
    if let Patch::Set(v) = patch {
        *slot = v.clone();
    }
}

fn set_optional<T: Clone>(slot: &mut Option<T>, patch: &Patch<T>) {
    match patch {
        Patch::Absent => {}
        Patch::Null => *slot = None,
        Patch::Set(v) => *slot = Some(v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<UserPatch, String> {
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn null_removes_optional_fields_and_absent_keeps_them() {
        let mut user = User::new("t".into(), UserType::Normal, 1);
        user.nickname = Some("n".into());
        user.max_ips = Some(2);
        let patch = parse(r#"{"nickname":null,"adminNote":"hi"}"#).unwrap();
        patch.validate("").unwrap();
        patch.apply_to(&mut user);
        assert_eq!(user.nickname, None);
        assert_eq!(user.max_ips, Some(2));
        assert_eq!(user.admin_note.as_deref(), Some("hi"));
        assert_eq!(patch.fields(), Fields::NICKNAME | Fields::ADMIN_NOTE);
    }

    #[test]
    fn older_proxy_fields_are_accepted() {
        parse(r#"{"tokenCount":5,"tokenRefresh":{"gpt4":1},"meta":{"refreshable":false}}"#)
            .unwrap();
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_field() {
        let err = parse(r#"{"maxIPs":3}"#).unwrap_err();
        assert!(err.contains("unknown field `maxIPs`"), "{err}");
        let err = parse(r#"{"maxIps":"three"}"#).unwrap_err();
        assert!(err.starts_with("maxIps:"), "{err}");
        let err = parse(r#"{"type":"admin"}"#).unwrap_err();
        assert!(err.starts_with("type:"), "{err}");
        let err = parse(r#"{"tokenLimits":{"gpt4":-5}}"#).unwrap_err();
        assert!(err.starts_with("tokenLimits.gpt4:"), "{err}");
    }

    /// The older proxy coerced `maxIps` (`z.coerce.number().int().min(0)`): a script or form
    /// that sends `"3"` sets 3 there, and must not get a 400 here.
    #[test]
    fn max_ips_takes_a_number_in_a_string_as_the_older_proxy_did() {
        for (json, want) in [
            (r#"{"maxIps":3}"#, Patch::Set(3)),
            (r#"{"maxIps":"3"}"#, Patch::Set(3)),
            (r#"{"maxIps":" 0 "}"#, Patch::Set(0)),
            (r#"{"maxIps":3.0}"#, Patch::Set(3)),
            (r#"{"maxIps":"4294967295"}"#, Patch::Set(u32::MAX)),
            (r#"{"maxIps":null}"#, Patch::Null),
            (r#"{}"#, Patch::Absent),
        ] {
            assert_eq!(parse(json).unwrap().max_ips, want, "{json}");
        }
        for json in [
            r#"{"maxIps":""}"#,
            r#"{"maxIps":"x"}"#,
            r#"{"maxIps":"-1"}"#,
            r#"{"maxIps":-1}"#,
            r#"{"maxIps":"2.5"}"#,
            r#"{"maxIps":2.5}"#,
            r#"{"maxIps":"NaN"}"#,
            r#"{"maxIps":"inf"}"#,
            r#"{"maxIps":4294967296}"#,
            r#"{"maxIps":"4294967296"}"#,
            r#"{"maxIps":true}"#,
            r#"{"maxIps":[3]}"#,
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.starts_with("maxIps:"), "{json}: {err}");
        }
    }

    /// JavaScript has one number type: the older proxy took `1.7e12` or `1700000000000.0`
    /// (Python's spelling of a float) for a time, and so must the import.
    #[test]
    fn times_and_counters_take_integral_numbers_however_spelled() {
        for (json, want) in [
            (
                r#"{"expiresAt":1700000000000}"#,
                Patch::Set(1_700_000_000_000),
            ),
            (r#"{"expiresAt":1.7e12}"#, Patch::Set(1_700_000_000_000)),
            (
                r#"{"expiresAt":1700000000000.0}"#,
                Patch::Set(1_700_000_000_000),
            ),
            (r#"{"expiresAt":null}"#, Patch::Null),
            (r#"{}"#, Patch::Absent),
        ] {
            assert_eq!(parse(json).unwrap().expires_at, want, "{json}");
        }
        let p = parse(r#"{"promptCount":1e3,"createdAt":5.0,"lastUsedAt":6.0,"disabledAt":7.0}"#)
            .unwrap();
        assert_eq!(
            (p.prompt_count, p.created_at, p.last_used_at, p.disabled_at),
            (
                Patch::Set(1000),
                Patch::Set(5),
                Patch::Set(6),
                Patch::Set(7)
            )
        );
        for json in [
            r#"{"expiresAt":1700000000000.5}"#,
            r#"{"expiresAt":-1}"#,
            r#"{"expiresAt":-1.0}"#,
            r#"{"expiresAt":"1700000000000"}"#,
            r#"{"promptCount":0.5}"#,
            r#"{"createdAt":true}"#,
        ] {
            let err = parse(json).unwrap_err();
            assert!(
                err.contains("expected a non-negative integer"),
                "{json}: {err}"
            );
        }
        let huge = parse(r#"{"expiresAt":1e300}"#).unwrap();
        assert_eq!(huge.validate("").unwrap_err().field, "expiresAt");
    }

    #[test]
    fn null_on_required_field_is_refused() {
        let err = parse(r#"{"ip":null}"#)
            .unwrap()
            .validate("users[0]")
            .unwrap_err();
        assert_eq!(err.field, "users[0].ip");
    }

    #[test]
    fn bad_token_and_family_keys_are_refused() {
        let err = parse(r#"{"token":"a/b"}"#)
            .unwrap()
            .validate("")
            .unwrap_err();
        assert_eq!(err.field, "token");
        let err = parse(r#"{"tokenCounts":{"a.b":1}}"#)
            .unwrap()
            .validate("")
            .unwrap_err();
        assert_eq!(err.field, "tokenCounts.a.b");
    }

    #[test]
    fn free_form_keys_are_refused_in_patches() {
        let err = parse(r#"{"meta":{"ok":{"a.b":1}}}"#)
            .unwrap()
            .validate("users[0]")
            .unwrap_err();
        assert_eq!(err.field, "users[0].meta.ok.a.b");
        let err = parse(r#"{"tokenCount":{"$x":1}}"#)
            .unwrap()
            .validate("")
            .unwrap_err();
        assert_eq!(err.field, "tokenCount.$x");
    }
}
