//! Reloads over real sockets: each kind of change (a CRL that newly revokes a device, a list
//! entry, a CA swapped out, a server and an origin client certificate rotated, a rule, a broken
//! file), by the file watch, SIGHUP and `POST /reload`, and what a swap means for connections
//! that are already open (HTTP/1.1 keep-alive and HTTP/2) and for a download in progress.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use mtls_edge::pki::{self, Ca, Issued, LeafSpec};

/// Replaces a file the way editors and config tools do: a new file renamed over the old one.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Fleet {
    dir: tempfile::TempDir,
    pki: ServerPki,
    device_ca: Ca,
    alice: Issued,
    _origin: Proc,
    edge: Proc,
    admin_port: u16,
}

/// An edge on a device CA with a CRL, devices `alice` and `bob`, reload watching every 100 ms
/// (or not), and `extra` YAML.
fn fleet(watch: bool, extra: &str) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = ServerPki::write(d);
    let device_ca = device_ca(d);
    let alice = device_ca.issue(&LeafSpec::client("alice")).unwrap();
    save(d, "alice", &alice);
    save(d, "bob", &device_ca.issue(&LeafSpec::client("bob")).unwrap());
    pki::write_file(&d.join("device-crl.pem"), &device_ca.crl(&[]).unwrap(), false).unwrap();
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        "{server}listeners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem], crl_files: [device-crl.pem] }}\norigins:\n{origin}routes:\n  - {{ path_prefix: /, origin: main }}\nadmin: {{ address: 127.0.0.1:{admin_port} }}\nreload: {{ watch: {watch}, watch_interval_ms: 100 }}\n{extra}",
        server = server_yaml(d, 2),
        listener = listener_yaml(port, "required", "devices"),
        origin = origin_yaml("main", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    Fleet {
        dir,
        pki,
        device_ca,
        alice,
        _origin: origin,
        edge,
        admin_port,
    }
}

impl Fleet {
    fn client(&self, stem: &str) -> Client<'_> {
        Client::new(self.dir.path(), self.edge.port).cert(stem)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn revoke_alice(&self) {
        let crl = self.device_ca.crl(&[&self.alice.serial]).unwrap();
        replace(&self.path("device-crl.pem"), &crl);
    }

    fn metric(&self, name_and_labels: &str) -> f64 {
        metric(self.admin_port, name_and_labels)
    }

    fn closed(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "mtls_edge_connections_closed_total{{listener=\"127.0.0.1:{}\",reason=\"{reason}\"}}",
            self.edge.port
        ))
    }

    fn reloads(&self, trigger: &str, result: &str) -> f64 {
        self.metric(&format!(
            "mtls_edge_reloads_total{{result=\"{result}\",trigger=\"{trigger}\"}}"
        ))
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &self.edge.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig}");
    }
}

