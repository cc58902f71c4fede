//! Process hand-overs: graceful upgrade in the safe order (`tollgate -u --upgrade-from PID`),
//! and, with `-d`, a launcher that returns only once the daemon serves ([`DaemonReady`]).
//!
//! Pingora's upgrade has the new process (`-u`) wait for the listening sockets on
//! `upgrade_sock` while the old one, on SIGQUIT, sends them there, retrying for about 5 s, and
//! then shuts down *whether or not they were taken*. So SIGQUIT must only be sent once the new
//! process waits for them: sent earlier, a new process still loading its users (seconds with a
//! large store) or failing to start leaves nobody listening. `--upgrade-from` makes the new
//! process send the SIGQUIT itself at the right moment, after its users are loaded and its
//! socket is bound; if it fails before that, the old process is never asked and keeps serving.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pingora::server::ExecutionPhase;
use tokio::sync::broadcast;

use crate::store::StoreStatus;

/// How long the new process may take from here to binding `upgrade_sock` (Pingora's
/// bootstrap does it at once).
const BIND_WITHIN: Duration = Duration::from_secs(10);

/// A SIGQUIT to the old process, sent once the upgrade socket is bound.
pub struct HandOver {
    thread: JoinHandle<Result<(), String>>,
}

impl HandOver {
    /// Call right before Pingora's `bootstrap`, which binds `upgrade_sock` and waits there.
    /// Checks that `old` is a running process first.
    pub fn when_bound(upgrade_sock: &Path, old: i32) -> Result<Self, String> {
        if old <= 0 {
            return Err(format!("--upgrade-from {old}: not a process id"));
        }
        // SAFETY: signal 0 sends nothing; it only checks that the process exists.
        if unsafe { libc::kill(old, 0) } != 0 {
            return Err(format!(
                "--upgrade-from {old}: {}",
                io::Error::last_os_error()
            ));
        }
        // A socket file left by an earlier upgrade would look bound: remove it (bootstrap
        // removes it too, before binding its own).
        match std::fs::remove_file(upgrade_sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", upgrade_sock.display())),
        }
        let path = upgrade_sock.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("upgrade hand-over".into())
            .spawn(move || signal_when_bound(&path, old))
            .map_err(|e| format!("cannot start the upgrade hand-over: {e}"))?;
        Ok(Self { thread })
    }

    /// After `bootstrap` returned (the sockets arrived): the thread's outcome.
    pub fn finish(self) -> Result<(), String> {
        self.thread
            .join()
            .map_err(|_| "the upgrade hand-over panicked".to_string())?
    }
}

