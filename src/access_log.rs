//! The access log: one line per request (and per L4 connection), written off the request
//! path.
//!
//! The request path only fills an [`AccessRecord`] and `try_send`s it into a bounded channel;
//! a writer task formats (JSON or text) and writes. When the channel is full the record is
//! dropped and counted in `gatehouse_access_log_dropped_total` — a slow disk never slows
//! citizens down. A file target is reopened on SIGUSR1 (logrotate's `postrotate`).

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget};
use prometheus::IntCounter;
use serde_json::json;
use std::borrow::Cow;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Records buffered between the request path and the writer.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// Everything one access-log line says.
#[derive(Debug, Clone, Default)]
pub struct AccessRecord {
    pub time: Option<SystemTime>,
    pub listener: Arc<str>,
    pub client: Option<SocketAddr>,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub backend: String,
    pub upstream_duration: Option<Duration>,
    pub request_id: String,
    pub route: String,
    pub tls_version: Option<&'static str>,
    pub sni: Option<Arc<str>>,
    /// The subject of the client's certificate (mTLS).
    pub client_cert: Option<Arc<str>>,
    /// `http` for requests, `tcp` for L4 connections.
    pub kind: &'static str,
    /// How an HTTP response's body ended (`None` for L4 connections).
    pub ended: Option<Ended>,
    /// Why gatehouse answered the request itself, or why no backend took an L4 connection:
    /// the refusal, or the backend's failure as it happened ("connect: Connection refused",
    /// "malformed response from backend: too many headers"). `None` when a backend answered
    /// — a status alone does not tell a 502 of a crashed backend from one of garbage.
    pub error: Option<Cow<'static, str>>,
}

/// How an HTTP response's body ended: a status alone does not tell a page that arrived whole
/// from one cut off by its backend or abandoned by its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Sent to its last byte.
    Complete,
    /// The backend closed, sent a malformed chunk or went silent inside the body
    /// (`gatehouse_backend_responses_aborted_total`).
    BackendAborted,
    /// The client went away (or its upload failed) before the last byte.
    ClientAborted,
}

impl Ended {
    /// The access log's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Complete => "complete",
            Ended::BackendAborted => "backend_aborted",
            Ended::ClientAborted => "client_aborted",
        }
    }
}

impl AccessRecord {
    fn json(&self) -> String {
        let time = self
            .time
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|t| crate::audit::rfc3339(t.as_secs(), t.subsec_millis()));
        json!({
            "time": time,
            "kind": self.kind,
            "listener": &*self.listener,
            "client": self.client.map(|c| c.to_string()),
            "method": self.method,
            "host": self.host,
            "path": self.path,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": (self.duration.as_secs_f64() * 1e6).round() / 1e3,
            "backend": self.backend,
            "upstream_duration_ms": self.upstream_duration.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
            "request_id": self.request_id,
            "route": self.route,
            "tls_version": self.tls_version,
            "sni": self.sni.as_deref(),
            "client_cert": self.client_cert.as_deref(),
            "ended": self.ended.map(Ended::as_str),
            "error": self.error.as_deref(),
        })
        .to_string()
    }

    fn text(&self) -> String {
        let time = self
            .time
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|t| crate::audit::rfc3339(t.as_secs(), t.subsec_millis()))
            .unwrap_or_default();
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        format!(
            "{time} {} {} \"{} {} {}\" {} {} {} {:.3}ms backend={} route={} id={} ended={} error={}",
            self.listener,
            self.client.map_or("-".to_string(), |c| c.to_string()),
            dash(&self.method),
            dash(&self.host),
            dash(&self.path),
            self.status,
            self.bytes_in,
            self.bytes_out,
            self.duration.as_secs_f64() * 1e3,
            dash(&self.backend),
            dash(&self.route),
            dash(&self.request_id),
            self.ended.map_or("-", Ended::as_str),
            self.error
                .as_deref()
                .map_or_else(|| "-".to_string(), |error| format!("{error:?}")),
        )
    }
}

/// The sending half, shared by the request path through the table.
#[derive(Debug)]
pub struct AccessLog {
    sender: Option<mpsc::Sender<AccessRecord>>,
    dropped: IntCounter,
    config: AccessLogConfig,
}

