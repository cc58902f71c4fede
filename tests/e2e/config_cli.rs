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
fn an_upstream_written_as_a_url_or_with_port_0_is_explained() {
    let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    for (entry, problem) in [
        (
            "https://api.example.com",
            "upstream.addrs[0]: 'https://api.example.com' is a URL; write host:port (e.g. \
             api.example.com:443), and upstream.tls: true for https",
        ),
        (
            "http://127.0.0.1:8080",
            "upstream.addrs[0]: 'http://127.0.0.1:8080' is a URL; write host:port (e.g. \
             api.example.com:443)",
        ),
        (
            "127.0.0.1:0",
            "upstream.addrs[0]: '127.0.0.1:0': port 0 cannot be connected to",
        ),
    ] {
        let (code, output) = check(TollgateBuilder::new(addr).upstreams(&[entry.to_string()]));
        assert_eq!(code, 2, "{entry}: {output}");
        assert!(output.contains(problem), "{entry}: {output}");
    }
}

#[test]
fn a_number_out_of_range_is_explained_without_rust_type_names() {
    let origin = Origin::start();
    let (code, output) =
        check(TollgateBuilder::new(origin.addr).yaml("rate_limit:\n  requests_per_minute: -1"));
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains(
            "rate_limit.requests_per_minute: invalid value: integer `-1`, expected a whole \
             number from 0 to 4294967295"
        ),
        "{output}"
    );
    assert!(!output.contains("u32"), "{output}");
}

