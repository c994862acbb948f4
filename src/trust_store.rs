//! Trust stores for client certificates: the CAs (roots and intermediates) BoringSSL builds and
//! verifies chains against, and what the edge checks on a verified chain itself: the chain depth,
//! the pathLenConstraint of store intermediates, and revocation against the CRLs. A store is
//! built off the handshake path and shared by reference count.
//!
//! Revocation is checked here rather than by BoringSSL, for three reasons: a connection that is
//! already open is checked again against the CRLs of a newer store (`admission`), which needs the
//! check outside a handshake; BoringSSL cannot be told to keep enforcing a CRL past its
//! nextUpdate (`expired_crl: enforce`); and an `X509_STORE` holding CRLs stays referenced by
//! every connection verified against it, so each reload would keep the old CRLs in memory for
//! as long as its connections last. CRLs are parsed and their signatures verified at load with
//! x509-parser.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use boring::hash::MessageDigest;
use boring::stack::StackRef;
use boring::x509::store::{X509Store, X509StoreBuilder, X509StoreRef};
use boring::x509::{X509Ref, X509StoreContext, X509VerifyError, X509};
use x509_parser::prelude::FromDer;

use crate::reason::{Refusal, Refused};

/// What a CRL past its nextUpdate means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiredCrl {
    /// The handshakes it covers are refused (revocation unknown).
    Refuse,
    /// Its revocations are still enforced.
    Enforce,
}

/// Which certificates of a chain need their issuer's CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlScope {
    /// Every certificate below the trust anchor.
    Chain,
    /// The client's certificate only.
    Leaf,
}

/// A CRL, parsed and (when its issuer is in the store) verified.
#[derive(Debug)]
pub struct Crl {
    /// The issuer's name, for logs and metrics.
    pub issuer: String,
    issuer_der: Vec<u8>,
    /// Unix seconds.
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// Serial numbers as big-endian magnitudes without leading zeros.
    revoked: HashSet<Vec<u8>>,
    /// Scope from the issuing distribution point extension.
    only_users: bool,
    only_cas: bool,
    /// The DER, kept to verify the signature against a client-sent issuer at a handshake
    /// (empty once verified against a store CA).
    der: Vec<u8>,
}

fn magnitude(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Extensions a CRL or an entry may carry critical: issuing distribution point (handled below).
const HANDLED_CRITICAL: &[&str] = &["2.5.29.28"];
const DELTA_CRL_INDICATOR: &str = "2.5.29.27";

impl Crl {
    /// Every CRL in a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Vec<Crl>, String> {
        let mut out = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
            let block = block.map_err(|e| format!("not PEM: {e}"))?;
            if block.label != "X509 CRL" {
                continue;
            }
            out.push(Crl::from_der(&block.contents)?);
        }
        if out.is_empty() {
            return Err("no PEM CRL (-----BEGIN X509 CRL-----) in the file".into());
        }
        Ok(out)
    }

    fn from_der(der: &[u8]) -> Result<Crl, String> {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| format!("not a valid CRL: {e}"))?;
        let issuer = boring::x509::X509Name::from_der(crl.issuer().as_raw())
            .map(|n| crate::identity::rfc2253(&n))
            .unwrap_or_else(|_| crl.issuer().to_string());
        for ext in crl.extensions() {
            let oid = ext.oid.to_id_string();
            if oid == DELTA_CRL_INDICATOR {
                return Err(format!(
                    "the CRL of {issuer} is a delta CRL, which the edge does not support"
                ));
            }
            if ext.critical && !HANDLED_CRITICAL.contains(&oid.as_str()) {
                return Err(format!(
                    "the CRL of {issuer} has a critical extension {oid} the edge does not know"
                ));
            }
        }
        let (mut only_users, mut only_cas) = (false, false);
        for ext in crl.extensions() {
            if let x509_parser::extensions::ParsedExtension::IssuingDistributionPoint(idp) = ext.parsed_extension() {
                if idp.indirect_crl || idp.only_some_reasons.is_some() || idp.only_contains_attribute_certs {
                    return Err(format!(
                        "the CRL of {issuer} is indirect or covers only some reasons or attribute certificates, which the edge does not support"
                    ));
                }
                only_users = idp.only_contains_user_certs;
                only_cas = idp.only_contains_ca_certs;
            }
        }
        let mut revoked = HashSet::new();
        for entry in crl.iter_revoked_certificates() {
            if let Some(ext) = entry.extensions().iter().find(|e| e.critical) {
                return Err(format!(
                    "the CRL of {issuer} has an entry with a critical extension {} (an indirect CRL?), which the edge does not support",
                    ext.oid.to_id_string()
                ));
            }
            revoked.insert(magnitude(entry.raw_serial()).to_vec());
        }
        Ok(Crl {
            issuer,
            issuer_der: crl.issuer().as_raw().to_vec(),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            revoked,
            only_users,
            only_cas,
            der: der.to_vec(),
        })
    }

    /// Whether `issuer`'s key signed this CRL.
    fn signed_by(&self, issuer: &X509Ref) -> bool {
        let Ok(issuer_der) = issuer.to_der() else { return false };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&issuer_der) else {
            return false;
        };
        let Ok((_, crl)) = x509_parser::revocation_list::CertificateRevocationList::from_der(&self.der) else {
            return false;
        };
        crl.verify_signature(cert.public_key()).is_ok()
    }

    /// Whether this CRL speaks for `cert` (its scope).
    fn covers(&self, is_ca: bool) -> bool {
        !(self.only_users && is_ca || self.only_cas && !is_ca)
    }
}

