//! Rule files and lists → a [`RuleSet`]: every expression parsed, its names and types checked
//! against the facts, and compiled; every error with its file, line and field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cel::common::ast::{Expr, IdedExpr};
use cel::{Context, ExecutionError, Program, Value};
use http::{HeaderName, HeaderValue};
use log::info;
use serde::Deserialize;

use super::condition::{Condition, StrExpr};
use super::facts::{self, ConnectionInfo, Facts, RequestInfo};
use super::lists::{ListKind, ListVal, Lists, RuleList};
use super::{Action, Phase, Rule, RuleSet};
use crate::config::Ctx;
use crate::metrics;

/// The `rules:` section of the edge config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Directory whose `*.yaml` files hold the rules, loaded in file name order.
    pub dir: String,
    /// Named lists: `lists.NAME` in conditions.
    #[serde(default)]
    pub lists: BTreeMap<String, ListConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListConfig {
    pub file: String,
    pub kind: ListKind,
}

/// One rule file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    pub(super) rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SpecPhase {
    Connection,
    Request,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleSpec {
    name: String,
    phase: SpecPhase,
    #[serde(default = "always")]
    pub(super) when: String,
    #[serde(default)]
    mode: Mode,
    // Exactly one action.
    allow: Option<bool>,
    deny: Option<DenySpec>,
    set_headers: Option<BTreeMap<String, String>>,
    remove_headers: Option<Vec<String>>,
    cache_cohort: Option<String>,
    origin: Option<String>,
}

