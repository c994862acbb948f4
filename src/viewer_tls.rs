//! Viewer TLS: the listener's BoringSSL settings and the per-connection mTLS policy.
//! Each handshake reads the current policy (server certificate, mode, trust store, chosen by
//! SNI) from swappable state, verifies the client chain during the handshake, counts and logs
//! every refusal with its reason, and hands a [`ConnectionIdentity`] to the proxy.
//!
//! Session resumption is off (no tickets, no session cache): every connection verifies its
//! chain, dates and CRLs afresh, so a revoked or expired certificate can never ride a ticket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use boring::pkey::{PKey, Private};
use boring::ssl::{
    NameType, Ssl, SslAlert, SslInfoCallbackMode, SslInfoCallbackValue, SslOptions, SslRef, SslSessionCacheMode,
    SslVerifyMode, SslVersion,
};
use boring::stack::Stack;
use boring::x509::{X509Name, X509StoreContext, X509StoreContextRef, X509VerifyError, X509VerifyResult, X509};
use log::{info, warn};
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::tls::ext;

use crate::config::{self, Ctx, MtlsMode};
use crate::identity::{AfterHandshake, ConnectionIdentity, HeaderPlan, ViewerCert};
use crate::metrics;
use crate::rules::{self, ConnectionInfo, Decision, Phase, RuleSet};
use crate::trust_store::TrustStore;

/// A server certificate chain and its key.
pub struct ServerCert {
    chain: Vec<X509>,
    key: PKey<Private>,
}

/// The mTLS policy for one SNI name (or a listener's default).
pub struct TlsPolicy {
    /// First configured SNI name of this policy; `None` for the listener default.
    pub sni_name: Option<Arc<str>>,
    pub cert: Arc<ServerCert>,
    pub mode: MtlsMode,
    pub trust_store: Option<Arc<TrustStore>>,
}

/// Everything a listener's handshakes read; replaced whole on reload.
pub struct ListenerPolicy {
    pub default: Arc<TlsPolicy>,
    /// Lowercased SNI name → policy.
    pub by_sni: HashMap<String, Arc<TlsPolicy>>,
    pub headers: Arc<HeaderPlan>,
    /// Connection-phase rules run in each handshake.
    pub rules: Arc<RuleSet>,
}

impl ListenerPolicy {
    pub fn select(&self, sni: Option<&str>) -> &Arc<TlsPolicy> {
        sni.and_then(|s| self.by_sni.get(s)).unwrap_or(&self.default)
    }
}

/// Reads a server certificate chain and key; errors name `key_prefix.server_cert|server_key`.
pub fn load_server_cert(ctx: &mut Ctx, key_prefix: &str, cert: &str, key: &str) -> Option<Arc<ServerCert>> {
    let ckey = format!("{key_prefix}.server_cert");
    let kkey = format!("{key_prefix}.server_key");
    let chain = ctx.load_chain(&ckey, cert)?;
    let pkey = ctx.load_key(&kkey, key)?;
    ctx.check_key_matches(&kkey, &chain[0], &pkey, cert)?;
    Some(Arc::new(ServerCert { chain, key: pkey }))
}

/// Builds a listener's policy from its config. Errors name `listeners[i]...`.
pub fn build_policy(
    ctx: &mut Ctx,
    index: usize,
    l: &config::Listener,
    stores: &std::collections::BTreeMap<String, Arc<TrustStore>>,
    headers: Arc<HeaderPlan>,
    rules: Arc<RuleSet>,
) -> Option<ListenerPolicy> {
    let key = format!("listeners[{index}]");
    let default_cert = load_server_cert(ctx, &key, &l.server_cert, &l.server_key);
    let store = |name: &Option<String>| name.as_ref().and_then(|n| stores.get(n).cloned());
    let mut by_sni = HashMap::new();
    let mut sni_ok = true;
    for (j, s) in l.sni.iter().enumerate() {
        let cert = match (&s.server_cert, &s.server_key) {
            (Some(c), Some(k)) => load_server_cert(ctx, &format!("{key}.sni[{j}]"), c, k),
            _ => default_cert.clone(),
        };
        let Some(cert) = cert else {
            sni_ok = false;
            continue;
        };
        let policy = Arc::new(TlsPolicy {
            sni_name: s.names.first().map(|n| Arc::from(n.to_ascii_lowercase().as_str())),
            cert,
            mode: s.mtls.mode,
            trust_store: store(&s.mtls.trust_store),
        });
        for n in &s.names {
            by_sni.insert(n.to_ascii_lowercase(), policy.clone());
        }
    }
    let default = Arc::new(TlsPolicy {
        sni_name: None,
        cert: default_cert?,
        mode: l.mtls.mode,
        trust_store: store(&l.mtls.trust_store),
    });
    sni_ok.then_some(ListenerPolicy {
        default,
        by_sni,
        headers,
        rules,
    })
}