fn digest(cert: &X509Ref) -> Option<[u8; 32]> {
    let d = cert.digest(MessageDigest::sha256()).ok()?;
    d.as_ref().try_into().ok()
}

/// A trust store's revocation data.
struct Revocation {
    scope: CrlScope,
    expired: ExpiredCrl,
    /// CA certificate in the store (SHA-256 of its DER) → the CRL its key signed.
    by_ca: HashMap<[u8; 32], Arc<Crl>>,
    /// CRLs whose issuer is not in the store, by issuer name: verified against the intermediate
    /// a client sends, once per intermediate.
    by_name: HashMap<Vec<u8>, Vec<Arc<Crl>>>,
    verified: Mutex<HashMap<[u8; 32], Option<Arc<Crl>>>>,
}

impl Revocation {
    /// The CRL for certificates issued by `issuer`.
    fn crl_of(&self, issuer: &X509Ref) -> Option<Arc<Crl>> {
        let d = digest(issuer)?;
        if let Some(c) = self.by_ca.get(&d) {
            return Some(c.clone());
        }
        let candidates = self.by_name.get(&issuer.subject_name().to_der().ok()?)?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .entry(d)
            .or_insert_with(|| candidates.iter().find(|c| c.signed_by(issuer)).cloned())
            .clone()
    }
}

/// How a store is built: settings from the config, then its CAs, then its CRLs.
pub struct Settings {
    pub name: Arc<str>,
    pub max_chain_depth: u32,
    pub advertise_ca_names: bool,
    /// `None`: no CRLs, revocation is not checked.
    pub crl: Option<(CrlScope, ExpiredCrl)>,
}

/// Builds a [`TrustStore`].
pub struct Builder {
    settings: Settings,
    store: X509StoreBuilder,
    cas: Vec<X509>,
    crls: Vec<Arc<Crl>>,
    by_ca: HashMap<[u8; 32], Arc<Crl>>,
    by_name: HashMap<Vec<u8>, Vec<Arc<Crl>>>,
}

impl Builder {
    pub fn new(settings: Settings) -> Result<Builder, String> {
        let mut store = X509StoreBuilder::new().map_err(|e| format!("cannot create a certificate store: {e}"))?;
        // BoringSSL's depth counts intermediates and reports an overlong chain as an unknown
        // issuer; it bounds chain building loosely, and `check` applies the exact limit.
        store.verify_param_mut().set_depth(settings.max_chain_depth as i32);
        Ok(Builder {
            settings,
            store,
            cas: Vec::new(),
            crls: Vec::new(),
            by_ca: HashMap::new(),
            by_name: HashMap::new(),
        })
    }

    pub fn add_ca(&mut self, cert: &X509) -> Result<(), String> {
        cert.subject_name()
            .to_der()
            .map_err(|e| format!("unreadable subject name: {e}"))?;
        self.store
            .add_cert(cert)
            .map_err(|e| format!("cannot add certificate: {e}"))?;
        self.cas.push(cert.clone());
        Ok(())
    }

