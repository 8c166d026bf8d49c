//! Reloading the configuration as one transaction: read → parse → validate → bind new
//! listeners → publish → start/stop listeners. Any failure leaves the running configuration
//! untouched. Also computes the human-readable diff between two configurations.

use crate::config::{self, Config, ConfigError, Problem};
use crate::server::{unix_now, Gatehouse};
use std::sync::Arc;

/// What asked for a reload (logged, and audited once the audit log exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    File,
    Signal,
    Api,
}

impl Source {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Signal => "signal",
            Source::Api => "api",
        }
    }
}

/// Reloads the configuration file; returns what changed, or every problem found. `actor`
/// says who asked (for the audit log).
pub async fn reload(
    gatehouse: &Gatehouse,
    source: Source,
    actor: &str,
) -> Result<Vec<String>, ConfigError> {
    let _serialised = gatehouse.reload_lock.lock().await;
    let result = transaction(gatehouse).await;
    let reloads = &gatehouse.metrics.config_reloads_total;
    let table = gatehouse.publisher.table().load_full();
    match &result {
        Ok(changes) => {
            reloads.with_label_values(&["success"]).inc();
            gatehouse.metrics.config_last_reload_success.set(unix_now());
            if changes.is_empty() {
                tracing::info!(
                    source = source.as_str(),
                    "configuration reloaded: no changes"
                );
            }
            for change in changes {
                tracing::info!(source = source.as_str(), "configuration reloaded: {change}");
            }
            crate::tls::warn_of_expiry(&table.config.listeners);
            write_last_good(&table.config);
        }
        Err(error) => {
            reloads.with_label_values(&["failure"]).inc();
            for line in error.to_string().lines() {
                tracing::error!(
                    source = source.as_str(),
                    "reload refused, old configuration keeps serving: {line}"
                );
            }
        }
    }
    let mut entry = serde_json::json!({
        "event": "reload",
        "source": source.as_str(),
        "actor": actor,
        "config": gatehouse.config_path.display().to_string(),
    });
    if let Some(fields) = entry.as_object_mut() {
        match &result {
            Ok(changes) => {
                fields.insert("result".into(), "success".into());
                fields.insert("changes".into(), serde_json::json!(changes));
            }
            Err(error) => {
                fields.insert("result".into(), "failure".into());
                fields.insert("errors".into(), serde_json::json!(error.problems));
            }
        }
    }
    crate::audit::append(table.config.audit_log.as_deref(), entry);
    result
}

/// Keeps a copy of the applied configuration at `last_good`, written atomically (temporary
/// file, then rename), so `run --fallback-last-good` can start from it if the main file is
/// later broken.
pub fn write_last_good(config: &Config) {
    let path = &config.last_good;
    let mut temporary = path.clone().into_os_string();
    temporary.push(".tmp");
    let written = std::fs::write(&temporary, config.text.as_bytes())
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot write the last-known-good configuration");
    }
}

async fn transaction(gatehouse: &Gatehouse) -> Result<Vec<String>, ConfigError> {
    let new = config::load(&gatehouse.config_path)?;
    let old = gatehouse.publisher.table().load_full().config.clone();
    let changes = diff(&old, &new);
    if changes.is_empty() {
        return Ok(changes);
    }
    let problem = |config: &Config, path: String, message: String| ConfigError {
        file: config.path.clone(),
        problems: vec![Problem::located(&config.text, path, message)],
    };
    let prepared = gatehouse
        .prepare_listeners(&new)
        .map_err(|(name, address, error)| {
            problem(
                &new,
                format!("listeners.{name}.listen"),
                format!("cannot bind {address}: {error}"),
            )
        })?;
    let new = Arc::new(new);
    gatehouse
        .publisher
        .apply_config(new.clone())
        .await
        .map_err(|error| problem(&new, String::new(), error))?;
    gatehouse.commit_listeners(prepared);
    gatehouse.health.reconcile(&new);
    Ok(changes)
}

