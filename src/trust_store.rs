//! Trust stores for client-certificate verification: CA bundles (roots and intermediates), CRLs,
//! the depth limit and the CA names a listener may advertise. A store is built once, off the
//! handshake path, and shared by reference count with every connection that uses it.

use std::collections::BTreeMap;
use std::sync::Arc;

use boring::ssl::{SslContext, SslContextBuilder, SslMethod};
use boring::x509::store::X509StoreRef;
use boring::x509::verify::X509VerifyFlags;
use boring::x509::X509;

use crate::config::{self, CrlCheck, Ctx};

/// A compiled trust store.
pub struct TrustStore {
    pub name: Arc<str>,
    /// Holds the `X509_STORE` (certificates and CRLs). BoringSSL loads CRLs only through its
    /// file loader, which fills a context's store; the context itself is never used for TLS.
    holder: SslContext,
    /// OpenSSL/nginx `verify_depth`: how many CA certificates may stand above the leaf.
    pub max_chain_depth: u32,
    /// DER subjects of the CAs, sent in the CertificateRequest when advertising is on.
    pub ca_names: Option<Vec<Vec<u8>>>,
}

impl TrustStore {
    pub fn store(&self) -> &X509StoreRef {
        self.holder.cert_store()
    }
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
    for (i, f) in t.ca_files.iter().enumerate() {
        let fkey = format!("{key}.ca_files[{i}]");
        let Some(pem) = ctx.read(&fkey, f) else {
            ok = false;
            continue;
        };
        match X509::stack_from_pem(&pem) {
            Ok(certs) if certs.is_empty() => {
                ctx.error(&fkey, format!("{f}: no PEM certificate in the file"));
                ok = false;
            }
            Ok(certs) => {
                for c in &certs {
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
            Err(e) => {
                ctx.error(&fkey, format!("{f}: not a PEM certificate bundle: {e}"));
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
        name: Arc::from(name),
        holder: builder.build(),
        max_chain_depth: t.max_chain_depth,
        ca_names: t.advertise_ca_names.then_some(ca_names),
    })
}
