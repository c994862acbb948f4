//! Origins and origin mTLS: each origin's address, the client certificate the edge presents to
//! it (clientAuth EKU checked at load), the CA that must have issued the origin's server
//! certificate, and the hostname it must carry. A peer is always TLS with verification on;
//! there is no plaintext or unverified fallback. Connections are pooled by pingora per peer.

use std::sync::Arc;
use std::time::Duration;

use boring::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::CertKey;
use pingora::ErrorType;

use crate::config::{self, Ctx};

/// A compiled origin: a peer template cloned for each request.
pub struct Origin {
    pub name: Arc<str>,
    peer: HttpPeer,
}

impl Origin {
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }

    /// The name the origin's certificate must carry.
    pub fn sni(&self) -> &str {
        &self.peer.sni
    }
}

/// OID of the id-kp-clientAuth extended key usage.
fn has_client_auth_eku(cert: &X509) -> Result<bool, String> {
    let der = cert.to_der().map_err(|e| e.to_string())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    match parsed.extended_key_usage() {
        Ok(Some(eku)) => Ok(eku.value.client_auth || eku.value.any),
        Ok(None) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Builds one origin; errors name `origins.NAME.KEY`.
pub fn build(ctx: &mut Ctx, name: &str, o: &config::Origin) -> Option<Origin> {
    let key = format!("origins.{name}");
    let ca = ctx.load_chain(&format!("{key}.ca_file"), &o.ca_file);
    let chain = ctx.load_chain(&format!("{key}.client_cert"), &o.client_cert);
    let pkey = ctx.load_key(&format!("{key}.client_key"), &o.client_key);
    let (ca, chain, pkey) = (ca?, chain?, pkey?);
    ctx.check_key_matches(&format!("{key}.client_key"), &chain[0], &pkey, &o.client_cert)?;
    match has_client_auth_eku(&chain[0]) {
        Ok(true) => {}
        Ok(false) => {
            ctx.error(
                format!("{key}.client_cert"),
                format!(
                    "{}: the certificate has no clientAuth extended key usage, so origins will refuse it",
                    o.client_cert
                ),
            );
            return None;
        }
        Err(e) => {
            ctx.error(
                format!("{key}.client_cert"),
                format!("{}: cannot read extensions: {e}", o.client_cert),
            );
            return None;
        }
    }
    let addr: std::net::SocketAddr = match o.address.parse() {
        Ok(a) => a,
        Err(e) => {
            ctx.error(format!("{key}.address"), e.to_string());
            return None;
        }
    };
    let mut peer = HttpPeer::new_mtls(addr, o.sni.clone(), Arc::new(CertKey::new(chain, pkey)));
    peer.options.verify_cert = true;
    peer.options.verify_hostname = true;
    peer.options.ca = Some(Arc::new(ca.into_boxed_slice()));
    peer.options.connection_timeout = Some(Duration::from_secs(o.connect_timeout_secs));
    peer.options.total_connection_timeout = Some(Duration::from_secs(o.connect_timeout_secs * 2));
    peer.options.read_timeout = Some(Duration::from_secs(o.read_timeout_secs));
    peer.options.write_timeout = Some(Duration::from_secs(o.read_timeout_secs));
    peer.options.idle_timeout = Some(Duration::from_secs(o.idle_timeout_secs));
    // The CA bundle is not part of pingora's pool key: keep each origin's pool apart.
    peer.group_key = group_key(name);
    Some(Origin {
        name: Arc::from(name),
        peer,
    })
}

fn group_key(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// Why an origin request failed, as a metric label and log reason.
///
/// pingora 0.9 reports a failed upstream certificate check as `InvalidCert` without BoringSSL's
/// verify result, so an untrusted issuer, a wrong host name and an expired certificate share
/// the reason `OriginCertInvalid`; the log line names the SNI the certificate was checked for.
pub fn failure_reason(e: &pingora::Error) -> &'static str {
    let text = format!("{e}").to_ascii_lowercase();
    let tls_alert = text.contains("alert");
    match e.etype() {
        ErrorType::InvalidCert => "OriginCertInvalid",
        _ if text.contains("certificate_verify_failed") => "OriginCertInvalid",
        // The origin's alert about our certificate: during the handshake (TLS 1.2) or on the
        // first read after it (TLS 1.3, where the client finishes first).
        _ if tls_alert
            && ["certificate", "unknown_ca", "unknown ca", "access_denied"]
                .iter()
                .any(|w| text.contains(w)) =>
        {
            "OriginRefusedClientCert"
        }
        ErrorType::ConnectTimedout => "ConnectTimeout",
        ErrorType::ConnectRefused => "ConnectRefused",
        ErrorType::TLSHandshakeFailure | ErrorType::HandshakeError => "OriginTlsHandshakeFailed",
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "OriginTimeout",
        _ => "OriginConnectionError",
    }
}
