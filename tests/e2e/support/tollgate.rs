//! The real `tollgate` binary as a child process with a generated configuration.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::sockets::holds_listener;
use super::{client, free_ports, wait_until};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const PROXY_KEY: &str = "test-proxy-key-9876543210";

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// Builds a config file and environment, then starts tollgate.
pub struct TollgateBuilder {
    upstream: Vec<String>,
    upstream_extra: Vec<String>,
    admin_extra: Vec<String>,
    /// A second proxy listener on `[::]` (see [`Self::dual_stack_listener`]).
    dual_stack_port: Option<u16>,
    mode: String,
    sections: Vec<String>,
    env: HashMap<String, String>,
    /// Variables whose value is not UTF-8 (which `env` cannot hold).
    env_bytes: Vec<(String, std::ffi::OsString)>,
    dir: Option<tempfile::TempDir>,
    proxy_port: u16,
    admin_port: u16,
    /// Whether the ports came from `free_port` (and may be chosen again after a collision).
    ports_chosen_here: bool,
}

impl TollgateBuilder {
    pub fn new(upstream: SocketAddr) -> Self {
        let mut env = HashMap::new();
        env.insert("ADMIN_KEY".to_string(), ADMIN_KEY.to_string());
        env.insert("RUST_LOG".to_string(), "info".to_string());
        let [proxy_port, admin_port] = free_ports();
        Self {
            upstream: vec![upstream.to_string()],
            upstream_extra: Vec::new(),
            admin_extra: Vec::new(),
            dual_stack_port: None,
            mode: "user_token".to_string(),
            sections: Vec::new(),
            env,
            env_bytes: Vec::new(),
            dir: None,
            proxy_port,
            admin_port,
            ports_chosen_here: true,
        }
    }

    pub fn upstreams(mut self, addrs: &[String]) -> Self {
        self.upstream = addrs.to_vec();
        self
    }

    /// Extra keys under `upstream:`, e.g. `read_timeout_ms: 200`.
    pub fn upstream_yaml(mut self, lines: &str) -> Self {
        self.upstream_extra
            .extend(lines.lines().map(str::to_string));
        self
    }

    /// Extra keys under `admin:`, e.g. `lockout_seconds: 2`.
    pub fn admin_yaml(mut self, lines: &str) -> Self {
        self.admin_extra.extend(lines.lines().map(str::to_string));
        self
    }

