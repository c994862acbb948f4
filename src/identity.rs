//! The viewer's identity: what a verified client certificate says, extracted once per
//! connection from the TLS session (never from a header), and the identity headers the origin
//! receives. Client-sent copies of those headers are always stripped before anything reads them.

use std::sync::Arc;

use base64::Engine;
use boring::asn1::{Asn1Time, Asn1TimeRef};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::ssl::SslRef;
use boring::x509::{X509NameRef, X509Ref, X509};
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

/// `XN_FLAG_RFC2253` from BoringSSL's x509.h (RFC 2253 escaping, comma separators, reversed
/// order, short names, unknown fields dumped), spelled out because bindgen cannot evaluate it.
const XN_FLAG_RFC2253: i32 = 0x317 | (1 << 16) | (1 << 20) | (1 << 24);

/// A client certificate that passed verification.
#[derive(Debug, Clone, Default)]
pub struct ViewerCert {
    /// RFC 2253 distinguished names.
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex of the serial's bytes, colon-separated (CloudFront's form).
    pub serial: String,
    /// The same without colons or leading zeros (`"0"` for zero): the form rules see.
    pub serial_hex: String,
    /// `serial_hex` as serial lists key it, made at its first lookup (once per connection).
    pub serial_key: std::sync::OnceLock<Option<[u8; 21]>>,
    /// Lowercase hex SHA-256 of the DER.
    pub sha256: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub pem: String,
    pub der: Vec<u8>,
    /// DER of the intermediates the client sent, nearest first (the leaf excluded).
    pub chain_der: Vec<Vec<u8>>,
    pub san_dns: Vec<String>,
    pub san_uri: Vec<String>,
    pub san_email: Vec<String>,
    /// IP address SANs in their usual text form.
    pub san_ip: Vec<String>,
    /// CN, O and OU of the subject and of the issuer (the first of each), for rules.
    pub subject_parts: NameParts,
    pub issuer_parts: NameParts,
}

/// The parts of a distinguished name that rules match on most.
#[derive(Debug, Clone, Default)]
pub struct NameParts {
    pub cn: String,
    pub o: String,
    pub ou: String,
}

impl NameParts {
    fn of(name: &X509NameRef) -> NameParts {
        let first = |nid| {
            name.entries_by_nid(nid)
                .next()
                .and_then(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
                .unwrap_or_default()
        };
        NameParts {
            cn: first(Nid::COMMONNAME),
            o: first(Nid::ORGANIZATIONNAME),
            ou: first(Nid::ORGANIZATIONALUNITNAME),
        }
    }
}

/// What the edge knows about a TLS connection once its handshake has completed: who the client
/// is, and what rules see of the connection. Built once per connection, from the TLS session.
#[derive(Debug)]
pub struct ConnectionIdentity {
    pub listener: Arc<str>,
    /// SNI the client sent, lowercased.
    pub sni: Option<String>,
    /// The SNI policy that verified this connection (its first configured name), if one matched.
    pub sni_policy: Option<Arc<str>>,
    pub cert: Option<ViewerCert>,
    /// The client's chain as it sent it (leaf first), to verify it again against a newer store.
    pub chain: Vec<X509>,
    /// What rules see of the connection besides the certificate and the address.
    pub info: ConnectionInfo,
    /// The client's IP address as rules and logs read it, formatted at the first request.
    pub client_ip: std::sync::OnceLock<String>,
}

/// What a connection knows besides the certificate and the address.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub sni: String,
    pub tls_version: String,
    pub alpn: String,
}

