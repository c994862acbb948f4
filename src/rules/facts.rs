//! What a rule condition can see: one [`Facts`] per evaluation, borrowed from the connection and
//! the request (building it allocates nothing). Condition trees read its fields directly; for
//! the cel interpreter it answers variables as CEL values (`client`, `connection`, `request`,
//! `lists`, `now`), built on demand. [`SCHEMA`] lists every field, so that a misspelt one fails
//! at load.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use cel::common::traits::Indexer;
use cel::common::types::{CelBool, CelInt, CelList, CelString, CelTimestamp, Type};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::ExecutionError;
use chrono::{DateTime, FixedOffset};

use super::lists::Lists;
pub use crate::identity::ConnectionInfo;
use crate::identity::{NameParts, ViewerCert};

/// Every field path a condition may name. `*` stands for any name (a header, a list).
pub const SCHEMA: &[&str] = &[
    "client.cert.present",
    "client.cert.verified",
    "client.cert.subject.dn",
    "client.cert.subject.cn",
    "client.cert.subject.o",
    "client.cert.subject.ou",
    "client.cert.issuer.dn",
    "client.cert.issuer.cn",
    "client.cert.issuer.o",
    "client.cert.issuer.ou",
    "client.cert.serial",
    "client.cert.sha256",
    "client.cert.san.dns",
    "client.cert.san.uri",
    "client.cert.san.email",
    "client.cert.san.ip",
    "client.cert.not_before",
    "client.cert.not_after",
    "client.cert.days_until_expiry",
    "connection.client_ip",
    "connection.sni",
    "connection.tls_version",
    "connection.alpn",
    "connection.ja4",
    "request.method",
    "request.host",
    "request.path",
    "request.query",
    "request.headers.*",
    "lists.*",
    "now",
];

/// The parts of a request rules see.
pub struct RequestInfo<'v> {
    pub method: &'v str,
    pub host: &'v str,
    pub path: &'v str,
    pub query: &'v str,
    pub headers: &'v http::HeaderMap,
}

impl<'v> RequestInfo<'v> {
    /// A request header as rules read it: `""` when absent, several values joined with `, `,
    /// bytes that are not UTF-8 replaced (so a condition on a header cannot be dodged by making
    /// its value unreadable).
    pub fn header(&self, name: &http::HeaderName) -> Cow<'v, str> {
        // A request has a few headers: comparing names beats hashing this one.
        let mut values = self.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v);
        match (values.next(), values.next()) {
            (None, _) => Cow::Borrowed(""),
            (Some(one), None) => text(one),
            (Some(a), Some(b)) => Cow::Owned(
                [a, b]
                    .into_iter()
                    .chain(values)
                    .map(text)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
    }
}

fn text(v: &http::HeaderValue) -> Cow<'_, str> {
    v.to_str()
        .map_or_else(|_| String::from_utf8_lossy(v.as_bytes()), Cow::Borrowed)
}

/// The variables of one evaluation.
pub struct Facts<'a> {
    /// The certificate the handshake verified, if the client sent one.
    pub cert: Option<&'a ViewerCert>,
    /// False only where a certificate was not checked against a trust store (`rules explain` of
    /// one that does not verify).
    pub verified: bool,
    pub connection: &'a ConnectionInfo,
    /// Empty during the handshake.
    pub client_ip: &'a str,
    /// `None` in the connection phase.
    pub request: Option<&'a RequestInfo<'a>>,
    pub lists: &'a Lists,
    /// Unix seconds.
    pub now: i64,
}

/// A string field of the facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrField {
    SubjectDn,
    SubjectCn,
    SubjectO,
    SubjectOu,
    IssuerDn,
    IssuerCn,
    IssuerO,
    IssuerOu,
    Serial,
    Sha256,
    ClientIp,
    Sni,
    TlsVersion,
    Alpn,
    Ja4,
    Method,
    Host,
    Path,
    Query,
}

