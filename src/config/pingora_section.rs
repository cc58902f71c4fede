//! The `pingora:` section. Pingora's own parser ignores unknown keys, so a typo like `thread: 8`
//! would silently run with defaults; here every key is checked against `ServerConf`'s fields.

use std::ffi::CString;
use std::path::Path;

use once_cell::sync::Lazy;
use pingora::server::configuration::ServerConf;

use super::ConfigError;

/// Grace period after SIGTERM before the runtimes stop; Pingora's default is 300 s.
pub const DEFAULT_GRACE_PERIOD_SECONDS: u64 = 5;
/// How long runtimes get to finish tasks once the grace period is over.
pub const DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS: u64 = 5;
/// Keeps tollgate's hand-over socket apart from other Pingora programs on the host.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/tollgate_upgrade.sock";
pub const DEFAULT_PID_FILE: &str = "/tmp/tollgate.pid";

static KNOWN_KEYS: Lazy<Vec<String>> = Lazy::new(|| {
    let defaults = serde_yaml::to_value(ServerConf::default()).expect("ServerConf serializes");
    let mut keys: Vec<String> = defaults
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys
});

pub(super) fn build(
    section: Option<serde_yaml::Mapping>,
    origin: &str,
) -> Result<ServerConf, ConfigError> {
    let section = section.unwrap_or_default();
    for key in section.keys() {
        let name = key.as_str().unwrap_or("");
        if !KNOWN_KEYS.iter().any(|k| k == name) {
            let shown = serde_yaml::to_string(key).unwrap_or_default();
            return Err(ConfigError::new(
                origin,
                format!("pingora.{}", shown.trim()),
                format!("unknown key; Pingora's keys are: {}", KNOWN_KEYS.join(", ")),
            ));
        }
    }
    // An explicit `null` counts as absent: tollgate's default, not Pingora's (for
    // `grace_period_seconds`, null would otherwise bring back Pingora's 300 s).
    let user_set = |k: &str| section.get(k).is_some_and(|v| !v.is_null());
    let (set_grace, set_timeout, set_sock, set_pid, set_stealing) = (
        user_set("grace_period_seconds"),
        user_set("graceful_shutdown_timeout_seconds"),
        user_set("upgrade_sock"),
        user_set("pid_file"),
        user_set("work_stealing"),
    );
    let mut conf: ServerConf =
        serde_path_to_error::deserialize(serde_yaml::Value::Mapping(section)).map_err(|e| {
            ConfigError::new(
                origin,
                format!("pingora.{}", e.path()),
                super::without_type_names(e.into_inner().to_string()),
            )
        })?;
    if !set_grace {
        conf.grace_period_seconds = Some(DEFAULT_GRACE_PERIOD_SECONDS);
    }
    if !set_timeout {
        conf.graceful_shutdown_timeout_seconds = Some(DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS);
    }
    if !set_sock {
        conf.upgrade_sock = DEFAULT_UPGRADE_SOCK.to_string();
    }
    if !set_pid {
        conf.pid_file = DEFAULT_PID_FILE.to_string();
    }
    if !set_stealing && conf.threads == 1 {
        // One worker has nobody to steal from: a single-threaded runtime does the same work
        // without the multi-threaded scheduler's atomics and wake-ups (docs/performance.md).
        conf.work_stealing = false;
    }
    for (key, seconds) in [
        ("pingora.grace_period_seconds", conf.grace_period_seconds),
        (
            "pingora.graceful_shutdown_timeout_seconds",
            conf.graceful_shutdown_timeout_seconds,
        ),
    ] {
        super::at_most_a_year(origin, key, seconds.unwrap_or(0))?;
    }
    if conf.threads == 0 {
        return Err(ConfigError::new(
            origin,
            "pingora.threads",
            "must be at least 1",
        ));
    }
    // Each is an OS thread started at once: a typo (`threads: 10000000`) would exhaust the
    // process's threads or memory at start instead of being reported.
    if conf.threads > MAX_THREADS {
        return Err(ConfigError::new(
            origin,
            "pingora.threads",
            format!("must be at most {MAX_THREADS}"),
        ));
    }
    // With 0 accept tasks the listeners are bound but never accepted on: both services exit
    // at once while the process stays up, serving nothing.
    if conf.listener_tasks_per_fd == 0 {
        return Err(ConfigError::new(
            origin,
            "pingora.listener_tasks_per_fd",
            "must be at least 1 (0 would accept no connection)",
        ));
    }
    if let Some(path) = conf.ca_file.as_deref() {
        // Pingora reads it when the proxy's connector is built, where a failure is a panic.
        let mut roots = pingora::tls::RootCertStore::empty();
        pingora::tls::load_ca_file_into_store(path, &mut roots)
            .map_err(|e| ConfigError::new(origin, "pingora.ca_file", format!("{path}: {e}")))?;
    }
    conf.validate()
        .map_err(|e| ConfigError::new(origin, "pingora", format!("rejected by Pingora: {e}")))
}

