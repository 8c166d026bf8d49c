//! The balancing table: one immutable snapshot of everything the request path needs.
//!
//! Built by the publisher from a validated [`Config`] plus carried runtime state (health,
//! admin overrides, live counters, connection pools), then stored in an `ArcSwap`. Nothing in
//! here is ever mutated after publication except atomics (counters, round-robin cursors).

use super::backend::{Backend, BackendStats};
use super::connections::BackendConnections;
use super::connector::Connector;
use crate::access_log::AccessLog;
use crate::balancer::{self, Balancer, Candidate, PickContext, Tuning};
use crate::config::{
    AdminState, BackendConfig, Config, HashKey, HostMatch, ListenerConfig, PoolConfig,
};
use crate::config::{Algorithm, HealthCheckKind};
use crate::metrics::{ListenerMetrics, Metrics, RequestCounters};
use http::HeaderMap;
use ipnet::IpNet;
use prometheus::Histogram;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_rustls::TlsAcceptor;

/// Runtime facts about a backend that the config file does not say, supplied by the
/// publisher when it builds a table.
pub trait BackendFacts {
    /// Live counters for this backend (the same `Arc` across tables).
    fn stats(&mut self, pool: &str, backend: &str) -> Arc<BackendStats>;
    /// The admin state: a runtime override, else the configured one.
    fn admin_state(&self, pool: &str, backend: &str, configured: AdminState) -> AdminState;
    /// Whether the backend passes its health checks (`actively_checked`: the pool probes;
    /// an unprobed backend of such a pool is not yet known healthy) and is not ejected.
    fn healthy(&self, pool: &str, backend: &str, actively_checked: bool) -> bool;
    /// The share (0.1 to 1) of its weight a backend gets while its slow start ramps.
    fn weight_factor(&self, pool: &str, backend: &str, slow_start: std::time::Duration) -> f64;
    /// The pool's retry budget (the same `Arc` across tables).
    fn retry_budget(&mut self, pool: &str) -> Arc<super::retry::RetryBudget>;
    /// Where the request path reports what the publisher must act on (passive ejections).
    fn changes(&self) -> tokio::sync::mpsc::Sender<super::publisher::Change>;
    /// The keep-alive connections to a backend (kept while its address and the pool's
    /// timeouts and TLS settings stay).
    fn connections(
        &mut self,
        pool: &PoolConfig,
        backend: &BackendConfig,
    ) -> Result<Arc<BackendConnections>, String>;
    /// The listener's metric handles.
    fn listener_metrics(&mut self, listener: &str) -> ListenerMetrics;
    /// The rate limiter of a listener (the same buckets while the limit is unchanged).
    fn rate_limiter(
        &mut self,
        listener: &str,
        limit: crate::config::RateLimit,
    ) -> Arc<crate::rate_limit::RateLimiter>;
    /// The access log for `config` (the same writer while the setting is unchanged).
    fn access_log(&mut self, config: &crate::config::AccessLogConfig) -> Arc<AccessLog>;
}

/// A pool: its backends, who may receive traffic, and how to choose.
#[derive(Debug)]
pub struct Pool {
    pub config: PoolConfig,
    pub backends: Vec<Backend>,
    /// Indices into `backends` of those that may take new traffic.
    candidates: Vec<usize>,
    /// Active and healthy backends (fewer than `candidates` when failing open).
    available: usize,
    balancer: Box<dyn Balancer>,
    pub retry_budget: Arc<super::retry::RetryBudget>,
    /// `gatehouse_upstream_retries_total` of this pool.
    pub retries: prometheus::IntCounter,
    changes: tokio::sync::mpsc::Sender<super::publisher::Change>,
}

