//! The process log: `env_logger` as `RUST_LOG` configures it, minus the library lines that
//! would print a credential. Pingora logs whole requests at `debug` and `trace`: the proxy's
//! header to the upstream (`pingora_proxy`: a client's `Authorization` forwarded in `none`
//! mode, `?key=<token>`), the raw bytes written to the upstream (`pingora_core`'s HTTP
//! client: the `set_headers` key, which no `Debug` redaction reaches) and the upstream's
//! response; and the request line when an admin reply cannot be written
//! (`/admin/users/<token>`). Those targets are dropped at those levels.

use log::{Level, Log, Metadata, Record};

/// Installs the process logger (once, before anything logs).
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Redacting { inner })).is_ok() {
        log::set_max_level(max);
    }
}

struct Redacting {
    inner: env_logger::Logger,
}

/// Whether records of `target` at `level` may carry a credential.
fn may_carry_credentials(target: &str, level: Level) -> bool {
    let verbose = level >= Level::Debug;
    target.starts_with("pingora_core::apps::http_app")
        || (verbose
            && (target.starts_with("pingora_proxy")
                || target.starts_with("pingora_core::protocols::http")))
}

impl Log for Redacting {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !may_carry_credentials(metadata.target(), metadata.level()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_that_print_requests_are_dropped_and_others_kept() {
        assert!(may_carry_credentials("pingora_proxy", Level::Trace));
        assert!(may_carry_credentials(
            "pingora_core::apps::http_app",
            Level::Error
        ));
        assert!(may_carry_credentials(
            "pingora_proxy::proxy_h1",
            Level::Debug
        ));
        assert!(may_carry_credentials(
            "pingora_core::protocols::http::v1::client",
            Level::Trace
        ));
        assert!(!may_carry_credentials("pingora_proxy", Level::Info));
        assert!(!may_carry_credentials(
            "pingora_core::protocols::http::v1::client",
            Level::Warn
        ));
        assert!(!may_carry_credentials("pingora_core::server", Level::Trace));
        assert!(!may_carry_credentials("tollgate", Level::Trace));
    }
}
