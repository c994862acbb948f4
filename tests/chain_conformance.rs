//! Client-chain conformance over real handshakes: RFC 5280 path-validation cases and path
//! building across cross-signed, expired and distrusted alternatives, after x509-limbo's and
//! BetterTLS's families, generated at test time. One edge serves every case, each under its own
//! SNI name and trust store; a case passes when the handshake and a request succeed exactly when
//! the standard accepts the chain, and a refusal is counted with the expected reason.

mod common;

use std::fmt::Write as _;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, NameConstraints,
    SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A certificate with its key, able to sign others.
struct Node {
    pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "conformance");
    d.push(DnType::CommonName, cn);
    d
}

fn serial() -> SerialNumber {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut b = vec![0x11];
    b.extend_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    SerialNumber::from_slice(&b)
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = OffsetDateTime::now_utc() - Duration::days(2);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(365);
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.serial_number = Some(serial());
    p
}

fn leaf_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial());
    p
}

/// Signs `p` with `key` by `issuer` (self-signed without one).
fn make(p: CertificateParams, key: KeyPair, issuer: Option<&Node>) -> Node {
    let cert = match issuer {
        Some(i) => p.signed_by(&key, &i.issuer),
        None => p.self_signed(&key),
    }
    .unwrap();
    Node {
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(p, key),
    }
}

fn root(cn: &str, tweak: impl FnOnce(&mut CertificateParams)) -> Node {
    let mut p = ca_params(cn);
    tweak(&mut p);
    make(p, KeyPair::generate().unwrap(), None)
}

fn ca(cn: &str, issuer: &Node, tweak: impl FnOnce(&mut CertificateParams)) -> Node {
    let mut p = ca_params(cn);
    tweak(&mut p);
    make(p, KeyPair::generate().unwrap(), Some(issuer))
}

/// The same subject and key as `node`, signed by another issuer (a cross-certificate).
fn cross(cn: &str, node: &Node, issuer: &Node, tweak: impl FnOnce(&mut CertificateParams)) -> Node {
    let mut p = ca_params(cn);
    tweak(&mut p);
    make(p, KeyPair::from_pem(&node.key_pem).unwrap(), Some(issuer))
}

fn leaf(issuer: &Node, tweak: impl FnOnce(&mut CertificateParams)) -> Node {
    let mut p = leaf_params("device");
    tweak(&mut p);
    make(p, KeyPair::generate().unwrap(), Some(issuer))
}

fn critical_unknown() -> CustomExtension {
    // 1.3.6.1.4.1.55738.666.1, an arbitrary private OID; the value is an empty SEQUENCE.
    let mut e = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55738, 666, 1], vec![0x30, 0x00]);
    e.set_criticality(true);
    e
}

/// nameConstraints with one permitted subtree of GeneralName `tag` (6: URI, which rcgen has no
/// subtree of; 2: DNS), critical or not (rcgen always marks its own critical).
fn permitted(tag: u8, host: &str, critical: bool) -> CustomExtension {
    let mut name = vec![0x80 | tag, host.len() as u8];
    name.extend_from_slice(host.as_bytes());
    let subtree = [vec![0x30, name.len() as u8], name].concat();
    let permitted = [vec![0xa0, subtree.len() as u8], subtree].concat();
    let nc = [vec![0x30, permitted.len() as u8], permitted].concat();
    let mut e = CustomExtension::from_oid_content(&[2, 5, 29, 30], nc);
    e.set_criticality(critical);
    e
}

fn past(p: &mut CertificateParams) {
    p.not_before = OffsetDateTime::now_utc() - Duration::days(30);
    p.not_after = OffsetDateTime::now_utc() - Duration::days(1);
}

fn nc(permitted: Vec<GeneralSubtree>, excluded: Vec<GeneralSubtree>) -> Option<NameConstraints> {
    Some(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    })
}

