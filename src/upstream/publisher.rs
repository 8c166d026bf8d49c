//! The one writer of the balancing table.
//!
//! Health flips, passive ejections, reloads and admin state changes arrive as [`Change`]s on
//! one channel; this task applies them to the runtime state it owns, builds the next
//! [`Table`] and stores it. Nothing else ever stores a table, so two changes can never race
//! (linkerd2-proxy's single-owner worker). Pending changes are coalesced into one rebuild,
//! and while a backend's slow start ramps the table is rebuilt on a short tick.

use super::backend::BackendStats;
use super::connections::BackendConnections;
use super::connector::Connector;
use super::retry::RetryBudget;
use super::table::{BackendFacts, Table};
use crate::access_log::AccessLog;
use crate::config::RateLimit;
use crate::config::{
    AccessLogConfig, AdminState, BackendConfig, Config, HealthCheckKind, PoolConfig, Timeouts,
    UpstreamTls,
};
use crate::metrics::{ListenerMetrics, Metrics};
use crate::rate_limit::RateLimiter;
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// The published table, as every reader holds it.
pub type SharedTable = Arc<ArcSwap<Table>>;

type BackendKey = (String, String);
/// What a pool's connector is built from.
type ConnectorSettings = (Timeouts, Option<UpstreamTls>);

