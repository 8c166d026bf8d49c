//! Configuration: the YAML file → raw serde structs → one validation pass → typed [`Config`].
//!
//! The pipeline has two stages (as sozu's `command/src/config.rs` does): [`raw`] mirrors the
//! file and refuses unknown keys ([`read`] reports all of them, not only the first serde
//! meets); [`validate`] turns it into typed values (durations, socket
//! addresses, CIDRs, loaded certificates) and collects *every* problem, each with its key path
//! and, where the [`locate`] scanner can tell, its line and column. `gatehouse check`, start-up
//! and every reload run exactly this code, so they can never disagree.

mod locate;
pub mod raw;
mod read;
pub mod units;
mod validate;

use ipnet::{IpNet, Ipv6Net};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use units::StatusRange;

/// A fully validated configuration. Immutable once built; a reload builds a new one.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (reloads read it again).
    pub path: PathBuf,
    /// A short stable hash of the file's text, shown in status and logs.
    pub hash: String,
    /// The file's text as validated (kept as the last-known-good copy after it is applied).
    pub text: Arc<str>,
    pub admin: AdminConfig,
    /// Worker threads serving connections; 0 means one per core (read at start only).
    pub worker_threads: usize,
    pub shutdown_timeout: Duration,
    pub access_log: AccessLogConfig,
    /// Where reload attempts and admin changes are appended, one JSON line each.
    pub audit_log: Option<PathBuf>,
    /// Where the last successfully applied configuration is kept.
    pub last_good: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
}

impl Config {
    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|pool| pool.name == name)
    }
}

/// `admin:` — the metrics, status API and dashboard listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token mutating admin calls need (the token file's trimmed content).
    pub token: Option<String>,
    /// Where the token was read from: the file watcher follows it, so a rotated token takes
    /// effect without a reload.
    pub token_file: Option<PathBuf>,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    Off,
    File(PathBuf),
}

/// The access-log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Text,
}

/// `access_log:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub target: AccessLogTarget,
    pub format: AccessLogFormat,
}

/// What a listener speaks to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Https,
    Tcp,
    /// TLS terminated, then raw TCP to the backend.
    Tls,
}

impl Protocol {
    /// True for the HTTP-aware (layer 7) protocols.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }

    /// True when the listener terminates TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    /// The name used in the YAML, logs and `X-Forwarded-Proto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
        }
    }
}

/// One entry of `listeners:`.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub tls: Option<ListenerTls>,
    pub proxy_protocol: bool,
    pub reuse_port: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    /// The Strict-Transport-Security value added to responses (https listeners).
    pub hsts: Option<http::HeaderValue>,
    pub limits: Limits,
    pub routes: Vec<RouteConfig>,
    /// The default pool (http/https) or the pool (tcp/tls).
    pub pool: Option<String>,
}

impl ListenerConfig {
    /// The certificates this listener serves (none without TLS), the default first.
    pub fn certificates(&self) -> impl Iterator<Item = &crate::tls::LoadedCertificate> {
        self.tls
            .iter()
            .flat_map(|tls| &tls.certificates)
            .map(|certificate| &**certificate)
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// `listeners.X.tls:` with every certificate already loaded and checked.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub certificates: Vec<Arc<crate::tls::LoadedCertificate>>,
    pub min_version: TlsVersion,
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client certificate is required (else optional).
    pub client_auth_required: bool,
    /// A header carrying the verified client certificate's subject to backends (any such
    /// header from the client is removed).
    pub client_cert_header: Option<http::HeaderName>,
    pub session_resumption: bool,
}

/// `rate_limit:` — a per-client-address token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// `limits:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// The longest a client may accept no byte of a response it is sent (it stopped reading,
    /// or its HTTP/2 window stays shut); then its connection is closed, so a client that does
    /// not read cannot hold a backend connection for ever.
    pub send_timeout: Duration,
    pub max_connections: usize,
    /// Open connections per client address; 0 = unlimited.
    pub max_connections_per_client: u32,
    /// The length of the IPv6 prefix the per-client limits count as one client.
    pub client_ipv6_prefix: u8,
}

impl Limits {
    /// The client that `rate_limit` and `max_connections_per_client` count `address` as: an
    /// IPv4 client by its address (also written IPv4-mapped), an IPv6 client by its
    /// `client_ipv6_prefix` network — an IPv6 host takes any address of its /64 at will
    /// (privacy addresses), so per address its limits would not hold.
    pub fn client_key(&self, address: IpAddr) -> IpAddr {
        match address {
            IpAddr::V4(_) => address,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => Ipv6Net::new(v6, self.client_ipv6_prefix)
                    .map_or(address, |network| IpAddr::V6(network.network())),
            },
        }
    }
}

/// How a route matches the request's host (case-insensitive, port ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// The whole name, lower-cased.
    Exact(String),
    /// `*.example.gov`, stored as `.example.gov`: any name ending with it, not the apex.
    Suffix(String),
}

impl HostMatch {
    /// True when `host` (lower-case, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(name) => host == name,
            HostMatch::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

/// One entry of `routes:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// A label for metrics and logs; defaults to `route<index>`.
    pub name: String,
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    pub pool: String,
    /// Largest request body accepted on this route (413 beyond it); `None` = unlimited.
    pub max_body_bytes: Option<u64>,
}

