//! What a rule condition can see, as CEL values: `client` (the verified certificate, built once
//! per connection), `connection`, `request` (borrowed from the request, not copied), `lists`
//! and `now`. [`SCHEMA`] lists every field, so that a misspelt one fails at load.

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
    fn get_type(&self) -> &Type {
        &RECORD_TYPE
    }

    fn cel_type() -> &'static Type {
        &RECORD_TYPE
    }

    fn as_indexer<'b, 'w>(&'b self) -> Option<&'b (dyn Indexer + 'w)>
    where
        Self: 'w,
    {
        Some(self)
    }

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
    fn steal<'w>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'w>, ExecutionError>
    where
        Self: 'w,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}

/// Request headers by lowercase name; an absent header reads as `""`, several values as one
/// comma-separated string.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'v>(pub &'v http::HeaderMap);

impl Val for Headers<'_> {
    fn get_type(&self) -> &Type {
        &RECORD_TYPE
    }

    fn cel_type() -> &'static Type {
        &RECORD_TYPE
    }

    fn as_indexer<'b, 'w>(&'b self) -> Option<&'b (dyn Indexer + 'w)>
    where
        Self: 'w,
    {
        Some(self)
    }

    fn clone_as_boxed<'w>(&self) -> Box<dyn Val + 'w>
    where
        Self: 'w,
    {
        Box::new(*self)
    }
}

impl Indexer for Headers<'_> {
    fn get<'b, 'w>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'w>, ExecutionError>
    where
        Self: 'w,
    {
        let name = key_name(idx)?.to_ascii_lowercase();
        let mut values = self.0.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok());
        let value = match (values.next(), values.next()) {
            (None, _) => String::new(),
            (Some(one), None) => one.to_string(),
            (Some(a), Some(b)) => std::iter::once(a)
                .chain(std::iter::once(b))
                .chain(values)
                .collect::<Vec<_>>()
                .join(", "),
        };
        Ok(CowVal::owned(CelString::from(value)))
    }
    fn steal<'w>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'w>, ExecutionError>
    where
        Self: 'w,
    {
        self.get(idx).map(CowVal::into_owned)
    }
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

/// The current unix time, in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `now` for an evaluation at unix time `unix`.
pub fn timestamp_now(unix: i64) -> CelTimestamp {
    CelTimestamp::from(to_datetime(unix))
}

pub fn to_datetime(unix: i64) -> DateTime<FixedOffset> {
    DateTime::from_timestamp(unix, 0).unwrap_or_default().fixed_offset()
}

fn name(dn: &str, parts: &NameParts) -> Box<dyn Val> {
    Box::new(Record::new(vec![
        ("dn", string(dn.to_string())),
        ("cn", string(parts.cn.clone())),
        ("o", string(parts.o.clone())),
        ("ou", string(parts.ou.clone())),
    ]))
}

/// `client`: the certificate the handshake verified, or one with `present: false` and empty
/// fields (so that conditions keep their types for clients without one). `verified` is false
/// only where a certificate was not checked against a trust store (`rules explain` without one).
pub fn client(cert: Option<&ViewerCert>, verified: bool, now: i64) -> Box<dyn Val> {
    let empty = ViewerCert::default();
    let c = cert.unwrap_or(&empty);
    let days = if cert.is_some() {
        (c.not_after - now).div_euclid(86_400)
    } else {
        0
    };
    let cert_record = Record::new(vec![
        ("present", Box::new(CelBool::from(cert.is_some()))),
        ("verified", Box::new(CelBool::from(cert.is_some() && verified))),
        ("subject", name(&c.subject, &c.subject_parts)),
        ("issuer", name(&c.issuer, &c.issuer_parts)),
        (
            "serial",
            string(if cert.is_some() {
                normalize_serial(&c.serial).unwrap_or_default()
            } else {
                String::new()
            }),
        ),
        ("sha256", string(c.sha256.clone())),
        (
            "san",
            Box::new(Record::new(vec![
                ("dns", strings(&c.san_dns)),
                ("uri", strings(&c.san_uri)),
                ("email", strings(&c.san_email)),
                ("ip", strings(&c.san_ip)),
            ])),
        ),
        ("not_before", timestamp(c.not_before)),
        ("not_after", timestamp(c.not_after)),
        ("days_until_expiry", Box::new(CelInt::from(days))),
    ]);
    Box::new(Record::new(vec![("cert", Box::new(cert_record))]))
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

/// What a connection knows besides the certificate. `client_ip` is empty during the handshake.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub sni: String,
    pub tls_version: String,
    pub alpn: String,
}

pub fn connection<'v>(info: &'v ConnectionInfo, client_ip: &'v str) -> Box<dyn Val + 'v> {
    Box::new(Record::new(vec![
        ("client_ip", string(client_ip)),
        ("sni", string(info.sni.as_str())),
        ("tls_version", string(info.tls_version.as_str())),
        ("alpn", string(info.alpn.as_str())),
    ]))
}

/// The parts of a request rules see.
pub struct RequestInfo<'v> {
    pub method: &'v str,
    pub host: &'v str,
    pub path: &'v str,
    pub query: &'v str,
    pub headers: &'v http::HeaderMap,
}

pub fn request<'v>(r: &RequestInfo<'v>) -> Box<dyn Val + 'v> {
    Box::new(Record::new(vec![
        ("method", string(r.method)),
        ("host", string(r.host)),
        ("path", string(r.path)),
        ("query", string(r.query)),
        ("headers", Box::new(Headers(r.headers))),
    ]))
}

/// The variables of one evaluation.
pub struct Facts<'a> {
    pub client: &'a dyn Val,
    pub connection: Box<dyn Val + 'a>,
    /// `None` in the connection phase.
    pub request: Option<Box<dyn Val + 'a>>,
    pub lists: &'a Lists,
    pub now: CelTimestamp,
}

impl VariableResolver for Facts<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let v: &'b (dyn Val + 'b) = match variable {
            "client" => self.client,
            "connection" => self.connection.as_ref(),
            "request" => self.request.as_deref()?,
            "lists" => self.lists,
            "now" => &self.now,
            _ => return None,
        };
        Some(CowVal::Borrowed(v))
    }
}
