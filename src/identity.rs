//! The viewer's identity: what a verified client certificate says, extracted once per
//! connection from the TLS session (never from a header), and the headers the origin receives
//! about the viewer (its certificate and its connection). The edge is the first hop: client-sent
//! copies of those headers, in any spelling, are stripped before anything reads them.

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
    /// The DER (the PEM header and RFC 9440's `Client-Cert` are made from it per request: an
    /// idle connection holds it once).
    pub der: Vec<u8>,
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
    /// The negotiated cipher suite (OpenSSL's names for TLS 1.2, the RFC's for TLS 1.3).
    pub cipher: String,
    /// The session was resumed rather than fully negotiated.
    pub resumed: bool,
    /// The client's JA4 fingerprint (empty if its ClientHello could not be read).
    pub ja4: String,
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

/// A certificate's PEM, as BoringSSL writes it (64 base64 characters a line).
fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
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
        ViewerCert::from_x509(&leaf)
    }

    pub fn from_x509(leaf: &X509Ref) -> Option<ViewerCert> {
        let der = leaf.to_der().ok()?;
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
            der,
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
    /// What the origin learns of the viewer's connection.
    pub address: Option<HeaderName>,
    pub tls: Option<HeaderName>,
    pub http_version: Option<HeaderName>,
    pub forwarded_for: Option<HeaderName>,
    pub forwarded_proto: Option<HeaderName>,
    pub via: Option<HeaderName>,
    pub ja4: Option<HeaderName>,
    /// What becomes of client headers whose names have an underscore.
    pub underscores: Underscores,
}

/// What becomes of a client header whose name has an underscore. CGI, WSGI, Rack and PHP
/// origins read `X_A` and `X-A` as one variable, so such a name can smuggle a header past a strip
/// that matches dashes. Whatever the choice, a name that reads as an edge header once its
/// underscores are dashes is removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Underscores {
    /// Removed (nginx's default).
    #[default]
    Drop,
    /// The request is answered 400.
    Refuse,
    /// Passed on.
    Allow,
}

/// What the origin learns of the viewer's connection, for one request.
pub struct Viewer<'a> {
    pub addr: Option<std::net::SocketAddr>,
    pub info: &'a ConnectionInfo,
    pub version: http::Version,
}

/// What stripping found in a client request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stripped {
    /// Edge headers the client sent (in any spelling), removed.
    pub spoofed: usize,
    /// Other headers with an underscore in their names, removed or (`Refuse`) to refuse.
    pub underscored: usize,
    /// The request must be answered 400 (`Underscores::Refuse`).
    pub refuse: bool,
}

/// The headers toward the origin, and the names always removed from client requests.
pub struct HeaderPlan {
    names: HeaderNames,
    /// Every configured header name and [`ALWAYS_STRIPPED`], sorted: always removed from client
    /// requests, as is every `CloudFront-Viewer-*` header.
    strip: Vec<HeaderName>,
}

