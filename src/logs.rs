//! The edge's logs, one stream of lines: JSON (the default, what container log pipelines read)
//! or text for people, to stdout or a file. Three kinds: `event` (what the `log` crate records,
//! pingora's included), `access` (one line per request) and `connection` (a refused handshake, or
//! an open connection closed after a reload). Lines are buffered and written every 100 ms, or
//! once 64 KiB have gathered, so a request does not pay a write(2) of its own. Nothing here
//! writes a private key or a certificate's PEM.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, RwLock};
use std::time::Duration;

use crate::identity::ViewerCert;

/// How lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    /// Written line by line: for the commands that do not run the edge.
    Stderr,
    /// Appended to.
    File(PathBuf),
}

/// Where logs go and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub format: Format,
    pub output: Output,
    pub level: log::LevelFilter,
    /// One line per request.
    pub access: bool,
}

impl Settings {
    /// Text on stderr, for the commands that do not run the edge (`-t`, `rules explain`).
    pub fn stderr() -> Settings {
        Settings {
            format: Format::Text,
            output: Output::Stderr,
            level: log::LevelFilter::Info,
            access: false,
        }
    }
}

enum Out {
    Stdout,
    Stderr,
    File(std::fs::File),
}

impl Out {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Stdout => std::io::stdout().lock().write_all(b),
            Out::Stderr => std::io::stderr().lock().write_all(b),
            Out::File(f) => f.write_all(b),
        }
    }
}

struct Sink {
    format: Format,
    access: bool,
    out: Mutex<Out>,
    /// Lines not written yet.
    pending: Mutex<Vec<u8>>,
    /// Write each line at once (stderr, before the edge runs).
    unbuffered: bool,
}

const FLUSH_BYTES: usize = 64 << 10;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

static SINK: LazyLock<RwLock<Sink>> = LazyLock::new(|| {
    RwLock::new(Sink {
        format: Format::Text,
        access: false,
        out: Mutex::new(Out::Stderr),
        pending: Mutex::default(),
        unbuffered: true,
    })
});

struct Logger;

static LOGGER: Logger = Logger;

/// Installs the logger with `settings`. Called once; `configure` changes it later.
pub fn init(settings: &Settings) -> Result<(), String> {
    log::set_logger(&LOGGER).map_err(|e| e.to_string())?;
    configure(settings)?;
    std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| loop {
            std::thread::sleep(FLUSH_EVERY);
            flush();
        })
        .map_err(|e| format!("cannot start the log writer: {e}"))?;
    Ok(())
}

/// Sends logs where `settings` says, from now on (what was gathered before is written first).
pub fn configure(settings: &Settings) -> Result<(), String> {
    let out = match &settings.output {
        Output::File(path) => Out::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("logging.file: {}: {e}", path.display()))?,
        ),
        Output::Stdout => Out::Stdout,
        Output::Stderr => Out::Stderr,
    };
    flush();
    let mut sink = SINK.write().unwrap_or_else(|e| e.into_inner());
    *sink = Sink {
        format: settings.format,
        access: settings.access,
        out: Mutex::new(out),
        pending: Mutex::default(),
        unbuffered: settings.output == Output::Stderr,
    };
    // `RUST_LOG` wins over the config's level, as operators of Rust services expect.
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|l| l.parse::<log::LevelFilter>().ok())
        .unwrap_or(settings.level);
    log::set_max_level(level);
    Ok(())
}

/// Writes what has gathered.
pub fn flush() {
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner());
    let lines = std::mem::take(&mut *sink.pending.lock().unwrap_or_else(|e| e.into_inner()));
    if !lines.is_empty() {
        let mut out = sink.out.lock().unwrap_or_else(|e| e.into_inner());
        // Nowhere to report a failed log write.
        let _ = out.write_all(&lines);
    }
}

fn emit(line: Line) {
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner());
    let mut text = line.finish(sink.format);
    text.push('\n');
    if sink.unbuffered {
        let _ = sink
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(text.as_bytes());
        return;
    }
    let full = {
        let mut pending = sink.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.extend_from_slice(text.as_bytes());
        pending.len() >= FLUSH_BYTES
    };
    if full {
        drop(sink);
        flush();
    }
}

