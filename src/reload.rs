//! Reload: build a new state from the files, exactly as start-up and `-t` do, and swap it in
//! only when all of it is valid; otherwise keep the running state, log every error with its file,
//! key and reason, and count it. Three triggers: SIGHUP, `POST /reload` on the admin listener,
//! and a watch on every file the state was built from.
//!
//! The watch looks at the files' metadata (device, inode, size, times) every
//! `reload.watch_interval_ms`, following symlinks: an editor's rename, a Kubernetes volume's
//! symlink swap and a write in place all show. A change is reloaded once the files have stayed
//! still for one more interval, so a burst of writes is one reload. Polling rather than inotify:
//! it sees through symlink swaps and works on every filesystem a volume may be, and fifty stats
//! four times a second cost nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::ConfigErrors;
use crate::metrics;
use crate::state::{self, Live, State};

/// What a file looked like: enough to see that it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The stamps of a state's files (`None`: missing).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Snapshot(Vec<(PathBuf, Option<Stamp>)>);

impl Snapshot {
    fn of(files: &[PathBuf]) -> Snapshot {
        Snapshot(
            files
                .iter()
                .map(|p| {
                    let stamp = std::fs::metadata(p).ok().map(|m| Stamp {
                        dev: m.dev(),
                        ino: m.ino(),
                        size: m.size(),
                        mtime: (m.mtime(), m.mtime_nsec()),
                        ctime: (m.ctime(), m.ctime_nsec()),
                    });
                    (p.clone(), stamp)
                })
                .collect(),
        )
    }

    fn files(&self) -> Vec<PathBuf> {
        self.0.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Whether a file both snapshots have looks different in `other`.
    fn differs_from(&self, other: &Snapshot) -> bool {
        self.0
            .iter()
            .any(|(p, s)| other.0.iter().any(|(q, t)| p == q && s != t))
    }
}

/// Builds and swaps states, one at a time.
pub struct Reloader {
    live: Arc<Live>,
    config: PathBuf,
    /// The files of the state in force as they were when it was built; the lock also keeps
    /// two reloads from running at once.
    watched: Mutex<Snapshot>,
}

impl Reloader {
    pub fn new(live: Arc<Live>, config: &Path) -> Reloader {
        let watched = Snapshot::of(&live.load().files);
        Reloader {
            live,
            config: config.to_path_buf(),
            watched: Mutex::new(watched),
        }
    }

    /// Builds a new state and puts it in force: its generation, or every error (the running
    /// state then stays). `trigger` names what asked for it, for the log and the metric.
    pub fn reload(&self, trigger: &'static str) -> Result<u64, ConfigErrors> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let before = Snapshot::of(&watched.files());
        let started = std::time::Instant::now();
        let (built, files) = state::build::build_watching(&self.config);
        // Files changed while the state was built are seen again by the next look.
        let after = Snapshot::of(&files);
        *watched = match before.differs_from(&after) {
            true => before,
            false => after,
        };
        let result = built.map(|state| self.install(state));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::RELOADS.with_label_values(&[trigger, outcome]).inc();
        match &result {
            Ok(generation) => info!(
                "reload ({trigger}): generation {generation} in force, built in {} ms",
                started.elapsed().as_millis()
            ),
            Err(errors) => {
                for e in &errors.0 {
                    error!(
                        "reload ({trigger}) refused, the running state stays: file={} key={} reason={}",
                        e.file.display(),
                        e.key,
                        e.reason
                    );
                }
            }
        }
        result
    }

    /// Keeps what only a restart changes as it runs, says what differs, and swaps.
    fn install(&self, mut new: State) -> u64 {
        let running = self.live.load_full();
        for key in running.fixed.changes(&new.fixed) {
            warn!("reload: {key} changed: that takes a restart or an upgrade (-u); the running value stays");
        }
        // A listener that is still bound keeps its old policy when the new config drops it.
        for l in &running.listeners {
            if new.listener(&l.name).is_none() {
                warn!(
                    "reload: listener {} is not in the config any more: it keeps its TLS policy until a restart",
                    l.name
                );
                new.listeners.push(l.clone());
            }
        }
        new.fixed = running.fixed.clone();
        self.live.install(new)
    }

    /// Whether a watched file looks different from when the state in force was built.
    fn changed(&self) -> Option<Snapshot> {
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let now = Snapshot::of(&watched.files());
        (now != *watched).then_some(now)
    }
}

/// Reloads off the async runtime: building reads files and parses certificates.
pub async fn reload_blocking(reloader: &Arc<Reloader>, trigger: &'static str) -> Result<u64, ConfigErrors> {
    let r = reloader.clone();
    match tokio::task::spawn_blocking(move || r.reload(trigger)).await {
        Ok(result) => result,
        Err(e) => Err(ConfigErrors(vec![crate::config::ConfigError {
            file: reloader.config.clone(),
            key: "(reload)".into(),
            reason: format!("the reload did not finish: {e}"),
        }])),
    }
}

/// The background service behind SIGHUP and the file watch.
pub struct Triggers {
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl BackgroundService for Triggers {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                error!("cannot listen for SIGHUP, reload by it is off: {e}");
                None
            }
        };
        let watch = self.reloader.live.load().fixed.watch.clone();
        let mut tick = tokio::time::interval(watch.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A change seen at the last look, waiting for the files to stay still.
        let mut settling: Option<Snapshot> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    settling = None;
                    let _ = reload_blocking(&self.reloader, "signal").await;
                }
                _ = tick.tick(), if watch.enabled => {
                    let Some(now) = self.reloader.changed() else {
                        settling = None;
                        continue;
                    };
                    if settling.as_ref() == Some(&now) {
                        settling = None;
                        let _ = reload_blocking(&self.reloader, "watch").await;
                    } else {
                        settling = Some(now);
                    }
                }
            }
        }
    }
}
