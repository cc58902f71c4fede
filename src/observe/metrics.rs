//! Prometheus metrics. Per-request work is a few atomic adds on pre-resolved handles: no label
//! lookups, no locks. Gauges about the cache and the store are read when scraped.

use std::time::Duration;

use super::recent_clients::RecentClients;
use crate::clock::now_ms;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// How a proxied request ended, as counted in `tollgate_requests_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Proxied,
    Unauthorized,
    Forbidden,
    RateLimited,
    BadRequest,
    /// A request body over `clients.max_body_bytes`.
    TooLarge,
    /// A request body that stopped arriving (`clients.body_timeout_seconds`).
    TimedOut,
    UpstreamError,
    /// A CORS preflight answered by tollgate itself.
    Preflight,
    /// The client went away before its answer was complete, or stopped reading it
    /// (`clients.send_timeout_seconds`).
    ClientClosed,
}

impl Outcome {
    const ALL: [Outcome; 10] = [
        Outcome::Proxied,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::BadRequest,
        Outcome::TooLarge,
        Outcome::TimedOut,
        Outcome::UpstreamError,
        Outcome::Preflight,
        Outcome::ClientClosed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Proxied => "proxied",
            Outcome::Unauthorized => "401",
            Outcome::Forbidden => "403",
            Outcome::RateLimited => "429",
            Outcome::BadRequest => "400",
            Outcome::TooLarge => "413",
            Outcome::TimedOut => "408",
            Outcome::UpstreamError => "502",
            Outcome::Preflight => "preflight",
            Outcome::ClientClosed => "client_closed",
        }
    }
}

/// The store's sync state, read at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreGauges {
    pub users_in_cache: usize,
    pub pending_changes: usize,
    /// Users whose change the store held back while writing the others' (see `ApplyReport`).
    pub held_back_users: u64,
    pub last_flush_epoch_ms: u64,
    pub flush_failures: u64,
    pub stream_connected: bool,
    pub stream_reconnects: u64,
    pub ready: bool,
}

pub struct Metrics {
    registry: Registry,
    requests: Vec<IntCounter>,
    upstream_latency: Histogram,
    connect_failures: IntCounter,
    connections_refused: IntCounter,
    header_timeouts: IntCounter,
    send_timeouts: IntCounter,
    /// Clients refused with 429 lately, by their limit key.
    limited_clients: RecentClients,
    limited_clients_gauge: IntGauge,
    users: IntGauge,
    pending: IntGauge,
    held_back: IntGauge,
    last_flush: IntGauge,
    flush_failures: IntGauge,
    stream_connected: IntGauge,
    reconnects: IntGauge,
    ready: IntGauge,
}