/// The TLS settings for a listener whose handshakes follow `policy`.
pub fn tls_settings(
    listener: Arc<str>,
    policy: Arc<ArcSwap<ListenerPolicy>>,
    http2: bool,
) -> pingora::Result<TlsSettings> {
    let mut settings = TlsSettings::with_callbacks(Box::new(ViewerTls { listener, policy }))?;
    // Resumption would skip chain verification: see the module docs.
    settings.set_options(SslOptions::NO_TICKET);
    settings.set_session_cache_mode(SslSessionCacheMode::OFF);
    settings
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| pingora::Error::because(pingora::ErrorType::InternalError, "TLS 1.2 minimum", e))?;
    if http2 {
        settings.enable_h2();
    }
    settings.set_info_callback(|ssl, mode, value| {
        if let (SslInfoCallbackMode::WRITE_ALERT, SslInfoCallbackValue::Alert(alert)) = (mode, value) {
            if let Some(record) = record_index().and_then(|i| ssl.ex_data(i)) {
                if let Ok(mut s) = record.state.lock() {
                    s.alert.get_or_insert(alert.alert());
                }
            }
        }
    });
    Ok(settings)
}

/// Per-connection handshake record, kept in the SSL's ex_data so that its drop (when the SSL
/// is freed) can count handshakes that failed without reaching a verify callback.
struct HandshakeRecord {
    listener: Arc<str>,
    mode: MtlsMode,
    sni: Option<String>,
    /// The rules current when the handshake began: its connection rules, and those after it.
    rules: Arc<RuleSet>,
    state: Mutex<RecordState>,
}

#[derive(Default)]
struct RecordState {
    verify_ran: bool,
    refused: Option<(&'static str, String)>,
    /// A connection rule allowed the client in the handshake: the rules after it do not run.
    allowed: bool,
    /// The fatal alert the edge sent, if any (from the info callback).
    alert: Option<SslAlert>,
    /// The handshake completed; its count waits for the connection rules after it.
    completed: bool,
    /// The handshake's outcome has been counted (accepted, or refused after completing).
    counted: bool,
}

impl HandshakeRecord {
    fn refuse(&self, reason: &'static str, detail: String) {
        if let Ok(mut s) = self.state.lock() {
            if s.refused.is_none() {
                s.refused = Some((reason, detail));
            }
        }
    }

    fn allow(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.allowed = true;
        }
    }

    /// Whether a connection rule allowed the client in the handshake.
    fn allowed(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.allowed)
    }

    /// The handshake completed; it is counted when the rules after it have run (or when the
    /// connection closes before they could).
    fn complete_later(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.completed = true;
        }
    }
}

impl HandshakeRecord {
    fn count_refusal(&self, reason: &str, detail: &str) {
        metrics::HANDSHAKES
            .with_label_values(&[&self.listener, "refused", reason])
            .inc();
        info!(
            "handshake refused listener={} sni={} reason={} detail=\"{}\"",
            self.listener,
            self.sni.as_deref().unwrap_or("-"),
            reason,
            detail
        );
    }