#[test]
fn bad_environment_values_name_the_variable() {
    let origin = Origin::start();
    let (code, output) = check(TollgateBuilder::new(origin.addr).env("MAX_IPS_PER_USER", "many"));
    assert_eq!(code, 2);
    assert!(output.contains("environment: MAX_IPS_PER_USER"), "{output}");
    // The messages name what is accepted: the range, and every spelling of a boolean.
    let (code, output) =
        check(TollgateBuilder::new(origin.addr).env("MAX_IPS_PER_USER", "99999999999"));
    assert_eq!(code, 2);
    assert!(
        output.contains(
            "environment: MAX_IPS_PER_USER: expected a whole number from 0 to 4294967295, got \
             '99999999999'"
        ),
        "{output}"
    );
    let (code, output) = check(TollgateBuilder::new(origin.addr).env("MAX_IPS_AUTO_BAN", "on"));
    assert_eq!(code, 2);
    assert!(
        output.contains(
            "environment: MAX_IPS_AUTO_BAN: expected true or false (or 1 or 0, yes or no), got 'on'"
        ),
        "{output}"
    );
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

#[test]
fn overlapping_listeners_are_a_config_error() {
    let origin = Origin::start();
    let [port, admin] = crate::support::free_ports();
    // The admin listener on the wildcard address of the proxy's port: both would bind :port.
    let builder = || {
        TollgateBuilder::new(origin.addr)
            .ports(port, admin)
            .yaml(&format!("admin:\n  listen: \"0.0.0.0:{port}\""))
    };
    let (code, output) = check(builder());
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains("tollgate.yaml")
            && output.contains("admin.listen")
            && output.contains("listen[0]"),
        "names file, key and the other listener: {output}"
    );
    // Without -t the server does not start either (it used to run with a panicked thread).
    let (status, output) = builder().run_to_exit(&[], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{output}");
}

#[test]
fn a_port_held_by_another_program_stops_start_up() {
    let origin = Origin::start();
    for admin_busy in [false, true] {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap();
        let other = crate::support::free_port();
        let (proxy, admin) = match admin_busy {
            false => (busy.port(), other),
            true => (other, busy.port()),
        };
        let (status, output) = TollgateBuilder::new(origin.addr)
            .ports(proxy, admin)
            .run_to_exit(&[], Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{output}");
        let said = format!("cannot listen on {busy}");
        assert!(output.contains(&said), "names the address: {output}");
        assert_eq!(output.matches(&said).count(), 1, "says it once: {output}");
        drop(held);
    }
}

#[test]
fn client_secret_with_a_trailing_newline_is_refused() {
    let origin = Origin::start();
    let (code, output) = check(TollgateBuilder::new(origin.addr).env("ADMIN_KEY", "abc-key\n"));
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains("environment: ADMIN_KEY") && output.contains("whitespace"),
        "{output}"
    );
    assert!(
        !output.contains("abc-key"),
        "never prints the value: {output}"
    );
}

/// The older proxy JSON-parsed every variable, so a value in double quotes (`ADMIN_KEY="k"`, as
/// `docker run --env-file` and some hosting dashboards pass it, quotes included) meant `k`.
#[test]
fn double_quoted_environment_values_mean_what_the_older_proxy_read() {
    let origin = Origin::start();
    let tg = TollgateBuilder::new(origin.addr)
        .mode("none")
        .env("GATEKEEPER", "\"proxy_key\"")
        .env("PROXY_KEY", "\"quoted-proxy-key\"")
        .env(
            "ADMIN_KEY",
            &format!("\"{}\"", crate::support::tollgate::ADMIN_KEY),
        )
        .start();
    let status = |key: &str| {
        crate::support::client()
            .get(tg.url("/a"))
            .bearer_auth(key)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(
        status("quoted-proxy-key"),
        200,
        "PROXY_KEY without its quotes"
    );
    assert_eq!(status("\"quoted-proxy-key\""), 401);
    let resp = tg
        .admin_request(reqwest::Method::GET, "/admin/users")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "ADMIN_KEY without its quotes");
}

#[test]
fn older_variables_tollgate_ignores_are_warned_about() {
    let origin = Origin::start();
    let (code, output) = check(
        TollgateBuilder::new(origin.addr)
            .env("TRUSTED_PROXIES", "3")
            .env("USER_CONCURRENCY_LIMIT", "938271"),
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("TRUSTED_PROXIES is set") && output.contains("`trusted_proxies`"),
        "{output}"
    );
    assert!(
        output.contains("USER_CONCURRENCY_LIMIT is set")
            && output.contains("`rate_limit.max_inflight`"),
        "{output}"
    );
    // (A value no log line's timestamp can contain: "17" failed at 14:17.)
    assert!(
        !output.contains("938271"),
        "values are never logged: {output}"
    );
}

#[test]
fn an_access_log_on_stdout_is_refused_for_a_daemon() {
    // A daemon's stdout is /dev/null: the log would silently go nowhere.
    let origin = Origin::start();
    let builder = TollgateBuilder::new(origin.addr).yaml("access_log:\n  enabled: true");
    let (status, output) = builder.run_to_exit(&["-t", "-d"], Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("access_log.path: required with -d"),
        "{output}"
    );
    let builder =
        TollgateBuilder::new(origin.addr).yaml("access_log:\n  enabled: true\n  path: a.log");
    let (status, output) = builder.run_to_exit(&["-t", "-d"], Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{output}");
}

/// `--help` describes tollgate's flags, not Pingora's own text (which called `-u` "the base
/// set of command line arguments for a pingora-based service").
#[test]
fn help_describes_each_flag() {
    let output = std::process::Command::new(crate::support::tollgate::binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for line in [
        "-c, --conf <FILE>",
        "-t, --test  ",
        "-d, --daemon  ",
        "-u, --upgrade  ",
        "--upgrade-from <PID>",
    ] {
        assert!(help.contains(line), "{line}: {help}");
    }
    assert!(help.contains("graceful upgrade"), "{help}");
    assert!(!help.to_lowercase().contains("pingora"), "{help}");
}

/// A variable holding bytes that are not UTF-8 was read as unset: `GATEKEEPER=user_token` with
/// a stray byte ran the file's `none` mode, an open proxy, and `-t` called it valid.
#[test]
fn a_variable_that_is_not_utf8_is_refused_by_name() {
    let origin = Origin::start();
    let builder = TollgateBuilder::new(origin.addr)
        .mode("none")
        .env_bytes("GATEKEEPER", b"user_token\xff");
    let (code, output) = check(builder);
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains("environment: GATEKEEPER: is not valid UTF-8"),
        "{output}"
    );
    let builder = TollgateBuilder::new(origin.addr).env_bytes("ADMIN_KEY", b"hidden-key-\xfe");
    let (code, output) = check(builder);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("environment: ADMIN_KEY:"), "{output}");
    assert!(!output.contains("hidden-key"), "never the value: {output}");
}

/// Secrets in the environment are named in errors, never shown: a malformed Firebase
/// service-account key, a database URL carrying a password, keys with stray whitespace.
#[test]
fn secrets_in_errors_are_named_never_shown() {
    let origin = Origin::start();
    let firebase = |key: &str, url: &str| {
        TollgateBuilder::new(origin.addr)
            .yaml("store:\n  kind: firebase_rtdb")
            .env("FIREBASE_KEY", key)
            .env("FIREBASE_RTDB_URL", url)
    };
    let url = "https://example-db.firebaseio.com";
    let json_key =
        r#"{"type":"service_account","private_key":"sekrit-pem-body-77","client_email":"a@b.c"}"#;
    for (builder, variable, secret) in [
        (
            firebase("sekrit-not-base64-77!", url),
            "FIREBASE_KEY",
            "sekrit",
        ),
        (firebase(json_key, url), "FIREBASE_KEY", "sekrit"),
        (
            firebase(
                json_key,
                "https://user:sekrit-pass-77@example-db.firebaseio.com",
            ),
            "FIREBASE_RTDB_URL",
            "sekrit",
        ),
        (
            TollgateBuilder::new(origin.addr).env("ADMIN_KEY", " sekrit-admin-77"),
            "ADMIN_KEY",
            "sekrit",
        ),
        (
            TollgateBuilder::new(origin.addr)
                .mode("proxy_key")
                .env("PROXY_KEY", "sekrit-proxy-77\r\n"),
            "PROXY_KEY",
            "sekrit",
        ),
    ] {
        let (code, output) = check(builder);
        assert_eq!(code, 2, "{output}");
        assert!(
            output.contains(&format!("configuration error: environment: {variable}")),
            "{output}"
        );
        assert!(!output.contains(secret), "the value is shown: {output}");
    }
}

/// Odd files end in one line naming the file and the key: never a panic, a backtrace or a
/// Rust `Debug` dump, whatever `RUST_BACKTRACE` says.
#[test]
fn odd_files_are_one_line_naming_file_and_key() {
    let origin = Origin::start();
    for (yaml, key) in [
        (
            "rate_limit:\n  requests_per_minute: 99999999999999999999999",
            "rate_limit.requests_per_minute",
        ),
        (
            "clients:\n  max_body_bytes: 1\n  max_body_bytes: 2",
            "clients.max_body_bytes",
        ),
        ("store: [memory]", "store"),
        ("cors:\n  1: true", "cors"),
        (
            "rate_limit:\n  requests_per_minute: 1\n  window_seconds: 50",
            "rate_limit.requests_per_minute",
        ),
        ("pingora:\n  threads: 0", "pingora.threads"),
        ("access_log: &a {enabled: *a}", "access_log.enabled"),
    ] {
        let builder = TollgateBuilder::new(origin.addr)
            .yaml(yaml)
            .env("RUST_BACKTRACE", "1");
        let (code, output) = check(builder);
        assert_eq!(code, 2, "{yaml}: {output}");
        let line = output.trim();
        assert_eq!(line.lines().count(), 1, "{yaml}: {output}");
        assert!(
            line.starts_with("tollgate: configuration error: ")
                && line.contains("tollgate.yaml: ")
                && line.contains(&format!(": {key}: ")),
            "{yaml}: {output}"
        );
        for debug in ["panicked", "backtrace", "ConfigError", "Raw", "u128", "{ "] {
            assert!(!line.contains(debug), "{yaml}: {output}");
        }
    }
    // A file that is not UTF-8 at all.
    let mut builder = TollgateBuilder::new(origin.addr);
    let config = builder.write_config();
    let mut bytes = std::fs::read(&config).unwrap();
    bytes.extend_from_slice(b"cors:\n  enabled: \xff\n");
    std::fs::write(&config, bytes).unwrap();
    let output = std::process::Command::new(crate::support::tollgate::binary())
        .args(["-t", "-c"])
        .arg(&config)
        .env("ADMIN_KEY", "k")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tollgate.yaml: (file): cannot read: stream did not contain valid UTF-8"),
        "{stderr}"
    );
}

