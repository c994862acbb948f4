//! The configuration file: its YAML schema (unknown keys refused), loading, and the checks that
//! need no other file. Every error names the file, the key path and the reason. This module is a
//! leaf: it knows nothing of the edge. `state::build` turns a [`File`] into the running state,
//! reading the certificates, keys, CRLs, rules and lists it names.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Key path in the YAML, e.g. `origins.firmware.client_cert`.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

/// All the problems found in one configuration file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects the errors found in one configuration file.
pub struct Report {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl Report {
    pub fn new(file: &Path) -> Report {
        Report {
            file: file.to_path_buf(),
            errors: Vec::new(),
        }
    }

    pub fn error(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.into(),
            reason: reason.into(),
        });
    }

    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

/// The whole file. See `conf/edge.yaml` for every option, documented.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: ServerSection,
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub trust_stores: BTreeMap<String, TrustStore>,
    pub origins: BTreeMap<String, Origin>,
    pub routes: Vec<Route>,
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    #[serde(default)]
    pub viewer_headers: ViewerHeaders,
    #[serde(default)]
    pub headers_with_underscores: Underscores,
    #[serde(default)]
    pub limits: Limits,
    pub admin: Option<Admin>,
    /// The shared cache; without this section nothing is cached.
    pub cache: Option<Cache>,
    /// Lua-free rules (CEL conditions) and the lists they use; without it nothing is evaluated.
    pub rules: Option<Rules>,
    /// The shield tier: cache misses go to the object's home among these nodes, not the origin.
    pub shield: Option<Shield>,
    #[serde(default)]
    pub logging: Logging,
    #[serde(default)]
    pub reload: Reload,
}

/// The `rules:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Directory whose `*.yaml` files hold the rules, loaded in file name order.
    pub dir: String,
    /// Named lists: `lists.NAME` in conditions.
    #[serde(default)]
    pub lists: BTreeMap<String, List>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct List {
    pub file: String,
    pub kind: ListKind,
}

/// What a list holds, which decides how its entries are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    Serial,
    Sha256,
    Text,
}

/// One rule file (`rules.dir/*.yaml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RulePhase {
    Connection,
    Request,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    pub phase: RulePhase,
    #[serde(default = "always")]
    pub when: String,
    #[serde(default)]
    pub mode: RuleMode,
    // Exactly one action.
    pub allow: Option<bool>,
    pub deny: Option<DenySpec>,
    pub set_headers: Option<BTreeMap<String, String>>,
    pub remove_headers: Option<Vec<String>>,
    pub cache_cohort: Option<String>,
    pub origin: Option<String>,
}

fn always() -> String {
    "true".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenySpec {
    /// Request phase: the response status (default 403).
    pub status: Option<u16>,
    /// Request phase: the response body.
    pub body: Option<String>,
}

/// Where the edge's logs go and how they look.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    #[serde(default)]
    pub format: LogFormat,
    /// A file to append to; stdout when absent.
    pub file: Option<String>,
    /// error, warn, info (default), debug or trace; `RUST_LOG` overrides it.
    #[serde(default = "info")]
    pub level: String,
    /// One line per request.
    #[serde(default = "yes")]
    pub access_log: bool,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: LogFormat::default(),
            file: None,
            level: info(),
            access_log: true,
        }
    }
}

fn info() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines: what container log pipelines read.
    #[default]
    Json,
    /// `time level message key=value...`, for people.
    Text,
}

/// When the running edge reloads its files (it also reloads on SIGHUP and `POST /reload`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    /// Reload when a file the config names changes (the config itself, certificates, keys,
    /// CAs, CRLs, the rules directory and list files).
    #[serde(default = "yes")]
    pub watch: bool,
    /// How often the files are looked at.
    #[serde(default = "default_watch_interval")]
    pub watch_interval_ms: u64,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: true,
            watch_interval_ms: default_watch_interval(),
        }
    }
}

fn default_watch_interval() -> u64 {
    250
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Memory budget for everything the cache holds (stored objects and fills in progress), in
    /// bytes.
    pub max_bytes: usize,
    /// Larger objects are streamed through and not cached.
    #[serde(default = "default_max_object")]
    pub max_object_bytes: usize,
    /// The part of `max_bytes` set aside for fills in progress; the rest holds stored objects.
    /// Default: a quarter of `max_bytes`, and at least `max_object_bytes`.
    pub max_filling_bytes: Option<usize>,
    /// How long coalesced requests wait for the first fill's headers before going to the origin
    /// themselves.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout_secs: u64,
    /// A disk tier behind the memory tier: objects larger than memory, kept across restarts.
    pub disk: Option<DiskCache>,
}

