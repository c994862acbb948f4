//! Rule expressions and rules → a [`RuleSet`]: every expression parsed, its names and types
//! checked against the facts, and compiled. The rule files themselves are read, and their
//! entries turned into rules, by `state::build`.

use std::sync::Arc;

use cel::common::ast::{Expr, IdedExpr};
use cel::{Context, Env, ExecutionError, Program, Value};
use http::HeaderValue;

use super::condition::{Condition, StrExpr};
use super::facts::{self, ConnectionInfo, Facts, RequestInfo};
use super::lists::Lists;
use super::{environment, Action, Phase, Rule, RuleSet};
use crate::metrics;

#[derive(Clone, Copy)]
enum Want {
    Bool,
    String,
}

/// Headers that frame or route the request: changing them toward the origin could make the edge
/// and the origin disagree about where a request ends.
pub const FRAMING: &[&str] = &[
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

/// The longest expression, and the deepest nesting, the compiler takes: CEL's parser and the
/// condition tree recurse, and a rule file must not be able to overflow the stack of a running
/// edge at a reload.
pub(crate) const MAX_EXPRESSION_BYTES: usize = 4096;
const MAX_NESTING: usize = 32;

/// Whether `src` is short and shallow enough to parse (brackets and unary operators nest;
/// string literals are skipped).
fn within_limits(src: &str) -> Result<(), String> {
    if src.len() > MAX_EXPRESSION_BYTES {
        return Err(format!("the expression is {} bytes long, more than {MAX_EXPRESSION_BYTES}", src.len()));
    }
    let (mut depth, mut deepest, mut unary, mut quote) = (0usize, 0usize, 0usize, None);
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '(' | '[' | '{') => {
                depth += 1;
                deepest = deepest.max(depth + unary);
            }
            (None, ')' | ']' | '}') => depth = depth.saturating_sub(1),
            (None, '!' | '-') if chars.peek() != Some(&'=') => {
                unary += 1;
                deepest = deepest.max(depth + unary);
            }
            (None, c) if !c.is_whitespace() => unary = 0,
            _ => {}
        }
    }
    if deepest > MAX_NESTING {
        return Err(format!("the expression nests {deepest} deep, more than {MAX_NESTING}"));
    }
    Ok(())
}

/// Compiles the expressions and rules of one rule set, against its lists.
pub struct Compiler {
    env: Arc<Env>,
    lists: Lists,
}

impl Compiler {
    pub fn new(lists: Lists) -> Compiler {
        Compiler {
            env: Arc::new(environment()),
            lists,
        }
    }

    /// A `when` condition of a rule of `phase`, and whether it reads `connection.client_ip`.
    pub fn condition(&self, src: &str, phase: Phase) -> Result<(Condition, bool), String> {
        let program = self.checked(src, phase, Want::Bool)?;
        let reads_ip = reads_client_ip(&program);
        Ok((Condition::compile(program, &self.lists), reads_ip))
    }

    /// A string expression (a header value, a cohort) of a rule of `phase`.
    pub fn string(&self, src: &str, phase: Phase) -> Result<StrExpr, String> {
        Ok(StrExpr::compile(self.checked(src, phase, Want::String)?, &self.lists))
    }

    /// A string expression of `phase` outside any rule.
    pub fn expression(&self, src: &str, phase: Phase) -> Result<super::Expression, String> {
        Ok(super::Expression {
            source: src.to_string(),
            expr: self.string(src, phase)?,
            env: self.env.clone(),
        })
    }

    fn checked(&self, src: &str, phase: Phase, want: Want) -> Result<Program, String> {
        within_limits(src)?;
        let program = self.env.compile(src).map_err(|e| e.to_string())?;
        self.check_names(&program, src, phase)?;
        self.check_types(&program, phase, want)?;
        Ok(program)
    }

    /// A rule from its parts, with its counters.
    #[allow(clippy::too_many_arguments)]
    pub fn rule(
        &self,
        name: &str,
        location: String,
        phase: Phase,
        shadow: bool,
        when: (Condition, bool),
        action: Action,
    ) -> Rule {
        let counters = ["matched", "would_match", "error"]
            .map(|outcome| metrics::RULE_EVALUATIONS.with_label_values(&[phase.as_str(), name, outcome]));
        Rule {
            name: name.into(),
            location: location.into(),
            phase,
            shadow,
            reads_client_ip: when.1,
            when: when.0,
            action,
            counters,
        }
    }

    /// The rule set of `rules`, in order. The connection rules from the first that reads the
    /// client's address on wait for the handshake's end: those before it still refuse the
    /// handshake itself.
    pub fn finish(self, mut rules: Vec<Rule>, uses_client_ip: bool) -> RuleSet {
        let waits = |r: &Rule| r.phase == Phase::Connection && r.reads_client_ip;
        if let Some(first) = rules.iter().position(waits) {
            for r in rules.iter_mut().skip(first) {
                if r.phase == Phase::Connection {
                    r.phase = Phase::AfterHandshake;
                }
            }
        }
        RuleSet::new(rules, self.env, self.lists, uses_client_ip)
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
            ..ConnectionInfo::default()
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