fn always() -> String {
    "true".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenySpec {
    /// Request phase: the response status (default 403).
    status: Option<u16>,
    /// Request phase: the response body.
    body: Option<String>,
}

#[derive(Clone, Copy)]
enum Want {
    Bool,
    String,
}

/// Headers that frame or route the request: changing them toward the origin could make the edge
/// and the origin disagree about where a request ends.
const FRAMING: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

impl RuleSet {
    /// Loads every list and rule file of `cfg`, reporting each error under `rules...` with
    /// the file and line. `origins` are the names a rule may choose; `identity_header` says
    /// whether a header name belongs to the edge's identity headers (rules may not touch them).
    pub fn load(
        ctx: &mut Ctx,
        cfg: &RulesConfig,
        origins: &[&str],
        identity_header: &dyn Fn(&HeaderName) -> bool,
    ) -> RuleSet {
        let mut lists = BTreeMap::new();
        for (name, l) in &cfg.lists {
            let path = ctx.path(&l.file);
            let started = std::time::Instant::now();
            match RuleList::load(l.kind, &path) {
                Ok(list) => {
                    info!(
                        "list {name}: {} entries from {} in {} ms",
                        list.len(),
                        path.display(),
                        started.elapsed().as_millis()
                    );
                    lists.insert(name.clone(), ListVal(Arc::new(list)));
                }
                Err(e) => ctx.error(format!("rules.lists.{name}.file"), e),
            }
        }
        let mut set = RuleSet {
            lists: Lists(Arc::new(lists)),
            ..RuleSet::empty()
        };
        let dir = ctx.path(&cfg.dir);
        let files = match rule_files(&dir) {
            Ok(f) => f,
            Err(e) => {
                ctx.error("rules.dir", e);
                return set;
            }
        };
        let mut names = HashSet::new();
        for file in files {
            // How often each name has been seen in this file, to find the right one's line.
            let mut in_file: HashMap<String, usize> = HashMap::new();
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    ctx.error("rules.dir", format!("cannot read {}: {e}", file.display()));
                    continue;
                }
            };
            let parsed: RuleFile = match serde_yaml::from_str(&text) {
                Ok(p) => p,
                Err(e) => {
                    ctx.error("rules.dir", format!("{}: {e}", file.display()));
                    continue;
                }
            };
            for spec in parsed.rules {
                let nth = in_file.entry(spec.name.clone()).or_default();
                *nth += 1;
                let line = line_of(&text, &spec.name, *nth);
                let location = format!("{}:{line}", file.display());
                if !names.insert(spec.name.clone()) {
                    ctx.error(
                        "rules.dir",
                        format!("{location}: rule '{}': the name is used twice", spec.name),
                    );
                    continue;
                }
                // Conservative (a string literal may mention it): only spares formatting the IP.
                set.uses_client_ip |= std::iter::once(&spec.when)
                    .chain(&spec.cache_cohort)
                    .chain(spec.set_headers.iter().flat_map(BTreeMap::values))
                    .any(|e| e.contains("client_ip"));
                match set.compile(spec, &text, line, origins, identity_header) {
                    Ok(rule) => set.rules.push(Rule {
                        location: location.into(),
                        ..rule
                    }),
                    Err(e) => ctx.error("rules.dir", format!("{location}: {e}")),
                }
            }
        }
        // The connection rules from the first that reads the client's address on wait for the
        // handshake's end, in order: those before it still refuse the handshake itself.
        let waits = |r: &Rule| r.phase == Phase::Connection && r.reads_client_ip;
        if let Some(first) = set.rules.iter().position(waits) {
            for r in set.rules.iter_mut().skip(first) {
                if r.phase == Phase::Connection {
                    r.phase = Phase::AfterHandshake;
                }
            }
        }
        set
    }

    fn compile(
        &self,
        spec: RuleSpec,
        text: &str,
        line: usize,
        origins: &[&str],
        identity_header: &dyn Fn(&HeaderName) -> bool,
    ) -> Result<Rule, String> {
        let name = spec.name.clone();
        let at = |field: &str| format!("rule '{name}': {field} (line {})", field_line(text, line, field));
        let phase = match spec.phase {
            SpecPhase::Connection => Phase::Connection,
            SpecPhase::Request => Phase::Request,
        };
        let expr = |field: &str, src: &str, want: Want| -> Result<Program, String> {
            let program = self.env.compile(src).map_err(|e| format!("{}: {e}", at(field)))?;
            self.check_names(&program, src, phase)
                .map_err(|e| format!("{}: {e}", at(field)))?;
            self.check_types(&program, phase, want)
                .map_err(|e| format!("{}: {e}", at(field)))?;
            Ok(program)
        };
        let when = expr("when", &spec.when, Want::Bool)?;
        let reads_client_ip = reads_client_ip(&when);
        let when = Condition::compile(when, &self.lists);
        let string_expr = |field: &str, src: &str| -> Result<StrExpr, String> {
            Ok(StrExpr::compile(expr(field, src, Want::String)?, &self.lists))
        };
        let header = |n: &str| -> Result<HeaderName, String> {
            let h = HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("'{n}' is not a valid header name"))?;
            if identity_header(&h) {
                return Err(format!("'{n}' is an identity header: only the edge sets it"));
            }
            if FRAMING.contains(&h.as_str()) {
                return Err(format!("'{n}' frames or routes the request: rules may not change it"));
            }
            Ok(h)
        };
        let mut actions = Vec::new();
        if let Some(a) = spec.allow {
            if !a {
                return Err(format!("rule '{name}': allow must be true (leave it out instead)"));
            }
            actions.push(Action::Allow);
        }
        if let Some(d) = spec.deny {
            if phase == Phase::Connection && (d.status.is_some() || d.body.is_some()) {
                return Err(format!(
                    "rule '{name}': a connection-phase deny refuses the handshake; status and body are for the request phase"
                ));
            }
            let status = d.status.unwrap_or(403);
            if !(400..=599).contains(&status) {
                return Err(format!("rule '{name}': deny status {status} is not a 4xx or 5xx"));
            }
            actions.push(Action::Deny {
                status,
                body: Arc::from(d.body.unwrap_or_default()),
            });
        }
        if let Some(h) = spec.set_headers {
            let mut out = Vec::new();
            for (n, src) in h {
                out.push((
                    header(&n).map_err(|e| format!("{}: {e}", at("set_headers")))?,
                    string_expr("set_headers", &src)?,
                ));
            }
            actions.push(Action::SetHeaders(out));
        }
        if let Some(h) = spec.remove_headers {
            let names = h
                .iter()
                .map(|n| header(n))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", at("remove_headers")))?;
            actions.push(Action::RemoveHeaders(names));
        }
        if let Some(src) = spec.cache_cohort {
            actions.push(Action::CacheCohort(string_expr("cache_cohort", &src)?));
        }
        if let Some(o) = spec.origin {
            if !origins.contains(&o.as_str()) {
                return Err(format!(
                    "{}: unknown origin '{o}' (defined: {})",
                    at("origin"),
                    origins.join(", ")
                ));
            }
            actions.push(Action::Origin(o));
        }
        let action = match (actions.pop(), actions.is_empty()) {
            (Some(a), true) => a,
            (None, _) => {
                return Err(format!(
                "rule '{name}': no action (give one of allow, deny, set_headers, remove_headers, cache_cohort, origin)"
            ))
            }
            (Some(_), false) => return Err(format!("rule '{name}': more than one action; split it into rules")),
        };
        if phase == Phase::Connection && !matches!(action, Action::Allow | Action::Deny { .. }) {
            return Err(format!(
                "rule '{name}': the connection phase can only allow or deny ({} is a request-phase action)",
                action.describe()
            ));
        }
        let counters = ["matched", "would_match", "error"]
            .map(|outcome| metrics::RULE_EVALUATIONS.with_label_values(&[phase.as_str(), &name, outcome]));
        Ok(Rule {
            name: name.into(),
            location: Box::default(),
            phase,
            shadow: spec.mode == Mode::Shadow,
            reads_client_ip,
            when,
            action,
            counters,
        })
    }

    /// Every variable and field an expression names must exist in its phase.
    fn check_names(&self, program: &Program, src: &str, phase: Phase) -> Result<(), String> {
        for (id, path) in paths(program) {
            let joined = path.join(".");
            let known = facts::SCHEMA.iter().any(|pattern| {
                let p: Vec<&str> = pattern.split('.').collect();
                // A path may stop at an object (`client.cert`) or name a leaf exactly.
                path.len() <= p.len() && path.iter().zip(&p).all(|(a, b)| *b == "*" || a == b)
            });
            let pos = program
                .source_info()
                .offset_for(id)
                .map(|(start, _)| {
                    let before = src.get(..start as usize).unwrap_or(src);
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(" (expression line {line}, column {column})")
                })
                .unwrap_or_default();
            if !known {
                return Err(format!("unknown variable or field '{joined}'{pos}"));
            }
            if path[0] == "lists" {
                if let Some(name) = path.get(1) {
                    if !self.lists.0.contains_key(name) {
                        let defined: Vec<&str> = self.lists.0.keys().map(String::as_str).collect();
                        return Err(format!(
                            "unknown list '{name}'{pos} (configured: {})",
                            defined.join(", ")
                        ));
                    }
                }
            }
            if phase == Phase::Connection && path[0] == "request" {
                return Err(format!(
                    "'{joined}' is not known during the handshake{pos}; use a request-phase rule"
                ));
            }
        }
        Ok(())
    }

    /// Evaluates the expression against a sample client with every field set, so that a wrong
    /// type (a string compared with an int, a missing overload) fails at load, not per request.
    fn check_types(&self, program: &Program, phase: Phase, want: Want) -> Result<(), String> {
        let sample = facts::sample_cert();
        let info = ConnectionInfo {
            sni: "fleet.example".into(),
            tls_version: "TLSv1.3".into(),
            alpn: "h2".into(),
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("user-agent", HeaderValue::from_static("sample"));
        // Several samples, so that more branches of `&&`, `||` and `?:` are taken: a branch no
        // sample reaches is checked only at run time (where an error denies).
        for cert in [Some(&sample), None] {
            for path in ["/", "/firmware/images/x1/image.bin", "/api/acme/orders"] {
                let req = RequestInfo {
                    method: "GET",
                    host: "fleet.example",
                    path,
                    query: "",
                    headers: &headers,
                };
                let facts = Facts {
                    cert,
                    verified: true,
                    connection: &info,
                    client_ip: "192.0.2.1",
                    request: (phase == Phase::Request).then_some(&req),
                    lists: &self.lists,
                    now: 0,
                };
                let mut ctx = Context::with_env(self.env.clone());
                ctx.set_variable_resolver(&facts);
                let value = match program.execute(&ctx) {
                    Ok(v) => v,
                    // Errors that depend on the data (a header that does not parse as a number,
                    // an empty list indexed, a key missing from a map literal) are for run
                    // time, where they deny; the rest are type errors.
                    Err(
                        ExecutionError::FunctionError { .. }
                        | ExecutionError::DivisionByZero(_)
                        | ExecutionError::RemainderByZero(_)
                        | ExecutionError::Overflow(..)
                        | ExecutionError::IndexOutOfBounds(_)
                        | ExecutionError::DuplicateKey(_)
                        | ExecutionError::NoSuchKey(_),
                    ) => continue,
                    Err(e) => return Err(format!("does not evaluate: {e}")),
                };
                match (want, &value) {
                    (Want::Bool, Value::Bool(_)) | (Want::String, Value::String(_)) => {}
                    (Want::Bool, v) => return Err(format!("must be a bool, is {:?}", v.type_of())),
                    (Want::String, v) => return Err(format!("must be a string, is {:?}", v.type_of())),
                }
            }
        }
        Ok(())
    }
}