/// `cache.disk`: the directory (created if missing) and its bounds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCache {
    pub path: String,
    /// Body and meta bytes of every object on disk.
    pub max_bytes: u64,
    /// Larger objects are streamed through and not cached. Default: a quarter of `max_bytes`.
    pub max_object_bytes: Option<u64>,
    /// Fills evict older objects (or are not written) to leave this much free on the
    /// filesystem.
    #[serde(default = "default_min_free")]
    pub min_free_bytes: u64,
    /// Threads doing the disk's I/O: how many reads and writes run at once.
    #[serde(default = "default_io_threads")]
    pub io_threads: usize,
}

impl DiskCache {
    pub fn object_limit(&self) -> u64 {
        self.max_object_bytes.unwrap_or(self.max_bytes / 4)
    }
}

fn default_min_free() -> u64 {
    1 << 30
}
fn default_io_threads() -> usize {
    16
}

impl Cache {
    pub fn filling_bytes(&self) -> usize {
        self.max_filling_bytes
            .unwrap_or((self.max_bytes / 4).max(self.max_object_bytes))
    }
}

fn default_max_object() -> usize {
    64 << 20
}
fn default_lock_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads for the proxy service; 0 means one per core.
    #[serde(default)]
    pub threads: usize,
    /// How long SIGTERM lets in-flight requests finish.
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u64,
    #[serde(default = "default_grace")]
    pub graceful_shutdown_timeout_seconds: u64,
    #[serde(default = "default_pid_file")]
    pub pid_file: String,
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: 0,
            grace_period_seconds: default_grace(),
            graceful_shutdown_timeout_seconds: default_grace(),
            pid_file: default_pid_file(),
            upgrade_sock: default_upgrade_sock(),
        }
    }
}

fn default_grace() -> u64 {
    10
}
fn default_pid_file() -> String {
    "/tmp/mtls-edge.pid".into()
}
fn default_upgrade_sock() -> String {
    "/tmp/mtls-edge-upgrade.sock".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: String,
    pub server_cert: String,
    pub server_key: String,
    #[serde(default = "yes")]
    pub http2: bool,
    pub mtls: Mtls,
    #[serde(default)]
    pub sni: Vec<SniOverride>,
    #[serde(default)]
    pub role: ListenerRole,
}

/// Who connects to a listener.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerRole {
    /// Devices: their certificates are their identity; rules, limits and header stripping apply.
    #[default]
    Devices,
    /// Edges whose shield this node is: their requests carry the device's identity headers and
    /// the cache-key variants, which the edge set and this node keeps.
    Edges,
}

fn yes() -> bool {
    true
}

/// A per-SNI policy on a listener: its own server certificate and trust store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniOverride {
    pub names: Vec<String>,
    pub server_cert: Option<String>,
    pub server_key: Option<String>,
    pub mtls: Mtls,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// No client certificate is requested.
    Off,
    /// A client may send no certificate; one that it sends must verify.
    Optional,
    /// A verified client certificate is required to complete the handshake.
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default = "required")]
    pub mode: MtlsMode,
    pub trust_store: Option<String>,
}

fn required() -> MtlsMode {
    MtlsMode::Required
}

