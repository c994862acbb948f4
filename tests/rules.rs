//! The rule examples shipped in lua-free-rules/, each run by a real edge over real sockets,
//! plus the connection-phase behaviours (refusal reason, optional mode, shadow, fail closed).

mod common;

use common::*;
use mtls_edge::pki::{self, Ca, Issued, LeafSpec};
use std::path::{Path, PathBuf};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules").join(name)
}

fn device(ca: &Ca, cn: &str, org: Option<&str>, ou: Option<&str>) -> Issued {
    let mut spec = LeafSpec::client(cn);
    spec.org = org.map(str::to_string);
    spec.org_unit = ou.map(str::to_string);
    ca.issue(&spec).unwrap()
}

/// The serial as rules see it: lowercase hex, no colons, no leading zeros.
fn serial_text(i: &Issued) -> String {
    let hex: String = i.serial.iter().map(|b| format!("{b:02x}")).collect();
    let t = hex.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.into()
    }
}

struct Edge {
    dir: tempfile::TempDir,
    origin: Proc,
    _beta: Option<Proc>,
    edge: Proc,
    optional_port: u16,
    admin_port: u16,
}

impl Edge {
    fn client(&self, cert: &str) -> Client<'_> {
        Client::new(self.dir.path(), self.edge.port).cert(cert)
    }

    /// Asserts that `want` handshakes were refused for `reason` on the listener at `port`
    /// (waiting for the last count: see `wait_metric`).
    fn expect_refused_on(&self, port: u16, reason: &str, want: f64) {
        let name = format!(
            "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{port}\",outcome=\"refused\",reason=\"{reason}\"}}"
        );
        assert_eq!(wait_metric(self.admin_port, &name, want), want, "{reason} on {port}");
    }

    fn expect_refused(&self, reason: &str, want: f64) {
        self.expect_refused_on(self.edge.port, reason, want)
    }
}

/// An edge with `rules_yaml` (the `rules:` section), a fleet CA and another CA in its trust
/// store, and the devices `certs` written by `make`. `beta` adds a second origin named beta.
fn edge(rules_yaml: &str, beta: bool, make: impl FnOnce(&Path, &Ca, &Ca)) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let fleet = Ca::root("Fleet Device CA").unwrap();
    let other = Ca::root("Other CA").unwrap();
    pki::write_file(
        &d.join("devices-ca.pem"),
        &format!("{}{}", fleet.cert_pem, other.cert_pem),
        false,
    )
    .unwrap();
    make(d, &fleet, &other);
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let beta = beta.then(|| spawn_origin(d, "origin-server", "edge-ca.pem"));
    let (port, optional_port, admin_port) = (free_port(), free_port(), free_port());
    let origins = match &beta {
        Some(b) => format!("{}{}", origin_yaml("main", origin.port), origin_yaml("beta", b.port)),
        None => origin_yaml("main", origin.port),
    };
    let yaml = format!(
        "{server}listeners:\n{required}{optional}trust_stores:\n  devices: {{ ca_files: [devices-ca.pem] }}\norigins:\n{origins}routes:\n  - {{ path_prefix: /firmware/, origin: main, access: any, cache: {{ default_ttl_secs: 60 }} }}\n  - {{ path_prefix: /, origin: main, access: any }}\ncache: {{ max_bytes: 16777216, max_object_bytes: 1048576 }}\nadmin: {{ address: 127.0.0.1:{admin_port} }}\n{rules_yaml}\n",
        server = server_yaml(d, 2),
        required = listener_yaml(port, "required", "devices"),
        optional = listener_yaml(optional_port, "optional", "devices"),
    );
    let edge = spawn_edge(d, &yaml, port);
    Edge {
        dir,
        origin,
        _beta: beta,
        edge,
        optional_port,
        admin_port,
    }
}

/// An edge whose only rule file holds `rules` (YAML), with one fleet device, `good`.
fn edge_with_rule_file(rules: &str) -> (tempfile::TempDir, Edge) {
    edge_with_rules_and_devices(rules, &[("good", "device-0001")])
}

