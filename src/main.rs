//! The `mtls-edge` command: run an edge from a config, check a config, run the demo, or run a
//! standalone mTLS origin (used by the demo and the tests).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mtls_edge::{app, demo, logs};

/// glibc malloc took about 8% of the CPU of a small cached response (per-request header maps
/// and buffers, freed on other threads); mimalloc's thread-local free lists avoid most of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mtls-edge", version, about = "An mTLS CDN edge on Pingora")]
struct Cli {
    /// The configuration file.
    #[arg(short = 'c', long = "conf", default_value = "conf/edge.yaml", global = true)]
    conf: PathBuf,
    /// Check the configuration (every certificate, key, CRL and reference), then exit 0 or 1.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Zero-downtime upgrade: take the listening sockets from the running edge (over
    /// `server.upgrade_sock`), which drains once it gets SIGQUIT.
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Lua-free rules: see lua-free-rules/README.md.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Generate a demo PKI, start a demo origin that requires origin mTLS and the edge in front.
    Demo {
        /// Where the demo PKI and config are written.
        #[arg(long, default_value = "demo-pki")]
        dir: PathBuf,
        /// Also copy the PKI into this config folder's layout (DIR/pki and DIR/../secrets), where
        /// conf/edge.yaml expects it.
        #[arg(long)]
        conf: Option<PathBuf>,
    },
    /// Run only an mTLS origin (the demo's): it requires a client certificate from `client_ca`.
    #[command(hide = true)]
    Origin {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        client_ca: PathBuf,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Say which rules a certificate and a request match, and what the edge would do, without
    /// running it (uses the config's trust stores, rules, lists and routes).
    Explain {
        /// The client certificate (PEM), then any intermediates the device sends.
        #[arg(long)]
        cert: PathBuf,
        #[arg(long, default_value = "/")]
        path: String,
        /// The SNI the device sends (selects the trust store); also the default Host.
        #[arg(long)]
        sni: Option<String>,
        /// The Host header (default: the SNI, else localhost).
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, `Name: value`; repeat for more.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The client's IP address (request rules, and connection rules that read it, which
        /// run after the handshake).
        #[arg(long, default_value = "192.0.2.1")]
        client_ip: String,
        /// The listener address (default: the first listener).
        #[arg(long)]
        listener: Option<String>,
        /// Instead of explaining, time the request phase over this many requests (load/rules.sh).
        #[arg(long, hide = true)]
        bench: Option<u32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Until the config says where logs go: text on stderr.
    if let Err(e) = logs::init(&logs::Settings::stderr()) {
        eprintln!("cannot start logging: {e}");
    }
    let result = match cli.command {
        None => run_edge(&cli.conf, cli.test, cli.upgrade),
        Some(Command::Rules { command }) => run_rules(&cli.conf, command),
        Some(Command::Demo { dir, conf }) => run_demo(&dir, conf.as_deref()),
        Some(Command::Origin {
            listen,
            cert,
            key,
            client_ca,
        }) => run_origin(&listen, &cert, &key, &client_ca),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP's default action ends the process. The reload service answers it once the edge runs;
/// until then (while a large state builds) it must not be fatal: its handler is installed first.
fn catch_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() {
        rt.block_on(async {
            // The handler stays installed for the life of the process.
            let _ = signal(SignalKind::hangup());
        });
    }
}

fn run_edge(conf: &std::path::Path, test_only: bool, upgrade: bool) -> Result<(), String> {
    if !test_only {
        catch_hangup();
        // What the build logs goes where the config says logs go (its errors are printed below).
        if let Ok(settings) = mtls_edge::state::build::logging(conf) {
            logs::configure(&settings)?;
        }
    }
    let edge = app::build(conf).map_err(|e| format!("configuration invalid:\n{e}"))?;
    if test_only {
        println!("{}: configuration OK", conf.display());
        return Ok(());
    }
    edge.run(upgrade, Vec::new())
}

fn run_rules(conf: &std::path::Path, command: RulesCommand) -> Result<(), String> {
    let RulesCommand::Explain {
        cert,
        path,
        sni,
        host,
        method,
        headers,
        client_ip,
        listener,
        bench,
    } = command;
    let headers = headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("--header '{h}': expected 'Name: value'"))
        })
        .collect::<Result<_, _>>()?;
    // As the edge sees them: SNI lowercased, Host lowercased without its port.
    let sni = sni.map(|s| s.to_ascii_lowercase());
    let host = host.or_else(|| sni.clone()).unwrap_or_else(|| "localhost".into());
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host.as_str(),
    }
    .to_ascii_lowercase();
    let q = mtls_edge::rules::explain::Query {
        cert_pem: std::fs::read(&cert).map_err(|e| format!("--cert {}: {e}", cert.display()))?,
        host,
        sni,
        method,
        path_and_query: path,
        headers,
        client_ip,
    };
    let edge = app::build(conf).map_err(|e| format!("configuration invalid:\n{e}"))?;
    match bench {
        Some(n) => {
            let (hot, cold) = edge.bench_rules(&q, n)?;
            println!("{hot:.0} ns per request; {cold:.0} ns with the CPU caches evicted before each request");
        }
        None => print!("{}", edge.explain(listener.as_deref(), &q)?),
    }
    Ok(())
}

fn run_demo(dir: &std::path::Path, layout: Option<&std::path::Path>) -> Result<(), String> {
    catch_hangup();
    let conf = demo::write_demo(dir)?;
    if let Some(folder) = layout {
        demo::install_layout(dir, folder)?;
    }
    let edge = app::build(&conf).map_err(|e| format!("demo configuration invalid:\n{e}"))?;
    let origin = demo::origin_service(
        demo::ORIGIN_ADDR,
        &dir.join("origin-server.pem"),
        &dir.join("origin-server.key"),
        &dir.join("edge-ca.pem"),
    )?;
    // A closed stdout (a pipe whose reader went away) must not stop the demo.
    let _ = writeln!(std::io::stdout(), "{}", demo::curl_commands(dir));
    edge.run(false, vec![Box::new(origin)])
}

fn run_origin(
    listen: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
) -> Result<(), String> {
    use pingora::server::configuration::ServerConf;
    use pingora::server::{RunArgs, Server};
    let conf = ServerConf {
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        pid_file: format!("/tmp/mtls-edge-origin-{}.pid", std::process::id()),
        upgrade_sock: format!("/tmp/mtls-edge-origin-{}.sock", std::process::id()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server.add_service(demo::origin_service(listen, cert, key, client_ca)?);
    server.run(RunArgs::default());
    Ok(())
}