    /// Counts the outcome of a completed handshake now, instead of when the SSL is freed.
    fn count_completed(&self, refusal: Option<&(&'static str, String)>) {
        if let Ok(mut s) = self.state.lock() {
            s.counted = true;
        }
        match refusal {
            Some((reason, detail)) => self.count_refusal(reason, detail),
            None => self.count_accepted(),
        }
    }

    fn count_accepted(&self) {
        metrics::HANDSHAKES
            .with_label_values(&[&self.listener, "accepted", "Ok"])
            .inc();
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
        let (reason, detail) = match (s.refused.take(), s.alert) {
            (Some(r), _) => r,
            (None, Some(SslAlert::CERTIFICATE_REQUIRED)) => ("ClientCertMissing", "no client certificate".into()),
            // TLS 1.2 has no certificate_required alert: an empty Certificate gets handshake_failure.
            (None, Some(SslAlert::HANDSHAKE_FAILURE)) if !s.verify_ran && self.mode == MtlsMode::Required => {
                ("ClientCertMissing", "no client certificate".into())
            }
            (None, Some(alert)) => ("HandshakeFailed", format!("alert {alert:?} sent")),
            (None, None) => (
                "HandshakeAborted",
                "the client closed the connection during the handshake".into(),
            ),
        };
        self.count_refusal(reason, &detail);
    }
}

fn record_index() -> Option<boring::ex_data::Index<Ssl, Arc<HandshakeRecord>>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<Ssl, Arc<HandshakeRecord>>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

fn policy_index() -> Option<boring::ex_data::Index<Ssl, Arc<TlsPolicy>>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<Ssl, Arc<TlsPolicy>>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

/// Maps a chain verification error to a refusal reason (CloudFront's names where they exist).
pub fn refusal_reason(result: X509VerifyResult) -> &'static str {
    use pingora::tls::ssl_sys as ffi;
    let Err(err) = result else { return "Ok" };
    match err.as_raw() {
        ffi::X509_V_ERR_CERT_HAS_EXPIRED => "ClientCertExpired",
        ffi::X509_V_ERR_CERT_NOT_YET_VALID => "ClientCertNotYetValid",
        ffi::X509_V_ERR_CERT_REVOKED => "ClientCertRevoked",
        ffi::X509_V_ERR_INVALID_PURPOSE => "ClientCertIntentInvalid",
        ffi::X509_V_ERR_CERT_CHAIN_TOO_LONG => "ClientCertMaxChainDepthExceeded",
        ffi::X509_V_ERR_PATH_LENGTH_EXCEEDED => "ClientCertPathLenExceeded",
        ffi::X509_V_ERR_UNABLE_TO_GET_CRL
        | ffi::X509_V_ERR_CRL_HAS_EXPIRED
        | ffi::X509_V_ERR_CRL_NOT_YET_VALID
        | ffi::X509_V_ERR_CRL_SIGNATURE_FAILURE
        | ffi::X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER => "ClientCertRevocationUnknown",
        ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        | ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
        | ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        | ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        | ffi::X509_V_ERR_CERT_SIGNATURE_FAILURE => "ClientCertUntrusted",
        _ => "ClientCertInvalid",
    }
}

fn connection_info(ssl: &SslRef, sni: Option<&str>) -> ConnectionInfo {
    ConnectionInfo {
        sni: sni.unwrap_or_default().to_string(),
        tls_version: ssl.version_str().to_string(),
        alpn: ssl
            .selected_alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default(),
    }
}