    /// Adds a CRL (after every CA): bound to the store CA whose key signed it, or kept for a
    /// client-sent issuer when no store CA has its issuer's name.
    pub fn add_crl(&mut self, mut crl: Crl) -> Result<(), String> {
        let same_name: Vec<&X509> = self
            .cas
            .iter()
            .filter(|c| c.subject_name().to_der().is_ok_and(|n| n == crl.issuer_der))
            .collect();
        if same_name.is_empty() {
            let crl = Arc::new(crl);
            self.by_name
                .entry(crl.issuer_der.clone())
                .or_default()
                .push(crl.clone());
            self.crls.push(crl);
            return Ok(());
        }
        let signers: Vec<[u8; 32]> = same_name
            .iter()
            .filter(|ca| crl.signed_by(ca))
            .filter_map(|ca| digest(ca))
            .collect();
        // Verified now: its DER is not needed again.
        crl.der = Vec::new();
        let crl = Arc::new(crl);
        if signers.is_empty() {
            return Err(format!(
                "the CRL of {} is not signed by the key of any CA of that name in ca_files",
                crl.issuer
            ));
        }
        for d in signers {
            // Of two CRLs from one CA, the newer one counts.
            let newer = self.by_ca.get(&d).is_none_or(|old| crl.this_update > old.this_update);
            if newer {
                self.by_ca.insert(d, crl.clone());
            }
        }
        self.crls.push(crl);
        Ok(())
    }

    pub fn build(self) -> TrustStore {
        let mut path_len = HashMap::new();
        let mut ca_names = Vec::new();
        for c in &self.cas {
            if let (Some(p), Some(d)) = (intermediate_path_len(c), digest(c)) {
                path_len.insert(d, p);
            }
            ca_names.extend(c.subject_name().to_der().ok());
        }
        let revocation = self.settings.crl.map(|(scope, expired)| Revocation {
            scope,
            expired,
            by_ca: self.by_ca,
            by_name: self.by_name,
            verified: Mutex::default(),
        });
        TrustStore {
            name: self.settings.name,
            store: self.store.build(),
            max_chain_depth: self.settings.max_chain_depth,
            path_len,
            ca_names: self.settings.advertise_ca_names.then_some(ca_names),
            cas: self.cas,
            crls: self.crls,
            revocation,
        }
    }
}

/// A compiled trust store.
pub struct TrustStore {
    pub name: Arc<str>,
    store: X509Store,
    /// Most certificates a verified chain may hold, leaf and root included (CloudFront's
    /// "chain depth").
    pub max_chain_depth: u32,
    /// SHA-256 of each intermediate CA in the store that carries a pathLenConstraint → the limit.
    /// BoringSSL checks constraints only on certificates the client sent.
    path_len: HashMap<[u8; 32], usize>,
    /// DER subjects of the CAs, sent in the CertificateRequest when advertising is on.
    pub ca_names: Option<Vec<Vec<u8>>>,
    /// The CAs and CRLs loaded, for the lifecycle metrics.
    pub cas: Vec<X509>,
    pub crls: Vec<Arc<Crl>>,
    revocation: Option<Revocation>,
}

/// The verify error BoringSSL is told for a refusal, which decides the TLS alert.
pub fn verify_error(reason: Refusal) -> X509VerifyError {
    match reason {
        Refusal::ClientCertRevoked => X509VerifyError::CERT_REVOKED,
        Refusal::ClientCertRevocationUnknown => X509VerifyError::UNABLE_TO_GET_CRL,
        Refusal::ClientCertMaxChainDepthExceeded => X509VerifyError::CERT_CHAIN_TOO_LONG,
        Refusal::ClientCertPathLenExceeded => X509VerifyError::PATH_LENGTH_EXCEEDED,
        _ => X509VerifyError::APPLICATION_VERIFICATION,
    }
}