/// One line: its fields in order, rendered as JSON or text when it is written.
struct Line {
    fields: Vec<(&'static str, Value)>,
}

enum Value {
    Str(String),
    Num(f64),
    Int(i64),
    List(Vec<String>),
    Null,
}

impl Line {
    fn new(log: &'static str, level: &'static str) -> Line {
        Line {
            fields: vec![
                ("time", Value::Str(now())),
                ("level", Value::Str(level.into())),
                ("log", Value::Str(log.into())),
            ],
        }
    }

    fn str(mut self, k: &'static str, v: impl Into<String>) -> Line {
        self.fields.push((k, Value::Str(v.into())));
        self
    }

    fn opt(mut self, k: &'static str, v: Option<&str>) -> Line {
        self.fields.push((k, v.map_or(Value::Null, |v| Value::Str(v.into()))));
        self
    }

    fn int(mut self, k: &'static str, v: i64) -> Line {
        self.fields.push((k, Value::Int(v)));
        self
    }

    fn num(mut self, k: &'static str, v: f64) -> Line {
        self.fields.push((k, Value::Num(v)));
        self
    }

    fn list(mut self, k: &'static str, v: Vec<String>) -> Line {
        self.fields.push((k, Value::List(v)));
        self
    }

    fn finish(self, format: Format) -> String {
        let mut s = String::with_capacity(256);
        match format {
            Format::Json => {
                s.push('{');
                for (i, (k, v)) in self.fields.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    json_str(&mut s, k);
                    s.push(':');
                    match v {
                        Value::Str(v) => json_str(&mut s, v),
                        Value::Num(n) => {
                            let _ = write!(s, "{n:.3}");
                        }
                        Value::Int(n) => {
                            let _ = write!(s, "{n}");
                        }
                        Value::List(items) => {
                            s.push('[');
                            for (j, item) in items.iter().enumerate() {
                                if j > 0 {
                                    s.push(',');
                                }
                                json_str(&mut s, item);
                            }
                            s.push(']');
                        }
                        Value::Null => s.push_str("null"),
                    }
                }
                s.push('}');
            }
            Format::Text => {
                for (i, (k, v)) in self.fields.iter().enumerate() {
                    if i > 0 {
                        s.push(' ');
                    }
                    // time, level and the kind lead the line bare.
                    if i >= 3 {
                        let _ = write!(s, "{k}=");
                    }
                    match v {
                        Value::Str(v) if i < 3 => s.push_str(v),
                        Value::Str(v) => text_str(&mut s, v),
                        Value::Num(n) => {
                            let _ = write!(s, "{n:.3}");
                        }
                        Value::Int(n) => {
                            let _ = write!(s, "{n}");
                        }
                        Value::List(items) => text_str(&mut s, &items.join(",")),
                        Value::Null => s.push('-'),
                    }
                }
            }
        }
        s
    }
}

/// `v` as a JSON string.
pub fn json(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    json_str(&mut s, v);
    s
}

/// A JSON string (RFC 8259): quotes, backslashes and control characters escaped.
fn json_str(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// A text value: bare when it has no space, quote or control character, else quoted as JSON.
fn text_str(s: &mut String, v: &str) {
    let bare = !v.is_empty() && !v.chars().any(|c| c == ' ' || c == '"' || c == '=' || c.is_control());
    if bare {
        s.push_str(v);
    } else {
        json_str(s, v);
    }
}

/// The time now, RFC 3339 UTC with milliseconds.
fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        // pingora logs every failed handshake as an error. For an mTLS edge a refused handshake
        // is routine, and its `connection` line says why: pingora's is kept for the peer
        // address it names, as info.
        let routine =
            record.target() == "pingora_core::services::listening" && msg.starts_with("Downstream handshake error");
        let level = match record.level() {
            log::Level::Error if routine => "info",
            log::Level::Error => "error",
            log::Level::Warn => "warn",
            log::Level::Info => "info",
            log::Level::Debug => "debug",
            log::Level::Trace => "trace",
        };
        emit(
            Line::new("event", level)
                .str("target", record.target())
                .str("msg", record.args().to_string()),
        );
    }

    fn flush(&self) {
        flush();
    }
}

