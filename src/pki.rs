//! Generates X.509 test and demo PKIs (CAs, device, server and origin-client certificates, CRLs).
//! The demo and the test suite use it so that no private key is ever committed; the edge itself
//! never calls it at run time.

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub type PkiResult<T> = Result<T, String>;

fn rc<T>(what: &str, r: Result<T, rcgen::Error>) -> PkiResult<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// A certificate authority that can issue certificates and CRLs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of this CA's own certificate.
    pub cert_pem: String,
    /// PEM of the chain above this CA, excluding the root (intermediates only).
    chain_above: Vec<String>,
    next_serial: std::cell::Cell<u64>,
}

/// An issued end-entity (or CA) certificate with its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Serial number as big-endian bytes.
    pub serial: Vec<u8>,
    /// PEM of the intermediates between this certificate and the root, nearest first.
    pub chain_pem: Vec<String>,
}

impl Issued {
    /// Leaf followed by its intermediates: what a client or server presents.
    pub fn full_chain_pem(&self) -> String {
        let mut s = self.cert_pem.clone();
        for c in &self.chain_pem {
            s.push_str(c);
        }
        s
    }

    /// Writes `<stem>.pem` (leaf plus intermediates) and `<stem>.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> PkiResult<()> {
        write_file(&dir.join(format!("{stem}.pem")), &self.full_chain_pem(), false)?;
        write_file(&dir.join(format!("{stem}.key")), &self.key_pem, true)
    }
}

/// What kind of leaf to issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// TLS client (device, partner, the edge toward its origin): clientAuth EKU.
    Client,
    /// TLS server: serverAuth EKU.
    Server,
}

/// Parameters of a leaf certificate. `LeafSpec::client("device-1")` is a valid device.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub cn: String,
    pub org: Option<String>,
    pub org_unit: Option<String>,
    pub usage: Usage,
    /// Overrides the EKU that `usage` implies (for negative tests); `Some(vec![])` omits it.
    pub eku: Option<Vec<ExtendedKeyUsagePurpose>>,
    /// Overrides the key usage (digitalSignature by default).
    pub key_usage: Option<Vec<KeyUsagePurpose>>,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    /// Validity relative to now.
    pub not_before: Duration,
    pub not_after: Duration,
}

impl LeafSpec {
    pub fn client(cn: &str) -> Self {
        LeafSpec {
            cn: cn.to_string(),
            org: None,
            org_unit: None,
            usage: Usage::Client,
            eku: None,
            key_usage: None,
            dns: Vec::new(),
            uris: Vec::new(),
            not_before: Duration::days(-1),
            not_after: Duration::days(365),
        }
    }

    pub fn server(cn: &str, dns: &[&str]) -> Self {
        LeafSpec {
            usage: Usage::Server,
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ..LeafSpec::client(cn)
        }
    }
}

fn dn(cn: &str, org: Option<&str>, ou: Option<&str>) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    if let Some(o) = org {
        d.push(DnType::OrganizationName, o);
    }
    if let Some(ou) = ou {
        d.push(DnType::OrganizationalUnitName, ou);
    }
    d.push(DnType::CommonName, cn);
    d
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn, Some("mtls-edge test PKI"), None);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = OffsetDateTime::now_utc() - Duration::days(2);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

