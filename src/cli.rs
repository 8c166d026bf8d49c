//! The command line: `run`, `check` and `demo`, logging set-up, and the process lifecycle
//! (signals → reload or graceful drain → exit code).

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::reload::{self, Source};
use crate::server::Gatehouse;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "config/gatehouse.yaml";

/// gatehouse — a layer-4/7 reverse-proxy load balancer.
#[derive(Debug, Parser)]
#[command(name = "gatehouse", version, about)]
pub struct Cli {
    /// Log format for gatehouse's own logs (stderr); filter with RUST_LOG, e.g. `info,gatehouse=debug`.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve with the given configuration.
    Run {
        /// The YAML configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// If the file is invalid, start from the last-known-good copy (`last_good`) instead.
        #[arg(long)]
        fallback_last_good: bool,
    },
    /// Validate a configuration without serving; exit 1 listing every problem.
    Check {
        /// The YAML configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also print what would change against the running instance (its admin API).
        #[arg(long)]
        diff: bool,
        /// Compare against this file instead of the running instance (implies --diff).
        #[arg(long, value_name = "FILE")]
        against: Option<PathBuf>,
        /// The running instance's admin address (default: `admin.listen` of the checked file).
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
    },
    /// Start three demo backends on loopback and serve the default configuration in front.
    Demo {
        /// The YAML configuration file (an embedded copy is used when it does not exist).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    crate::tls::install_crypto_provider();
    match cli.command {
        Command::Check {
            config,
            diff,
            against,
            admin,
        } => check(
            &config,
            diff || against.is_some(),
            against.as_deref(),
            admin,
        ),
        Command::Run {
            config,
            fallback_last_good,
        } => match config::load(&config) {
            Ok(config) => run(config, None),
            Err(error) => {
                eprintln!("{error}");
                if fallback_last_good {
                    return run_last_good(&config);
                }
                eprintln!("gatehouse: refusing to start with an invalid configuration");
                ExitCode::FAILURE
            }
        },
        Command::Demo { config } => crate::demo::main(&config),
    }
}

/// Libraries whose warnings each describe one client's connection: rustls warns of an IP
/// address sent as SNI (any OpenSSL-based client that connects by address does it, on every
/// handshake), of a warning alert received, of an unexpected handshake message. Logged, they
/// would put a line per connection in the log at any client's whim, against the promise that
/// only transitions are logged at info and above; the failures among them are counted in
/// `gatehouse_tls_handshake_errors_total`. They stay at `error` unless `RUST_LOG` names them.
const PER_CONNECTION_LOGGERS: &[&str] = &["rustls"];

/// The log directives for `RUST_LOG`'s value `env` (`info` when unset or invalid), with the
/// per-connection loggers it does not name capped at `error`.
fn log_directives(env: Option<&str>) -> String {
    let spec = env
        .filter(|spec| tracing_subscriber::EnvFilter::try_new(spec).is_ok())
        .unwrap_or("info");
    let names = |logger: &str| {
        spec.split(',').any(|directive| {
            let target = directive.split(['=', '[']).next().unwrap_or("").trim();
            target
                .strip_prefix(logger)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
    };
    let mut directives = spec.to_string();
    for logger in PER_CONNECTION_LOGGERS {
        if !names(logger) {
            directives.push(',');
            directives.push_str(logger);
            directives.push_str("=error");
        }
    }
    directives
}

fn init_logging(format: LogFormat) {
    let env = std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV).ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_directives(env.as_deref()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Starts from the last-known-good copy of `path`'s configuration, loudly.
fn run_last_good(path: &std::path::Path) -> ExitCode {
    let last_good = last_good_path(path);
    match config::load_as(&last_good, path) {
        Ok(config) => {
            let warning = format!(
                "{} is INVALID: starting from the last-known-good copy {} (config hash {}); fix the file and reload",
                path.display(),
                last_good.display(),
                config.hash
            );
            eprintln!("gatehouse: WARNING: {warning}");
            tracing::error!("{warning}");
            run(config, None)
        }
        Err(error) => {
            eprintln!("{error}");
            eprintln!(
                "gatehouse: no usable last-known-good configuration either; refusing to start"
            );
            ExitCode::FAILURE
        }
    }
}

/// Where the last-known-good copy of `path` lives: its `last_good` key if the file still
/// parses as YAML, else `<config>.last-good` beside it.
fn last_good_path(path: &std::path::Path) -> PathBuf {
    let configured = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|value| value.get("last_good")?.as_str().map(PathBuf::from));
    match configured {
        Some(last_good) => path
            .parent()
            .unwrap_or(std::path::Path::new(""))
            .join(last_good),
        None => {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(".last-good");
            path.with_file_name(name)
        }
    }
}

fn check(
    path: &std::path::Path,
    diff: bool,
    against: Option<&std::path::Path>,
    admin: Option<std::net::SocketAddr>,
) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            println!("{}", config::summary(&config));
            if !diff {
                return ExitCode::SUCCESS;
            }
            let base = match against {
                Some(file) => config::load(file).map_err(|error| error.to_string()),
                None => running_config(admin.unwrap_or(config.admin.listen)),
            };
            match base {
                Ok(base) => {
                    let changes = crate::reload::diff(&base, &config);
                    if changes.is_empty() {
                        println!("no changes against {}", base.path.display());
                    }
                    for change in changes {
                        println!("{change}");
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{error}");
                    eprintln!("gatehouse: cannot compare: no base configuration");
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("{error}");
            eprintln!(
                "{}: {} problem(s) found",
                path.display(),
                error.problems.len()
            );
            ExitCode::FAILURE
        }
    }
}

/// Fetches the configuration a running gatehouse serves, from its admin API.
fn running_config(admin: std::net::SocketAddr) -> Result<Config, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start a runtime: {error}"))?;
    runtime.block_on(async move {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{admin}/api/v1/config")
            .parse()
            .map_err(|error| format!("invalid admin address: {error}"))?;
        let response = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
            .await
            .map_err(|_| format!("the admin API at {admin} did not answer"))?
            .map_err(|error| format!("cannot reach the running gatehouse at {admin}: {error}"))?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("cannot read the admin API's answer: {error}"))?
            .to_bytes();
        let running: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|error| format!("unexpected answer from {admin}: {error}"))?;
        let (Some(text), Some(path)) = (running["text"].as_str(), running["path"].as_str()) else {
            return Err(format!("unexpected answer from {admin}: no configuration"));
        };
        config::parse(text, std::path::Path::new(path)).map_err(|error| error.to_string())
    })
}