/// A refused handshake, or an open connection closed after a reload.
pub struct ConnectionEvent<'a> {
    /// `refused` (in its handshake, or by the rules right after it) or `closed` (after a reload).
    pub event: &'static str,
    pub listener: &'a str,
    pub sni: Option<&'a str>,
    /// Unknown in the handshake: pingora 0.9's TLS callbacks do not see the socket.
    pub client_ip: Option<&'a str>,
    /// In the vocabulary of `mtls_edge_handshakes_total` (`reason::Refusal`).
    pub reason: &'static str,
    pub detail: &'a str,
    /// The client's certificate, when it verified.
    pub cert: Option<&'a ViewerCert>,
    pub tls_version: Option<&'a str>,
}

pub fn connection(e: &ConnectionEvent) {
    emit(
        Line::new("connection", "info")
            .str("event", e.event)
            .str("listener", e.listener)
            .opt("sni", e.sni)
            .opt("client_ip", e.client_ip)
            .str("reason", e.reason)
            .str("detail", e.detail)
            .opt("cert_serial", e.cert.map(|c| c.serial.as_str()))
            .opt("cert_subject", e.cert.map(|c| c.subject.as_str()))
            .opt("tls_version", e.tls_version),
    );
}

/// One request, when its last byte has been sent.
pub struct AccessEvent<'a> {
    pub listener: &'a str,
    pub client_ip: &'a str,
    pub sni: Option<&'a str>,
    pub cert: Option<&'a ViewerCert>,
    pub protocol: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_sent: u64,
    pub cache: Option<&'static str>,
    pub origin: Option<&'a str>,
    /// Origin request to response header, in seconds.
    pub origin_seconds: Option<f64>,
    pub seconds: f64,
    /// The rules whose actions applied, in order.
    pub rules: Vec<String>,
    /// Why the edge answered itself, if it did (`reason::Answered`).
    pub answered: Option<&'static str>,
}

/// Whether access lines are written at all (to spare building them).
pub fn access_enabled() -> bool {
    SINK.read().is_ok_and(|s| s.access)
}

pub fn access(e: &AccessEvent) {
    let mut line = Line::new("access", "info")
        .str("listener", e.listener)
        .str("client_ip", e.client_ip)
        .opt("sni", e.sni)
        .opt("cert_serial", e.cert.map(|c| c.serial.as_str()))
        .opt("cert_subject", e.cert.map(|c| c.subject.as_str()))
        .str("protocol", e.protocol)
        .str("method", e.method)
        .str("host", e.host)
        .str("path", e.path)
        .int("status", i64::from(e.status))
        .int("bytes_sent", i64::try_from(e.bytes_sent).unwrap_or(i64::MAX))
        .opt("cache", e.cache)
        .opt("origin", e.origin);
    line = match e.origin_seconds {
        Some(s) => line.num("origin_ms", s * 1000.0),
        None => line.opt("origin_ms", None),
    };
    emit(
        line.num("duration_ms", e.seconds * 1000.0)
            .list("rules", e.rules.clone())
            .opt("answered", e.answered),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_escape_what_json_needs_and_text_quotes_what_has_spaces() {
        let line = || {
            Line {
                fields: vec![
                    ("time", Value::Str("t".into())),
                    ("level", Value::Str("info".into())),
                    ("log", Value::Str("access".into())),
                ],
            }
            .str("path", "/a \"b\"\n\\c\u{1}")
            .int("status", 200)
            .num("ms", 1.5)
            .opt("none", None)
            .list("rules", vec!["a".into(), "b c".into()])
        };
        assert_eq!(
            line().finish(Format::Json),
            r#"{"time":"t","level":"info","log":"access","path":"/a \"b\"\n\\c\u0001","status":200,"ms":1.500,"none":null,"rules":["a","b c"]}"#
        );
        assert_eq!(
            line().finish(Format::Text),
            r#"t info access path="/a \"b\"\n\\c\u0001" status=200 ms=1.500 none=- rules="a,b c""#
        );
    }
}