/// Balancing algorithms (see `balancer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    PowerOfTwo,
    LeastLatency,
    ConsistentHash,
    Random,
}

impl Algorithm {
    /// Every algorithm with its YAML name.
    pub const ALL: [(&'static str, Algorithm); 7] = [
        ("round_robin", Algorithm::RoundRobin),
        ("weighted_round_robin", Algorithm::WeightedRoundRobin),
        ("least_connections", Algorithm::LeastConnections),
        ("power_of_two", Algorithm::PowerOfTwo),
        ("least_latency", Algorithm::LeastLatency),
        ("consistent_hash", Algorithm::ConsistentHash),
        ("random", Algorithm::Random),
    ];

    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, algorithm)| *algorithm == self)
            .map_or("round_robin", |(name, _)| name)
    }
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    SourceIp,
    Header(http::HeaderName),
    Cookie(String),
}

/// A backend's administrative state: the VM lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Started or resumed: takes new traffic (when healthy).
    Active,
    /// Suspended: no new requests or connections; existing ones finish.
    Draining,
    /// Stopped: takes nothing.
    Disabled,
}

impl AdminState {
    /// The YAML/API name.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    /// Parses the YAML/API name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(AdminState::Active),
            "draining" => Some(AdminState::Draining),
            "disabled" => Some(AdminState::Disabled),
            _ => None,
        }
    }
}

/// A VM's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub cpu: f64,
    pub memory_gib: Option<f64>,
}

/// One backend ("VM").
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddr,
    /// Explicit, or derived from `capacity`, or 1.
    pub weight: u32,
    pub capacity: Option<Capacity>,
    pub state: AdminState,
}

/// How a backend is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    Http {
        path: String,
        host: Option<String>,
        expect_status: StatusRange,
    },
    Tcp,
    None,
}

/// `health_check:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// `passive:` — ejection on real-traffic failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveConfig {
    pub consecutive_failures: u32,
    pub ejection: Duration,
}

/// PROXY protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// `timeouts:` of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
    pub idle: Duration,
}

/// `tls:` of a pool — TLS towards the backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub sni: Option<String>,
    pub ca: Option<PathBuf>,
}

/// One entry of `pools:`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub hash_key: HashKey,
    /// `least_latency`'s EWMA time constant.
    pub latency_decay: Duration,
    pub backends: Vec<BackendConfig>,
    pub health_check: HealthCheckConfig,
    pub passive: PassiveConfig,
    pub slow_start: Duration,
    pub fail_open: bool,
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    pub timeouts: Timeouts,
    /// Total tries per request, the first included.
    pub retry_attempts: u32,
    /// 0 = unlimited.
    pub max_connections_per_backend: usize,
    pub tls: Option<UpstreamTls>,
}

/// One configuration problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The key path, e.g. `pools.portal.backends[2].address` (empty for whole-file problems).
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl Problem {
    /// A problem found after validation (a listener that cannot bind), placed in `text`, the
    /// configuration's file, by its key path.
    pub fn located(text: &str, path: String, message: String) -> Self {
        Problem::placed(&locate::Locator::new(text), path, message)
    }

    /// A problem at `path`, at the line and column `locator` finds for it.
    fn placed(locator: &locate::Locator, path: String, message: String) -> Self {
        let position = locator.find(&path);
        Problem::at(path, position, message)
    }

    /// A problem at `path`, at `position` (line, column) in the file when known.
    fn at(path: String, position: Option<(usize, usize)>, message: String) -> Self {
        Problem {
            path,
            line: position.map(|(line, _)| line),
            column: position.map(|(_, column)| column),
            message,
        }
    }
}

/// Why a configuration was refused: every problem found, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = problem.line {
                write!(f, ":{line}")?;
                if let Some(column) = problem.column {
                    write!(f, ":{column}")?;
                }
            }
            write!(f, ": ")?;
            if !problem.path.is_empty() {
                write!(f, "{}: ", problem.path)?;
            }
            write!(f, "{}", problem.message)?;
        }
        Ok(())
    }
}

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read the configuration file: {error}"),
        }],
    })?;
    parse(&text, path)
}

/// Reads `text_file` but validates it as if it were `path` (relative paths resolve against
/// `path`'s directory): how a last-known-good copy stored elsewhere is loaded.
pub fn load_as(text_file: &Path, path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(text_file).map_err(|error| ConfigError {
        file: text_file.to_path_buf(),
        problems: vec![Problem {
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read the file: {error}"),
        }],
    })?;
    parse(&text, path)
}

/// Parses and validates `text`, resolving relative paths against `path`'s directory.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    validate::parse_and_validate(text, path).map_err(|problems| ConfigError {
        file: path.to_path_buf(),
        problems,
    })
}

/// A one-line summary for `gatehouse check` and start-up logs.
pub fn summary(config: &Config) -> String {
    let backends: usize = config.pools.iter().map(|pool| pool.backends.len()).sum();
    format!(
        "{}: ok: {} listener(s), {} pool(s), {} backend(s), config hash {}",
        config.path.display(),
        config.listeners.len(),
        config.pools.len(),
        backends,
        config.hash
    )
}
