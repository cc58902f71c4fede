//! scripts/setup.sh and scripts/test.sh on a bare machine, with `apt-get`, `rustup` and `cargo`
//! replaced by stubs that record their arguments: what would be installed, and nothing when
//! everything is present.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A PATH directory with only the given real tools and stubs.
struct Bin {
    dir: tempfile::TempDir,
    bash: PathBuf,
}

impl Bin {
    fn new(real: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let find = |tool: &str| {
            ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("no {tool} on this machine"))
        };
        let bash = find("bash");
        for tool in ["bash", "id"].iter().chain(real) {
            symlink(find(tool), dir.path().join(tool)).unwrap();
        }
        let bin = Self { dir, bash };
        bin.stub("sudo", "exec \"$@\"");
        for tool in ["apt-get", "rustup"] {
            bin.stub(tool, &format!("echo \"{tool} $*\" >> \"$STUB_LOG\""));
        }
        bin
    }

    fn stub(&self, name: &str, body: &str) {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!{}\n{body}\n", self.bash.display())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Stubs for everything setup.sh checks for (`dpkg -s`: extra packages are installed).
    fn with_build_tools(self) -> Self {
        for tool in ["cmake", "make", "cc", "c++", "curl", "dpkg"] {
            self.stub(tool, "exit 0");
        }
        self
    }

    fn run(&self, script: &str) -> (Output, String) {
        let log = self.dir.path().join("calls.log");
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
            .env_clear()
            .env("PATH", self.dir.path())
            .env("STUB_LOG", &log)
            .output()
            .unwrap();
        (out, std::fs::read_to_string(&log).unwrap_or_default())
    }
}

#[test]
fn setup_installs_make_a_compiler_and_curl_on_a_bare_machine() {
    let (out, calls) = Bin::new(&[]).run("scripts/setup.sh");
    assert!(out.status.success(), "{out:?}");
    let install = calls
        .lines()
        .find(|l| l.starts_with("apt-get install"))
        .unwrap_or_else(|| panic!("no install: {calls}"));
    for pkg in ["cmake", "build-essential", "curl"] {
        assert!(
            install.split(' ').any(|w| w == pkg),
            "{pkg} missing: {install}"
        );
    }
}

#[test]
fn setup_is_silent_when_everything_is_present() {
    let (out, calls) = Bin::new(&[]).with_build_tools().run("scripts/setup.sh");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(calls, "", "nothing installed");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

#[test]
fn test_script_adds_rustfmt_and_clippy_when_missing() {
    let bin = Bin::new(&["dirname"]).with_build_tools();
    // No fmt/clippy subcommands; every other cargo call fails, which stops test.sh early.
    bin.stub(
        "cargo",
        "case \"$1 $2\" in \"fmt --version\"|\"clippy --version\") exit 1;; esac\nexit 1",
    );
    let (_, calls) = bin.run("scripts/test.sh");
    assert_eq!(calls.trim(), "rustup component add rustfmt clippy");

    let bin = Bin::new(&["dirname"]).with_build_tools();
    bin.stub(
        "cargo",
        "case \"$1 $2\" in \"fmt --version\"|\"clippy --version\") exit 0;; esac\nexit 1",
    );
    let (_, calls) = bin.run("scripts/test.sh");
    assert_eq!(calls, "", "nothing added when present");
}

/// `len` consecutive loopback ports that were free a moment ago, below the ephemeral range.
/// Each call starts its search elsewhere: under plain `cargo test` the tests of this file run
/// as threads of one process at the same moment, and would otherwise all pick the first range
/// free for that process id.
fn free_port_range(len: u16) -> u16 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let offset = ((std::process::id() + call * 97) % 400) as u16;
    (0..400u16)
        .map(|i| 20_000 + (offset + i) % 400 * 20)
        .find(|&base| {
            (base..base + len).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        })
        .expect("a free range of ports")
}

/// The load benchmark end to end, as short as it goes, against the debug binary: this keeps
/// benches/load/run.sh working, and benches/load/lib.sh, which the profile-guided build
/// (scripts/build-release.sh) trains with. No figure is checked: every case must answer
/// cleanly under wrk and the table must be complete.
#[test]
fn load_benchmark_runs_every_case_and_prints_the_table() {
    let out_dir = tempfile::tempdir().unwrap();
    let table = out_dir.path().join("load.md");
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/run.sh"))
        .env("TOLLGATE_BIN", crate::support::tollgate::binary())
        .env("ROUNDS", "1")
        .env("DURATION", "1")
        .env("WARMUP", "1")
        .env("USERS", "1000")
        .env("CONNECTIONS", "4")
        .env("PORT_BASE", free_port_range(6).to_string())
        .env("OUT", &table)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run.sh failed: {stderr}");
    let md = std::fs::read_to_string(&table).unwrap();
    for body in ["small", "64k"] {
        for case in ["direct", "nginx", "tg-pass", "tg-user"] {
            let row = format!("| {body} | {case} | ");
            let line = md.lines().find(|l| l.starts_with(&row));
            let line = line.unwrap_or_else(|| panic!("no row {row}in:\n{md}"));
            let rps: f64 = line.split('|').nth(3).unwrap().trim().parse().unwrap();
            assert!(rps > 0.0, "{line}");
        }
        assert!(
            md.lines()
                .any(|l| l.starts_with(&format!("| {body} | ")) && l.contains("met")),
            "no ratio row for {body}:\n{md}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        md.trim(),
        "the table printed is the table written"
    );
}

/// The A/B harness (benches/load/ab.sh) end to end, as short as it goes: two instances of the
/// debug binary in `user_token` mode (the second with two threads, without work stealing) and
/// nginx beside them with one and with two workers. No figure is checked: every instance must
/// answer cleanly under wrk and get its row, with ratios to the first one.
#[test]
fn ab_harness_compares_instances_with_paired_ratios() {
    let bin = crate::support::tollgate::binary();
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load/ab.sh"))
        .arg(format!("first={bin}"))
        .arg(format!("second={bin},threads=2,work_stealing=false"))
        .env("NGINX_WORKERS", "1 2")
        .env("ROUNDS", "2")
        .env("DURATION", "1")
        .env("WARMUP", "1")
        .env("MODE", "user_token")
        .env("USERS", "100")
        .env("CONNECTIONS", "4")
        .env("PORT_BASE", free_port_range(7).to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ab.sh failed: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "first 1 thread(s); second 2 thread(s), work_stealing false; \
             nginx_w1 1 worker(s); nginx_w2 2 worker(s);"
        ),
        "each instance ran as its spec says: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} | ")));
        let line = line.unwrap_or_else(|| panic!("no row for {name} in:\n{table}"));
        line.split('|')
            .map(|cell| cell.trim().to_string())
            .collect()
    };
    for name in ["first", "second", "nginx_w1", "nginx_w2"] {
        let rps: f64 = row(name)[2].parse().unwrap();
        assert!(rps > 0.0, "{name}: {table}");
    }
    assert_eq!(row("first")[5], "–", "the first instance is the base");
    for name in ["second", "nginx_w1", "nginx_w2"] {
        let paired = &row(name)[5];
        let median: f64 = paired.split(' ').next().unwrap().parse().unwrap();
        assert!(median > 0.0 && paired.contains('–'), "{name}: {paired}");
    }
}
