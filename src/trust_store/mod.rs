//! Trust stores for client certificates, and the decision on a client's chain. rustls-webpki
//! builds the path: it tries every candidate issuer (the client's intermediates, in any order,
//! and the store's), backtracks past an expired, distrusted or unusable one, applies RFC 5280
//! (validity, basicConstraints and pathLen, name constraints, clientAuth EKU, unknown critical
//! extensions) and revocation against the CRLs, within a budget of signature checks and path
//! steps. `profile` adds what webpki leaves to its caller; the chain depth and the pathLen of a
//! trust anchor are checked on each candidate path, so a path that fails them is backtracked too.
//!
//! The same decision serves the handshake, an open connection checked again against a newer
//! store (`admission`), and `rules explain`. CRLs are parsed, and those of store CAs
//! signature-checked, at load. Each store verifies a signature once (`memo`).

mod memo;
mod profile;

use profile::Role;

use std::sync::Arc;
use std::time::Duration;

use boring::x509::X509;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy, VerifiedPath,
};
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

/// A CRL as loaded: what logs and metrics say of it, and what the verifier reads.
pub struct Crl {
    /// The issuer's name, for logs and metrics.
    pub issuer: String,
    issuer_der: Vec<u8>,
    /// Unix seconds.
    pub this_update: i64,
    pub next_update: Option<i64>,
    der: Vec<u8>,
    parsed: CertRevocationList<'static>,
}

impl std::fmt::Debug for Crl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crl").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

const DELTA_CRL_INDICATOR: &str = "2.5.29.27";
const CRL_NUMBER: &str = "2.5.29.20";

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
        if crl.extensions().iter().any(|e| e.oid.to_id_string() == DELTA_CRL_INDICATOR) {
            return Err(format!("the CRL of {issuer} is a delta CRL, which the edge does not support"));
        }
        match crl.extensions().iter().find(|e| e.oid.to_id_string() == CRL_NUMBER) {
            None => return Err(format!("the CRL of {issuer} has no cRLNumber (RFC 5280 5.2.3)")),
            Some(e) if e.critical => {
                return Err(format!("the CRL of {issuer} has a critical cRLNumber (RFC 5280 5.2.3)"))
            }
            Some(_) => {}
        }
        let parsed = OwnedCertRevocationList::from_der(der).map_err(|e| {
            format!("the CRL of {issuer} cannot be used: {e:?} (indirect CRLs, CRLs for some reasons only and unknown critical extensions are not supported)")
        })?;
        Ok(Crl {
            issuer,
            issuer_der: crl.issuer().as_raw().to_vec(),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            der: der.to_vec(),
            parsed: CertRevocationList::Owned(parsed),
        })
    }

    /// Whether `issuer`'s key signed this CRL, and its keyUsage (if it has one) allows that.
    fn signed_by(&self, issuer: &X509) -> bool {
        let Ok(issuer_der) = issuer.to_der() else { return false };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&issuer_der) else {
            return false;
        };
        if cert.key_usage().ok().flatten().is_some_and(|ku| !ku.value.crl_sign()) {
            return false;
        }
        let Ok((_, crl)) = x509_parser::revocation_list::CertificateRevocationList::from_der(&self.der) else {
            return false;
        };
        crl.verify_signature(cert.public_key()).is_ok()
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
    cas: Vec<X509>,
    anchors: Vec<TrustAnchor<'static>>,
    anchor_checks: Vec<profile::Checked>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<Arc<Crl>>,
}

impl Builder {
    pub fn new(settings: Settings) -> Builder {
        Builder {
            settings,
            cas: Vec::new(),
            anchors: Vec::new(),
            anchor_checks: Vec::new(),
            intermediates: Vec::new(),
            crls: Vec::new(),
        }
    }

