//! tollgate's entry point: read and check the configuration, load users, then assemble the
//! Pingora services (proxy, admin, store sync, maintenance) and run them.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info, warn};
use pingora::prelude::*;
use pingora::proxy::http_proxy;
use pingora::server::RunArgs;
use pingora::services::listening::Service;

use tollgate::admin::AdminService;
use tollgate::config::{Config, ProcessEnv};
use tollgate::observe::{AccessLog, AccessLogWriter, Metrics};
use tollgate::proxy::connection::{ConnectionGuard, ConnectionLimits};
use tollgate::proxy::Proxy;
use tollgate::store::{self, purge::TemporaryUserPurge, StoreStatus, SyncEngine};
use tollgate::upgrade::{DaemonReady, HandOver, LeavingWatch};

/// mimalloc instead of glibc's malloc: Pingora allocates and frees many small objects per
/// request (headers, tasks, buffers); see docs/performance.md for the measured difference.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the memory start-up's load freed to the system. The load decodes users on threads
/// that have exited since; mimalloc kept their freed pages (with 1,000,000 users in SQLite,
/// 1.46 GB resident after start-up instead of 0.61 GB, for good).
fn release_load_memory() {
    // SAFETY: mi_collect only walks and trims mimalloc's own heaps; any thread may call it.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Pingora's flags (`-c`, `-d`, `-t`, `-u`), described for tollgate (Pingora's own help text
/// for `-u` and `-t` describes something else).
#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Edge HTTP proxy with token gatekeeper and rate limiting"
)]
struct Cli {
    /// The configuration file (YAML; see conf/tollgate.yaml)
    #[arg(short, long, value_name = "FILE")]
    conf: Option<String>,

    /// Check the configuration and environment, then exit (0 when valid)
    #[arg(short, long)]
    test: bool,

    /// Run in the background (an access log then needs access_log.path: stdout is /dev/null)
    #[arg(short, long)]
    daemon: bool,

    /// Take over the listening sockets of the running tollgate (graceful upgrade)
    #[arg(short, long)]
    upgrade: bool,

    /// With -u: once this process is ready, ask process PID (the running tollgate) to hand
    /// over its listeners (SIGQUIT). Without it, send that SIGQUIT yourself after starting
    /// this process, within about 5 seconds; see docs/operations.md.
    #[arg(long, value_name = "PID", requires = "upgrade")]
    upgrade_from: Option<i32>,
}

