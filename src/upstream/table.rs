//! The balancing table: one immutable snapshot of everything the request path needs.
//!
//! Built by the publisher from a validated [`Config`] plus carried runtime state (health,
//! admin overrides, live counters, connection pools), then stored in an `ArcSwap`. Nothing in
//! here is ever mutated after publication except atomics (counters, round-robin cursors).

use super::backend::{Backend, BackendStats};
use super::client::UpstreamClient;
use crate::balancer::{self, Balancer, Candidate, PickContext, Tuning};
use crate::config::Algorithm;
use crate::config::{AdminState, Config, HashKey, HostMatch, ListenerConfig, PoolConfig, Timeouts};
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
    /// Whether the backend is healthy and not ejected.
    fn healthy(&self, pool: &str, backend: &str) -> bool;
    /// The pool's upstream client (reused when the pool's timeouts did not change).
    fn client(&mut self, pool: &str, timeouts: &Timeouts) -> UpstreamClient;
    /// The listener's metric handles.
    fn listener_metrics(&mut self, listener: &str) -> ListenerMetrics;
}

/// A pool: its backends, who may receive traffic, and how to choose.
#[derive(Debug)]
pub struct Pool {
    pub config: PoolConfig,
    pub backends: Vec<Backend>,
    /// Indices into `backends` of those that may take new traffic.
    candidates: Vec<usize>,
    balancer: Box<dyn Balancer>,
    pub client: UpstreamClient,
}

impl Pool {
    fn build(config: &PoolConfig, facts: &mut dyn BackendFacts) -> Result<Self, String> {
        let mut backends = Vec::with_capacity(config.backends.len());
        for backend in &config.backends {
            let authority = backend
                .address
                .to_string()
                .parse()
                .map_err(|error| format!("backend {}: {error}", backend.name))?;
            backends.push(Backend {
                name: backend.name.clone(),
                address: backend.address,
                authority,
                weight: backend.weight,
                admin_state: facts.admin_state(&config.name, &backend.name, backend.state),
                healthy: facts.healthy(&config.name, &backend.name),
                stats: facts.stats(&config.name, &backend.name),
            });
        }
        let candidates: Vec<usize> = (0..backends.len())
            .filter(|&index| backends[index].is_candidate())
            .collect();
        let balancer_candidates: Vec<Candidate> = candidates
            .iter()
            .map(|&index| Candidate {
                name: backends[index].name.clone(),
                weight: backends[index].weight,
                stats: backends[index].stats.clone(),
            })
            .collect();
        let tuning = Tuning {
            latency_decay: config.latency_decay,
        };
        Ok(Pool {
            balancer: balancer::build(config.algorithm, &balancer_candidates, tuning),
            candidates,
            client: facts.client(&config.name, &config.timeouts),
            backends,
            config: config.clone(),
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
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

    /// Records how long a backend took, for `least_latency`.
    pub fn observe_latency(&self, index: usize, latency: std::time::Duration) {
        if let Some(backend) = self.backends.get(index) {
            backend
                .stats
                .observe_latency(latency, self.config.latency_decay);
        }
    }

    /// Chooses a backend for a new request, skipping the indices in `tried` (earlier attempts
    /// of the same request). `None` when no candidate is left.
    pub fn select(&self, context: &PickContext, tried: &[usize]) -> Option<usize> {
        if self.candidates.is_empty() {
            return None;
        }
        let start = self.balancer.pick(context) % self.candidates.len();
        (0..self.candidates.len())
            .map(|offset| self.candidates[(start + offset) % self.candidates.len()])
            .find(|index| !tried.contains(index))
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
    listeners: HashMap<String, Arc<ListenerTable>>,
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
            pools.push(Arc::new(Pool::build(pool, facts)?));
        }
        let mut listeners = HashMap::new();
        for listener in &config.listeners {
            let table = build_listener(listener, &pools, facts, metrics)?;
            listeners.insert(listener.name.clone(), Arc::new(table));
        }
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
        self.listeners.get(name)
    }

    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|pool| pool.name() == name)
    }
}

fn build_listener(
    listener: &ListenerConfig,
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
    let target = |route: &str, pool: Arc<Pool>| {
        Arc::new(Target {
            route: route.to_string(),
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
            target: target(&route.name, find_pool(&route.pool)?),
        });
    }
    let default_target = match &listener.pool {
        Some(pool) => Some(target("default", find_pool(pool)?)),
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
    })
}
