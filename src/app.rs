//! Config → a running edge. Compiles every stage (trust stores, listener policies, origins,
//! routes, header plan) before anything listens, so that `-t` and start-up share one path and
//! a bad file never half-starts.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::ServiceWithDependents;

use crate::cache::SharedCache;
use crate::config::{self, ConfigErrors, Ctx};
use crate::identity::HeaderPlan;
use crate::origin;
use crate::proxy::{EdgeProxy, ProxyState, Route};
use crate::rules::{explain, RuleSet};
use crate::trust_store;
use crate::viewer_tls::{self, ListenerPolicy};
use crate::{admin, metrics};

/// A compiled edge, ready to run.
pub struct Edge {
    pub conf: config::Config,
    listeners: Vec<(Arc<str>, Arc<ArcSwap<ListenerPolicy>>, bool)>,
    state: Arc<ArcSwap<ProxyState>>,
}

/// Loads and compiles a config file, reporting every error it finds.
pub fn build(path: &Path) -> Result<Edge, ConfigErrors> {
    let conf = config::load(path)?;
    let mut ctx = Ctx::new(path);
    let stores = trust_store::build_all(&mut ctx, &conf.trust_stores);
    let headers = Arc::new(HeaderPlan::new(&conf.identity_headers));
    let rules = Arc::new(match &conf.rules {
        Some(r) => {
            let origin_names: Vec<&str> = conf.origins.keys().map(String::as_str).collect();
            RuleSet::load(&mut ctx, r, &origin_names, &|h| headers.is_identity(h))
        }
        None => RuleSet::empty(),
    });
    let mut listeners: Vec<(Arc<str>, Arc<ArcSwap<ListenerPolicy>>, bool)> = Vec::new();
    for (i, l) in conf.listeners.iter().enumerate() {
        if let Some(p) = viewer_tls::build_policy(&mut ctx, i, l, &stores, headers.clone(), rules.clone()) {
            listeners.push((
                Arc::from(l.address.as_str()),
                Arc::new(ArcSwap::from_pointee(p)),
                l.http2,
            ));
        }
    }
    let origins: std::collections::BTreeMap<_, _> = conf
        .origins
        .iter()
        .filter_map(|(name, o)| origin::build(&mut ctx, name, o).map(|o| (name.clone(), Arc::new(o))))
        .collect();
    let routes = conf
        .routes
        .iter()
        .filter_map(|r| {
            Some(Route {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.clone(),
                origin: origins.get(&r.origin)?.clone(),
                access: r.access,
                cache_ttl: r.cache.as_ref().map(|c| c.default_ttl_secs),
            })
        })
        .collect();
    ctx.finish()?;
    let state = ProxyState::new(
        routes,
        headers,
        listeners.iter().map(|(n, p, _)| (n.clone(), p.clone())).collect(),
        conf.cache.as_ref().map(|c| Arc::new(SharedCache::new(c))),
        rules,
        origins,
    );
    Ok(Edge {
        conf,
        listeners,
        state: Arc::new(ArcSwap::from_pointee(state)),
    })
}

impl Edge {
    /// `rules bench`: nanoseconds per request of the request-phase rules for `q`.
    pub fn bench_rules(&self, q: &explain::Query, iterations: u32) -> Result<(f64, f64), String> {
        explain::bench(&self.state.load().rules, q, iterations)
    }

    /// `rules explain`: the certificate and request `q` through the trust store of `listener`
    /// (default: the first) for the query's SNI, the rules and the routes.
    pub fn explain(&self, listener: Option<&str>, q: &explain::Query) -> Result<String, String> {
        let policy = match listener {
            Some(name) => self.listeners.iter().find(|(n, _, _)| &**n == name),
            None => self.listeners.first(),
        }
        .map(|(_, p, _)| p.load_full())
        .ok_or_else(|| format!("no listener {}", listener.unwrap_or("in the config")))?;
        let tls = policy.select(q.sni.as_deref());
        let state = self.state.load();
        let route = |host: &str, path: &str| {
            let r = state.route(Some(host), path);
            explain::Routing {
                route: r.map(|r| r.path_prefix.clone()),
                origin: r.map(|r| r.origin.name.to_string()),
            }
        };
        explain::explain(&state.rules, tls.trust_store.as_deref(), route, q)
    }

    fn server_conf(&self) -> ServerConf {
        let s = &self.conf.server;
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

    /// Runs the edge (plus `extra` services, e.g. the demo origin) until a shutdown signal.
    pub fn run(self, extra: Vec<Box<dyn ServiceWithDependents>>) -> pingora::Result<()> {
        metrics::init();
        let mut server = Server::new_with_opt_and_conf(None, self.server_conf());
        server.bootstrap();
        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            EdgeProxy {
                state: self.state.clone(),
            },
            "mtls-edge",
        );
        for (name, policy, http2) in &self.listeners {
            let settings = viewer_tls::tls_settings(name.clone(), policy.clone(), *http2)?;
            proxy.add_tls_with_settings(name, None, settings);
        }
        server.add_service(proxy);
        if let Some(a) = &self.conf.admin {
            server.add_service(admin::service(&a.address, self.state.load().cache.clone()));
        }
        for s in extra {
            server.add_boxed_service(s);
        }
        server.run(RunArgs::default());
        Ok(())
    }
}