/// Maps a chain verification error to a refusal reason.
pub fn refusal_reason(err: X509VerifyError) -> Refusal {
    use pingora::tls::ssl_sys as ffi;
    match err.as_raw() {
        ffi::X509_V_ERR_CERT_HAS_EXPIRED => Refusal::ClientCertExpired,
        ffi::X509_V_ERR_CERT_NOT_YET_VALID => Refusal::ClientCertNotYetValid,
        ffi::X509_V_ERR_CERT_REVOKED => Refusal::ClientCertRevoked,
        ffi::X509_V_ERR_INVALID_PURPOSE => Refusal::ClientCertIntentInvalid,
        ffi::X509_V_ERR_CERT_CHAIN_TOO_LONG => Refusal::ClientCertMaxChainDepthExceeded,
        ffi::X509_V_ERR_PATH_LENGTH_EXCEEDED => Refusal::ClientCertPathLenExceeded,
        ffi::X509_V_ERR_UNABLE_TO_GET_CRL
        | ffi::X509_V_ERR_CRL_HAS_EXPIRED
        | ffi::X509_V_ERR_CRL_NOT_YET_VALID
        | ffi::X509_V_ERR_CRL_SIGNATURE_FAILURE
        | ffi::X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER => Refusal::ClientCertRevocationUnknown,
        ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        | ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
        | ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        | ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        | ffi::X509_V_ERR_CERT_SIGNATURE_FAILURE => Refusal::ClientCertUntrusted,
        _ => Refusal::ClientCertInvalid,
    }
}

fn subject(cert: &X509Ref) -> String {
    cert.subject_name().print_ex(0).unwrap_or_default()
}

impl TrustStore {
    pub fn store(&self) -> &X509StoreRef {
        &self.store
    }

    /// What the edge checks on a chain BoringSSL has verified (leaf first, trust anchor last):
    /// its depth, the pathLenConstraint of store intermediates, and revocation at `now`.
    pub fn check(&self, chain: &StackRef<X509>, now: i64) -> Result<(), Refused> {
        let len = chain.len();
        if len > self.max_chain_depth as usize {
            return Err(Refused::new(
                Refusal::ClientCertMaxChainDepthExceeded,
                format!(
                    "{len} certificates in the chain, at most {} allowed",
                    self.max_chain_depth
                ),
            ));
        }
        if !self.path_len_ok(chain) {
            return Err(Refused::new(
                Refusal::ClientCertPathLenExceeded,
                "a trust-store intermediate's pathLenConstraint is exceeded",
            ));
        }
        let Some(r) = &self.revocation else { return Ok(()) };
        let checked = match r.scope {
            CrlScope::Chain => len.saturating_sub(1),
            CrlScope::Leaf => len.min(1),
        };
        for i in 0..checked {
            let (Some(cert), Some(issuer)) = (chain.get(i), chain.get(i + 1)) else {
                break;
            };
            let unknown = |why: String| Err(Refused::new(Refusal::ClientCertRevocationUnknown, why));
            let crl = match r.crl_of(issuer) {
                Some(crl) if crl.covers(i > 0) => crl,
                _ => return unknown(format!("no CRL of {} for {}", subject(issuer), subject(cert))),
            };
            if crl.this_update > now {
                return unknown(format!("the CRL of {} is not valid yet", crl.issuer));
            }
            let expired = crl.next_update.is_some_and(|t| t < now);
            if expired && r.expired == ExpiredCrl::Refuse {
                return unknown(format!(
                    "the CRL of {} expired at {}",
                    crl.issuer,
                    crate::identity::iso8601(crl.next_update.unwrap_or_default())
                ));
            }
            let serial = cert.serial_number().to_bn().map(|b| b.to_vec()).unwrap_or_default();
            if crl.revoked.contains(magnitude(&serial)) {
                return Err(Refused::new(
                    Refusal::ClientCertRevoked,
                    format!("{} is revoked by the CRL of {}", subject(cert), crl.issuer),
                ));
            }
        }
        Ok(())
    }

    /// Verifies a client's certificate outside a handshake, as a handshake against this store
    /// would (the EKU, checked in the handshake, does not change with the store): for a
    /// connection that is already open, against a newer store, and for `rules explain`.
    pub fn verify(&self, leaf: &X509Ref, intermediates: &StackRef<X509>, now: i64) -> Result<(), Refused> {
        let mut ctx = X509StoreContext::new().map_err(|e| Refused::new(Refusal::ClientCertInvalid, e.to_string()))?;
        let verified = ctx.init(&self.store, leaf, intermediates, |c| {
            if !c.verify_cert()? {
                let err = c.verify_result().err();
                let depth = c.error_depth();
                return Ok(Err(err.map_or(
                    Refused::new(Refusal::ClientCertInvalid, "verification failed"),
                    |e| Refused::new(refusal_reason(e), format!("{} at depth {depth}", e.error_string())),
                )));
            }
            Ok(match c.chain() {
                Some(chain) => self.check(chain, now),
                None => Err(Refused::new(Refusal::ClientCertInvalid, "no verified chain")),
            })
        });
        verified.map_err(|e| Refused::new(Refusal::ClientCertInvalid, e.to_string()))?
    }

