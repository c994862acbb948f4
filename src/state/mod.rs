//! The edge's runtime state: everything built from the config and the files it names (listener
//! TLS policies, trust stores, origins, routes, identity headers, rules and lists), replaced
//! whole on reload. [`Live`] holds the state in force; a handshake reads it when its ClientHello
//! arrives, a request when its header does. What only a restart can change is [`Fixed`].

pub mod build;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::cache;
use crate::identity::HeaderPlan;
use crate::logs;
use crate::metrics;
use crate::origin::Origin;
use crate::routes::Routes;
use crate::rules::RuleSet;
use crate::shield::Shield;
use crate::trust_store::TrustStore;
use crate::viewer_tls::{ListenerPolicy, TlsPolicy};

pub use build::build;

/// The process settings pingora reads once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// 0: one per core.
    pub threads: usize,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub pid_file: String,
    pub upgrade_sock: String,
}

/// A listening socket: its address and whether it offers HTTP/2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub address: String,
    pub http2: bool,
}

/// What each HTTP/2 connection is told at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Limits {
    pub max_concurrent_streams: u32,
    pub max_pending_reset_streams: usize,
}

/// The admin listener's socket: its address, and whether it speaks TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSocket {
    pub address: String,
    pub tls: bool,
}

/// Who may use the admin listener; a reload changes it (a token file rotation, a new operators'
/// trust store).
pub struct AdminAccess {
    /// The bearer token every request but `GET /healthz` must carry. Never logged.
    pub token: Option<String>,
    /// The TLS policy of an admin listener with operators' client certificates.
    pub tls: Option<Arc<TlsPolicy>>,
}

/// When the running edge reloads by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Reload when a file the state was built from changes.
    pub enabled: bool,
    pub interval: std::time::Duration,
}

/// What a reload cannot change: sockets, the cache's memory, the process and its logs. A reload
/// that changes any of it says so and keeps the running values; a restart or an upgrade (`-u`)
/// applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed {
    pub server: Server,
    pub listeners: Vec<Socket>,
    pub admin: Option<AdminSocket>,
    pub h2: H2Limits,
    pub cache: Option<cache::Settings>,
    pub logging: logs::Settings,
    pub watch: Watch,
}

impl Fixed {
    /// The config keys whose values differ in `other`.
    pub fn changes(&self, other: &Fixed) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut differ = |key, a: bool| {
            if a {
                out.push(key);
            }
        };
        differ("server", self.server != other.server);
        differ("listeners[].address and http2", self.listeners != other.listeners);
        differ("admin", self.admin != other.admin);
        differ("limits.h2_*", self.h2 != other.h2);
        differ("cache", self.cache != other.cache);
        differ("logging", self.logging != other.logging);
        differ("reload", self.watch != other.watch);
        out
    }
}

/// A certificate the state loaded, for the expiry metric.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// `server`, `origin_client`, `origin_ca`, `shield_client`, `shield_ca` or `trust_store_ca`.
    pub kind: &'static str,
    /// Its listener, origin or trust store, and its CN.
    pub name: String,
    pub not_after: i64,
}

/// A list the state loaded, for the list metrics.
#[derive(Debug, Clone)]
pub struct LoadedList {
    pub name: String,
    pub entries: usize,
    pub loaded_at: i64,
}

/// Everything built from the config and its files.
pub struct State {
    /// 1 at start, one more for each successful reload.
    pub generation: u64,
    /// When it was built (unix seconds).
    pub built_at: i64,
    pub listeners: Vec<Arc<ListenerPolicy>>,
    pub trust_stores: BTreeMap<String, Arc<TrustStore>>,
    pub routes: Routes,
    /// Origins by name, for rules that choose one.
    pub origins: BTreeMap<String, Arc<Origin>>,
    /// Where cache misses go before the origin, if anywhere.
    pub shield: Option<Arc<Shield>>,
    pub headers: HeaderPlan,
    pub rules: Arc<RuleSet>,
    pub admin: Option<AdminAccess>,
    pub limits: crate::limits::Settings,
    pub fixed: Fixed,
    pub certificates: Vec<LoadedCert>,
    pub lists: Vec<LoadedList>,
    /// Every file the state was built from (the config, certificates, keys, CRLs, the rules
    /// directory and its files, lists): what the reload watch looks at.
    pub files: Vec<PathBuf>,
}

impl State {
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerPolicy>> {
        self.listeners.iter().find(|l| &*l.name == name)
    }

    /// Whether a listener's clients are edges, which this node shields.
    pub fn for_edges(&self, listener: &str) -> bool {
        self.listener(listener).is_some_and(|l| l.for_edges)
    }

    /// The rules a listener's connections run: none for edges, which ran them for their devices.
    pub fn rules_for(&self, listener: &str) -> &Arc<RuleSet> {
        static NONE: std::sync::LazyLock<Arc<RuleSet>> = std::sync::LazyLock::new(|| Arc::new(RuleSet::empty()));
        match self.for_edges(listener) {
            true => &NONE,
            false => &self.rules,
        }
    }

    fn lifecycle(&self) -> metrics::Lifecycle<'_> {
        metrics::Lifecycle {
            certificates: self
                .certificates
                .iter()
                .map(|c| (c.kind, c.name.clone(), c.not_after))
                .collect(),
            crls: self
                .trust_stores
                .iter()
                .flat_map(|(name, s)| {
                    s.crls
                        .iter()
                        .map(move |c| (name.as_str(), c.issuer.as_str(), c.this_update, c.next_update))
                })
                .collect(),
            lists: self
                .lists
                .iter()
                .map(|l| (l.name.as_str(), l.entries, l.loaded_at))
                .collect(),
        }
    }
}

/// The state in force.
pub struct Live {
    current: ArcSwap<State>,
}

impl Live {
    /// The first state, generation 1.
    pub fn new(mut state: State) -> Live {
        state.generation = 1;
        metrics::set_lifecycle(&state.lifecycle(), state.generation, state.built_at);
        Live {
            current: ArcSwap::from_pointee(state),
        }
    }

    pub fn load(&self) -> Guard<Arc<State>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Puts `state` in force as the next generation (one caller at a time: the reloader).
    /// Handshakes and requests that already read the old state finish with it.
    pub fn install(&self, mut state: State) -> u64 {
        state.generation = self.current.load().generation + 1;
        let generation = state.generation;
        metrics::set_lifecycle(&state.lifecycle(), generation, state.built_at);
        self.current.store(Arc::new(state));
        generation
    }
}
