//! Raw structs → typed [`Config`], collecting every problem with its key path.

use super::locate::LazyLocator;
use super::raw::*;
use super::read::{duplicate_name, read, Reading};
use super::units::{parse_duration, parse_status_range};
use super::*;
use std::collections::HashSet;

const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
const MAX_WEIGHT: u32 = 1000;

/// Every problem found so far, with a locator to place them in the file.
struct Problems<'t> {
    locator: LazyLocator<'t>,
    found: Vec<Problem>,
}

impl Problems<'_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let problem = Problem::placed(self.locator.get(), path.into(), message.into());
        self.found.push(problem);
    }

    /// Runs a parser; on failure records its message at `path` and returns `None`.
    fn check<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.push(path, message);
                None
            }
        }
    }

    fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        match text {
            None => default,
            Some(text) => self.check(path, parse_duration(text)).unwrap_or(default),
        }
    }
}

pub(super) fn parse_and_validate(text: &str, file: &Path) -> Result<Config, Vec<Problem>> {
    let locator = LazyLocator::new(text);
    let Reading {
        raw,
        problems: found,
        stand_ins,
    } = read(text, &locator);
    let read_problems = found.len();
    let mut problems = Problems { locator, found };
    let config = raw.map(|raw| {
        let base = file.parent().unwrap_or(Path::new("")).to_path_buf();
        build(raw, text, file, &base, &mut problems)
    });
    // A missing key was reported as such; what validation says of its stand-in is not news.
    let mut validated = problems.found.split_off(read_problems);
    validated.retain(|problem| !stand_ins.cover(&problem.path));
    problems.found.append(&mut validated);
    match config {
        Some(config) if problems.found.is_empty() => Ok(config),
        _ => {
            problems
                .found
                .sort_by_key(|problem| (problem.line.unwrap_or(usize::MAX), problem.column));
            Err(problems.found)
        }
    }
}

/// Reports `name` at `path`, where it repeats, when one of the `earlier` entries has it; the
/// repetition is left out as a whole (its copy would repeat the first's problems, its
/// address taken twice).
fn repeated<T>(earlier: &[(String, T)], name: &str, path: &str, p: &mut Problems) -> bool {
    let occurrence = earlier.iter().filter(|(other, _)| other == name).count();
    if occurrence == 0 {
        return false;
    }
    let position = p.locator.get().find_occurrence(path, occurrence);
    let message = duplicate_name(name);
    p.found
        .push(Problem::at(path.to_string(), position, message));
    true
}

