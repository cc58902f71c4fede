//! What the randomized soaks share: a small seeded PRNG, their knobs from the environment,
//! users normalized for comparing views, and the check of a stored user against the soak's
//! record of it.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde_json::{json, Value};

/// xorshift64*: small, deterministic, no crate needed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Never zero (a xorshift fixed point); spread small seeds.
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// A key of `map` at random (`None` when it is empty).
    pub fn pick_key<K: Clone, V>(&mut self, map: &BTreeMap<K, V>) -> Option<K> {
        if map.is_empty() {
            return None;
        }
        let i = self.below(map.len());
        map.keys().nth(i).cloned()
    }
}

/// A new value for one of the fields the soaks edit (`Null`: remove it), at edit `step`.
/// `maxIps` is at least `min_max_ips`, so that the traffic's own addresses never disable a user
/// (an auto-ban would be a second writer of `disabledReason`). `ip` is only ever cleared.
pub fn field_value(rng: &mut Rng, field: &str, step: u64, min_max_ips: usize) -> Value {
    match field {
        "nickname" if rng.chance(15) => Value::Null,
        "nickname" => json!(format!("nick-{step}")),
        "type" => json!(["normal", "special"][rng.below(2)]),
        "maxIps" if rng.chance(15) => Value::Null,
        "maxIps" => json!(min_max_ips + rng.below(6)),
        "adminNote" if rng.chance(15) => Value::Null,
        "adminNote" => json!(format!("note-{step}")),
        "tokenLimits" if rng.chance(20) => json!({}),
        "tokenLimits" => json!({"gpt4": 1 + rng.below(1000)}),
        "ip" => json!([]),
        "disabledReason" if rng.chance(50) => Value::Null,
        "disabledReason" => json!(format!("reason-{step}")),
        _ => unreachable!("{field}"),
    }
}

/// A soak knob (`TOLLGATE_SOAK_SEED`, `…_ITERATIONS`, `…_OPS_SECONDS`), when set and a number.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `run` once per seed: `TOLLGATE_SOAK_ITERATIONS` (1) seeds from `TOLLGATE_SOAK_SEED`
/// (`default_seed`) on, so a failing seed is replayed alone and a soak is made longer.
pub fn for_each_seed(default_seed: u64, mut run: impl FnMut(u64)) {
    let seed = env_u64("TOLLGATE_SOAK_SEED").unwrap_or(default_seed);
    for i in 0..env_u64("TOLLGATE_SOAK_ITERATIONS").unwrap_or(1) {
        run(seed.wrapping_add(i));
    }
}

/// The unit-level models' seeds: `TOLLGATE_MODEL_SEED` alone (a replay), or 1 to
/// `TOLLGATE_MODEL_RUNS` (`default_runs`).
pub fn model_seeds(default_runs: u64) -> Vec<u64> {
    match env_u64("TOLLGATE_MODEL_SEED") {
        Some(seed) => vec![seed],
        None => (1..=env_u64("TOLLGATE_MODEL_RUNS").unwrap_or(default_runs)).collect(),
    }
}

/// A user without its empty and null fields (RTDB drops them; the SQLite `doc` may or may
/// not have them) and without the zero entries of family maps (tollgate does not keep them),
/// for comparing views.
pub fn normalized(user: &Value) -> Value {
    let Some(map) = user.as_object() else {
        return user.clone();
    };
    let empty = |v: &Value| {
        v.is_null()
            || v.as_array().is_some_and(Vec::is_empty)
            || v.as_object().is_some_and(serde_json::Map::is_empty)
    };
    Value::Object(
        map.iter()
            .map(|(k, v)| match (k.as_str(), v.as_object()) {
                ("tokenCounts" | "tokenLimits", Some(families)) => (
                    k.clone(),
                    Value::Object(
                        families
                            .iter()
                            .filter(|(_, n)| n.as_f64() != Some(0.0))
                            .map(|(f, n)| (f.clone(), n.clone()))
                            .collect(),
                    ),
                ),
                _ => (k.clone(), v.clone()),
            })
            .filter(|(_, v)| !empty(v))
            .collect(),
    )
}

/// How a stored user differs from what the soak expects of it: `promptCount` equal to the
/// requests answered for it, each field edited the last value its single writer set
/// (`writers` names who, for the message), and `disabledAt` set exactly when
/// `disabledReason` is.
pub fn mismatches<W: Debug>(
    token: &str,
    stored: &Value,
    answered: u64,
    last: &BTreeMap<&'static str, Value>,
    writers: &BTreeMap<&'static str, W>,
) -> Vec<String> {
    let mut out = Vec::new();
    if stored["promptCount"] != json!(answered) {
        out.push(format!(
            "{token}: promptCount {} stored, {answered} answered",
            stored["promptCount"]
        ));
    }
    for (field, value) in last {
        let value = &normalized(&json!({ *field: value }))[*field];
        if &stored[*field] != value {
            out.push(format!(
                "{token}: {field} is {} stored, its writer {:?} last set {value}",
                stored[*field], writers[field]
            ));
        }
        if *field == "disabledReason" && stored["disabledAt"].is_null() != value.is_null() {
            out.push(format!(
                "{token}: disabledAt {} with disabledReason {value}",
                stored["disabledAt"]
            ));
        }
    }
    out
}