/// What connection rules decided.
enum Verdict {
    /// Refused: the reason and its detail (the rule).
    Refused((&'static str, String)),
    /// An `allow` ended the connection phase.
    Allowed,
    /// No `allow` or `deny` matched.
    Open,
}

impl Verdict {
    fn refusal(self) -> Option<(&'static str, String)> {
        match self {
            Verdict::Refused(r) => Some(r),
            Verdict::Allowed | Verdict::Open => None,
        }
    }
}

/// Runs the connection rules of `phase` (`Connection` in the handshake, where the client's
/// address is not known, or `AfterHandshake` with it).
fn connection_rules(
    rules: &RuleSet,
    phase: Phase,
    cert: Option<&ViewerCert>,
    info: &ConnectionInfo,
    client_ip: &str,
) -> Verdict {
    let facts = rules::Facts {
        cert,
        verified: true,
        connection: info,
        client_ip,
        request: None,
        lists: rules.lists(),
        now: rules::facts::unix_now(),
    };
    match rules.evaluate(&[phase], &facts, None).decision() {
        Decision::Deny { rule, .. } => Verdict::Refused(("ConnectionRuleDenied", format!("rule {rule}"))),
        Decision::Error { rule, message } => {
            Verdict::Refused(("ConnectionRuleError", format!("rule {rule}: {message}")))
        }
        Decision::Allow { .. } => Verdict::Allowed,
        Decision::Continue => Verdict::Open,
    }
}

struct ViewerTls {
    listener: Arc<str>,
    policy: Arc<ArcSwap<ListenerPolicy>>,
}

impl ViewerTls {
    fn apply(&self, ssl: &mut SslRef) -> Result<(), String> {
        let current = self.policy.load();
        let sni = ssl.servername(NameType::HOST_NAME).map(str::to_ascii_lowercase);
        let policy = current.select(sni.as_deref()).clone();

        ext::ssl_use_certificate(ssl, &policy.cert.chain[0]).map_err(|e| format!("server certificate: {e}"))?;
        ext::ssl_use_private_key(ssl, &policy.cert.key).map_err(|e| format!("server key: {e}"))?;
        for c in &policy.cert.chain[1..] {
            ext::ssl_add_chain_cert(ssl, c).map_err(|e| format!("server chain: {e}"))?;
        }

        let record = Arc::new(HandshakeRecord {
            listener: self.listener.clone(),
            mode: policy.mode,
            sni,
            rules: current.rules.clone(),
            state: Mutex::new(RecordState::default()),
        });
        if let (Some(ri), Some(pi)) = (record_index(), policy_index()) {
            ssl.set_ex_data(ri, record.clone());
            ssl.set_ex_data(pi, policy.clone());
        } else {
            return Err("cannot allocate SSL ex_data indices".into());
        }

        let mode = match policy.mode {
            MtlsMode::Off => {
                ssl.set_verify(SslVerifyMode::NONE);
                return Ok(());
            }
            MtlsMode::Optional => SslVerifyMode::PEER,
            MtlsMode::Required => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        };
        let store = policy
            .trust_store
            .as_ref()
            .ok_or_else(|| "mTLS policy without a trust store".to_string())?;
        ext::ssl_set_verify_cert_store(ssl, store.store()).map_err(|e| format!("trust store: {e}"))?;
        // BoringSSL's depth counts intermediates and reports an overlong chain as an unknown
        // issuer; bound chain building loosely here and check the exact limit below.
        ssl.set_verify_depth(store.max_chain_depth);
        if let Some(names) = &store.ca_names {
            let mut stack = Stack::new().map_err(|e| e.to_string())?;
            for n in names {
                stack
                    .push(X509Name::from_der(n).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
            ssl.set_client_ca_list(stack);
        }
        let store = store.clone();
        ssl.set_verify_callback(mode, move |ok, chain: &mut X509StoreContextRef| {
            if let Ok(mut s) = record.state.lock() {
                s.verify_ran = true;
            }
            // The last call is for the leaf: the whole chain is known and has verified.
            if ok && chain.error_depth() == 0 {
                let len = chain.chain().map_or(0, |c| c.len());
                if len > store.max_chain_depth as usize {
                    chain.set_error(Err(X509VerifyError::CERT_CHAIN_TOO_LONG));
                    record.refuse(
                        "ClientCertMaxChainDepthExceeded",
                        format!(
                            "{len} certificates in the chain, at most {} allowed",
                            store.max_chain_depth
                        ),
                    );
                    return false;
                }
                let path_len_ok = chain.chain().is_none_or(|c| store.path_len_ok(c.iter()));
                if !path_len_ok {
                    chain.set_error(Err(X509VerifyError::PATH_LENGTH_EXCEEDED));
                    record.refuse(
                        "ClientCertPathLenExceeded",
                        "a trust-store intermediate's pathLenConstraint is exceeded".into(),
                    );
                    return false;
                }
                // The chain has verified: the connection-phase rules decide.
                if record.rules.has_phase(Phase::Connection) {
                    let Some(cert) = chain
                        .current_cert()
                        .and_then(|leaf| ViewerCert::from_x509(leaf, Vec::new()))
                    else {
                        // Rules must not see a verified client as one without a certificate.
                        chain.set_error(Err(X509VerifyError::APPLICATION_VERIFICATION));
                        record.refuse("ConnectionRuleError", "the certificate cannot be read for rules".into());
                        return false;
                    };
                    let info = X509StoreContext::ssl_idx()
                        .ok()
                        .and_then(|i| chain.ex_data(i))
                        .map(|ssl| connection_info(ssl, record.sni.as_deref()))
                        .unwrap_or_default();
                    match connection_rules(&record.rules, Phase::Connection, Some(&cert), &info, "") {
                        Verdict::Refused((reason, detail)) => {
                            chain.set_error(Err(X509VerifyError::APPLICATION_VERIFICATION));
                            record.refuse(reason, detail);
                            return false;
                        }
                        Verdict::Allowed => record.allow(),
                        Verdict::Open => {}
                    }
                }
            }
            if !ok {
                let subject = chain
                    .current_cert()
                    .and_then(|c| c.subject_name().print_ex(0))
                    .unwrap_or_default();
                let result = chain.verify_result();
                let text = result.err().map_or("unknown error", |e| e.error_string());
                record.refuse(
                    refusal_reason(result),
                    format!("{text} at depth {} ({subject})", chain.error_depth()),
                );
            }
            ok
        });
        Ok(())
    }
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
        let record = record_index().and_then(|i| ssl.ex_data(i))?;
        let policy = policy_index().and_then(|i| ssl.ex_data(i))?;
        let cert = match policy.mode {
            MtlsMode::Optional | MtlsMode::Required => ViewerCert::from_ssl(ssl),
            MtlsMode::Off => None,
        };
        let current = self.policy.load();
        let info = connection_info(ssl, record.sni.as_deref());
        let rules = &record.rules;
        // A client without a certificate on an optional listener had no verify step: its
        // connection rules run now. Listeners without mTLS run no connection rules.
        let verdict = match (&cert, policy.mode) {
            (_, MtlsMode::Off) => Verdict::Allowed,
            (None, _) if rules.has_phase(Phase::Connection) => {
                connection_rules(rules, Phase::Connection, None, &info, "")
            }
            _ if record.allowed() => Verdict::Allowed,
            _ => Verdict::Open,
        };
        // Connection rules that read the client's address run at the first request; the
        // handshake is counted then.
        let after_handshake = (matches!(verdict, Verdict::Open) && rules.has_phase(Phase::AfterHandshake)).then(|| {
            record.complete_later();
            let record = record.clone();
            AfterHandshake::new(move |conn, client_ip| {
                let refusal = connection_rules(
                    &record.rules,
                    Phase::AfterHandshake,
                    conn.cert.as_ref(),
                    &conn.info,
                    client_ip,
                )
                .refusal()
                .map(|(reason, detail)| (reason, format!("{detail}, after the handshake, from {client_ip}")));
                record.count_completed(refusal.as_ref());
                refusal.map(|(_, detail)| detail)
            })
        });
        let denied = verdict.refusal();
        if after_handshake.is_none() {
            record.count_completed(denied.as_ref());
        }
        let headers = current.headers.render(cert.as_ref());
        Some(Arc::new(Arc::new(ConnectionIdentity {
            listener: self.listener.clone(),
            sni: record.sni.clone(),
            sni_policy: policy.sni_name.clone(),
            cert,
            headers,
            rule_client_ip: Default::default(),
            info,
            denied: denied.map(|(_, detail)| detail),
            after_handshake,
        })))
    }
}