fn build(raw: RawConfig, text: &str, file: &Path, base: &Path, p: &mut Problems) -> Config {
    let resolve = |relative: &str| -> PathBuf { base.join(relative) };

    let admin_listen = raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let admin_listen = p
        .check("admin.listen", parse_socket_addr(admin_listen))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901)));
    let token = raw.admin.token_file.as_deref().and_then(|token_file| {
        let read = std::fs::read_to_string(resolve(token_file))
            .map_err(|error| format!("cannot read token file \"{token_file}\": {error}"))
            .and_then(|content| {
                let token = content.trim().to_string();
                if token.is_empty() {
                    Err(format!("token file \"{token_file}\" is empty"))
                } else {
                    Ok(token)
                }
            });
        p.check("admin.token_file", read)
    });

    let shutdown_timeout = p.duration(
        "shutdown_timeout",
        raw.shutdown_timeout.as_deref(),
        Duration::from_secs(30),
    );
    let access_log = access_log(raw.access_log.as_ref(), &resolve, p);
    if let AccessLogTarget::File(path) = &access_log.target {
        p.check("access_log.target", appendable(path));
    }
    let audit_log = match raw.audit_log.as_deref() {
        None | Some("off") => None,
        Some(path) => {
            let path = resolve(path);
            p.check("audit_log", appendable(&path));
            Some(path)
        }
    };
    let last_good = match raw.last_good.as_deref() {
        Some(path) => {
            let path = resolve(path);
            p.check("last_good", appendable(&path));
            path
        }
        None => {
            let mut name = file.file_name().unwrap_or_default().to_os_string();
            name.push(".last-good");
            file.with_file_name(name)
        }
    };

    let pool_names: HashSet<&str> = raw.pools.0.iter().map(|(name, _)| name.as_str()).collect();
    let mut listeners = Vec::new();
    let mut addresses: Vec<(SocketAddr, String)> = vec![(admin_listen, "admin.listen".into())];
    for (index, (name, listener)) in raw.listeners.0.iter().enumerate() {
        let path = format!("listeners.{name}");
        if repeated(&raw.listeners.0[..index], name, &path, p) {
            continue;
        }
        check_name(&path, name, p);
        if let Some(config) = listener_config(name, listener, &pool_names, &resolve, p) {
            if let Some((_, other)) = addresses.iter().find(|(a, _)| same_port(*a, config.listen)) {
                p.push(
                    format!("{path}.listen"),
                    format!("address {} is already used by {other}", config.listen),
                );
            }
            addresses.push((config.listen, format!("{path}.listen")));
            listeners.push(config);
        }
    }
    if raw.listeners.0.is_empty() {
        p.push("listeners", "at least one listener is required");
    }

    let mut pools = Vec::new();
    for (index, (name, pool)) in raw.pools.0.iter().enumerate() {
        let path = format!("pools.{name}");
        if repeated(&raw.pools.0[..index], name, &path, p) {
            continue;
        }
        check_name(&path, name, p);
        pools.push(pool_config(name, pool, &resolve, p));
    }
    for listener in &listeners {
        let pool = listener
            .pool
            .as_deref()
            .and_then(|name| pools.iter().find(|p| p.name == name));
        if !listener.protocol.is_http() && pool.is_some_and(|pool| pool.tls.is_some()) {
            p.push(
                format!("listeners.{}.pool", listener.name),
                "a tcp/tls listener cannot use a pool with tls towards its backends (HTTP only)",
            );
        }
    }

    Config {
        path: file.to_path_buf(),
        hash: fnv1a_hex(text),
        text: Arc::from(text),
        admin: AdminConfig {
            listen: admin_listen,
            token,
            token_file: raw.admin.token_file.as_deref().map(resolve),
        },
        worker_threads: raw.runtime.worker_threads.unwrap_or(0),
        shutdown_timeout,
        access_log,
        audit_log,
        last_good,
        listeners,
        pools,
    }
}

/// Two sockets clash when their ports are equal and either is a wildcard or both are equal.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Names appear in metric labels, URLs and logs: keep them to a safe alphabet.
fn check_name(path: &str, name: &str, p: &mut Problems) {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        p.push(
            path,
            format!("invalid name \"{name}\" (use 1-64 letters, digits, '-', '_' or '.')"),
        );
    }
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        let is_ip = |host: &str| host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
        let hint = match text.rsplit_once(':') {
            _ if is_ip(text) => " (the port is missing, e.g. \"10.0.0.1:8080\")",
            Some((host, _)) if !host.is_empty() && !is_ip(host) => {
                " (an IP address and a port: host names are not resolved)"
            }
            Some(("", _)) | None => " (an IP address and a port, e.g. \"0.0.0.0:8080\")",
            Some(_) => "",
        };
        format!("invalid socket address \"{text}\"{hint}")
    })
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("invalid CIDR \"{text}\" (expected e.g. 10.0.0.0/8)"))
}

fn access_log(
    raw: Option<&RawAccessLog>,
    resolve: &dyn Fn(&str) -> PathBuf,
    p: &mut Problems,
) -> AccessLogConfig {
    let target = match raw.and_then(|r| r.target.as_deref()) {
        None | Some("stdout") => AccessLogTarget::Stdout,
        Some("off") => AccessLogTarget::Off,
        Some("") => {
            p.push(
                "access_log.target",
                "target must be stdout, off or a file path",
            );
            AccessLogTarget::Off
        }
        Some(path) => AccessLogTarget::File(resolve(path)),
    };
    let format = match raw.and_then(|r| r.format.as_deref()) {
        None | Some("json") => AccessLogFormat::Json,
        Some("text") => AccessLogFormat::Text,
        Some(other) => {
            p.push(
                "access_log.format",
                format!("unknown format \"{other}\" (expected json or text)"),
            );
            AccessLogFormat::Json
        }
    };
    AccessLogConfig { target, format }
}