/// Runs gatehouse with `config` until SIGTERM/SIGINT, then drains. `before_serving` runs on
/// the runtime first (the demo starts its backends there).
pub fn run(config: Config, before_serving: Option<Box<dyn FnOnce() + Send>>) -> ExitCode {
    crate::open_files::raise_for(&config);
    // The control plane's runtime (and, with one worker, the data plane's too): more
    // workers run runtimes of their own (see `workers`).
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gatehouse: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if let Some(before_serving) = before_serving {
            before_serving();
        }
        let Ok(mut signals) = Signals::install() else {
            eprintln!("gatehouse: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let metrics = match Metrics::new() {
            Ok(metrics) => metrics,
            Err(error) => {
                eprintln!("gatehouse: cannot create metrics: {error}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!("{}", config::summary(&config));
        crate::tls::warn_of_expiry(&config.listeners);
        // Nothing is served yet, so a stop while starting has nothing to drain.
        let started = tokio::select! {
            started = Gatehouse::start(config, metrics) => started,
            _ = signals.terminate.recv() => return stopped_while_starting(),
            _ = signals.interrupt.recv() => return stopped_while_starting(),
        };
        let gatehouse = match started {
            Ok(gatehouse) => gatehouse,
            Err(error) => {
                eprintln!("gatehouse: {error}");
                return ExitCode::FAILURE;
            }
        };
        serve_until_signal(gatehouse, signals).await
    })
}

/// A stop that came before gatehouse was ready: logged, and a clean exit.
fn stopped_while_starting() -> ExitCode {
    tracing::info!("SIGTERM or SIGINT while starting: exiting");
    ExitCode::SUCCESS
}

/// The signals gatehouse answers, taken over before it starts: one that arrives while it
/// starts (its first health checks can take a `timeout`; a reload may be sent as soon as
/// the ready line is out) is acted on once it has started — a SIGTERM or SIGINT at once.
/// (Taken over only after start-up, a SIGHUP sent during it met the signal's default
/// action, which ends the process.)
#[cfg(unix)]
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

#[cfg(unix)]
async fn serve_until_signal(gatehouse: Arc<Gatehouse>, signals: Signals) -> ExitCode {
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = signals;
    crate::watch::spawn(gatehouse.clone());
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let gatehouse = gatehouse.clone();
                tokio::spawn(async move {
                    let _ = reload::reload(&gatehouse, Source::Signal, "SIGHUP").await;
                });
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let timeout = gatehouse.shutdown_timeout();
    tracing::info!(
        ?timeout,
        "shutting down: no new connections; finishing in-flight requests (SIGTERM or SIGINT again exits at once)"
    );
    // A second signal — an operator's second Ctrl-C — ends the drain: exiting then is the
    // choice made, as with the shutdown timeout, not a failure.
    let drained = tokio::select! {
        drained = gatehouse.shutdown(timeout) => Some(drained),
        _ = terminate.recv() => None,
        _ = interrupt.recv() => None,
    };
    match drained {
        Some(true) => tracing::info!("all connections finished; exiting"),
        Some(false) => tracing::warn!(
            ?timeout,
            "shutdown_timeout reached with connections still open; exiting"
        ),
        None => tracing::warn!("second SIGTERM/SIGINT: exiting now, in-flight requests cut off"),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::log_directives;

    #[test]
    fn per_connection_loggers_are_capped_unless_named() {
        assert_eq!(log_directives(None), "info,rustls=error");
        assert_eq!(log_directives(Some("warn")), "warn,rustls=error");
        assert_eq!(
            log_directives(Some("info,gatehouse=debug")),
            "info,gatehouse=debug,rustls=error"
        );
        assert_eq!(
            log_directives(Some("debug,rustls=warn")),
            "debug,rustls=warn"
        );
        assert_eq!(
            log_directives(Some("info,rustls::msgs=warn")),
            "info,rustls::msgs=warn"
        );
        assert_eq!(
            log_directives(Some("info,tokio_rustls=debug")),
            "info,tokio_rustls=debug,rustls=error"
        );
        assert_eq!(log_directives(Some("gatehouse=[")), "info,rustls=error");
    }
}