    /// A second proxy listener on `[::]` ([`Tollgate::dual_stack_port`]): dual stack, so IPv4
    /// clients arrive there as IPv4-mapped IPv6 peers, and `::1` can connect.
    pub fn dual_stack_listener(mut self) -> Self {
        self.dual_stack_port = Some(free_dual_stack_port([self.proxy_port, self.admin_port]));
        self
    }

    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = mode.to_string();
        self
    }

    /// Extra YAML appended to the file (top-level sections other than those set here).
    pub fn yaml(mut self, section: &str) -> Self {
        self.sections.push(section.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// A variable set to raw bytes (e.g. not UTF-8), as a broken env file can leave it.
    pub fn env_bytes(mut self, key: &str, value: &[u8]) -> Self {
        use std::os::unix::ffi::OsStringExt;
        self.env.remove(key);
        self.env_bytes.push((
            key.to_string(),
            std::ffi::OsString::from_vec(value.to_vec()),
        ));
        self
    }

    pub fn without_env(mut self, key: &str) -> Self {
        self.env.remove(key);
        self
    }

    /// Runs in (and keeps) this directory instead of a fresh temporary one.
    pub fn dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    pub fn ports(mut self, proxy: u16, admin: u16) -> Self {
        self.proxy_port = proxy;
        self.admin_port = admin;
        self.ports_chosen_here = false;
        self
    }

    fn has_section(&self, name: &str) -> bool {
        self.sections
            .iter()
            .any(|s| s.trim_start().starts_with(&format!("{name}:")))
    }

    pub fn write_config(&mut self) -> PathBuf {
        let dir = self
            .dir
            .get_or_insert_with(|| tempfile::tempdir().expect("tempdir"))
            .path()
            .to_path_buf();
        let path = dir.join("tollgate.yaml");
        let mut yaml = format!(
            "listen: [\"127.0.0.1:{}\"{}]\nupstream:\n  addrs: [{}]\n",
            self.proxy_port,
            self.dual_stack_port
                .map(|port| format!(", \"[::]:{port}\""))
                .unwrap_or_default(),
            self.upstream
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for line in &self.upstream_extra {
            yaml.push_str(&format!("  {line}\n"));
        }
        let sections = self.sections.clone();
        if !self.has_section("pingora") {
            yaml.push_str(&format!(
                "pingora:\n  threads: 2\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 2\n  upgrade_sock: {}\n",
                dir.join("upgrade.sock").display()
            ));
        }
        if !self.has_section("gatekeeper") {
            yaml.push_str(&format!("gatekeeper:\n  mode: {}\n", self.mode));
        }
        if !self.has_section("admin") {
            yaml.push_str(&format!(
                "admin:\n  listen: \"127.0.0.1:{}\"\n",
                self.admin_port
            ));
            for line in &self.admin_extra {
                yaml.push_str(&format!("  {line}\n"));
            }
        }
        for section in sections {
            yaml.push_str(&section);
            if !section.ends_with('\n') {
                yaml.push('\n');
            }
        }
        std::fs::write(&path, yaml).expect("write config");
        path
    }

    /// Runs `tollgate` with `args` to completion (for `-t` and start-up failures).
    pub fn run_to_exit(mut self, args: &[&str], timeout: Duration) -> (ExitStatus, String) {
        let config = self.write_config();
        let dir = self.dir.as_ref().unwrap().path().to_path_buf();
        let mut child = self
            .command(&config, &dir, args)
            .spawn()
            .expect("spawn tollgate");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tollgate did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut output = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut output);
        }
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut output);
        }
        (status, output)
    }

    fn command(&self, config: &Path, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg("-c")
            .arg(config)
            .args(args)
            .current_dir(dir)
            .env_clear();
        cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
        cmd.envs(&self.env);
        cmd.envs(self.env_bytes.iter().map(|(k, v)| (k, v)));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// Starts tollgate and waits until both listeners answer.
    pub fn start(mut self) -> Tollgate {
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            self.write_config();
            match self.launch() {
                Ok(tollgate) => return tollgate,
                // Another test's process took a port between `free_port` and tollgate's bind:
                // choose again.
                Err(log)
                    if attempt < ATTEMPTS && self.ports_chosen_here && port_was_taken(&log) =>
                {
                    [self.proxy_port, self.admin_port] = free_ports();
                    if let Some(port) = &mut self.dual_stack_port {
                        *port = free_dual_stack_port([self.proxy_port, self.admin_port]);
                    }
                }
                Err(log) => panic!("tollgate did not come up:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts with the file `write_config` produced (and the test may have edited).
    pub fn start_with_existing_config(mut self) -> Tollgate {
        self.launch()
            .unwrap_or_else(|log| panic!("tollgate did not come up:\n{log}"))
    }

    /// Spawns tollgate on the written config and waits until it serves; its log otherwise.
    fn launch(&mut self) -> Result<Tollgate, String> {
        let dir = self.dir.as_ref().expect("write_config first").path();
        let config = dir.join("tollgate.yaml");
        let log_path = dir.join("tollgate.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = self.command(&config, dir, &[]);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let mut child = cmd.spawn().expect("spawn tollgate");
        let ports = (self.proxy_port, self.admin_port);
        if let Err(log) = wait_serving(&mut child, ports, &log_path, true) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(log);
        }
        Ok(Tollgate {
            child: Some(child),
            proxy: format!("http://127.0.0.1:{}", self.proxy_port),
            admin: format!("http://127.0.0.1:{}", self.admin_port),
            proxy_port: self.proxy_port,
            admin_port: self.admin_port,
            dual_stack_port: self.dual_stack_port,
            config,
            log_path,
            dir: std::sync::Arc::new(self.dir.take().expect("the directory")),
            env: self.env.clone(),
        })
    }
}

/// A port free on every address a moment ago (bound on `[::]`, dual stack), other than
/// `taken` (released by `free_ports`, so the kernel may hand them out again).
fn free_dual_stack_port(taken: [u16; 2]) -> u16 {
    loop {
        let port = std::net::TcpListener::bind("[::]:0")
            .and_then(|l| l.local_addr())
            .expect("bind [::]:0")
            .port();
        if !taken.contains(&port) {
            return port;
        }
    }
}

/// Whether a start-up failed because a port was in use (tollgate's own check, or Pingora's
/// retries while binding).
fn port_was_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("is in use, will try again")
}

/// Waits until `child` itself listens on both ports and answers on them: a check of `/health`
/// alone can reach another test's tollgate that took the port first. `Err` is the log. With
/// `fresh_log` (the log is this child's alone), a port found in use ends the wait at once.
fn wait_serving(
    child: &mut Child,
    (proxy_port, admin_port): (u16, u16),
    log_path: &Path,
    fresh_log: bool,
) -> Result<(), String> {
    let http = client();
    let health = format!("http://127.0.0.1:{admin_port}/health");
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    // Why the wait ended without tollgate serving, once known.
    let mut failure = None;
    let up = wait_until(Duration::from_secs(20), || {
        if let Some(status) = child.try_wait().ok().flatten() {
            failure = Some(format!("exited during start-up ({status}):\n{}", log()));
            return true;
        }
        if fresh_log {
            let log = log();
            if port_was_taken(&log) {
                failure = Some(log);
                return true;
            }
        }
        let pid = child.id();
        holds_listener(pid, proxy_port)
            && holds_listener(pid, admin_port)
            && http
                .get(&health)
                .send()
                .is_ok_and(|r| r.status().is_success())
    });
    match failure {
        Some(failure) => Err(failure),
        None if up => Ok(()),
        None => Err(format!("not serving after 20 s:\n{}", log())),
    }
}

pub struct Tollgate {
    child: Option<Child>,
    pub proxy: String,
    pub admin: String,
    pub proxy_port: u16,
    pub admin_port: u16,
    /// The `[::]` proxy listener's port, if the builder asked for one.
    pub dual_stack_port: Option<u16>,
    pub config: PathBuf,
    pub log_path: PathBuf,
    /// Shared with processes started by `spawn_upgrade`.
    pub dir: std::sync::Arc<tempfile::TempDir>,
    pub env: HashMap<String, String>,
}

impl Tollgate {
    fn wait_ready(&mut self) {
        let child = self.child.as_mut().expect("running");
        let ports = (self.proxy_port, self.admin_port);
        if let Err(log) = wait_serving(child, ports, &self.log_path, false) {
            panic!("tollgate did not come up:\n{log}");
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// The process's resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// How many file descriptors the process holds.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// A raw connection to the proxy listener (10 s read timeout), for HTTP written by hand.
    pub fn proxy_connection(&self) -> std::net::TcpStream {
        raw_connection(self.proxy_port)
    }

    /// A raw connection to the admin listener (10 s read timeout).
    pub fn admin_connection(&self) -> std::net::TcpStream {
        raw_connection(self.admin_port)
    }

    /// The Prometheus text of `/metrics` (no key needed).
    pub fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// A request to the admin API with the admin key.
    pub fn admin_request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        client()
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_KEY)
    }

    /// An admin API call with the admin key and an optional JSON body: its status and JSON
    /// answer (`Null` when the answer is not JSON).
    pub fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.admin_request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(serde_json::Value::Null))
    }

    /// Creates a user over the admin API and returns its token.
    pub fn create_user(&self, body: serde_json::Value) -> String {
        let response = self
            .admin_request(reqwest::Method::POST, "/admin/users")
            .json(&body)
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "create user: {}",
            response.status()
        );
        response.json::<serde_json::Value>().unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn user(&self, token: &str) -> serde_json::Value {
        self.admin_request(reqwest::Method::GET, &format!("/admin/users/{token}"))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit after a signal; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("tollgate did not exit after SIGTERM:\n{}", self.log()))
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same configuration again (same ports and directory), e.g. after a restart.
    pub fn restart(mut self) -> Tollgate {
        if self.child.is_some() {
            self.stop();
        }
        self.child = Some(self.spawn_child(&[]));
        self.wait_ready();
        self
    }

    /// Starts the binary on this instance's configuration, directory, environment and log.
    fn spawn_child(&self, extra_args: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("log");
        let mut cmd = Command::new(binary());
        cmd.args(extra_args)
            .arg("-c")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env_clear();
        cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
        cmd.envs(&self.env);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        cmd.spawn().expect("spawn tollgate")
    }
}

impl Tollgate {
    /// Starts a second process with `-u` on the same configuration: it takes the listening
    /// sockets over once this one gets SIGQUIT. Not ready until then.
    pub fn spawn_upgrade(&self) -> Tollgate {
        self.spawn_upgrade_with(&[])
    }

    /// [`spawn_upgrade`](Self::spawn_upgrade) with more arguments after `-u`.
    pub fn spawn_upgrade_with(&self, args: &[&str]) -> Tollgate {
        let args: Vec<&str> = std::iter::once("-u").chain(args.iter().copied()).collect();
        Tollgate {
            child: Some(self.spawn_child(&args)),
            proxy: self.proxy.clone(),
            admin: self.admin.clone(),
            proxy_port: self.proxy_port,
            admin_port: self.admin_port,
            dual_stack_port: self.dual_stack_port,
            config: self.config.clone(),
            log_path: self.log_path.clone(),
            dir: std::sync::Arc::clone(&self.dir),
            env: self.env.clone(),
        }
    }

    /// Waits until the listeners answer (after an upgrade hand-over).
    pub fn wait_until_serving(&mut self) {
        self.wait_ready();
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn raw_connection(port: u16) -> std::net::TcpStream {
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn
}
