//! The running gatehouse: starts the publisher, listeners and admin API; reconciles the set
//! of listeners on reload (never rebinding an unchanged address); drains on shutdown.

use crate::config::{Config, ListenerConfig};
use crate::health::HealthChecker;
use crate::listener::{self, Listener};
use crate::metrics::Metrics;
use crate::upstream::publisher::{self, PublisherHandle};
use crate::workers::{self, Workers};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why gatehouse could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind listener {name} on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind the admin API on {address}: {source}")]
    AdminBind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot build the runtime state: {0}")]
    Build(String),
    #[error("cannot create metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// One accepting listener.
struct RunningListener {
    listen: SocketAddr,
    reuse_port: bool,
    bound: SocketAddr,
    stop: CancellationToken,
}

/// Listener sockets bound for a configuration but not yet accepting.
pub struct PreparedListeners {
    new: Vec<(ListenerConfig, std::net::TcpListener)>,
    removed: Vec<String>,
}

/// The running process: what the admin API, signal handlers and tests talk to.
pub struct Gatehouse {
    pub metrics: Metrics,
    pub publisher: PublisherHandle,
    /// Active health checks; reconciled after every reload.
    pub health: HealthChecker,
    /// The configuration file reloads read.
    pub config_path: PathBuf,
    admin_address: SocketAddr,
    listeners: Mutex<HashMap<String, RunningListener>>,
    /// Serialises reloads (never taken on the request path).
    pub reload_lock: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    ready: AtomicBool,
    /// Where listeners accept and connections are served.
    workers: Workers,
}

impl Gatehouse {
    /// Binds every listener and the admin API, publishes the first table and starts serving.
    pub async fn start(config: Config, metrics: Metrics) -> Result<Arc<Self>, StartError> {
        let config = Arc::new(config);
        let workers =
            Workers::start(workers::count(config.worker_threads)).map_err(StartError::Workers)?;
        let publisher = publisher::start(config.clone(), metrics.clone(), workers.handles().len())
            .map_err(StartError::Build)?;
        metrics.config_last_reload_success.set(unix_now());
        let admin_bind = |source| StartError::AdminBind {
            address: config.admin.listen,
            source,
        };
        let admin_socket = listener::bind(config.admin.listen, false).map_err(admin_bind)?;
        let admin_address = admin_socket.local_addr().map_err(admin_bind)?;
        let admin_socket = tokio::net::TcpListener::from_std(admin_socket).map_err(admin_bind)?;
        let shutdown = CancellationToken::new();
        let health = HealthChecker::new(publisher.clone(), metrics.clone(), shutdown.child_token());
        let gatehouse = Arc::new(Gatehouse {
            health,
            metrics,
            publisher,
            config_path: config.path.clone(),
            admin_address,
            listeners: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            shutdown,
            tasks: TaskTracker::new(),
            ready: AtomicBool::new(false),
            workers,
        });
        let prepared =
            gatehouse
                .prepare_listeners(&config)
                .map_err(|(name, address, source)| StartError::Bind {
                    name,
                    address,
                    source,
                })?;
        gatehouse.health.first_round(&config).await;
        gatehouse.commit_listeners(prepared);
        if config.admin.token.is_none() && !config.admin.listen.ip().is_loopback() {
            tracing::warn!(
                admin = %config.admin.listen,
                "the admin API listens beyond loopback without a token_file: anyone who reaches it can drain backends"
            );
        }
        tokio::spawn(crate::admin::serve(admin_socket, gatehouse.clone()));
        crate::reload::write_last_good(&config);
        gatehouse.ready.store(true, Ordering::Release);
        tracing::info!(
            admin = %gatehouse.admin_address,
            workers = gatehouse.workers.handles().len(),
            listeners = %gatehouse
                .listener_addresses()
                .iter()
                .map(|(name, address)| format!("{name}={address}"))
                .collect::<Vec<_>>()
                .join(","),
            "gatehouse ready"
        );
        Ok(gatehouse)
    }

    /// True once every listener is bound.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Where the admin API listens.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Every accepting listener and its bound address, sorted by name.
    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut addresses: Vec<(String, SocketAddr)> = listeners
            .iter()
            .map(|(name, running)| (name.clone(), running.bound))
            .collect();
        addresses.sort();
        addresses
    }

    /// The bound address of listener `name`.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.listener_addresses()
            .into_iter()
            .find(|(listener, _)| listener == name)
            .map(|(_, address)| address)
    }

    /// Binds the sockets `config` needs that are not already open (same name, address and
    /// SO_REUSEPORT setting keep their socket). Nothing changes until [`Self::commit_listeners`].
    pub fn prepare_listeners(
        &self,
        config: &Config,
    ) -> Result<PreparedListeners, (String, SocketAddr, std::io::Error)> {
        let running = self
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut new = Vec::new();
        for listener in &config.listeners {
            let unchanged = running.get(&listener.name).is_some_and(|r| {
                r.listen == listener.listen && r.reuse_port == listener.reuse_port
            });
            if unchanged {
                continue;
            }
            let socket = listener::bind(listener.listen, listener.reuse_port)
                .map_err(|error| (listener.name.clone(), listener.listen, error))?;
            new.push((listener.clone(), socket));
        }
        let removed = running
            .keys()
            .filter(|name| !config.listeners.iter().any(|l| &l.name == *name))
            .cloned()
            .collect();
        Ok(PreparedListeners { new, removed })
    }

    /// Starts accepting on the prepared sockets and stops listeners the config dropped
    /// (their open connections finish their in-flight requests).
    pub fn commit_listeners(&self, prepared: PreparedListeners) {
        let mut running = self
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for name in prepared.removed {
            if let Some(old) = running.remove(&name) {
                old.stop.cancel();
            }
        }
        for (config, socket) in prepared.new {
            if let Some(old) = running.remove(&config.name) {
                old.stop.cancel();
            }
            let bound = socket.local_addr().unwrap_or(config.listen);
            let stop = self.shutdown.child_token();
            let listener = Listener {
                name: Arc::from(config.name.as_str()),
                socket,
                table: self.publisher.table().clone(),
                shutdown: stop.clone(),
                tasks: self.tasks.clone(),
            };
            tracing::info!(listener = %config.name, address = %bound, protocol = config.protocol.as_str(), "listening");
            listener.start(&self.workers);
            running.insert(
                config.name.clone(),
                RunningListener {
                    listen: config.listen,
                    reuse_port: config.reuse_port,
                    bound,
                    stop,
                },
            );
        }
    }

    /// Stops accepting, lets in-flight requests and tunnels finish for up to `timeout`, and
    /// returns whether everything finished in time.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.ready.store(false, Ordering::Release);
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }

    /// The shutdown deadline of the running configuration.
    pub fn shutdown_timeout(&self) -> Duration {
        self.publisher.table().load().config.shutdown_timeout
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}