    /// Adds a CA from `ca_files`: a self-issued one is a trust anchor, another one an issuer
    /// that paths may go through (as if the client had sent it). A certificate that may not act
    /// as a CA is left out, and the returned warning says why.
    pub fn add_ca(&mut self, cert: &X509) -> Result<Option<String>, String> {
        let der = cert.to_der().map_err(|e| format!("unreadable certificate: {e}"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| format!("unreadable certificate: {e}"))?;
        self.cas.push(cert.clone());
        let self_issued = parsed.subject().as_raw() == parsed.issuer().as_raw();
        let subject = crate::identity::rfc2253(cert.subject_name());
        let role = if self_issued { Role::Anchor } else { Role::Intermediate };
        let checked = match profile::check(&der, role) {
            Ok(c) => c,
            Err(why) => return Ok(Some(format!("{subject} is not used: {why}"))),
        };
        let der = CertificateDer::from(der);
        if self_issued {
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| format!("{subject} cannot be a trust anchor: {e}"))?
                .to_owned();
            self.anchors.push(anchor);
            self.anchor_checks.push(checked);
        } else {
            self.intermediates.push(der);
        }
        Ok(None)
    }

    /// Adds a CRL (after every CA). One whose issuer's name is a store CA's must be signed by
    /// that CA's key; one of another issuer is checked against the issuer in the client's path.
    pub fn add_crl(&mut self, crl: Crl) -> Result<(), String> {
        let same_name: Vec<&X509> = self
            .cas
            .iter()
            .filter(|c| c.subject_name().to_der().is_ok_and(|n| n == crl.issuer_der))
            .collect();
        if !same_name.is_empty() && !same_name.iter().any(|ca| crl.signed_by(ca)) {
            return Err(format!(
                "the CRL of {} is not signed by the key of any CA of that name in ca_files whose keyUsage allows cRLSign",
                crl.issuer
            ));
        }
        self.crls.push(Arc::new(crl));
        Ok(())
    }

    pub fn build(mut self) -> TrustStore {
        let ca_names = self
            .settings
            .advertise_ca_names
            .then(|| self.cas.iter().filter_map(|c| c.subject_name().to_der().ok()).collect());
        // webpki takes the first CRL of an issuer: of two, the newer one counts.
        self.crls.sort_by_key(|c| std::cmp::Reverse(c.this_update));
        TrustStore {
            name: self.settings.name,
            max_chain_depth: self.settings.max_chain_depth,
            ca_names,
            cas: self.cas,
            crls: self.crls,
            anchors: self.anchors,
            anchor_checks: self.anchor_checks,
            intermediates: self.intermediates,
            revocation: self.settings.crl,
            algs: memo::wrap(webpki::ALL_VERIFICATION_ALGS),
        }
    }
}

/// A compiled trust store.
pub struct TrustStore {
    pub name: Arc<str>,
    /// Most certificates a verified chain may hold, leaf and root included (CloudFront's
    /// "chain depth").
    pub max_chain_depth: u32,
    /// DER subjects of the CAs, sent in the CertificateRequest when advertising is on.
    pub ca_names: Option<Vec<Vec<u8>>>,
    /// The CAs and CRLs loaded, for the lifecycle metrics.
    pub cas: Vec<X509>,
    pub crls: Vec<Arc<Crl>>,
    anchors: Vec<TrustAnchor<'static>>,
    /// What the edge checks of each anchor on each path (webpki reduces an anchor to its name,
    /// key and name constraints): its dates and its pathLenConstraint, index for index.
    anchor_checks: Vec<profile::Checked>,
    /// Store CAs that are not self-issued: issuers a path may go through.
    intermediates: Vec<CertificateDer<'static>>,
    revocation: Option<(CrlScope, ExpiredCrl)>,
    /// webpki's algorithms, each behind the store's memo of verified signatures.
    algs: Vec<memo::Memo>,
}

/// The refusal for a verifier error.
fn refusal(e: &webpki::Error) -> Refusal {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => Refusal::ClientCertExpired,
        E::CertNotValidYet { .. } => Refusal::ClientCertNotYetValid,
        E::CertRevoked => Refusal::ClientCertRevoked,
        E::UnknownRevocationStatus | E::CrlExpired { .. } => Refusal::ClientCertRevocationUnknown,
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            Refusal::ClientCertIntentInvalid
        }
        E::PathLenConstraintViolated => Refusal::ClientCertPathLenExceeded,
        E::MaximumPathDepthExceeded => Refusal::ClientCertMaxChainDepthExceeded,
        E::NameConstraintViolation => Refusal::ClientCertNameConstraintsViolated,
        E::UnknownIssuer
        | E::CertDistrusted
        | E::InvalidSignatureForPublicKey
        | E::SignatureAlgorithmMismatch
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::EndEntityUsedAsCa => Refusal::ClientCertUntrusted,
        _ => Refusal::ClientCertInvalid,
    }
}

