//! What a rule condition can see, as CEL values: `client` (the verified certificate, built once
//! per connection), `connection`, `request` (borrowed from the request, not copied), `lists`
//! and `now`. [`SCHEMA`] lists every field, so that a misspelt one fails at load.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use cel::common::traits::Indexer;
use cel::common::types::{CelBool, CelInt, CelList, CelString, CelTimestamp, Type};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::ExecutionError;
use chrono::{DateTime, FixedOffset};

use super::lists::{normalize_serial, Lists};
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
    "request.method",
    "request.host",
    "request.path",
    "request.query",
    "request.headers.*",
    "lists.*",
    "now",
];

static RECORD_TYPE: LazyLock<Type> = LazyLock::new(|| Type::new_opaque_type("mtls_edge.record"));

/// An object with named fields (`client.cert.subject`, `request`...).
#[derive(Debug)]
pub struct Record<'v>(Vec<(&'static str, Box<dyn Val + 'v>)>);

impl<'v> Record<'v> {
    fn new(fields: Vec<(&'static str, Box<dyn Val + 'v>)>) -> Self {
        Record(fields)
    }
}

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

/// Request headers by lowercase name; an absent header reads as `""`, several values as one
/// comma-separated string.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'v>(pub &'v http::HeaderMap);

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
        let map: &'v http::HeaderMap = self.0;
        let value: CelString<'w> = CelString::from(header_value(map, key_name(idx)?));
        Ok(CowVal::owned(value))
    }

    steal_via_get!();
}

/// A request header as rules read it, by name in any case: `""` when absent, several values
/// joined with `, `, bytes that are not UTF-8 replaced (so a condition on a header cannot be
/// dodged by making its value unreadable).
pub fn header_value<'v>(map: &'v http::HeaderMap, name: impl http::header::AsHeaderName) -> Cow<'v, str> {
    let mut values = map.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Cow::Borrowed(""),
        (Some(one), None) => text(one),
        (Some(a), Some(b)) => joined([a, b].into_iter().chain(values)),
    }
}

/// A request header as the rules' request path reads it: `None` when it is named twice or its
/// value is not visible ASCII (then [`header_value`] builds it).
pub fn header_text<'v>(map: &'v http::HeaderMap, name: &http::HeaderName) -> Option<&'v str> {
    let mut values = map.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Some(""),
        (Some(one), None) => one.to_str().ok(),
        (Some(_), Some(_)) => None,
    }
}

/// A header value as text: visible ASCII (nearly every value) is checked by a short loop;
/// anything else goes through `from_utf8`, and lossy conversion when that fails.
fn text(v: &http::HeaderValue) -> Cow<'_, str> {
    v.to_str().map_or_else(|_| utf8(v.as_bytes()), Cow::Borrowed)
}

#[cold]
fn utf8(b: &[u8]) -> Cow<'_, str> {
    std::str::from_utf8(b).map_or_else(|_| String::from_utf8_lossy(b), Cow::Borrowed)
}

#[cold]
fn joined<'v>(values: impl Iterator<Item = &'v http::HeaderValue>) -> Cow<'v, str> {
    Cow::Owned(values.map(text).collect::<Vec<_>>().join(", "))
}

fn string<'v>(s: impl Into<CelString<'v>>) -> Box<dyn Val + 'v> {
    Box::new(s.into())
}

fn strings(v: &[String]) -> Box<dyn Val> {
    Box::new(CelList::from(v.iter().map(|s| string(s.clone())).collect::<Vec<_>>()))
}

fn timestamp(unix: i64) -> Box<dyn Val> {
    Box::new(CelTimestamp::from(to_datetime(unix)))
}

/// The current unix time, in seconds. On Linux from the kernel's coarse clock: rules compare
/// whole seconds, and it is read from the vDSO without the hardware counter (every request with
/// request-phase rules reads it).
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

