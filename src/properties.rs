//! Bad input, generated: the config loader and the state build, the rule compiler, the list
//! loader, identity-header stripping, certificate field extraction and the JA4 ClientHello
//! parser get arbitrary and mutated input. The expectation everywhere: no panic, a clear error,
//! and nothing let in.

use proptest::prelude::*;

use crate::rules::lists::ListKind;
use crate::identity::{HeaderNames, HeaderPlan, Underscores, ViewerCert};
use crate::rules::compile::{Compiler, MAX_EXPRESSION_BYTES};
use crate::rules::lists::{Lists, RuleList};
use crate::rules::Phase;

const EXAMPLE: &str = include_str!("../conf/edge.yaml");

fn load_text(text: &[u8]) -> Result<(), crate::config::ConfigErrors> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("edge.yaml");
    std::fs::write(&path, text).expect("the config written");
    crate::state::build::build(&path).map(|_| ())
}

/// Every error names a file, a key or a reason: none is empty.
fn clear(r: Result<(), crate::config::ConfigErrors>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        prop_assert!(!e.0.is_empty());
        for err in e.0 {
            prop_assert!(!err.reason.is_empty() && !err.key.is_empty(), "{err}");
        }
    }
    Ok(())
}

/// Words conditions are made of, for token soup that gets past the lexer.
const CEL_WORDS: &[&str] = &[
    "cert.subject", "cert.serial", "cert.san_dns", "request.path", "request.headers", "connection.client_ip",
    "lists.denied", "==", "!=", "&&", "||", "!", "(", ")", "[", "]", "{", "}", ".", ",", ":", "?", "\"a\"", "'b'",
    "1", "-1", "1.5", "true", "null", "in", "size(", ".startsWith(", ".matches(", ".exists(x,", "x", "+", "*", "/",
    "%", "<", ">=", "timestamp(", "duration(", "b\"\\x00\"", "0x7fffffffffffffff", "9223372036854775808",
];

/// Edge header names with their case flipped and dashes turned to underscores at random.
fn spelled() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "CloudFront-Viewer-Cert-Subject", "CloudFront-Viewer-Cert-Present", "CloudFront-Viewer-Address",
        "X-Forwarded-For", "X-Forwarded-Proto", "Client-Cert", "Client-Cert-Chain", "Forwarded", "Via",
        "X-Real-IP", "X-Device-Subject",
    ]);
    (names, prop::collection::vec(any::<(bool, bool)>(), 32)).prop_map(|(n, flips)| {
        n.chars()
            .zip(flips.iter().cycle())
            .map(|(c, (upper, under))| match c {
                '-' if *under => '_',
                c if *upper => c.to_ascii_uppercase(),
                c => c.to_ascii_lowercase(),
            })
            .collect()
    })
}

