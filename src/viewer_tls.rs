//! Viewer TLS: the listener's BoringSSL settings and each handshake. A handshake reads the policy
//! current when its ClientHello arrives (server certificate, mode, trust store, chosen by SNI)
//! and the connection rules of that state, verifies the client chain, counts and logs every
//! refusal with its reason, and hands the proxy an `admission::Connection`.
//!
//! Session resumption is off (no tickets, no session cache): every connection verifies its
//! chain, dates and CRLs afresh, so a revoked or expired certificate can never ride a ticket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use boring::pkey::{PKey, Private};
use boring::ssl::{
    NameType, Ssl, SslAlert, SslInfoCallbackMode, SslInfoCallbackValue, SslOptions, SslRef, SslSessionCacheMode,
    SslVerifyError, SslVerifyMode, SslVersion,
};
use boring::stack::Stack;
use boring::x509::{X509Name, X509};
use log::warn;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::tls::ext;

use crate::admission::{self, Connection, Verdict};
use crate::identity::{ConnectionIdentity, ConnectionInfo, ViewerCert};
use crate::reason::{Refusal, Refused};
use crate::rules::{Phase, RuleSet};
use crate::trust_store::{self, TrustStore};
use crate::{fingerprint, logs, metrics};

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No client certificate is requested.
    Off,
    /// A client may send no certificate; one that it sends must verify.
    Optional,
    /// A verified client certificate is required to complete the handshake.
    Required,
}

/// A server certificate chain (leaf first) and its key.
pub struct ServerCert {
    pub chain: Vec<X509>,
    key: PKey<Private>,
}

impl ServerCert {
    /// `chain` must not be empty, and `key` must be the leaf's.
    pub fn new(chain: Vec<X509>, key: PKey<Private>) -> ServerCert {
        ServerCert { chain, key }
    }
}

/// The mTLS policy for one SNI name (or a listener's default).
pub struct TlsPolicy {
    /// First configured SNI name of this policy; `None` for the listener default.
    pub sni_name: Option<Arc<str>>,
    pub cert: Arc<ServerCert>,
    pub mode: Mode,
    /// `Some` unless the mode is off.
    pub trust_store: Option<Arc<TrustStore>>,
}

/// A listener's policies: its default and one per SNI name.
pub struct ListenerPolicy {
    /// The listener's address, as configured.
    pub name: Arc<str>,
    pub default: Arc<TlsPolicy>,
    /// Lowercased SNI name → policy.
    pub by_sni: HashMap<String, Arc<TlsPolicy>>,
    /// Edges (this node is their shield): no rules or limits, their identity headers kept.
    pub for_edges: bool,
}

impl ListenerPolicy {
    pub fn select(&self, sni: Option<&str>) -> &Arc<TlsPolicy> {
        sni.and_then(|s| self.by_sni.get(s)).unwrap_or(&self.default)
    }
}

/// What one handshake reads from the state current when its ClientHello arrives.
#[derive(Clone)]
pub struct HandshakeState {
    pub policy: Arc<TlsPolicy>,
    pub rules: Arc<RuleSet>,
    pub generation: u64,
}

/// The current handshake state for a listener and SNI (the live state, in the edge).
pub type Current = Arc<dyn Fn(&str, Option<&str>) -> Option<HandshakeState> + Send + Sync>;

/// The TLS settings for a listener whose handshakes follow `current`.
pub fn tls_settings(listener: Arc<str>, current: Current, http2: bool) -> pingora::Result<TlsSettings> {
    let mut settings = TlsSettings::with_callbacks(Box::new(ViewerTls { listener, current }))?;
    // Resumption would skip chain verification: see the module docs.
    settings.set_options(SslOptions::NO_TICKET);
    settings.set_session_cache_mode(SslSessionCacheMode::OFF);
    settings
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| pingora::Error::because(pingora::ErrorType::InternalError, "TLS 1.2 minimum", e))?;
    if http2 {
        settings.enable_h2();
    }
    settings.set_select_certificate_callback(|mut hello| {
        if let (Some(i), Some(f)) = (ja4_index(), fingerprint::ja4(hello.as_bytes())) {
            hello.ssl_mut().set_ex_data(i, f);
        }
        Ok(())
    });
    settings.set_info_callback(|ssl, mode, value| {
        if let (SslInfoCallbackMode::WRITE_ALERT, SslInfoCallbackValue::Alert(alert)) = (mode, value) {
            if let Some(record) = record_index().and_then(|i| ssl.ex_data(i)) {
                record.lock().alert.get_or_insert(alert.alert());
            }
        }
    });
    Ok(settings)
}

