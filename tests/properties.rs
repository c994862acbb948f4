//! Range and conditional requests, generated, against a real edge serving a cached object: any
//! `Range`, `If-Range`, `If-None-Match` and `If-Modified-Since` gets a well-formed answer (200,
//! 206 with the bytes it names, 304, 412 or 416) and never takes the edge down.

mod common;

use common::*;
use mtls_edge::pki::LeafSpec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn range() -> impl Strategy<Value = String> {
    let bound = prop_oneof![
        Just(String::new()),
        (0u64..1200).prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        "[0-9a-z -]{0,6}",
    ];
    let spec = (bound.clone(), bound).prop_map(|(a, b)| format!("{a}-{b}"));
    (
        prop_oneof![Just("bytes="), Just("bytes ="), Just("BYTES="), Just("items="), Just("")],
        prop::collection::vec(spec, 1..5),
    )
        .prop_map(|(unit, specs)| format!("{unit}{}", specs.join(",")))
}

#[test]
fn any_range_or_condition_gets_a_well_formed_answer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let ca = device_ca(d);
    save(d, "device", &ca.issue(&LeafSpec::client("device-1")).unwrap());
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let port = free_port();
    let yaml = format!(
        "{server}listeners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem] }}\norigins:\n{origin}routes:\n  - {{ path_prefix: /files/, origin: files, cache: {{ default_ttl_secs: 60 }} }}\ncache: {{ max_bytes: 67108864, max_object_bytes: 16777216 }}\n",
        server = server_yaml(d, 2),
        listener = listener_yaml(port, "required", "devices"),
        origin = origin_yaml("files", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    let path = "/files/fw.bin?size=1000";
    let full = mtls_edge::demo::file_body(1000);
    let mut ka = Client::new(d, port).cert("device").keep_alive().unwrap();
    assert_eq!(ka.get(path).unwrap().status, 200);

    let conditions = (
        prop::option::of(range()),
        prop::option::of(prop_oneof![Just("\"1000\"".to_string()), "[ -~]{0,30}"]),
        prop::option::of(prop_oneof![Just("\"1000\"".to_string()), Just("*".to_string()), "[ -~]{0,30}"]),
        prop::option::of(prop_oneof![Just("Sun, 06 Nov 1994 08:49:37 GMT".to_string()), "[ -~]{0,30}"]),
    );
    let mut runner = TestRunner::new(Config { cases: 96, failure_persistence: None, ..Config::default() });
    runner
        .run(&conditions, |(range, if_range, inm, ims)| {
            let mut c = Client::new(d, port).cert("device");
            for (name, v) in [("Range", &range), ("If-Range", &if_range), ("If-None-Match", &inm), ("If-Modified-Since", &ims)] {
                if let Some(v) = v {
                    c = c.header(name, v.trim());
                }
            }
            let r = c.get(path).map_err(TestCaseError::fail)?;
            prop_assert!([200, 206, 304, 412, 416].contains(&r.status), "{} for {range:?} {if_range:?} {inm:?} {ims:?}", r.status);
            if r.status == 200 {
                prop_assert_eq!(r.body.as_bytes(), &full[..]);
            }
            if let (206, Some(cr)) = (r.status, r.header("content-range")) {
                // One range: the bytes it names, exactly.
                let spec = cr.strip_prefix("bytes ").and_then(|s| s.strip_suffix("/1000"));
                let (a, b) = spec.and_then(|s| s.split_once('-')).ok_or_else(|| TestCaseError::fail(cr.to_string()))?;
                let (a, b): (usize, usize) = (a.parse().unwrap_or(usize::MAX), b.parse().unwrap_or(0));
                prop_assert!(a <= b && b < 1000, "{cr}");
                prop_assert_eq!(r.body.as_bytes(), &full[a..=b]);
            }
            Ok(())
        })
        .unwrap();
    // Still serving, from the one fill.
    assert_eq!(ka.get(path).unwrap().status, 200);
    drop(edge);
}
