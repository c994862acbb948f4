//! Origins and origin mTLS: each origin's address, the client certificate the edge presents to
//! it (clientAuth EKU checked at load), the CA that must have issued the origin's server
//! certificate, and the hostname it must carry. A peer is always TLS with verification on;
//! there is no plaintext or unverified fallback. Connections are pooled by pingora per peer.
//! Shield nodes are peers of the same kind (`shield`).

use std::sync::Arc;
use std::time::Duration;

use boring::pkey::{PKey, Private};
use boring::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::CertKey;
use pingora::ErrorType;

use crate::reason::OriginFailure;

/// A compiled origin: a peer template cloned for each request.
pub struct Origin {
    pub name: Arc<str>,
    address: std::net::SocketAddr,
    peer: HttpPeer,
}

impl Origin {
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }

    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// A peer without TLS material, for tests that only place peers.
    #[cfg(test)]
    pub fn test_peer(name: &str, address: std::net::SocketAddr) -> Origin {
        Origin {
            name: Arc::from(name),
            address,
            peer: HttpPeer::new(address, true, name.to_string()),
        }
    }

    /// The name the origin's certificate must carry.
    pub fn sni(&self) -> &str {
        &self.peer.sni
    }
}

/// An origin as the config describes it, its files read.
pub struct Settings {
    pub name: String,
    pub address: std::net::SocketAddr,
    /// Sent as SNI and checked against the origin's certificate; never empty.
    pub sni: String,
    /// CAs that may issue the origin's certificate.
    pub ca: Vec<X509>,
    /// The edge's client certificate for this origin (leaf first) and its key.
    pub client_chain: Vec<X509>,
    pub client_key: PKey<Private>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Origin {
    pub fn new(s: Settings) -> Origin {
        let group_key = group_key(&s);
        let mut peer = HttpPeer::new_mtls(s.address, s.sni, Arc::new(CertKey::new(s.client_chain, s.client_key)));
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer.options.ca = Some(Arc::new(s.ca.into_boxed_slice()));
        peer.options.connection_timeout = Some(s.connect_timeout);
        peer.options.total_connection_timeout = Some(s.connect_timeout * 2);
        peer.options.read_timeout = Some(s.read_timeout);
        peer.options.write_timeout = Some(s.read_timeout);
        peer.options.idle_timeout = Some(s.idle_timeout);
        peer.group_key = group_key;
        Origin {
            name: Arc::from(s.name.as_str()),
            address: s.address,
            peer,
        }
    }
}

/// The key pingora pools this origin's connections under. The CA bundle is not part of
/// pingora's own pool key, and a rotated client certificate must not reuse connections made with
/// the old one: every setting that shapes a connection goes in, so that after a reload changes
/// one, the old pooled connections are never picked again (they close when idle).
fn group_key(s: &Settings) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&s.name, s.address, &s.sni).hash(&mut h);
    for c in s.ca.iter().chain(&s.client_chain) {
        c.to_der().unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Why an origin request failed.
pub fn failure_reason(e: &pingora::Error) -> OriginFailure {
    let text = format!("{e}").to_ascii_lowercase();
    let tls_alert = text.contains("alert");
    match e.etype() {
        ErrorType::InvalidCert => OriginFailure::OriginCertInvalid,
        _ if text.contains("certificate_verify_failed") => OriginFailure::OriginCertInvalid,
        // The origin's alert about our certificate: during the handshake (TLS 1.2) or on the
        // first read after it (TLS 1.3, where the client finishes first).
        _ if tls_alert
            && ["certificate", "unknown_ca", "unknown ca", "access_denied"]
                .iter()
                .any(|w| text.contains(w)) =>
        {
            OriginFailure::OriginRefusedClientCert
        }
        ErrorType::ConnectTimedout => OriginFailure::ConnectTimeout,
        ErrorType::ConnectRefused => OriginFailure::ConnectRefused,
        ErrorType::TLSHandshakeFailure | ErrorType::HandshakeError => OriginFailure::OriginTlsHandshakeFailed,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => OriginFailure::OriginTimeout,
        _ => OriginFailure::OriginConnectionError,
    }
}
