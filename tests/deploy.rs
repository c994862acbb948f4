//! The deployment assets in `deploy/`: the Kubernetes manifests validate against the Kubernetes
//! schemas (kubernetes-validate, strict) and agree with each other and with the edge's config,
//! which passes `mtls-edge -t` when laid out the way the Deployment's volumes lay it out; the
//! Prometheus alerts pass `promtool check rules` and their `promtool test rules` cases; the
//! Grafana dashboard queries only metrics the edge exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mtls_edge::pki::{self, Ca, LeafSpec};
use serde::Deserialize;
use serde_yaml::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const KUBERNETES: &str = "deploy/kubernetes";

/// Every document of every manifest the kustomization lists, with its file.
fn manifests() -> Vec<(String, Value)> {
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo(&format!("{KUBERNETES}/kustomization.yaml"))).unwrap())
            .unwrap();
    let mut docs = Vec::new();
    for file in kustomization["resources"].as_sequence().unwrap() {
        let file = file.as_str().unwrap();
        let text = std::fs::read_to_string(repo(&format!("{KUBERNETES}/{file}")))
            .unwrap_or_else(|e| panic!("kustomization.yaml lists {file}: {e}"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push((file.to_string(), Value::deserialize(doc).unwrap()));
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|(_, d)| d["kind"] == kind).map(|(_, d)| d).collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let validator = tool("kubernetes-validate", "target/tools/venv/bin/kubernetes-validate");
    let docs = manifests();
    let files: BTreeSet<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
    let out = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.31.0"])
        .args(files.iter().map(|f| repo(&format!("{KUBERNETES}/{f}"))))
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    // Each built-in kind passed against its schema; the custom resources (Prometheus Operator,
    // cert-manager) have none bundled and are checked below against what they refer to.
    for kind in ["namespace", "deployment", "service", "poddisruptionbudget"] {
        assert!(report.contains(&format!("passed for resource {kind}/mtls-edge")), "{kind}: {report}");
    }
    let unchecked: BTreeSet<&str> = report
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(unchecked, BTreeSet::from(["Certificate", "PodMonitor"]), "{report}");

    // A broken manifest fails: the check can fail.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("deployment.yaml");
    let text = std::fs::read_to_string(repo(&format!("{KUBERNETES}/deployment.yaml"))).unwrap();
    std::fs::write(&bad, text.replace("readOnlyRootFilesystem", "readOnlyRootFilesytem")).unwrap();
    let out = Command::new(&validator).args(["--strict", "-k", "1.31.0"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
}

/// The pod spec of the Deployment, and its edge container.
fn pod(docs: &[(String, Value)]) -> (Value, Value) {
    let deployments = of_kind(docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let spec = deployments[0]["spec"]["template"]["spec"].clone();
    let container = spec["containers"][0].clone();
    (spec, container)
}

#[test]
fn the_deployment_is_non_root_read_only_and_agrees_with_its_services() {
    let docs = manifests();
    let (spec, c) = pod(&docs);
    assert_eq!(spec["securityContext"]["runAsUser"], 10001, "the image's user");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string());
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let point = str_of(&m["mountPath"]);
        if point.starts_with("/etc/mtls-edge") {
            assert_eq!(m["readOnly"], true, "{point}");
        }
    }
    let ports: BTreeMap<&str, i64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (str_of(&p["name"]), p["containerPort"].as_i64().unwrap()))
        .collect();
    // The edge's config listens where the container says it does.
    let edge: Value = serde_yaml::from_str(&std::fs::read_to_string(repo(&format!("{KUBERNETES}/edge.yaml"))).unwrap())
        .unwrap();
    assert_eq!(str_of(&edge["listeners"][0]["address"]), format!("0.0.0.0:{}", ports["https"]));
    assert_eq!(str_of(&edge["admin"]["address"]), format!("0.0.0.0:{}", ports["admin"]));
    // The Service, the budget and the monitor select these pods and name their ports.
    let labels = &docs.iter().find(|(_, d)| d["kind"] == "Deployment").unwrap().1["spec"]["template"]["metadata"]["labels"];
    let service = of_kind(&docs, "Service")[0];
    assert_eq!(&service["spec"]["selector"], labels);
    assert!(ports.contains_key(str_of(&service["spec"]["ports"][0]["targetPort"])));
    assert_eq!(&of_kind(&docs, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"], labels);
    let monitor = of_kind(&docs, "PodMonitor")[0];
    assert_eq!(&monitor["spec"]["selector"]["matchLabels"], labels);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert!(ports.contains_key(str_of(&endpoint["port"])));
    // cert-manager writes the Secrets the pod mounts, with the usages the edge checks at load.
    let secrets: BTreeSet<String> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|v| v["projected"]["sources"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|s| s["secret"]["name"].as_str().map(str::to_string))
        .collect();
    for cert in of_kind(&docs, "Certificate") {
        let secret = str_of(&cert["spec"]["secretName"]);
        assert!(secrets.contains(secret), "{secret} is not mounted");
        let usages: Vec<&str> = cert["spec"]["usages"].as_sequence().unwrap().iter().map(str_of).collect();
        let usage = if secret.contains("client") { "client auth" } else { "server auth" };
        assert!(usages.contains(&usage), "{secret}: {usages:?}");
        assert_eq!(cert["spec"]["privateKey"]["rotationPolicy"], "Always");
    }
}

#[test]
fn the_kubernetes_config_passes_the_check_as_the_volumes_lay_it_out() {
    let docs = manifests();
    let (spec, c) = pod(&docs);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // What each ConfigMap and Secret key holds: the repository's files, and a PKI made here
    // (cert-manager's Secrets hold tls.crt with the chain, and tls.key).
    let devices = Ca::root("Device CA").unwrap();
    let edge_ca = Ca::root("Edge CA").unwrap();
    let origin_ca = Ca::root("Origin CA").unwrap();
    let server = edge_ca.issue(&LeafSpec::server("edge.example.com", &["edge.example.com"])).unwrap();
    let client = edge_ca.issue(&LeafSpec::client("mtls-edge")).unwrap();
    let read = |p: &str| std::fs::read_to_string(repo(p)).unwrap();
    let mut keys: BTreeMap<(String, String), String> = [
        (("mtls-edge-conf", "edge.yaml"), read(&format!("{KUBERNETES}/edge.yaml"))),
        (("mtls-edge-pki", "device-ca.pem"), devices.cert_pem.clone()),
        (("mtls-edge-pki", "device-crl.pem"), devices.crl(&[]).unwrap()),
        (("mtls-edge-pki", "origin-ca.pem"), origin_ca.cert_pem.clone()),
        (("mtls-edge-server", "tls.crt"), server.full_chain_pem()),
        (("mtls-edge-server", "tls.key"), server.key_pem.clone()),
        (("mtls-edge-origin-client", "tls.crt"), client.full_chain_pem()),
        (("mtls-edge-origin-client", "tls.key"), client.key_pem.clone()),
        (("mtls-edge-admin", "token"), "k8s-admin-token-0123456789\n".to_string()),
    ]
    .into_iter()
    .map(|((object, key), text)| ((object.to_string(), key.to_string()), text))
    .collect();
    for rule in std::fs::read_dir(repo("conf/rules")).unwrap() {
        let rule = rule.unwrap().path();
        let name = rule.file_name().unwrap().to_str().unwrap().to_string();
        keys.insert(("mtls-edge-rules".into(), name), std::fs::read_to_string(&rule).unwrap());
    }

    // Every item of every projected volume, written where the container mounts it.
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (str_of(&m["name"]), str_of(&m["mountPath"])))
        .collect();
    let mut used = BTreeSet::new();
    for volume in spec["volumes"].as_sequence().unwrap() {
        let Some(sources) = volume["projected"]["sources"].as_sequence() else { continue };
        let at = root.join(mounts[str_of(&volume["name"])].trim_start_matches('/'));
        for source in sources {
            let kind = if source["configMap"].is_mapping() { "configMap" } else { "secret" };
            let name = str_of(&source[kind]["name"]).to_string();
            for item in source[kind]["items"].as_sequence().unwrap() {
                let id = (name.clone(), str_of(&item["key"]).to_string());
                let text = keys.get(&id).unwrap_or_else(|| panic!("{id:?}: no such ConfigMap or Secret key here"));
                pki::write_file(&at.join(str_of(&item["path"])), text, kind == "secret").unwrap();
                used.insert(id);
            }
        }
    }
    let unused: Vec<_> = keys.keys().filter(|k| !used.contains(k)).collect();
    assert!(unused.is_empty(), "not mounted: {unused:?} (a rule file in conf/rules needs an item in deployment.yaml)");

    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(str_of).collect();
    assert_eq!(args[0], "-c");
    let config = root.join(args[1].trim_start_matches('/'));
    let check = Command::new(BIN).args(["-t", "-c"]).arg(&config).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    // The check is real: a key the volumes do not provide fails it, naming the file.
    std::fs::remove_file(config.parent().unwrap().join("../secrets/edge-client.key")).unwrap();
    let check = Command::new(BIN).args(["-t", "-c"]).arg(&config).output().unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("origins.firmware.client_key"));
}

fn promtool() -> PathBuf {
    tool("promtool", "target/tools/prometheus/usr/bin/promtool")
}

#[test]
fn the_alerts_pass_promtool_and_fire_on_their_test_series() {
    let check = Command::new(promtool()).args(["check", "rules"]).arg(repo("deploy/prometheus/alerts.yaml")).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let test = Command::new(promtool()).args(["test", "rules"]).arg(repo("deploy/prometheus/alerts.test.yaml")).output().unwrap();
    assert!(test.status.success(), "{}{}", String::from_utf8_lossy(&test.stdout), String::from_utf8_lossy(&test.stderr));

    // Every alert has a case that makes it fire.
    let alerts = std::fs::read_to_string(repo("deploy/prometheus/alerts.yaml")).unwrap();
    let cases = std::fs::read_to_string(repo("deploy/prometheus/alerts.test.yaml")).unwrap();
    let names: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        let fired = cases.split("alertname: ").skip(1).any(|c| c.starts_with(name) && c.contains("exp_labels"));
        assert!(fired, "no case makes {name} fire");
    }

    // The cases can fail: with a threshold moved, the certificate case no longer holds.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alerts.yaml"), alerts.replace("< 7 * 86400", "< 1 * 86400")).unwrap();
    std::fs::write(dir.path().join("alerts.test.yaml"), &cases).unwrap();
    let test = Command::new(promtool()).args(["test", "rules"]).arg(dir.path().join("alerts.test.yaml")).output().unwrap();
    assert!(!test.status.success());
}