impl Pool {
    fn build(
        config: &PoolConfig,
        facts: &mut dyn BackendFacts,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let actively_checked = config.health_check.kind != HealthCheckKind::None;
        // With slow start, weights are scaled so a ramping backend's share can be fractional.
        let scale = if config.slow_start.is_zero() { 1 } else { 100 };
        let mut backends = Vec::with_capacity(config.backends.len());
        for backend in &config.backends {
            let host = http::HeaderValue::from_str(&backend.address.to_string())
                .map_err(|error| format!("backend {}: {error}", backend.name))?;
            let factor = facts.weight_factor(&config.name, &backend.name, config.slow_start);
            let effective_weight =
                ((f64::from(backend.weight * scale) * factor).round() as u32).max(1);
            backends.push(Backend {
                name: backend.name.clone(),
                address: backend.address,
                host,
                weight: backend.weight,
                effective_weight,
                admin_state: facts.admin_state(&config.name, &backend.name, backend.state),
                healthy: facts.healthy(&config.name, &backend.name, actively_checked),
                stats: facts.stats(&config.name, &backend.name),
                connections: facts.connections(config, backend)?,
            });
        }
        let mut candidates: Vec<usize> = (0..backends.len())
            .filter(|&index| backends[index].is_candidate())
            .collect();
        let available = candidates.len();
        if candidates.is_empty() && config.fail_open {
            candidates = (0..backends.len())
                .filter(|&index| backends[index].admin_state != AdminState::Disabled)
                .collect();
        }
        let balancer_candidates: Vec<Candidate> = candidates
            .iter()
            .map(|&index| Candidate {
                name: backends[index].name.clone(),
                weight: backends[index].effective_weight,
                stats: backends[index].stats.clone(),
            })
            .collect();
        let tuning = Tuning {
            latency_decay: config.latency_decay,
        };
        let ramping = candidates
            .iter()
            .any(|&index| backends[index].effective_weight < backends[index].weight * scale);
        let algorithm = match config.algorithm {
            Algorithm::RoundRobin if ramping => Algorithm::WeightedRoundRobin,
            algorithm => algorithm,
        };
        Ok(Pool {
            balancer: balancer::build(algorithm, &balancer_candidates, tuning),
            candidates,
            available,
            retry_budget: facts.retry_budget(&config.name),
            retries: metrics
                .upstream_retries_total
                .with_label_values(&[config.name.as_str()]),
            changes: facts.changes(),
            backends,
            config: config.clone(),
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// How many backends are active and healthy.
    pub fn available(&self) -> usize {
        self.available
    }

    /// True when no backend is available and `fail_open` sends to every non-disabled one.
    pub fn fail_open_active(&self) -> bool {
        self.available == 0 && !self.candidates.is_empty()
    }

    /// Whether backend `index` may be picked for new traffic.
    pub fn is_candidate(&self, index: usize) -> bool {
        self.candidates.contains(&index)
    }

    /// Reports how a request to backend `index` ended, for passive health: enough
    /// consecutive failures ask the publisher to eject it.
    pub fn record_outcome(&self, index: usize, success: bool) {
        let Some(backend) = self.backends.get(index) else {
            return;
        };
        if success {
            backend.stats.record_success();
        } else if backend
            .stats
            .record_failure(self.config.passive.consecutive_failures)
        {
            let _ = self.changes.try_send(super::publisher::Change::Eject {
                pool: self.config.name.clone(),
                backend: backend.name.clone(),
            });
        }
    }

    /// What the balancer may look at for a request from `client_ip` with `headers`; the
    /// consistent-hash key is computed only for `consistent_hash` pools.
    pub fn pick_context(&self, client_ip: IpAddr, headers: Option<&HeaderMap>) -> PickContext {
        let hash = if self.config.algorithm == Algorithm::ConsistentHash {
            let key = match (&self.config.hash_key, headers) {
                (HashKey::Header(name), Some(headers)) => headers
                    .get(name)
                    .map(|value| balancer::key_hash(value.as_bytes())),
                (HashKey::Cookie(name), Some(headers)) => {
                    cookie(headers, name).map(|value| balancer::key_hash(value.as_bytes()))
                }
                _ => None,
            };
            key.unwrap_or_else(|| balancer::ip_hash(client_ip))
        } else {
            0
        };
        PickContext { client_ip, hash }
    }

    /// Records how long a backend took, for `least_latency`, the only reader of the
    /// estimate: other pools skip it (a clock read and two `exp` per request). A pool switched
    /// to `least_latency` by a reload starts from no estimate, which its first responses set.
    pub fn observe_latency(&self, index: usize, latency: std::time::Duration) {
        if self.config.algorithm != Algorithm::LeastLatency {
            return;
        }
        if let Some(backend) = self.backends.get(index) {
            backend
                .stats
                .observe_latency(latency, self.config.latency_decay);
        }
    }

    /// Chooses a backend for a request. The first attempt asks the balancer; a retry
    /// (`tried` non-empty) walks on from the last backend tried without consulting the
    /// balancer again, so retries neither skew its rotation nor return to a tried backend.
    /// A backend at `max_connections_per_backend` is skipped like a down one. `None` when no
    /// candidate is left.
    pub fn select(&self, context: &PickContext, tried: &[usize]) -> Option<usize> {
        let len = self.candidates.len();
        if len == 0 {
            return None;
        }
        let start = match tried.last() {
            None => {
                let picked = self.balancer.pick(context) % len;
                if !self.is_full(self.candidates[picked]) {
                    return Some(self.candidates[picked]);
                }
                picked + 1
            }
            Some(last) => self
                .candidates
                .iter()
                .position(|candidate| candidate == last)
                .map_or(0, |position| position + 1),
        };
        (0..len)
            .map(|offset| self.candidates[(start + offset) % len])
            .find(|index| !tried.contains(index) && !self.is_full(*index))
    }

    /// Whether backend `index` has reached `max_connections_per_backend` (0 = no limit).
    fn is_full(&self, index: usize) -> bool {
        let limit = self.config.max_connections_per_backend;
        limit > 0 && self.backends[index].stats.in_flight() >= limit
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// Where a matched request goes, with its metric handles resolved.
#[derive(Debug)]
pub struct Target {
    pub route: String,
    /// The route's request body limit.
    pub max_body_bytes: Option<u64>,
    /// `gatehouse_route_requests_total` of this route.
    pub route_requests: prometheus::IntCounter,
    pub pool: Arc<Pool>,
    pub duration: Histogram,
    /// One per backend of `pool`, same order.
    pub counters: Vec<RequestCounters>,
    /// Answers gatehouse gave itself for this pool (backend label empty).
    pub local_counters: RequestCounters,
}

/// One compiled route.
#[derive(Debug)]
struct Route {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    target: Arc<Target>,
}

/// Everything a listener's request path needs.
pub struct ListenerTable {
    pub config: ListenerConfig,
    routes: Vec<Route>,
    default_target: Option<Arc<Target>>,
    /// For answers before a route is known (400, 404, 431).
    pub unrouted_counters: RequestCounters,
    pub unrouted_duration: Histogram,
    pub metrics: ListenerMetrics,
    /// The TLS acceptor for new connections (https/tls listeners).
    pub tls: Option<TlsAcceptor>,
    pub access_log: Arc<AccessLog>,
    /// Per-client token buckets, when `rate_limit` is set.
    pub rate_limiter: Option<Arc<crate::rate_limit::RateLimiter>>,
}

impl std::fmt::Debug for ListenerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTable")
            .field("config", &self.config)
            .field("routes", &self.routes)
            .field("default_target", &self.default_target)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ListenerTable {
    /// The first route matching `host` (lower-case, no port) and `path`, else the default.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Target>> {
        self.routes
            .iter()
            .find(|route| {
                route
                    .host
                    .as_ref()
                    .is_none_or(|pattern| host.is_some_and(|host| pattern.matches(host)))
                    && route
                        .path_prefix
                        .as_deref()
                        .is_none_or(|prefix| path.starts_with(prefix))
            })
            .map(|route| &route.target)
            .or(self.default_target.as_ref())
    }

    /// The listener's own pool (`pool:`): the default for HTTP, the only one for TCP.
    pub fn pool_target(&self) -> Option<&Arc<Target>> {
        self.default_target.as_ref()
    }

    /// Whether a client at `address` may use this listener (`deny` wins over `allow`; an
    /// empty `allow` allows everyone).
    pub fn admits(&self, address: std::net::IpAddr) -> bool {
        let address = match address {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, std::net::IpAddr::V4),
            v4 => v4,
        };
        let config = &self.config;
        !config.deny.iter().any(|net| net.contains(&address))
            && (config.allow.is_empty() || config.allow.iter().any(|net| net.contains(&address)))
    }

    /// Whether `address` is allowed to extend X-Forwarded-For.
    pub fn is_trusted_proxy(&self, address: std::net::IpAddr) -> bool {
        self.config
            .trusted_proxies
            .iter()
            .any(|net: &IpNet| net.contains(&address))
    }
}

/// The published snapshot.
#[derive(Debug)]
pub struct Table {
    /// Increases by one with every published table.
    pub generation: u64,
    pub config: Arc<Config>,
    /// When the config in this table was loaded.
    pub loaded_at: SystemTime,
    pub pools: Vec<Arc<Pool>>,
    /// Sorted by name: every request finds its listener here, by binary search (a few
    /// string comparisons; hashing the name took ≈ 160 instructions).
    listeners: Vec<Arc<ListenerTable>>,
}

impl Table {
    /// Builds a table; fails only if a runtime piece (a TLS configuration) cannot be built.
    pub fn build(
        config: Arc<Config>,
        loaded_at: SystemTime,
        generation: u64,
        facts: &mut dyn BackendFacts,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let mut pools = Vec::with_capacity(config.pools.len());
        for pool in &config.pools {
            pools.push(Arc::new(Pool::build(pool, facts, metrics)?));
        }
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let table = build_listener(listener, &config.access_log, &pools, facts, metrics)?;
            listeners.push(Arc::new(table));
        }
        listeners.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        Ok(Table {
            generation,
            config,
            loaded_at,
            pools,
            listeners,
        })
    }

    /// The listener called `name`, if this table still has it.
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerTable>> {
        self.listeners
            .binary_search_by(|listener| listener.config.name.as_str().cmp(name))
            .ok()
            .and_then(|index| self.listeners.get(index))
    }

    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|pool| pool.name() == name)
    }
}