/// `--version` names the program and its version; a flag tollgate does not have, or `-c`
/// missing, is a usage error (exit 2) without starting anything.
#[test]
fn version_and_usage_errors() {
    let run = |args: &[&str]| {
        std::process::Command::new(crate::support::tollgate::binary())
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let output = run(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("tollgate {}", env!("CARGO_PKG_VERSION"))
    );
    for args in [
        &["-t"][..],
        &["-t", "-c", "x.yaml", "--bogus"],
        &["-c", "x.yaml", "--upgrade-from", "1"],
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `pingora.error_log: ""` passed `-t -d`, and `-d` then panicked in Pingora's daemon start
/// (`thread 'main' panicked`, exit 101): now exit 2 naming the key, before anything starts.
#[test]
fn an_empty_daemon_error_log_is_a_configuration_error() {
    let origin = Origin::start();
    for args in [&["-t", "-d"][..], &["-d"]] {
        let builder = TollgateBuilder::new(origin.addr).yaml(
            "pingora:\n  error_log: \"\"\n  pid_file: tollgate.pid\n  working_directory: /tmp",
        );
        let (status, output) = builder.run_to_exit(args, Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert!(
            output.contains("pingora.error_log: must not be empty"),
            "{args:?}: {output}"
        );
        assert!(!output.contains("panicked"), "{output}");
    }
}

/// CA certificates Pingora cannot load (a `pingora.ca_file`, or `SSL_CERT_FILE` for the
/// system's) passed `-t`, and the start then panicked building the proxy's connector
/// (`thread 'main' panicked`, a Rust `Debug` dump, exit 101), TLS upstream or not.
#[test]
fn ca_certificates_pingora_cannot_load_are_a_configuration_error() {
    let origin = Origin::start();
    let pingora = "pingora:\n  ca_file: /nonexistent/ca.pem\n  upgrade_sock: /nonexistent/u.sock";
    let cases = [
        (
            TollgateBuilder::new(origin.addr).yaml(pingora),
            "tollgate.yaml: pingora.ca_file: /nonexistent/ca.pem",
        ),
        (
            TollgateBuilder::new(origin.addr).env("SSL_CERT_FILE", "/nonexistent/certs.pem"),
            "environment: SSL_CERT_FILE: cannot load CA certificates",
        ),
    ];
    for (builder, expected) in cases {
        let (status, output) = builder.run_to_exit(&[], Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{output}");
        assert!(output.contains(expected), "{output}");
        assert!(!output.contains("panicked"), "{output}");
    }
}