/// The `mtls_edge_*` names in `text` (PromQL), histogram suffixes kept.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("mtls_edge_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_alerts_query_only_metrics_the_edge_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/mtls-edge.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 25, "{} queries", exprs.len());
    let mut queried = metric_names(&exprs.join("\n"));
    queried.extend(metric_names(&std::fs::read_to_string(repo("deploy/prometheus/alerts.yaml")).unwrap()));

    // An edge that has done a bit of everything: a cached route with a disk tier, a shield node
    // that is down (the miss falls back to the origin), an origin that is down, a reload.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let ca = device_ca(d);
    save(d, "device", &ca.issue(&LeafSpec::client("device-0001")).unwrap());
    pki::write_file(&d.join("device-crl.pem"), &ca.crl(&[]).unwrap(), false).unwrap();
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, admin_port, down) = (free_port(), free_port(), free_port());
    let yaml = format!(
        "{server}listeners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem], crl_files: [device-crl.pem] }}\norigins:\n{main}{dead}routes:\n  - {{ path_prefix: /files/, origin: main, cache: {{ default_ttl_secs: 60 }} }}\n  - {{ path_prefix: /down/, origin: dead }}\n  - {{ path_prefix: /, origin: main }}\ncache: {{ max_bytes: 16777216, max_object_bytes: 1048576, disk: {{ path: disk, max_bytes: 67108864, min_free_bytes: 0 }} }}\nshield:\n  nodes: [{{ name: gone, address: 127.0.0.1:{down} }}]\n  sni: edge.test\n  ca_file: edge-ca.pem\n  client_cert: edge-client.pem\n  client_key: edge-client.key\n  connect_timeout_secs: 1\nadmin: {{ address: 127.0.0.1:{admin_port} }}\n",
        server = server_yaml(d, 1),
        listener = listener_yaml(port, "required", "devices"),
        main = origin_yaml("main", origin.port),
        dead = origin_yaml("dead", down),
    );
    let _edge = spawn_edge(d, &yaml, port);
    let device = Client::new(d, port).cert("device");
    for path in ["/files/a.bin?size=100", "/files/a.bin?size=100", "/down/x", "/echo"] {
        device.get(path).unwrap();
    }
    let _ = Client::new(d, port).get("/echo"); // refused: no certificate
    assert_eq!(admin(admin_port, "POST", "/reload").0, 200);
    let scraped = admin(admin_port, "GET", "/metrics").1;
    let exported: BTreeSet<String> = scraped
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();

    // A few only appear once their event has happened (a disk I/O error, a corrupt object, an
    // eviction): those are checked against their definitions in src/metrics.rs.
    let defined = std::fs::read_to_string(repo("src/metrics.rs")).unwrap();
    let event_only = ["mtls_edge_cache_disk_errors_total", "mtls_edge_cache_disk_corrupt_total", "mtls_edge_cache_evictions_total"];
    for name in &queried {
        if event_only.contains(&name.as_str()) {
            assert!(defined.contains(&format!("\"{name}\"")), "{name} is not defined in src/metrics.rs");
        } else {
            assert!(exported.contains(name), "{name} is queried but the edge does not export it");
        }
    }
}