impl StrField {
    /// The field a path names, if it is a string field.
    pub fn of(path: &[&str]) -> Option<StrField> {
        use StrField::*;
        Some(match path {
            ["client", "cert", "subject", "dn"] => SubjectDn,
            ["client", "cert", "subject", "cn"] => SubjectCn,
            ["client", "cert", "subject", "o"] => SubjectO,
            ["client", "cert", "subject", "ou"] => SubjectOu,
            ["client", "cert", "issuer", "dn"] => IssuerDn,
            ["client", "cert", "issuer", "cn"] => IssuerCn,
            ["client", "cert", "issuer", "o"] => IssuerO,
            ["client", "cert", "issuer", "ou"] => IssuerOu,
            ["client", "cert", "serial"] => Serial,
            ["client", "cert", "sha256"] => Sha256,
            ["connection", "client_ip"] => ClientIp,
            ["connection", "sni"] => Sni,
            ["connection", "tls_version"] => TlsVersion,
            ["connection", "alpn"] => Alpn,
            ["connection", "ja4"] => Ja4,
            ["request", "method"] => Method,
            ["request", "host"] => Host,
            ["request", "path"] => Path,
            ["request", "query"] => Query,
            _ => return None,
        })
    }
}

/// One of the certificate's SAN lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sans {
    Dns,
    Uri,
    Email,
    Ip,
}

impl Sans {
    pub fn of(kind: &str) -> Option<Sans> {
        Some(match kind {
            "dns" => Sans::Dns,
            "uri" => Sans::Uri,
            "email" => Sans::Email,
            "ip" => Sans::Ip,
            _ => return None,
        })
    }
}

impl<'a> Facts<'a> {
    pub fn str_field(&self, field: StrField) -> &'a str {
        use StrField::*;
        let name = |part: fn(&'a NameParts) -> &'a str, of: fn(&'a ViewerCert) -> &'a NameParts| {
            self.cert.map_or("", |c| part(of(c)))
        };
        let request = |get: fn(&RequestInfo<'a>) -> &'a str| self.request.map_or("", get);
        match field {
            SubjectDn => self.cert.map_or("", |c| &c.subject),
            SubjectCn => name(|p| &p.cn, |c| &c.subject_parts),
            SubjectO => name(|p| &p.o, |c| &c.subject_parts),
            SubjectOu => name(|p| &p.ou, |c| &c.subject_parts),
            IssuerDn => self.cert.map_or("", |c| &c.issuer),
            IssuerCn => name(|p| &p.cn, |c| &c.issuer_parts),
            IssuerO => name(|p| &p.o, |c| &c.issuer_parts),
            IssuerOu => name(|p| &p.ou, |c| &c.issuer_parts),
            Serial => self.cert.map_or("", |c| &c.serial_hex),
            Sha256 => self.cert.map_or("", |c| &c.sha256),
            ClientIp => self.client_ip,
            Sni => &self.connection.sni,
            TlsVersion => &self.connection.tls_version,
            Alpn => &self.connection.alpn,
            Ja4 => &self.connection.ja4,
            Method => request(|r| r.method),
            Host => request(|r| r.host),
            Path => request(|r| r.path),
            Query => request(|r| r.query),
        }
    }

    pub fn sans(&self, kind: Sans) -> &'a [String] {
        let Some(c) = self.cert else { return &[] };
        match kind {
            Sans::Dns => &c.san_dns,
            Sans::Uri => &c.san_uri,
            Sans::Email => &c.san_email,
            Sans::Ip => &c.san_ip,
        }
    }

    /// Whole days until the certificate expires (negative once it has); 0 without one.
    pub fn days_until_expiry(&self) -> i64 {
        self.cert.map_or(0, |c| (c.not_after - self.now).div_euclid(86_400))
    }

    /// A `client.cert.*` leaf as a CEL value.
    fn client_leaf(&self, name: &str) -> Option<Box<dyn Val + 'a>> {
        let path: Vec<&str> = name.split('.').collect();
        if let Some(field) = StrField::of(&path) {
            return Some(string(self.str_field(field)));
        }
        Some(match name {
            "client.cert.present" => Box::new(CelBool::from(self.cert.is_some())),
            "client.cert.verified" => Box::new(CelBool::from(self.cert.is_some() && self.verified)),
            "client.cert.not_before" => timestamp(self.cert.map_or(0, |c| c.not_before)),
            "client.cert.not_after" => timestamp(self.cert.map_or(0, |c| c.not_after)),
            "client.cert.days_until_expiry" => Box::new(CelInt::from(self.days_until_expiry())),
            _ => {
                let sans = Sans::of(name.strip_prefix("client.cert.san.")?)?;
                let items = self.sans(sans).iter().map(|s| string(s.as_str())).collect::<Vec<_>>();
                Box::new(CelList::from(items))
            }
        })
    }