/// Calls `request` every 50 ms until it fails, at most `within`: how long that took.
fn until_refused<T: std::fmt::Debug>(within: Duration, mut request: impl FnMut() -> Result<T, String>) -> Duration {
    let started = Instant::now();
    loop {
        match request() {
            Err(_) => return started.elapsed(),
            Ok(r) if started.elapsed() > within => panic!("still answered after {within:?}: {r:?}"),
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_crl_that_newly_revokes_a_device_closes_its_open_connections_and_refuses_new_ones() {
    let f = fleet(true, "");
    let mut h1 = f.client("alice").keep_alive().unwrap();
    let mut h2 = f.client("alice").h2().unwrap();
    let mut bob = f.client("bob").keep_alive().unwrap();
    for _ in 0..2 {
        assert_eq!(h1.get("/echo").unwrap().status, 200);
        assert_eq!(h2.get("/echo").unwrap().status, 200);
        assert_eq!(bob.get("/echo").unwrap().status, 200);
    }
    // A download in progress when the CRL arrives: the origin sends half, then waits.
    let size = 2_000_000;
    let (mut download, mut got) = f
        .client("alice")
        .first_bytes(&format!("/gated/fw.bin?size={size}"), 1)
        .unwrap();

    f.revoke_alice();
    let took = until_refused(Duration::from_secs(5), || h1.get("/echo"));
    // Within the 1 s goal on a quiet machine; the bound here leaves room for a loaded one.
    assert!(
        took < Duration::from_secs(3),
        "the keep-alive connection was refused after {took:?}"
    );
    assert!(h2.get("/echo").is_err(), "the HTTP/2 connection still answers");
    assert!(h2.get("/echo").is_err(), "a refused HTTP/2 connection stays refused");
    assert!(f.client("alice").get("/echo").is_err(), "a new handshake was accepted");
    // Another device's open connection is not touched.
    assert_eq!(bob.get("/echo").unwrap().status, 200);
    assert_eq!(f.closed("ClientCertRevoked"), 2.0);
    let line = f.edge.wait_log("closing alice's connection", |l| {
        l["log"] == "connection" && l["event"] == "closed" && l["reason"] == "ClientCertRevoked"
    });
    assert_eq!(line["cert_subject"], "CN=alice", "{line}");
    assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
    let revoked = format!(
        "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{}\",outcome=\"refused\",reason=\"ClientCertRevoked\"}}",
        f.edge.port
    );
    assert_eq!(wait_metric(f.admin_port, &revoked, 1.0), 1.0);
    assert_eq!(f.reloads("watch", "ok"), 1.0);

    // The download started under the old state completes, byte for byte.
    assert_eq!(
        f.client("bob").get("/__origin/release?name=fw.bin").unwrap().status,
        200
    );
    let mut buf = [0u8; 65536];
    while got < size {
        let n = download.read(&mut buf).unwrap();
        assert!(n > 0, "the download was cut at {got} of {size} bytes");
        got += n;
    }
    assert_eq!(got, size);
    // Its connection's next request is refused.
    use std::io::Write;
    write!(download, "GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = download.read_to_end(&mut rest);
    assert!(rest.is_empty(), "answered: {}", String::from_utf8_lossy(&rest));
}

#[test]
fn without_the_watch_sighup_and_post_reload_apply_a_change() {
    let f = fleet(false, "");
    let mut h1 = f.client("alice").keep_alive().unwrap();
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    f.revoke_alice();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(h1.get("/echo").unwrap().status, 200, "reloaded with the watch off");
    f.signal("HUP");
    let took = until_refused(Duration::from_secs(5), || h1.get("/echo"));
    assert!(took < Duration::from_secs(3), "refused {took:?} after SIGHUP");
    assert_eq!(f.reloads("signal", "ok"), 1.0);
    f.edge.wait_event("reload (signal): generation 2 in force");

    // POST /reload: a new CRL that revokes nothing lets alice in again.
    replace(&f.path("device-crl.pem"), &f.device_ca.crl(&[]).unwrap());
    let (status, body) = admin(f.admin_port, "POST", "/reload");
    assert_eq!((status, body.as_str()), (200, "{\"generation\":3}\n"));
    assert_eq!(f.client("alice").get("/echo").unwrap().status, 200);
    assert_eq!(admin(f.admin_port, "GET", "/reload").0, 405);
    assert_eq!(f.metric("mtls_edge_config_generation"), 3.0);
}

#[test]
fn a_broken_file_keeps_the_running_state_and_is_counted_and_logged() {
    let f = fleet(true, "");
    let mut h1 = f.client("alice").keep_alive().unwrap();
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    let crl = f.path("device-crl.pem");
    replace(&crl, "-----BEGIN X509 CRL-----\nbroken\n-----END X509 CRL-----\n");
    let line = f.edge.wait_log("refusing the broken CRL", |l| {
        l["log"] == "event"
            && l["level"] == "error"
            && l["msg"].as_str().is_some_and(|m| m.contains("reload (watch) refused"))
    });
    let msg = line["msg"].as_str().unwrap();
    assert!(
        msg.contains("key=trust_stores.devices.crl_files[0]") && msg.contains("device-crl.pem"),
        "{msg}"
    );
    assert_eq!(f.reloads("watch", "error"), 1.0);
    // The running state serves, on the open connection and on new ones.
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    assert_eq!(f.client("bob").get("/echo").unwrap().status, 200);
    // POST /reload names the error.
    let (status, body) = admin(f.admin_port, "POST", "/reload");
    assert_eq!(status, 422, "{body}");
    let errors: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        errors["errors"][0]["key"], "trust_stores.devices.crl_files[0]",
        "{body}"
    );
    assert_eq!(f.metric("mtls_edge_config_generation"), 1.0);

    // A config that does not parse is refused the same way.
    let conf = f.path(&format!("edge-{}.yaml", f.edge.port));
    let good = std::fs::read_to_string(&conf).unwrap();
    replace(&conf, &format!("{good}\nnot_a_key: 1\n"));
    f.edge.wait_log("refusing the bad config", |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.contains("reload (watch) refused") && m.contains("not_a_key"))
    });
    assert_eq!(f.client("bob").get("/echo").unwrap().status, 200);

    // Fixed, the files load again; a changed listener address is not applied, and says so.
    replace(&crl, &f.device_ca.crl(&[]).unwrap());
    let moved = good.replace(&format!("127.0.0.1:{}", f.edge.port), "127.0.0.1:1");
    replace(&conf, &moved);
    f.edge
        .wait_event("listeners[].address and http2 changed: that takes a restart");
    f.edge.wait_event("reload (watch): generation 2 in force");
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    assert_eq!(f.client("alice").get("/echo").unwrap().status, 200);
}

#[test]
fn a_new_list_entry_refuses_the_device_on_its_open_connection() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("deny.yaml"),
        "rules:\n  - { name: denylist, phase: connection, when: 'lists.denied.contains(client.cert.serial)', deny: {} }\n",
    )
    .unwrap();
    let list = rules.path().join("denied.txt");
    std::fs::write(&list, "# nobody yet\n").unwrap();
    let f = fleet(
        true,
        &format!(
            "rules: {{ dir: {}, lists: {{ denied: {{ file: {}, kind: serial }} }} }}\n",
            rules.path().display(),
            list.display()
        ),
    );
    let mut h1 = f.client("alice").keep_alive().unwrap();
    let mut h2 = f.client("alice").h2().unwrap();
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    assert_eq!(h2.get("/echo").unwrap().status, 200);
    assert_eq!(
        f.metric("mtls_edge_list_entries{list=\"denied\"}"),
        0.0,
        "{}",
        f.edge.log_text()
    );
    let serial: String = f.alice.serial.iter().map(|b| format!("{b:02X}:")).collect();
    // Appended in place, as a denylist tool would.
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(&list).unwrap();
    writeln!(file, "{}", serial.trim_end_matches(':')).unwrap();
    drop(file);
    until_refused(Duration::from_secs(5), || h1.get("/echo"));
    assert!(h2.get("/echo").is_err());
    assert!(f.client("alice").get("/echo").is_err());
    assert_eq!(f.client("bob").get("/echo").unwrap().status, 200);
    assert_eq!(f.closed("ConnectionRuleDenied"), 2.0);
    assert_eq!(f.metric("mtls_edge_list_entries{list=\"denied\"}"), 1.0);
    f.edge
        .wait_connection_log("ConnectionRuleDenied", "rule denylist, at a request after a reload");
}