/// The TLS alert a refusal is sent with.
pub fn alert(reason: Refusal) -> boring::ssl::SslAlert {
    use boring::ssl::SslAlert;
    match reason {
        Refusal::ClientCertExpired | Refusal::ClientCertNotYetValid => SslAlert::CERTIFICATE_EXPIRED,
        Refusal::ClientCertRevoked => SslAlert::CERTIFICATE_REVOKED,
        Refusal::ClientCertUntrusted
        | Refusal::ClientCertPathLenExceeded
        | Refusal::ClientCertMaxChainDepthExceeded
        | Refusal::ClientCertNameConstraintsViolated => SslAlert::UNKNOWN_CA,
        Refusal::ClientCertIntentInvalid => SslAlert::UNSUPPORTED_CERTIFICATE,
        Refusal::ClientCertRevocationUnknown => SslAlert::CERTIFICATE_UNKNOWN,
        _ => SslAlert::BAD_CERTIFICATE,
    }
}

fn unix(now: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)))
}

impl TrustStore {
    /// Decides on a client's chain at `now` (unix seconds): `leaf` and the other certificates
    /// it sent, in any order (DER).
    pub fn verify(&self, leaf: &[u8], sent: &[&[u8]], now: i64) -> Result<(), Refused> {
        let invalid = |why: String| Refused::new(Refusal::ClientCertInvalid, why);
        let leaf_der = CertificateDer::from(leaf);
        let ee = EndEntityCert::try_from(&leaf_der).map_err(|e| Refused::new(refusal(&e), format!("{e}")))?;
        // A client's certificate that may not act as a CA is not a candidate issuer.
        let candidates: Vec<CertificateDer<'_>> = sent
            .iter()
            .filter(|c| profile::check(c, Role::Intermediate).is_ok())
            .map(|c| CertificateDer::from(*c))
            .chain(self.intermediates.iter().map(|c| CertificateDer::from(c.as_ref())))
            .collect();
        let crls: Vec<&CertRevocationList<'_>> = self
            .crls
            .iter()
            .filter(|c| c.this_update <= now)
            .map(|c| &c.parsed)
            .collect();
        let revocation = match self.revocation {
            None => None,
            Some((scope, expired)) => {
                let builder = RevocationOptionsBuilder::new(&crls)
                    .map_err(|_| Refused::new(Refusal::ClientCertRevocationUnknown, "no CRL of this store is valid yet"))?;
                Some(
                    builder
                        .with_depth(match scope {
                            CrlScope::Chain => RevocationCheckDepth::Chain,
                            CrlScope::Leaf => RevocationCheckDepth::EndEntity,
                        })
                        .with_status_policy(UnknownStatusPolicy::Deny)
                        .with_expiration_policy(match expired {
                            ExpiredCrl::Refuse => ExpirationPolicy::Enforce,
                            ExpiredCrl::Enforce => ExpirationPolicy::Ignore,
                        })
                        .build(),
                )
            }
        };
        let path_ok = |path: &VerifiedPath<'_>| self.path_ok(path, now);
        let algs: Vec<&dyn rustls_pki_types::SignatureVerificationAlgorithm> =
            self.algs.iter().map(|a| a as &dyn rustls_pki_types::SignatureVerificationAlgorithm).collect();
        ee.verify_for_usage(
            &algs,
            &self.anchors,
            &candidates,
            unix(now),
            KeyUsage::client_auth(),
            revocation,
            Some(&path_ok),
        )
        .map_err(|e| {
            let subject = X509::from_der(leaf)
                .map(|c| crate::identity::rfc2253(c.subject_name()))
                .unwrap_or_default();
            Refused::new(refusal(&e), format!("{subject}: {}", self.describe(&e)))
        })?;
        // After the path, so that a certificate no anchor vouches for is refused as untrusted.
        profile::check(leaf, Role::Client).map(|_| ()).map_err(invalid)
    }