fn build_listener(
    listener: &ListenerConfig,
    access_log: &crate::config::AccessLogConfig,
    pools: &[Arc<Pool>],
    facts: &mut dyn BackendFacts,
    metrics: &Metrics,
) -> Result<ListenerTable, String> {
    let find_pool = |name: &str| {
        pools
            .iter()
            .find(|pool| pool.name() == name)
            .cloned()
            .ok_or_else(|| format!("listener {}: unknown pool {name}", listener.name))
    };
    let target = |route: &str, pool: Arc<Pool>, max_body_bytes: Option<u64>| {
        Arc::new(Target {
            route: route.to_string(),
            max_body_bytes,
            route_requests: metrics
                .route_requests_total
                .with_label_values(&[listener.name.as_str(), route]),
            duration: metrics.request_duration(&listener.name, pool.name()),
            counters: pool
                .backends
                .iter()
                .map(|backend| metrics.request_counters(&listener.name, pool.name(), &backend.name))
                .collect(),
            local_counters: metrics.request_counters(&listener.name, pool.name(), ""),
            pool,
        })
    };
    let mut routes = Vec::with_capacity(listener.routes.len());
    for route in &listener.routes {
        routes.push(Route {
            host: route.host.clone(),
            path_prefix: route.path_prefix.clone(),
            target: target(&route.name, find_pool(&route.pool)?, route.max_body_bytes),
        });
    }
    let default_target = match &listener.pool {
        Some(pool) => Some(target("default", find_pool(pool)?, None)),
        None => None,
    };
    let tls = match &listener.tls {
        Some(tls) => Some(TlsAcceptor::from(crate::tls::server_config(
            tls,
            listener.protocol.is_http(),
        )?)),
        None => None,
    };
    Ok(ListenerTable {
        config: listener.clone(),
        routes,
        default_target,
        unrouted_counters: metrics.request_counters(&listener.name, "", ""),
        unrouted_duration: metrics.request_duration(&listener.name, ""),
        metrics: facts.listener_metrics(&listener.name),
        tls,
        access_log: facts.access_log(access_log),
        rate_limiter: listener
            .rate_limit
            .map(|limit| facts.rate_limiter(&listener.name, limit)),
    })
}