    /// `client` or one of its objects (`client.cert`, `client.cert.subject`...) as a record of
    /// the leaves below it.
    fn client_record(&self, prefix: &str) -> Option<Box<dyn Val + 'a>> {
        let below: Vec<Field<'a>> = SCHEMA
            .iter()
            .filter_map(|leaf| {
                let rest = leaf.strip_prefix(prefix)?.strip_prefix('.')?;
                Some((rest.split('.').collect(), self.client_leaf(leaf)?))
            })
            .collect();
        (!below.is_empty()).then(|| nest(below))
    }

    fn connection_record(&self) -> Box<dyn Val + 'a> {
        Box::new(Record(vec![
            ("client_ip", string(self.client_ip)),
            ("sni", string(self.connection.sni.as_str())),
            ("tls_version", string(self.connection.tls_version.as_str())),
            ("alpn", string(self.connection.alpn.as_str())),
            ("ja4", string(self.connection.ja4.as_str())),
        ]))
    }
}

fn string<'v>(s: &'v str) -> Box<dyn Val + 'v> {
    Box::new(CelString::from(s))
}

fn timestamp(unix: i64) -> Box<dyn Val> {
    Box::new(CelTimestamp::from(to_datetime(unix)))
}

/// The current unix time, in seconds. On Linux from the kernel's coarse clock: rules compare
/// whole seconds, and it is read from the vDSO without the hardware counter.
pub fn unix_now() -> i64 {
    #[cfg(target_os = "linux")]
    if let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE) {
        #[allow(clippy::useless_conversion)] // time_t is 32 bits on some targets
        return i64::from(t.tv_sec());
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub fn to_datetime(unix: i64) -> DateTime<FixedOffset> {
    DateTime::from_timestamp(unix, 0).unwrap_or_default().fixed_offset()
}

static RECORD_TYPE: LazyLock<Type> = LazyLock::new(|| Type::new_opaque_type("mtls_edge.record"));

/// An object with named fields (`client.cert.subject`, `request`...).
#[derive(Debug)]
struct Record<'v>(Vec<(&'static str, Box<dyn Val + 'v>)>);

impl Val for Record<'_> {
    indexed_val!(RECORD_TYPE);

    fn clone_as_boxed<'w>(&self) -> Box<dyn Val + 'w>
    where
        Self: 'w,
    {
        Box::new(Record(self.0.iter().map(|(k, v)| (*k, v.clone_as_boxed())).collect()))
    }
}

fn key_name(idx: &dyn Val) -> Result<&str, ExecutionError> {
    idx.downcast_ref::<CelString>()
        .map(|s| s.inner())
        .ok_or_else(|| ExecutionError::UnexpectedType {
            got: idx.get_type().name().to_owned(),
            want: "string".to_owned(),
        })
}

impl Indexer for Record<'_> {
    fn get<'b, 'w>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'w>, ExecutionError>
    where
        Self: 'w,
    {
        let name = key_name(idx)?;
        match self.0.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => Ok(CowVal::Borrowed(v.as_ref())),
            None => Err(ExecutionError::NoSuchKey(Arc::new(name.to_string()))),
        }
    }

    steal_via_get!();
}

/// A value and its path below the record being built.
type Field<'v> = (Vec<&'static str>, Box<dyn Val + 'v>);