    /// What a verifier error says, in words for the log.
    fn describe(&self, e: &webpki::Error) -> String {
        use webpki::Error as E;
        let at = |t: &UnixTime| crate::identity::iso8601(t.as_secs() as i64);
        match e {
            E::CertExpired { not_after, .. } => format!("a certificate of the path expired at {}", at(not_after)),
            E::CertNotValidYet { not_before, .. } => {
                format!("a certificate of the path is not valid before {}", at(not_before))
            }
            E::CertRevoked => "revoked by the CRL of its issuer, or a CA of its path is".into(),
            E::CrlExpired { next_update, .. } => format!("a CRL of the path expired at {}", at(next_update)),
            E::UnknownRevocationStatus => "no CRL speaks for a certificate of the path".into(),
            E::UnknownIssuer => "no path to a trust anchor of this store".into(),
            E::MaximumPathDepthExceeded => format!("no path of at most {} certificates", self.max_chain_depth),
            E::PathLenConstraintViolated => "a CA's pathLenConstraint is exceeded on every path".into(),
            E::NameConstraintViolation => "a name is outside a CA's nameConstraints".into(),
            E::RequiredEkuNotFoundContext(_) => "its extendedKeyUsage lacks clientAuth".into(),
            E::MaximumSignatureChecksExceeded | E::MaximumPathBuildCallsExceeded | E::MaximumNameConstraintComparisonsExceeded => {
                format!("path building gave up: {e:?}")
            }
            e => format!("{e:?}"),
        }
    }