/// What a CRL past its nextUpdate means.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExpiredCrl {
    /// The handshakes it covers are refused (reason ClientCertRevocationUnknown).
    #[default]
    Refuse,
    /// Its revocations are still enforced; alert on its nextUpdate metric.
    Enforce,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CrlCheck {
    /// Every certificate in the chain below the root must be covered by a CRL.
    #[default]
    Chain,
    /// Only the leaf is checked against its issuer's CRL.
    Leaf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustStore {
    pub ca_files: Vec<String>,
    #[serde(default)]
    pub crl_files: Vec<String>,
    #[serde(default)]
    pub crl_check: CrlCheck,
    #[serde(default)]
    pub expired_crl: ExpiredCrl,
    #[serde(default = "default_depth")]
    pub max_chain_depth: u32,
    #[serde(default)]
    pub advertise_ca_names: bool,
}

fn default_depth() -> u32 {
    4
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub address: String,
    pub sni: String,
    pub ca_file: String,
    pub client_cert: String,
    pub client_key: String,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_read_timeout")]
    pub read_timeout_secs: u64,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
}

fn default_connect_timeout() -> u64 {
    5
}
fn default_shield_connect_timeout() -> u64 {
    2
}
fn default_down_secs() -> u64 {
    10
}
fn default_read_timeout() -> u64 {
    60
}
fn default_idle_timeout() -> u64 {
    60
}

/// The `shield:` section: the shield nodes an edge sends its cache misses to, and how it reaches
/// them (one client certificate and one CA for all of them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shield {
    pub nodes: Vec<ShieldNode>,
    /// The name every shield's certificate must carry.
    pub sni: String,
    pub ca_file: String,
    pub client_cert: String,
    pub client_key: String,
    #[serde(default = "default_shield_connect_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_read_timeout")]
    pub read_timeout_secs: u64,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// How long a node that failed a connection is passed over.
    #[serde(default = "default_down_secs")]
    pub down_secs: u64,
    #[serde(default)]
    pub fallback: ShieldFallback,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShieldNode {
    pub name: String,
    pub address: String,
}

/// Where a miss goes when no shield node takes the connection.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShieldFallback {
    /// To the route's origin, directly.
    #[default]
    Origin,
    /// Nowhere: the request fails with 502, and the origin is never reached from this edge.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Host this route serves (no port); absent means any host.
    pub host: Option<String>,
    #[serde(default = "slash")]
    pub path_prefix: String,
    pub origin: String,
    /// Who may read this route.
    #[serde(default)]
    pub access: Access,
    /// Cache this route's GET/HEAD responses (needs the top-level `cache` section).
    pub cache: Option<RouteCache>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Only clients with a verified certificate (the default).
    #[default]
    Authenticated,
    /// Any client the listener admitted (in optional mode, also clients without a certificate).
    Any,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteCache {
    /// Freshness when the origin sends neither Cache-Control max-age/s-maxage nor Expires.
    #[serde(default = "default_ttl")]
    pub default_ttl_secs: u32,
}

fn default_ttl() -> u32 {
    60
}

fn slash() -> String {
    "/".into()
}

/// Names of the identity headers sent to the origin; `null` turns one off.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeaders {
    #[serde(default = "h_present")]
    pub present: Option<String>,
    #[serde(default = "h_subject")]
    pub subject: Option<String>,
    #[serde(default = "h_issuer")]
    pub issuer: Option<String>,
    #[serde(default = "h_serial")]
    pub serial_number: Option<String>,
    #[serde(default = "h_sha256")]
    pub sha256: Option<String>,
    #[serde(default = "h_validity")]
    pub validity: Option<String>,
    #[serde(default = "h_pem")]
    pub pem: Option<String>,
    #[serde(default = "h_san_uri")]
    pub san_uri: Option<String>,
    #[serde(default = "h_san_dns")]
    pub san_dns: Option<String>,
    /// Also send RFC 9440 `Client-Cert` and `Client-Cert-Chain`.
    #[serde(default)]
    pub rfc9440: bool,
}

macro_rules! header_default {
    ($f:ident, $v:expr) => {
        fn $f() -> Option<String> {
            Some($v.to_string())
        }
    };
}
header_default!(h_present, "CloudFront-Viewer-Cert-Present");
header_default!(h_subject, "CloudFront-Viewer-Cert-Subject");
header_default!(h_issuer, "CloudFront-Viewer-Cert-Issuer");
header_default!(h_serial, "CloudFront-Viewer-Cert-Serial-Number");
header_default!(h_sha256, "CloudFront-Viewer-Cert-Sha256");
header_default!(h_validity, "CloudFront-Viewer-Cert-Validity");
header_default!(h_pem, "CloudFront-Viewer-Cert-Pem");
header_default!(h_san_uri, "CloudFront-Viewer-Cert-San-Uri");
header_default!(h_san_dns, "CloudFront-Viewer-Cert-San-Dns");

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            present: h_present(),
            subject: h_subject(),
            issuer: h_issuer(),
            serial_number: h_serial(),
            sha256: h_sha256(),
            validity: h_validity(),
            pem: h_pem(),
            san_uri: h_san_uri(),
            san_dns: h_san_dns(),
            rfc9440: false,
        }
    }
}