#[test]
fn a_ca_swapped_out_of_the_trust_store_refuses_its_devices() {
    let f = fleet(true, "");
    let d = f.dir.path();
    let mut h1 = f.client("alice").keep_alive().unwrap();
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    let new_ca = Ca::root("New Device CA").unwrap();
    save(d, "carol", &new_ca.issue(&LeafSpec::client("carol")).unwrap());
    assert!(f.client("carol").get("/echo").is_err(), "carol's CA is not trusted yet");
    // The CRL first (its CA must be in the store), then the CA.
    replace(&f.path("device-crl.pem"), &new_ca.crl(&[]).unwrap());
    replace(&f.path("device-ca.pem"), &new_ca.cert_pem);
    until_refused(Duration::from_secs(5), || h1.get("/echo"));
    assert_eq!(f.closed("ClientCertUntrusted"), 1.0);
    assert!(
        f.client("bob").get("/echo").is_err(),
        "a device of the old CA was accepted"
    );
    assert_eq!(f.client("carol").get("/echo").unwrap().status, 200);
}

#[test]
fn a_rule_change_applies_to_the_next_request() {
    let rules = tempfile::tempdir().unwrap();
    let file = rules.path().join("r.yaml");
    std::fs::write(&file, "rules:\n  - { name: open, phase: request, allow: true }\n").unwrap();
    let f = fleet(true, &format!("rules: {{ dir: {} }}\n", rules.path().display()));
    let mut h1 = f.client("alice").keep_alive().unwrap();
    assert_eq!(h1.get("/echo").unwrap().status, 200);
    // Written in place.
    std::fs::write(
        &file,
        "rules:\n  - { name: no-echo, phase: request, when: 'request.path == \"/echo\"', deny: { status: 451, body: \"gone\\n\" } }\n",
    )
    .unwrap();
    let started = Instant::now();
    loop {
        let r = h1.get("/echo").unwrap();
        if r.status == 451 {
            assert_eq!(r.body, "gone\n");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the rule did not change");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection itself is fine: request rules answer, they do not close.
    assert_eq!(h1.get("/other").unwrap().status, 200);
    // A new rule file in the directory is picked up too.
    std::fs::write(
        rules.path().join("s.yaml"),
        "rules:\n  - { name: no-other, phase: request, when: 'request.path == \"/other\"', deny: { status: 404 } }\n",
    )
    .unwrap();
    let started = Instant::now();
    while h1.get("/other").unwrap().status != 404 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new rule file was not loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `..vN/NAME.{pem,key}` and points the `..data` symlink at it, the way Kubernetes updates
/// a mounted secret: `certs/NAME.pem` is a symlink to `..data/NAME.pem`.
fn kubernetes_update(certs: &Path, version: u32, name: &str, issued: &Issued) {
    let v = certs.join(format!("..v{version}"));
    std::fs::create_dir_all(&v).unwrap();
    issued.write(&v, name).unwrap();
    let tmp = certs.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, certs.join("..data")).unwrap();
    for ext in ["pem", "key"] {
        let link = certs.join(format!("{name}.{ext}"));
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}.{ext}"), &link).unwrap();
        }
    }
}