/// What differs between two configurations, one sentence per change.
pub fn diff(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    for listener in &new.listeners {
        match old.listeners.iter().find(|l| l.name == listener.name) {
            None => changes.push(format!(
                "listener {} added ({} {})",
                listener.name,
                listener.protocol.as_str(),
                listener.listen
            )),
            Some(before) => {
                if before.listen != listener.listen {
                    changes.push(format!(
                        "listener {}: address {} -> {}",
                        listener.name, before.listen, listener.listen
                    ));
                }
                if before.protocol != listener.protocol {
                    changes.push(format!(
                        "listener {}: protocol {} -> {}",
                        listener.name,
                        before.protocol.as_str(),
                        listener.protocol.as_str()
                    ));
                }
                if certificate_files(before) != certificate_files(listener) {
                    changes.push(format!("listener {}: certificates changed", listener.name));
                }
                if before.routes != listener.routes || before.pool != listener.pool {
                    changes.push(format!("listener {}: routes changed", listener.name));
                }
                if format!(
                    "{:?}",
                    (
                        &before.limits,
                        &before.allow,
                        &before.deny,
                        &before.trusted_proxies,
                        before.rate_limit,
                        before.proxy_protocol,
                        before.reuse_port
                    )
                ) != format!(
                    "{:?}",
                    (
                        &listener.limits,
                        &listener.allow,
                        &listener.deny,
                        &listener.trusted_proxies,
                        listener.rate_limit,
                        listener.proxy_protocol,
                        listener.reuse_port
                    )
                ) {
                    changes.push(format!("listener {}: settings changed", listener.name));
                }
            }
        }
    }
    for listener in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == listener.name) {
            changes.push(format!("listener {} removed", listener.name));
        }
    }
    for pool in &new.pools {
        let Some(before) = old.pool(&pool.name) else {
            changes.push(format!(
                "pool {} added ({} backends)",
                pool.name,
                pool.backends.len()
            ));
            continue;
        };
        if before.algorithm != pool.algorithm {
            changes.push(format!(
                "pool {}: algorithm {} -> {}",
                pool.name,
                before.algorithm.as_str(),
                pool.algorithm.as_str()
            ));
        }
        for backend in &pool.backends {
            match before.backends.iter().find(|b| b.name == backend.name) {
                None => changes.push(format!(
                    "pool {}: backend {} added ({})",
                    pool.name, backend.name, backend.address
                )),
                Some(was) => {
                    if was.address != backend.address {
                        changes.push(format!(
                            "pool {}: backend {} address {} -> {}",
                            pool.name, backend.name, was.address, backend.address
                        ));
                    }
                    if was.weight != backend.weight {
                        changes.push(format!(
                            "pool {}: backend {} weight {} -> {}",
                            pool.name, backend.name, was.weight, backend.weight
                        ));
                    }
                    if was.state != backend.state {
                        changes.push(format!(
                            "pool {}: backend {} state {} -> {}",
                            pool.name,
                            backend.name,
                            was.state.as_str(),
                            backend.state.as_str()
                        ));
                    }
                }
            }
        }
        for backend in &before.backends {
            if !pool.backends.iter().any(|b| b.name == backend.name) {
                changes.push(format!(
                    "pool {}: backend {} removed",
                    pool.name, backend.name
                ));
            }
        }
        let settings = |p: &config::PoolConfig| {
            format!(
                "{:?}",
                (
                    &p.hash_key,
                    &p.health_check,
                    p.passive,
                    p.slow_start,
                    p.fail_open,
                    p.send_proxy_protocol,
                    p.timeouts,
                    p.retry_attempts,
                    p.max_connections_per_backend,
                    &p.tls
                )
            )
        };
        if settings(before) != settings(pool) {
            changes.push(format!("pool {}: settings changed", pool.name));
        }
    }
    for pool in &old.pools {
        if new.pool(&pool.name).is_none() {
            changes.push(format!("pool {} removed", pool.name));
        }
    }
    if old.admin.token != new.admin.token {
        // Said apart (never the token itself): a rotation is worth finding in the log.
        changes.push("admin token changed".to_string());
    }
    if old.admin.listen != new.admin.listen
        || old.admin.token_file != new.admin.token_file
        || old.shutdown_timeout != new.shutdown_timeout
        || old.access_log != new.access_log
    {
        changes.push("global settings changed".to_string());
    }
    if old.worker_threads != new.worker_threads {
        changes.push(format!(
            "runtime.worker_threads {} -> {}: takes effect at the next start",
            old.worker_threads, new.worker_threads
        ));
    }
    changes
}

/// The certificate files of a listener with their leaf certificates (a replaced file changes
/// the leaf even when its path stays).
fn certificate_files(listener: &config::ListenerConfig) -> Vec<(&std::path::Path, &[u8])> {
    listener
        .tls
        .iter()
        .flat_map(|tls| tls.certificates.iter())
        .map(|c| {
            let leaf = c
                .certified_key
                .cert
                .first()
                .map_or(&[][..], |der| der.as_ref());
            (c.cert_path.as_path(), leaf)
        })
        .collect()
}