/// Names of the headers that tell the origin about the viewer's connection; `null` turns one off.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ViewerHeaders {
    #[serde(default = "h_address")]
    pub address: Option<String>,
    #[serde(default = "h_tls")]
    pub tls: Option<String>,
    #[serde(default = "h_http_version")]
    pub http_version: Option<String>,
    #[serde(default = "h_forwarded_for")]
    pub forwarded_for: Option<String>,
    #[serde(default = "h_forwarded_proto")]
    pub forwarded_proto: Option<String>,
    #[serde(default = "h_via")]
    pub via: Option<String>,
    #[serde(default = "h_ja4")]
    pub ja4: Option<String>,
}

header_default!(h_address, "CloudFront-Viewer-Address");
header_default!(h_tls, "CloudFront-Viewer-TLS");
header_default!(h_http_version, "CloudFront-Viewer-Http-Version");
header_default!(h_forwarded_for, "X-Forwarded-For");
header_default!(h_forwarded_proto, "X-Forwarded-Proto");
header_default!(h_via, "Via");
header_default!(h_ja4, "CloudFront-Viewer-JA4-Fingerprint");

impl Default for ViewerHeaders {
    fn default() -> Self {
        ViewerHeaders {
            address: h_address(),
            tls: h_tls(),
            http_version: h_http_version(),
            forwarded_for: h_forwarded_for(),
            forwarded_proto: h_forwarded_proto(),
            via: h_via(),
            ja4: h_ja4(),
        }
    }
}

impl ViewerHeaders {
    fn named(&self) -> Vec<(&'static str, &str)> {
        [
            ("address", &self.address),
            ("tls", &self.tls),
            ("http_version", &self.http_version),
            ("forwarded_for", &self.forwarded_for),
            ("forwarded_proto", &self.forwarded_proto),
            ("via", &self.via),
            ("ja4", &self.ja4),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// What a client may hold and how fast.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub handshake_timeout_ms: u64,
    pub request_header_timeout_ms: u64,
    pub keepalive_idle_timeout_ms: u64,
    pub max_request_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub rate_limit: Option<RateLimit>,
    /// Refuse (or delay) an IP at accept after this many failed handshakes within the window.
    pub failed_handshakes_per_ip: Option<FailedHandshakes>,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Streams an HTTP/2 client may reset before the edge accepts them, before it is sent
    /// GOAWAY (rapid reset, CVE-2023-44487).
    pub h2_max_pending_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout_ms: 10_000,
            request_header_timeout_ms: 10_000,
            keepalive_idle_timeout_ms: 60_000,
            max_request_header_bytes: 32 * 1024,
            max_connections: 0,
            max_connections_per_ip: 0,
            rate_limit: None,
            // A flood trips it at once; devices behind one NAT seldom fail 10 handshakes a
            // second, and if they do the others are served a second late, not refused.
            failed_handshakes_per_ip: Some(FailedHandshakes {
                max: 100,
                window_secs: 10,
                delay_ms: Some(1000),
            }),
            h2_max_concurrent_streams: 100,
            h2_max_pending_reset_streams: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedHandshakes {
    pub max: u32,
    pub window_secs: u64,
    /// Set: such an IP's connections wait this long before their handshake, instead of being
    /// refused.
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

/// A token bucket per device (its certificate's serial; without one, its IP address).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    /// A CEL string expression (request phase) naming the bucket, instead of the certificate's
    /// serial.
    #[serde(default)]
    pub key: Option<String>,
}

impl Limits {
    fn check(&self, ctx: &mut Report) {
        for (k, v) in [
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("request_header_timeout_ms", self.request_header_timeout_ms),
            ("keepalive_idle_timeout_ms", self.keepalive_idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                ctx.error(format!("limits.{k}"), format!("{v} is out of range 100..=3600000 ms"));
            }
        }
        if !(1024..=1_048_575).contains(&self.max_request_header_bytes) {
            ctx.error(
                "limits.max_request_header_bytes",
                format!("{} is out of range 1024..=1048575", self.max_request_header_bytes),
            );
        }
        if !(1..=1000).contains(&self.h2_max_concurrent_streams) {
            ctx.error(
                "limits.h2_max_concurrent_streams",
                format!("{} is out of range 1..=1000", self.h2_max_concurrent_streams),
            );
        }
        if let Some(f) = &self.failed_handshakes_per_ip {
            if f.max == 0 || !(1..=86_400).contains(&f.window_secs) {
                ctx.error(
                    "limits.failed_handshakes_per_ip",
                    "max must be at least 1 and window_secs in 1..=86400",
                );
            }
            if let Some(d) = f.delay_ms.filter(|d| !(1..=30_000).contains(d)) {
                ctx.error(
                    "limits.failed_handshakes_per_ip.delay_ms",
                    format!("{d} is out of range 1..=30000 ms"),
                );
            }
        }
        if let Some(r) = &self.rate_limit {
            if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) || r.burst == 0 {
                ctx.error(
                    "limits.rate_limit",
                    "requests_per_second must be above 0 and burst at least 1",
                );
            }
        }
    }
}

/// What becomes of a client request header whose name has an underscore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Underscores {
    #[default]
    Drop,
    Refuse,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: String,
    /// A file holding the bearer token every request but `GET /healthz` must carry.
    pub token_file: Option<String>,
    /// TLS with operators' client certificates.
    pub mtls: Option<AdminMtls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminMtls {
    /// The trust store (under `trust_stores`) that operators' certificates must verify against.
    pub trust_store: String,
    pub server_cert: String,
    pub server_key: String,
}

/// Reads and parses `path`, then runs the checks that need no file other than the config.
pub fn load(path: &Path) -> Result<File, ConfigErrors> {
    let mut ctx = Report::new(path);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            ctx.error("(file)", format!("cannot read: {e}"));
            return Err(ConfigErrors(ctx.errors));
        }
    };
    parse(path, &text)
}