/// Per-connection handshake record, kept in the SSL's ex_data so that its drop (when the SSL
/// is freed) can count handshakes that failed without reaching a verify callback.
struct HandshakeRecord {
    listener: Arc<str>,
    mode: Mode,
    sni: Option<String>,
    started: Instant,
    /// The state the handshake runs under, taken when it completes: a connection does not keep
    /// the state it was accepted under (a reload's old lists and stores are freed).
    during: Mutex<Option<HandshakeState>>,
    state: Mutex<RecordState>,
}

#[derive(Default)]
struct RecordState {
    verify_ran: bool,
    refused: Option<Refused>,
    /// A connection rule allowed the client in the handshake: the rules after it do not run.
    allowed: bool,
    /// The client's certificate, when the refusal concerns a certificate that verified.
    cert: Option<ViewerCert>,
    /// The fatal alert the edge sent, if any (from the info callback).
    alert: Option<SslAlert>,
    /// The handshake completed; its count waits for the connection rules after it.
    completed: bool,
    /// The handshake's outcome has been counted (accepted, or refused after completing).
    counted: bool,
}

impl HandshakeRecord {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecordState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn during(&self) -> Option<HandshakeState> {
        self.during.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refuse(&self, refused: Refused) {
        self.lock().refused.get_or_insert(refused);
    }

    fn count_refusal(&self, r: &Refused, cert: Option<&ViewerCert>, client_ip: Option<&str>) {
        metrics::HANDSHAKES
            .with_label_values(&[&self.listener, "refused", r.reason.as_str()])
            .inc();
        metrics::HANDSHAKE_SECONDS
            .with_label_values(&[&self.listener, "refused"])
            .observe(self.started.elapsed().as_secs_f64());
        logs::connection(&logs::ConnectionEvent {
            event: "refused",
            listener: &self.listener,
            sni: self.sni.as_deref(),
            client_ip,
            reason: r.reason,
            detail: &r.detail,
            cert,
            tls_version: None,
        });
    }