/// Client-sent headers with this prefix are always removed, whatever the configured names:
/// CloudFront sets every header of this family itself, and origins trust them.
const CLOUDFRONT_PREFIX: &str = "cloudfront-viewer-";
const CLIENT_CERT: &str = "client-cert";
const CLIENT_CERT_CHAIN: &str = "client-cert-chain";
/// Headers through which an origin learns of the viewer's connection from a proxy in front of
/// it: a client's copies are removed even when the edge sets none of them, as it is the first hop.
/// So are the shield tier's control headers, which only an edge may send to its shield.
const ALWAYS_STRIPPED: &[&str] = &[
    CLIENT_CERT,
    CLIENT_CERT_CHAIN,
    crate::shield::VARIANTS_HEADER,
    crate::shield::ORIGIN_HEADER,
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-real-ip",
];
/// The pseudonym in `Via`.
const VIA_NAME: &str = "mtls-edge";

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
            &n.address,
            &n.tls,
            &n.http_version,
            &n.forwarded_for,
            &n.forwarded_proto,
            &n.via,
            &n.ja4,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .chain(ALWAYS_STRIPPED.iter().map(|n| HeaderName::from_static(n)))
        .collect();
        strip.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        strip.dedup();
        HeaderPlan { names, strip }
    }

    /// Removes every edge header the client sent, in any spelling, and applies the underscore
    /// policy to the other headers.
    pub fn strip(&self, req: &mut RequestHeader) -> Stripped {
        let mut found = Stripped::default();
        // One pass over the few headers a request has; most have no underscore and no edge name.
        let mut doomed: Vec<HeaderName> = Vec::new();
        for k in req.headers.keys() {
            let name = k.as_str();
            if self.is_edge(k) {
                found.spoofed += 1;
            } else if name.contains('_') {
                let dashed = name.replace('_', "-");
                if HeaderName::from_bytes(dashed.as_bytes()).is_ok_and(|d| self.is_edge(&d)) {
                    found.spoofed += 1;
                } else {
                    found.underscored += 1;
                    match self.names.underscores {
                        Underscores::Drop => {}
                        Underscores::Refuse => found.refuse = true,
                        Underscores::Allow => continue,
                    }
                }
            } else {
                continue;
            }
            doomed.push(k.clone());
        }
        for n in doomed {
            req.remove_header(&n);
        }
        found
    }

    /// Whether a header name is one the edge sets toward the origin, or owns (rules may not set
    /// it, and a client's copy is removed).
    pub fn is_edge(&self, name: &HeaderName) -> bool {
        name.as_str().starts_with(CLOUDFRONT_PREFIX) || self.strip.binary_search_by(|s| s.as_str().cmp(name.as_str())).is_ok()
    }

    /// What the origin learns of the viewer's connection: its address, TLS and HTTP version,
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `Via` and the client's JA4 fingerprint.
    fn render_viewer(&self, v: &Viewer<'_>, out: &mut Vec<(HeaderName, HeaderValue)>) {
        let n = &self.names;
        let mut put = |name: &Option<HeaderName>, value: &str| {
            if let (Some(n), Ok(v)) = (name, HeaderValue::from_str(value)) {
                out.push((n.clone(), v));
            }
        };
        if let Some(addr) = v.addr {
            // `ip:port`, with IPv6 addresses in brackets.
            put(&n.address, &addr.to_string());
            put(&n.forwarded_for, &addr.ip().to_string());
        }
        let handshake = if v.info.resumed { "sessionResumed" } else { "fullHandshake" };
        put(&n.tls, &format!("{}:{}:{handshake}", v.info.tls_version, v.info.cipher));
        let version = match v.version {
            http::Version::HTTP_09 => "0.9",
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_2 => "2.0",
            http::Version::HTTP_3 => "3.0",
            _ => "1.1",
        };
        put(&n.http_version, version);
        put(&n.forwarded_proto, "https");
        put(&n.via, &format!("{version} {VIA_NAME}"));
        if !v.info.ja4.is_empty() {
            put(&n.ja4, &v.info.ja4);
        }
    }

    /// The headers for a request, with or without a verified certificate; `chain` is what the
    /// client sent (leaf first), for `Client-Cert-Chain`.
    pub fn render(&self, cert: Option<&ViewerCert>, chain: &[X509], viewer: &Viewer<'_>) -> Vec<(HeaderName, HeaderValue)> {
        let n = &self.names;
        let mut out = Vec::new();
        self.render_viewer(viewer, &mut out);
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
        if n.pem.is_some() {
            put(&n.pem, percent_encoding::utf8_percent_encode(&pem(&c.der), PEM_ENCODE).to_string());
        }
        if !c.san_uri.is_empty() {
            put(&n.san_uri, c.san_uri.join(","));
        }
        if !c.san_dns.is_empty() {
            put(&n.san_dns, c.san_dns.join(","));
        }
        if n.rfc9440 {
            let b64 = |d: &[u8]| format!(":{}:", base64::engine::general_purpose::STANDARD.encode(d));
            put(&Some(HeaderName::from_static(CLIENT_CERT)), b64(&c.der));
            let rest: Vec<String> = chain.iter().skip(1).filter_map(|c| c.to_der().ok()).map(|d| b64(&d)).collect();
            if !rest.is_empty() {
                put(&Some(HeaderName::from_static(CLIENT_CERT_CHAIN)), rest.join(", "));
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
    fn the_pem_is_boringssls() {
        let ca = crate::pki::Ca::root("PEM CA").unwrap();
        let x = X509::from_pem(ca.cert_pem.as_bytes()).unwrap();
        assert_eq!(pem(&x.to_der().unwrap()).as_bytes(), x.to_pem().unwrap().as_slice());
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
            "CloudFront-Viewer-Address",
            "Client-Cert",
            "Client-Cert-Chain",
            "X-Forwarded-For",
            "Forwarded",
            "Via",
        ] {
            req.append_header(h, "spoofed").unwrap();
        }
        req.append_header("X-Other", "kept").unwrap();
        let s = plan.strip(&mut req);
        assert_eq!((s.spoofed, s.underscored, s.refuse), (9, 0, false));
        assert_eq!(req.headers.len(), 1);
        assert!(req.headers.contains_key("x-other"));
    }

    fn underscored(policy: Underscores) -> (Stripped, RequestHeader) {
        let plan = HeaderPlan::new(HeaderNames {
            subject: Some(HeaderName::from_static("x-device-subject")),
            underscores: policy,
            ..HeaderNames::default()
        });
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("CloudFront_Viewer_Cert_Subject", "CN=admin").unwrap();
        req.append_header("x_device_subject", "CN=admin").unwrap();
        req.append_header("X_Forwarded_For", "10.0.0.1").unwrap();
        req.append_header("X_Custom", "v").unwrap();
        (plan.strip(&mut req), req)
    }

    #[test]
    fn underscore_spellings_of_edge_headers_are_removed_whatever_the_policy() {
        for policy in [Underscores::Drop, Underscores::Refuse, Underscores::Allow] {
            let (s, req) = underscored(policy);
            assert_eq!(s.spoofed, 3, "{policy:?}");
            assert_eq!(s.underscored, 1, "{policy:?}");
            assert_eq!(s.refuse, policy == Underscores::Refuse, "{policy:?}");
            let kept: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
            let expected: &[&str] = if policy == Underscores::Allow { &["x_custom"] } else { &[] };
            assert_eq!(kept, expected, "{policy:?}");
        }
    }
}
