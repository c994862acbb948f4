//! The parts of RFC 5280 (and of TLS client authentication) that rustls-webpki leaves to its
//! caller, checked on each certificate before it may take part in a path. webpki reduces a trust
//! anchor to its name, key and name constraints and ignores keyUsage, key identifiers, serials
//! and the subject's key, so a chain it accepts can still be one the standard refuses.

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

/// The part a certificate plays in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A self-issued CA from the trust store.
    Anchor,
    /// A CA between the client's certificate and an anchor.
    Intermediate,
    /// The client's certificate.
    Client,
}

/// What the verifier needs of a certificate beyond webpki (for anchors: their dates and
/// pathLenConstraint, which webpki ignores).
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    pub not_before: i64,
    pub not_after: i64,
    pub path_len: Option<usize>,
}

const OID_KU: &str = "2.5.29.15";
const OID_SAN: &str = "2.5.29.17";
const OID_BC: &str = "2.5.29.19";
const OID_NC: &str = "2.5.29.30";
const OID_POLICY_CONSTRAINTS: &str = "2.5.29.36";

/// Why `der` may not play `role`, or what the verifier needs of it.
pub fn check(der: &[u8], role: Role) -> Result<Checked, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| format!("not a valid certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing data after the certificate".into());
    }
    extensions(&cert, role)?;
    serial(&cert)?;
    key(&cert)?;
    if cert.issuer().as_raw().len() <= 2 {
        return Err("an empty issuer name (RFC 5280 4.1.2.4)".into());
    }
    let bc = cert.basic_constraints().map_err(|e| format!("invalid basicConstraints: {e}"))?;
    let ku = cert.key_usage().map_err(|e| format!("invalid keyUsage: {e}"))?;
    let mut path_len = None;
    if role == Role::Client {
        if let Some(ku) = ku {
            if ku.value.key_cert_sign() {
                return Err("keyUsage keyCertSign on a certificate that is not a CA (RFC 5280 4.2.1.3)".into());
            }
            if !ku.value.digital_signature() {
                return Err("keyUsage lacks digitalSignature, which a TLS client signs with".into());
            }
        }
        if cert.subject().as_raw().len() <= 2 && !cert.subject_alternative_name().ok().flatten().is_some_and(|s| s.critical) {
            return Err("an empty subject without a critical subjectAltName (RFC 5280 4.2.1.6)".into());
        }
        dns_names(&cert)?;
    } else {
        let bc = bc.ok_or("a CA without basicConstraints (RFC 5280 4.2.1.9)")?;
        if !bc.value.ca {
            return Err("basicConstraints says it is not a CA".into());
        }
        if !bc.critical {
            return Err("a CA whose basicConstraints is not critical (RFC 5280 4.2.1.9)".into());
        }
        if let Some(ku) = ku {
            if !ku.value.key_cert_sign() {
                return Err("a CA whose keyUsage lacks keyCertSign (RFC 5280 4.2.1.3)".into());
            }
        }
        if cert.subject().as_raw().len() <= 2 {
            return Err("a CA with an empty subject (RFC 5280 4.1.2.6)".into());
        }
        path_len = bc.value.path_len_constraint.map(|p| p as usize);
    }
    Ok(Checked {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        path_len,
    })
}

