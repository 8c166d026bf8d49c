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
    },
    /// Validate a configuration without serving; exit 1 listing every problem.
    Check {
        /// The YAML configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
        Command::Check { config } => check(&config),
        Command::Run { config } => match config::load(&config) {
            Ok(config) => run(config, None),
            Err(error) => {
                eprintln!("{error}");
                eprintln!("gatehouse: refusing to start with an invalid configuration");
                ExitCode::FAILURE
            }
        },
        Command::Demo { config } => crate::demo::main(&config),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
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

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            println!("{}", config::summary(&config));
            ExitCode::SUCCESS
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

/// Runs gatehouse with `config` until SIGTERM/SIGINT, then drains. `before_serving` runs on
/// the runtime first (the demo starts its backends there).
pub fn run(config: Config, before_serving: Option<Box<dyn FnOnce() + Send>>) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
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
        let metrics = match Metrics::new() {
            Ok(metrics) => metrics,
            Err(error) => {
                eprintln!("gatehouse: cannot create metrics: {error}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!("{}", config::summary(&config));
        let gatehouse = match Gatehouse::start(config, metrics).await {
            Ok(gatehouse) => gatehouse,
            Err(error) => {
                eprintln!("gatehouse: {error}");
                return ExitCode::FAILURE;
            }
        };
        serve_until_signal(gatehouse).await
    })
}

#[cfg(unix)]
async fn serve_until_signal(gatehouse: Arc<Gatehouse>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hangup), Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("gatehouse: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    crate::watch::spawn(gatehouse.clone());
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let gatehouse = gatehouse.clone();
                tokio::spawn(async move {
                    let _ = reload::reload(&gatehouse, Source::Signal).await;
                });
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let timeout = gatehouse.shutdown_timeout();
    tracing::info!(
        ?timeout,
        "shutting down: no new connections; finishing in-flight requests"
    );
    if gatehouse.shutdown(timeout).await {
        tracing::info!("all connections finished; exiting");
    } else {
        tracing::warn!(
            ?timeout,
            "shutdown_timeout reached with connections still open; exiting"
        );
    }
    ExitCode::SUCCESS
}