impl Ca {
    /// A self-signed root CA. Two roots with the same `cn` have the same names but different keys.
    pub fn root(cn: &str) -> PkiResult<Ca> {
        let key = rc("generate key", KeyPair::generate())?;
        let params = ca_params(cn, None);
        let cert = rc("self-sign root", params.self_signed(&key))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            chain_above: Vec::new(),
            next_serial: std::cell::Cell::new(1000),
        })
    }

    /// An intermediate CA under this one, with an optional pathLenConstraint.
    pub fn intermediate(&self, cn: &str, path_len: Option<u8>) -> PkiResult<Ca> {
        let key = rc("generate key", KeyPair::generate())?;
        let mut params = ca_params(cn, path_len);
        params.serial_number = Some(self.serial());
        let cert = rc("sign intermediate", params.signed_by(&key, &self.issuer))?;
        let mut chain_above = vec![cert.pem()];
        chain_above.extend(self.chain_above.iter().cloned());
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            chain_above,
            next_serial: std::cell::Cell::new(5000),
        })
    }

    fn serial(&self) -> SerialNumber {
        let n = self.next_serial.get();
        self.next_serial.set(n + 1);
        // A leading nonzero byte keeps the DER positive and the serial unique per issuer.
        let mut bytes = vec![0x4d];
        bytes.extend_from_slice(&n.to_be_bytes());
        SerialNumber::from_slice(&bytes)
    }

    /// Issues a leaf certificate.
    pub fn issue(&self, spec: &LeafSpec) -> PkiResult<Issued> {
        let key = rc("generate key", KeyPair::generate())?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&spec.cn, spec.org.as_deref(), spec.org_unit.as_deref());
        let now = OffsetDateTime::now_utc();
        p.not_before = now + spec.not_before;
        p.not_after = now + spec.not_after;
        let serial = self.serial();
        p.serial_number = Some(serial.clone());
        p.key_usages = spec
            .key_usage
            .clone()
            .unwrap_or_else(|| vec![KeyUsagePurpose::DigitalSignature]);
        p.extended_key_usages = spec.eku.clone().unwrap_or_else(|| match spec.usage {
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        });
        for d in &spec.dns {
            p.subject_alt_names
                .push(SanType::DnsName(rc("dns name", d.clone().try_into())?));
        }
        for u in &spec.uris {
            p.subject_alt_names.push(SanType::URI(rc("uri", u.clone().try_into())?));
        }
        p.use_authority_key_identifier_extension = true;
        let cert = rc("sign leaf", p.signed_by(&key, &self.issuer))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.as_ref().to_vec(),
            chain_pem: self.chain_above.clone(),
        })
    }

    /// A CRL signed by this CA that revokes the given serials, valid for 30 days.
    pub fn crl(&self, revoked_serials: &[&[u8]]) -> PkiResult<String> {
        self.crl_valid(revoked_serials, Duration::hours(-1), Duration::days(30))
    }

    /// A CRL whose thisUpdate and nextUpdate are these offsets from now (negative: past).
    pub fn crl_valid(
        &self,
        revoked_serials: &[&[u8]],
        this_update: Duration,
        next_update: Duration,
    ) -> PkiResult<String> {
        self.crl_with(revoked_serials, this_update, next_update, None)
    }

    /// A CRL that says it covers only CA certificates (`ca_only`) or only end entities.
    pub fn crl_scoped(&self, ca_only: bool) -> PkiResult<String> {
        let scope = if ca_only {
            rcgen::CrlScope::CaCertsOnly
        } else {
            rcgen::CrlScope::UserCertsOnly
        };
        self.crl_with(&[], Duration::hours(-1), Duration::days(30), Some(scope))
    }

    fn crl_with(
        &self,
        revoked_serials: &[&[u8]],
        this_update: Duration,
        next_update: Duration,
        scope: Option<rcgen::CrlScope>,
    ) -> PkiResult<String> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now + this_update,
            next_update: now + next_update,
            crl_number: self.serial(),
            issuing_distribution_point: scope.map(|scope| rcgen::CrlIssuingDistributionPoint {
                distribution_point: rcgen::CrlDistributionPoint {
                    uris: vec!["http://crl.example/ca.crl".into()],
                },
                scope: Some(scope),
            }),
            revoked_certs: revoked_serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(30),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        rc("sign CRL", params.signed_by(&self.issuer))?
            .pem()
            .map_err(|e| format!("encode CRL: {e}"))
    }
}

/// A self-signed client certificate (no CA behind it): an impostor for negative tests.
pub fn self_signed_client(spec: &LeafSpec) -> PkiResult<Issued> {
    let key = rc("generate key", KeyPair::generate())?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&spec.cn, spec.org.as_deref(), spec.org_unit.as_deref());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = OffsetDateTime::now_utc() + spec.not_before;
    p.not_after = OffsetDateTime::now_utc() + spec.not_after;
    let cert = rc("self-sign leaf", p.self_signed(&key))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial: Vec::new(),
        chain_pem: Vec::new(),
    })
}

/// Writes a file, creating parent directories; `private` files get mode 0600.
pub fn write_file(path: &Path, contents: &str, private: bool) -> PkiResult<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    fs::write(path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