/// Without `ca_file`, Pingora loads the system's certificates (or `SSL_CERT_FILE`,
/// `SSL_CERT_DIR`) when the proxy's connector is built, every start, TLS upstream or not,
/// and panics if that fails. Checked before (and by `-t`); not in [`build`], which tests run
/// often.
/// Worker threads of the proxy service at most: far above any core count it could use.
const MAX_THREADS: usize = 1024;

pub fn check_system_roots(conf: &ServerConf) -> Result<(), ConfigError> {
    if conf.ca_file.is_some() {
        return Ok(());
    }
    let mut roots = pingora::tls::RootCertStore::empty();
    pingora::tls::load_platform_certs_incl_env_into_store(&mut roots).map_err(|e| {
        let key = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
            .into_iter()
            .find(|name| std::env::var_os(name).is_some())
            .unwrap_or("(system certificates)");
        ConfigError::new(
            "environment",
            key,
            format!("cannot load CA certificates: {e}"),
        )
    })
}

/// The files a daemon writes: Pingora opens them only after the process forked (and, in a
/// graceful upgrade, after the running tollgate was asked for its sockets), where a failure is
/// a panic and nobody is left serving. So they are checked first, and by `-t -d`.
pub fn check_daemon_files(conf: &ServerConf, origin: &str) -> Result<(), ConfigError> {
    check_daemon_identity(conf, origin)?;
    if let Some(path) = conf.error_log.as_deref() {
        // Opened before the fork: relative to the directory tollgate starts in.
        writable(Path::new(path)).map_err(|problem| {
            ConfigError::new(origin, "pingora.error_log", format!("{path}: {problem}"))
        })?;
    }
    // Created after the daemon changed to `working_directory` (by default `/`).
    let pid_file = Path::new(&conf.pid_file);
    let resolved = match &conf.working_directory {
        _ if pid_file.is_absolute() => pid_file.to_path_buf(),
        Some(dir) => dir.join(pid_file),
        None => Path::new("/").join(pid_file),
    };
    writable(&resolved).map_err(|problem| {
        let at = if resolved.as_path() == pid_file {
            String::new()
        } else {
            format!(" (the daemon writes it at {})", resolved.display())
        };
        ConfigError::new(
            origin,
            "pingora.pid_file",
            format!("{}{at}: {problem}", conf.pid_file),
        )
    })
}

/// What else the daemon's start takes from the section, where Pingora panics on a failure
/// (`error_log: ""` and a `user` with a NUL byte in the foreground, before the fork) or the
/// daemon dies unseen (a `working_directory`, `user` or `group` that does not exist).
fn check_daemon_identity(conf: &ServerConf, origin: &str) -> Result<(), ConfigError> {
    let err = |key: &str, problem: String| ConfigError::new(origin, key, problem);
    if conf.error_log.as_deref() == Some("") {
        return Err(err("pingora.error_log", "must not be empty".into()));
    }
    if let Some(dir) = conf.working_directory.as_deref() {
        if !dir.is_dir() {
            return Err(err(
                "pingora.working_directory",
                format!(
                    "{}: not an existing directory (the daemon changes to it)",
                    dir.display()
                ),
            ));
        }
    }
    for (key, name, exists) in [
        (
            "pingora.user",
            conf.user.as_deref(),
            user_exists as fn(&CString) -> bool,
        ),
        ("pingora.group", conf.group.as_deref(), group_exists),
    ] {
        let Some(name) = name else { continue };
        let known = CString::new(name).map(|c| exists(&c)).unwrap_or(false);
        if !known {
            return Err(err(
                key,
                format!("'{name}': no such account on this system"),
            ));
        }
    }
    Ok(())
}

fn user_exists(name: &CString) -> bool {
    // SAFETY: a valid NUL-terminated name; the result is only tested for null, at start-up
    // before other threads could call getpwnam.
    !unsafe { libc::getpwnam(name.as_ptr()) }.is_null()
}

fn group_exists(name: &CString) -> bool {
    // SAFETY: as for `user_exists`, with getgrnam.
    !unsafe { libc::getgrnam(name.as_ptr()) }.is_null()
}

/// Whether this process could create or write `path` (a read-only mount counts).
fn writable(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err("is a directory".into());
    }
    if path.exists() {
        return access(path, libc::W_OK).map_err(|e| format!("cannot be written ({e})"));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("its directory {} does not exist", dir.display()));
    }
    access(dir, libc::W_OK | libc::X_OK)
        .map_err(|e| format!("cannot be created in {} ({e})", dir.display()))
}

fn access(path: &Path, mode: libc::c_int) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(c_path.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