/// Whether gatehouse can write the file at `path` (a log, the last-known-good copy): a
/// regular file that exists is opened for appending (nothing is written); one that does not
/// exist yet needs its directory. So a mistyped path is refused by `check` and on reload,
/// not found once requests are lost from the log. A FIFO or device is taken as it is
/// (opening a FIFO would wait for its reader).
fn appendable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(metadata) if !metadata.is_file() => Ok(()),
        Ok(_) => std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|error| format!("cannot write {}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let directory = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            if directory.is_dir() {
                Ok(())
            } else {
                Err(format!(
                    "cannot write {}: no directory {}",
                    path.display(),
                    directory.display()
                ))
            }
        }
        Err(error) => Err(format!("cannot write {}: {error}", path.display())),
    }
}

fn cidrs(path: &str, texts: &[String], p: &mut Problems) -> Vec<IpNet> {
    texts
        .iter()
        .enumerate()
        .filter_map(|(index, text)| p.check(&format!("{path}[{index}]"), parse_cidr(text)))
        .collect()
}

fn listener_config(
    name: &str,
    raw: &RawListener,
    pool_names: &HashSet<&str>,
    resolve: &dyn Fn(&str) -> PathBuf,
    p: &mut Problems,
) -> Option<ListenerConfig> {
    let path = format!("listeners.{name}");
    let listen = p.check(&format!("{path}.listen"), parse_socket_addr(&raw.listen));
    let protocol = match raw.protocol.as_deref() {
        None | Some("http") => Protocol::Http,
        Some("https") => Protocol::Https,
        Some("tcp") => Protocol::Tcp,
        Some("tls") => Protocol::Tls,
        Some(other) => {
            p.push(
                format!("{path}.protocol"),
                format!("unknown protocol \"{other}\" (expected http, https, tcp or tls)"),
            );
            Protocol::Http
        }
    };

    let tls = match (&raw.tls, protocol.is_tls()) {
        (Some(tls), true) => listener_tls(&format!("{path}.tls"), tls, resolve, p),
        (None, true) => {
            p.push(
                format!("{path}.tls"),
                format!("protocol {} requires a tls block", protocol.as_str()),
            );
            None
        }
        (Some(_), false) => {
            p.push(
                format!("{path}.tls"),
                format!(
                    "tls is only used by https and tls listeners (this one is {})",
                    protocol.as_str()
                ),
            );
            None
        }
        (None, false) => None,
    };

    let rate_limit = raw.rate_limit.as_ref().and_then(|limit| {
        let rps = limit.requests_per_second;
        if !(rps.is_finite() && rps > 0.0) {
            p.push(
                format!("{path}.rate_limit.requests_per_second"),
                "must be a positive number",
            );
            return None;
        }
        let burst = limit.burst.unwrap_or_else(|| rps.ceil().max(1.0) as u32);
        if burst == 0 {
            p.push(format!("{path}.rate_limit.burst"), "must be at least 1");
            return None;
        }
        Some(RateLimit {
            requests_per_second: rps,
            burst,
        })
    });

    let hsts = raw.hsts.as_ref().and_then(|hsts| {
        if protocol != Protocol::Https {
            p.push(
                format!("{path}.hsts"),
                "hsts applies to https listeners only",
            );
            return None;
        }
        let max_age = p.check(
            &format!("{path}.hsts.max_age"),
            parse_duration(&hsts.max_age),
        )?;
        let mut value = format!("max-age={}", max_age.as_secs());
        if hsts.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if hsts.preload {
            value.push_str("; preload");
        }
        http::HeaderValue::from_str(&value).ok()
    });
    let max_header_bytes = raw.limits.max_header_bytes.unwrap_or(65536);
    if !(1024..=1 << 20).contains(&max_header_bytes) {
        p.push(
            format!("{path}.limits.max_header_bytes"),
            "must be between 1024 and 1048576",
        );
    }
    let limits = Limits {
        max_header_bytes,
        header_timeout: p.duration(
            &format!("{path}.limits.header_timeout"),
            raw.limits.header_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        send_timeout: p.duration(
            &format!("{path}.limits.send_timeout"),
            raw.limits.send_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        max_connections: raw.limits.max_connections.unwrap_or(10_000),
        max_connections_per_client: raw.limits.max_connections_per_client.unwrap_or(0),
        client_ipv6_prefix: raw.limits.client_ipv6_prefix.unwrap_or(64),
    };
    if !(1..=128).contains(&limits.client_ipv6_prefix) {
        p.push(
            format!("{path}.limits.client_ipv6_prefix"),
            "must be between 1 and 128",
        );
    }
    if limits.header_timeout.is_zero() {
        p.push(
            format!("{path}.limits.header_timeout"),
            "must be above zero",
        );
    }
    if limits.send_timeout.is_zero() {
        p.push(format!("{path}.limits.send_timeout"), "must be above zero");
    }
    if limits.max_connections == 0 {
        p.push(
            format!("{path}.limits.max_connections"),
            "must be at least 1",
        );
    }

    let mut routes = Vec::new();
    if !raw.routes.is_empty() && !protocol.is_http() {
        p.push(
            format!("{path}.routes"),
            "routes apply to http and https listeners only",
        );
    }
    for (index, route) in raw.routes.iter().enumerate() {
        let route_path = format!("{path}.routes[{index}]");
        if !pool_names.contains(route.pool.as_str()) {
            p.push(
                format!("{route_path}.pool"),
                format!("unknown pool \"{}\"", route.pool),
            );
        }
        let host = route
            .host
            .as_deref()
            .and_then(|host| p.check(&format!("{route_path}.host"), parse_host_match(host)));
        if let Some(prefix) = &route.path_prefix {
            if !prefix.starts_with('/') {
                p.push(
                    format!("{route_path}.path_prefix"),
                    format!("path_prefix \"{prefix}\" must start with '/'"),
                );
            }
        }
        let name = route
            .name
            .clone()
            .unwrap_or_else(|| format!("route{index}"));
        check_name(&format!("{route_path}.name"), &name, p);
        routes.push(RouteConfig {
            name,
            host,
            path_prefix: route.path_prefix.clone(),
            pool: route.pool.clone(),
            max_body_bytes: route.max_body_bytes,
        });
    }
    match &raw.pool {
        Some(pool) if !pool_names.contains(pool.as_str()) => {
            p.push(format!("{path}.pool"), format!("unknown pool \"{pool}\""));
        }
        None if !protocol.is_http() => {
            p.push(
                format!("{path}.pool"),
                format!("a {} listener needs a pool", protocol.as_str()),
            );
        }
        None if raw.routes.is_empty() => {
            p.push(
                format!("{path}.pool"),
                format!(
                    "an {} listener needs a default pool or at least one route",
                    protocol.as_str()
                ),
            );
        }
        _ => {}
    }

    Some(ListenerConfig {
        name: name.to_string(),
        listen: listen?,
        protocol,
        tls,
        proxy_protocol: raw.proxy_protocol,
        reuse_port: raw.reuse_port,
        trusted_proxies: cidrs(&format!("{path}.trusted_proxies"), &raw.trusted_proxies, p),
        allow: cidrs(&format!("{path}.allow"), &raw.allow, p),
        deny: cidrs(&format!("{path}.deny"), &raw.deny, p),
        rate_limit,
        hsts,
        limits,
        routes,
        pool: raw.pool.clone(),
    })
}

fn parse_host_match(host: &str) -> Result<HostMatch, String> {
    let host = host.trim().to_ascii_lowercase();
    let valid_name = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if let Some(suffix) = host.strip_prefix("*.") {
        if valid_name(suffix) {
            return Ok(HostMatch::Suffix(format!(".{suffix}")));
        }
    } else if valid_name(&host) {
        return Ok(HostMatch::Exact(host));
    }
    Err(format!(
        "invalid host \"{host}\" (expected a name like tax.example.gov or *.example.gov, without port)"
    ))
}

fn listener_tls(
    path: &str,
    raw: &RawListenerTls,
    resolve: &dyn Fn(&str) -> PathBuf,
    p: &mut Problems,
) -> Option<ListenerTls> {
    if raw.certificates.is_empty() {
        p.push(
            format!("{path}.certificates"),
            "at least one certificate is required",
        );
    }
    let mut certificates = Vec::new();
    for (index, pair) in raw.certificates.iter().enumerate() {
        match crate::tls::LoadedCertificate::load(&resolve(&pair.cert), &resolve(&pair.key)) {
            Ok(loaded) => certificates.push(Arc::new(loaded)),
            Err(error) => {
                let pair_path = format!("{path}.certificates[{index}]");
                let at = match error.file {
                    Some(file) => format!("{pair_path}.{file}"),
                    None => pair_path,
                };
                p.push(at, error.message);
            }
        }
    }
    let min_version = match raw.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(other) => {
            p.push(
                format!("{path}.min_version"),
                format!("unsupported TLS version \"{other}\" (expected \"1.2\" or \"1.3\")"),
            );
            TlsVersion::Tls12
        }
    };
    let client_ca = raw.client_ca.as_deref().map(resolve);
    let client_auth_required = match raw.client_auth.as_deref() {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => {
            p.push(
                format!("{path}.client_auth"),
                format!("unknown client_auth \"{other}\" (expected required or optional)"),
            );
            true
        }
    };
    if raw.client_auth.is_some() && client_ca.is_none() {
        p.push(format!("{path}.client_auth"), "client_auth needs client_ca");
    }
    let client_cert_header = raw.client_cert_header.as_deref().and_then(|name| {
        let parsed = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name \"{name}\""))
            .and_then(|parsed| {
                if crate::proxy::headers::FORWARDED_NAMES.contains(&parsed.as_str()) {
                    Err(format!(
                        "\"{name}\" is a header gatehouse sets itself; choose another name"
                    ))
                } else {
                    Ok(parsed)
                }
            });
        p.check(&format!("{path}.client_cert_header"), parsed)
    });
    if let Some(ca) = &client_ca {
        p.check(&format!("{path}.client_ca"), crate::tls::load_roots(ca));
    }
    Some(ListenerTls {
        certificates,
        min_version,
        client_ca,
        client_auth_required,
        client_cert_header,
        session_resumption: raw.session_resumption.unwrap_or(true),
    })
}