/// Parses YAML text as if it were the file `path`.
pub fn parse(path: &Path, text: &str) -> Result<File, ConfigErrors> {
    let mut ctx = Report::new(path);
    let config: File = match serde_yaml::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            // serde_yaml puts the key path first ("listeners[0].mtls: unknown field ...").
            let msg = e.to_string();
            let (key, reason) = match msg.split_once(": ") {
                Some((k, r)) if !k.contains(' ') => (k.to_string(), r.to_string()),
                _ => ("(document)".to_string(), msg),
            };
            ctx.error(key, reason);
            return Err(ConfigErrors(ctx.errors));
        }
    };
    config.check(&mut ctx);
    ctx.finish().map(|()| config)
}

impl File {
    fn check(&self, ctx: &mut Report) {
        if self.listeners.is_empty() {
            ctx.error("listeners", "at least one listener is required");
        }
        let mut addresses = BTreeMap::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            check_addr(ctx, &format!("{key}.address"), &l.address);
            if let Some(prev) = addresses.insert(l.address.clone(), i) {
                ctx.error(
                    format!("{key}.address"),
                    format!("{} is already used by listeners[{prev}]", l.address),
                );
            }
            self.check_mtls(ctx, &format!("{key}.mtls"), &l.mtls);
            let edges_not_required = l.role == ListenerRole::Edges
                && std::iter::once(&l.mtls)
                    .chain(l.sni.iter().map(|s| &s.mtls))
                    .any(|m| m.mode != MtlsMode::Required);
            if edges_not_required {
                ctx.error(
                    format!("{key}.role"),
                    "a listener for edges must require certificates (mtls.mode: required, on every SNI too): its clients' identity headers are trusted",
                );
            }
            let mut seen = BTreeMap::new();
            for (j, s) in l.sni.iter().enumerate() {
                let skey = format!("{key}.sni[{j}]");
                if s.names.is_empty() {
                    ctx.error(format!("{skey}.names"), "at least one name is required");
                }
                for n in &s.names {
                    let n = n.to_ascii_lowercase();
                    if n.is_empty() || n.contains(':') || n.contains('/') {
                        ctx.error(format!("{skey}.names"), format!("'{n}' is not a host name"));
                    }
                    if let Some(prev) = seen.insert(n.clone(), j) {
                        ctx.error(
                            format!("{skey}.names"),
                            format!("'{n}' is already listed in {key}.sni[{prev}]"),
                        );
                    }
                }
                if s.server_cert.is_some() != s.server_key.is_some() {
                    ctx.error(format!("{skey}.server_key"), "server_cert and server_key go together");
                }
                self.check_mtls(ctx, &format!("{skey}.mtls"), &s.mtls);
            }
        }
        for (name, t) in &self.trust_stores {
            let key = format!("trust_stores.{name}");
            if t.ca_files.is_empty() {
                ctx.error(format!("{key}.ca_files"), "at least one CA file is required");
            }
            // The verifier builds paths of at most 6 intermediates.
            if !(2..=8).contains(&t.max_chain_depth) {
                ctx.error(
                    format!("{key}.max_chain_depth"),
                    format!(
                        "{} is out of range 2..=8 (certificates in the chain, leaf and root included)",
                        t.max_chain_depth
                    ),
                );
            }
        }
        for (name, o) in &self.origins {
            let key = format!("origins.{name}");
            check_addr(ctx, &format!("{key}.address"), &o.address);
            if o.sni.trim().is_empty() {
                // pingora turns certificate verification off for an empty SNI: refuse it.
                ctx.error(
                    format!("{key}.sni"),
                    "must name the origin's host: the edge verifies the origin certificate against it",
                );
            }
            if o.connect_timeout_secs == 0 || o.read_timeout_secs == 0 {
                ctx.error(key.as_str(), "timeouts must be at least 1 second");
            }
        }
        if self.routes.is_empty() {
            ctx.error("routes", "at least one route is required");
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !r.path_prefix.starts_with('/') {
                ctx.error(format!("{key}.path_prefix"), "must start with '/'");
            }
            if r.cache.is_some() && self.cache.is_none() {
                ctx.error(
                    format!("{key}.cache"),
                    "route caching needs the top-level cache section",
                );
            }
            if !self.origins.contains_key(&r.origin) {
                ctx.error(
                    format!("{key}.origin"),
                    format!("unknown origin '{}' (defined: {})", r.origin, names(&self.origins)),
                );
            }
        }
        if let Some(s) = &self.shield {
            self.check_shield(ctx, s);
        }
        self.identity_headers.check(&self.viewer_headers, ctx);
        self.limits.check(ctx);
        if let Some(a) = &self.admin {
            check_addr(ctx, "admin.address", &a.address);
            let open = a.token_file.is_none() && a.mtls.is_none();
            if open && a.address.parse::<SocketAddr>().is_ok_and(|s| !s.ip().is_loopback()) {
                ctx.error(
                    "admin.address",
                    format!(
                        "'{}' is not a loopback address: the admin listener reloads and purges, so set admin.mtls (operators' client certificates) or admin.token_file (a bearer token), or bind it to 127.0.0.1",
                        a.address
                    ),
                );
            }
            if let Some(m) = &a.mtls {
                if !self.trust_stores.contains_key(&m.trust_store) {
                    ctx.error(
                        "admin.mtls.trust_store",
                        format!("unknown trust store '{}' (defined: {})", m.trust_store, names(&self.trust_stores)),
                    );
                }
            }
        }
        if self.reload.watch_interval_ms < 10 {
            ctx.error("reload.watch_interval_ms", "must be at least 10");
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.logging.level.as_str()) {
            ctx.error(
                "logging.level",
                format!("'{}' is not one of error, warn, info, debug, trace", self.logging.level),
            );
        }
        if let Some(c) = &self.cache {
            if c.max_bytes == 0 {
                ctx.error("cache.max_bytes", "must be more than 0");
            }
            if c.max_object_bytes == 0 || c.max_object_bytes > c.filling_bytes() {
                ctx.error(
                    "cache.max_object_bytes",
                    "must be more than 0 and at most cache.max_filling_bytes (an object fills before it is stored)",
                );
            }
            if c.filling_bytes() >= c.max_bytes {
                ctx.error(
                    "cache.max_filling_bytes",
                    format!(
                        "{} leaves nothing of cache.max_bytes ({}) for stored objects; lower it or max_object_bytes",
                        c.filling_bytes(),
                        c.max_bytes
                    ),
                );
            }
            if let Some(d) = &c.disk {
                if d.path.is_empty() {
                    ctx.error("cache.disk.path", "must name a directory");
                }
                if d.max_bytes == 0 {
                    ctx.error("cache.disk.max_bytes", "must be more than 0");
                }
                if d.object_limit() == 0 || d.object_limit() > d.max_bytes {
                    ctx.error(
                        "cache.disk.max_object_bytes",
                        "must be more than 0 and at most cache.disk.max_bytes",
                    );
                }
                if !(1..=1024).contains(&d.io_threads) {
                    ctx.error("cache.disk.io_threads", "must be between 1 and 1024");
                }
            }
        }
    }

    fn check_shield(&self, ctx: &mut Report, s: &Shield) {
        if self.cache.is_none() {
            ctx.error(
                "shield",
                "needs the top-level cache section: only cache misses go to the shield",
            );
        }
        if s.nodes.is_empty() || s.nodes.len() > MAX_SHIELD_NODES {
            ctx.error(
                "shield.nodes",
                format!("between 1 and {MAX_SHIELD_NODES} nodes are required"),
            );
        }
        let (mut names, mut addresses) = (BTreeMap::new(), BTreeMap::new());
        for (i, n) in s.nodes.iter().enumerate() {
            let key = format!("shield.nodes[{i}]");
            check_addr(ctx, &format!("{key}.address"), &n.address);
            if n.name.is_empty() || self.origins.contains_key(&n.name) {
                ctx.error(
                    format!("{key}.name"),
                    format!(
                        "'{}' must be non-empty and not an origin's name (metrics and logs name peers by it)",
                        n.name
                    ),
                );
            }
            if let Some(prev) = names.insert(n.name.as_str(), i) {
                ctx.error(
                    format!("{key}.name"),
                    format!("'{}' is already used by shield.nodes[{prev}]", n.name),
                );
            }
            if let Some(prev) = addresses.insert(n.address.as_str(), i) {
                ctx.error(
                    format!("{key}.address"),
                    format!("{} is already used by shield.nodes[{prev}]", n.address),
                );
            }
        }
        if s.sni.trim().is_empty() {
            ctx.error(
                "shield.sni",
                "must name the shields' host: the edge verifies their certificates against it",
            );
        }
        if s.connect_timeout_secs == 0 || s.read_timeout_secs == 0 || s.down_secs == 0 {
            ctx.error("shield", "timeouts and down_secs must be at least 1 second");
        }
    }

    fn check_mtls(&self, ctx: &mut Report, key: &str, m: &Mtls) {
        match (&m.trust_store, m.mode) {
            (None, MtlsMode::Off) => {}
            (None, _) => ctx.error(
                format!("{key}.trust_store"),
                "required when mode is optional or required",
            ),
            (Some(t), _) if !self.trust_stores.contains_key(t) => ctx.error(
                format!("{key}.trust_store"),
                format!("unknown trust store '{t}' (defined: {})", names(&self.trust_stores)),
            ),
            _ => {}
        }
    }
}

