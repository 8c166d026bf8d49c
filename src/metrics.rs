//! Prometheus metrics: every family in SPEC.md, registered once in an explicit [`Registry`].
//!
//! Components never look series up by label on the request path: the table builder resolves
//! handles ([`ListenerMetrics`], [`RequestCounters`]) once per listener/pool/backend and the
//! request path only increments them.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;

/// Why gatehouse refused something; the `reason` label of `gatehouse_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Acl,
    RateLimit,
    MaxConnections,
    HeaderTooLarge,
    HeaderTimeout,
    BadRequest,
    NoBackend,
    ProxyProtocol,
    Tls,
}

impl Rejection {
    /// Every reason, in label order.
    pub const ALL: [Rejection; 9] = [
        Rejection::Acl,
        Rejection::RateLimit,
        Rejection::MaxConnections,
        Rejection::HeaderTooLarge,
        Rejection::HeaderTimeout,
        Rejection::BadRequest,
        Rejection::NoBackend,
        Rejection::ProxyProtocol,
        Rejection::Tls,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Acl => "acl",
            Rejection::RateLimit => "rate_limit",
            Rejection::MaxConnections => "max_connections",
            Rejection::HeaderTooLarge => "header_too_large",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::BadRequest => "bad_request",
            Rejection::NoBackend => "no_backend",
            Rejection::ProxyProtocol => "proxy_protocol",
            Rejection::Tls => "tls",
        }
    }
}

/// Latency buckets for a proxy: 0.5 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The metric families, registered in [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    connections_total: IntCounterVec,
    connections_active: IntGaugeVec,
    connections_idle: IntGaugeVec,
    bytes_received: IntCounterVec,
    bytes_sent: IntCounterVec,
    rejected_total: IntCounterVec,
    tls_handshake_errors: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_active_connections: IntGaugeVec,
    pub backend_responses_aborted: IntCounterVec,
    pub health_checks_total: IntCounterVec,
    pub upstream_retries_total: IntCounterVec,
    pub config_reloads_total: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub route_requests_total: IntCounterVec,
    pub upstream_connect_duration: HistogramVec,
    pub tls_certificate_expiry: prometheus::GaugeVec,
    pub access_log_dropped: IntCounter,
}