/// Each extension once, parsed, critical only where the edge processes it, and the key
/// identifiers, name and policy constraints as RFC 5280 4.2 requires them.
fn extensions(cert: &X509Certificate<'_>, role: Role) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        if !seen.insert(oid.clone()) {
            return Err(format!("the extension {oid} appears twice (RFC 5280 4.2)"));
        }
        if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
            return Err(format!("the extension {oid} is malformed: {error}"));
        }
        if ext.critical && !matches!(oid.as_str(), OID_KU | OID_SAN | OID_BC | OID_NC | OID_POLICY_CONSTRAINTS | "2.5.29.37") {
            // webpki refuses these on the certificates it parses; anchors are parsed here.
            return Err(format!("a critical extension {oid} the edge does not process"));
        }
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                if ext.critical {
                    return Err("a critical authorityKeyIdentifier (RFC 5280 4.2.1.1)".into());
                }
                if aki.key_identifier.is_none() {
                    return Err("an authorityKeyIdentifier without keyIdentifier (RFC 5280 4.2.1.1)".into());
                }
                if aki.authority_cert_issuer.is_some() || aki.authority_cert_serial.is_some() {
                    // CA/B and webpki: the issuer-and-serial form binds a certificate to one parent.
                    return Err("an authorityKeyIdentifier naming the issuer and serial".into());
                }
            }
            ParsedExtension::SubjectKeyIdentifier(_) if ext.critical => {
                return Err("a critical subjectKeyIdentifier (RFC 5280 4.2.1.2)".into());
            }
            ParsedExtension::NameConstraints(nc) => {
                if role == Role::Client {
                    return Err("nameConstraints on a certificate that is not a CA (RFC 5280 4.2.1.10)".into());
                }
                if !ext.critical {
                    return Err("a nameConstraints that is not critical (RFC 5280 4.2.1.10)".into());
                }
                let empty = |t: &Option<Vec<GeneralSubtree<'_>>>| t.as_ref().is_none_or(|t| t.is_empty());
                if empty(&nc.permitted_subtrees) && empty(&nc.excluded_subtrees) {
                    return Err("nameConstraints with no subtrees (RFC 5280 4.2.1.10)".into());
                }
                let dotted = |t: &Option<Vec<GeneralSubtree<'_>>>| {
                    t.iter().flatten().any(|s| matches!(s.base, GeneralName::DNSName(d) if d.starts_with('.')))
                };
                if dotted(&nc.permitted_subtrees) || dotted(&nc.excluded_subtrees) {
                    return Err("a DNS name constraint with a leading period (RFC 5280 4.2.1.10)".into());
                }
            }
            ParsedExtension::PolicyConstraints(_) if !ext.critical => {
                return Err("a policyConstraints that is not critical (RFC 5280 4.2.1.11)".into());
            }
            _ => {}
        }
    }
    let self_issued = cert.subject().as_raw() == cert.issuer().as_raw();
    let aki = cert.get_extension_unique(&oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER).ok().flatten();
    let ski = cert.get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER).ok().flatten();
    if aki.is_none() && !(role == Role::Anchor && self_issued) {
        return Err("no authorityKeyIdentifier (RFC 5280 4.2.1.1)".into());
    }
    if role != Role::Client && ski.is_none() {
        return Err("a CA without subjectKeyIdentifier (RFC 5280 4.2.1.2)".into());
    }
    if let (Role::Anchor, Some(aki), Some(ski)) = (role, aki, ski) {
        if let (ParsedExtension::AuthorityKeyIdentifier(a), ParsedExtension::SubjectKeyIdentifier(s)) =
            (aki.parsed_extension(), ski.parsed_extension())
        {
            if self_issued && a.key_identifier.as_ref().is_some_and(|k| k.0 != s.0) {
                return Err("a self-signed root whose authorityKeyIdentifier is not its own key".into());
            }
        }
    }
    Ok(())
}

/// A positive serial of at most 20 octets (RFC 5280 4.1.2.2).
fn serial(cert: &X509Certificate<'_>) -> Result<(), String> {
    let raw = cert.raw_serial();
    if raw.first().is_some_and(|b| b & 0x80 != 0) {
        return Err("a negative serial number (RFC 5280 4.1.2.2)".into());
    }
    if raw.iter().all(|b| *b == 0) {
        return Err("a zero serial number (RFC 5280 4.1.2.2)".into());
    }
    if raw.len() > 20 {
        return Err("a serial number longer than 20 octets (RFC 5280 4.1.2.2)".into());
    }
    Ok(())
}

/// RSA of at least 2048 bits in whole bytes, ECDSA on P-256, P-384 or P-521, or Ed25519.
fn key(cert: &X509Certificate<'_>) -> Result<(), String> {
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    match alg.as_str() {
        "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
            let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err("an unreadable RSA key".into());
            };
            let m = rsa.modulus;
            let start = m.iter().position(|b| *b != 0).unwrap_or(m.len());
            let m = &m[start..];
            let bits = m.len() * 8 - m.first().map_or(0, |b| b.leading_zeros() as usize);
            if bits < 2048 || bits % 8 != 0 {
                return Err(format!("an RSA key of {bits} bits (2048 or more, in whole bytes)"));
            }
            Ok(())
        }
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" | "1.3.132.0.35" => Ok(()),
                _ => Err(format!("an EC key on a curve the edge does not accept ({curve})")),
            }
        }
        "1.3.101.112" => Ok(()),
        _ => Err(format!("a key of an algorithm the edge does not accept ({alg})")),
    }
}

/// Every DNS name in the subjectAltName is a host name (letters, digits, hyphens, an optional
/// leading `*.`), and not an IP address written as one.
fn dns_names(cert: &X509Certificate<'_>) -> Result<(), String> {
    let Some(san) = cert.subject_alternative_name().ok().flatten() else {
        return Ok(());
    };
    for name in &san.value.general_names {
        if let GeneralName::DNSName(d) = name {
            let host = d.strip_prefix("*.").unwrap_or(d);
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            };
            if host.parse::<std::net::Ipv4Addr>().is_ok() || !host.split('.').all(label_ok) {
                return Err(format!("'{d}' is not a DNS name (RFC 5280 4.2.1.6)"));
            }
        }
    }
    Ok(())
}