fn hex(bytes: &[u8], sep: &str) -> String {
    let mut s = String::with_capacity(bytes.len() * (2 + sep.len()));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push_str(sep);
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A serial's bytes as rules read it: lowercase hex without leading zeros (`"0"` for zero).
pub fn serial_hex(bytes: &[u8]) -> String {
    let hex = hex(bytes, "");
    match hex.trim_start_matches('0') {
        "" => "0".into(),
        t => t.into(),
    }
}

/// A distinguished name as RFC 2253 text (most specific first: `CN=...,O=...`).
pub fn rfc2253(name: &X509NameRef) -> String {
    name.print_ex(XN_FLAG_RFC2253).unwrap_or_default()
}

/// A certificate's notAfter, in unix seconds.
pub fn not_after(cert: &X509Ref) -> Option<i64> {
    unix_time(cert.not_after())
}

fn unix_time(t: &Asn1TimeRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// ISO 8601 / RFC 3339 UTC time for unix seconds.
pub fn iso8601(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

impl ViewerCert {
    /// Reads the peer certificate of a completed, verified handshake.
    pub fn from_ssl(ssl: &SslRef) -> Option<ViewerCert> {
        let leaf = ssl.peer_certificate()?;
        if ssl.verify_result().is_err() {
            return None;
        }
        // On the server side BoringSSL's chain excludes the leaf; filter it anyway, defensively.
        let leaf_der = leaf.to_der().ok()?;
        let chain_der = ssl
            .peer_cert_chain()
            .map(|chain| {
                chain
                    .iter()
                    .filter_map(|c| c.to_der().ok())
                    .filter(|d| *d != leaf_der)
                    .collect()
            })
            .unwrap_or_default();
        ViewerCert::from_x509(&leaf, chain_der)
    }

    pub fn from_x509(leaf: &X509Ref, chain_der: Vec<Vec<u8>>) -> Option<ViewerCert> {
        let der = leaf.to_der().ok()?;
        let pem = String::from_utf8(leaf.to_pem().ok()?).ok()?;
        let serial = leaf.serial_number().to_bn().ok()?.to_vec();
        let sha256 = leaf.digest(MessageDigest::sha256()).ok()?;
        let (mut san_dns, mut san_uri, mut san_email, mut san_ip) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if let Some(names) = leaf.subject_alt_names() {
            for n in names.iter() {
                if let Some(d) = n.dnsname() {
                    san_dns.push(d.to_string());
                } else if let Some(u) = n.uri() {
                    san_uri.push(u.to_string());
                } else if let Some(e) = n.email() {
                    san_email.push(e.to_string());
                } else if let Some(ip) = n.ipaddress() {
                    let addr = match ip.len() {
                        4 => <[u8; 4]>::try_from(ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    san_ip.extend(addr);
                }
            }
        }
        Some(ViewerCert {
            subject: rfc2253(leaf.subject_name()),
            issuer: rfc2253(leaf.issuer_name()),
            serial: hex(&serial, ":"),
            serial_hex: serial_hex(&serial),
            serial_key: Default::default(),
            sha256: hex(&sha256, ""),
            not_before: unix_time(leaf.not_before())?,
            not_after: unix_time(leaf.not_after())?,
            pem,
            der,
            chain_der,
            san_dns,
            san_uri,
            san_email,
            san_ip,
            subject_parts: NameParts::of(leaf.subject_name()),
            issuer_parts: NameParts::of(leaf.issuer_name()),
        })
    }
}

/// The names of the identity headers sent to the origin; `None` turns one off.
#[derive(Debug, Clone, Default)]
pub struct HeaderNames {
    pub present: Option<HeaderName>,
    pub subject: Option<HeaderName>,
    pub issuer: Option<HeaderName>,
    pub serial: Option<HeaderName>,
    pub sha256: Option<HeaderName>,
    pub validity: Option<HeaderName>,
    pub pem: Option<HeaderName>,
    pub san_uri: Option<HeaderName>,
    pub san_dns: Option<HeaderName>,
    /// Also send RFC 9440 `Client-Cert` and `Client-Cert-Chain`.
    pub rfc9440: bool,
}

/// The identity headers toward the origin, and the names always removed from client requests.
pub struct HeaderPlan {
    names: HeaderNames,
    /// Every configured identity header name, `Client-Cert` and `Client-Cert-Chain`: always
    /// removed from client requests, as is every `CloudFront-Viewer-Cert-*` header.
    strip: Vec<HeaderName>,
}

/// Client-sent headers with this prefix are always removed, whatever the configured names.
const CLOUDFRONT_PREFIX: &str = "cloudfront-viewer-cert-";
const CLIENT_CERT: &str = "client-cert";
const CLIENT_CERT_CHAIN: &str = "client-cert-chain";

/// Characters left as they are in the URL-encoded PEM: RFC 3986 unreserved.
const PEM_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl HeaderPlan {
    pub fn new(names: HeaderNames) -> HeaderPlan {
        let n = &names;
        let mut strip: Vec<HeaderName> = [
            &n.present,
            &n.subject,
            &n.issuer,
            &n.serial,
            &n.sha256,
            &n.validity,
            &n.pem,
            &n.san_uri,
            &n.san_dns,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .chain([
            HeaderName::from_static(CLIENT_CERT),
            HeaderName::from_static(CLIENT_CERT_CHAIN),
        ])
        .collect();
        strip.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        strip.dedup();
        HeaderPlan { names, strip }
    }

    /// Removes every identity header the client sent. Returns how many were removed.
    pub fn strip(&self, req: &mut RequestHeader) -> usize {
        // One pass over the few headers a request has, rather than a hash lookup for each
        // identity header the edge knows.
        let doomed: Vec<HeaderName> = req.headers.keys().filter(|k| self.is_identity(k)).cloned().collect();
        let mut removed = 0;
        for n in doomed {
            if req.remove_header(&n).is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Whether a header name belongs to the edge's identity headers (rules may not set it).
    pub fn is_identity(&self, name: &HeaderName) -> bool {
        name.as_str().starts_with(CLOUDFRONT_PREFIX) || self.strip.contains(name)
    }

    /// The headers for a request, with or without a verified certificate.
    pub fn render(&self, cert: Option<&ViewerCert>) -> Vec<(HeaderName, HeaderValue)> {
        let n = &self.names;
        let mut out = Vec::new();
        let mut put = |name: &Option<HeaderName>, value: String| {
            if let (Some(n), Ok(v)) = (name, HeaderValue::from_str(&value)) {
                out.push((n.clone(), v));
            }
        };
        put(&n.present, if cert.is_some() { "1" } else { "0" }.to_string());
        let Some(c) = cert else {
            return out;
        };
        put(&n.subject, c.subject.clone());
        put(&n.issuer, c.issuer.clone());
        put(&n.serial, c.serial.clone());
        put(&n.sha256, c.sha256.clone());
        put(
            &n.validity,
            format!("NotBefore={};NotAfter={}", iso8601(c.not_before), iso8601(c.not_after)),
        );
        put(
            &n.pem,
            percent_encoding::utf8_percent_encode(&c.pem, PEM_ENCODE).to_string(),
        );
        if !c.san_uri.is_empty() {
            put(&n.san_uri, c.san_uri.join(","));
        }
        if !c.san_dns.is_empty() {
            put(&n.san_dns, c.san_dns.join(","));
        }
        if n.rfc9440 {
            let b64 = |d: &[u8]| format!(":{}:", base64::engine::general_purpose::STANDARD.encode(d));
            put(&Some(HeaderName::from_static(CLIENT_CERT)), b64(&c.der));
            if !c.chain_der.is_empty() {
                let chain: Vec<String> = c.chain_der.iter().map(|d| b64(d)).collect();
                put(&Some(HeaderName::from_static(CLIENT_CERT_CHAIN)), chain.join(", "));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_colon_hex() {
        assert_eq!(hex(&[0x4d, 0x00, 0xff], ":"), "4d:00:ff");
        assert_eq!(hex(&[0xab, 0x01], ""), "ab01");
    }

    #[test]
    fn rules_read_serials_without_colons_or_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x0a, 0x1b]), "a1b");
        assert_eq!(serial_hex(&[0x00]), "0");
        assert_eq!(serial_hex(&[]), "0");
        assert_eq!(serial_hex(&[0x4d, 0x00]), "4d00");
    }

    #[test]
    fn iso8601_is_utc_rfc3339() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn strip_removes_configured_default_and_prefixed_names() {
        let plan = HeaderPlan::new(HeaderNames {
            subject: Some(HeaderName::from_static("x-device-subject")),
            ..HeaderNames::default()
        });
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for h in [
            "X-Device-Subject",
            "CloudFront-Viewer-Cert-Subject",
            "cloudfront-viewer-cert-anything",
            "Client-Cert",
            "Client-Cert-Chain",
        ] {
            req.append_header(h, "spoofed").unwrap();
        }
        req.append_header("X-Other", "kept").unwrap();
        assert_eq!(plan.strip(&mut req), 5);
        assert_eq!(req.headers.len(), 1);
        assert!(req.headers.contains_key("x-other"));
    }
}
