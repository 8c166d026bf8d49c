//! Active health checking: one loop per backend, probing every `interval` (±10 % jitter so
//! many backends are not probed in lock-step), folding results through the pure
//! [`state::HealthState`] machine and publishing only transitions through the one writer.
//!
//! The first round runs before the listeners accept, so no traffic goes to a backend known
//! to be down at start-up; backends added later by a reload wait for their first passing
//! probe. On reload the loops are reconciled: unchanged backends keep their loop (and state).

pub mod probe;
pub mod state;

use crate::config::{
    Config, HealthCheckConfig, HealthCheckKind, PoolConfig, ProxyProtocolVersion, UpstreamTls,
};
use crate::metrics::Metrics;
use crate::upstream::publisher::PublisherHandle;
use state::{HealthState, Transition};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a running check loop was started for; a change restarts the loop.
#[derive(Debug, Clone, PartialEq)]
struct CheckSpec {
    address: SocketAddr,
    check: HealthCheckConfig,
    /// The pool's way to its backends, which a probe takes too ([`probe::Reach`]).
    tls: Option<UpstreamTls>,
    send_proxy_protocol: Option<ProxyProtocolVersion>,
    connect_timeout: Duration,
}

impl CheckSpec {
    fn of(pool: &PoolConfig, address: SocketAddr) -> Self {
        CheckSpec {
            address,
            check: pool.health_check.clone(),
            tls: pool.tls.clone(),
            send_proxy_protocol: pool.send_proxy_protocol,
            connect_timeout: pool.timeouts.connect,
        }
    }
}

/// Owns the check loops.
pub struct HealthChecker {
    publisher: PublisherHandle,
    metrics: Metrics,
    loops: Mutex<HashMap<(String, String), (CheckSpec, CancellationToken)>>,
    stop: CancellationToken,
}

impl HealthChecker {
    /// A checker publishing through `publisher`; loops end when `stop` is cancelled.
    pub fn new(publisher: PublisherHandle, metrics: Metrics, stop: CancellationToken) -> Self {
        HealthChecker {
            publisher,
            metrics,
            loops: Mutex::new(HashMap::new()),
            stop,
        }
    }

    /// Probes every checked backend of `config` once, concurrently, publishes the results
    /// and waits until the table reflects them; then starts the loops.
    pub async fn first_round(&self, config: &Config) {
        let mut probes = tokio::task::JoinSet::new();
        let mut reaches = HashMap::new();
        for pool in &config.pools {
            if pool.health_check.kind == HealthCheckKind::None {
                continue;
            }
            let reach = probe::Reach::for_pool(pool, &self.metrics);
            for backend in &pool.backends {
                let (pool_name, backend_name) = (pool.name.clone(), backend.name.clone());
                let check = pool.health_check.clone();
                let address = backend.address;
                let reach = reach.clone();
                probes.spawn(async move {
                    let result = probe::probe(&check.kind, &reach, address, check.timeout).await;
                    (pool_name, backend_name, result)
                });
            }
            reaches.insert(pool.name.as_str(), reach);
        }
        let mut results = Vec::new();
        let mut states = HashMap::new();
        while let Some(Ok((pool, backend, result))) = probes.join_next().await {
            self.count(&pool, &backend, result.is_ok());
            if let Err(reason) = &result {
                tracing::warn!(pool = %pool, backend = %backend, %reason, "backend down at start-up: it gets no traffic until it passes its health checks");
            }
            let mut state = HealthState::new();
            let check = config.pool(&pool).map(|p| &p.health_check);
            if let Some(check) = check {
                state.observe(
                    result.is_ok(),
                    check.healthy_threshold,
                    check.unhealthy_threshold,
                );
            }
            states.insert((pool.clone(), backend.clone()), state);
            results.push((pool, backend, result.is_ok()));
        }
        if let Err(error) = self.publisher.set_health_batch(results).await {
            tracing::error!(%error, "cannot publish the first health results");
        }
        self.reconcile_with(config, states, reaches);
    }

    /// Starts loops for new or changed backends and stops loops of removed ones.
    pub fn reconcile(&self, config: &Config) {
        self.reconcile_with(config, HashMap::new(), HashMap::new());
    }

    /// `initial` holds the states of the first round, `reaches` the pools' ways to their
    /// backends already built (a pool's CA bundle is read once).
    fn reconcile_with<'a>(
        &self,
        config: &'a Config,
        mut initial: HashMap<(String, String), HealthState>,
        mut reaches: HashMap<&'a str, Result<probe::Reach, String>>,
    ) {
        let mut loops = self
            .loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut wanted = HashMap::new();
        for pool in &config.pools {
            if pool.health_check.kind == HealthCheckKind::None {
                continue;
            }
            for backend in &pool.backends {
                let spec = CheckSpec::of(pool, backend.address);
                wanted.insert((pool.name.clone(), backend.name.clone()), spec);
            }
        }
        loops.retain(|key, (spec, token)| {
            let keep = wanted.get(key) == Some(spec);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (key, spec) in wanted {
            if loops.contains_key(&key) {
                continue;
            }
            let token = self.stop.child_token();
            let state = initial.remove(&key).unwrap_or_default();
            let Some(pool) = config.pool(&key.0) else {
                continue;
            };
            // Built once per pool, and only for pools that start a loop.
            let reach = reaches
                .entry(pool.name.as_str())
                .or_insert_with(|| probe::Reach::for_pool(pool, &self.metrics))
                .clone();
            tokio::spawn(check_loop(
                key.clone(),
                spec.clone(),
                reach,
                state,
                self.publisher.clone(),
                self.metrics.clone(),
                token.clone(),
            ));
            loops.insert(key, (spec, token));
        }
    }

    fn count(&self, pool: &str, backend: &str, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.metrics
            .health_checks_total
            .with_label_values(&[pool, backend, result])
            .inc();
    }
}

/// `interval` ± 10 %.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

async fn check_loop(
    (pool, backend): (String, String),
    spec: CheckSpec,
    reach: Result<probe::Reach, String>,
    mut state: HealthState,
    publisher: PublisherHandle,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let check = &spec.check;
    let successes = metrics
        .health_checks_total
        .with_label_values(&[&pool, &backend, "success"]);
    let failures = metrics
        .health_checks_total
        .with_label_values(&[&pool, &backend, "failure"]);
    let mut wait = if state.healthy().is_some() {
        jittered(check.interval)
    } else {
        Duration::ZERO
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = jittered(check.interval);
        let result = tokio::select! {
            result = probe::probe(&check.kind, &reach, spec.address, check.timeout) => result,
            () = stop.cancelled() => return,
        };
        if result.is_ok() {
            successes.inc();
        } else {
            failures.inc();
        }
        let transition = state.observe(
            result.is_ok(),
            check.healthy_threshold,
            check.unhealthy_threshold,
        );
        let Some(transition) = transition else {
            continue;
        };
        match (&transition, &result) {
            (Transition::Down, Err(reason)) => {
                tracing::warn!(pool = %pool, backend = %backend, address = %spec.address, %reason, "backend is DOWN: no new traffic until it recovers");
            }
            _ => {
                tracing::info!(pool = %pool, backend = %backend, address = %spec.address, "backend is UP")
            }
        }
        let healthy = transition == Transition::Up;
        if publisher
            .set_health(&pool, &backend, healthy)
            .await
            .is_err()
        {
            return;
        }
    }
}