/// `client.cert.*` by full path: the certificate the handshake verified, or one with `present:
/// false` and empty fields (so that conditions keep their types for clients without one).
/// `verified` is false only where a certificate was not checked against a trust store (`rules
/// explain` of one that does not verify).
fn client_fields(cert: Option<&ViewerCert>, verified: bool, now: i64) -> Vec<(&'static str, Box<dyn Val>)> {
    let empty = ViewerCert::default();
    let c = cert.unwrap_or(&empty);
    let present = cert.is_some();
    let serial = if present {
        normalize_serial(&c.serial).unwrap_or_default()
    } else {
        String::new()
    };
    let days = if present {
        (c.not_after - now).div_euclid(86_400)
    } else {
        0
    };
    vec![
        ("client.cert.present", Box::new(CelBool::from(present))),
        ("client.cert.verified", Box::new(CelBool::from(present && verified))),
        ("client.cert.subject.dn", string(c.subject.clone())),
        ("client.cert.subject.cn", string(c.subject_parts.cn.clone())),
        ("client.cert.subject.o", string(c.subject_parts.o.clone())),
        ("client.cert.subject.ou", string(c.subject_parts.ou.clone())),
        ("client.cert.issuer.dn", string(c.issuer.clone())),
        ("client.cert.issuer.cn", string(c.issuer_parts.cn.clone())),
        ("client.cert.issuer.o", string(c.issuer_parts.o.clone())),
        ("client.cert.issuer.ou", string(c.issuer_parts.ou.clone())),
        ("client.cert.serial", string(serial)),
        ("client.cert.sha256", string(c.sha256.clone())),
        ("client.cert.san.dns", strings(&c.san_dns)),
        ("client.cert.san.uri", strings(&c.san_uri)),
        ("client.cert.san.email", strings(&c.san_email)),
        ("client.cert.san.ip", strings(&c.san_ip)),
        ("client.cert.not_before", timestamp(c.not_before)),
        ("client.cert.not_after", timestamp(c.not_after)),
        ("client.cert.days_until_expiry", Box::new(CelInt::from(days))),
    ]
}