fn plan(underscores: Underscores) -> HeaderPlan {
    HeaderPlan::new(HeaderNames {
        subject: Some(http::HeaderName::from_static("x-device-subject")),
        address: Some(http::HeaderName::from_static("cloudfront-viewer-address")),
        forwarded_for: Some(http::HeaderName::from_static("x-forwarded-for")),
        underscores,
        ..HeaderNames::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_config_loader_takes_any_text(text in "\\PC{0,300}") {
        clear(load_text(text.as_bytes()))?;
    }

    #[test]
    fn the_config_loader_takes_any_mutation_of_the_example(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut text = EXAMPLE.as_bytes().to_vec();
        for (at, byte) in edits {
            let i = at.index(text.len());
            text[i] = byte;
        }
        clear(load_text(&text))?;
    }

    #[test]
    fn the_rule_compiler_takes_any_text(src in "\\PC{0,200}") {
        let c = Compiler::new(Lists::default());
        for phase in [Phase::Connection, Phase::Request] {
            if let Err(e) = c.condition(&src, phase) { prop_assert!(!e.is_empty()); }
            if let Err(e) = c.string(&src, phase) { prop_assert!(!e.is_empty()); }
        }
    }

    #[test]
    fn the_rule_compiler_takes_token_soup(words in prop::collection::vec(prop::sample::select(CEL_WORDS.to_vec()), 0..40)) {
        let c = Compiler::new(Lists::default());
        let src = words.join(" ");
        if let Err(e) = c.condition(&src, Phase::Request) { prop_assert!(!e.is_empty()); }
    }

    /// Any bytes as a ClientHello: no panic, and a fingerprint that is a header-safe value.
    #[test]
    fn the_ja4_parser_takes_any_client_hello(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Some(f) = crate::fingerprint::ja4(&bytes) {
            prop_assert!(f.is_ascii() && http::HeaderValue::from_str(&f).is_ok(), "{f}");
        }
    }

    #[test]
    fn the_list_loader_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600), kind in prop::sample::select(vec![ListKind::Serial, ListKind::Sha256, ListKind::Text])) {
        if let Err(e) = RuleList::from_reader(kind, 8, bytes.as_slice()) {
            prop_assert!(e.starts_with("line "), "{e}");
        }
    }

    #[test]
    fn a_serial_in_any_spelling_is_found(serial in prop::collection::vec(any::<u8>(), 1..20), colons: bool, upper: bool) {
        let hex: Vec<String> = serial.iter().map(|b| format!("{b:02x}")).collect();
        let mut line = hex.join(if colons { ":" } else { "" });
        if upper { line = line.to_ascii_uppercase(); }
        let list = RuleList::from_reader(ListKind::Serial, 1, format!("{line}\n").as_bytes()).map_err(TestCaseError::fail)?;
        let cert = ViewerCert { serial_hex: crate::identity::serial_hex(&serial), ..ViewerCert::default() };
        prop_assert!(list.contains_serial(&cert));
    }

    #[test]
    fn no_spelling_of_an_edge_header_survives_the_strip(
        names in prop::collection::vec(spelled(), 1..6),
        others in prop::collection::vec("[a-z][a-z0-9_-]{0,12}", 0..4),
        policy in prop::sample::select(vec![Underscores::Drop, Underscores::Refuse, Underscores::Allow]),
    ) {
        let plan = plan(policy);
        let mut req = pingora::http::RequestHeader::build("GET", b"/", None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for n in names.iter().chain(&others) {
            req.append_header(n.clone(), "spoofed").map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let s = plan.strip(&mut req);
        for k in req.headers.keys() {
            let dashed = http::HeaderName::from_bytes(k.as_str().replace('_', "-").as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(!plan.is_edge(&dashed), "{k} survived");
            prop_assert!(policy == Underscores::Allow || !k.as_str().contains('_'), "{k} survived {policy:?}");
        }
        prop_assert_eq!(s.refuse, policy == Underscores::Refuse && s.underscored > 0);
    }

    #[test]
    fn any_certificate_names_give_safe_header_values(
        cn in "\\PC{1,120}",
        org in "[\\x00-\\x7f]{0,40}",
        dns in prop::collection::vec("[ -~]{1,60}", 0..3),
        uri in prop::collection::vec("[ -~]{1,80}", 0..3),
    ) {
        let mut spec = crate::pki::LeafSpec::client(&cn);
        spec.org = (!org.is_empty()).then_some(org);
        spec.dns = dns;
        spec.uris = uri;
        let Ok(ca) = crate::pki::Ca::root("Property CA") else { return Ok(()) };
        // rcgen refuses some names; what it issues must read back safely.
        let Ok(issued) = ca.issue(&spec) else { return Ok(()) };
        let x509 = boring::x509::X509::from_pem(issued.cert_pem.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let cert = ViewerCert::from_x509(&x509).ok_or_else(|| TestCaseError::fail("unreadable"))?;
        let name = |n: &'static str| Some(http::HeaderName::from_static(n));
        let plan = HeaderPlan::new(HeaderNames {
            subject: name("cloudfront-viewer-cert-subject"),
            issuer: name("cloudfront-viewer-cert-issuer"),
            pem: name("cloudfront-viewer-cert-pem"),
            san_uri: name("cloudfront-viewer-cert-san-uri"),
            san_dns: name("cloudfront-viewer-cert-san-dns"),
            ..HeaderNames::default()
        });
        let info = crate::identity::ConnectionInfo::default();
        let viewer = crate::identity::Viewer { addr: None, info: &info, version: http::Version::HTTP_11 };
        let headers = plan.render(Some(&cert), &[], &viewer);
        // The subject is never dropped, and no value can end a header line.
        prop_assert!(headers.iter().any(|(n, _)| n == "cloudfront-viewer-cert-subject"), "{:?}", cert.subject);
        for (n, v) in &headers {
            prop_assert!(!v.as_bytes().iter().any(|b| *b == b'\r' || *b == b'\n' || *b == 0), "{n}: {v:?}");
        }
    }
}

#[test]
fn deep_or_long_conditions_are_refused_not_overflowed() {
    let c = Compiler::new(Lists::default());
    for depth in [40, 10_000] {
        for src in [
            format!("{}true{}", "(".repeat(depth), ")".repeat(depth)),
            format!("{}1{}", "[".repeat(depth), "]".repeat(depth)),
            format!("{}true", "!".repeat(depth)),
            format!("{}1 == 1", "-".repeat(depth)),
        ] {
            let e = c.condition(&src, Phase::Request).err().unwrap_or_default();
            assert!(e.contains("more than"), "{depth}: {e}");
        }
    }
    // Long flat chains parse (CEL balances them) within the length limit.
    let chain = vec!["request.path == \"/a\""; 150].join(" || ");
    assert!(c.condition(&chain, Phase::Request).is_ok());
    for op in ["||", "&&", "+"] {
        let longest = vec!["1"; MAX_EXPRESSION_BYTES / (op.len() + 1)].join(op);
        let _ = c.condition(&format!("{longest} == 1"), Phase::Request);
    }
    let e = c.condition(&vec!["true"; 2000].join(" && "), Phase::Request).err().unwrap_or_default();
    assert!(e.contains("bytes long"), "{e}");
    // Nesting within the limit, and brackets in strings, are fine.
    assert!(c.condition("((((request.path == \"((((((\"))))", Phase::Request).is_ok());
}