/// An edge whose only rule file holds `rules` (YAML), with fleet devices `(stem, CN)`.
fn edge_with_rules_and_devices(rules: &str, devices: &[(&str, &str)]) -> (tempfile::TempDir, Edge) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yaml"), rules).unwrap();
    let e = edge(
        &format!("rules: {{ dir: {} }}", dir.path().display()),
        false,
        |d, fleet, _| {
            for (stem, cn) in devices {
                save(d, stem, &device(fleet, cn, None, None));
            }
        },
    );
    (dir, e)
}

fn rules_dir(name: &str) -> String {
    format!("rules: {{ dir: {} }}", example(name).display())
}

#[test]
fn firmware_fleet_only_devices_from_the_fleet_ca_and_only_their_own_models_images() {
    let e = edge(&rules_dir("firmware-fleet"), false, |d, fleet, other| {
        save(d, "x1", &device(fleet, "device-0001", None, Some("x1")));
        save(d, "sensor", &device(fleet, "sensor-0001", None, Some("x1")));
        save(d, "foreign", &device(other, "device-0002", None, Some("x1")));
    });
    let r = e.client("x1").get("/firmware/images/x1/fw-2.0.bin").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(e.client("x1").get("/firmware/manifest.json").unwrap().status, 200);
    let r = e.client("x1").get("/firmware/images/x2/fw-2.0.bin").unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "this device model may not fetch that image\n")
    );
    // Another model's image by way of dot segments, empty segments or encoded dots: refused
    // before routing and rules (the origin might resolve them).
    for sneaky in [
        "/firmware/images/x1/../x2/fw-2.0.bin",
        "//firmware/images/x2/fw-2.0.bin",
        "/firmware/images/x1/%2e%2e/x2/fw-2.0.bin",
    ] {
        assert_eq!(e.client("x1").get(sneaky).unwrap().status, 400, "{sneaky}");
    }
    // Refused in the handshake: a CN that is not device-*, and a device of another CA that the
    // trust store also holds.
    assert!(e.client("sensor").get("/firmware/manifest.json").is_err());
    assert!(e.client("foreign").get("/firmware/manifest.json").is_err());
    e.expect_refused("ConnectionRuleDenied", 2.0);
    e.edge.wait_connection_log("ConnectionRuleDenied", "rule devices-only");
    e.edge.wait_connection_log("ConnectionRuleDenied", "rule fleet-ca-only");
}

#[test]
fn partner_api_maps_the_organization_to_paths_and_a_header() {
    let e = edge(&rules_dir("partner-api"), false, |d, fleet, _| {
        save(d, "acme", &device(fleet, "api-client", Some("Acme Corp"), None));
        save(d, "globex", &device(fleet, "api-client", Some("Globex"), None));
        save(d, "initech", &device(fleet, "api-client", Some("Initech"), None));
    });
    let r = e.client("acme").get("/api/acme/orders").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("x-partner: acme"), "{}", r.body);
    let r = e.client("globex").get("/api/shared/status").unwrap();
    assert!(r.body.contains("x-partner: globex"), "{}", r.body);
    // A client cannot send its own X-Partner: the rule sets it.
    let r = e
        .client("globex")
        .header("X-Partner", "acme")
        .get("/api/globex/x")
        .unwrap();
    assert!(
        r.body.contains("x-partner: globex") && !r.body.contains("x-partner: acme"),
        "{}",
        r.body
    );
    assert_eq!(e.client("acme").get("/api/globex/orders").unwrap().status, 403);
    let r = e.client("initech").get("/api/shared/status").unwrap();
    assert_eq!((r.status, r.body.as_str()), (403, "unknown partner\n"));
}