/// A value and its path below the record being built.
type Field = (Vec<&'static str>, Box<dyn Val>);

/// Nests values by path (`["cert", "subject", "cn"]`) into records.
fn nest(fields: Vec<Field>) -> Box<dyn Val> {
    let mut groups: Vec<(&'static str, Vec<Field>)> = Vec::new();
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
        .map(|(head, mut group)| {
            let leaf = group.len() == 1 && group[0].0.is_empty();
            match (leaf, group.pop()) {
                (true, Some((_, v))) => (head, v),
                (_, last) => {
                    group.extend(last);
                    (head, nest(group))
                }
            }
        })
        .collect();
    Box::new(Record::new(record))
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

/// `client`, built once per connection. The CEL interpreter looks a dotted name up whole first
/// (`client.cert.subject.cn`), then ever shorter prefixes: answering whole names from a flat
/// table spares it the walk through nested records, which serve whole-object use.
#[derive(Debug)]
pub struct ClientFacts {
    flat: Vec<(&'static str, Box<dyn Val>)>,
    record: Box<dyn Val>,
    /// The same values as plain Rust, for compiled conditions.
    pub raw: ClientRaw,
}

/// The string fields of `client.cert`, in the order of [`ClientRaw::strings`].
pub const CLIENT_STRINGS: &[&str] = &[
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
];

#[derive(Debug, Default)]
pub struct ClientRaw {
    pub present: bool,
    pub verified: bool,
    pub strings: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub days: i64,
}

impl ClientFacts {
    pub fn new(cert: Option<&ViewerCert>, verified: bool, now: i64) -> ClientFacts {
        let flat = client_fields(cert, verified, now);
        let value = |name: &str| flat.iter().find(|(p, _)| *p == name).map(|(_, v)| v.as_ref());
        let raw = ClientRaw {
            present: cert.is_some(),
            verified: cert.is_some() && verified,
            strings: CLIENT_STRINGS
                .iter()
                .map(|n| {
                    value(n)
                        .and_then(|v| v.downcast_ref::<CelString>())
                        .map(|s| s.inner().to_string())
                        .unwrap_or_default()
                })
                .collect(),
            not_before: cert.map_or(0, |c| c.not_before),
            not_after: cert.map_or(0, |c| c.not_after),
            days: value("client.cert.days_until_expiry")
                .and_then(|v| v.downcast_ref::<CelInt>())
                .map_or(0, |i| *i.inner()),
        };
        let record = nest(
            flat.iter()
                .map(|(p, v)| (p.split('.').skip(1).collect(), v.clone_as_boxed()))
                .collect(),
        );
        ClientFacts { flat, record, raw }
    }

    fn get(&self, name: &str) -> Option<&dyn Val> {
        if name == "client" {
            return Some(self.record.as_ref());
        }
        self.flat.iter().find(|(p, _)| *p == name).map(|(_, v)| v.as_ref())
    }
}

/// What a connection knows besides the certificate. `client_ip` is empty during the handshake.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub sni: String,
    pub tls_version: String,
    pub alpn: String,
}

/// The parts of a request rules see.
pub struct RequestInfo<'v> {
    pub method: &'v str,
    pub host: &'v str,
    pub path: &'v str,
    pub query: &'v str,
    pub headers: &'v http::HeaderMap,
}

/// The variables of one evaluation, borrowed from the connection and the request: building
/// them allocates nothing.
pub struct Facts<'a> {
    pub client: &'a ClientFacts,
    pub connection: &'a ConnectionInfo,
    /// Empty in the connection phase.
    pub client_ip: &'a str,
    /// `None` in the connection phase.
    pub request: Option<&'a RequestInfo<'a>>,
    pub lists: &'a Lists,
    /// Unix seconds; a CEL timestamp only where the interpreter asks for `now`.
    pub now: i64,
}

impl<'a> Facts<'a> {
    fn connection_record(&self) -> Box<dyn Val + 'a> {
        Box::new(Record::new(vec![
            ("client_ip", string(self.client_ip)),
            ("sni", string(self.connection.sni.as_str())),
            ("tls_version", string(self.connection.tls_version.as_str())),
            ("alpn", string(self.connection.alpn.as_str())),
        ]))
    }
}

fn request_record<'v>(r: &RequestInfo<'v>) -> Box<dyn Val + 'v> {
    Box::new(Record::new(vec![
        ("method", string(r.method)),
        ("host", string(r.host)),
        ("path", string(r.path)),
        ("query", string(r.query)),
        ("headers", Box::new(Headers(r.headers))),
    ]))
}

impl VariableResolver for Facts<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        if name.starts_with("client") {
            return self.client.get(name).map(CowVal::Borrowed);
        }
        let owned = |s: &'b str| Some(CowVal::owned(CelString::from(s)));
        if let Some(field) = name.strip_prefix("request") {
            let r = self.request?;
            return match field {
                ".method" => owned(r.method),
                ".host" => owned(r.host),
                ".path" => owned(r.path),
                ".query" => owned(r.query),
                ".headers" => Some(CowVal::owned(Headers(r.headers))),
                "" => Some(CowVal::Owned(request_record(r))),
                _ => None,
            };
        }
        if let Some(field) = name.strip_prefix("connection") {
            return match field {
                ".client_ip" => owned(self.client_ip),
                ".sni" => owned(&self.connection.sni),
                ".tls_version" => owned(&self.connection.tls_version),
                ".alpn" => owned(&self.connection.alpn),
                "" => Some(CowVal::Owned(self.connection_record())),
                _ => None,
            };
        }
        match name {
            "lists" => Some(CowVal::Borrowed(self.lists)),
            "now" => Some(CowVal::owned(CelTimestamp::from(to_datetime(self.now)))),
            _ => self
                .lists
                .get_list(name.strip_prefix("lists.")?)
                .map(|l| CowVal::Borrowed(l as &dyn Val)),
        }
    }
}