impl Metrics {
    pub fn new(mode: &str, store: &str) -> Self {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Proxy requests by result and gatekeeper mode",
            ),
            &["result", "mode"],
        )
        .expect("valid metric");
        let requests = Outcome::ALL
            .iter()
            .map(|o| requests_vec.with_label_values(&[o.label(), mode]))
            .collect();
        let upstream_latency = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_upstream_latency_seconds",
                "Time from choosing an upstream to the end of its response",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help).const_label("store", store))
                .expect("valid metric")
        };
        let metrics = Self {
            users: IntGauge::new("tollgate_users_cached", "Users in the in-process cache").expect("valid metric"),
            pending: gauge("tollgate_store_pending_changes", "Users with changes not yet written to the store"),
            held_back: gauge(
                "tollgate_store_held_back_users",
                "Users whose change could not be written while the others' were; retried with every write",
            ),
            last_flush: gauge(
                "tollgate_store_last_flush_timestamp_seconds",
                "When the store last confirmed a write (0 = never)",
            ),
            flush_failures: gauge("tollgate_store_flush_failures_total", "Store writes that failed and are being retried"),
            stream_connected: gauge(
                "tollgate_store_stream_connected",
                "1 while the store's change stream is connected (Firebase); 1 for stores without one",
            ),
            reconnects: gauge("tollgate_store_stream_reconnects_total", "Times the store's change stream reconnected"),
            ready: gauge("tollgate_ready", "1 once users are loaded and the store is in sync"),
            connect_failures: IntCounter::new(
                "tollgate_upstream_connect_failures_total",
                "Upstream connection attempts that failed (each is retried on the next upstream, \
                 once per upstream)",
            )
            .expect("valid metric"),
            connections_refused: IntCounter::new(
                "tollgate_client_connections_refused_total",
                "Client connections answered 429 and closed: their address had \
                 clients.max_connections_per_ip open",
            )
            .expect("valid metric"),
            header_timeouts: IntCounter::new(
                "tollgate_client_header_timeouts_total",
                "Client connections closed because a request header did not arrive within \
                 clients.header_timeout_seconds",
            )
            .expect("valid metric"),
            send_timeouts: IntCounter::new(
                "tollgate_client_send_timeouts_total",
                "Client connections (proxy and admin listeners) closed because the client \
                 took none of its answer for clients.send_timeout_seconds",
            )
            .expect("valid metric"),
            limited_clients: RecentClients::default(),
            limited_clients_gauge: IntGauge::new(
                "tollgate_rate_limited_clients",
                "Distinct clients (users; client IPs for anonymous requests and failed \
                 authentications) refused with 429 in the last minute, estimated",
            )
            .expect("valid metric"),
            registry,
            requests,
            upstream_latency,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests_vec),
            Box::new(metrics.upstream_latency.clone()),
            Box::new(metrics.connect_failures.clone()),
            Box::new(metrics.connections_refused.clone()),
            Box::new(metrics.header_timeouts.clone()),
            Box::new(metrics.send_timeouts.clone()),
            Box::new(metrics.limited_clients_gauge.clone()),
            Box::new(metrics.users.clone()),
            Box::new(metrics.pending.clone()),
            Box::new(metrics.held_back.clone()),
            Box::new(metrics.last_flush.clone()),
            Box::new(metrics.flush_failures.clone()),
            Box::new(metrics.stream_connected.clone()),
            Box::new(metrics.reconnects.clone()),
            Box::new(metrics.ready.clone()),
        ];
        for c in collectors {
            metrics.registry.register(c).expect("unique metric names");
        }
        metrics
    }

    /// One request ended; `upstream` is its upstream time when the upstream answered.
    #[inline]
    pub fn record_request(&self, outcome: Outcome, upstream: Option<Duration>) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[index].inc();
        if let Some(latency) = upstream {
            self.upstream_latency.observe(latency.as_secs_f64());
        }
    }

    /// A client was refused with 429; `key` is its rate-limit key (a keyed hash).
    #[inline]
    pub fn record_rate_limited(&self, key: u64, now_ms: u64) {
        self.limited_clients.record(key, now_ms);
    }

    pub fn record_connect_failure(&self) {
        self.connect_failures.inc();
    }

    pub fn record_connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn record_header_timeout(&self) {
        self.header_timeouts.inc();
    }

    pub fn record_send_timeout(&self) {
        self.send_timeouts.inc();
    }

    /// The text exposition, with gauges refreshed from `gauges`.
    pub fn render(&self, gauges: StoreGauges) -> Vec<u8> {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.users.set(as_i64(gauges.users_in_cache as u64));
        self.pending.set(as_i64(gauges.pending_changes as u64));
        self.held_back.set(as_i64(gauges.held_back_users));
        self.last_flush
            .set(as_i64(gauges.last_flush_epoch_ms / 1000));
        self.flush_failures.set(as_i64(gauges.flush_failures));
        self.stream_connected
            .set(i64::from(gauges.stream_connected));
        self.reconnects.set(as_i64(gauges.stream_reconnects));
        self.ready.set(i64::from(gauges.ready));
        self.limited_clients_gauge
            .set(as_i64(self.limited_clients.estimate(now_ms())));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new("user_token", "sqlite");
        m.record_request(Outcome::RateLimited, None);
        m.record_request(Outcome::Proxied, Some(Duration::from_millis(3)));
        for key in [1 << 60, 1 << 60, 3 << 60] {
            m.record_rate_limited(key, now_ms());
        }
        let text = String::from_utf8(m.render(StoreGauges {
            users_in_cache: 7,
            ..Default::default()
        }))
        .unwrap();
        assert!(
            text.contains(r#"tollgate_requests_total{mode="user_token",result="429"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"tollgate_requests_total{mode="user_token",result="proxied"} 1"#));
        assert!(text.contains("tollgate_upstream_latency_seconds_count 1"));
        assert!(text.contains("tollgate_users_cached 7"));
        assert!(text.contains("tollgate_rate_limited_clients 2"), "{text}");
        assert!(text.contains(r#"tollgate_store_pending_changes{store="sqlite"} 0"#));
    }
}