fn pool_config(
    name: &str,
    raw: &RawPool,
    resolve: &dyn Fn(&str) -> PathBuf,
    p: &mut Problems,
) -> PoolConfig {
    let path = format!("pools.{name}");
    let algorithm = match raw.algorithm.as_deref() {
        None => Algorithm::RoundRobin,
        Some(text) => Algorithm::ALL
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, algorithm)| *algorithm)
            .unwrap_or_else(|| {
                let known: Vec<&str> = Algorithm::ALL.iter().map(|(name, _)| *name).collect();
                p.push(
                    format!("{path}.algorithm"),
                    format!(
                        "unknown algorithm \"{text}\" (expected one of {})",
                        known.join(", ")
                    ),
                );
                Algorithm::RoundRobin
            }),
    };
    let hash_key = match raw.hash_key.as_deref() {
        None | Some("source_ip") => HashKey::SourceIp,
        Some(text) => p
            .check(&format!("{path}.hash_key"), parse_hash_key(text))
            .unwrap_or(HashKey::SourceIp),
    };
    if raw.hash_key.is_some() && algorithm != Algorithm::ConsistentHash {
        p.push(
            format!("{path}.hash_key"),
            "hash_key is only used by the consistent_hash algorithm",
        );
    }

    let mut backends = Vec::new();
    let mut names = HashSet::new();
    for (index, backend) in raw.backends.iter().enumerate() {
        let backend_path = format!("{path}.backends[{index}]");
        check_name(&format!("{backend_path}.name"), &backend.name, p);
        if !names.insert(backend.name.as_str()) {
            p.push(
                format!("{backend_path}.name"),
                format!("duplicate backend name \"{}\" in pool {name}", backend.name),
            );
        }
        if let Some(config) = backend_config(&backend_path, backend, p) {
            backends.push(config);
        }
    }

    let health_check = health_check(
        &format!("{path}.health_check"),
        raw.health_check.as_ref(),
        p,
    );
    let passive = PassiveConfig {
        consecutive_failures: raw
            .passive
            .as_ref()
            .and_then(|passive| passive.consecutive_failures)
            .unwrap_or(5),
        ejection: p.duration(
            &format!("{path}.passive.ejection"),
            raw.passive
                .as_ref()
                .and_then(|passive| passive.ejection.as_deref()),
            Duration::from_secs(30),
        ),
    };
    let send_proxy_protocol = match raw.send_proxy_protocol.as_deref() {
        None | Some("null") => None,
        Some("v1") => Some(ProxyProtocolVersion::V1),
        Some("v2") => Some(ProxyProtocolVersion::V2),
        Some(other) => {
            p.push(
                format!("{path}.send_proxy_protocol"),
                format!("unknown PROXY protocol version \"{other}\" (expected v1 or v2)"),
            );
            None
        }
    };
    let timeouts_raw = raw.timeouts.as_ref();
    let timeouts = Timeouts {
        connect: p.duration(
            &format!("{path}.timeouts.connect"),
            timeouts_raw.and_then(|t| t.connect.as_deref()),
            Duration::from_secs(2),
        ),
        request: p.duration(
            &format!("{path}.timeouts.request"),
            timeouts_raw.and_then(|t| t.request.as_deref()),
            Duration::from_secs(60),
        ),
        idle: p.duration(
            &format!("{path}.timeouts.idle"),
            timeouts_raw.and_then(|t| t.idle.as_deref()),
            Duration::from_secs(90),
        ),
    };
    for (key, value) in [("connect", timeouts.connect), ("request", timeouts.request)] {
        if value.is_zero() {
            p.push(format!("{path}.timeouts.{key}"), "must be above zero");
        }
    }
    let retry_attempts = raw.retries.as_ref().and_then(|r| r.attempts).unwrap_or(2);
    if !(1..=10).contains(&retry_attempts) {
        p.push(
            format!("{path}.retries.attempts"),
            "must be between 1 (no retry) and 10",
        );
    }
    let tls = raw.tls.as_ref().map(|tls| {
        let ca = tls.ca.as_deref().map(resolve);
        let bundle = ca
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::upstream::connector::SYSTEM_CA_BUNDLE));
        p.check(&format!("{path}.tls.ca"), crate::tls::load_roots(&bundle));
        if raw.send_proxy_protocol.is_some() {
            p.push(
                format!("{path}.tls"),
                "tls towards backends cannot be combined with send_proxy_protocol yet",
            );
        }
        UpstreamTls {
            sni: tls.sni.clone(),
            ca,
        }
    });

    let latency_decay = p.duration(
        &format!("{path}.latency_decay"),
        raw.latency_decay.as_deref(),
        Duration::from_secs(10),
    );
    if latency_decay.is_zero() {
        p.push(format!("{path}.latency_decay"), "must be above zero");
    }
    PoolConfig {
        name: name.to_string(),
        algorithm,
        hash_key,
        latency_decay,
        backends,
        health_check,
        passive,
        slow_start: p.duration(
            &format!("{path}.slow_start"),
            raw.slow_start.as_deref(),
            Duration::ZERO,
        ),
        fail_open: raw.fail_open,
        send_proxy_protocol,
        timeouts,
        retry_attempts,
        max_connections_per_backend: raw.max_connections_per_backend.unwrap_or(0),
        tls,
    }
}

fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    if let Some(header) = text.strip_prefix("header:") {
        return http::HeaderName::from_bytes(header.trim().as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("invalid header name in hash_key \"{text}\""));
    }
    if let Some(cookie) = text.strip_prefix("cookie:") {
        let cookie = cookie.trim();
        if !cookie.is_empty() && !cookie.contains([';', '=', ' ']) {
            return Ok(HashKey::Cookie(cookie.to_string()));
        }
        return Err(format!("invalid cookie name in hash_key \"{text}\""));
    }
    Err(format!(
        "unknown hash_key \"{text}\" (expected source_ip, header:<name> or cookie:<name>)"
    ))
}

/// Derives a weight from a VM's size: ten per usable core, where a core is usable only
/// with 2 GiB of memory behind it (so a 4-CPU, 4-GiB VM weighs like a 2-CPU one).
pub(crate) fn weight_from_capacity(capacity: &Capacity) -> u32 {
    let usable_cores = match capacity.memory_gib {
        Some(memory) => capacity.cpu.min(memory / 2.0),
        None => capacity.cpu,
    };
    ((usable_cores * 10.0).round() as u32).clamp(1, MAX_WEIGHT)
}

fn backend_config(path: &str, raw: &RawBackend, p: &mut Problems) -> Option<BackendConfig> {
    let address = p.check(&format!("{path}.address"), parse_socket_addr(&raw.address));
    let capacity = raw.capacity.as_ref().and_then(|capacity| {
        let valid_memory = capacity.memory_gib.is_none_or(|m| m.is_finite() && m > 0.0);
        if capacity.cpu.is_finite() && capacity.cpu > 0.0 && valid_memory {
            Some(Capacity {
                cpu: capacity.cpu,
                memory_gib: capacity.memory_gib,
            })
        } else {
            p.push(
                format!("{path}.capacity"),
                "cpu and memory_gib must be positive numbers",
            );
            None
        }
    });
    let weight = match (raw.weight, &capacity) {
        (Some(weight), _) => {
            if !(1..=MAX_WEIGHT).contains(&weight) {
                p.push(
                    format!("{path}.weight"),
                    format!("weight {weight} is out of range (1..={MAX_WEIGHT})"),
                );
            }
            weight.clamp(1, MAX_WEIGHT)
        }
        (None, Some(capacity)) => weight_from_capacity(capacity),
        (None, None) => 1,
    };
    let state = match raw.state.as_deref() {
        None => AdminState::Active,
        Some(text) => AdminState::parse(text).unwrap_or_else(|| {
            p.push(
                format!("{path}.state"),
                format!("unknown state \"{text}\" (expected active, draining or disabled)"),
            );
            AdminState::Active
        }),
    };
    Some(BackendConfig {
        name: raw.name.clone(),
        address: address?,
        weight,
        capacity,
        state,
    })
}

