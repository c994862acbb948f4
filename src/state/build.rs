//! Config file → [`State`]: the one place that reads the certificates, keys, CAs, CRLs, rule
//! files and lists a config names. Start-up, `-t`, `rules explain` and every reload call
//! [`build`], which reports every error it finds, each with its file, key path and reason, and
//! builds nothing half: a state either is whole or is not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use boring::pkey::{PKey, Private};
use boring::x509::X509;
use http::HeaderName;
use log::warn;

use super::{AdminAccess, AdminSocket, Fixed, H2Limits, LoadedCert, Server, Socket, State, Watch};
use crate::cache;
use crate::config::{self, ConfigErrors, Report};
use crate::identity::{self, HeaderNames, HeaderPlan, Underscores};
use crate::limits;
use crate::logs;
use crate::origin::{self, Origin};
use crate::routes::{Access, Route, Routes};
use crate::rules::{Compiler, Phase, RuleSet};
use crate::shield::{self, Shield};
use crate::trust_store::{self, Crl, CrlScope, ExpiredCrl, TrustStore};
use crate::viewer_tls::{ListenerPolicy, Mode, ServerCert, TlsPolicy};

mod rule_files;

/// Reads the files a config names, relative to its directory; records each error with its key
/// and each file it read.
pub(super) struct Files {
    base: PathBuf,
    pub(super) report: Report,
    read: Vec<PathBuf>,
}

impl Files {
    fn new(config: &Path) -> Files {
        let base = config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Files {
            base,
            report: Report::new(config),
            read: vec![config.to_path_buf()],
        }
    }

    pub(super) fn error(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.report.error(key, reason);
    }

    /// A path from the config, relative to the config file's directory.
    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Notes a file (or directory) the state depends on, for the reload watch.
    pub(super) fn depends_on(&mut self, path: PathBuf) {
        if !self.read.contains(&path) {
            self.read.push(path);
        }
    }