/// Nests values by path (`["cert", "subject", "cn"]`) into records.
fn nest<'v>(fields: Vec<Field<'v>>) -> Box<dyn Val + 'v> {
    let mut groups: Vec<(&'static str, Vec<Field<'v>>)> = Vec::new();
    for (mut path, value) in fields {
        if path.is_empty() {
            continue;
        }
        let head = path.remove(0);
        match groups.iter_mut().find(|(h, _)| *h == head) {
            Some((_, g)) => g.push((path, value)),
            None => groups.push((head, vec![(path, value)])),
        }
    }
    let record = groups
        .into_iter()
        .map(
            |(head, mut group)| match (group.len() == 1 && group[0].0.is_empty(), group.pop()) {
                (true, Some((_, v))) => (head, v),
                (_, last) => {
                    group.extend(last);
                    (head, nest(group))
                }
            },
        )
        .collect();
    Box::new(Record(record))
}

/// Request headers by lowercase name, as [`RequestInfo::header`] reads them.
#[derive(Clone, Copy)]
struct Headers<'v>(&'v RequestInfo<'v>);

impl std::fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Headers")
    }
}

impl Val for Headers<'_> {
    indexed_val!(RECORD_TYPE);

    fn clone_as_boxed<'w>(&self) -> Box<dyn Val + 'w>
    where
        Self: 'w,
    {
        Box::new(*self)
    }
}

impl<'v> Indexer for Headers<'v> {
    fn get<'b, 'w>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'w>, ExecutionError>
    where
        Self: 'w,
    {
        let request: &'v RequestInfo<'v> = self.0;
        let name = http::HeaderName::from_bytes(key_name(idx)?.to_ascii_lowercase().as_bytes());
        let value = name.map_or(Cow::Borrowed(""), |n| request.header(&n));
        let value: CelString<'w> = CelString::from(value);
        Ok(CowVal::owned(value))
    }

    steal_via_get!();
}

fn request_record<'v>(r: &'v RequestInfo<'v>) -> Box<dyn Val + 'v> {
    Box::new(Record(vec![
        ("method", string(r.method)),
        ("host", string(r.host)),
        ("path", string(r.path)),
        ("query", string(r.query)),
        ("headers", Box::new(Headers(r))),
    ]))
}

impl VariableResolver for Facts<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        // The interpreter asks for a dotted name whole first, then ever shorter prefixes.
        if name.starts_with("client") {
            let value = match self.client_leaf(name) {
                Some(v) => v,
                None => self.client_record(name)?,
            };
            return Some(CowVal::Owned(value));
        }
        if let Some(field) = name.strip_prefix("request") {
            let r = self.request?;
            return Some(CowVal::Owned(match field {
                "" => request_record(r),
                ".headers" => Box::new(Headers(r)),
                _ => string(self.str_field(StrField::of(&name.split('.').collect::<Vec<_>>())?)),
            }));
        }
        if let Some(field) = name.strip_prefix("connection") {
            return Some(CowVal::Owned(match field {
                "" => self.connection_record(),
                _ => string(self.str_field(StrField::of(&name.split('.').collect::<Vec<_>>())?)),
            }));
        }
        match name {
            "lists" => Some(CowVal::Borrowed(self.lists)),
            "now" => Some(CowVal::Owned(timestamp(self.now))),
            _ => self
                .lists
                .get_list(name.strip_prefix("lists.")?)
                .map(|l| CowVal::Borrowed(l as &dyn Val)),
        }
    }
}

/// A certificate with every field set, to type-check expressions at load.
pub fn sample_cert() -> ViewerCert {
    let parts = NameParts {
        cn: "device-0001".into(),
        o: "Example".into(),
        ou: "x1".into(),
    };
    let one = |s: &str| vec![s.to_string()];
    ViewerCert {
        subject: "CN=device-0001,OU=x1,O=Example".into(),
        issuer: "CN=Device CA,O=Example".into(),
        serial: "0a:1b".into(),
        serial_hex: "a1b".into(),
        sha256: "00".repeat(32),
        not_before: 0,
        not_after: 86_400 * 365,
        san_dns: one("device-0001.example"),
        san_uri: one("spiffe://example/device-0001"),
        san_email: one("device@example.com"),
        san_ip: one("192.0.2.1"),
        subject_parts: parts.clone(),
        issuer_parts: parts,
        ..ViewerCert::default()
    }
}