fn health_check(path: &str, raw: Option<&RawHealthCheck>, p: &mut Problems) -> HealthCheckConfig {
    let kind = match raw.map(|r| r.kind.as_deref()) {
        None => HealthCheckKind::Tcp,
        Some(None | Some("http")) => {
            let raw = raw.map(|r| {
                (
                    r.path.as_deref(),
                    r.host.clone(),
                    r.expect_status.as_deref(),
                )
            });
            let (check_path, host, expect) = raw.unwrap_or((None, None, None));
            let check_path = check_path.unwrap_or("/healthz").to_string();
            if !check_path.starts_with('/') {
                p.push(format!("{path}.path"), "path must start with '/'");
            }
            let expect_status = p
                .check(
                    &format!("{path}.expect_status"),
                    parse_status_range(expect.unwrap_or("200-399")),
                )
                .unwrap_or(StatusRange {
                    low: 200,
                    high: 399,
                });
            HealthCheckKind::Http {
                path: check_path,
                host,
                expect_status,
            }
        }
        Some(Some("tcp")) => HealthCheckKind::Tcp,
        Some(Some("none")) => HealthCheckKind::None,
        Some(Some(other)) => {
            p.push(
                format!("{path}.type"),
                format!("unknown health check type \"{other}\" (expected http, tcp or none)"),
            );
            HealthCheckKind::None
        }
    };
    let interval = p.duration(
        &format!("{path}.interval"),
        raw.and_then(|r| r.interval.as_deref()),
        Duration::from_secs(2),
    );
    let timeout = p.duration(
        &format!("{path}.timeout"),
        raw.and_then(|r| r.timeout.as_deref()),
        Duration::from_secs(1),
    );
    if interval.is_zero() {
        p.push(format!("{path}.interval"), "must be above zero");
    }
    if timeout.is_zero() {
        p.push(format!("{path}.timeout"), "must be above zero");
    }
    let healthy_threshold = raw.and_then(|r| r.healthy_threshold).unwrap_or(2);
    let unhealthy_threshold = raw.and_then(|r| r.unhealthy_threshold).unwrap_or(3);
    for (key, value) in [
        ("healthy_threshold", healthy_threshold),
        ("unhealthy_threshold", unhealthy_threshold),
    ] {
        if value == 0 {
            p.push(format!("{path}.{key}"), "must be at least 1");
        }
    }
    HealthCheckConfig {
        kind,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    }
}