/// Longest passive ejection, however often a backend is ejected.
const MAX_EJECTION: Duration = Duration::from_secs(600);
/// How often the table is rebuilt while a slow start ramps.
const RAMP_TICK: Duration = Duration::from_millis(500);
/// How often idle upstream connections past the pool's idle timeout are closed.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// A request to change what the table says.
#[derive(Debug)]
pub enum Change {
    /// Publish a new validated configuration.
    Config {
        config: Arc<Config>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Backends passed or failed their health checks (`reply` once published).
    Health {
        results: Vec<(String, String, bool)>,
        reply: Option<oneshot::Sender<()>>,
    },
    /// Real traffic failed `passive.consecutive_failures` times in a row on a backend.
    Eject { pool: String, backend: String },
    /// A passive ejection ran out: the backend returns on probation.
    Readmit {
        pool: String,
        backend: String,
        ejection: u64,
    },
    /// An operator set a backend's admin state.
    AdminState {
        pool: String,
        backend: String,
        state: AdminState,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A runtime admin state, remembered with the configured state it overrode: when the file's
/// state for that backend changes, the newer intent (the file) wins.
#[derive(Debug, Clone, Copy)]
struct Override {
    state: AdminState,
    configured: AdminState,
}

/// A backend's passive-ejection history.
#[derive(Debug, Clone, Copy)]
struct Ejection {
    /// Consecutive ejections without a quiet period in between (drives the doubling).
    count: u32,
    /// Identifies the current ejection, so a stale readmit timer is ignored.
    serial: u64,
    active: bool,
    returned_at: Option<Instant>,
}

/// What outlives a table.
struct Carried {
    metrics: Metrics,
    stats: HashMap<BackendKey, Arc<BackendStats>>,
    overrides: HashMap<BackendKey, Override>,
    health: HashMap<BackendKey, bool>,
    addresses: HashMap<BackendKey, SocketAddr>,
    ejections: HashMap<BackendKey, Ejection>,
    next_serial: u64,
    /// When each backend last became available (for slow start), after start-up.
    available_since: HashMap<BackendKey, Instant>,
    previous_candidates: Option<HashSet<BackendKey>>,
    /// Per pool: the settings its connector was built for, and the connector.
    connectors: HashMap<String, (ConnectorSettings, Arc<Connector>)>,
    connections: HashMap<BackendKey, Arc<BackendConnections>>,
    /// The process's worker threads (fixed at start): one idle queue each per backend.
    workers: usize,
    last_idle_sweep: Instant,
    retry_budgets: HashMap<String, Arc<RetryBudget>>,
    /// Pools announced as having no available backend (to announce their recovery once).
    down_pools: HashSet<String>,
    listener_metrics: HashMap<String, ListenerMetrics>,
    access_log: Option<Arc<AccessLog>>,
    rate_limiters: HashMap<String, Arc<RateLimiter>>,
    changes: mpsc::Sender<Change>,
}

fn key(pool: &str, backend: &str) -> BackendKey {
    (pool.to_string(), backend.to_string())
}

impl BackendFacts for Carried {
    fn stats(&mut self, pool: &str, backend: &str) -> Arc<BackendStats> {
        let metrics = &self.metrics;
        self.stats
            .entry(key(pool, backend))
            .or_insert_with(|| Arc::new(BackendStats::new(metrics, pool, backend)))
            .clone()
    }

    fn admin_state(&self, pool: &str, backend: &str, configured: AdminState) -> AdminState {
        match self.overrides.get(&key(pool, backend)) {
            Some(o) if o.configured == configured => o.state,
            _ => configured,
        }
    }

    fn healthy(&self, pool: &str, backend: &str, actively_checked: bool) -> bool {
        let key = key(pool, backend);
        let passes = self.health.get(&key).copied().unwrap_or(!actively_checked);
        let ejected = self.ejections.get(&key).is_some_and(|e| e.active);
        passes && !ejected
    }

    fn weight_factor(&self, pool: &str, backend: &str, slow_start: Duration) -> f64 {
        if slow_start.is_zero() {
            return 1.0;
        }
        match self.available_since.get(&key(pool, backend)) {
            Some(since) => {
                (since.elapsed().as_secs_f64() / slow_start.as_secs_f64()).clamp(0.1, 1.0)
            }
            None => 1.0,
        }
    }

    fn connections(
        &mut self,
        pool: &PoolConfig,
        backend: &BackendConfig,
    ) -> Result<Arc<BackendConnections>, String> {
        let settings = (pool.timeouts, pool.tls.clone());
        let connector = match self.connectors.get(&pool.name) {
            Some((existing, connector)) if *existing == settings => connector.clone(),
            _ => {
                let connector = Arc::new(Connector::for_pool(pool, &self.metrics)?);
                self.connectors
                    .insert(pool.name.clone(), (settings, connector.clone()));
                connector
            }
        };
        let key = key(&pool.name, &backend.name);
        let connections = BackendConnections::kept_or_new(
            self.connections.get(&key),
            backend.address,
            connector,
            pool.timeouts,
            self.workers,
        );
        self.connections.insert(key, connections.clone());
        Ok(connections)
    }

    fn listener_metrics(&mut self, listener: &str) -> ListenerMetrics {
        self.listener_metrics
            .entry(listener.to_string())
            .or_insert_with(|| self.metrics.listener(listener))
            .clone()
    }

    fn retry_budget(&mut self, pool: &str) -> Arc<RetryBudget> {
        self.retry_budgets
            .entry(pool.to_string())
            .or_default()
            .clone()
    }

    fn rate_limiter(&mut self, listener: &str, limit: RateLimit) -> Arc<RateLimiter> {
        match self.rate_limiters.get(listener) {
            Some(existing) if existing.limit() == limit => existing.clone(),
            _ => {
                let limiter = Arc::new(RateLimiter::new(limit));
                self.rate_limiters
                    .insert(listener.to_string(), limiter.clone());
                limiter
            }
        }
    }

    fn access_log(&mut self, config: &AccessLogConfig) -> Arc<AccessLog> {
        match &self.access_log {
            Some(log) if log.config() == config => log.clone(),
            _ => {
                let log = AccessLog::start(config, self.metrics.access_log_dropped.clone());
                self.access_log = Some(log.clone());
                log
            }
        }
    }

    fn changes(&self) -> mpsc::Sender<Change> {
        self.changes.clone()
    }
}

impl Carried {
    /// Forgets state of backends, pools and overrides that `config` no longer has, and the
    /// health of backends whose address changed or whose pool stopped checking.
    fn retain_for(&mut self, config: &Config) {
        let backend_of = |(pool, backend): &BackendKey| {
            config.pool(pool).and_then(|p| {
                p.backends
                    .iter()
                    .find(|b| b.name == *backend)
                    .map(|b| (p, b))
            })
        };
        let metrics = &self.metrics;
        self.stats.retain(|(pool, backend), _| {
            let keep = config
                .pool(pool)
                .is_some_and(|p| p.backends.iter().any(|b| b.name == *backend));
            if !keep {
                metrics.forget_backend(pool, backend);
            }
            keep
        });
        self.ejections.retain(|k, _| backend_of(k).is_some());
        self.available_since.retain(|k, _| backend_of(k).is_some());
        let addresses = &self.addresses;
        self.health.retain(|k, _| {
            backend_of(k).is_some_and(|(pool, backend)| {
                pool.health_check.kind != HealthCheckKind::None
                    && addresses.get(k).is_none_or(|a| *a == backend.address)
            })
        });
        self.addresses = config
            .pools
            .iter()
            .flat_map(|p| {
                p.backends
                    .iter()
                    .map(move |b| (key(&p.name, &b.name), b.address))
            })
            .collect();
        self.overrides
            .retain(|k, o| backend_of(k).is_some_and(|(_, b)| b.state == o.configured));
        self.connectors
            .retain(|pool, _| config.pool(pool).is_some());
        self.connections.retain(|k, _| backend_of(k).is_some());
        self.retry_budgets
            .retain(|pool, _| config.pool(pool).is_some());
    }

    /// After a table is built: exports `gatehouse_backend_up` and the served certificates'
    /// expiry, starts slow-start ramps for backends that just became available, and warns
    /// when a pool lost its last backend.
    fn after_build(&mut self, previous: Option<&Table>, table: &Table) {
        let served: Vec<(&str, String, i64)> = table
            .config
            .listeners
            .iter()
            .flat_map(|listener| {
                listener.certificates().map(|certificate| {
                    let file = certificate.cert_path.display().to_string();
                    (listener.name.as_str(), file, certificate.not_after)
                })
            })
            .collect();
        self.metrics.export_certificates(&served);
        let mut candidates = HashSet::new();
        for pool in &table.pools {
            for (index, backend) in pool.backends.iter().enumerate() {
                self.metrics
                    .backend_up
                    .with_label_values(&[pool.name(), &backend.name])
                    .set(i64::from(backend.healthy));
                if pool.is_candidate(index) {
                    candidates.insert(key(pool.name(), &backend.name));
                }
            }
            if previous.is_none() {
                // The start-up table precedes the first health round: nothing to announce.
                continue;
            }
            let down =
                (pool.available() == 0 || pool.fail_open_active()) && !pool.backends.is_empty();
            if down && self.down_pools.insert(pool.name().to_string()) {
                if pool.fail_open_active() {
                    tracing::error!(pool = pool.name(), "NO healthy backend in pool: fail_open is on, sending to every non-disabled backend");
                } else {
                    tracing::error!(
                        pool = pool.name(),
                        "NO available backend in pool: answering 503 until one recovers"
                    );
                }
            } else if !down && self.down_pools.remove(pool.name()) {
                tracing::info!(
                    pool = pool.name(),
                    available = pool.available(),
                    "pool has available backends again"
                );
            }
        }
        if let Some(previous) = &self.previous_candidates {
            let now = Instant::now();
            for key in candidates.difference(previous) {
                self.available_since.insert(key.clone(), now);
            }
        }
        self.previous_candidates = Some(candidates);
    }

    /// Closes idle upstream connections past their pool's idle timeout (at most once per
    /// [`IDLE_SWEEP`]).
    fn close_expired_connections(&mut self) {
        if self.last_idle_sweep.elapsed() < IDLE_SWEEP {
            return;
        }
        self.last_idle_sweep = Instant::now();
        for connections in self.connections.values() {
            connections.close_expired();
        }
    }

    /// Whether some backend is still ramping up (the table must be rebuilt soon).
    fn ramping(&self, config: &Config) -> bool {
        self.available_since.iter().any(|((pool, _), since)| {
            config
                .pool(pool)
                .is_some_and(|p| !p.slow_start.is_zero() && since.elapsed() < p.slow_start)
        })
    }

    /// Ejects a backend unless that would leave its pool without a candidate.
    fn eject(&mut self, table: &Table, pool_name: &str, backend_name: &str) {
        let Some(pool) = table.pool(pool_name) else {
            return;
        };
        let Some(index) = pool.backends.iter().position(|b| b.name == backend_name) else {
            return;
        };
        let key = key(pool_name, backend_name);
        if self.ejections.get(&key).is_some_and(|e| e.active) {
            return;
        }
        if pool.available() <= 1 && pool.is_candidate(index) {
            tracing::warn!(
                pool = pool_name,
                backend = backend_name,
                "passive health would eject the last available backend; keeping it"
            );
            pool.backends[index].stats.reset_failures();
            return;
        }
        let base = pool.config.passive.ejection;
        let now = Instant::now();
        self.next_serial += 1;
        let serial = self.next_serial;
        let entry = self.ejections.entry(key).or_insert(Ejection {
            count: 0,
            serial,
            active: false,
            returned_at: None,
        });
        let repeat = entry.returned_at.is_some_and(|returned| {
            now.duration_since(returned) < base.saturating_mul(2u32.saturating_pow(entry.count))
        });
        entry.count = if repeat {
            entry.count.saturating_add(1)
        } else {
            1
        };
        entry.serial = serial;
        entry.active = true;
        let duration = base
            .saturating_mul(2u32.saturating_pow(entry.count.saturating_sub(1).min(16)))
            .min(MAX_EJECTION.max(base));
        tracing::warn!(pool = pool_name, backend = backend_name, ejection = ?duration, "backend ejected after consecutive failures on real traffic");
        let changes = self.changes.clone();
        let (pool, backend) = (pool_name.to_string(), backend_name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            let _ = changes
                .send(Change::Readmit {
                    pool,
                    backend,
                    ejection: serial,
                })
                .await;
        });
    }

    fn readmit(&mut self, pool: &str, backend: &str, serial: u64) {
        let key = key(pool, backend);
        if let Some(entry) = self.ejections.get_mut(&key) {
            if entry.active && entry.serial == serial {
                entry.active = false;
                entry.returned_at = Some(Instant::now());
                if let Some(stats) = self.stats.get(&key) {
                    stats.start_probation();
                }
                tracing::info!(pool, backend, "ejection over: backend returns on probation");
            }
        }
    }
}

/// The handle readers and writers share: the table and the channel to the publisher.
#[derive(Clone)]
pub struct PublisherHandle {
    table: SharedTable,
    changes: mpsc::Sender<Change>,
}

impl PublisherHandle {
    /// The published table.
    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    /// Publishes `config`; answers with the new generation once it is stored.
    pub async fn apply_config(&self, config: Arc<Config>) -> Result<u64, String> {
        let (reply, answer) = oneshot::channel();
        self.send(Change::Config { config, reply }).await?;
        answer
            .await
            .map_err(|_| "the publisher stopped".to_string())?
    }

    /// Sets a backend's admin state; answers once the new table is stored.
    pub async fn set_admin_state(
        &self,
        pool: &str,
        backend: &str,
        state: AdminState,
    ) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.send(Change::AdminState {
            pool: pool.to_string(),
            backend: backend.to_string(),
            state,
            reply,
        })
        .await?;
        answer
            .await
            .map_err(|_| "the publisher stopped".to_string())?
    }

    /// Reports a health transition.
    pub async fn set_health(&self, pool: &str, backend: &str, healthy: bool) -> Result<(), String> {
        self.send(Change::Health {
            results: vec![(pool.to_string(), backend.to_string(), healthy)],
            reply: None,
        })
        .await
    }

    /// Reports many results at once and waits until they are published.
    pub async fn set_health_batch(
        &self,
        results: Vec<(String, String, bool)>,
    ) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.send(Change::Health {
            results,
            reply: Some(reply),
        })
        .await?;
        answer
            .await
            .map_err(|_| "the publisher stopped".to_string())
    }

