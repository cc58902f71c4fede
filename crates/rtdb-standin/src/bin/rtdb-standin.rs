//! `rtdb-standin --port 9000 [--keepalive-ms N] [--public]`: runs the stand-in in the
//! foreground for local development and prints what to export.

use std::process::ExitCode;
use std::time::Duration;

use rtdb_standin::{Options, StandIn};

const USAGE: &str = "usage: rtdb-standin [--port N] [--keepalive-ms N] [--public] [--secret S]

Runs a local stand-in for Firebase Realtime Database (REST + SSE) and the Google OAuth2
token endpoint on 127.0.0.1. --port 0 (the default) picks a free port.
  --keepalive-ms N  interval between SSE keep-alive events (default 30000)
  --public          allow requests without credentials (public rules)
  --secret S        accept S as a legacy ?auth= database secret
Control API: http://127.0.0.1:PORT/_fake/... (see docs/firebase-standin.md)";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--port" => {
                let v = value("--port")?;
                options.port = v.parse().map_err(|_| format!("bad --port {v}"))?;
            }
            "--keepalive-ms" => {
                let v = value("--keepalive-ms")?;
                let ms: u64 = v.parse().map_err(|_| format!("bad --keepalive-ms {v}"))?;
                options = options.keepalive(Duration::from_millis(ms));
            }
            "--public" => options = options.public_rules(true),
            "--secret" => options = options.database_secret(value("--secret")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("rtdb-standin: {msg}");
            }
            eprintln!("{USAGE}");
            return if msg.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let standin = match StandIn::try_start(options) {
        Ok(standin) => standin,
        Err(e) => {
            eprintln!("rtdb-standin: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("rtdb-standin listening on {}", standin.db_url());
    println!("  token endpoint: {}", standin.token_uri());
    match standin.secondary_url() {
        Some(url) => println!("  redirect target: {url}"),
        None => println!("  redirect target: unavailable (127.0.0.2 could not be bound)"),
    }
    println!("  control API:    {}/_fake/info", standin.db_url());
    println!();
    println!("export FIREBASE_RTDB_URL={}", standin.db_url());
    println!("export FIREBASE_KEY={}", standin.firebase_key_b64());
    println!();
    println!("Press Ctrl-C to stop.");
    loop {
        std::thread::park();
    }
}
