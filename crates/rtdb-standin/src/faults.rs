//! Scripted fault injection: rules matched by method and path glob, with use counts.

use serde::{Deserialize, Serialize};

/// What happens to a request that matches a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultAction {
    /// Answer with `status` without applying anything. The body defaults to
    /// `{"error":"<reason>"}`; a 412 on a database path carries the current value and `ETag`
    /// like a lost compare-and-set race.
    Status {
        /// The HTTP status.
        status: u16,
        /// A `Retry-After` header value.
        #[serde(default)]
        retry_after: Option<String>,
        /// A raw body to send instead of the default.
        #[serde(default)]
        body: Option<String>,
    },
    /// Apply the request, then reset the connection without replying (an ambiguous write).
    ApplyThenDrop,
    /// Reset the connection before applying anything (a lost write).
    DropBeforeApply,
    /// Wait this long before handling the request (latency before headers).
    Delay {
        /// Milliseconds.
        ms: u64,
    },
    /// Handle the request normally but send the response body in small, slow chunks.
    Trickle {
        /// Bytes per chunk (at least 1).
        chunk_bytes: usize,
        /// Pause between chunks.
        interval_ms: u64,
    },
}

impl FaultAction {
    /// A plain status fault.
    pub fn status(status: u16) -> Self {
        FaultAction::Status {
            status,
            retry_after: None,
            body: None,
        }
    }

    /// A status fault with a `Retry-After` header.
    pub fn status_retry_after(status: u16, retry_after: impl Into<String>) -> Self {
        FaultAction::Status {
            status,
            retry_after: Some(retry_after.into()),
            body: None,
        }
    }
}

fn any_method() -> String {
    "*".to_owned()
}

/// "The next `times` requests matching `method` and `path` get `action`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// HTTP method as sent on the wire (`PATCH`, ...), or `*` for any.
    #[serde(default = "any_method")]
    pub method: String,
    /// URL path glob (`/.json`, `/users/*`, `*`); `*` matches any run of characters,
    /// including `/`. The query string is not part of the match.
    pub path: String,
    /// How many requests the rule applies to; `None` means until removed.
    #[serde(default)]
    pub times: Option<u32>,
    /// What to do.
    pub action: FaultAction,
}

impl FaultRule {
    /// A rule that applies until removed.
    pub fn new(method: &str, path: &str, action: FaultAction) -> Self {
        FaultRule {
            method: method.to_owned(),
            path: path.to_owned(),
            times: None,
            action,
        }
    }

    /// Limits the rule to the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method.eq_ignore_ascii_case(method))
            && glob_match(&self.path, path)
    }
}

/// An installed rule and its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledFault {
    /// Id for removal.
    pub id: u64,
    /// The rule, with `times` counting down.
    #[serde(flatten)]
    pub rule: FaultRule,
}

/// The installed rules, in installation order.
#[derive(Debug, Default)]
pub struct FaultSet {
    next_id: u64,
    rules: Vec<InstalledFault>,
}

impl FaultSet {
    /// Installs a rule and returns its id.
    pub fn add(&mut self, rule: FaultRule) -> u64 {
        self.next_id += 1;
        self.rules.push(InstalledFault {
            id: self.next_id,
            rule,
        });
        self.next_id
    }

    /// Removes one rule; false if it was not installed.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.id != id);
        self.rules.len() != before
    }

    /// Removes every rule.
    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// The installed rules.
    pub fn list(&self) -> Vec<InstalledFault> {
        self.rules.clone()
    }

    /// Consumes one use of the first rule matching the request and returns its action.
    pub fn take(&mut self, method: &str, path: &str) -> Option<FaultAction> {
        let index = self
            .rules
            .iter()
            .position(|r| r.rule.matches(method, path))?;
        let rule = &mut self.rules[index].rule;
        let action = rule.action.clone();
        match &mut rule.times {
            Some(n) if *n <= 1 => {
                self.rules.remove(index);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(action)
    }
}

/// Glob match where `*` matches any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("/.json", "/.json"));
        assert!(!glob_match("/.json", "/users.json"));
        assert!(glob_match("*", "/anything/at.json"));
        assert!(glob_match("/users/*", "/users/a/b.json"));
        assert!(glob_match("/users*.json", "/users.json"));
        assert!(!glob_match("/users/*", "/users.json"));
        assert!(glob_match("*a*b*", "xaybz"));
        assert!(!glob_match("*a*b", "xaybz"));
    }

    #[test]
    fn counts_down_and_matches_method() {
        let mut set = FaultSet::default();
        set.add(FaultRule::new("PATCH", "/.json", FaultAction::status(503)).times(2));
        let forever = set.add(FaultRule::new("*", "/token", FaultAction::Delay { ms: 1 }));
        assert_eq!(set.take("PUT", "/.json"), None);
        assert_eq!(set.take("patch", "/.json"), Some(FaultAction::status(503)));
        assert_eq!(set.take("PATCH", "/.json"), Some(FaultAction::status(503)));
        assert_eq!(set.take("PATCH", "/.json"), None);
        for _ in 0..3 {
            assert!(set.take("POST", "/token").is_some());
        }
        assert!(set.remove(forever));
        assert!(!set.remove(forever));
        assert_eq!(set.take("POST", "/token"), None);
    }

    #[test]
    fn rules_deserialize_from_json() {
        let rule: FaultRule = serde_json::from_str(
            r#"{"method":"PATCH","path":"/.json","times":2,"action":{"type":"status","status":503,"retry_after":"1"}}"#,
        )
        .unwrap();
        assert_eq!(rule.action, FaultAction::status_retry_after(503, "1"));
        let rule: FaultRule =
            serde_json::from_str(r#"{"path":"*","action":{"type":"apply_then_drop"}}"#).unwrap();
        assert_eq!((rule.method.as_str(), rule.times), ("*", None));
        assert!(
            serde_json::from_str::<FaultRule>(r#"{"path":"*","action":{"type":"nope"}}"#).is_err()
        );
    }
}