/// One case: the store's CAs, the client's certificate and what it sends after it, in order.
struct Case {
    name: &'static str,
    trusted: Vec<String>,
    leaf: Node,
    sent: Vec<String>,
    /// `None`: the standard accepts the chain; `Some(reason)`: it refuses, for this reason.
    refused: Option<&'static str>,
}

fn case(name: &'static str, trusted: &[&Node], leaf: Node, sent: &[&Node], refused: Option<&'static str>) -> Case {
    Case {
        name,
        trusted: trusted.iter().map(|n| n.pem.clone()).collect(),
        leaf,
        sent: sent.iter().map(|n| n.pem.clone()).collect(),
        refused,
    }
}

const UNTRUSTED: Option<&str> = Some("ClientCertUntrusted");
const INVALID: Option<&str> = Some("ClientCertInvalid");

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let r = root("Root", |_| {});
    let i = ca("Issuing", &r, |_| {});

    // Accepted: plain paths, any order, the store's intermediates, and alternatives.
    out.push(case("basic", &[&r], leaf(&i, |_| {}), &[&i], None));
    let i2 = ca("Issuing 2", &i, |_| {});
    out.push(case("out-of-order", &[&r], leaf(&i2, |_| {}), &[&i, &i2], None));
    out.push(case("root-sent-first", &[&r], leaf(&i2, |_| {}), &[&r, &i, &i2], None));
    out.push(case("store-intermediate", &[&r, &i], leaf(&i, |_| {}), &[], None));
    out.push(case("no-eku", &[&r], leaf(&i, |p| p.extended_key_usages.clear()), &[&i], None));
    let zero = ca("PathLen Zero", &r, |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    out.push(case("pathlen-0-issues-leaf", &[&r], leaf(&zero, |_| {}), &[&zero], None));
    {
        // The same intermediate, once expired and once valid: the expired one comes first.
        let x = ca("Cross", &r, past);
        let x_valid = cross("Cross", &x, &r, |_| {});
        let l = leaf(&x, |_| {});
        out.push(case("alternative-beside-expired-intermediate", &[&r], l, &[&x, &x_valid], None));
    }
    {
        // Cross-signed by a root the store does not trust, and by one it does.
        let other = root("Other Root", |_| {});
        let x = ca("Cross", &other, |_| {});
        let x_trusted = cross("Cross", &x, &r, |_| {});
        out.push(case("alternative-beside-distrusted-root", &[&r], leaf(&x, |_| {}), &[&x, &x_trusted], None));
        let x2 = ca("Cross Two", &other, |_| {});
        let x2_trusted = cross("Cross Two", &x2, &r, |_| {});
        out.push(case("cross-signed-from-the-store", &[&r, &x2_trusted], leaf(&x2, |_| {}), &[&x2], None));
    }
    {
        // Two roots, one expired; the intermediate chains to both.
        let old = root("Rollover Root", past);
        let new = cross("Rollover Root", &old, &old, |_| {});
        let new = root_like(&new);
        let x = ca("Rollover Issuing", &old, |_| {});
        let x_new = cross("Rollover Issuing", &x, &new, |_| {});
        out.push(case("alternative-beside-expired-root", &[&old, &new], leaf(&x, |_| {}), &[&x, &x_new], None));
    }
    let ncr = root("NC Root", |p| {
        p.name_constraints = nc(
            vec![
                GeneralSubtree::DnsName("fleet.test".into()),
                GeneralSubtree::IpAddress("10.0.0.0/8".parse::<CidrSubnet>().unwrap()),
                GeneralSubtree::Rfc822Name("fleet.test".into()),
            ],
            vec![GeneralSubtree::DnsName("bad.fleet.test".into())],
        )
    });
    let nci = ca("NC Issuing", &ncr, |_| {});
    let san = |names: Vec<SanType>| move |p: &mut CertificateParams| p.subject_alt_names = names;
    let dns = |d: &str| SanType::DnsName(d.try_into().unwrap());
    let ip = |a: &str| SanType::IpAddress(a.parse().unwrap());
    let email = |e: &str| SanType::Rfc822Name(e.try_into().unwrap());
    out.push(case("nc-permitted-dns-and-ip", &[&ncr], leaf(&nci, san(vec![dns("d1.fleet.test"), ip("10.1.2.3")])), &[&nci], None));

    // Refused: the chain.
    let stranger = root("Root", |_| {});
    let si = ca("Issuing", &stranger, |_| {});
    out.push(case("same-names-other-keys", &[&r], leaf(&si, |_| {}), &[&si], UNTRUSTED));
    let selfsigned = make(leaf_params("device"), KeyPair::generate().unwrap(), None);
    out.push(case("self-signed-leaf", &[&r], selfsigned, &[], UNTRUSTED));
    out.push(case("missing-intermediate", &[&r], leaf(&i, |_| {}), &[], UNTRUSTED));
    let xi = ca("Expired Issuing", &r, past);
    out.push(case("expired-intermediate", &[&r], leaf(&xi, |_| {}), &[&xi], Some("ClientCertExpired")));
    let xr = root("Expired Root", past);
    let xri = ca("Under Expired", &xr, |_| {});
    out.push(case("expired-root", &[&xr], leaf(&xri, |_| {}), &[&xri], Some("ClientCertExpired")));
    out.push(case("expired-leaf", &[&r], leaf(&i, past), &[&i], Some("ClientCertExpired")));
    let not_yet = |p: &mut CertificateParams| p.not_before = OffsetDateTime::now_utc() + Duration::days(1);
    out.push(case("leaf-not-yet-valid", &[&r], leaf(&i, not_yet), &[&i], Some("ClientCertNotYetValid")));
    let server_eku = |p: &mut CertificateParams| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    out.push(case("leaf-serverauth-only", &[&r], leaf(&i, server_eku), &[&i], Some("ClientCertIntentInvalid")));
    let sub = ca("Below PathLen Zero", &zero, |_| {});
    out.push(case("pathlen-exceeded", &[&r], leaf(&sub, |_| {}), &[&zero, &sub], Some("ClientCertPathLenExceeded")));
    let r0 = root("Root PathLen Zero", |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    let r0i = ca("Under Root PathLen Zero", &r0, |_| {});
    let r0i2 = ca("Too Deep", &r0i, |_| {});
    out.push(case("root-pathlen-exceeded", &[&r0], leaf(&r0i2, |_| {}), &[&r0i, &r0i2], Some("ClientCertPathLenExceeded")));
    let i3 = ca("Issuing 3", &i2, |_| {});
    out.push(case("deeper-than-max-chain-depth", &[&r], leaf(&i3, |_| {}), &[&i, &i2, &i3], Some("ClientCertMaxChainDepthExceeded")));
    // The same depth through a self-issued intermediate (a key rollover of Issuing 2), which
    // does not count toward the depth (RFC 5280 6.1.4).
    let i2_rolled = ca("Issuing 2", &i2, |_| {});
    out.push(case("self-issued-intermediate-not-counted-in-depth", &[&r], leaf(&i2_rolled, |_| {}), &[&i, &i2, &i2_rolled], None));
    {
        // Two CAs signed by each other and no way to a root: building must end, refused.
        let a = root("Loop A", |_| {});
        let b = ca("Loop B", &a, |_| {});
        let a_by_b = cross("Loop A", &a, &b, |_| {});
        out.push(case("issuer-loop", &[&r], leaf(&b, |_| {}), &[&a_by_b, &b], UNTRUSTED));
    }

    // Refused: trust anchors the standard does not let act as CAs (left out of the store).
    let unknown_root = root("Critical Root", |p| p.custom_extensions.push(critical_unknown()));
    let ui = ca("Under Critical Root", &unknown_root, |_| {});
    out.push(case("root-unknown-critical-extension", &[&unknown_root], leaf(&ui, |_| {}), &[&ui], UNTRUSTED));
    let nobc = root("No BC Root", |p| p.is_ca = IsCa::NoCa);
    let nobci = ca("Under No BC Root", &nobc, |_| {});
    out.push(case("root-without-basic-constraints", &[&nobc], leaf(&nobci, |_| {}), &[&nobci], UNTRUSTED));
    let notca = root("Not CA Root", |p| p.is_ca = IsCa::ExplicitNoCa);
    let notcai = ca("Under Not CA Root", &notca, |_| {});
    out.push(case("root-ca-false", &[&notca], leaf(&notcai, |_| {}), &[&notcai], UNTRUSTED));
    let nokcs = root("No KeyCertSign Root", |p| p.key_usages = vec![KeyUsagePurpose::CrlSign]);
    let nokcsi = ca("Under No KeyCertSign Root", &nokcs, |_| {});
    out.push(case("root-ku-without-keycertsign", &[&nokcs], leaf(&nokcsi, |_| {}), &[&nokcsi], UNTRUSTED));

    // Refused: intermediates.
    let icrit = ca("Critical Issuing", &r, |p| p.custom_extensions.push(critical_unknown()));
    out.push(case("intermediate-unknown-critical-extension", &[&r], leaf(&icrit, |_| {}), &[&icrit], UNTRUSTED));
    let inobc = ca("No BC Issuing", &r, |p| p.is_ca = IsCa::NoCa);
    out.push(case("intermediate-without-basic-constraints", &[&r], leaf(&inobc, |_| {}), &[&inobc], UNTRUSTED));
    let ikcs = ca("No KeyCertSign Issuing", &r, |p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature]);
    out.push(case("intermediate-ku-without-keycertsign", &[&r], leaf(&ikcs, |_| {}), &[&ikcs], UNTRUSTED));
    let inc = ca("Non-critical NC Issuing", &r, |p| p.custom_extensions.push(permitted(2, "fleet.test", false)));
    out.push(case("intermediate-nc-not-critical", &[&r], leaf(&inc, san(vec![dns("d1.fleet.test")])), &[&inc], UNTRUSTED));

    // Refused: the client's certificate.
    out.push(case("leaf-unknown-critical-extension", &[&r], leaf(&i, |p| p.custom_extensions.push(critical_unknown())), &[&i], INVALID));
    let kcs = |p: &mut CertificateParams| p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    out.push(case("leaf-ku-keycertsign", &[&r], leaf(&i, kcs), &[&i], INVALID));
    out.push(case("leaf-is-a-ca", &[&r], leaf(&i, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)), &[&i], INVALID));
    out.push(case("leaf-without-aki", &[&r], leaf(&i, |p| p.use_authority_key_identifier_extension = false), &[&i], INVALID));
    out.push(case("leaf-zero-serial", &[&r], leaf(&i, |p| p.serial_number = Some(SerialNumber::from_slice(&[0]))), &[&i], INVALID));
    let leaf_nc = |p: &mut CertificateParams| p.name_constraints = nc(vec![GeneralSubtree::DnsName("fleet.test".into())], vec![]);
    out.push(case("leaf-with-name-constraints", &[&r], leaf(&i, leaf_nc), &[&i], INVALID));
    out.push(case("leaf-underscore-dns-san", &[&r], leaf(&i, san(vec![dns("bad_name.fleet.test")])), &[&i], INVALID));

    // Refused: name constraints on the client's SANs.
    let violated = Some("ClientCertNameConstraintsViolated");
    out.push(case("nc-dns-outside-permitted", &[&ncr], leaf(&nci, san(vec![dns("d1.other.test")])), &[&nci], violated));
    out.push(case("nc-dns-excluded", &[&ncr], leaf(&nci, san(vec![dns("x.bad.fleet.test")])), &[&nci], violated));
    out.push(case("nc-ip-outside-permitted", &[&ncr], leaf(&nci, san(vec![dns("d1.fleet.test"), ip("192.168.1.1")])), &[&nci], violated));
    out.push(case("nc-email-outside-permitted", &[&ncr], leaf(&nci, san(vec![email("dev@other.test")])), &[&nci], violated));
    let ncu = root("NC URI Root", |p| p.custom_extensions.push(permitted(6, "fleet.test", true)));
    let ncui = ca("NC URI Issuing", &ncu, |_| {});
    let uri = |u: &str| SanType::URI(u.try_into().unwrap());
    out.push(case("nc-uri-outside-permitted", &[&ncu], leaf(&ncui, san(vec![uri("urn:device:other.test")])), &[&ncui], violated));
    out
}