impl IdentityHeaders {
    /// Every configured name with its config key.
    pub fn named(&self) -> Vec<(&'static str, &str)> {
        [
            ("present", &self.present),
            ("subject", &self.subject),
            ("issuer", &self.issuer),
            ("serial_number", &self.serial_number),
            ("sha256", &self.sha256),
            ("validity", &self.validity),
            ("pem", &self.pem),
            ("san_uri", &self.san_uri),
            ("san_dns", &self.san_dns),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    /// Every name valid and used once, across the identity and viewer headers.
    fn check(&self, viewer: &ViewerHeaders, ctx: &mut Report) {
        let mut seen = BTreeMap::new();
        let named = self.named().into_iter().map(|(k, v)| (format!("identity_headers.{k}"), v));
        let viewer = viewer.named().into_iter().map(|(k, v)| (format!("viewer_headers.{k}"), v));
        for (key, v) in named.chain(viewer) {
            if http::HeaderName::from_bytes(v.as_bytes()).is_err() {
                ctx.error(&key, format!("'{v}' is not a valid header name"));
            }
            if let Some(prev) = seen.insert(v.to_ascii_lowercase(), key.clone()) {
                ctx.error(key, format!("'{v}' is also used by {prev}"));
            }
        }
    }
}

/// The most shield nodes an edge can spread its misses over (a request's tried nodes are a u64).
pub const MAX_SHIELD_NODES: usize = 64;

fn check_addr(ctx: &mut Report, key: &str, a: &str) {
    if let Err(e) = a.parse::<SocketAddr>() {
        ctx.error(key, format!("'{a}' is not an IP:port address: {e}"));
    }
}

fn names<V>(m: &BTreeMap<String, V>) -> String {
    if m.is_empty() {
        "none".into()
    } else {
        m.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}
