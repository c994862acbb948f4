//! The container image, built by `scripts/image.sh` (from this test build's binary) and run the
//! way the README runs it: the image's own entrypoint and user, a read-only root with a tmpfs on
//! /tmp, the repository's config folder (`conf/`, with a generated PKI) and the secrets mounted
//! read-only. A device gets 200 through it, `-t` inside it catches a broken config, and SIGTERM
//! drains a request in flight and exits 0. Runs with buildah as root (scripts/setup.sh installs
//! it); skipped, saying why, otherwise (not yet with docker: no docker daemon was at hand).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

const TAG: &str = "localhost/mtls-edge:test";
const CONF: &str = "/etc/mtls-edge/conf";
const SECRETS: &str = "/etc/mtls-edge/secrets";

/// Why the image cannot be built and run here, if it cannot.
fn unable() -> Option<String> {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let has = |tool: &str| Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !root {
        return Some("this test builds and runs the image with buildah, which needs root (not yet: docker)".into());
    }
    ["buildah", "mmdebstrap"]
        .iter()
        .find(|t| !has(t))
        .map(|t| format!("{t} is missing: scripts/setup.sh installs it from Debian (this test does not use docker yet)"))
}

/// A buildah working container of the image, with its root file system mounted read-only.
struct Container {
    name: String,
}

impl Container {
    fn new() -> Container {
        let name = format!("mtls-edge-image-test-{}", std::process::id());
        let ok = |args: &[&str]| {
            let out = Command::new("buildah").args(args).output().unwrap();
            assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        ok(&["from", "--quiet", "--name", &name, TAG]);
        let root = ok(&["mount", &name]);
        let ro = Command::new("mount").args(["-o", "remount,ro,bind", &root]).status().unwrap();
        assert!(ro.success(), "could not make {root} read-only");
        Container { name }
    }

    /// `buildah run` of `argv` with the image's user, host networking (loopback only is used),
    /// a tmpfs on /tmp and /run, and `conf` and `secrets` mounted read-only.
    fn run(&self, argv: &[String], conf: &Path, secrets: &Path, log: &Path) -> Child {
        let file = std::fs::File::create(log).unwrap();
        Command::new("buildah")
            .args(["run", "--isolation", "chroot", "--network", "host"])
            .args(["--mount", "type=tmpfs,destination=/tmp", "--mount", "type=tmpfs,destination=/run"])
            .arg("-v")
            .arg(format!("{}:{CONF}:ro", conf.display()))
            .arg("-v")
            .arg(format!("{}:{SECRETS}:ro", secrets.display()))
            .arg(&self.name)
            .arg("--")
            .args(argv)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rm", &self.name]).output();
    }
}

/// The command's exit status from what `buildah run` printed. buildah 1.28 panics while it
/// cleans up after a command in a read-only root (its own exit status is then 2), after it has
/// printed `subprocess exited with status N` for a command that failed; a command that succeeded
/// leaves no such line, and one that could not start leaves `error running subprocess`.
fn exit_status(log: &Path) -> i32 {
    let out = std::fs::read_to_string(log).unwrap();
    if let Some(n) = out.lines().find_map(|l| l.strip_prefix("subprocess exited with status ")) {
        return n.trim().parse().unwrap();
    }
    assert!(!out.contains("error running subprocess"), "the command did not start:\n{out}");
    0
}

fn wait(child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("buildah run did not end within {within:?}");
}

/// The edge process under `buildah run` (its descendant running the image's binary).
fn edge_pid(buildah: u32) -> u32 {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !cmdline.starts_with(b"/usr/local/bin/mtls-edge\0") {
                continue;
            }
            let mut p = pid;
            while let Some(up) = parent(p).filter(|&up| up > 1) {
                if up == buildah {
                    return pid;
                }
                p = up;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no mtls-edge process under buildah {buildah}");
}

/// A line of `/proc/PID/status`.
fn status_line(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(key)).unwrap().trim().to_string()
}

/// The mount options of the mount at `point` as the process sees it.
fn mount_options(pid: u32, point: &str) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&point)).then(|| f[5].to_string())
        })
        .last()
        .unwrap_or_else(|| panic!("nothing mounted at {point}:\n{info}"))
}

/// The image's configuration field `field` (from `.OCIv1.Config`), one line per list item.
fn image_config(field: &str) -> Vec<String> {
    let template = format!("{{{{range .OCIv1.Config.{field}}}}}{{{{.}}}}\n{{{{end}}}}");
    let template = if field == "User" { "{{.OCIv1.Config.User}}".to_string() } else { template };
    let out = Command::new("buildah")
        .args(["inspect", "--type", "image", "--format", &template, TAG])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect()
}

