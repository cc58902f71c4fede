//! The command line and configuration errors: `-t`, exit codes, one clear line naming the file,
//! the key and the problem.

use std::time::Duration;

use crate::support::{Origin, TollgateBuilder};

fn check(builder: TollgateBuilder) -> (i32, String) {
    let (status, output) = builder.run_to_exit(&["-t"], Duration::from_secs(20));
    (status.code().unwrap_or(-1), output)
}

#[test]
fn dash_t_accepts_a_good_config() {
    let origin = Origin::start();
    let (code, output) = check(TollgateBuilder::new(origin.addr));
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("is valid"), "{output}");
}

#[test]
fn dash_t_catches_a_typo_in_every_section() {
    let origin = Origin::start();
    let cases = [
        ("pingora:\n  thread: 2", "pingora.thread"),
        (
            "rate_limit:\n  request_per_minute: 5",
            "rate_limit.request_per_minute",
        ),
        (
            "gatekeeper:\n  mode: user_token\n  max_ip_per_user: 2",
            "gatekeeper.max_ip_per_user",
        ),
        ("admin:\n  listn: \"127.0.0.1:1\"", "admin.listn"),
        ("store:\n  knd: sqlite", "store.knd"),
        ("trusted_proxy: []", "trusted_proxy"),
    ];
    for (yaml, key) in cases {
        let (code, output) = check(TollgateBuilder::new(origin.addr).yaml(yaml));
        assert_eq!(code, 2, "{yaml}: {output}");
        assert!(output.contains("tollgate.yaml"), "names the file: {output}");
        assert!(output.contains(key), "names {key}: {output}");
        assert!(output.contains("unknown"), "says what is wrong: {output}");
        assert_eq!(output.trim().lines().count(), 1, "one line: {output}");
    }
    let (code, output) = check(TollgateBuilder::new(origin.addr).upstream_yaml("tsl: true"));
    assert_eq!(code, 2);
    assert!(output.contains("upstream.tsl"), "{output}");
}

#[test]
fn missing_secrets_refuse_to_start() {
    let origin = Origin::start();
    let (code, output) = check(TollgateBuilder::new(origin.addr).mode("proxy_key"));
    assert_eq!(code, 2);
    assert!(output.contains("PROXY_KEY"), "{output}");
    let (code, output) = check(TollgateBuilder::new(origin.addr).without_env("ADMIN_KEY"));
    assert_eq!(code, 2);
    assert!(output.contains("ADMIN_KEY"), "{output}");
    // Same check without -t: the server does not start.
    let (status, output) = TollgateBuilder::new(origin.addr)
        .without_env("ADMIN_KEY")
        .run_to_exit(&[], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{output}");
}

#[test]
fn unresolvable_upstream_is_a_config_error() {
    let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (code, output) =
        check(TollgateBuilder::new(addr).upstreams(&["no-such-host.invalid:80".to_string()]));
    assert_eq!(code, 2);
    assert!(
        output.contains("upstream.addrs[0]") && output.contains("cannot resolve"),
        "{output}"
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    let origin = Origin::start();
    let (code, output) = check(TollgateBuilder::new(origin.addr).env("MAX_IPS_PER_USER", "many"));
    assert_eq!(code, 2);
    assert!(output.contains("environment: MAX_IPS_PER_USER"), "{output}");
    let (code, output) = check(TollgateBuilder::new(origin.addr).env("GATEKEEPER", "open"));
    assert_eq!(code, 2);
    assert!(output.contains("GATEKEEPER"), "{output}");
}

#[test]
fn environment_overrides_the_file() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("user_token")
        .env("GATEKEEPER", "none")
        .start();
    let resp = crate::support::client().get(tg.url("/a")).send().unwrap();
    assert_eq!(
        resp.status(),
        200,
        "GATEKEEPER=none wins over the file's user_token"
    );
}

#[test]
fn missing_config_file_is_reported() {
    let (status, output) = {
        let out = std::process::Command::new(crate::support::tollgate::binary())
            .args(["-c", "/nonexistent/tollgate.yaml", "-t"])
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(status.code(), Some(2));
    assert!(
        output.contains("/nonexistent/tollgate.yaml") && output.contains("cannot read"),
        "{output}"
    );
}
