//! The shipped configuration files and the systemd unit stay valid.

use std::process::Command;

use crate::support::tollgate::binary;

fn check_config(path: &str, env: &[(&str, &str)]) {
    let out = Command::new(binary())
        .args(["-t", "-c", path])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{path}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_configurations_pass_dash_t() {
    check_config("conf/tollgate.yaml", &[]);
    check_config(
        "conf/tollgate.yaml",
        &[("GATEKEEPER", "user_token"), ("ADMIN_KEY", "k")],
    );
    check_config("deploy/tollgate.yaml", &[("ADMIN_KEY", "k")]);
}

#[test]
fn systemd_unit_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    };
    assert!(probe.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/tollgate.service"
    ))
    .unwrap();
    // Point the unit at the binary under test (it is installed to /usr/local/bin in production).
    let unit = unit.replace("/usr/local/bin/tollgate", binary());
    let path = dir.path().join("tollgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without systemd as PID 1 (containers), verify still parses the unit and checks the
    // commands; it may complain about the missing bus, which says nothing about the unit.
    let problems: Vec<&str> = messages
        .lines()
        .filter(|l| l.contains("tollgate.service"))
        .collect();
    assert!(problems.is_empty(), "{messages}");
}

/// `*` within one path component, as Docker's patterns (enough for .dockerignore's lines).
fn component_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len())
                    .any(|i| component_matches(tail, &name[head.len() + i..]))
        }
    }
}

/// Whether `pattern` excludes `path`: the pattern matches the path or one of its parents.
fn excludes(pattern: &str, path: &str) -> bool {
    let (anywhere, pattern) = match pattern.strip_prefix("**/") {
        Some(rest) => (true, rest),
        None => (false, pattern.trim_start_matches('/')),
    };
    let pat: Vec<&str> = pattern.split('/').collect();
    let parts: Vec<&str> = path.split('/').collect();
    let starts: Vec<usize> = match anywhere {
        true => (0..parts.len()).collect(),
        false => vec![0],
    };
    starts.into_iter().any(|s| {
        parts.len() >= s + pat.len()
            && pat
                .iter()
                .zip(&parts[s..])
                .all(|(p, n)| component_matches(p, n))
    })
}

#[test]
fn docker_context_leaves_out_build_output_and_databases() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/.dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let excluded = |path: &str| patterns.iter().any(|p| excludes(p, path));
    for path in [
        "target/debug/tollgate",
        "crates/rtdb-standin/target/x",
        "data/tollgate.db",
        ".git/HEAD",
        "users.db",
        "backup/users.db-wal",
        "old/database.sqlite",
        "database.sqlite3",
        "deploy/tollgate.env",
    ] {
        assert!(excluded(path), "{path} would be sent to the Docker build");
    }
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "crates/rtdb-standin/Cargo.toml",
        "benches/decision.rs",
        "tests/e2e/main.rs",
        "deploy/container.yaml",
        "deploy/tollgate.env.example",
        "conf/tollgate.yaml",
    ] {
        assert!(!excluded(path), "{path} is needed by the build");
    }
}

/// `key: N` in a shipped file (the first occurrence).
fn seconds_after(file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("{file}: no {key}"));
    line.trim_start_matches([':', '=', ' '])
        .trim_end_matches('s')
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{file}: {key}: {e}"))
}

#[test]
fn supervisors_wait_for_the_last_store_write_before_they_kill() {
    // tollgate waits out the grace period, then up to the runtimes' shutdown timeout, then
    // writes the store; a supervisor that kills earlier loses the last counts.
    for (config, supervisor, key) in [
        (
            "deploy/tollgate.yaml",
            "deploy/tollgate.service",
            "TimeoutStopSec",
        ),
        (
            "deploy/container.yaml",
            "deploy/compose.yaml",
            "stop_grace_period",
        ),
    ] {
        let needed = seconds_after(config, "grace_period_seconds")
            + seconds_after(config, "graceful_shutdown_timeout_seconds")
            + 5;
        let allowed = seconds_after(supervisor, key);
        assert!(
            allowed >= needed,
            "{supervisor}: {key} {allowed} s, but {config} needs {needed} s"
        );
    }
}
