//! Zero-downtime upgrade: `mtls-edge -u` takes the listening sockets from the running edge, which
//! drains after SIGQUIT, under load; and SIGQUIT with no process to take the sockets (none
//! started, or one whose config is broken) leaves the running edge serving.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mtls_edge::pki::LeafSpec;

struct Setup {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
    conf: PathBuf,
    admin_port: u16,
}

fn setup() -> Setup {
    setup_with("  - { path_prefix: /, origin: main }\n")
}

/// The edge with `routes` (YAML list items) and whatever follows them.
fn setup_with(routes: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let device_ca = device_ca(d);
    save(d, "device", &device_ca.issue(&LeafSpec::client("device")).unwrap());
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let dd = d.display();
    let yaml = format!(
        "server: {{ threads: 2, grace_period_seconds: 5, graceful_shutdown_timeout_seconds: 1, pid_file: {dd}/edge.pid, upgrade_sock: {dd}/upgrade.sock }}\nlisteners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem] }}\norigins:\n{origin}routes:\n{routes}admin: {{ address: 127.0.0.1:{admin_port} }}\n",
        listener = listener_yaml(port, "required", "devices"),
        origin = origin_yaml("main", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    let conf = d.join(format!("edge-{port}.yaml"));
    Setup {
        dir,
        _origin: origin,
        edge,
        conf,
        admin_port,
    }
}

fn kill(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// The new process: `mtls-edge -u -c conf`, its output in `log`.
fn upgrade(conf: &Path, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args(["-u", "-c"])
        .arg(conf)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Devices asking all the time, over new connections and over keep-alive; a keep-alive request
/// whose connection the server closed before any answer is retried once on a new connection, as
/// HTTP clients do with idempotent requests (RFC 9112 §9.3.1). Counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

fn load(dir: &Path, port: u16) -> Load {
    let (stop, ok, failed) = (
        Arc::default(),
        Arc::<AtomicUsize>::default(),
        Arc::<AtomicUsize>::default(),
    );
    let threads = (0..8)
        .map(|i| {
            let (dir, stop, ok, failed): (PathBuf, Arc<AtomicBool>, _, _) =
                (dir.to_path_buf(), Arc::clone(&stop), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let c = Client::new(&dir, port).cert("device");
                let mut errors = Vec::new();
                let mut conn: Option<KeepAlive> = None;
                while !stop.load(Ordering::Relaxed) {
                    let result = if i % 4 != 0 {
                        c.get("/echo").map(|r| r.status)
                    } else {
                        let reused = conn.is_some();
                        let first = match conn.as_mut() {
                            Some(k) => k.get("/echo"),
                            None => c.keep_alive().and_then(|mut k| {
                                let r = k.get("/echo");
                                conn = Some(k);
                                r
                            }),
                        };
                        match first {
                            Err(_) if reused => {
                                conn = None;
                                c.keep_alive().and_then(|mut k| {
                                    let r = k.get("/echo");
                                    conn = Some(k);
                                    r
                                })
                            }
                            r => r,
                        }
                        .map(|r| r.status)
                    };
                    match result {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            conn = None;
                            errors.push(format!("{other:?}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })
        })
        .collect();
    Load {
        stop,
        ok,
        failed,
        threads,
    }
}

impl Load {
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors: Vec<String> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(self.failed.load(Ordering::Relaxed), errors.len());
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

#[test]
fn an_upgrade_under_load_fails_no_request_and_finishes_a_download_in_progress() {
    let s = setup();
    let d = s.dir.path();
    let port = s.edge.port;
    let old_pid = s.edge.pid();
    let load = load(d, port);
    // A download on the old process: the origin sends half and waits.
    let size = 3_000_000;
    let (mut download, mut got) = Client::new(d, port)
        .cert("device")
        .first_bytes(&format!("/gated/fw.bin?size={size}"), 1)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let new_log = d.join("new.log");
    let mut new = upgrade(&s.conf, &new_log);
    let sock = d.join("upgrade.sock");
    wait_until(
        "the new process waits on the upgrade socket",
        Duration::from_secs(10),
        || mtls_edge::upgrade::listening(sock.to_str().unwrap()),
    );
    kill(old_pid, "QUIT");
    s.edge.wait_event("SIGQUIT received, sending socks");
    // The new process serves: its own generation 1 answers the admin listener it took over.
    wait_until("the new process has the sockets", Duration::from_secs(10), || {
        std::fs::read_to_string(&new_log)
            .unwrap_or_default()
            .contains("Bootstrap done")
    });
    // The download goes on from the old process, then completes.
    assert_eq!(
        Client::new(d, port)
            .cert("device")
            .get("/__origin/release?name=fw.bin")
            .unwrap()
            .status,
        200
    );
    let mut buf = [0u8; 65536];
    while got < size {
        let n = download.read(&mut buf).unwrap();
        assert!(n > 0, "the download on the old process was cut at {got} of {size}");
        got += n;
    }
    // The old process exits after its grace period; the load goes on against the new one.
    wait_until("the old process exits", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{old_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{old_pid}/stat")).is_ok_and(|st| st.contains(") Z "))
    });
    std::thread::sleep(Duration::from_millis(500));
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {errors:?}",
        errors.len(),
        ok + errors.len()
    );
    assert!(ok > 100, "only {ok} requests");
    assert_eq!(Client::new(d, port).cert("device").get("/echo").unwrap().status, 200);
    assert_eq!(metric(s.admin_port, "mtls_edge_config_generation"), 1.0);
    let _ = new.kill();
    let _ = new.wait();
}

#[test]
fn sigquit_without_a_process_to_take_the_sockets_is_ignored() {
    let s = setup();
    let d = s.dir.path();
    let c = Client::new(d, s.edge.port).cert("device");
    assert_eq!(c.get("/echo").unwrap().status, 200);
    kill(s.edge.pid(), "QUIT");
    s.edge.wait_event("SIGQUIT ignored: no process is listening on");
    assert_eq!(
        metric(
            s.admin_port,
            "mtls_edge_upgrade_signals_total{result=\"no_new_process\"}"
        ),
        1.0
    );

    // A new process whose config is broken exits before it waits on the socket.
    let broken = d.join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&s.conf)
            .unwrap()
            .replace("device-ca.pem", "missing.pem"),
    )
    .unwrap();
    let mut new = upgrade(&broken, &d.join("new.log"));
    let status = new.wait().unwrap();
    assert!(!status.success());
    assert!(std::fs::read_to_string(d.join("new.log"))
        .unwrap()
        .contains("missing.pem"));
    kill(s.edge.pid(), "QUIT");
    // pingora would have tried to hand the sockets over for 5 s, then shut down.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(c.get("/echo").unwrap().status, 200);
    assert_eq!(
        metric(
            s.admin_port,
            "mtls_edge_upgrade_signals_total{result=\"no_new_process\"}"
        ),
        2.0
    );
}


#[test]
fn both_processes_of_an_upgrade_share_the_disk_cache() {
    let s = setup_with(
        "  - { path_prefix: /__origin/, origin: main }\n  - { path_prefix: /, origin: main, cache: { default_ttl_secs: 300 } }\ncache: { max_bytes: 4194304, max_object_bytes: 1048576, disk: { path: disk, max_bytes: 67108864, min_free_bytes: 0 } }\n",
    );
    let d = s.dir.path();
    let port = s.edge.port;
    let c = || Client::new(d, port).cert("device");
    let count = |path: &str| -> u64 { c().get(&format!("/__origin/count?path={path}")).unwrap().body.trim().parse().unwrap() };
    assert_eq!(c().get("/files/a.bin?size=2000000").unwrap().body.len(), 2_000_000);
    // A fill in progress on the old process when the new one starts and loads the directory.
    let size = 3_000_000;
    let (mut download, mut got) = c().first_bytes(&format!("/gated/g.bin?size={size}"), 1).unwrap();
    let tmp = d.join("disk/tmp");
    wait_until("the fill writes its file", Duration::from_secs(10), || !files_with(&tmp, "body").is_empty());

    let new_log = d.join("new.log");
    let mut new = upgrade(&s.conf, &new_log);
    let sock = d.join("upgrade.sock");
    wait_until("the new process waits on the upgrade socket", Duration::from_secs(10), || {
        mtls_edge::upgrade::listening(sock.to_str().unwrap())
    });
    kill(s.edge.pid(), "QUIT");
    wait_until("the new process has loaded the cache", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&new_log).unwrap_or_default();
        log.contains("Bootstrap done") && log.contains("cache disk:")
    });
    assert_eq!(files_with(&tmp, "body").len(), 1, "the new process removed the old one's fill in progress");

    // The old process finishes its fill and commits it; the new one serves it from disk.
    assert_eq!(c().get("/__origin/release?name=g.bin").unwrap().status, 200);
    let mut buf = [0u8; 65536];
    while got < size {
        let n = download.read(&mut buf).unwrap();
        assert!(n > 0, "the download on the old process was cut at {got} of {size}");
        got += n;
    }
    wait_until("the old process commits its fill", Duration::from_secs(10), || {
        files_with(&d.join("disk/objects"), "meta").len() == 2
    });
    for path in ["/files/a.bin?size=2000000", "/gated/g.bin?size=3000000"] {
        let r = c().get(path).unwrap();
        assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"), "{path}");
    }
    assert_eq!(count("/files/a.bin"), 1);
    assert_eq!(count("/gated/g.bin"), 1);
    let _ = new.kill();
    let _ = new.wait();
}