fn counter_vec(
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

impl Metrics {
    /// Creates and registers every family (and the process collector on Linux).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let metrics = Metrics {
            requests_total: counter_vec(
                "gatehouse_requests_total",
                "HTTP responses sent to clients, by listener, pool, backend and status code.",
                &["listener", "pool", "backend", "code"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "gatehouse_request_duration_seconds",
                    "Time from request head received to response head sent.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["listener", "pool"],
            )?,
            connections_total: counter_vec(
                "gatehouse_connections_total",
                "Client connections accepted.",
                &["listener"],
            )?,
            connections_active: gauge_vec(
                "gatehouse_connections_active",
                "Client connections currently open.",
                &["listener"],
            )?,
            connections_idle: gauge_vec(
                "gatehouse_connections_idle",
                "Open HTTP/1 keep-alive connections idle between requests, their HTTP state released.",
                &["listener"],
            )?,
            bytes_received: counter_vec(
                "gatehouse_bytes_received_total",
                "Bytes received from clients.",
                &["listener"],
            )?,
            bytes_sent: counter_vec(
                "gatehouse_bytes_sent_total",
                "Bytes sent to clients.",
                &["listener"],
            )?,
            rejected_total: counter_vec(
                "gatehouse_rejected_total",
                "Requests or connections refused by gatehouse itself, by reason.",
                &["listener", "reason"],
            )?,
            tls_handshake_errors: counter_vec(
                "gatehouse_tls_handshake_errors_total",
                "TLS handshakes that failed.",
                &["listener"],
            )?,
            backend_up: gauge_vec(
                "gatehouse_backend_up",
                "1 when the backend passes its health checks and is not ejected.",
                &["pool", "backend"],
            )?,
            backend_active_connections: gauge_vec(
                "gatehouse_backend_active_connections",
                "Requests or tunnels currently in flight to the backend.",
                &["pool", "backend"],
            )?,
            backend_responses_aborted: counter_vec(
                "gatehouse_backend_responses_aborted_total",
                "Responses a backend began and did not finish (it closed the connection, sent a \
                 malformed chunk or went silent for timeouts.request): the client's response \
                 was cut off.",
                &["pool", "backend"],
            )?,
            health_checks_total: counter_vec(
                "gatehouse_health_checks_total",
                "Active health checks run, by result.",
                &["pool", "backend", "result"],
            )?,
            upstream_retries_total: counter_vec(
                "gatehouse_upstream_retries_total",
                "Requests retried on another backend.",
                &["pool"],
            )?,
            config_reloads_total: counter_vec(
                "gatehouse_config_reloads_total",
                "Configuration reload attempts, by result.",
                &["result"],
            )?,
            config_last_reload_success: Gauge::new(
                "gatehouse_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load.",
            )?,
            route_requests_total: counter_vec(
                "gatehouse_route_requests_total",
                "Requests matched by each route (the listener's default pool is route \"default\").",
                &["listener", "route"],
            )?,
            upstream_connect_duration: HistogramVec::new(
                HistogramOpts::new(
                    "gatehouse_upstream_connect_duration_seconds",
                    "Time to open a TCP connection to a backend.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["pool"],
            )?,
            tls_certificate_expiry: prometheus::GaugeVec::new(
                Opts::new(
                    "gatehouse_tls_certificate_expiry_timestamp_seconds",
                    "Unix time at which each served certificate expires.",
                ),
                &["listener", "certificate"],
            )?,
            access_log_dropped: IntCounter::new(
                "gatehouse_access_log_dropped_total",
                "Access-log lines dropped because the writer fell behind.",
            )?,
            registry,
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(metrics.requests_total.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.connections_total.clone()),
            Box::new(metrics.connections_active.clone()),
            Box::new(metrics.connections_idle.clone()),
            Box::new(metrics.bytes_received.clone()),
            Box::new(metrics.bytes_sent.clone()),
            Box::new(metrics.rejected_total.clone()),
            Box::new(metrics.tls_handshake_errors.clone()),
            Box::new(metrics.backend_up.clone()),
            Box::new(metrics.backend_active_connections.clone()),
            Box::new(metrics.backend_responses_aborted.clone()),
            Box::new(metrics.health_checks_total.clone()),
            Box::new(metrics.upstream_retries_total.clone()),
            Box::new(metrics.config_reloads_total.clone()),
            Box::new(metrics.config_last_reload_success.clone()),
            Box::new(metrics.route_requests_total.clone()),
            Box::new(metrics.upstream_connect_duration.clone()),
            Box::new(metrics.tls_certificate_expiry.clone()),
            Box::new(metrics.access_log_dropped.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector)?;
        }
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for result in ["success", "failure"] {
            metrics.config_reloads_total.with_label_values(&[result]);
        }
        Ok(metrics)
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut buffer = Vec::new();
        let families = self.registry.gather();
        if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        buffer
    }

    /// Removes every series of a backend that left the configuration, so dashboards and
    /// alerts do not keep showing a VM that no longer exists.
    pub fn forget_backend(&self, pool: &str, backend: &str) {
        let _ = self.backend_up.remove_label_values(&[pool, backend]);
        let _ = self
            .backend_active_connections
            .remove_label_values(&[pool, backend]);
        let _ = self
            .backend_responses_aborted
            .remove_label_values(&[pool, backend]);
        for result in ["success", "failure"] {
            let _ = self
                .health_checks_total
                .remove_label_values(&[pool, backend, result]);
        }
        for family in self.requests_total.collect() {
            for metric in family.get_metric() {
                let label = |name| label_value(metric, name);
                if label("pool") == pool && label("backend") == backend {
                    let (listener, code) = (label("listener"), label("code"));
                    let _ = self
                        .requests_total
                        .remove_label_values(&[&listener, pool, backend, &code]);
                }
            }
        }
    }

    /// Exports the expiry of every served certificate (listener, file, notAfter in Unix
    /// seconds) and removes the series of any other: a listener removed, or another file
    /// served in a certificate's place, must not leave an expiry alert firing for a
    /// certificate no client is shown.
    pub fn export_certificates(&self, served: &[(&str, String, i64)]) {
        for family in self.tls_certificate_expiry.collect() {
            for metric in family.get_metric() {
                let listener = label_value(metric, "listener");
                let certificate = label_value(metric, "certificate");
                let is_served = served
                    .iter()
                    .any(|(name, file, _)| *name == listener && *file == certificate);
                if !is_served {
                    let _ = self
                        .tls_certificate_expiry
                        .remove_label_values(&[&listener, &certificate]);
                }
            }
        }
        for (listener, file, not_after) in served {
            self.tls_certificate_expiry
                .with_label_values(&[listener, file.as_str()])
                .set(*not_after as f64);
        }
    }

    /// Handles for one listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections_total: self.connections_total.with_label_values(&[listener]),
            connections_active: self.connections_active.with_label_values(&[listener]),
            connections_idle: self.connections_idle.with_label_values(&[listener]),
            bytes_received: self.bytes_received.with_label_values(&[listener]),
            bytes_sent: self.bytes_sent.with_label_values(&[listener]),
            tls_handshake_errors: self.tls_handshake_errors.with_label_values(&[listener]),
            rejected: Rejection::ALL.map(|reason| {
                self.rejected_total
                    .with_label_values(&[listener, reason.as_str()])
            }),
        }
    }

    /// The duration histogram of a listener/pool pair (pool empty for local answers).
    pub fn request_duration(&self, listener: &str, pool: &str) -> Histogram {
        self.request_duration.with_label_values(&[listener, pool])
    }

    /// Request counters of a listener/pool/backend triple (backend empty for local answers).
    pub fn request_counters(&self, listener: &str, pool: &str, backend: &str) -> RequestCounters {
        RequestCounters {
            family: self.requests_total.clone(),
            labels: [listener.to_string(), pool.to_string(), backend.to_string()],
            common: Default::default(),
        }
    }
}

