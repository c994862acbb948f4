//! `mtls-edge rules explain`: runs a certificate and a request through a config's trust store,
//! rules and routes without a running edge, and says which rules matched and what the edge
//! would do. Operators test a policy with it before they ship it.

use boring::x509::X509;
use std::fmt::Write as _;

use super::facts::{self, ConnectionInfo, RequestInfo};
use super::{Decision, Facts, Outcome, Phase, RuleSet, Step};
use crate::identity::ViewerCert;
use crate::trust_store::TrustStore;

/// What to explain.
pub struct Query {
    /// PEM: the client certificate, then any intermediates it would send.
    pub cert_pem: Vec<u8>,
    pub sni: Option<String>,
    pub host: String,
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub client_ip: String,
}

/// How the request would be routed, from the proxy's routing table.
pub struct Routing {
    /// `None` when no route matches (404).
    pub route: Option<String>,
    pub origin: Option<String>,
}

/// Verifies the chain against the trust store the SNI selects, as the handshake would (the
/// dates, the chain, its depth and path length, revocation; not the EKU).
fn verify(store: Option<&TrustStore>, chain: &[X509]) -> (bool, String) {
    let Some(store) = store else {
        return (false, "no trust store (mTLS off on this listener)".into());
    };
    if chain.is_empty() {
        return (false, "no certificate".into());
    }
    match store.verify_chain(chain, facts::unix_now()) {
        Ok(()) => (true, "verified against the trust store".into()),
        Err(r) => (false, format!("NOT verified: {} ({})", r.detail, r.reason.as_str())),
    }
}

fn trace_lines(out: &mut String, trace: &[Step]) {
    if trace.is_empty() {
        let _ = writeln!(out, "  (no rules in this phase)");
    }
    for s in trace {
        let result = match &s.result {
            Ok(true) => "MATCH".to_string(),
            Ok(false) => "no match".to_string(),
            Err(e) => format!("ERROR {e}"),
        };
        let shadow = if s.shadow { " (shadow: no effect)" } else { "" };
        let _ = writeln!(
            out,
            "  {result:<9} {:<28} {:<18} {}{shadow}",
            s.rule, s.action, s.location
        );
    }
}

fn decision_line(out: &mut String, phase: Phase, o: &Outcome) {
    let text = match (phase, o.decision()) {
        (Phase::Connection, Decision::Deny { rule, .. }) => {
            format!("refuse the handshake (reason ConnectionRuleDenied, rule {rule})")
        }
        (Phase::Connection, Decision::Error { rule, message }) => {
            format!("refuse the handshake (reason ConnectionRuleError, rule {rule}: {message})")
        }
        (Phase::AfterHandshake, Decision::Deny { rule, .. }) => {
            format!("close the connection unanswered (reason ConnectionRuleDenied, rule {rule})")
        }
        (Phase::AfterHandshake, Decision::Error { rule, message }) => {
            format!("close the connection unanswered (reason ConnectionRuleError, rule {rule}: {message})")
        }
        (Phase::Request, Decision::Deny { rule, status, body }) => {
            format!("answer {status} {:?} (rule {rule})", body.trim_end())
        }
        (Phase::Request, Decision::Error { rule, message }) => format!("answer 500 (rule {rule} failed: {message})"),
        (_, Decision::Allow { rule }) => format!("allow (rule {rule})"),
        (_, Decision::Continue) => "go on (no allow or deny matched)".into(),
    };
    let _ = writeln!(out, "  => {text}");
}

/// What `q` turns into before any rule runs.
struct Prepared {
    chain: Vec<X509>,
    cert: ViewerCert,
    info: ConnectionInfo,
    headers: http::HeaderMap,
}

fn prepare(q: &Query) -> Result<Prepared, String> {
    let chain = X509::stack_from_pem(&q.cert_pem).map_err(|e| format!("--cert: not a PEM certificate: {e}"))?;
    let leaf = chain.first().ok_or("--cert: no certificate in the file")?;
    let cert = ViewerCert::from_x509(leaf).ok_or("--cert: the certificate cannot be read")?;
    let mut headers = http::HeaderMap::new();
    for (k, v) in &q.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("--header: bad name '{k}'"))?;
        let value = http::HeaderValue::from_str(v).map_err(|_| format!("--header: bad value for '{k}'"))?;
        headers.append(name, value);
    }
    let info = ConnectionInfo {
        sni: q.sni.clone().unwrap_or_default(),
        tls_version: "TLSv1.3".into(),
        alpn: "h2".into(),
        ..ConnectionInfo::default()
    };
    Ok(Prepared {
        chain,
        cert,
        info,
        headers,
    })
}

/// Runs one phase for `q`, as the handshake or the proxy would.
fn run_phase(
    rules: &RuleSet,
    phase: Phase,
    verified: bool,
    p: &Prepared,
    q: &Query,
    trace: Option<&mut Vec<Step>>,
) -> Outcome {
    let (path, query) = q.path_and_query.split_once('?').unwrap_or((&q.path_and_query, ""));
    let req = RequestInfo {
        method: &q.method,
        host: &q.host,
        path,
        query,
        headers: &p.headers,
    };
    let facts = Facts {
        cert: Some(&p.cert),
        verified,
        connection: &p.info,
        client_ip: if phase == Phase::Connection { "" } else { &q.client_ip },
        request: (phase == Phase::Request).then_some(&req),
        lists: rules.lists(),
        now: facts::unix_now(),
    };
    rules.evaluate(&[phase], &facts, trace)
}