fn signal_when_bound(path: &Path, old: i32) -> Result<(), String> {
    let deadline = Instant::now() + BIND_WITHIN;
    while !is_socket(path) {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} was not bound within {BIND_WITHIN:?}; process {old} was not asked to hand over",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::info!("upgrade: asking process {old} for its listeners (SIGQUIT)");
    // SAFETY: sends SIGQUIT to the process the operator named.
    if unsafe { libc::kill(old, libc::SIGQUIT) } != 0 {
        return Err(format!(
            "cannot signal process {old}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Sets [`StoreStatus::set_leaving`] as soon as Pingora starts handing the listeners to a new
/// process (SIGQUIT) or stopping (SIGTERM). During an upgrade both processes accept
/// connections for a few seconds (Pingora's old process keeps its copy of each listening
/// socket open for 5 s after sending them), so an admin write could otherwise land in the
/// old process after the new one loaded its users.
pub struct LeavingWatch {
    phases: parking_lot::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    status: Arc<StoreStatus>,
}

impl LeavingWatch {
    /// `phases`: [`pingora::server::Server::watch_execution_phase`], subscribed before `run`.
    pub fn new(phases: broadcast::Receiver<ExecutionPhase>, status: Arc<StoreStatus>) -> Self {
        Self {
            phases: parking_lot::Mutex::new(Some(phases)),
            status,
        }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for LeavingWatch {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().take() else {
            return;
        };
        loop {
            tokio::select! {
                phase = phases.recv() => match phase {
                    Ok(phase) if is_leaving(&phase) => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = shutdown.changed() => break,
            }
        }
        self.status.set_leaving();
    }
}

fn is_leaving(phase: &ExecutionPhase) -> bool {
    !matches!(
        phase,
        ExecutionPhase::Setup
            | ExecutionPhase::Bootstrap
            | ExecutionPhase::BootstrapComplete
            | ExecutionPhase::Running
    )
}

/// With `-d`, Pingora's launching process waits (`daemon_wait_for_ready`) for a SIGUSR1 from
/// the daemon before it exits. tollgate sends it once its services run, so `tollgate -d` (and
/// `systemctl start` and `reload`) return when tollgate serves, and by then the pid file names
/// the new process: systemd, which reads the pid file when the command returns, follows the
/// main process across a reload.
///
/// The launcher does not rely on Pingora's wait to hear that signal: it exits from its own
/// handler (`on_ready_signal`).
pub struct DaemonReady {
    launcher: u32,
}

/// The launching process's id, for [`on_ready_signal`]; 0 until [`DaemonReady::install`].
static LAUNCHER: AtomicI32 = AtomicI32::new(0);

/// SIGUSR1 in the launching process: the daemon serves, so the launcher exits 0; in any other
/// process (the daemon inherits the handler) nothing.
///
/// Pingora's launcher waits for SIGUSR1 through tokio's signal listener, and tokio wakes its
/// listeners through one socket pair per process, made by its first runtime with I/O. Here
/// that is the start-up load's, before the fork, so the daemon inherits the pair and every
/// runtime of the daemon polls the same socket: the daemon's runtimes read the wake-ups meant
/// for the launcher. On a loaded machine they won every race, and the launcher missed all of
/// the daemon's signals (30 s of them) and would have waited out Pingora's 600 s. tokio's
/// registration keeps this handler and calls it after its own (signal-hook chains the handler
/// it replaces), so it runs on every SIGUSR1 the launcher gets, whoever reads the socket.
extern "C" fn on_ready_signal(_: libc::c_int) {
    const MESSAGE: &[u8] = b"tollgate -d: the daemon signaled readiness, launcher exiting\n";
    // SAFETY: getpid, write and _exit are async-signal-safe; the atomic load is lock-free.
    unsafe {
        if libc::getpid() == LAUNCHER.load(Ordering::Relaxed) {
            libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(0);
        }
    }
}

impl DaemonReady {
    /// Call in the launching process, before Pingora daemonizes. From here a SIGUSR1 ends the
    /// launcher (`on_ready_signal`); only the daemon sends one, once it serves. (Until
    /// Pingora's launcher listened, a signal's default action would have killed it.)
    pub fn install() -> Self {
        let launcher = std::process::id();
        LAUNCHER.store(
            i32::try_from(launcher).expect("a pid fits pid_t"),
            Ordering::Relaxed,
        );
        // SAFETY: installs a handler that makes only async-signal-safe calls.
        unsafe {
            libc::signal(
                libc::SIGUSR1,
                on_ready_signal as *const () as libc::sighandler_t,
            );
        }
        Self { launcher }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for DaemonReady {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        if std::process::id() != self.launcher {
            notify_launcher(self.launcher).await;
        }
        let _ = shutdown.changed().await;
    }
}

/// Sends SIGUSR1 until the launcher has exited (one is enough for [`on_ready_signal`]; the
/// repeats cost nothing and end with it).
async fn notify_launcher(launcher: u32) {
    let Ok(pid) = i32::try_from(launcher) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // SAFETY: signals the process that started this daemon.
        if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
            return; // gone: it took the signal and exited
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log::warn!("the launching process {launcher} did not exit after the ready signal");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_pid_that_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("upgrade.sock");
        let e = HandOver::when_bound(&sock, 0).err().unwrap();
        assert!(e.contains("not a process id"), "{e}");
        // Far above any pid_max.
        let e = HandOver::when_bound(&sock, i32::MAX).err().unwrap();
        assert!(e.contains("No such process"), "{e}");
    }

    #[test]
    fn signals_only_after_the_socket_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("upgrade.sock");
        // A stale socket file from an earlier upgrade must not count as bound.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let mut old = std::process::Command::new("sleep");
        old.arg("30");
        // A test run started in the background by a non-interactive shell inherits SIGQUIT
        // ignored, and so would `sleep`: give it the default action, as a tollgate has.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut old, || {
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut old = old.spawn().unwrap();
        let hand_over = HandOver::when_bound(&sock, old.id() as i32).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(old.try_wait().unwrap().is_none(), "not signalled yet");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        hand_over.finish().unwrap();
        let status = old.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGQUIT));
    }
}