/// A self-signed copy of `node`'s subject and key (a rollover root).
fn root_like(node: &Node) -> Node {
    let mut p = ca_params("Rollover Root");
    p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    make(p, KeyPair::from_pem(&node.key_pem).unwrap(), None)
}

#[test]
fn client_chains_are_decided_as_rfc_5280_and_path_building_require() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let cases = cases();
    let (mut sni, mut stores) = (String::new(), String::new());
    for (n, c) in cases.iter().enumerate() {
        std::fs::write(d.join(format!("case{n}-ca.pem")), c.trusted.concat()).unwrap();
        std::fs::write(d.join(format!("case{n}.pem")), format!("{}{}", c.leaf.pem, c.sent.concat())).unwrap();
        std::fs::write(d.join(format!("case{n}.key")), &c.leaf.key_pem).unwrap();
        writeln!(sni, "      - names: [case{n}.conformance.test]\n        mtls: {{ mode: required, trust_store: case{n} }}").unwrap();
        writeln!(stores, "  case{n}:\n    ca_files: [case{n}-ca.pem]").unwrap();
    }
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        "{server}listeners:\n{listener}    sni:\n{sni}trust_stores:\n  default:\n    ca_files: [edge-ca.pem]\n{stores}origins:\n{origin}routes:\n  - {{ path_prefix: /, origin: firmware }}\nadmin: {{ address: 127.0.0.1:{admin_port} }}\n",
        server = server_yaml(d, 2),
        listener = listener_yaml(port, "required", "default"),
        origin = origin_yaml("firmware", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);

    let mut wrong = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        let name = format!("case{n}.conformance.test");
        let got = Client::new(d, port).cert(&format!("case{n}")).sni(Some(&name)).host(&name).get("/echo");
        let accepted = got.as_ref().is_ok_and(|r| r.status == 200);
        if accepted != c.refused.is_none() {
            wrong.push(format!("{}: {} ({:?})", c.name, if accepted { "ACCEPTED, must be refused" } else { "REFUSED, must be accepted" }, got.as_ref().map(|r| r.status)));
        }
    }
    // Each refusal is counted with its reason, on the line that names the case's SNI.
    std::thread::sleep(std::time::Duration::from_millis(300)); // the log is written every 100 ms
    let lines = edge.log_lines();
    for (n, c) in cases.iter().enumerate() {
        let Some(reason) = c.refused else { continue };
        let name = format!("case{n}.conformance.test");
        let line = lines.iter().find(|l| l["log"] == "connection" && l["sni"] == name.as_str());
        match line {
            Some(l) if l["reason"] == reason => {}
            other => wrong.push(format!("{}: expected reason {reason}, logged {:?}", c.name, other.map(|l| (&l["reason"], &l["detail"])))),
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    let n = metric(admin_port, &format!("mtls_edge_handshakes_total{{listener=\"127.0.0.1:{port}\",outcome=\"accepted\",reason=\"Ok\"}}"));
    assert_eq!(n as usize, cases.iter().filter(|c| c.refused.is_none()).count());
}
