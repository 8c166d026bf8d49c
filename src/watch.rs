//! Reload on file change: watch the config file's directory and reload after a quiet period.
//!
//! The directory is watched rather than the file because editors replace files by rename and
//! Kubernetes swaps a `..data` symlink; events are filtered to the config file (and `..data`)
//! so a log file in the same directory cannot cause a reload storm. The debouncer merges a
//! burst of writes into one reload.

use crate::reload::{self, Source};
use crate::server::Gatehouse;
use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Quiet time after the last change before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts watching `gatehouse.config_path`; logs (and keeps serving) if watching fails.
pub fn spawn(gatehouse: Arc<Gatehouse>) {
    let path = gatehouse.config_path.clone();
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let Some(file_name) = path.file_name().map(OsString::from) else {
        return;
    };
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handler = move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let relevant = events
            .iter()
            .flat_map(|event| event.paths.iter())
            .any(|path| {
                path.file_name().is_some_and(|name| {
                    name == file_name.as_os_str() || name.to_string_lossy().starts_with("..data")
                })
            });
        if relevant {
            let _ = changed.send(());
        }
    };
    let mut debouncer = match new_debouncer(DEBOUNCE, None, handler) {
        Ok(debouncer) => debouncer,
        Err(error) => {
            tracing::warn!(%error, "cannot watch the configuration file; reload with SIGHUP or the API");
            return;
        }
    };
    if let Err(error) = debouncer.watch(&directory, RecursiveMode::NonRecursive) {
        tracing::warn!(%error, directory = %directory.display(), "cannot watch the configuration directory; reload with SIGHUP or the API");
        return;
    }
    tracing::info!(file = %path.display(), "watching the configuration file for changes");
    tokio::spawn(async move {
        let _debouncer = debouncer;
        while changes.recv().await.is_some() {
            while changes.try_recv().is_ok() {}
            let _ = reload::reload(&gatehouse, Source::File, "file watcher").await;
        }
    });
}
