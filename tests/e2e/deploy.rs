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