/// Per-listener handles.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    /// Keep-alive connections parked between requests (see `proxy::park`).
    pub connections_idle: IntGauge,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub tls_handshake_errors: IntCounter,
    rejected: [IntCounter; 9],
}

impl ListenerMetrics {
    /// Counts one refusal.
    pub fn reject(&self, reason: Rejection) {
        if let Some(counter) = self.rejections(reason) {
            counter.inc();
        }
    }

    /// The counter of one reason's refusals, for what counts them away from the table (a
    /// connection's stream, which outlives the table it was accepted under).
    pub fn rejections(&self, reason: Rejection) -> Option<&IntCounter> {
        Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|index| self.rejected.get(index))
    }
}

/// Status codes whose series are cached after first use; others are looked up per response.
const COMMON_CODES: [u16; 20] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 408, 413, 429, 431, 500, 502, 503, 504,
    101,
];

/// `gatehouse_requests_total` for one listener/pool/backend, one series per status code,
/// each created lazily so that codes never seen are not exported as zeros.
pub struct RequestCounters {
    family: IntCounterVec,
    labels: [String; 3],
    common: [OnceLock<IntCounter>; COMMON_CODES.len()],
}

impl RequestCounters {
    /// Counts one response with `code`.
    pub fn count(&self, code: u16) {
        let lookup = || {
            let code = code.to_string();
            let [listener, pool, backend] = &self.labels;
            self.family.with_label_values(&[
                listener.as_str(),
                pool.as_str(),
                backend.as_str(),
                &code,
            ])
        };
        match COMMON_CODES.iter().position(|c| *c == code) {
            Some(index) => self.common[index].get_or_init(lookup).inc(),
            None => lookup().inc(),
        }
    }
}

impl std::fmt::Debug for RequestCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounters")
            .field("labels", &self.labels)
            .finish()
    }
}

/// The value of `metric`'s label `name` (empty when it has none).
fn label_value(metric: &prometheus::proto::Metric, name: &str) -> String {
    metric
        .get_label()
        .iter()
        .find(|pair| pair.name() == name)
        .map(|pair| pair.value().to_string())
        .unwrap_or_default()
}