#[test]
fn the_image_runs_as_documented_read_only_and_drains_on_sigterm() {
    if let Some(why) = unable() {
        eprintln!("image test skipped: {why}");
        return;
    }
    let build = Command::new("scripts/image.sh")
        .arg(TAG)
        .env("BINARY", BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(build.status.success(), "scripts/image.sh: {}", String::from_utf8_lossy(&build.stderr));
    assert_eq!(image_config("User"), ["10001:10001"]);
    assert_eq!(image_config("Entrypoint"), ["/usr/local/bin/mtls-edge"]);
    assert_eq!(image_config("Cmd"), ["-c".to_string(), format!("{CONF}/edge.yaml")]);
    // What a runtime runs: the entrypoint, then the command.
    let entry = [image_config("Entrypoint"), image_config("Cmd")].concat();

    // The repository's config folder, with the demo PKI installed into it as the demo does, and
    // only its ports and grace period changed for this test.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("demo-pki");
    mtls_edge::demo::write_demo(&pki).unwrap();
    let conf = copy_conf(d);
    mtls_edge::demo::install_layout(&pki, &conf).unwrap();
    let secrets: PathBuf = d.join("secrets");
    // The image's user reads the keys (in Kubernetes: fsGroup); they stay 0600.
    for f in std::fs::read_dir(&secrets).unwrap() {
        std::os::unix::fs::chown(f.unwrap().path(), Some(10001), Some(10001)).unwrap();
    }
    let origin = spawn_origin(&pki, "origin-server", "edge-ca.pem");
    let (port, admin) = (free_port(), free_port());
    let yaml = std::fs::read_to_string(conf.join("edge.yaml"))
        .unwrap()
        .replace("0.0.0.0:8443", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9443", &format!("127.0.0.1:{}", origin.port))
        .replace("127.0.0.1:9100", &format!("127.0.0.1:{admin}"))
        .replace("grace_period_seconds: 10", "grace_period_seconds: 3")
        .replace("graceful_shutdown_timeout_seconds: 10", "graceful_shutdown_timeout_seconds: 1");
    std::fs::write(conf.join("edge.yaml"), yaml).unwrap();
    let container = Container::new();

    // -t inside the container: the folder passes; a broken copy fails, naming file, key and why.
    let check = |folder: &Path, log: &str| {
        let log = d.join(log);
        let mut argv = entry.clone();
        argv.insert(1, "-t".into());
        let mut c = container.run(&argv, folder, &secrets, &log);
        wait(&mut c, Duration::from_secs(30));
        (exit_status(&log), std::fs::read_to_string(&log).unwrap())
    };
    let (code, out) = check(&conf, "check.log");
    assert_eq!(code, 0, "{out}");
    let broken = d.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let text = std::fs::read_to_string(conf.join("edge.yaml")).unwrap();
    std::fs::write(broken.join("edge.yaml"), text.replace("      mode: required", "      mode: sometimes")).unwrap();
    let (code, out) = check(&broken, "broken.log");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{CONF}/edge.yaml: listeners[0].mtls.mode: unknown variant `sometimes`")), "{out}");

    // The edge itself.
    let log = d.join("edge.log");
    let mut run = container.run(&entry, &conf, &secrets, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(run.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap());
        assert!(Instant::now() < deadline, "the edge did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = edge_pid(run.id());
    assert!(status_line(pid, "Uid:").split_whitespace().all(|u| u == "10001"), "{}", status_line(pid, "Uid:"));
    assert_eq!(status_line(pid, "CapEff:"), "0000000000000000");
    for point in ["/", CONF, SECRETS] {
        let options = mount_options(pid, point);
        assert!(options.split(',').any(|o| o == "ro"), "{point} is mounted {options}");
    }

    let health = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{admin}/healthz")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok\n");
    let device = Client::new(&pki, port).cert("device");
    let r = device.get("/echo").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("cloudfront-viewer-cert-subject: CN=device-0001"), "{}", r.body);
    assert!(Client::new(&pki, port).get("/echo").is_err(), "no certificate, no connection");

    // SIGTERM with a request in flight: it completes, then the edge exits 0.
    let client_pki = pki.clone();
    let slow = std::thread::spawn(move || {
        Client::new(&client_pki, port).cert("device").get("/files/slow.bin?size=4096&delay_ms=1500")
    });
    std::thread::sleep(Duration::from_millis(500));
    let term = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(term.success());
    let r = slow.join().unwrap().unwrap();
    assert_eq!((r.status, r.body.len()), (200, 4096), "the request in flight was not drained");
    wait(&mut run, Duration::from_secs(20));
    assert_eq!(exit_status(&log), 0, "{}", std::fs::read_to_string(&log).unwrap());
}
