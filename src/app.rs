//! A built state → a running edge: pingora's server with the proxy on every listener, the admin
//! listener, the reload triggers and the upgrade-aware signals. Also the commands that read a
//! built state without running it (`rules explain`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;

use crate::cache::SharedCache;
use crate::config::ConfigErrors;
use crate::proxy::EdgeProxy;
use crate::reload::{Reloader, Triggers};
use crate::rules::{explain, RuleSet};
use crate::state::{self, Live};
use crate::serve::ViewerApp;
use crate::upgrade::Signals;
use crate::viewer_tls::{self, HandshakeState};
use crate::limits::{self, Guard};
use crate::{admin, logs, metrics};

/// The read buffer in front of BoringSSL on each viewer connection. pingora's default, 64 KiB
/// zeroed for the connection's whole life, was most of the memory of a parked connection
/// (load/connections.sh: 112 KiB per connection, 45 KiB with this). Devices send small requests,
/// which fit; BoringSSL reads larger records past the buffer.
const VIEWER_READ_BUFFER: usize = 1024;

/// How long a draining edge still reads a request on connections waiting for one: a device that
/// has just connected, or an idle keep-alive connection, gets its next request answered.
const DRAIN_LINGER: Duration = Duration::from_secs(2);

/// A built edge, ready to run.
pub struct Edge {
    live: Arc<Live>,
    config: PathBuf,
}

/// Builds the state from a config file, reporting every error it finds.
pub fn build(path: &Path) -> Result<Edge, ConfigErrors> {
    Ok(Edge {
        live: Arc::new(Live::new(state::build(path)?)),
        config: path.to_path_buf(),
    })
}

impl Edge {
    /// `rules bench`: nanoseconds per request of the request-phase rules for `q`.
    pub fn bench_rules(&self, q: &explain::Query, iterations: u32) -> Result<(f64, f64), String> {
        explain::bench(&self.live.load().rules, q, iterations)
    }

    /// `rules explain`: the certificate and request `q` through the trust store of `listener`
    /// (default: the first) for the query's SNI, the rules and the routes.
    pub fn explain(&self, listener: Option<&str>, q: &explain::Query) -> Result<String, String> {
        let state = self.live.load();
        let policy = match listener {
            Some(name) => state.listener(name),
            None => state.listeners.first(),
        }
        .ok_or_else(|| format!("no listener {}", listener.unwrap_or("in the config")))?;
        let tls = policy.select(q.sni.as_deref());
        let route = |host: &str, path: &str| {
            let r = state.routes.find(Some(host), path);
            explain::Routing {
                route: r.map(|r| r.path_prefix.clone()),
                origin: r.map(|r| r.origin.name.to_string()),
            }
        };
        explain::explain(&state.rules, tls.trust_store.as_deref(), route, q)
    }

    fn server_conf(&self) -> ServerConf {
        let s = &self.live.load().fixed.server;
        let threads = if s.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            s.threads
        };
        ServerConf {
            threads,
            grace_period_seconds: Some(s.grace_period_seconds),
            graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
            pid_file: s.pid_file.clone(),
            upgrade_sock: s.upgrade_sock.clone(),
            ..ServerConf::default()
        }
    }

    /// Runs the edge (plus `extra` services, e.g. the demo origin) until a shutdown signal. With
    /// `upgrade`, the listening sockets are taken from the running edge (see `upgrade`).
    pub fn run(self, upgrade: bool, extra: Vec<Box<dyn ServiceWithDependents>>) -> Result<(), String> {
        let state = self.live.load_full();
        let fixed = &state.fixed;
        logs::configure(&fixed.logging)?;
        metrics::init();
        let opt = Opt {
            upgrade,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(Some(opt), self.server_conf());
        server.bootstrap();
        let cache = fixed.cache.as_ref().map(SharedCache::new).transpose()?.map(Arc::new);
        let guard = Guard::new(self.live.clone());
        let edge = EdgeProxy {
            live: self.live.clone(),
            limits: guard.clone(),
            cache: cache.clone(),
        };
        let grace = Duration::from_secs(fixed.server.grace_period_seconds);
        let mut http = pingora::proxy::http_proxy(&server.configuration, edge);
        // pingora's defaults (a 64 KiB header list), with the configured stream limits.
        let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
        h2.max_concurrent_streams(fixed.h2.max_concurrent_streams)
            .max_pending_accept_reset_streams(fixed.h2.max_pending_reset_streams);
        http.h2_options = Some(h2);
        let hits = cache.clone().map(|cache| crate::hit::Hits {
            live: self.live.clone(),
            cache,
        });
        let viewers = ViewerApp::new(Arc::new(http), DRAIN_LINGER.min(grace), guard.clone(), hits);
        let mut proxy = Service::new("mtls-edge".to_string(), viewers);
        proxy.endpoints().set_pre_tls_callback(Arc::new(limits::Admission(guard.clone())));
        let live = self.live.clone();
        let current: viewer_tls::Current = Arc::new(move |listener: &str, sni: Option<&str>| {
            let s = live.load();
            let policy = s.listener(listener)?.select(sni).clone();
            Some(HandshakeState {
                policy,
                rules: s.rules_for(listener).clone(),
                generation: s.generation,
            })
        });
        for socket in &fixed.listeners {
            let settings = viewer_tls::tls_settings(Arc::from(socket.address.as_str()), current.clone(), socket.http2)
                .map_err(|e| format!("listener {}: {e}", socket.address))?;
            proxy.add_listener(
                ListenerConfig::tcp(socket.address.as_str())
                    .tls(settings)
                    .l4_buffer(L4BufferSettings::new(VIEWER_READ_BUFFER, 1460)),
            );
        }
        server.add_service(proxy);
        let reloader = Arc::new(Reloader::new(self.live.clone(), &self.config));
        if let Some(socket) = &fixed.admin {
            let tls = if socket.tls {
                let live = self.live.clone();
                // Operators' certificates, verified as viewers' are, against the live state.
                let current: viewer_tls::Current = Arc::new(move |_: &str, _: Option<&str>| {
                    let s = live.load();
                    Some(HandshakeState {
                        policy: s.admin.as_ref()?.tls.clone()?,
                        rules: Arc::new(RuleSet::empty()),
                        generation: s.generation,
                    })
                });
                let name = Arc::from(format!("admin {}", socket.address));
                Some(viewer_tls::tls_settings(name, current, false).map_err(|e| format!("admin listener: {e}"))?)
            } else {
                None
            };
            let viewers = fixed.listeners.iter().map(|l| l.address.clone()).collect();
            server.add_service(admin::service(
                &socket.address,
                tls,
                cache,
                reloader.clone(),
                self.live.clone(),
                viewers,
            ));
        }
        server.add_service(background_service("reload", Triggers { reloader }));
        server.add_service(background_service("limits", limits::Watchdog(guard)));
        for s in extra {
            server.add_boxed_service(s);
        }
        let signals = Signals {
            upgrade_sock: fixed.server.upgrade_sock.clone(),
        };
        server.run(RunArgs {
            shutdown_signal: Box::new(signals),
        });
        logs::flush();
        Ok(())
    }
}
