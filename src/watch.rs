//! Reload on file change: the configuration file and the files it names (TLS certificates,
//! keys and CA bundles, the admin token), so a renewed certificate is served, and a rotated
//! token required, without anyone reloading.
//!
//! Directories are watched rather than files because editors replace files by rename,
//! certbot re-points symlinks and Kubernetes swaps a `..data` symlink; events are filtered to
//! the watched files' names (and `..data`) so a log file in the same directory cannot cause a
//! reload storm. The debouncer merges a burst of writes (a certificate, then its key) into
//! one reload. After each reload it made (every change of the configuration file makes one,
//! whatever else reloaded it), the watched files are those the configuration in force names.

use crate::config::Config;
use crate::reload::{self, Source};
use crate::server::Gatehouse;
use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Quiet time after the last change before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What the watcher follows: the directories to watch, and the file names in them that
/// matter.
#[derive(Debug, Default, PartialEq, Eq)]
struct Watched {
    directories: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

impl Watched {
    /// The configuration file at `path` and the files `config` names.
    fn of(path: &Path, config: &Config) -> Self {
        let mut watched = Watched::default();
        watched.add(path);
        if let Some(token_file) = &config.admin.token_file {
            watched.add(token_file);
        }
        for listener in &config.listeners {
            if let Some(tls) = &listener.tls {
                for certificate in &tls.certificates {
                    watched.add(&certificate.cert_path);
                    watched.add(&certificate.key_path);
                }
                if let Some(client_ca) = &tls.client_ca {
                    watched.add(client_ca);
                }
            }
        }
        for pool in &config.pools {
            if let Some(ca) = pool.tls.as_ref().and_then(|tls| tls.ca.as_ref()) {
                watched.add(ca);
            }
        }
        watched
    }

    fn add(&mut self, file: &Path) {
        let Some(name) = file.file_name() else {
            return;
        };
        let directory = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        self.directories.insert(directory);
        self.names.insert(name.to_os_string());
    }

    /// Whether a change of `path` may change what a reload reads.
    fn covers(&self, path: &Path) -> bool {
        path.file_name().is_some_and(|name| {
            self.names.contains(name) || name.to_string_lossy().starts_with("..data")
        })
    }
}

/// Whether an event may have changed a file: not a mere opening or reading of it.
///
/// inotify reports every open, so without this a reload, which opens the files it watches,
/// would set off the next one, for ever. A write's close is kept: it is the moment a writer
/// has finished.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Starts watching `gatehouse.config_path` and the files its configuration names; logs (and
/// keeps serving) if watching fails.
pub fn spawn(gatehouse: Arc<Gatehouse>) {
    let path = gatehouse.config_path.clone();
    let watched = Arc::new(ArcSwap::from_pointee(Watched::default()));
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let filter = watched.clone();
    let handler = move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let watched = filter.load();
        let relevant = events
            .iter()
            .filter(|event| changes_content(&event.kind))
            .flat_map(|event| event.paths.iter())
            .any(|path| watched.covers(path));
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
    let mut follow = move |next: Watched| {
        let current = watched.load_full();
        if *current == next {
            return;
        }
        for directory in current.directories.difference(&next.directories) {
            let _ = debouncer.unwatch(directory);
        }
        for directory in next.directories.difference(&current.directories) {
            if let Err(error) = debouncer.watch(directory, RecursiveMode::NonRecursive) {
                tracing::warn!(%error, directory = %directory.display(), "cannot watch a directory of the configuration's files; reload with SIGHUP or the API after changing them");
            }
        }
        watched.store(Arc::new(next));
    };
    follow(Watched::of(
        &path,
        &gatehouse.publisher.table().load().config,
    ));
    tracing::info!(file = %path.display(), "watching the configuration file and the certificates and token file it names for changes");
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            while changes.try_recv().is_ok() {}
            let _ = reload::reload(&gatehouse, Source::File, "file watcher").await;
            follow(Watched::of(
                &path,
                &gatehouse.publisher.table().load().config,
            ));
        }
    });
}