impl AccessLog {
    /// Starts the writer for `config` (nothing for `target: off`).
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> Arc<Self> {
        let sender = match &config.target {
            AccessLogTarget::Off => None,
            target => {
                let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
                let reopen = Arc::new(AtomicBool::new(false));
                spawn_reopen_on_sigusr1(reopen.clone());
                let (target, format) = (target.clone(), config.format);
                let spawned = std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(move || write_loop(receiver, target, format, &reopen));
                if let Err(error) = spawned {
                    tracing::error!(%error, "cannot start the access-log writer");
                }
                Some(sender)
            }
        };
        Arc::new(AccessLog {
            sender,
            dropped,
            config: config.clone(),
        })
    }

    /// The configuration this log was started for.
    pub fn config(&self) -> &AccessLogConfig {
        &self.config
    }

    /// Whether records are wanted at all (skip building them when off).
    pub fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues `record`; counts it as dropped when the writer is behind.
    pub fn log(&self, record: AccessRecord) {
        if let Some(sender) = &self.sender {
            if sender.try_send(record).is_err() {
                self.dropped.inc();
            }
        }
    }
}

enum Output {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(PathBuf, Option<std::io::BufWriter<std::fs::File>>),
}

impl Output {
    fn open(path: &PathBuf) -> Option<std::io::BufWriter<std::fs::File>> {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => Some(std::io::BufWriter::new(file)),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot open the access log");
                None
            }
        }
    }

    fn write(&mut self, line: &str) {
        let result = match self {
            Output::Stdout(out) => writeln!(out, "{line}"),
            Output::File(_, Some(out)) => writeln!(out, "{line}"),
            Output::File(_, None) => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "cannot write the access log");
        }
    }

    fn flush(&mut self) {
        let _ = match self {
            Output::Stdout(out) => out.flush(),
            Output::File(_, Some(out)) => out.flush(),
            Output::File(_, None) => Ok(()),
        };
    }

    fn reopen(&mut self) {
        if let Output::File(path, file) = self {
            if let Some(old) = file.as_mut() {
                let _ = old.flush();
            }
            *file = Output::open(path);
            tracing::info!(path = %path.display(), "access log reopened");
        }
    }
}

/// Sets `reopen` on SIGUSR1, for the writer to pick up before its next line.
fn spawn_reopen_on_sigusr1(reopen: Arc<AtomicBool>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut signals) = signal(SignalKind::user_defined1()) else {
            return;
        };
        while signals.recv().await.is_some() {
            reopen.store(true, Ordering::Release);
        }
    });
}

/// The writer thread: blocking I/O stays off the runtime, so a stuck disk stalls only this
/// thread and the request path just counts dropped lines.
fn write_loop(
    mut receiver: mpsc::Receiver<AccessRecord>,
    target: AccessLogTarget,
    format: AccessLogFormat,
    reopen: &AtomicBool,
) {
    let mut output = match target {
        AccessLogTarget::File(path) => {
            let file = Output::open(&path);
            Output::File(path, file)
        }
        _ => Output::Stdout(std::io::BufWriter::new(std::io::stdout())),
    };
    while let Some(record) = receiver.blocking_recv() {
        if reopen.swap(false, Ordering::AcqRel) {
            output.reopen();
        }
        output.write(&render(&record, format));
        while let Ok(record) = receiver.try_recv() {
            output.write(&render(&record, format));
        }
        output.flush();
    }
    output.flush();
}

fn render(record: &AccessRecord, format: AccessLogFormat) -> String {
    match format {
        AccessLogFormat::Json => record.json(),
        AccessLogFormat::Text => record.text(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error is the last field of both formats: JSON `null` or the text, text `error=-`
    /// or the text quoted (it may hold spaces and quotes).
    #[test]
    fn both_formats_carry_the_error() {
        let mut record = AccessRecord {
            listener: Arc::from("web"),
            status: 502,
            kind: "http",
            ended: Some(Ended::Complete),
            ..AccessRecord::default()
        };
        assert!(record.text().ends_with("ended=complete error=-"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&record.json()).unwrap()["error"],
            serde_json::Value::Null
        );
        record.error = Some(Cow::Borrowed("backend failed: connect: \"refused\""));
        assert!(
            record
                .text()
                .ends_with(r#"error="backend failed: connect: \"refused\"""#),
            "{}",
            record.text()
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&record.json()).unwrap()["error"],
            "backend failed: connect: \"refused\""
        );
    }
}