    fn count_accepted(&self) {
        metrics::HANDSHAKES
            .with_label_values(&[&self.listener, "accepted", "Ok"])
            .inc();
        metrics::HANDSHAKE_SECONDS
            .with_label_values(&[&self.listener, "accepted"])
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Counts the outcome of a completed handshake now, instead of when the SSL is freed.
    fn count_completed(&self, refusal: Option<&Refused>, cert: Option<&ViewerCert>, client_ip: Option<&str>) {
        self.lock().counted = true;
        match refusal {
            Some(r) => self.count_refusal(r, cert, client_ip),
            None => self.count_accepted(),
        }
    }
}

impl Drop for HandshakeRecord {
    fn drop(&mut self) {
        let Ok(s) = self.state.get_mut() else { return };
        if s.counted {
            return;
        }
        if s.completed {
            // The connection closed before a request ran the rules after the handshake.
            self.count_accepted();
            return;
        }
        // Refusals the verify callback did not see are told apart by the alert the edge sent.
        let refused = match (s.refused.take(), s.alert) {
            (Some(r), _) => r,
            (None, Some(SslAlert::CERTIFICATE_REQUIRED)) => {
                Refused::new(Refusal::ClientCertMissing, "no client certificate")
            }
            // TLS 1.2 has no certificate_required alert: an empty Certificate gets handshake_failure.
            (None, Some(SslAlert::HANDSHAKE_FAILURE)) if !s.verify_ran && self.mode == Mode::Required => {
                Refused::new(Refusal::ClientCertMissing, "no client certificate")
            }
            (None, Some(alert)) => Refused::new(Refusal::HandshakeFailed, format!("alert {alert:?} sent")),
            (None, None) => Refused::new(
                Refusal::HandshakeAborted,
                "the client closed the connection during the handshake",
            ),
        };
        let cert = s.cert.take();
        self.count_refusal(&refused, cert.as_ref(), None);
    }
}

/// The client's JA4 fingerprint, from its ClientHello.
fn ja4_index() -> Option<boring::ex_data::Index<Ssl, String>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<Ssl, String>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

fn record_index() -> Option<boring::ex_data::Index<Ssl, Arc<HandshakeRecord>>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<Ssl, Arc<HandshakeRecord>>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

fn connection_info(ssl: &SslRef, sni: Option<&str>) -> ConnectionInfo {
    ConnectionInfo {
        sni: sni.unwrap_or_default().to_string(),
        tls_version: ssl.version_str().to_string(),
        alpn: ssl
            .selected_alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default(),
        cipher: ssl.current_cipher().map(|c| c.name().to_string()).unwrap_or_default(),
        resumed: ssl.session_reused(),
        ja4: ja4_index().and_then(|i| ssl.ex_data(i)).cloned().unwrap_or_default(),
    }
}

struct ViewerTls {
    listener: Arc<str>,
    current: Current,
}

impl ViewerTls {
    fn apply(&self, ssl: &mut SslRef) -> Result<(), String> {
        let sni = ssl.servername(NameType::HOST_NAME).map(str::to_ascii_lowercase);
        let hs = (self.current)(&self.listener, sni.as_deref()).ok_or("no policy for this listener")?;
        let policy = hs.policy.clone();

        let (leaf, rest) = policy.cert.chain.split_first().ok_or("no server certificate")?;
        ext::ssl_use_certificate(ssl, leaf).map_err(|e| format!("server certificate: {e}"))?;
        ext::ssl_use_private_key(ssl, &policy.cert.key).map_err(|e| format!("server key: {e}"))?;
        for c in rest {
            ext::ssl_add_chain_cert(ssl, c).map_err(|e| format!("server chain: {e}"))?;
        }

        let record = Arc::new(HandshakeRecord {
            listener: self.listener.clone(),
            mode: policy.mode,
            sni,
            started: Instant::now(),
            during: Mutex::new(Some(hs)),
            state: Mutex::default(),
        });
        ssl.set_ex_data(
            record_index().ok_or("cannot allocate an SSL ex_data index")?,
            record.clone(),
        );

        let mode = match policy.mode {
            Mode::Off => {
                ssl.set_verify(SslVerifyMode::NONE);
                return Ok(());
            }
            Mode::Optional => SslVerifyMode::PEER,
            Mode::Required => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        };
        let store = policy
            .trust_store
            .clone()
            .ok_or_else(|| "mTLS policy without a trust store".to_string())?;
        if let Some(names) = &store.ca_names {
            let mut stack = Stack::new().map_err(|e| e.to_string())?;
            for n in names {
                stack
                    .push(X509Name::from_der(n).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
            ssl.set_client_ca_list(stack);
        }
        // The chain is decided by the edge's verifier, not BoringSSL's: see `trust_store`. The
        // callback lives as long as the connection, so it holds the store weakly: the handshake's
        // state holds it until the handshake ends, and a reload's old CRLs are then freed.
        let store = Arc::downgrade(&store);
        ssl.set_custom_verify_callback(mode, move |ssl| {
            let verified = match store.upgrade() {
                Some(store) => verify(&record, &store, ssl),
                None => Err(Refused::new(Refusal::ClientCertInvalid, "the trust store is gone")),
            };
            verified.map_err(|r| {
                let alert = trust_store::alert(r.reason);
                record.refuse(r);
                SslVerifyError::Invalid(alert)
            })
        });
        Ok(())
    }
}

/// Decides on the client's chain, then runs the connection-phase rules on it.
fn verify(record: &HandshakeRecord, store: &TrustStore, ssl: &mut SslRef) -> Result<(), Refused> {
    record.lock().verify_ran = true;
    let chain = peer_chain(ssl);
    // Read only when a refusal names it or rules see it: most handshakes need neither.
    let cert = || chain.first().and_then(|leaf| ViewerCert::from_x509(leaf));
    if let Err(r) = store.verify_chain(&chain, crate::rules::facts::unix_now()) {
        record.lock().cert = cert();
        return Err(r);
    }
    let Some(hs) = record.during() else {
        return Err(Refused::new(Refusal::ClientCertInvalid, "the handshake has no state"));
    };
    // The chain has verified: the connection-phase rules decide.
    if !hs.rules.has_phase(Phase::Connection) {
        return Ok(());
    }
    let Some(cert) = cert() else {
        // Rules must not see a verified client as one without a certificate.
        return Err(Refused::new(
            Refusal::ConnectionRuleError,
            "the certificate cannot be read for rules",
        ));
    };
    let info = connection_info(ssl, record.sni.as_deref());
    match admission::connection_rules(&hs.rules, &[Phase::Connection], Some(&cert), &info, "") {
        Verdict::Refused(r) => {
            record.lock().cert = Some(cert);
            Err(r)
        }
        Verdict::Allowed => {
            record.lock().allowed = true;
            Ok(())
        }
        Verdict::Open => Ok(()),
    }
}

/// The peer's chain as it sent it, leaf first (BoringSSL's server-side chain excludes the leaf).
fn peer_chain(ssl: &SslRef) -> Vec<X509> {
    let Some(leaf) = ssl.peer_certificate() else {
        return Vec::new();
    };
    let leaf_der = leaf.to_der().ok();
    let rest = ssl.peer_cert_chain().into_iter().flat_map(|c| c.iter());
    let rest: Vec<X509> = rest
        .filter(|c| c.to_der().ok() != leaf_der)
        .map(|c| c.to_owned())
        .collect();
    std::iter::once(leaf).chain(rest).collect()
}

#[async_trait]
impl TlsAccept for ViewerTls {
    /// Runs after the ClientHello: picks the policy by SNI and arms verification.
    async fn certificate_callback(&self, ssl: &mut SslRef) {
        if let Err(e) = self.apply(ssl) {
            // This hook cannot abort; without a certificate the handshake fails closed.
            warn!("listener={} cannot set up the handshake: {e}", self.listener);
            ssl.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
    }

    /// Runs once the handshake succeeded: records it and extracts the identity. Connection
    /// rules for a client without a certificate run here (no verify step ran for it); a deny
    /// is counted as a refused handshake and the first request closes the connection. When
    /// connection rules read the client's address, those are left for the first request.
    async fn handshake_complete_callback(&self, ssl: &SslRef) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let record = record_index().and_then(|i| ssl.ex_data(i))?.clone();
        let hs = record.during.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let mode = hs.policy.mode;
        let (cert, chain) = match mode {
            Mode::Optional | Mode::Required => (ViewerCert::from_ssl(ssl), peer_chain(ssl)),
            Mode::Off => (None, Vec::new()),
        };
        let info = connection_info(ssl, record.sni.as_deref());
        let rules = &hs.rules;
        // A client without a certificate on an optional listener had no verify step: its
        // connection rules run now. Listeners without mTLS run no connection rules.
        let verdict = match (&cert, mode) {
            (_, Mode::Off) => Verdict::Allowed,
            (None, _) if rules.has_phase(Phase::Connection) => {
                admission::connection_rules(rules, &[Phase::Connection], None, &info, "")
            }
            _ if record.lock().allowed => Verdict::Allowed,
            _ => Verdict::Open,
        };
        let identity = ConnectionIdentity {
            listener: self.listener.clone(),
            sni: record.sni.clone(),
            sni_policy: hs.policy.sni_name.clone(),
            cert,
            chain,
            info,
            client_ip: Default::default(),
        };
        // Connection rules that read the client's address run at the first request; the
        // handshake is counted then.
        let after_handshake = matches!(verdict, Verdict::Open) && rules.has_phase(Phase::AfterHandshake);
        let refused = match verdict {
            Verdict::Refused(r) => Some(r),
            Verdict::Allowed | Verdict::Open => None,
        };
        let count: Option<admission::CountHandshake> = if after_handshake {
            record.lock().completed = true;
            let record = record.clone();
            let cert = identity.cert.clone();
            Some(Box::new(move |refusal: Option<&Refused>, client_ip: &str| {
                let refusal = refusal
                    .map(|r| Refused::new(r.reason, format!("{}, after the handshake, from {client_ip}", r.detail)));
                record.count_completed(refusal.as_ref(), cert.as_ref(), Some(client_ip));
            }))
        } else {
            record.count_completed(refused.as_ref(), identity.cert.as_ref(), None);
            None
        };
        Some(Arc::new(Connection::new(identity, hs.generation, refused, count)))
    }
}
