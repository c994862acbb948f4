//! Trust stores for client-certificate verification: CA bundles (roots and intermediates), CRLs,
//! the depth limit and the CA names a listener may advertise. A store is built once, off the
//! handshake path, and shared by reference count with every connection that uses it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use boring::hash::MessageDigest;
use boring::ssl::{SslContext, SslContextBuilder, SslMethod};
use boring::x509::store::X509StoreRef;
use boring::x509::verify::X509VerifyFlags;
use boring::x509::X509Ref;

use crate::config::{self, CrlCheck, Ctx};

/// A compiled trust store.
pub struct TrustStore {
    /// Holds the `X509_STORE` (certificates and CRLs). BoringSSL loads CRLs only through its
    /// file loader, which fills a context's store; the context itself is never used for TLS.
    holder: SslContext,
    /// Most certificates a verified chain may hold, leaf and root included (CloudFront's
    /// "chain depth"), checked by `viewer_tls` once the chain has verified.
    pub max_chain_depth: u32,
    /// SHA-256 of each intermediate CA in the store that carries a pathLenConstraint → the limit.
    /// BoringSSL checks constraints only on certificates the client sent, so the handshake
    /// checks these itself (see `viewer_tls`).
    pub path_len: HashMap<Vec<u8>, usize>,
    /// DER subjects of the CAs, sent in the CertificateRequest when advertising is on.
    pub ca_names: Option<Vec<Vec<u8>>>,
}

impl TrustStore {
    pub fn store(&self) -> &X509StoreRef {
        self.holder.cert_store()
    }

    /// Whether a verified chain (leaf first) respects the pathLenConstraint of every store
    /// intermediate in it: a CA at index `i` has `i - 1` CA certificates below it.
    pub fn path_len_ok<'a>(&self, chain: impl Iterator<Item = &'a X509Ref>) -> bool {
        if self.path_len.is_empty() {
            return true;
        }
        chain.enumerate().skip(2).all(|(i, cert)| {
            let limit = cert
                .digest(MessageDigest::sha256())
                .ok()
                .and_then(|d| self.path_len.get(d.as_ref()).copied());
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

/// Builds every trust store in the config; errors name `trust_stores.NAME.KEY`.
pub fn build_all(ctx: &mut Ctx, stores: &BTreeMap<String, config::TrustStore>) -> BTreeMap<String, Arc<TrustStore>> {
    stores
        .iter()
        .filter_map(|(name, t)| build(ctx, name, t).map(|s| (name.clone(), Arc::new(s))))
        .collect()
}

fn build(ctx: &mut Ctx, name: &str, t: &config::TrustStore) -> Option<TrustStore> {
    let key = format!("trust_stores.{name}");
    let mut builder = match SslContextBuilder::new(SslMethod::tls()) {
        Ok(b) => b,
        Err(e) => {
            ctx.error(&key, format!("cannot create a certificate store: {e}"));
            return None;
        }
    };
    let mut ok = true;
    let mut ca_names = Vec::new();
    let mut path_len = HashMap::new();
    for (i, f) in t.ca_files.iter().enumerate() {
        let fkey = format!("{key}.ca_files[{i}]");
        let Some(certs) = ctx.load_chain(&fkey, f) else {
            ok = false;
            continue;
        };
        for c in &certs {
            if let (Some(p), Ok(d)) = (intermediate_path_len(c), c.digest(MessageDigest::sha256())) {
                path_len.insert(d.to_vec(), p);
            }
            match c.subject_name().to_der() {
                Ok(n) => ca_names.push(n),
                Err(e) => {
                    ctx.error(&fkey, format!("{f}: unreadable subject name: {e}"));
                    ok = false;
                }
            }
            if let Err(e) = builder.cert_store_mut().add_cert(c) {
                ctx.error(&fkey, format!("{f}: cannot add certificate: {e}"));
                ok = false;
            }
        }
    }
    for (i, f) in t.crl_files.iter().enumerate() {
        let fkey = format!("{key}.crl_files[{i}]");
        let Some(pem) = ctx.read(&fkey, f) else {
            ok = false;
            continue;
        };
        if !pem.windows(24).any(|w| w == b"-----BEGIN X509 CRL-----") {
            ctx.error(&fkey, format!("{f}: no PEM CRL (-----BEGIN X509 CRL-----) in the file"));
            ok = false;
            continue;
        }
        // The file loader takes both certificates and CRLs from a PEM bundle.
        if let Err(e) = builder.set_ca_file(ctx.path(f)) {
            ctx.error(&fkey, format!("{f}: not a valid CRL: {e}"));
            ok = false;
        }
    }
    if !t.crl_files.is_empty() {
        let flags = match t.crl_check {
            CrlCheck::Chain => X509VerifyFlags::CRL_CHECK | X509VerifyFlags::CRL_CHECK_ALL,
            CrlCheck::Leaf => X509VerifyFlags::CRL_CHECK,
        };
        builder.cert_store_mut().set_flags(flags);
    }
    if !ok {
        return None;
    }
    Some(TrustStore {
        holder: builder.build(),
        max_chain_depth: t.max_chain_depth,
        path_len,
        ca_names: t.advertise_ca_names.then_some(ca_names),
    })
}