    /// Reads a file named by `key`; records an error and returns `None` when it cannot.
    pub(super) fn read(&mut self, key: &str, p: &str) -> Option<Vec<u8>> {
        let path = self.path(p);
        self.depends_on(path.clone());
        match std::fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) => {
                self.error(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    /// A PEM chain (leaf first).
    fn chain(&mut self, key: &str, file: &str) -> Option<Vec<X509>> {
        let pem = self.read(key, file)?;
        match X509::stack_from_pem(&pem) {
            Ok(c) if !c.is_empty() => Some(c),
            Ok(_) => {
                self.error(key, format!("{file}: no PEM certificate in the file"));
                None
            }
            Err(e) => {
                self.error(key, format!("{file}: not a PEM certificate: {e}"));
                None
            }
        }
    }

    /// A PEM private key. The key's bytes never reach a message.
    fn private_key(&mut self, key: &str, file: &str) -> Option<PKey<Private>> {
        let pem = self.read(key, file)?;
        match PKey::private_key_from_pem(&pem) {
            Ok(k) => Some(k),
            Err(_) => {
                self.error(key, format!("{file}: not a PEM private key"));
                None
            }
        }
    }

    /// A certificate chain and the key that belongs to its leaf.
    fn cert_and_key(
        &mut self,
        prefix: &str,
        (ckey, cert): (&str, &str),
        (kkey, key): (&str, &str),
    ) -> Option<(Vec<X509>, PKey<Private>)> {
        let chain = self.chain(&format!("{prefix}.{ckey}"), cert);
        let pkey = self.private_key(&format!("{prefix}.{kkey}"), key);
        let (chain, pkey) = (chain?, pkey?);
        let matches = chain[0].public_key().map(|p| p.public_eq(&pkey)).unwrap_or(false);
        if !matches {
            self.error(
                format!("{prefix}.{kkey}"),
                format!("the private key does not match the certificate in {cert}"),
            );
            return None;
        }
        Some((chain, pkey))
    }
}

/// The CN of a certificate's subject, for names in metrics.
fn cn(cert: &X509) -> String {
    cert.subject_name()
        .entries_by_nid(boring::nid::Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn loaded(kind: &'static str, name: String, cert: &X509) -> LoadedCert {
    LoadedCert {
        kind,
        name,
        not_after: identity::not_after(cert).unwrap_or_default(),
    }
}

/// Loads and compiles a config file, reporting every error it finds.
pub fn build(path: &Path) -> Result<State, ConfigErrors> {
    build_watching(path).0
}

/// [`build`], and the files it read or tried to (what a reload watch should look at, even when
/// the build failed).
pub fn build_watching(path: &Path) -> (Result<State, ConfigErrors>, Vec<PathBuf>) {
    let mut f = Files::new(path);
    let state = match config::load(path) {
        Ok(file) => assemble(&mut f, &file),
        Err(e) => return (Err(e), f.read),
    };
    let files = f.read.clone();
    let report = std::mem::replace(&mut f.report, Report::new(path));
    (report.finish().map(|()| State { files: f.read, ..state }), files)
}

/// Every part of the state from `file`; errors go to `f`'s report.
fn assemble(f: &mut Files, file: &config::File) -> State {
    let mut certificates = Vec::new();
    let trust_stores: BTreeMap<String, Arc<TrustStore>> = file
        .trust_stores
        .iter()
        .filter_map(|(name, t)| {
            let store = trust_store(f, name, t, &mut certificates)?;
            Some((name.clone(), Arc::new(store)))
        })
        .collect();
    let headers = HeaderPlan::new(header_names(file));
    let (rules, lists) = match &file.rules {
        Some(r) => {
            let origins: Vec<&str> = file.origins.keys().map(String::as_str).collect();
            rule_files::load(f, r, &origins, &|h| headers.is_edge(h))
        }
        None => (RuleSet::empty(), Vec::new()),
    };
    let listeners = file
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| listener(f, i, l, &trust_stores, &mut certificates))
        .collect();
    let origins: BTreeMap<String, Arc<Origin>> = file
        .origins
        .iter()
        .filter_map(|(name, o)| Some((name.clone(), Arc::new(origin(f, name, o, &mut certificates)?))))
        .collect();
    let routes = file
        .routes
        .iter()
        .filter_map(|r| {
            let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
            Some(Route {
                label: Arc::from(format!("{}{}", host.as_deref().unwrap_or(""), r.path_prefix)),
                host,
                path_prefix: r.path_prefix.clone(),
                origin: origins.get(&r.origin)?.clone(),
                access: match r.access {
                    config::Access::Authenticated => Access::Authenticated,
                    config::Access::Any => Access::Any,
                },
                cache_ttl: r.cache.as_ref().map(|c| c.default_ttl_secs),
            })
        })
        .collect();
    let admin = file.admin.as_ref().map(|a| admin(f, a, &trust_stores, &mut certificates));
    let own: Vec<std::net::SocketAddr> = file
        .listeners
        .iter()
        .filter(|l| l.role == config::ListenerRole::Edges)
        .filter_map(|l| l.address.parse().ok())
        .collect();
    let shield = file.shield.as_ref().and_then(|s| shield(f, s, &own, &mut certificates)).map(Arc::new);
    let limits = limits(f, &file.limits, &rules);
    State {
        generation: 0,
        built_at: crate::rules::facts::unix_now(),
        listeners,
        trust_stores,
        routes: Routes::new(routes),
        origins,
        shield,
        headers,
        rules: Arc::new(rules),
        admin,
        limits,
        fixed: fixed(f, file),
        certificates,
        lists,
        files: Vec::new(),
    }
}

/// Where a config sends its logs, read before the rest is built (so that what the build logs
/// goes there too).
pub fn logging(path: &Path) -> Result<logs::Settings, ConfigErrors> {
    let file = config::load(path)?;
    Ok(logging_settings(&Files::new(path), &file))
}

fn logging_settings(f: &Files, file: &config::File) -> logs::Settings {
    logs::Settings {
        format: match file.logging.format {
            config::LogFormat::Json => logs::Format::Json,
            config::LogFormat::Text => logs::Format::Text,
        },
        output: match &file.logging.file {
            Some(p) => logs::Output::File(f.path(p)),
            None => logs::Output::Stdout,
        },
        level: file.logging.level.parse().unwrap_or(log::LevelFilter::Info),
        access: file.logging.access_log,
    }
}

fn fixed(f: &Files, file: &config::File) -> Fixed {
    let s = &file.server;
    Fixed {
        server: Server {
            threads: s.threads,
            grace_period_seconds: s.grace_period_seconds,
            graceful_shutdown_timeout_seconds: s.graceful_shutdown_timeout_seconds,
            pid_file: s.pid_file.clone(),
            upgrade_sock: s.upgrade_sock.clone(),
        },
        listeners: file
            .listeners
            .iter()
            .map(|l| Socket {
                address: l.address.clone(),
                http2: l.http2,
            })
            .collect(),
        h2: H2Limits {
            max_concurrent_streams: file.limits.h2_max_concurrent_streams,
            max_pending_reset_streams: file.limits.h2_max_pending_reset_streams,
        },
        admin: file.admin.as_ref().map(|a| AdminSocket {
            address: a.address.clone(),
            tls: a.mtls.is_some(),
        }),
        cache: file.cache.as_ref().map(|c| cache::Settings {
            max_bytes: c.max_bytes,
            max_object_bytes: c.max_object_bytes,
            filling_bytes: c.filling_bytes(),
            lock_timeout: Duration::from_secs(c.lock_timeout_secs),
            disk: c.disk.as_ref().map(|d| cache::disk::Settings {
                path: f.path(&d.path),
                max_bytes: d.max_bytes,
                max_object_bytes: d.object_limit(),
                min_free_bytes: d.min_free_bytes,
                io_threads: d.io_threads,
            }),
        }),
        logging: logging_settings(f, file),
        watch: Watch {
            enabled: file.reload.watch,
            interval: Duration::from_millis(file.reload.watch_interval_ms),
        },
    }
}

fn header_names(file: &config::File) -> HeaderNames {
    let (cfg, v) = (&file.identity_headers, &file.viewer_headers);
    // `config::load` has checked that every name is valid.
    let name = |n: &Option<String>| n.as_deref().and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok());
    HeaderNames {
        present: name(&cfg.present),
        subject: name(&cfg.subject),
        issuer: name(&cfg.issuer),
        serial: name(&cfg.serial_number),
        sha256: name(&cfg.sha256),
        validity: name(&cfg.validity),
        pem: name(&cfg.pem),
        san_uri: name(&cfg.san_uri),
        san_dns: name(&cfg.san_dns),
        rfc9440: cfg.rfc9440,
        address: name(&v.address),
        tls: name(&v.tls),
        http_version: name(&v.http_version),
        forwarded_for: name(&v.forwarded_for),
        forwarded_proto: name(&v.forwarded_proto),
        via: name(&v.via),
        ja4: name(&v.ja4),
        underscores: match file.headers_with_underscores {
            config::Underscores::Drop => Underscores::Drop,
            config::Underscores::Refuse => Underscores::Refuse,
            config::Underscores::Allow => Underscores::Allow,
        },
    }
}

/// One trust store; errors name `trust_stores.NAME.KEY`.
fn trust_store(f: &mut Files, name: &str, t: &config::TrustStore, certs: &mut Vec<LoadedCert>) -> Option<TrustStore> {
    let key = format!("trust_stores.{name}");
    let crl = (!t.crl_files.is_empty()).then_some((
        match t.crl_check {
            config::CrlCheck::Chain => CrlScope::Chain,
            config::CrlCheck::Leaf => CrlScope::Leaf,
        },
        match t.expired_crl {
            config::ExpiredCrl::Refuse => ExpiredCrl::Refuse,
            config::ExpiredCrl::Enforce => ExpiredCrl::Enforce,
        },
    ));
    let settings = trust_store::Settings {
        name: Arc::from(name),
        max_chain_depth: t.max_chain_depth,
        advertise_ca_names: t.advertise_ca_names,
        crl,
    };
    let mut builder = trust_store::Builder::new(settings);
    let mut ok = true;
    for (i, file) in t.ca_files.iter().enumerate() {
        let fkey = format!("{key}.ca_files[{i}]");
        let Some(chain) = f.chain(&fkey, file) else {
            ok = false;
            continue;
        };
        for c in &chain {
            match builder.add_ca(c) {
                Ok(None) => {}
                Ok(Some(warning)) => warn!("{fkey}: {file}: {warning}"),
                Err(e) => {
                    f.error(&fkey, format!("{file}: {e}"));
                    ok = false;
                }
            }
            certs.push(loaded("trust_store_ca", format!("{name}: {}", cn(c)), c));
        }
    }
    let now = crate::rules::facts::unix_now();
    for (i, file) in t.crl_files.iter().enumerate() {
        let fkey = format!("{key}.crl_files[{i}]");
        let Some(pem) = f.read(&fkey, file) else {
            ok = false;
            continue;
        };
        let crls = match Crl::from_pem(&pem) {
            Ok(c) => c,
            Err(e) => {
                f.error(&fkey, format!("{file}: {e}"));
                ok = false;
                continue;
            }
        };
        for crl in crls {
            if let Some(next) = crl.next_update.filter(|t| *t < now) {
                let then = match t.expired_crl {
                    config::ExpiredCrl::Refuse => "the handshakes it covers are refused",
                    config::ExpiredCrl::Enforce => "its revocations are still enforced (expired_crl: enforce)",
                };
                warn!(
                    "{fkey}: the CRL of {} expired at {}: {then}",
                    crl.issuer,
                    identity::iso8601(next)
                );
            }
            if let Err(e) = builder.add_crl(crl) {
                f.error(&fkey, format!("{file}: {e}"));
                ok = false;
            }
        }
    }
    ok.then(|| builder.build())
}

fn limits(f: &mut Files, l: &config::Limits, rules: &RuleSet) -> limits::Settings {
    let rate_key = l.rate_limit.as_ref().and_then(|r| r.key.as_deref()).and_then(|src| {
        Compiler::new(rules.lists().clone())
            .expression(src, Phase::Request)
            .map_err(|e| f.error("limits.rate_limit.key", e))
            .ok()
            .map(Arc::new)
    });
    limits::Settings {
        rate_key,
        handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
        header_timeout: Duration::from_millis(l.request_header_timeout_ms),
        idle_timeout: Duration::from_millis(l.keepalive_idle_timeout_ms),
        max_header_bytes: l.max_request_header_bytes,
        max_connections: l.max_connections,
        max_connections_per_ip: l.max_connections_per_ip,
        failed_handshakes: l.failed_handshakes_per_ip.as_ref().map(|f| limits::FailedHandshakes {
            max: f.max,
            window: Duration::from_secs(f.window_secs),
            delay: f.delay_ms.map(Duration::from_millis),
        }),
        rate: l.rate_limit.as_ref().map(|r| limits::Rate {
            per_second: r.requests_per_second,
            burst: f64::from(r.burst),
        }),
    }
}

/// Who may use the admin listener: its token (read from `token_file`, trimmed) and its TLS policy.
fn admin(
    f: &mut Files,
    a: &config::Admin,
    stores: &BTreeMap<String, Arc<TrustStore>>,
    certs: &mut Vec<LoadedCert>,
) -> AdminAccess {
    let token = a.token_file.as_ref().and_then(|file| {
        let raw = f.read("admin.token_file", file)?;
        match std::str::from_utf8(&raw).map(str::trim) {
            Ok(t) if t.len() >= 16 && t.bytes().all(|b| b.is_ascii_graphic()) => Some(t.to_string()),
            _ => {
                f.error(
                    "admin.token_file",
                    format!("{file}: the token must be at least 16 printable ASCII characters (no spaces)"),
                );
                None
            }
        }
    });
    let tls = a.mtls.as_ref().and_then(|m| {
        let cert = server_cert(f, "admin.mtls", &m.server_cert, &m.server_key)?;
        certs.push(loaded("admin", a.address.clone(), &cert.chain[0]));
        Some(Arc::new(TlsPolicy {
            sni_name: None,
            cert,
            mode: Mode::Required,
            trust_store: Some(stores.get(&m.trust_store)?.clone()),
        }))
    });
    AdminAccess { token, tls }
}

/// A server certificate and its key; errors name `prefix.server_cert|server_key`.
fn server_cert(f: &mut Files, prefix: &str, cert: &str, key: &str) -> Option<Arc<ServerCert>> {
    let (chain, pkey) = f.cert_and_key(prefix, ("server_cert", cert), ("server_key", key))?;
    Some(Arc::new(ServerCert::new(chain, pkey)))
}

fn mode(m: config::MtlsMode) -> Mode {
    match m {
        config::MtlsMode::Off => Mode::Off,
        config::MtlsMode::Optional => Mode::Optional,
        config::MtlsMode::Required => Mode::Required,
    }
}

/// A listener's policies; errors name `listeners[i]...`.
fn listener(
    f: &mut Files,
    index: usize,
    l: &config::Listener,
    stores: &BTreeMap<String, Arc<TrustStore>>,
    certs: &mut Vec<LoadedCert>,
) -> Option<Arc<ListenerPolicy>> {
    let key = format!("listeners[{index}]");
    let default_cert = server_cert(f, &key, &l.server_cert, &l.server_key);
    if let Some(c) = &default_cert {
        certs.push(loaded("server", l.address.clone(), &c.chain[0]));
    }
    let policy = |m: &config::Mtls, sni_name: Option<Arc<str>>, cert: Arc<ServerCert>| {
        let mode = mode(m.mode);
        Arc::new(TlsPolicy {
            sni_name,
            cert,
            mode,
            trust_store: m
                .trust_store
                .as_ref()
                .filter(|_| mode != Mode::Off)
                .and_then(|n| stores.get(n).cloned()),
        })
    };
    let mut by_sni = std::collections::HashMap::new();
    let mut sni_ok = true;
    for (j, s) in l.sni.iter().enumerate() {
        let cert = match (&s.server_cert, &s.server_key) {
            (Some(c), Some(k)) => {
                let cert = server_cert(f, &format!("{key}.sni[{j}]"), c, k);
                if let Some(c) = &cert {
                    let names = s.names.join(",");
                    certs.push(loaded("server", format!("{} {names}", l.address), &c.chain[0]));
                }
                cert
            }
            _ => default_cert.clone(),
        };
        let Some(cert) = cert else {
            sni_ok = false;
            continue;
        };
        let sni_name = s.names.first().map(|n| Arc::from(n.to_ascii_lowercase().as_str()));
        let p = policy(&s.mtls, sni_name, cert);
        for n in &s.names {
            by_sni.insert(n.to_ascii_lowercase(), p.clone());
        }
    }
    let default = policy(&l.mtls, None, default_cert?);
    sni_ok.then(|| {
        Arc::new(ListenerPolicy {
            name: Arc::from(l.address.as_str()),
            default,
            by_sni,
            for_edges: l.role == config::ListenerRole::Edges,
        })
    })
}

/// Whether a certificate may authenticate a TLS client: its EKU has clientAuth (or any).
fn has_client_auth_eku(cert: &X509) -> Result<bool, String> {
    let der = cert.to_der().map_err(|e| e.to_string())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    match parsed.extended_key_usage() {
        Ok(Some(eku)) => Ok(eku.value.client_auth || eku.value.any),
        Ok(None) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// What every peer connection needs (origins and shield nodes alike): the CAs that may issue the
/// peer's certificate, and the client certificate (clientAuth checked) with its key.
struct PeerTls {
    ca: Vec<X509>,
    client_chain: Vec<X509>,
    client_key: PKey<Private>,
}

/// Reads a peer's TLS files; errors name `KEY.ca_file`, `KEY.client_cert` and `KEY.client_key`.
/// `label` is the kinds and the name of its certificates in the expiry metric.
fn peer_tls(
    f: &mut Files,
    key: &str,
    (ca_file, client_cert, client_key): (&str, &str, &str),
    label: (&'static str, &'static str, &str),
    certs: &mut Vec<LoadedCert>,
) -> Option<PeerTls> {
    let ca = f.chain(&format!("{key}.ca_file"), ca_file);
    let client = f.cert_and_key(key, ("client_cert", client_cert), ("client_key", client_key));
    let (ca, (client_chain, client_key)) = (ca?, client?);
    let eku = match has_client_auth_eku(&client_chain[0]) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{client_cert}: the certificate has no clientAuth extended key usage, so peers will refuse it"
        )),
        Err(e) => Some(format!("{client_cert}: cannot read extensions: {e}")),
    };
    if let Some(reason) = eku {
        f.error(format!("{key}.client_cert"), reason);
        return None;
    }
    let (client_kind, ca_kind, name) = label;
    certs.push(loaded(client_kind, name.to_string(), &client_chain[0]));
    for c in &ca {
        certs.push(loaded(ca_kind, format!("{name}: {}", cn(c)), c));
    }
    Some(PeerTls {
        ca,
        client_chain,
        client_key,
    })
}

fn socket_addr(f: &mut Files, key: &str, address: &str) -> Option<std::net::SocketAddr> {
    address.parse().map_err(|e| f.error(key, format!("{e}"))).ok()
}

/// One origin; errors name `origins.NAME.KEY`.
fn origin(f: &mut Files, name: &str, o: &config::Origin, certs: &mut Vec<LoadedCert>) -> Option<Origin> {
    let key = format!("origins.{name}");
    let files = (o.ca_file.as_str(), o.client_cert.as_str(), o.client_key.as_str());
    let tls = peer_tls(f, &key, files, ("origin_client", "origin_ca", name), certs)?;
    let address = socket_addr(f, &format!("{key}.address"), &o.address)?;
    Some(Origin::new(origin::Settings {
        name: name.to_string(),
        address,
        sni: o.sni.clone(),
        ca: tls.ca,
        client_chain: tls.client_chain,
        client_key: tls.client_key,
        connect_timeout: Duration::from_secs(o.connect_timeout_secs),
        read_timeout: Duration::from_secs(o.read_timeout_secs),
        idle_timeout: Duration::from_secs(o.idle_timeout_secs),
    }))
}

/// The shield nodes, each a peer with the section's TLS settings; `own` are this node's
/// listeners for edges, to know itself among them. Errors name `shield.KEY`.
fn shield(
    f: &mut Files,
    s: &config::Shield,
    own: &[std::net::SocketAddr],
    certs: &mut Vec<LoadedCert>,
) -> Option<Shield> {
    let files = (s.ca_file.as_str(), s.client_cert.as_str(), s.client_key.as_str());
    let tls = peer_tls(f, "shield", files, ("shield_client", "shield_ca", "shield"), certs)?;
    let mut peers = Vec::with_capacity(s.nodes.len());
    for (i, n) in s.nodes.iter().enumerate() {
        let address = socket_addr(f, &format!("shield.nodes[{i}].address"), &n.address)?;
        peers.push(Arc::new(Origin::new(origin::Settings {
            name: n.name.clone(),
            address,
            sni: s.sni.clone(),
            ca: tls.ca.clone(),
            client_chain: tls.client_chain.clone(),
            client_key: tls.client_key.clone(),
            connect_timeout: Duration::from_secs(s.connect_timeout_secs),
            read_timeout: Duration::from_secs(s.read_timeout_secs),
            idle_timeout: Duration::from_secs(s.idle_timeout_secs),
        })));
    }
    let fallback = match s.fallback {
        config::ShieldFallback::Origin => shield::Fallback::Origin,
        config::ShieldFallback::None => shield::Fallback::None,
    };
    Some(Shield::new(peers, own, Duration::from_secs(s.down_secs), fallback))
}

/// The rules of a `rules:` section (YAML) in a config at `config`, and the errors, as strings:
/// for the rules' own tests.
#[cfg(test)]
pub(crate) fn rules_for_test(config: &Path, yaml: &str, origins: &[&str]) -> (RuleSet, Vec<String>) {
    let cfg: config::Rules = serde_yaml::from_str(yaml).expect("a rules section");
    let mut f = Files::new(config);
    let (set, _) = rule_files::load(&mut f, &cfg, origins, &|h| {
        h.as_str().starts_with("cloudfront-viewer-cert")
    });
    (set, f.report.errors.iter().map(ToString::to_string).collect())
}
