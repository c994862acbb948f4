//! Zero-downtime upgrade and the other process signals. A new process started with `-u` waits on
//! `server.upgrade_sock`; SIGQUIT to the running one hands it the listening sockets (pingora's
//! flow), after which the old process drains. pingora 0.9 shuts the old process down on SIGQUIT
//! even when no process takes the sockets, which would leave no one listening: here SIGQUIT is
//! obeyed only when a process is listening on the upgrade socket, and otherwise logged and
//! ignored. SIGTERM drains for `server.grace_period_seconds`; SIGINT stops at once. How the
//! connections waiting for a request drain is [`crate::serve`]'s.

use async_trait::async_trait;
use log::error;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::metrics;

pub struct Signals {
    /// The upgrade socket's path, as configured (and as the new process binds it).
    pub upgrade_sock: String,
}

/// Whether a process is listening on the unix socket `path`, from `/proc/net/unix` (its lines:
/// `Num RefCount Protocol Flags Type St Inode Path`; flags 00010000 is a listening socket). The
/// socket itself is not touched: the waiting process accepts one connection only, the old one's.
pub fn listening(path: &str) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, _, _, flags, _, _, _, p, ..] if *flags == "00010000" && *p == path)
    })
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot listen for SIGQUIT, SIGTERM and SIGINT: stopping");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    if listening(&self.upgrade_sock) {
                        metrics::UPGRADES.with_label_values(&["handed_over"]).inc();
                        return ShutdownSignal::GracefulUpgrade;
                    }
                    metrics::UPGRADES.with_label_values(&["no_new_process"]).inc();
                    error!(
                        "SIGQUIT ignored: no process is listening on {} to take the sockets (start one with `mtls-edge -u -c FILE` first); still serving",
                        self.upgrade_sock
                    );
                }
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}
