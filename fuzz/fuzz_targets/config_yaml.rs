#![no_main]
//! Config::from_yaml with arbitrary YAML and environment: must return Ok or a ConfigError.
//! Input: YAML text, then optionally "\n\0ENV\0" and NAME=VALUE lines.
//! Upstream host names are skipped (they would go to DNS).
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use tollgate::config::Config;

fn has_dns_name(yaml: &str) -> bool {
    let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(yaml) else {
        return false;
    };
    let Some(addrs) = v.get("upstream").and_then(|u| u.get("addrs")) else {
        return false;
    };
    let Some(seq) = addrs.as_sequence() else {
        return false;
    };
    seq.iter().any(|a| match a.as_str() {
        Some(s) => s.parse::<std::net::SocketAddr>().is_err(),
        None => false,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (yaml, env_text) = text.split_once("\n\0ENV\0").unwrap_or((text, ""));
    if has_dns_name(yaml) {
        return;
    }
    let mut env: HashMap<String, String> = HashMap::new();
    for line in env_text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    match Config::from_yaml(yaml, "fuzz.yaml", &env) {
        Ok(config) => {
            let _ = format!("{:?}", config.warnings);
            // Every accepted duration must be usable as a deadline (the engine and the Firebase
            // loader do `Instant::now() + d`). The purge age is only ever subtracted from
            // epoch milliseconds, so it is left out.
            {
                let now = std::time::Instant::now();
                for (name, d) in [
                    ("store.flush_interval", config.store.flush_interval),
                    (
                        "store.firebase.startup_timeout",
                        config.store.firebase.startup_timeout,
                    ),
                    (
                        "store.firebase.keepalive_timeout",
                        config.store.firebase.keepalive_timeout,
                    ),
                    ("admin.persist_timeout", config.admin.persist_timeout),
                    ("admin.body_read_timeout", config.admin.body_read_timeout),
                    ("admin.lockout", config.admin.lockout),
                    ("upstream.connect_timeout", config.upstream.connect_timeout),
                    ("upstream.read_timeout", config.upstream.read_timeout),
                    ("upstream.idle_timeout", config.upstream.idle_timeout),
                    (
                        "pingora.grace_period",
                        std::time::Duration::from_secs(
                            config.server.grace_period_seconds.unwrap_or(5),
                        ),
                    ),
                    (
                        "pingora.graceful_shutdown_timeout",
                        std::time::Duration::from_secs(
                            config.server.graceful_shutdown_timeout_seconds.unwrap_or(5),
                        ),
                    ),
                ] {
                    assert!(
                        now.checked_add(d).is_some(),
                        "{name} = {d:?} accepted but overflows Instant::now() + d"
                    );
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