/// Whether an expression reads `connection.client_ip`, or the whole `connection` (which holds it).
fn reads_client_ip(program: &Program) -> bool {
    paths(program).iter().any(|(_, p)| match p.as_slice() {
        [root] => root == "connection",
        [root, field, ..] => root == "connection" && field == "client_ip",
        [] => false,
    })
}

/// The `*.yaml` files of a rules directory, in name order.
fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The line where the `nth` rule named `name` starts (its `name:` key, block or flow style, a
/// trailing comment allowed), 1-based; 0 when it cannot be found.
fn line_of(text: &str, name: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            l.split("name:").skip(1).any(|rest| {
                let value = rest
                    .split(" #")
                    .next()
                    .unwrap_or("")
                    .split([',', '}'])
                    .next()
                    .unwrap_or("");
                value.trim().trim_matches(|c| c == '"' || c == '\'') == name
            })
        })
        .nth(nth.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1)
}

/// The line of `field:` at or after the rule's start line.
fn field_line(text: &str, start: usize, field: &str) -> usize {
    let key = format!("{field}:");
    text.lines()
        .enumerate()
        .skip(start.saturating_sub(1))
        .find(|(_, l)| l.contains(&key))
        .map_or(start, |(i, _)| i + 1)
}

/// Every variable path (`client.cert.subject.cn`) a program names, with its node id.
fn paths(program: &Program) -> Vec<(u64, Vec<String>)> {
    let mut out = Vec::new();
    collect_paths(program.expression(), &mut Vec::new(), &mut out);
    out
}