    /// [`verify`](Self::verify) for a chain as the client sent it, leaf first.
    pub fn verify_chain(&self, chain: &[X509], now: i64) -> Result<(), Refused> {
        let ders = chain
            .iter()
            .map(|c| c.to_der())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Refused::new(Refusal::ClientCertInvalid, format!("unreadable certificate: {e}")))?;
        let Some((leaf, sent)) = ders.split_first() else {
            return Err(Refused::new(Refusal::ClientCertMissing, "no client certificate"));
        };
        let sent: Vec<&[u8]> = sent.iter().map(Vec::as_slice).collect();
        self.verify(leaf, &sent, now)
    }

    /// What the edge requires of a candidate path beyond webpki: the chain depth, and the
    /// trust anchor's dates and pathLenConstraint. A path that fails is backtracked.
    fn path_ok(&self, path: &VerifiedPath<'_>, now: i64) -> Result<(), webpki::Error> {
        // Self-issued intermediates (a CA's key rollover) do not count, as in RFC 5280 6.1.4.
        let intermediates = path.intermediate_certificates().filter(|c| c.subject() != c.issuer()).count();
        if intermediates + 2 > self.max_chain_depth as usize {
            return Err(webpki::Error::MaximumPathDepthExceeded);
        }
        // An anchor is a name and a key: of the store's certificates for it (a root and its
        // renewal), the path may use any one whose dates and pathLenConstraint allow it.
        let anchor = path.anchor();
        let mut refusal = webpki::Error::UnknownIssuer;
        let same = self
            .anchors
            .iter()
            .zip(&self.anchor_checks)
            .filter(|(a, _)| a.subject == anchor.subject && a.subject_public_key_info == anchor.subject_public_key_info);
        for (_, c) in same {
            refusal = if now > c.not_after {
                webpki::Error::CertExpired {
                    time: unix(now),
                    not_after: unix(c.not_after),
                }
            } else if now < c.not_before {
                webpki::Error::CertNotValidYet {
                    time: unix(now),
                    not_before: unix(c.not_before),
                }
            } else if c.path_len.is_some_and(|l| intermediates > l) {
                // The anchor's pathLen counts the CAs below it, which are the intermediates.
                webpki::Error::PathLenConstraintViolated
            } else {
                return Ok(());
            };
        }
        Err(refusal)
    }
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
        let mut b = Builder::new(settings());
        b.add_ca(&x509(&trusted.cert_pem)).unwrap();
        let e = b.add_crl(crl(&impostor.crl(&[]).unwrap())).unwrap_err();
        assert!(e.contains("not signed by the key of any CA"), "{e}");
        b.add_crl(crl(&trusted.crl(&[]).unwrap())).unwrap();
    }

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let n = content.len();
        let mut out = vec![tag];
        match n {
            0..=127 => out.push(n as u8),
            128..=255 => out.extend_from_slice(&[0x81, n as u8]),
            _ => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// A CA whose keyUsage is `usages`, and a CRL of it built by hand (rcgen always writes a
    /// cRLNumber and will not sign without cRLSign): `crl_number` is `None` or whether the
    /// extension is critical.
    fn hand_made_crl(usages: Vec<rcgen::KeyUsagePurpose>, crl_number: Option<bool>) -> (X509, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "Hand CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = usages;
        let ca = x509(&p.self_signed(&key).unwrap().pem());
        let ecdsa_sha256 = tlv(0x30, &tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]));
        let time = |t: time::OffsetDateTime| {
            let f = time::macros::format_description!("[year repr:last_two][month][day][hour][minute][second]Z");
            tlv(0x17, t.format(&f).unwrap().as_bytes())
        };
        let now = time::OffsetDateTime::now_utc();
        let mut tbs = [
            tlv(0x02, &[1]),
            ecdsa_sha256.clone(),
            ca.subject_name().to_der().unwrap(),
            time(now - time::Duration::hours(1)),
            time(now + time::Duration::days(1)),
        ]
        .concat();
        if let Some(critical) = crl_number {
            let mut ext = tlv(0x06, &[0x55, 0x1d, 0x14]);
            if critical {
                ext.extend(tlv(0x01, &[0xff]));
            }
            ext.extend(tlv(0x04, &tlv(0x02, &[1])));
            tbs.extend(tlv(0xa0, &tlv(0x30, &tlv(0x30, &ext))));
        }
        let tbs = tlv(0x30, &tbs);
        let pkey = boring::pkey::PKey::private_key_from_der(&key.serialize_der()).unwrap();
        let mut signer = boring::sign::Signer::new(boring::hash::MessageDigest::sha256(), &pkey).unwrap();
        let sig = signer.sign_oneshot_to_vec(&tbs).unwrap();
        let bits = [vec![0], sig].concat();
        (ca, tlv(0x30, &[tbs, ecdsa_sha256, tlv(0x03, &bits)].concat()))
    }

    #[test]
    fn a_crl_needs_a_non_critical_crl_number_and_an_issuer_that_may_sign_crls() {
        use rcgen::KeyUsagePurpose::{CrlSign, KeyCertSign};
        // The control: a well-formed hand-made CRL is taken.
        let (ca, der) = hand_made_crl(vec![KeyCertSign, CrlSign], Some(false));
        let mut b = Builder::new(settings());
        b.add_ca(&ca).unwrap();
        b.add_crl(Crl::from_der(&der).unwrap()).unwrap();
        let (_, der) = hand_made_crl(vec![KeyCertSign, CrlSign], None);
        let e = Crl::from_der(&der).unwrap_err();
        assert!(e.contains("no cRLNumber"), "{e}");
        let (_, der) = hand_made_crl(vec![KeyCertSign, CrlSign], Some(true));
        let e = Crl::from_der(&der).unwrap_err();
        assert!(e.contains("critical cRLNumber"), "{e}");
        let (ca, der) = hand_made_crl(vec![KeyCertSign], Some(false));
        let mut b = Builder::new(settings());
        b.add_ca(&ca).unwrap();
        let e = b.add_crl(Crl::from_der(&der).unwrap()).unwrap_err();
        assert!(e.contains("cRLSign"), "{e}");
    }

    /// A chain root → issuing CA → device, with the root's CRL and `issuing_crl` loaded.
    fn verify_with(issuing_crl: impl Fn(&Ca) -> String) -> Result<(), Refused> {
        let root = Ca::root("Root").unwrap();
        let issuing = root.intermediate("Issuing", None).unwrap();
        let device = issuing.issue(&LeafSpec::client("device")).unwrap();
        let mut b = Builder::new(settings());
        b.add_ca(&x509(&root.cert_pem)).unwrap();
        b.add_ca(&x509(&issuing.cert_pem)).unwrap();
        b.add_crl(crl(&root.crl(&[]).unwrap())).unwrap();
        b.add_crl(crl(&issuing_crl(&issuing))).unwrap();
        let store = b.build();
        store.verify_chain(&[x509(&device.cert_pem)], crate::rules::facts::unix_now())
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