    async fn send(&self, change: Change) -> Result<(), String> {
        self.changes
            .send(change)
            .await
            .map_err(|_| "the publisher stopped".to_string())
    }
}

/// Builds the first table from `config` and starts the publisher task; backends keep idle
/// connections for `workers` worker threads.
pub fn start(
    config: Arc<Config>,
    metrics: Metrics,
    workers: usize,
) -> Result<PublisherHandle, String> {
    let (changes, receiver) = mpsc::channel(4096);
    let mut carried = Carried {
        metrics: metrics.clone(),
        stats: HashMap::new(),
        overrides: HashMap::new(),
        health: HashMap::new(),
        addresses: HashMap::new(),
        ejections: HashMap::new(),
        next_serial: 0,
        available_since: HashMap::new(),
        previous_candidates: None,
        connectors: HashMap::new(),
        connections: HashMap::new(),
        workers,
        last_idle_sweep: Instant::now(),
        retry_budgets: HashMap::new(),
        down_pools: HashSet::new(),
        listener_metrics: HashMap::new(),
        access_log: None,
        rate_limiters: HashMap::new(),
        changes: changes.clone(),
    };
    carried.retain_for(&config);
    let table = Table::build(config, SystemTime::now(), 1, &mut carried, &metrics)?;
    carried.after_build(None, &table);
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(table));
    tokio::spawn(run(receiver, carried, table.clone()));
    Ok(PublisherHandle { table, changes })
}