/// FNV-1a, 64 bits: a stable, dependency-free fingerprint of the file for status and logs.
fn fnv1a_hex(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    /// The client-certificate header is written into the request gatehouse forwards; one of
    /// the headers gatehouse sets itself (Host, X-Forwarded-*, X-Request-Id) would be
    /// overwritten, so such a name is refused with the reason.
    #[test]
    fn a_client_cert_header_may_not_be_one_gatehouse_sets() {
        for (name, refused) in [
            ("X-Forwarded-For", true),
            ("host", true),
            ("X-Request-Id", true),
            ("X-Client-Subject", false),
        ] {
            let yaml = format!(
                "listeners:\n  secure:\n    listen: \"127.0.0.1:0\"\n    protocol: https\n    pool: app\n    tls:\n      certificates: [ {{ cert: /nonexistent/c.pem, key: /nonexistent/k.pem }} ]\n      client_ca: /nonexistent/ca.pem\n      client_cert_header: {name}\npools:\n  app:\n    backends:\n      - {{ name: a, address: \"127.0.0.1:9\" }}\n"
            );
            let error = crate::config::parse(&yaml, std::path::Path::new("/nonexistent/t.yaml"))
                .expect_err("the certificate files do not exist");
            let problem = error
                .problems
                .iter()
                .find(|problem| problem.path == "listeners.secure.tls.client_cert_header");
            assert_eq!(problem.is_some(), refused, "{name}: {:?}", error.problems);
            if let Some(problem) = problem {
                assert!(
                    problem.message.contains("a header gatehouse sets itself"),
                    "{}",
                    problem.message
                );
            }
        }
    }

    /// What an operator wrote instead of `IP:port` is named in the message; a bad port
    /// keeps SPEC.md's wording.
    #[test]
    fn a_socket_address_that_is_not_one_says_what_is_wrong() {
        let message = |text: &str| super::parse_socket_addr(text).unwrap_err();
        assert_eq!(
            message("10.0.0.1:99999"),
            "invalid socket address \"10.0.0.1:99999\""
        );
        assert!(message("localhost:80").ends_with("host names are not resolved)"));
        assert!(message("vm-1.internal:8080").ends_with("host names are not resolved)"));
        assert!(message("10.0.0.1").contains("the port is missing"));
        assert!(message("::1").contains("the port is missing"));
        assert!(message(":8080").contains("an IP address and a port, e.g."));
        assert!(message("").contains("an IP address and a port, e.g."));
        assert!(super::parse_socket_addr("[::1]:80").is_ok());
    }

    /// The limits of a listener `web` whose entry ends with `extra` (`, limits: {...}`).
    fn web_limits(extra: &str) -> Result<crate::config::Limits, crate::config::ConfigError> {
        let yaml = format!("listeners:\n  web: {{ listen: \"127.0.0.1:0\", pool: app{extra} }}\npools:\n  app:\n    backends:\n      - {{ name: a, address: \"127.0.0.1:9\" }}\n");
        crate::config::parse(&yaml, std::path::Path::new("/nonexistent/t.yaml"))
            .map(|config| config.listeners[0].limits)
    }

    #[test]
    fn send_timeout_defaults_to_a_minute_and_must_be_above_zero() {
        let send_timeout = |extra: &str| web_limits(extra).map(|limits| limits.send_timeout);
        assert_eq!(
            send_timeout("").unwrap(),
            std::time::Duration::from_secs(60)
        );
        assert_eq!(
            send_timeout(", limits: { send_timeout: 5s }").unwrap(),
            std::time::Duration::from_secs(5)
        );
        let error = send_timeout(", limits: { send_timeout: 0s }").unwrap_err();
        assert_eq!(error.problems[0].path, "listeners.web.limits.send_timeout");
        assert_eq!(error.problems[0].message, "must be above zero");
    }

    /// Per-client limits count an IPv6 client by its /64 unless told otherwise, an IPv4 one
    /// (also written IPv4-mapped) by its address; a prefix outside 1..=128 is refused.
    #[test]
    fn ipv6_clients_are_counted_per_prefix() {
        let key = |limits: &crate::config::Limits, address: &str| {
            limits.client_key(address.parse().unwrap()).to_string()
        };
        let default = web_limits("").unwrap();
        assert_eq!(default.client_ipv6_prefix, 64);
        assert_eq!(
            key(&default, "2001:db8:1:2:aaaa:bbbb:cccc:dddd"),
            "2001:db8:1:2::"
        );
        assert_eq!(key(&default, "2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key(&default, "2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(key(&default, "192.0.2.7"), "192.0.2.7");
        assert_eq!(key(&default, "::ffff:192.0.2.7"), "192.0.2.7");
        let exact = web_limits(", limits: { client_ipv6_prefix: 128 }").unwrap();
        assert_eq!(key(&exact, "2001:db8:1:2::1"), "2001:db8:1:2::1");
        let wide = web_limits(", limits: { client_ipv6_prefix: 48 }").unwrap();
        assert_eq!(key(&wide, "2001:db8:1:2::1"), "2001:db8:1::");
        for refused in ["0", "129"] {
            let error = web_limits(&format!(", limits: {{ client_ipv6_prefix: {refused} }}"))
                .expect_err(refused);
            assert_eq!(
                error.problems[0].path,
                "listeners.web.limits.client_ipv6_prefix"
            );
            assert_eq!(error.problems[0].message, "must be between 1 and 128");
        }
    }
}
