//! The YAML file as written: serde structs that mirror SPEC.md key for key.
//!
//! Everything here is deliberately loose (strings for durations, addresses and CIDRs) so that
//! `validate` can report *every* problem with its key path instead of serde stopping at the
//! first. Unknown keys are refused here (`deny_unknown_fields`); duplicate names in `listeners`
//! and `pools` are kept by [`NamedMap`] for `validate` to report with the rest.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub runtime: RawRuntime,
    pub shutdown_timeout: Option<String>,
    pub access_log: Option<RawAccessLog>,
    pub audit_log: Option<String>,
    pub last_good: Option<String>,
    pub listeners: NamedMap<RawListener>,
    pub pools: NamedMap<RawPool>,
}

/// `admin:` — where the metrics, status API and dashboard listen.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token_file: Option<String>,
}

/// `runtime:` — tokio runtime sizing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub worker_threads: Option<usize>,
}

/// `access_log:` — where one line per request goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub target: Option<String>,
    pub format: Option<String>,
}

/// One entry of `listeners:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub listen: String,
    pub protocol: Option<String>,
    pub tls: Option<RawListenerTls>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub reuse_port: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub rate_limit: Option<RawRateLimit>,
    pub hsts: Option<RawHsts>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub pool: Option<String>,
}

/// `listeners.X.tls:` — TLS termination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
    pub min_version: Option<String>,
    pub client_ca: Option<String>,
    pub client_auth: Option<String>,
    pub client_cert_header: Option<String>,
    pub session_resumption: Option<bool>,
}

/// `hsts:` — Strict-Transport-Security on an https listener's responses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsts {
    pub max_age: String,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

/// One certificate/key pair; SNI chooses among them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
}

/// `rate_limit:` — a per-client-address token bucket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: f64,
    pub burst: Option<u32>,
}

/// `limits:` — protection against slow and greedy clients.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_header_bytes: Option<usize>,
    pub header_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<u32>,
    pub client_ipv6_prefix: Option<u8>,
}

/// One entry of `routes:`; first match wins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub pool: String,
    pub max_body_bytes: Option<u64>,
}

/// One entry of `pools:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub algorithm: Option<String>,
    pub hash_key: Option<String>,
    pub latency_decay: Option<String>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    pub health_check: Option<RawHealthCheck>,
    pub passive: Option<RawPassive>,
    pub slow_start: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    pub send_proxy_protocol: Option<String>,
    pub timeouts: Option<RawTimeouts>,
    pub retries: Option<RawRetries>,
    pub max_connections_per_backend: Option<usize>,
    pub tls: Option<RawUpstreamTls>,
}

/// One backend ("VM") of a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub address: String,
    pub weight: Option<u32>,
    pub capacity: Option<RawCapacity>,
    pub state: Option<String>,
}

/// A VM's size, from which a weight can be derived.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCapacity {
    pub cpu: f64,
    pub memory_gib: Option<f64>,
}

/// `health_check:` — active probing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
}

/// `passive:` — ejection after consecutive failures seen on real traffic.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<u32>,
    pub ejection: Option<String>,
}

/// `timeouts:` — upstream connect, whole-request and idle-connection limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<String>,
    pub request: Option<String>,
    pub idle: Option<String>,
}

/// `retries:` — total tries per request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    pub attempts: Option<u32>,
}

/// `tls:` on a pool — TLS towards the backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub sni: Option<String>,
    pub ca: Option<String>,
}

/// A YAML mapping whose keys are names, kept in file order, duplicates included.
///
/// Order matters to operators (status and dashboard list things as written), and a duplicate
/// name silently shadowing another is exactly the kind of mistake `check` must catch: kept
/// here (a plain map would keep one of them, or serde would stop at it), it is reported by
/// `validate` with the file's other problems.
#[derive(Debug)]
pub struct NamedMap<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NamedMap<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedMapVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for NamedMapVisitor<T> {
            type Value = NamedMap<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of names to entries")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, T)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value::<T>()?;
                    entries.push((name, value));
                }
                Ok(NamedMap(entries))
            }
        }

        deserializer.deserialize_map(NamedMapVisitor(PhantomData))
    }
}