#[test]
fn a_revocation_denylist_refuses_listed_serials_in_the_handshake() {
    let dir_holder = tempfile::tempdir().unwrap();
    let list = dir_holder.path().join("revoked.txt");
    let rules = format!(
        "rules:\n  dir: {}\n  lists:\n    revoked_serials: {{ file: {}, kind: serial }}",
        example("revocation-denylist").display(),
        list.display()
    );
    let e = edge(&rules, false, |d, fleet, _| {
        let revoked = device(fleet, "device-0009", None, None);
        // Written with colons and in upper case; the certificate's serial is matched anyway.
        let colons: Vec<String> = revoked.serial.iter().map(|b| format!("{b:02X}")).collect();
        std::fs::write(&list, format!("# revoked\n{}\n", colons.join(":"))).unwrap();
        save(d, "revoked", &revoked);
        save(d, "good", &device(fleet, "device-0001", None, None));
    });
    assert_eq!(e.client("good").get("/firmware/manifest.json").unwrap().status, 200);
    for v in [boring::ssl::SslVersion::TLS1_2, boring::ssl::SslVersion::TLS1_3] {
        assert!(
            e.client("revoked").version(v).get("/firmware/manifest.json").is_err(),
            "{v:?}"
        );
    }
    e.expect_refused("ConnectionRuleDenied", 2.0);
    e.edge
        .wait_connection_log("ConnectionRuleDenied", "rule revoked-serials");
}

/// FNV-1a as the edge's `stableHash`: the test predicts each device's group independently.
fn stable_hash(s: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 1) as i64
}

#[test]
fn a_staged_rollout_sends_a_stable_ten_percent_to_the_beta_origin_without_mixing_the_cache() {
    let mut expected = Vec::new();
    let e = edge(&rules_dir("staged-rollout"), true, |d, fleet, _| {
        // Enough devices that both groups have members (about one in ten is beta).
        let mut beta = 0;
        let mut i = 0;
        while beta < 2 || i < 20 {
            let dev = device(fleet, &format!("device-{i:04}"), None, None);
            let is_beta = stable_hash(&serial_text(&dev)) % 100 < 10;
            beta += usize::from(is_beta);
            expected.push((save(d, &format!("dev{i}"), &dev), is_beta));
            i += 1;
        }
    });
    let beta_port = e._beta.as_ref().unwrap().port.to_string();
    let main_port = e.origin.port.to_string();
    for round in 0..2 {
        for (stem, is_beta) in &expected {
            let r = e.client(stem).get("/firmware/manifest.json").unwrap();
            assert_eq!(r.status, 200);
            let want = if *is_beta { &beta_port } else { &main_port };
            assert_eq!(r.header("x-origin-port"), Some(want.as_str()), "{stem} round {round}");
        }
    }
    // Each group's manifest was fetched once and then served from its own cache entry.
    let r = e.client(&expected[0].0).get("/firmware/manifest.json").unwrap();
    assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
}

#[test]
fn connection_rules_also_run_for_clients_without_a_certificate_in_optional_mode() {
    let rules =
        "rules:\n  - { name: certificate-or-nothing, phase: connection, when: '!client.cert.present', deny: {} }\n";
    let (_rules_dir, e) = edge_with_rule_file(rules);
    let anonymous = Client::new(e.dir.path(), e.optional_port).get("/firmware/manifest.json");
    assert!(anonymous.is_err(), "answered: {anonymous:?}");
    let with_cert = Client::new(e.dir.path(), e.optional_port)
        .cert("good")
        .get("/firmware/manifest.json");
    assert_eq!(with_cert.unwrap().status, 200);
    e.expect_refused_on(e.optional_port, "ConnectionRuleDenied", 1.0);
}

