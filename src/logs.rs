//! The edge's logs, one stream of lines: JSON (the default, what container log pipelines read)
//! or text for people, to stdout or a file. Three kinds: `event` (what the `log` crate records,
//! pingora's included), `access` (one line per request) and `connection` (a refused handshake, or
//! an open connection closed after a reload). Lines are buffered and written every 100 ms, or
//! once 64 KiB have gathered, so a request does not pay a write(2) of its own. Nothing here
//! writes a private key or a certificate's PEM.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::identity::ViewerCert;
use crate::reason::Refusal;

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
/// Room for an access line with its connection's fields (about 450 bytes), so it is not regrown.
const LINE_BYTES: usize = 768;
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
    let lines = {
        let mut pending = sink.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_empty() {
            return;
        }
        // Room for a full buffer's lines, so that gathering them never copies what is in.
        std::mem::replace(&mut *pending, Vec::with_capacity(FLUSH_BYTES + LINE_BYTES))
    };
    let mut out = sink.out.lock().unwrap_or_else(|e| e.into_inner());
    // Nowhere to report a failed log write.
    let _ = out.write_all(&lines);
}

fn emit(line: Line) {
    let mut text = line.finish();
    text.push('\n');
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner());
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

/// One line, written field by field as it is built: JSON, or text with `key=value`.
struct Line {
    s: String,
    format: Format,
}

impl Line {
    fn new(log: &'static str, level: &'static str) -> Line {
        let format = SINK.read().map_or(Format::Json, |s| s.format);
        Line::with_format(format, log, level)
    }

    fn with_format(format: Format, log: &'static str, level: &'static str) -> Line {
        let mut s = String::with_capacity(LINE_BYTES);
        match format {
            Format::Json => {
                s.push_str("{\"time\":\"");
                now(&mut s);
                for part in ["\",\"level\":\"", level, "\",\"log\":\"", log, "\""] {
                    s.push_str(part);
                }
            }
            Format::Text => {
                now(&mut s);
                for part in [" ", level, " ", log] {
                    s.push_str(part);
                }
            }
        }
        Line { s, format }
    }

    /// The separator and key of the next field.
    fn key(&mut self, k: &str) {
        match self.format {
            Format::Json => {
                self.s.push_str(",\"");
                self.s.push_str(k);
                self.s.push_str("\":");
            }
            Format::Text => {
                self.s.push(' ');
                self.s.push_str(k);
                self.s.push('=');
            }
        }
    }

    /// Fields rendered before, in this line's format.
    fn fields(mut self, rendered: &str) -> Line {
        self.s.push_str(rendered);
        self
    }

    fn str(mut self, k: &'static str, v: &str) -> Line {
        self.key(k);
        match self.format {
            Format::Json => json_str(&mut self.s, v),
            Format::Text => text_str(&mut self.s, v),
        }
        self
    }

    fn opt(mut self, k: &'static str, v: Option<&str>) -> Line {
        match v {
            Some(v) => self.str(k, v),
            None => {
                self.key(k);
                self.s.push_str(if self.format == Format::Json { "null" } else { "-" });
                self
            }
        }
    }

    fn int(mut self, k: &'static str, v: i64) -> Line {
        self.key(k);
        self.s.push_str(itoa::Buffer::new().format(v));
        self
    }

    /// `v` with three decimals, from its thousandths (a float's own formatting costs more than
    /// the rest of the line).
    fn num(mut self, k: &'static str, v: f64) -> Line {
        self.key(k);
        let thousandths = (v * 1000.0).round() as i64;
        if thousandths < 0 {
            self.s.push('-');
        }
        let t = thousandths.unsigned_abs();
        self.s.push_str(itoa::Buffer::new().format(t / 1000));
        self.s.push('.');
        let frac = t % 1000;
        for d in [frac / 100, frac / 10 % 10, frac % 10] {
            self.s.push(char::from(b'0' + d as u8));
        }
        self
    }