/// Facts for building a table outside the publisher (benchmarks, property tests): fresh
/// counters, configured admin states, every backend healthy unless named in `unhealthy`, no
/// slow start, one worker, and a change channel nobody listens to.
pub struct StaticFacts {
    metrics: Metrics,
    /// Backend names to treat as failing their health checks.
    pub unhealthy: std::collections::HashSet<String>,
    changes: tokio::sync::mpsc::Sender<super::publisher::Change>,
    connectors: HashMap<String, Arc<Connector>>,
    /// Kept across builds, as the publisher keeps them.
    connections: HashMap<(String, String), Arc<BackendConnections>>,
}

impl StaticFacts {
    /// Facts reporting into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        StaticFacts {
            metrics,
            unhealthy: Default::default(),
            changes: tokio::sync::mpsc::channel(1).0,
            connectors: HashMap::new(),
            connections: HashMap::new(),
        }
    }
}

impl BackendFacts for StaticFacts {
    fn stats(&mut self, pool: &str, backend: &str) -> Arc<BackendStats> {
        Arc::new(BackendStats::new(&self.metrics, pool, backend))
    }

    fn admin_state(&self, _pool: &str, _backend: &str, configured: AdminState) -> AdminState {
        configured
    }

    fn healthy(&self, _pool: &str, backend: &str, _actively_checked: bool) -> bool {
        !self.unhealthy.contains(backend)
    }