    /// Whether a verified chain (leaf first) respects the pathLenConstraint of every store
    /// intermediate in it: a CA at index `i` has `i - 1` CA certificates below it.
    fn path_len_ok(&self, chain: &StackRef<X509>) -> bool {
        if self.path_len.is_empty() {
            return true;
        }
        chain.iter().enumerate().skip(2).all(|(i, cert)| {
            let limit = digest(cert).and_then(|d| self.path_len.get(&d).copied());
            limit.is_none_or(|p| i - 1 <= p)
        })
    }
}

/// The pathLenConstraint of a CA certificate that is not self-issued, if it has one.
fn intermediate_path_len(cert: &X509Ref) -> Option<usize> {
    let der = cert.to_der().ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).ok()?;
    if parsed.subject() == parsed.issuer() {
        return None;
    }
    let bc = parsed.basic_constraints().ok()??;
    bc.value.path_len_constraint.map(|p| p as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, LeafSpec};

    fn settings() -> Settings {
        Settings {
            name: Arc::from("t"),
            max_chain_depth: 4,
            advertise_ca_names: false,
            crl: Some((CrlScope::Chain, ExpiredCrl::Refuse)),
        }
    }

    fn x509(pem: &str) -> X509 {
        X509::from_pem(pem.as_bytes()).unwrap()
    }

    fn crl(pem: &str) -> Crl {
        Crl::from_pem(pem.as_bytes()).unwrap().remove(0)
    }

    #[test]
    fn files_without_a_valid_crl_are_refused() {
        let e = Crl::from_pem(b"").unwrap_err();
        assert!(e.contains("no PEM CRL"), "{e}");
        let e = Crl::from_pem(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap_err();
        assert!(e.contains("not a valid CRL"), "{e}");
    }

    #[test]
    fn a_crl_not_signed_by_the_ca_of_its_issuers_name_is_refused() {
        // Two roots with the same name and different keys.
        let (trusted, impostor) = (Ca::root("Device CA").unwrap(), Ca::root("Device CA").unwrap());
        let mut b = Builder::new(settings()).unwrap();
        b.add_ca(&x509(&trusted.cert_pem)).unwrap();
        let e = b.add_crl(crl(&impostor.crl(&[]).unwrap())).unwrap_err();
        assert!(e.contains("not signed by the key of any CA"), "{e}");
        b.add_crl(crl(&trusted.crl(&[]).unwrap())).unwrap();
    }

    /// A chain root → issuing CA → device, with the root's CRL and `issuing_crl` loaded.
    fn verify_with(issuing_crl: impl Fn(&Ca) -> String) -> Result<(), Refused> {
        let root = Ca::root("Root").unwrap();
        let issuing = root.intermediate("Issuing", None).unwrap();
        let device = issuing.issue(&LeafSpec::client("device")).unwrap();
        let mut b = Builder::new(settings()).unwrap();
        b.add_ca(&x509(&root.cert_pem)).unwrap();
        b.add_ca(&x509(&issuing.cert_pem)).unwrap();
        b.add_crl(crl(&root.crl(&[]).unwrap())).unwrap();
        b.add_crl(crl(&issuing_crl(&issuing))).unwrap();
        let store = b.build();
        let chain = boring::stack::Stack::new().unwrap();
        store.verify(&x509(&device.cert_pem), &chain, crate::rules::facts::unix_now())
    }

    #[test]
    fn a_crl_speaks_only_for_the_certificates_its_scope_names() {
        assert_eq!(verify_with(|ca| ca.crl(&[]).unwrap()), Ok(()));
        assert_eq!(verify_with(|ca| ca.crl_scoped(false).unwrap()), Ok(()));
        // A CRL of CA certificates says nothing of the device: its revocation is unknown.
        let r = verify_with(|ca| ca.crl_scoped(true).unwrap()).unwrap_err();
        assert_eq!(r.reason, Refusal::ClientCertRevocationUnknown, "{}", r.detail);
    }
}
