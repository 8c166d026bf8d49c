//! The process's limit on open files. Every client connection takes a descriptor and every
//! proxied one a second for its backend, but a shell's or a service manager's default soft
//! limit is often 1,024: gatehouse would refuse connections ("accept failed: Too many open
//! files") long before `limits.max_connections`. At start it raises the soft limit to the
//! hard one, as HAProxy and Go programs do, and says so when even the hard limit is too low.

use crate::config::Config;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for what is not a client or backend connection: listeners, the admin
/// API, health checks, log and config files.
const RESERVED: u64 = 1024;

/// Raises the soft open-files limit to the hard limit (an info line says so), and warns,
/// naming the settings to change, when the listeners' `max_connections` may take more
/// descriptors than the limit allows.
pub fn raise_for(config: &Config) {
    let wanted = config
        .listeners
        .iter()
        .map(|listener| listener.limits.max_connections as u64)
        .fold(RESERVED, |total, cap| {
            total.saturating_add(cap.saturating_mul(2))
        });
    let limit = getrlimit(Resource::Nofile);
    let mut now = limit.current;
    // `None` is unlimited; Linux has no unlimited hard limit for open files.
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum) {
        if current < maximum {
            let raised = Rlimit {
                current: Some(maximum),
                maximum: Some(maximum),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    now = Some(maximum);
                    tracing::info!(
                        from = current,
                        to = maximum,
                        "raised the open-files limit to its hard limit"
                    );
                }
                Err(error) => tracing::warn!(%error, "could not raise the open-files limit"),
            }
        }
    }
    if let Some(limit) = now.filter(|&limit| limit < wanted) {
        tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below what the listeners' max_connections may take (two \
             per proxied connection, plus {RESERVED}): connections beyond it are refused; raise \
             it (systemd LimitNOFILE=, ulimit -n) or lower limits.max_connections"
        );
    }
}