#[test]
fn connection_rules_that_read_the_client_ip_close_the_connection_before_its_first_request() {
    let rules = r#"rules:
  - { name: banned, phase: connection, when: 'client.cert.subject.cn == "device-0009"', deny: {} }
  - { name: operators, phase: connection, when: 'client.cert.subject.cn == "device-0002"', allow: true }
  - { name: loopback-only, phase: connection, when: 'connection.client_ip != "127.0.0.1"', deny: {} }
"#;
    let (_rules_dir, e) = edge_with_rules_and_devices(
        rules,
        &[
            ("good", "device-0001"),
            ("operator", "device-0002"),
            ("banned", "device-0009"),
        ],
    );
    let d = e.dir.path();
    let port = e.edge.port;
    let code_over = |http: &str, stem: &str, from: &str| {
        let args = [http, "--interface", from, "-o", "/dev/null", "-w", "%{http_code}"];
        let out = curl(d, port, stem, "/firmware/manifest.json", &args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let code = |stem: &str, from: &str| code_over("--http1.1", stem, from);
    assert_eq!(code("good", "127.0.0.1"), (Some(0), "200".into()));
    // From another address: the handshake completes, the request is never answered (curl's 52
    // is an empty reply); over HTTP/2 its stream is reset (curl's 92).
    assert_eq!(code("good", "127.0.0.2").0, Some(52));
    assert_eq!(code_over("--http2", "good", "127.0.0.2"), (Some(92), "000".into()));
    // A rule before the address rule still decides in the handshake: it allows...
    assert_eq!(code("operator", "127.0.0.2"), (Some(0), "200".into()));
    // ...or refuses the handshake itself (curl's 56: the TLS alert arrives as it reads).
    assert!(matches!(code("banned", "127.0.0.1").0, Some(35 | 56)));
    e.expect_refused("ConnectionRuleDenied", 3.0);
    let line = e.edge.wait_connection_log(
        "ConnectionRuleDenied",
        "rule loopback-only, after the handshake, from 127.0.0.2",
    );
    assert_eq!(line["client_ip"], "127.0.0.2", "{line}");
    e.edge.wait_connection_log("ConnectionRuleDenied", "rule banned");

    // A connection that closes before its first request is counted as an accepted handshake.
    let accepted = || {
        metric(
            e.admin_port,
            &format!("mtls_edge_handshakes_total{{listener=\"127.0.0.1:{port}\",outcome=\"accepted\",reason=\"Ok\"}}"),
        )
    };
    assert_eq!(accepted(), 2.0);
    let mut tls = e.client("good").connect().unwrap();
    // TLS 1.3: the edge completes its side when it reads the client's Finished.
    tls.shutdown().ok();
    drop(tls);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while accepted() < 3.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(accepted(), 3.0);
    e.expect_refused("ConnectionRuleDenied", 3.0);
}

#[test]
fn connection_rule_errors_refuse_in_the_handshake_and_after_it() {
    let rules = r#"rules:
  - { name: bad-name, phase: connection, when: 'client.cert.subject.cn == "device-0003" && int(client.cert.subject.cn) > 0', deny: {} }
  - { name: bad-address, phase: connection, when: 'client.cert.subject.cn == "device-0004" && int(connection.client_ip) > 0', deny: {} }
"#;
    let (_rules_dir, e) = edge_with_rules_and_devices(
        rules,
        &[
            ("good", "device-0001"),
            ("three", "device-0003"),
            ("four", "device-0004"),
        ],
    );
    assert_eq!(e.client("good").get("/firmware/manifest.json").unwrap().status, 200);
    // In the handshake: refused.
    assert!(e.client("three").get("/firmware/manifest.json").is_err());
    // After it: the handshake completes and the request is not answered.
    let r = e.client("four").get("/firmware/manifest.json");
    assert!(
        r.as_ref().is_err_and(|e| e.contains("read")),
        "{:?}",
        r.map(|r| r.status)
    );
    e.expect_refused("ConnectionRuleError", 2.0);
    e.edge.wait_connection_log("ConnectionRuleError", "rule bad-name:");
    e.edge.wait_connection_log("ConnectionRuleError", "rule bad-address:");
}

#[test]
fn shadow_rules_change_nothing_and_evaluation_errors_deny() {
    let rules = r#"rules:
  - { name: would-block-all, phase: request, mode: shadow, deny: {} }
  - { name: bad-count, phase: request, when: 'int(request.headers["x-count"]) > 3', deny: {} }
"#;
    let (_rules_dir, e) = edge_with_rule_file(rules);
    assert_eq!(
        e.client("good").header("x-count", "1").get("/echo").unwrap().status,
        200
    );
    assert_eq!(
        e.client("good").header("x-count", "9").get("/echo").unwrap().status,
        403
    );
    let r = e.client("good").header("x-count", "many").get("/echo").unwrap();
    assert_eq!(r.status, 500, "an evaluation error must deny");
    let m = |rule: &str, outcome: &str| {
        metric(
            e.admin_port,
            &format!("mtls_edge_rule_evaluations_total{{outcome=\"{outcome}\",phase=\"request\",rule=\"{rule}\"}}"),
        )
    };
    assert_eq!(m("would-block-all", "would_match"), 3.0);
    assert_eq!(m("bad-count", "matched"), 1.0);
    assert_eq!(m("bad-count", "error"), 1.0);
    e.edge.wait_event("rule=bad-count phase=request evaluation error");
}

#[test]
fn a_bad_rule_stops_the_start_up_and_the_check_with_file_and_line() {
    let dir_holder = tempfile::tempdir().unwrap();
    let d = dir_holder.path();
    let fleet = Ca::root("Fleet Device CA").unwrap();
    pki::write_file(&d.join("devices-ca.pem"), &fleet.cert_pem, false).unwrap();
    std::fs::create_dir(d.join("rules")).unwrap();
    std::fs::write(
        d.join("rules/bad.yaml"),
        "rules:\n  - name: typo\n    phase: request\n    when: client.cert.subject.nc == \"x\"\n    deny: {}\n",
    )
    .unwrap();
    let conf = config_only(d, "rules: { dir: rules }");
    for args in [vec!["-t", "-c"], vec!["-c"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtls-edge"))
            .args(&args)
            .arg(&conf)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: started with a bad rule");
        assert!(
            text.contains("bad.yaml:2") && text.contains("when (line 4)"),
            "{args:?}: {text}"
        );
        assert!(
            text.contains("unknown variable or field 'client.cert.subject.nc'"),
            "{text}"
        );
    }
}

/// Writes an edge config (not started) with `rules_yaml`, and returns its path.
fn config_only(d: &Path, rules_yaml: &str) -> PathBuf {
    ServerPki::write(d);
    let yaml = format!(
        "{}listeners:\n{}trust_stores:\n  devices: {{ ca_files: [devices-ca.pem] }}\norigins:\n{}routes:\n  - {{ path_prefix: /, origin: main }}\n{rules_yaml}\n",
        server_yaml(d, 1),
        listener_yaml(free_port(), "required", "devices"),
        origin_yaml("main", free_port()),
    );
    let path = d.join("edge.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn explain(conf: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtls-edge"))
        .args(["-c", conf.to_str().unwrap(), "rules", "explain"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

#[test]
fn rules_explain_says_which_rules_matched_and_what_the_edge_would_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = Ca::root("Fleet Device CA").unwrap();
    pki::write_file(&d.join("devices-ca.pem"), &fleet.cert_pem, false).unwrap();
    save(d, "x1", &device(&fleet, "device-0001", None, Some("x1")));
    save(d, "sensor", &device(&fleet, "sensor-0001", None, Some("x1")));
    save(
        d,
        "stranger",
        &device(&Ca::root("Fleet Device CA").unwrap(), "device-0002", None, Some("x1")),
    );
    let conf = config_only(d, &rules_dir("firmware-fleet"));
    let cert = |stem: &str| d.join(format!("{stem}.pem")).display().to_string();

    let text = explain(&conf, &["--cert", &cert("x1"), "--path", "/firmware/images/x2/fw.bin"]);
    assert!(text.contains("verified against the trust store"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("MATCH") && l.contains("own-model-images-only") && l.contains("fleet.yaml:")),
        "{text}"
    );
    assert!(
        text.contains("answer 403") && text.contains("result: denied by a rule"),
        "{text}"
    );

    let text = explain(
        &conf,
        &[
            "--cert",
            &cert("x1"),
            "--path",
            "/firmware/images/x1/fw.bin",
            "--host",
            "FW.Example.COM:8443",
        ],
    );
    assert!(text.contains("result: forward to origin main (route /)"), "{text}");
    assert!(
        text.contains("(GET fw.example.com/firmware/images/x1/fw.bin)"),
        "the host as the edge sees it: {text}"
    );

    let text = explain(&conf, &["--cert", &cert("sensor")]);
    assert!(
        text.contains("refuse the handshake (reason ConnectionRuleDenied, rule devices-only)"),
        "{text}"
    );
    assert!(!text.contains("request phase"), "{text}");

    // Same names, another key: not verified, whatever the rules say.
    let text = explain(&conf, &["--cert", &cert("stranger")]);
    assert!(
        text.contains("NOT verified") && text.contains("the certificate does not verify"),
        "{text}"
    );

    // Connection rules that read the client's address are explained as run after the handshake.
    let after = tempfile::tempdir().unwrap();
    std::fs::write(
        after.path().join("r.yaml"),
        "rules:\n  - { name: loopback-only, phase: connection, when: 'connection.client_ip != \"127.0.0.1\"', deny: {} }\n",
    )
    .unwrap();
    let conf = config_only(d, &format!("rules: {{ dir: {} }}", after.path().display()));
    let text = explain(&conf, &["--cert", &cert("x1"), "--client-ip", "192.0.2.9"]);
    assert!(
        text.contains("connection phase, after the handshake (client ip 192.0.2.9):"),
        "{text}"
    );
    assert!(
        text.contains("close the connection unanswered (reason ConnectionRuleDenied, rule loopback-only)"),
        "{text}"
    );
    assert!(!text.contains("request phase"), "{text}");
    let text = explain(&conf, &["--cert", &cert("x1"), "--client-ip", "127.0.0.1"]);
    assert!(text.contains("result: forward to origin main"), "{text}");
}

#[test]
fn headers_a_rule_sets_toward_the_origin_key_the_cache() {
    let rules_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        rules_dir.path().join("r.yaml"),
        "rules:\n  - { name: model, phase: request, set_headers: { X-Model: client.cert.subject.ou } }\n",
    )
    .unwrap();
    let e = edge(
        &format!("rules: {{ dir: {} }}", rules_dir.path().display()),
        false,
        |d, fleet, _| {
            save(d, "a1", &device(fleet, "device-a", None, Some("x1")));
            save(d, "b2", &device(fleet, "device-b", None, Some("x2")));
            save(d, "c1", &device(fleet, "device-c", None, Some("x1")));
        },
    );
    let get = |stem: &str| e.client(stem).get("/firmware/manifest.json").unwrap();
    assert_eq!(get("a1").header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
    // Another model gets its own copy: the origin saw another X-Model.
    let b = get("b2");
    assert_eq!(b.header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
    assert!(b.body.contains("CN=device-b"), "{}", b.body);
    // The same model shares the first copy.
    assert_eq!(get("c1").header("cache-status"), Some("mtls-edge; hit"));
}

/// Authorization runs before any lookup, on a hit too: with request rules in force no hit is
/// served directly (`hit`), and a device the rules refuse never gets the cached object another
/// device filled, on a closing or a keep-alive connection, or over HTTP/2.
#[test]
fn request_rules_decide_before_a_cached_object_is_served() {
    let rules = "rules:\n  - { name: not-b, phase: request, when: 'client.cert.subject.cn == \"device-b\"', deny: {} }\n";
    let (_rules_dir, e) = edge_with_rules_and_devices(rules, &[("a", "device-a"), ("b", "device-b")]);
    let path = "/firmware/image.bin?size=2000";
    assert_eq!(e.client("a").get(path).unwrap().header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
    let hit = e.client("a").get(path).unwrap();
    assert_eq!((hit.status, hit.header("cache-status")), (200, Some("mtls-edge; hit")));
    let denied = e.client("b").get(path).unwrap();
    assert_eq!((denied.status, denied.header("cache-status")), (403, None));
    let mut conn = e.client("b").keep_alive().unwrap();
    assert_eq!(conn.get(path).unwrap().status, 403);
    assert_eq!(e.client("b").h2().unwrap().get(path).unwrap().status, 403);
    assert_eq!(e.client("a").h2().unwrap().get(path).unwrap().status, 200);
    assert_eq!(metric(e.admin_port, "mtls_edge_cache_direct_hits_total"), 0.0);
}
