//! The one writer of the balancing table.
//!
//! Health flips, reloads and admin state changes arrive as [`Change`]s on one channel; this
//! task applies them to the runtime state it owns, builds the next [`Table`] and stores it.
//! Nothing else ever stores a table, so two changes can never race (linkerd2-proxy's
//! single-owner worker). Pending changes are coalesced into one rebuild.

use super::backend::BackendStats;
use super::client::{self, UpstreamClient};
use super::table::{BackendFacts, Table};
use crate::config::{AdminState, Config, Timeouts};
use crate::metrics::{ListenerMetrics, Metrics};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot};

/// The published table, as every reader holds it.
pub type SharedTable = Arc<ArcSwap<Table>>;

type BackendKey = (String, String);

/// A request to change what the table says.
#[derive(Debug)]
pub enum Change {
    /// Publish a new validated configuration.
    Config {
        config: Arc<Config>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// A backend passed or failed its health checks.
    Health {
        pool: String,
        backend: String,
        healthy: bool,
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

/// What outlives a table.
struct Carried {
    metrics: Metrics,
    stats: HashMap<BackendKey, Arc<BackendStats>>,
    overrides: HashMap<BackendKey, Override>,
    health: HashMap<BackendKey, bool>,
    clients: HashMap<String, (Timeouts, UpstreamClient)>,
    listener_metrics: HashMap<String, ListenerMetrics>,
}

fn key(pool: &str, backend: &str) -> BackendKey {
    (pool.to_string(), backend.to_string())
}

impl BackendFacts for Carried {
    fn stats(&mut self, pool: &str, backend: &str) -> Arc<BackendStats> {
        let gauge = &self.metrics.backend_active_connections;
        self.stats
            .entry(key(pool, backend))
            .or_insert_with(|| {
                Arc::new(BackendStats::new(gauge.with_label_values(&[pool, backend])))
            })
            .clone()
    }

    fn admin_state(&self, pool: &str, backend: &str, configured: AdminState) -> AdminState {
        match self.overrides.get(&key(pool, backend)) {
            Some(o) if o.configured == configured => o.state,
            _ => configured,
        }
    }

    fn healthy(&self, pool: &str, backend: &str) -> bool {
        self.health
            .get(&key(pool, backend))
            .copied()
            .unwrap_or(true)
    }

    fn client(&mut self, pool: &str, timeouts: &Timeouts) -> UpstreamClient {
        match self.clients.get(pool) {
            Some((existing, client)) if existing == timeouts => client.clone(),
            _ => {
                let client = client::build(timeouts);
                self.clients
                    .insert(pool.to_string(), (*timeouts, client.clone()));
                client
            }
        }
    }

    fn listener_metrics(&mut self, listener: &str) -> ListenerMetrics {
        self.listener_metrics
            .entry(listener.to_string())
            .or_insert_with(|| self.metrics.listener(listener))
            .clone()
    }
}

impl Carried {
    /// Forgets state of backends, pools and overrides that `config` no longer has.
    fn retain_for(&mut self, config: &Config) {
        let present = |(pool, backend): &BackendKey| {
            config
                .pool(pool)
                .is_some_and(|p| p.backends.iter().any(|b| b.name == *backend))
        };
        self.stats.retain(|k, _| present(k));
        self.health.retain(|k, _| present(k));
        self.overrides.retain(|k, o| {
            present(k)
                && config
                    .pool(&k.0)
                    .and_then(|p| p.backends.iter().find(|b| b.name == k.1))
                    .is_some_and(|b| b.state == o.configured)
        });
        self.clients.retain(|pool, _| config.pool(pool).is_some());
    }

    /// Sets `gatehouse_backend_up` for every backend of `table`.
    fn export_health(&self, table: &Table) {
        for pool in &table.pools {
            for backend in &pool.backends {
                self.metrics
                    .backend_up
                    .with_label_values(&[pool.name(), &backend.name])
                    .set(i64::from(backend.healthy));
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
            pool: pool.to_string(),
            backend: backend.to_string(),
            healthy,
        })
        .await
    }

    async fn send(&self, change: Change) -> Result<(), String> {
        self.changes
            .send(change)
            .await
            .map_err(|_| "the publisher stopped".to_string())
    }
}

/// Builds the first table from `config` and starts the publisher task.
pub fn start(config: Arc<Config>, metrics: Metrics) -> Result<PublisherHandle, String> {
    let mut carried = Carried {
        metrics: metrics.clone(),
        stats: HashMap::new(),
        overrides: HashMap::new(),
        health: HashMap::new(),
        clients: HashMap::new(),
        listener_metrics: HashMap::new(),
    };
    let table = Table::build(config, SystemTime::now(), 1, &mut carried, &metrics)?;
    carried.export_health(&table);
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(table));
    let (changes, receiver) = mpsc::channel(1024);
    tokio::spawn(run(receiver, carried, table.clone()));
    Ok(PublisherHandle { table, changes })
}

async fn run(mut receiver: mpsc::Receiver<Change>, mut carried: Carried, table: SharedTable) {
    while let Some(first) = receiver.recv().await {
        let current = table.load_full();
        let mut config = current.config.clone();
        let mut loaded_at = current.loaded_at;
        let mut replies_config = Vec::new();
        let mut replies_admin = Vec::new();
        let mut change = Some(first);
        while let Some(next) = change {
            match next {
                Change::Config { config: new, reply } => {
                    config = new;
                    loaded_at = SystemTime::now();
                    replies_config.push(reply);
                }
                Change::Health {
                    pool,
                    backend,
                    healthy,
                } => {
                    carried.health.insert((pool, backend), healthy);
                }
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
        carried.retain_for(&config);
        let generation = current.generation + 1;
        let metrics = carried.metrics.clone();
        match Table::build(config, loaded_at, generation, &mut carried, &metrics) {
            Ok(next) => {
                carried.export_health(&next);
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
                for reply in replies_config {
                    let _ = reply.send(Err(error.clone()));
                }
                for (reply, _) in replies_admin {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