fn main() -> ExitCode {
    // A file-size limit (`ulimit -f`) must reach the store as a write error that it reports
    // and retries, not kill the proxy (the default action of SIGXFSZ).
    // SAFETY: sets a signal's disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    tollgate::observe::logging::init();
    let cli = Cli::parse();
    let Some(path) = cli.conf.clone() else {
        eprintln!("tollgate: no configuration file; pass -c FILE (see conf/tollgate.yaml)");
        return ExitCode::from(2);
    };
    let config = match Config::load(path.as_ref(), &ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tollgate: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let daemon = cli.daemon || config.server.daemon;
    if daemon {
        if let Err(e) = config.check_daemon() {
            eprintln!("tollgate: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    if let Err(e) = config.check_system_roots() {
        eprintln!("tollgate: configuration error: {e}");
        return ExitCode::from(2);
    }
    // Before a real start too, so a malformed secret is the same configuration error (exit 2)
    // whether or not `-t` found it first.
    if let Err(e) = store::check(&config.store) {
        eprintln!("tollgate: configuration error: environment: {e}");
        return ExitCode::from(2);
    }
    if cli.test {
        println!("tollgate: configuration {path} is valid");
        return ExitCode::SUCCESS;
    }
    let opt = Opt {
        upgrade: cli.upgrade,
        daemon,
        test: cli.test,
        conf: cli.conf,
        ..Opt::default()
    };
    match run(opt, config, cli.upgrade_from) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Once, like a configuration error: the logger writes to stderr as well.
            eprintln!("tollgate: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(mut opt: Opt, mut config: Config, upgrade_from: Option<i32>) -> Result<(), String> {
    // With -u the running tollgate holds the ports and hands them over.
    if !opt.upgrade {
        let mut addrs = config.listen.clone();
        addrs.push(config.admin.listen);
        tollgate::net::check_bindable(&addrs).map_err(|e| e.to_string())?;
    }
    let backend = store::open(&config.store)
        .map_err(|e| format!("store {}: {e}", config.store.kind.as_str()))?;
    let cache = Arc::new(store::load_at_startup(backend.as_ref()).map_err(|e| e.to_string())?);
    if opt.upgrade {
        // The hand-over may come much later; what others write meanwhile must be read.
        backend.startup_read_may_be_stale();
    }
    release_load_memory();
    let status = StoreStatus::new(backend.name(), Arc::clone(&cache));
    status.set_ready(true);
    let metrics = Arc::new(Metrics::new(
        config.gatekeeper.mode.as_str(),
        backend.name(),
    ));

    let (access_log, access_log_writer) = open_access_log(&config)?.unzip();

    let shutdown_deadline =
        std::time::Duration::from_secs(config.server.grace_period_seconds.unwrap_or(5).max(1));
    // tollgate read the file itself; Pingora gets the validated ServerConf.
    opt.conf = None;
    let daemon_ready = opt.daemon.then(|| {
        config.server.daemon_wait_for_ready = true;
        DaemonReady::install()
    });
    let hand_over = upgrade_from
        .map(|old| HandOver::when_bound(config.server.upgrade_sock.as_ref(), old))
        .transpose()?;
    let mut server = Server::new_with_opt_and_conf(opt, std::mem::take(&mut config.server));
    server.bootstrap();
    if let Some(hand_over) = hand_over {
        hand_over.finish()?;
    }

    let proxy = Proxy::new(
        &config,
        Arc::clone(&cache),
        Arc::clone(&status),
        Arc::clone(&metrics),
        access_log,
    );
    let guarded = ConnectionGuard::new(
        http_proxy(&server.configuration, proxy),
        ConnectionLimits::proxy(&config),
        Arc::clone(&metrics),
    );
    let mut proxy_service = Service::new("tollgate proxy".to_string(), guarded);
    let socket_options = tollgate::net::client_socket_options(&config.clients);
    for addr in &config.listen {
        proxy_service.add_tcp_with_settings(&addr.to_string(), socket_options.clone());
    }

    let admin = AdminService::new(
        &config,
        Arc::clone(&cache),
        Arc::clone(&status),
        Arc::clone(&metrics),
    );
    let admin = ConnectionGuard::new(
        admin,
        ConnectionLimits::admin(&config),
        Arc::clone(&metrics),
    );
    let mut admin_service = Service::new("tollgate admin".to_string(), admin);
    admin_service.add_tcp_with_settings(&config.admin.listen.to_string(), socket_options);
    admin_service.threads = Some(1);

    let engine = SyncEngine::new(
        Arc::clone(&backend),
        Arc::clone(&status),
        config.store.flush_interval,
        shutdown_deadline,
    );
    let purge = TemporaryUserPurge::new(
        Arc::clone(&cache),
        Arc::clone(&backend),
        Arc::clone(&status),
        config.store.firebase.temporary_user_purge,
        std::time::Duration::from_secs(60),
    );

    let proxy_service = server.add_service(proxy_service);
    let admin_service = server.add_service(admin_service);
    if let Some(ready) = daemon_ready {
        let ready = server.add_service(background_service("daemon ready", ready));
        ready.add_dependencies([&proxy_service, &admin_service]);
    }
    let sync = background_service("store sync", engine);
    let engine = sync.task();
    server.add_service(sync);
    server.add_service(background_service("temporary user purge", purge));
    let leaving = LeavingWatch::new(server.watch_execution_phase(), Arc::clone(&status));
    server.add_service(background_service("leaving watch", leaving));
    let access_log_tail = access_log_writer.clone();
    if let Some(writer) = access_log_writer {
        server.add_service(background_service("access log", writer));
    }
    info!(
        "tollgate listening on {} (admin {}), gatekeeper {}, store {}, {} users",
        config
            .listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        config.admin.listen,
        config.gatekeeper.mode.as_str(),
        backend.name(),
        cache.len()
    );
    server.run(RunArgs::default());
    // Requests in flight at SIGTERM finish during the grace period, after the engine's
    // shutdown flush. Every service has stopped now: write what they counted too.
    let written = status.gauges().pending_changes == 0 || flush_after_shutdown(&engine);
    if let Some(writer) = access_log_tail {
        writer.finish();
    }
    if !written {
        // Not a clean stop: a supervisor shows it as failed rather than as a normal exit.
        return Err(format!(
            "store {}: changes could not be written before shutdown and are lost (see the \
             error above)",
            backend.name()
        ));
    }
    Ok(())
}

/// The access log, opened before any listener (a path that cannot be written stops start-up).
fn open_access_log(config: &Config) -> Result<Option<(AccessLog, AccessLogWriter)>, String> {
    let Some(settings) = &config.access_log else {
        return Ok(None);
    };
    let opened = AccessLog::new(settings.path.as_deref()).map_err(|e| {
        let path = settings
            .path
            .as_deref()
            .unwrap_or(std::path::Path::new("-"));
        format!("access_log.path {}: {e}", path.display())
    })?;
    Ok(Some(opened))
}

/// The last store write, after every service stopped; false when changes were left unwritten.
fn flush_after_shutdown(engine: &SyncEngine) -> bool {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let written = runtime.block_on(engine.final_flush());
            // A write cut off by the deadline may still wait on a lock another program holds
            // (SQLite's busy timeout, 5 s): dropping the runtime would wait for it.
            runtime.shutdown_background();
            written
        }
        Err(e) => {
            error!("cannot start the runtime for the last store flush: {e}");
            false
        }
    }
}