/// Bytes walked between two requests of the cold run: several times the L2 cache, so rule code
/// and data start each request evicted, as in the loaded edge, where TLS and kernel work for
/// other connections runs between two evaluations.
const EVICT_BYTES: usize = 8 << 20;

/// Times the request phase of `q` as the proxy runs it on one connection (the facts built, the
/// rules evaluated), for `load/rules.sh`: nanoseconds per request with warm CPU caches (the loop
/// runs `iterations` times), and with the caches evicted before each request (a tenth as many
/// runs, only the evaluation timed).
pub fn bench(rules: &RuleSet, q: &Query, iterations: u32) -> Result<(f64, f64), String> {
    let p = prepare(q)?;
    let mut denied = 0u32;
    let mut run = || denied += u32::from(run_phase(rules, Phase::Request, true, &p, q, None).denied());
    // The warm runs are timed as a whole: a clock read per request would be a tenth of it.
    let started = std::time::Instant::now();
    (0..iterations).for_each(|_| run());
    let hot = started.elapsed();
    let mut once = || {
        let started = std::time::Instant::now();
        run();
        started.elapsed()
    };
    let cold_runs = (iterations / 10).max(1);
    let mut junk = vec![0u8; EVICT_BYTES];
    let mut cold = std::time::Duration::ZERO;
    for _ in 0..cold_runs {
        for b in junk.iter_mut().step_by(64) {
            *b = b.wrapping_add(1);
        }
        cold += once();
    }
    std::hint::black_box(&junk);
    if denied > 0 {
        return Err(format!(
            "{denied} of {} requests were denied: bench a request the rules allow",
            iterations + cold_runs
        ));
    }
    let per = |d: std::time::Duration, n: u32| d.as_nanos() as f64 / f64::from(n.max(1));
    Ok((per(hot, iterations), per(cold, cold_runs)))
}

/// Explains `q`: the certificate, each phase's rules, and the final action.
pub fn explain(
    rules: &RuleSet,
    store: Option<&TrustStore>,
    route: impl Fn(&str, &str) -> Routing,
    q: &Query,
) -> Result<String, String> {
    let p = prepare(q)?;
    let (verified, verdict) = verify(store, &p.chain);
    let mut out = String::new();
    let _ = writeln!(out, "certificate: {} (serial {})", p.cert.subject, p.cert.serial);
    let _ = writeln!(out, "  issuer {}; {verdict}", p.cert.issuer);

    let _ = writeln!(out, "connection phase (sni {}):", q.sni.as_deref().unwrap_or("none"));
    let mut trace = Vec::new();
    let conn = run_phase(rules, Phase::Connection, verified, &p, q, Some(&mut trace));
    trace_lines(&mut out, &trace);
    decision_line(&mut out, Phase::Connection, &conn);
    if !verified {
        let _ = writeln!(out, "result: the handshake is refused: the certificate does not verify");
        return Ok(out);
    }
    if conn.denied() {
        let _ = writeln!(out, "result: the handshake is refused");
        return Ok(out);
    }
    if rules.has_phase(Phase::AfterHandshake) && *conn.decision() == Decision::Continue {
        let _ = writeln!(
            out,
            "connection phase, after the handshake (client ip {}):",
            q.client_ip
        );
        let mut trace = Vec::new();
        let after = run_phase(rules, Phase::AfterHandshake, verified, &p, q, Some(&mut trace));
        trace_lines(&mut out, &trace);
        decision_line(&mut out, Phase::AfterHandshake, &after);
        if after.denied() {
            let _ = writeln!(
                out,
                "result: the connection is closed before its first request is served"
            );
            return Ok(out);
        }
    }

    let path = q.path_and_query.split('?').next().unwrap_or("/");
    let routing = route(&q.host, path);
    let _ = writeln!(out, "request phase ({} {}{}):", q.method, q.host, q.path_and_query);
    let Some(route_name) = &routing.route else {
        let _ = writeln!(out, "result: answer 404 (no route)");
        return Ok(out);
    };
    let mut trace = Vec::new();
    let outcome = run_phase(rules, Phase::Request, verified, &p, q, Some(&mut trace));
    trace_lines(&mut out, &trace);
    decision_line(&mut out, Phase::Request, &outcome);
    if outcome.denied() {
        let _ = writeln!(out, "result: denied by a rule");
        return Ok(out);
    }
    let origin = outcome.origin.as_deref().or(routing.origin.as_deref()).unwrap_or("-");
    let _ = write!(out, "result: forward to origin {origin} (route {route_name})");
    if let Some(c) = &outcome.cohort {
        let _ = write!(out, ", cache cohort {c:?}");
    }
    for op in &outcome.headers {
        let _ = match op {
            super::HeaderOp::Set(k, v) => write!(out, ", set {k}: {}", String::from_utf8_lossy(v.as_bytes())),
            super::HeaderOp::Remove(k) => write!(out, ", remove {k}"),
        };
    }
    out.push('\n');
    Ok(out)
}
