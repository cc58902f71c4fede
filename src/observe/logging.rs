//! The process log: `env_logger` as `RUST_LOG` configures it, minus the few library lines
//! that would print a credential. Pingora logs whole request headers at `trace` (the proxy's
//! `Authorization: Bearer <token>`, `?key=<token>`) and the request line when an admin reply
//! cannot be written (`/admin/users/<token>`); those records are dropped at any level.

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
    target.starts_with("pingora_core::apps::http_app")
        || (target.starts_with("pingora_proxy") && level == Level::Trace)
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
        assert!(!may_carry_credentials("pingora_proxy", Level::Debug));
        assert!(!may_carry_credentials("pingora_core::server", Level::Trace));
        assert!(!may_carry_credentials("tollgate", Level::Trace));
    }
}