    fn weight_factor(&self, _: &str, _: &str, _: std::time::Duration) -> f64 {
        1.0
    }

    fn connections(
        &mut self,
        pool: &PoolConfig,
        backend: &BackendConfig,
    ) -> Result<Arc<BackendConnections>, String> {
        let connector = match self.connectors.get(&pool.name) {
            Some(connector) => connector.clone(),
            None => {
                let connector = Arc::new(Connector::for_pool(pool, &self.metrics)?);
                self.connectors.insert(pool.name.clone(), connector.clone());
                connector
            }
        };
        let key = (pool.name.clone(), backend.name.clone());
        let connections = BackendConnections::kept_or_new(
            self.connections.get(&key),
            backend.address,
            connector,
            pool.timeouts,
            1,
        );
        self.connections.insert(key, connections.clone());
        Ok(connections)
    }

    fn listener_metrics(&mut self, listener: &str) -> ListenerMetrics {
        self.metrics.listener(listener)
    }

    fn retry_budget(&mut self, _pool: &str) -> Arc<super::retry::RetryBudget> {
        Arc::default()
    }

    fn changes(&self) -> tokio::sync::mpsc::Sender<super::publisher::Change> {
        self.changes.clone()
    }

    fn rate_limiter(
        &mut self,
        _listener: &str,
        limit: crate::config::RateLimit,
    ) -> Arc<crate::rate_limit::RateLimiter> {
        Arc::new(crate::rate_limit::RateLimiter::new(limit))
    }

    fn access_log(&mut self, _config: &crate::config::AccessLogConfig) -> Arc<AccessLog> {
        let off = crate::config::AccessLogConfig {
            target: crate::config::AccessLogTarget::Off,
            format: crate::config::AccessLogFormat::Json,
        };
        AccessLog::start(&off, self.metrics.access_log_dropped.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    /// Only `least_latency` reads a backend's latency estimate, so only its pools keep one.
    #[tokio::test]
    async fn only_least_latency_pools_keep_a_latency_estimate() {
        let yaml = "listeners:\n  web: { listen: \"127.0.0.1:0\", protocol: http, pool: plain }\npools:\n  fast:\n    algorithm: least_latency\n    health_check: { type: none }\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n  plain:\n    health_check: { type: none }\n    backends:\n      - { name: b, address: \"127.0.0.1:9\" }\n";
        let config = crate::config::parse(yaml, std::path::Path::new("test.yaml")).unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap();
        let publisher = crate::upstream::publisher::start(Arc::new(config), metrics, 1).unwrap();
        let table = publisher.table().load_full();
        let estimate = |pool: &str| {
            let pool = table.pool(pool).unwrap();
            pool.observe_latency(0, Duration::from_millis(5));
            pool.backends[0].stats.latency_snapshot().0
        };
        assert!(estimate("fast") > 1e6, "least_latency keeps its estimate");
        assert_eq!(estimate("plain"), 0.0, "round_robin skips it");
    }

    /// Listeners are kept sorted by name for the per-request lookup, whatever the order of
    /// the configuration.
    #[tokio::test]
    async fn every_listener_is_found_by_its_name() {
        let names = ["web", "api", "zeta", "admin-portal", "b"];
        let mut yaml = String::from("listeners:\n");
        for name in names {
            yaml.push_str(&format!(
                "  {name}: {{ listen: \"127.0.0.1:0\", protocol: http, pool: app }}\n"
            ));
        }
        yaml.push_str("pools:\n  app:\n    health_check: { type: none }\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n");
        let config = crate::config::parse(&yaml, std::path::Path::new("test.yaml")).unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap();
        let publisher = crate::upstream::publisher::start(Arc::new(config), metrics, 1).unwrap();
        let table = publisher.table().load_full();
        for name in names {
            assert_eq!(table.listener(name).unwrap().config.name, name);
        }
        for missing in ["", "a", "webs", "zz"] {
            assert!(table.listener(missing).is_none(), "{missing}");
        }
    }
}