    fn list<'i>(mut self, k: &'static str, items: impl Iterator<Item = &'i str>) -> Line {
        self.key(k);
        match self.format {
            Format::Json => {
                self.s.push('[');
                for (j, item) in items.enumerate() {
                    if j > 0 {
                        self.s.push(',');
                    }
                    json_str(&mut self.s, item);
                }
                self.s.push(']');
            }
            Format::Text => text_str(&mut self.s, &items.collect::<Vec<_>>().join(",")),
        }
        self
    }

    fn finish(mut self) -> String {
        if self.format == Format::Json {
            self.s.push('}');
        }
        self.s
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
    // Runs of characters that need no escape are copied whole.
    let mut start = 0;
    for (i, b) in v.bytes().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        s.push_str(&v[start..i]);
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            b => {
                let _ = write!(s, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    s.push_str(&v[start..]);
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
fn now(s: &mut String) {
    time_at(s, SystemTime::now());
}

thread_local! {
    /// The last second rendered on this thread, and its `YYYY-MM-DDTHH:MM:SS.`: a worker writes
    /// many lines a second, and the date only changes once a second.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

fn time_at(s: &mut String, at: SystemTime) {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let prefix = SECOND.with(|c| {
        let (second, prefix) = c.get();
        if second == secs {
            return prefix;
        }
        let prefix = second_prefix(secs);
        c.set((secs, prefix));
        prefix
    });
    let mut ms = *b"000Z";
    put_digits(&mut ms[..3], since.subsec_millis());
    for part in [&prefix[..], &ms[..]] {
        s.push_str(std::str::from_utf8(part).unwrap_or_default()); // ASCII digits and separators
    }
}

fn second_prefix(secs: u64) -> [u8; 20] {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = *b"0000-00-00T00:00:00.";
    put_digits(&mut out[0..4], u32::try_from(t.year()).unwrap_or(0));
    put_digits(&mut out[5..7], u32::from(u8::from(t.month())));
    put_digits(&mut out[8..10], u32::from(t.day()));
    put_digits(&mut out[11..13], u32::from(t.hour()));
    put_digits(&mut out[14..16], u32::from(t.minute()));
    put_digits(&mut out[17..19], u32::from(t.second()));
    out
}

/// `v`'s last `out.len()` decimal digits, with leading zeros.
fn put_digits(out: &mut [u8], mut v: u32) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
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
                .str("msg", &msg),
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
    /// As `mtls_edge_handshakes_total` names it.
    pub reason: Refusal,
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
            .str("reason", e.reason.as_str())
            .str("detail", e.detail)
            .opt("cert_serial", e.cert.map(|c| c.serial.as_str()))
            .opt("cert_subject", e.cert.map(|c| c.subject.as_str()))
            .opt("tls_version", e.tls_version),
    );
}

/// The fields of a connection that each of its access lines carries, rendered once per
/// connection in the format in force (a reload cannot change the logging settings).
pub struct ConnectionFields(String);

impl ConnectionFields {
    pub fn new(listener: &str, client_ip: &str, sni: Option<&str>, cert: Option<&ViewerCert>) -> ConnectionFields {
        let format = SINK.read().map_or(Format::Json, |s| s.format);
        ConnectionFields::with_format(format, listener, client_ip, sni, cert)
    }

    fn with_format(
        format: Format,
        listener: &str,
        client_ip: &str,
        sni: Option<&str>,
        cert: Option<&ViewerCert>,
    ) -> ConnectionFields {
        let line = Line {
            s: String::with_capacity(160),
            format,
        }
        .str("listener", listener)
        .str("client_ip", client_ip)
        .opt("sni", sni)
        .opt("cert_serial", cert.map(|c| c.serial.as_str()))
        .opt("cert_subject", cert.map(|c| c.subject.as_str()));
        ConnectionFields(line.s)
    }
}

/// One request, when its last byte has been sent.
pub struct AccessEvent<'a> {
    /// Listener, client address, SNI and certificate.
    pub connection: &'a ConnectionFields,
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
    pub rules: Vec<&'a str>,
    /// Why the edge answered itself, if it did (`reason::Answered`).
    pub answered: Option<&'static str>,
}

/// Whether access lines are written at all (to spare building them).
pub fn access_enabled() -> bool {
    SINK.read().is_ok_and(|s| s.access)
}

pub fn access(e: &AccessEvent) {
    let mut line = Line::new("access", "info")
        .fields(&e.connection.0)
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
            .list("rules", e.rules.iter().copied())
            .opt("answered", e.answered),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds_across_a_second_and_a_year() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let render = |ms| {
            let mut s = String::new();
            time_at(&mut s, at(ms));
            s
        };
        // The second's prefix is rendered once and then reused on this thread.
        assert_eq!(render(1_767_225_599_007), "2025-12-31T23:59:59.007Z");
        assert_eq!(render(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
        assert_eq!(render(1_767_225_600_000), "2026-01-01T00:00:00.000Z");
        assert_eq!(render(1_767_225_599_500), "2025-12-31T23:59:59.500Z");
        assert_eq!(render(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn json_lines_escape_what_json_needs_and_text_quotes_what_has_spaces() {
        let line = |format| {
            Line::with_format(format, "access", "info")
                .str("path", "/a \"b\"\n\\c\u{1}")
                .int("status", 200)
                .num("ms", 1.5)
                .opt("none", None)
                .list("rules", ["a", "b c"].into_iter())
                .finish()
        };
        // The time leads the line: 2026-12-01T20:10:52.123Z is 24 characters.
        let json = line(Format::Json);
        assert_eq!(&json[..9], r#"{"time":""#);
        assert_eq!(
            &json[33..],
            r#"","level":"info","log":"access","path":"/a \"b\"\n\\c\u0001","status":200,"ms":1.500,"none":null,"rules":["a","b c"]}"#
        );
        let text = line(Format::Text);
        assert_eq!(
            &text[24..],
            r#" info access path="/a \"b\"\n\\c\u0001" status=200 ms=1.500 none=- rules="a,b c""#
        );
    }

    #[test]
    fn a_connections_fields_are_rendered_once_in_the_lines_format() {
        let line = |format| {
            let c = ConnectionFields::with_format(format, "127.0.0.1:8443", "10.0.0.7", Some("fw \"a\""), None);
            let l = Line::with_format(format, "access", "info").fields(&c.0).int("status", 200).finish();
            l[l.find("listener").map_or(0, |i| i - 1)..].to_string()
        };
        assert_eq!(
            line(Format::Json),
            r#""listener":"127.0.0.1:8443","client_ip":"10.0.0.7","sni":"fw \"a\"","cert_serial":null,"cert_subject":null,"status":200}"#
        );
        assert_eq!(
            line(Format::Text),
            r#" listener=127.0.0.1:8443 client_ip=10.0.0.7 sni="fw \"a\"" cert_serial=- cert_subject=- status=200"#
        );
    }
}
