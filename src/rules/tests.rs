//! Rule loading, checking and evaluation semantics (no sockets: the socket tests are in
//! tests/rules.rs).

use super::*;
use crate::config::RuleFile;
use crate::identity::{NameParts, ViewerCert};
use cel::{Context, Value};

struct Loaded {
    _dir: tempfile::TempDir,
    set: RuleSet,
    errors: Vec<String>,
}

/// Loads `files` (name, YAML) from a fresh rules directory, with a serial list `denied`.
fn load(files: &[(&str, &str)]) -> Loaded {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    for (name, text) in files {
        std::fs::write(rules.join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("denied.txt"), "# revoked devices\n0A:1B\n").unwrap();
    let (set, errors) = crate::state::build::rules_for_test(
        &dir.path().join("edge.yaml"),
        "dir: rules\nlists: { denied: { file: denied.txt, kind: serial } }",
        &["main", "beta"],
    );
    Loaded { _dir: dir, set, errors }
}

fn ok(files: &[(&str, &str)]) -> RuleSet {
    let l = load(files);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    l.set
}

fn cert(cn: &str, ou: &str, serial: &str) -> ViewerCert {
    let digits: String = serial.chars().filter(|c| *c != ':').collect();
    ViewerCert {
        subject: format!("CN={cn},OU={ou},O=Example"),
        serial: serial.into(),
        serial_hex: match digits.trim_start_matches('0').to_ascii_lowercase() {
            t if t.is_empty() => "0".into(),
            t => t,
        },
        not_after: 86_400 * 30,
        subject_parts: NameParts {
            cn: cn.into(),
            o: "Example".into(),
            ou: ou.into(),
        },
        ..ViewerCert::default()
    }
}

/// Calls `f` with the facts of a request for `path` by a client with `cert`, on a connection to
/// fleet.example from 192.0.2.7, with `x-count: abc`, `x-count: def` and `x-name: héllo`, at
/// `now`.
fn with_facts<T>(set: &RuleSet, cert: Option<&ViewerCert>, path: &str, now: i64, f: impl FnOnce(&Facts) -> T) -> T {
    let info = ConnectionInfo {
        sni: "fleet.example".into(),
        tls_version: "TLSv1.3".into(),
        alpn: "h2".into(),
        ja4: "t13d1516h2_8daaf6152771_d8a2da3f94cd".into(),
        ..ConnectionInfo::default()
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("x-count", HeaderValue::from_static("abc"));
    headers.append("x-count", HeaderValue::from_static("def"));
    headers.insert("x-name", HeaderValue::from_bytes("héllo".as_bytes()).unwrap());
    let req = RequestInfo {
        method: "GET",
        host: "fleet.example",
        path,
        query: "",
        headers: &headers,
    };
    f(&Facts {
        cert,
        verified: true,
        connection: &info,
        client_ip: "192.0.2.7",
        request: Some(&req),
        lists: &set.lists,
        now,
    })
}

/// Runs `phase` for a client (`None`: no certificate) asking for `path`.
fn run(set: &RuleSet, phase: Phase, cert: Option<&ViewerCert>, path: &str, trace: Option<&mut Vec<Step>>) -> Outcome {
    with_facts(set, cert, path, 0, |facts| set.evaluate(&[phase], facts, trace))
}

const FLEET: &str = r#"
rules:
  - name: only-devices
    phase: connection
    when: '!client.cert.subject.cn.startsWith("device-")'
    deny: {}
  - name: revoked
    phase: connection
    when: lists.denied.contains(client.cert.serial)
    deny: {}
  - name: tag-model
    phase: request
    when: client.cert.present
    set_headers: { X-Model: client.cert.subject.ou }
  - name: cohort
    phase: request
    when: "true"
    cache_cohort: client.cert.subject.ou
  - name: shadow-block
    phase: request
    when: "true"
    mode: shadow
    deny: { status: 451 }
  - name: own-model-only
    phase: request
    when: |
      request.path.startsWith("/firmware/") &&
      !request.path.startsWith("/firmware/" + client.cert.subject.ou + "/")
    deny: { status: 403, body: "not your model" }
  - name: beta
    phase: request
    when: stableHash(client.cert.serial) % 100 < 10
    origin: beta
  - name: allow-rest
    phase: request
    when: "true"
    allow: true
  - name: never-reached
    phase: request
    when: "true"
    deny: {}
"#;

#[test]
fn connection_rules_deny_by_name_and_by_list_with_normalized_serials() {
    let set = ok(&[("fleet.yaml", FLEET)]);
    let good = cert("device-1", "x1", "01:02");
    assert_eq!(
        run(&set, Phase::Connection, Some(&good), "/", None).decision(),
        &Decision::Continue
    );
    let partner = cert("partner-1", "x1", "01:02");
    let out = run(&set, Phase::Connection, Some(&partner), "/", None);
    assert!(matches!(out.decision(), Decision::Deny { rule, .. } if &**rule == "only-devices"));
    // The list holds 0A:1B; the certificate's serial is written another way.
    let revoked = cert("device-2", "x1", "00:0a:1B");
    let out = run(&set, Phase::Connection, Some(&revoked), "/", None);
    assert!(matches!(out.decision(), Decision::Deny { rule, .. } if &**rule == "revoked"));
}

#[test]
fn connection_rules_from_the_first_that_reads_the_client_ip_wait_for_the_handshake_to_end() {
    let set = ok(&[(
        "c.yaml",
        r#"
rules:
  - { name: revoked, phase: connection, when: 'lists.denied.contains(client.cert.serial)', deny: {} }
  - { name: lab, phase: connection, when: 'connection.client_ip.startsWith("192.0.2.")', deny: {} }
  - { name: admins, phase: connection, when: 'client.cert.subject.cn == "admin"', allow: true }
  - { name: request-ip, phase: request, when: 'connection.client_ip == ""', deny: {} }
"#,
    )]);
    let phases: Vec<(&str, Phase)> = set.rules.iter().map(|r| (&*r.name, r.phase)).collect();
    assert_eq!(
        phases,
        [
            ("revoked", Phase::Connection),
            ("lab", Phase::AfterHandshake),
            ("admins", Phase::AfterHandshake),
            ("request-ip", Phase::Request)
        ]
    );
    // The rules before the first that reads the address still decide in the handshake.
    let revoked = cert("device-2", "x1", "0a:1b");
    let out = run(&set, Phase::Connection, Some(&revoked), "/", None);
    assert!(matches!(out.decision(), Decision::Deny { rule, .. } if &**rule == "revoked"));
    let good = cert("device-1", "x1", "01:02");
    assert_eq!(
        run(&set, Phase::Connection, Some(&good), "/", None).decision(),
        &Decision::Continue
    );
    // The rest runs with the address (192.0.2.7 here).
    let out = run(&set, Phase::AfterHandshake, Some(&good), "/", None);
    assert!(matches!(out.decision(), Decision::Deny { rule, .. } if &**rule == "lab"));

    // Reading the whole `connection` reads the address too.
    let set = ok(&[(
        "w.yaml",
        "rules:\n  - { name: w, phase: connection, when: 'connection[\"client_ip\"] == \"\"', deny: {} }\n",
    )]);
    assert!(set.has_phase(Phase::AfterHandshake) && !set.has_phase(Phase::Connection));
    // A request variable is still refused in a connection rule.
    let l = load(&[(
        "r.yaml",
        "rules:\n  - { name: r, phase: connection, when: 'connection.client_ip == request.host', deny: {} }\n",
    )]);
    assert!(
        l.errors
            .join("\n")
            .contains("'request.host' is not known during the handshake"),
        "{:?}",
        l.errors
    );
}

#[test]
fn request_rules_run_in_order_first_decision_ends_and_other_actions_accumulate() {
    let set = ok(&[("fleet.yaml", FLEET)]);
    let c = cert("device-1", "x1", "01:02");
    let out = run(&set, Phase::Request, Some(&c), "/firmware/x1/image.bin", None);
    assert_eq!(
        out.decision(),
        &Decision::Allow {
            rule: "allow-rest".into()
        }
    );
    assert_eq!(
        out.headers,
        vec![HeaderOp::Set(
            HeaderName::from_static("x-model"),
            HeaderValue::from_static("x1")
        )]
    );
    assert_eq!(out.cohort.as_deref(), Some("x1"));
    // The shadow deny changed nothing; never-reached was never reached.
    let mut trace = Vec::new();
    let out = run(
        &set,
        Phase::Request,
        Some(&c),
        "/firmware/x2/image.bin",
        Some(&mut trace),
    );
    assert_eq!(
        out.decision(),
        &Decision::Deny {
            rule: "own-model-only".into(),
            status: 403,
            body: Arc::from("not your model")
        }
    );
    let names: Vec<&str> = trace.iter().map(|s| &*s.rule).collect();
    assert_eq!(names, ["tag-model", "cohort", "shadow-block", "own-model-only"]);
    assert!(trace[2].shadow && trace[2].result == Ok(true));
}

#[test]
fn the_staged_rollout_hash_is_stable_and_splits_about_ten_percent() {
    let set = ok(&[("fleet.yaml", FLEET)]);
    let beta = (0..1000)
        .filter(|i| {
            let c = cert("device-1", "x1", &format!("{i:04x}"));
            run(&set, Phase::Request, Some(&c), "/", None).origin.as_deref() == Some("beta")
        })
        .count();
    assert!((60..=140).contains(&beta), "{beta} of 1000 in beta");
    let c = cert("device-1", "x1", "01:02");
    let first = run(&set, Phase::Request, Some(&c), "/", None).origin.clone();
    assert_eq!(run(&set, Phase::Request, Some(&c), "/", None).origin, first);
}

#[test]
fn clients_without_a_certificate_see_present_false_and_empty_fields() {
    let set = ok(&[("fleet.yaml", FLEET)]);
    let out = run(&set, Phase::Connection, None, "/", None);
    assert!(matches!(out.decision(), Decision::Deny { rule, .. } if &**rule == "only-devices"));
}

#[test]
fn an_evaluation_error_at_run_time_denies() {
    let set = ok(&[(
        "a.yaml",
        "rules:\n  - name: count\n    phase: request\n    when: int(request.headers['x-count']) > 3\n    deny: {}\n",
    )]);
    let c = cert("device-1", "x1", "01");
    // x-count is "abc": int() fails, and the request is denied, naming the rule.
    let out = run(&set, Phase::Request, Some(&c), "/", None);
    assert!(
        matches!(out.decision(), Decision::Error { rule, .. } if &**rule == "count"),
        "{out:?}"
    );
    assert!(out.denied());
}

#[test]
fn files_load_in_name_order() {
    let set = ok(&[
        ("20-b.yaml", "rules:\n  - { name: second, phase: request, deny: {} }\n"),
        (
            "10-a.yaml",
            "rules:\n  - { name: first, phase: request, allow: true }\n",
        ),
    ]);
    let out = run(&set, Phase::Request, None, "/", None);
    assert_eq!(out.decision(), &Decision::Allow { rule: "first".into() });
}

#[test]
fn every_kind_of_bad_rule_stops_the_load_with_file_line_and_message() {
    // (rule text under `rules:`, what the message must say)
    let cases = [
        ("{ name: a, phase: request, when: 'request.path ==', deny: {} }", "when"),
        (
            "{ name: a, phase: request, when: 'requst.path == \"/\"', deny: {} }",
            "unknown variable or field 'requst.path'",
        ),
        (
            "{ name: a, phase: request, when: 'client.cert.subject.cnn == \"x\"', deny: {} }",
            "'client.cert.subject.cnn'",
        ),
        (
            "{ name: a, phase: request, when: 'client.cert.days_until_expiry > \"x\"', deny: {} }",
            "does not evaluate",
        ),
        (
            "{ name: a, phase: request, when: 'request.path', deny: {} }",
            "must be a bool",
        ),
        (
            "{ name: a, phase: request, when: 'lists.nope.contains(\"x\")', deny: {} }",
            "unknown list 'nope'",
        ),
        (
            "{ name: a, phase: connection, when: 'request.path == \"/\"', deny: {} }",
            "not known during the handshake",
        ),
        (
            "{ name: a, phase: request, origin: nowhere }",
            "unknown origin 'nowhere'",
        ),
        (
            "{ name: a, phase: request, allow: true, deny: {} }",
            "more than one action",
        ),
        ("{ name: a, phase: request }", "no action"),
        (
            "{ name: a, phase: connection, cache_cohort: '\"x\"' }",
            "only allow or deny",
        ),
        (
            "{ name: a, phase: connection, deny: { status: 451 } }",
            "refuses the handshake",
        ),
        (
            "{ name: a, phase: request, set_headers: { X-A: '1' } }",
            "must be a string",
        ),
        (
            "{ name: a, phase: request, set_headers: { CloudFront-Viewer-Cert-Serial: '\"x\"' } }",
            "identity header",
        ),
        ("{ name: a, phase: request, deny: { status: 200 } }", "not a 4xx or 5xx"),
        (
            "{ name: a, phase: request, remove_headers: [Content-Length] }",
            "frames or routes the request",
        ),
        (
            "{ name: a, phase: request, set_headers: { Host: '\"x\"' } }",
            "frames or routes the request",
        ),
        ("{ name: a, phase: later, deny: {} }", "unknown variant `later`"),
        (
            "{ name: a, phase: request, deny: {}, colour: red }",
            "unknown field `colour`",
        ),
    ];
    for (rule, needle) in cases {
        let text = format!("# a comment\nrules:\n  - {rule}\n");
        let l = load(&[("bad.yaml", &text)]);
        let all = l.errors.join("\n");
        assert!(all.contains(needle), "{rule}: message lacks '{needle}':\n{all}");
        assert!(all.contains("bad.yaml"), "{rule}: no file in\n{all}");
        if !needle.starts_with("unknown variant") && !needle.starts_with("unknown field") {
            assert!(all.contains("bad.yaml:3"), "{rule}: no line in\n{all}");
        }
    }
    let l = load(&[(
        "dup.yaml",
        "rules:\n  - { name: a, phase: request, allow: true }\n  - { name: a, phase: request, allow: true }\n",
    )]);
    assert!(l.errors.join("\n").contains("used twice"), "{:?}", l.errors);
}

#[test]
fn a_multi_line_condition_error_names_the_line_in_the_expression() {
    let text = "rules:\n  - name: a\n    phase: request\n    when: |\n      request.path == \"/\" &&\n      client.cert.subject.bogus == \"x\"\n    deny: {}\n";
    let l = load(&[("m.yaml", text)]);
    let all = l.errors.join("\n");
    assert!(all.contains("m.yaml:2") && all.contains("when (line 4)"), "{all}");
    assert!(all.contains("expression line 2, column 1"), "{all}");
}

/// Every rule whose condition held is counted per request (shadow rules as would_match), and
/// the access log learns which rules applied.
#[test]
fn each_request_counts_the_rules_that_matched() {
    let set = ok(&[(
        "s.yaml",
        r#"rules:
  - { name: counted-model, phase: request, set_headers: { X-Model: client.cert.subject.ou } }
  - { name: counted-shadow, phase: request, mode: shadow, when: 'request.path == "/a"', deny: {} }
  - { name: counted-allow, phase: request, allow: true }
"#,
    )]);
    let counter = |rule: &str, outcome: &str| {
        crate::metrics::RULE_EVALUATIONS
            .with_label_values(&["request", rule, outcome])
            .get()
    };
    let (model, shadow) = (
        counter("counted-model", "matched"),
        counter("counted-shadow", "would_match"),
    );
    let c = cert("device-1", "x1", "01:02");
    for path in ["/a", "/a", "/b"] {
        let out = run(&set, Phase::Request, Some(&c), path, None);
        let matched: Vec<&str> = out.matched.iter().filter_map(|i| set.name(*i)).collect();
        assert_eq!(matched, ["counted-model", "counted-allow"], "{path}");
    }
    assert_eq!(counter("counted-model", "matched") - model, 3);
    assert_eq!(counter("counted-shadow", "would_match") - shadow, 2);
}

/// Every condition of the shipped examples and of the benchmark's 20 rules, plus edge cases:
/// the compiled form must exist for the subset, and agree with the cel interpreter everywhere.
#[test]
fn compiled_conditions_agree_with_the_cel_interpreter() {
    let mut sources: Vec<String> = vec![
        r#"client.cert.subject.cn + "/" + client.cert.subject.ou == "device-1/x1""#.into(),
        r#"request.headers["X-Count"] == "abc" || request.headers.missing != """#.into(),
        r#"size(request.path) >= 5 && request.path.size() < 100"#.into(),
        r#"stableHash(client.cert.serial) % 7 == 3 || 5 % 0 == 1"#.into(),
        r#"5 % 0 == 1 || true"#.into(),
        r#"5 % 0 == 1 && false"#.into(),
        r#"client.cert.days_until_expiry in [29, 30, 31]"#.into(),
        r#"now < client.cert.not_after && client.cert.not_before <= now"#.into(),
        r#"!client.cert.present || client.cert.verified"#.into(),
        r#"client.cert.serial in lists.denied"#.into(),
        r#"connection.sni.endsWith(".example") && connection.client_ip.startsWith("192.")"#.into(),
        r#"connection.ja4.startsWith("t13d") && connection.ja4 != "t12i0100_x""#.into(),
        r#"request.method in ["GET", "HEAD"] && request.query == "" && request.host.contains("fleet")"#.into(),
        r#"size("héllo") == 5 && "a" == "a" && "fleet.example".startsWith(request.host)"#.into(),
        r#"stableHash("x") > 0 && "/" + "firmware" + "/images/x1/a.bin" == request.path"#.into(),
        r#""device-1" in ["device-1", "x"] || "/" + "x" == request.path"#.into(),
        // Tests held as data: negated int comparisons, a literal on the left, empty and long
        // searches, and chains whose other operands can fail.
        r#"!(size(request.path) > 10) || 3 < size(request.query) || client.cert.days_until_expiry != 30"#.into(),
        r#"request.path.contains("/x1/") || request.path.contains("") && !request.path.contains("..")"#.into(),
        r#"request.path.contains("0123456789/a.bin") && request.path.endsWith(".bin")"#.into(),
        r#"request.path.startsWith("/firmware/") && size(request.path) % 0 == 1"#.into(),
        r#"size(request.path) % 0 == 1 || request.path == "/" || request.query != """#.into(),
        // A header named twice (one table entry), a set of literals, and a literal too long for
        // the table's encoding (a closure instead).
        r#"request.headers["x-count"] in ["a", "b", "abc"] || request.headers["X-Count"].endsWith("bc")"#.into(),
        // Header values the request path does not read itself: sent twice, and not ASCII.
        r#"request.headers["x-count"].contains("c, d") && size(request.headers["x-count"]) == 8"#.into(),
        r#"request.headers["x-name"].startsWith("hé") && size(request.headers["x-name"]) == 5"#.into(),
        format!(
            r#"request.path == "{}" || request.path.startsWith("/firmware/")"#,
            "a".repeat(70_000)
        ),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["load/rules-20/bench.yaml", "lua-free-rules/firmware-fleet/fleet.yaml"] {
        let parsed: RuleFile = serde_yaml::from_str(&std::fs::read_to_string(root.join(file)).unwrap()).unwrap();
        // This set's serial list is `denied`.
        sources.extend(
            parsed
                .rules
                .into_iter()
                .map(|r| r.when.replace("lists.revoked", "lists.denied")),
        );
    }
    let set = ok(&[]);
    let compiled = sources
        .iter()
        .filter(|src| agrees_with_the_interpreter(&set, src))
        .count();
    // Everything, the comprehension (`exists`) over SANs included, is in the tree's subset.
    assert_eq!(compiled, sources.len(), "{sources:#?}");
}

/// Checks that `src`, compiled to a tree, gives what the cel interpreter gives (errors included)
/// for three clients and five paths. False when `src` is not in the tree's subset.
fn agrees_with_the_interpreter(set: &RuleSet, src: &str) -> bool {
    let certs = [
        Some(cert("device-1", "x1", "0a:1b")),
        Some(cert("sensor-9", "x2", "ff")),
        None,
    ];
    let paths = [
        "/firmware/images/x1/a.bin",
        "/firmware/images/x2/a.bin",
        "/",
        "/files/../etc",
        "/firmware/images/x1/a-name-longer-than-sixty-four-bytes-0123456789/a.bin",
    ];
    let reference = condition::Condition::Cel(Box::new(set.env.compile(src).unwrap()));
    let tree = condition::Condition::compile(set.env.compile(src).unwrap(), &set.lists);
    if tree.interpreted() {
        return false;
    }
    for c in &certs {
        for path in paths {
            with_facts(set, c.as_ref(), path, 86_400, |facts| {
                let reference = reference.eval(&set.env, facts);
                let got = tree.eval(&set.env, facts);
                assert_eq!(
                    got.is_ok(),
                    reference.is_ok(),
                    "{src} on {path}: {got:?} vs {reference:?}"
                );
                if let (Ok(a), Ok(b)) = (&got, &reference) {
                    assert_eq!(a, b, "{src} on {path} with {c:?}");
                }
            });
        }
    }
    true
}

/// Conditions generated from the compiled subset's shapes (fields against literals, sizes and
/// times compared, `!`, `&&`, `||`, nesting, and an operand that fails), a few hundred of them
/// from a fixed seed: each must compile and agree with the interpreter.
#[test]
fn generated_conditions_agree_with_the_cel_interpreter() {
    const FIELDS: &[&str] = &[
        "request.path",
        "request.method",
        "request.host",
        "request.query",
        r#"request.headers["x-count"]"#,
        "client.cert.subject.cn",
        "client.cert.subject.ou",
        "connection.sni",
        "connection.tls_version",
    ];
    const LITERALS: &[&str] = &[
        "",
        "/",
        "/firmware/",
        "/firmware/images/x1/a.bin",
        "x1",
        "x2",
        "device-1",
        "GET",
        "fleet",
        "fleet.example",
        "abc",
        "abc, def",
        "..",
        "a.bin",
        ".bin",
        "TLSv1.3",
        "1",
    ];
    const CMPS: &[&str] = &["<", "<=", ">", ">=", "==", "!="];
    const INTS: &[i64] = &[0, 1, 3, 5, 13, 25, 30, 100];
    // xorshift64: a fixed sequence, so a failure names the same expression every time.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    fn lit(s: &str) -> String {
        format!("{s:?}")
    }
    fn condition(next: &mut dyn FnMut(usize) -> usize, depth: u32) -> String {
        let field = |next: &mut dyn FnMut(usize) -> usize| FIELDS[next(FIELDS.len())];
        let literal = |next: &mut dyn FnMut(usize) -> usize| lit(LITERALS[next(LITERALS.len())]);
        let cmp = |next: &mut dyn FnMut(usize) -> usize| CMPS[next(CMPS.len())];
        match next(if depth == 0 { 9 } else { 12 }) {
            0 => format!("{} {} {}", field(next), ["==", "!="][next(2)], literal(next)),
            1 => format!("{} {} {}", literal(next), ["==", "!="][next(2)], field(next)),
            2 => format!("{}.startsWith({})", field(next), literal(next)),
            3 => format!("{}.endsWith({})", field(next), literal(next)),
            4 => format!("{}.contains({})", field(next), literal(next)),
            5 => {
                let items: Vec<String> = (0..1 + next(3)).map(|_| literal(next)).collect();
                format!("{} in [{}]", field(next), items.join(", "))
            }
            6 => format!("size({}) {} {}", field(next), cmp(next), INTS[next(INTS.len())]),
            7 => match next(3) {
                0 => format!("client.cert.days_until_expiry {} {}", cmp(next), INTS[next(INTS.len())]),
                1 => format!("now {} client.cert.not_after", cmp(next)),
                _ => format!("client.cert.not_before {} now", cmp(next)),
            },
            // An operand that fails at run time (CEL's `&&` and `||` may still decide).
            8 => format!("size({}) % 0 == 1", field(next)),
            9 => format!("!({})", condition(next, depth - 1)),
            10 => format!("({} && {})", condition(next, depth - 1), condition(next, depth - 1)),
            _ => format!("({} || {})", condition(next, depth - 1), condition(next, depth - 1)),
        }
    }
    let set = ok(&[]);
    for _ in 0..300 {
        let src = condition(&mut next, 3);
        assert!(agrees_with_the_interpreter(&set, &src), "not compiled: {src}");
    }
}

#[test]
fn header_changes_apply_in_rule_order() {
    let set = ok(&[(
        "h.yaml",
        r#"rules:
  - { name: set-a, phase: request, set_headers: { X-A: '"1"', X-B: '"2"' } }
  - { name: drop-a, phase: request, remove_headers: [X-A] }
  - { name: set-b-again, phase: request, set_headers: { X-B: '"3"' } }
"#,
    )]);
    let out = run(&set, Phase::Request, None, "/", None);
    let set_now: Vec<(&str, &[u8])> = out
        .headers_set()
        .into_iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    assert_eq!(set_now, [("x-b", b"3".as_slice())]);
}

#[test]
fn a_header_value_that_is_not_utf8_still_reads_as_present() {
    let set = ok(&[(
        "h.yaml",
        "rules:\n  - { name: no-debug, phase: request, when: 'request.headers[\"x-debug\"] != \"\"', deny: {} }\n",
    )]);
    let mut headers = http::HeaderMap::new();
    headers.insert("x-debug", HeaderValue::from_bytes(b"on\xff").unwrap());
    let req = RequestInfo {
        method: "GET",
        host: "h",
        path: "/",
        query: "",
        headers: &headers,
    };
    let info = ConnectionInfo::default();
    let facts = Facts {
        cert: None,
        verified: true,
        connection: &info,
        client_ip: "",
        request: Some(&req),
        lists: &set.lists,
        now: 0,
    };
    assert!(set.evaluate(&[Phase::Request], &facts, None).denied());
    // The interpreter reads it the same way.
    let program = set.env.compile("request.headers[\"x-debug\"] != \"\"").unwrap();
    let mut ctx = Context::with_env(set.env.clone());
    ctx.set_variable_resolver(&facts);
    assert_eq!(program.execute(&ctx), Ok(Value::Bool(true)));
}

#[test]
fn locations_survive_trailing_comments_and_point_at_the_duplicate() {
    let text = "rules:\n  - name: a   # the first\n    phase: request\n    allow: true\n  - name: a\n    phase: request\n    allow: true\n";
    let l = load(&[("d.yaml", text)]);
    let all = l.errors.join("\n");
    assert!(all.contains("d.yaml:5: rule 'a': the name is used twice"), "{all}");
    let set = ok(&[(
        "c.yaml",
        "rules:\n  - name: b   # comment\n    phase: request\n    allow: true\n",
    )]);
    assert!(set.rules[0].location.ends_with("c.yaml:2"), "{}", set.rules[0].location);
}