fn serial_seen(c: &Client) -> Vec<u8> {
    let tls = c.connect().unwrap();
    let cert = tls.ssl().peer_certificate().unwrap();
    cert.serial_number().to_bn().unwrap().to_vec()
}

#[test]
fn a_rotated_server_certificate_is_presented_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = ServerPki::write(d);
    let device_ca = device_ca(d);
    save(d, "alice", &device_ca.issue(&LeafSpec::client("alice")).unwrap());
    let certs = d.join("certs");
    let first = pki.edge_ca.issue(&LeafSpec::server("edge", &["localhost"])).unwrap();
    kubernetes_update(&certs, 1, "server", &first);
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        "{server}listeners:\n  - address: 127.0.0.1:{port}\n    server_cert: certs/server.pem\n    server_key: certs/server.key\n    mtls: {{ mode: required, trust_store: devices }}\ntrust_stores:\n  devices: {{ ca_files: [device-ca.pem] }}\norigins:\n{origin}routes:\n  - {{ path_prefix: /, origin: main }}\nadmin: {{ address: 127.0.0.1:{admin_port} }}\nreload: {{ watch_interval_ms: 100 }}\n",
        server = server_yaml(d, 2),
        origin = origin_yaml("main", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    let c = Client::new(d, port).cert("alice");
    assert_eq!(serial_seen(&c), first.serial);
    let mut open = c.keep_alive().unwrap();
    assert_eq!(open.get("/echo").unwrap().status, 200);
    let expiry = |name: &str| {
        metric(
            admin_port,
            &format!("mtls_edge_certificate_expiry_timestamp_seconds{{kind=\"server\",name=\"{name}\"}}"),
        )
    };
    let before = expiry(&format!("127.0.0.1:{port}"));
    let mut spec = LeafSpec::server("edge", &["localhost"]);
    spec.not_after = time::Duration::days(30);
    let second = pki.edge_ca.issue(&spec).unwrap();
    kubernetes_update(&certs, 2, "server", &second);
    let started = Instant::now();
    while serial_seen(&c) != second.serial {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new certificate is not presented"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection made before the rotation goes on; its certificate does not change under it.
    assert_eq!(open.get("/echo").unwrap().status, 200);
    let after = expiry(&format!("127.0.0.1:{port}"));
    assert!(after > 0.0 && after < before, "expiry {before} → {after}");
    drop(edge);
}

fn sha256_hex(pem_file: &Path) -> String {
    let pem = std::fs::read(pem_file).unwrap();
    let cert = boring::x509::X509::from_pem(&pem).unwrap();
    let d = cert.digest(boring::hash::MessageDigest::sha256()).unwrap();
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_rotated_origin_client_certificate_is_presented_to_the_origin_and_old_connections_retire() {
    let f = fleet(true, "");
    let d = f.dir.path();
    let seen = || {
        let r = f.client("alice").get("/echo").unwrap();
        (
            r.header("x-origin-client-cert-sha256").unwrap_or_default().to_string(),
            r.header("x-origin-peer-port").unwrap_or_default().to_string(),
        )
    };
    let old = sha256_hex(&d.join("edge-client.pem"));
    let (cert, port) = seen();
    assert_eq!(cert, old);
    assert_eq!(seen(), (old.clone(), port.clone()), "the origin connection is pooled");
    // A new client certificate from the CA the origin trusts, written over the old one.
    f.pki
        .edge_ca
        .issue(&LeafSpec::client("mtls-edge-rotated"))
        .unwrap()
        .write(d, "edge-client")
        .unwrap();
    let new = sha256_hex(&d.join("edge-client.pem"));
    assert_ne!(new, old);
    let started = Instant::now();
    loop {
        let (cert, new_port) = seen();
        if cert == new {
            assert_ne!(new_port, port, "a connection made with the old certificate was reused");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the origin still sees the old certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(f.metric("mtls_edge_certificate_expiry_timestamp_seconds{kind=\"origin_client\",name=\"main\"}") > 0.0);

    // The origin's CA bundle changes (pingora's own pool key leaves it out): connections
    // verified under the old bundle are not reused either.
    let (_, port) = seen();
    assert_eq!(seen().1, port, "the origin connection is pooled");
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(d.join("origin-ca.pem")).unwrap(),
        Ca::root("Another Origin CA").unwrap().cert_pem
    );
    replace(&d.join("origin-ca.pem"), &bundle);
    let started = Instant::now();
    while seen().1 == port {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a connection verified under the old CA bundle was reused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn identity_header_names_routes_and_origin_addresses_change_with_the_config() {
    let f = fleet(true, "identity_headers: { subject: X-Before }\n");
    let second = spawn_origin(f.dir.path(), "origin-server", "edge-ca.pem");
    let mut h1 = f.client("alice").keep_alive().unwrap();
    assert_eq!(h1.get("/other").unwrap().status, 200);
    let r = h1.get("/echo").unwrap();
    assert_eq!(r.echoed("x-before").as_deref(), Some("CN=alice"), "{}", r.body);
    let first_port = r.header("x-origin-port").unwrap().to_string();
    let conf = f.path(&format!("edge-{}.yaml", f.edge.port));
    let text = std::fs::read_to_string(&conf).unwrap();
    let changed = text
        .replace("X-Before", "X-After")
        .replace(
            &format!("127.0.0.1:{first_port}"),
            &format!("127.0.0.1:{}", second.port),
        )
        .replace(
            "- { path_prefix: /, origin: main }",
            "- { path_prefix: /echo, origin: main }",
        );
    assert_ne!(changed, text);
    replace(&conf, &changed);
    let started = Instant::now();
    let r = loop {
        let r = h1.get("/echo").unwrap();
        if r.echoed("x-after").is_some() {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new header name is not used: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Same open connection, new state: the new name (the old one is gone), the new address.
    assert_eq!(r.echoed("x-after").as_deref(), Some("CN=alice"));
    assert!(r.echoed("x-before").is_none(), "{}", r.body);
    assert_eq!(r.header("x-origin-port"), Some(second.port.to_string().as_str()));
    // The routes changed: only /echo is routed now.
    assert_eq!(h1.get("/other").unwrap().status, 404);
}

/// Writes the files of a projected volume's version `n` into `..vN/` under `volume` and swaps
/// the `..data` symlink to it, as the kubelet does; each top-level entry (a file, or a folder
/// such as `pki`) is a symlink through `..data`.
fn kubelet_swap(volume: &Path, n: u32, files: &[(&str, &str)]) {
    let version = volume.join(format!("..v{n}"));
    for (path, text) in files {
        pki::write_file(&version.join(path), text, false).unwrap();
    }
    let tmp = volume.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap();
    for (path, _) in files {
        let top = path.split('/').next().unwrap();
        if std::fs::symlink_metadata(volume.join(top)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{top}"), volume.join(top)).unwrap();
        }
    }
    if n > 1 {
        std::fs::remove_dir_all(volume.join(format!("..v{}", n - 1))).unwrap(); // the kubelet removes the old version
    }
}

#[test]
fn a_kubernetes_config_volume_swap_reloads_the_config_and_the_crl_under_it() {
    // The layout of deploy/kubernetes: conf/ a projected volume (edge.yaml, and pki/ as a folder
    // symlink), the certificates and keys in secrets/ beside it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secrets = d.join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    ServerPki::write(&secrets);
    let ca = device_ca(d);
    save(d, "alice", &ca.issue(&LeafSpec::client("alice")).unwrap());
    let alice_serial = {
        let pem = std::fs::read_to_string(d.join("alice.pem")).unwrap();
        boring::x509::X509::from_pem(pem.as_bytes()).unwrap().serial_number().to_bn().unwrap().to_vec()
    };
    save(d, "bob", &ca.issue(&LeafSpec::client("bob")).unwrap());
    std::fs::copy(secrets.join("edge-ca.pem"), d.join("edge-ca.pem")).unwrap();
    let origin = spawn_origin(&secrets, "origin-server", "edge-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        "{server}listeners:\n  - address: 127.0.0.1:{port}\n    server_cert: ../secrets/edge-server.pem\n    server_key: ../secrets/edge-server.key\n    mtls: {{ mode: required, trust_store: devices }}\ntrust_stores:\n  devices: {{ ca_files: [pki/device-ca.pem], crl_files: [pki/device-crl.pem] }}\norigins:\n  main:\n    address: 127.0.0.1:{}\n    sni: origin.internal\n    ca_file: ../secrets/origin-ca.pem\n    client_cert: ../secrets/edge-client.pem\n    client_key: ../secrets/edge-client.key\nroutes:\n  - {{ path_prefix: /, origin: main }}\nadmin: {{ address: 127.0.0.1:{admin_port} }}\nreload: {{ watch_interval_ms: 100 }}\n",
        origin.port,
        server = server_yaml(d, 1),
    );
    let conf = d.join("conf");
    let ca_pem = std::fs::read_to_string(d.join("device-ca.pem")).unwrap();
    let clean = ca.crl(&[]).unwrap();
    kubelet_swap(&conf, 1, &[("edge.yaml", &yaml), ("pki/device-ca.pem", &ca_pem), ("pki/device-crl.pem", &clean)]);
    let config = conf.join("edge.yaml");
    let _edge = spawn(&["-c", config.to_str().unwrap()], port, d.join("edge.log"));
    let alice = Client::new(d, port).cert("alice");
    assert_eq!(alice.get("/echo").unwrap().status, 200);

    // A new version of the volume revokes alice: the swap (and the old version's removal) is
    // seen through the folder symlink, and the edge keeps reading the live files after it.
    let revoked = ca.crl(&[&alice_serial]).unwrap();
    kubelet_swap(&conf, 2, &[("edge.yaml", &yaml), ("pki/device-ca.pem", &ca_pem), ("pki/device-crl.pem", &revoked)]);
    until_refused(Duration::from_secs(5), || alice.get("/echo"));
    assert_eq!(Client::new(d, port).cert("bob").get("/echo").unwrap().status, 200);
    // A third version, clean again: alice is back, so the watch followed the second swap too.
    kubelet_swap(&conf, 3, &[("edge.yaml", &yaml), ("pki/device-ca.pem", &ca_pem), ("pki/device-crl.pem", &clean)]);
    let started = Instant::now();
    while alice.get("/echo").is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "alice is still refused after the third version");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(admin_port, "mtls_edge_reloads_total{result=\"error\",trigger=\"watch\"}"), 0.0);
}