/// Names bound by comprehensions (`exists(x, ...)`) are left out.
fn collect_paths(e: &IdedExpr, bound: &mut Vec<String>, out: &mut Vec<(u64, Vec<String>)>) {
    if let Some(path) = select_path(&e.expr) {
        if !bound.contains(&path[0]) {
            // The position of the path's first name (a select's own is its last dot).
            let mut root = e;
            while let Expr::Select(s) = &root.expr {
                root = &s.operand;
            }
            out.push((root.id, path));
        }
        return;
    }
    match &e.expr {
        Expr::Select(s) => collect_paths(&s.operand, bound, out),
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                collect_paths(t, bound, out);
            }
            for a in &c.args {
                collect_paths(a, bound, out);
            }
        }
        Expr::List(l) => l.elements.iter().for_each(|x| collect_paths(x, bound, out)),
        Expr::Map(m) => {
            for entry in &m.entries {
                if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                    collect_paths(&me.key, bound, out);
                    collect_paths(&me.value, bound, out);
                }
            }
        }
        Expr::Comprehension(c) => {
            collect_paths(&c.iter_range, bound, out);
            collect_paths(&c.accu_init, bound, out);
            let added = 2 + usize::from(c.iter_var2.is_some());
            bound.push(c.iter_var.clone());
            bound.push(c.accu_var.clone());
            if let Some(v) = &c.iter_var2 {
                bound.push(v.clone());
            }
            collect_paths(&c.loop_cond, bound, out);
            collect_paths(&c.loop_step, bound, out);
            collect_paths(&c.result, bound, out);
            bound.truncate(bound.len() - added);
        }
        _ => {}
    }
}

/// `a.b.c` as `["a", "b", "c"]` when the expression is a plain chain of names.
fn select_path(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Ident(name) => Some(vec![name.clone()]),
        Expr::Select(s) if !s.test => {
            let mut p = select_path(&s.operand.expr)?;
            p.push(s.field.clone());
            Some(p)
        }
        _ => None,
    }
}
