//! `mtls-edge demo`: the printed curl commands work exactly as printed, and Ctrl-C (SIGINT)
//! stops the edge and the origin. Uses the demo's fixed ports 8443, 9443 and 9100.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the demo if the test fails before it stops it.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_demo_prints_curl_commands_that_work_and_stops_on_ctrl_c() {
    for port in [8443, 9443, 9100] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port}, which the demo uses, is taken by another process"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // As the README's demo command does: the PKI in demo-pki/, and installed into a copy of the
    // repository's conf/ folder (conf/pki and secrets/ beside it).
    let pki = dir.path().join("demo-pki");
    let conf = common::copy_conf(dir.path());
    let child = Command::new(common::BIN)
        .args(["demo", "--dir"])
        .arg(&pki)
        .arg("--conf")
        .arg(&conf)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let stdout = child.0.stdout.take().unwrap();
    let mut commands = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(cmd) = line.strip_prefix("  curl ") {
            commands.push(format!("curl -sS {cmd}"));
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    // Keep draining stdout so that the demo never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect("127.0.0.1:8443").is_err() {
        assert!(
            Instant::now() < deadline,
            "the demo edge did not start:\n{}",
            std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(commands.len(), 3, "{commands:?}");
    let run = |cmd: &str| Command::new("sh").arg("-c").arg(cmd).output().unwrap();

    let ok = run(&commands[0]);
    let body = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && body.contains("\"served_to\":\"CN=device-0001"),
        "{}: {body}",
        commands[0]
    );

    let refused = run(&commands[1]);
    assert!(
        !refused.status.success(),
        "without a certificate the demo answered: {}",
        String::from_utf8_lossy(&refused.stdout)
    );

    let echo = run(&commands[2]);
    assert!(String::from_utf8_lossy(&echo.stdout).contains("cloudfront-viewer-cert-present: 1"));

    // The documented example config runs against the demo PKI, in its own folder's layout.
    let check = Command::new(common::BIN)
        .args(["-t", "-c"])
        .arg(conf.join("edge.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "conf/edge.yaml: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    Command::new("kill")
        .arg("-INT")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "the demo exited with {status} on SIGINT");
            break;
        }
        if Instant::now() > deadline {
            panic!("the demo did not stop within 10 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::net::TcpStream::connect("127.0.0.1:9443").is_err(),
        "the demo origin still listens"
    );
}