async fn run(mut receiver: mpsc::Receiver<Change>, mut carried: Carried, table: SharedTable) {
    loop {
        let current = table.load_full();
        let ramping = carried.ramping(&current.config);
        let tick = if ramping { RAMP_TICK } else { IDLE_SWEEP };
        let first = match tokio::time::timeout(tick, receiver.recv()).await {
            Ok(Some(change)) => Some(change),
            Ok(None) => return,
            Err(_tick) => None,
        };
        carried.close_expired_connections();
        if first.is_none() && !ramping {
            continue;
        }
        let mut config = current.config.clone();
        let mut loaded_at = current.loaded_at;
        let mut replies_config = Vec::new();
        let mut replies_health = Vec::new();
        let mut replies_admin = Vec::new();
        let mut change = first;
        while let Some(next) = change {
            match next {
                Change::Config { config: new, reply } => {
                    config = new;
                    loaded_at = SystemTime::now();
                    replies_config.push(reply);
                }
                Change::Health { results, reply } => {
                    for (pool, backend, healthy) in results {
                        carried.health.insert((pool, backend), healthy);
                    }
                    replies_health.extend(reply);
                }
                Change::Eject { pool, backend } => carried.eject(&current, &pool, &backend),
                Change::Readmit {
                    pool,
                    backend,
                    ejection,
                } => carried.readmit(&pool, &backend, ejection),
                Change::AdminState {
                    pool,
                    backend,
                    state,
                    reply,
                } => {
                    let configured = config
                        .pool(&pool)
                        .and_then(|p| p.backends.iter().find(|b| b.name == backend))
                        .map(|b| b.state);
                    match configured {
                        Some(configured) => {
                            carried
                                .overrides
                                .insert((pool, backend), Override { state, configured });
                            replies_admin.push((reply, Ok(())));
                        }
                        None => replies_admin.push((
                            reply,
                            Err(format!("no backend \"{backend}\" in pool \"{pool}\"")),
                        )),
                    }
                }
            }
            change = receiver.try_recv().ok();
        }
        let previous_config = current.config.clone();
        carried.retain_for(&config);
        let generation = current.generation + 1;
        let metrics = carried.metrics.clone();
        match Table::build(config, loaded_at, generation, &mut carried, &metrics) {
            Ok(next) => {
                carried.after_build(Some(&current), &next);
                table.store(Arc::new(next));
                for reply in replies_config {
                    let _ = reply.send(Ok(generation));
                }
                for (reply, result) in replies_admin {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot build the balancing table; keeping the current one");
                carried.retain_for(&previous_config);
                for reply in replies_config {
                    let _ = reply.send(Err(error.clone()));
                }
                for (reply, _) in replies_admin {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        for reply in replies_health {
            let _ = reply.send(());
        }
    }
}
