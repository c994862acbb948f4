//! Lua-free rules: YAML files of rules whose conditions are CEL expressions, compiled and
//! checked once at load, then evaluated per handshake (`connection` phase) or per request
//! (`request` phase) in file and line order. The first `allow` or `deny` that matches ends a
//! phase; the other actions accumulate. Errors at run time deny (fail closed).

/// The `Val` methods of an object that rules index by name (`a.b`, `a["b"]`), of CEL type `$ty`.
macro_rules! indexed_val {
    ($ty:expr) => {
        fn get_type(&self) -> &cel::common::types::Type {
            &$ty
        }

        fn cel_type() -> &'static cel::common::types::Type {
            &$ty
        }

        fn as_indexer<'b, 'w>(&'b self) -> Option<&'b (dyn cel::common::traits::Indexer + 'w)>
        where
            Self: 'w,
        {
            Some(self)
        }
    };
}

/// `Indexer::steal` by way of `get`, for objects that hand out borrowed fields.
macro_rules! steal_via_get {
    () => {
        fn steal<'w>(
            self: Box<Self>,
            idx: &dyn cel::common::value::Val,
        ) -> Result<Box<dyn cel::common::value::Val + 'w>, cel::ExecutionError>
        where
            Self: 'w,
        {
            self.get(idx).map(cel::common::value::CowVal::into_owned)
        }
    };
}

mod compiled;
pub mod explain;
pub mod facts;
pub mod lists;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cel::common::ast::{Expr, IdedExpr};
use cel::common::types::{CelBool, CelInt, CelString};
use cel::{Context, Env, ExecutionError, Program, Value};
use http::{HeaderName, HeaderValue};
use log::{info, warn};
use pingora_prometheus::prometheus::IntCounter;
use serde::Deserialize;

use crate::config::Ctx;
use crate::metrics;
pub use facts::{ConnectionInfo, Facts, RequestInfo};
use lists::{contains as list_contains, ListKind, ListVal, Lists, RuleList};

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
struct RuleFile {
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connection,
    Request,
    /// The connection phase from its first rule that reads `connection.client_ip` on: pingora's
    /// handshake callbacks see no socket, so these rules run when the connection's first
    /// request arrives, before it is served (a deny closes the connection unanswered). Set at
    /// load, never written in a rule file.
    #[serde(skip)]
    AfterHandshake,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Connection | Phase::AfterHandshake => "connection",
            Phase::Request => "request",
        }
    }
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
struct RuleSpec {
    name: String,
    phase: Phase,
    #[serde(default = "always")]
    when: String,
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

/// What a rule does when its condition holds.
enum Action {
    Allow,
    Deny { status: u16, body: Arc<str> },
    SetHeaders(Vec<(HeaderName, Expression<compiled::CompiledStr>)>),
    RemoveHeaders(Vec<HeaderName>),
    CacheCohort(Expression<compiled::CompiledStr>),
    Origin(String),
}

impl Action {
    fn describe(&self) -> String {
        match self {
            Action::Allow => "allow".into(),
            Action::Deny { status, .. } => format!("deny {status}"),
            Action::SetHeaders(h) => format!(
                "set_headers {}",
                h.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(",")
            ),
            Action::RemoveHeaders(h) => format!(
                "remove_headers {}",
                h.iter().map(HeaderName::as_str).collect::<Vec<_>>().join(",")
            ),
            Action::CacheCohort(_) => "cache_cohort".into(),
            Action::Origin(o) => format!("origin {o}"),
        }
    }
}

/// A compiled rule. A request reads it only when it matches: its visit (see [`Visit`]) carries
/// the condition and flags.
pub struct Rule {
    pub phase: Phase,
    shadow: bool,
    /// `when` depends only on the connection: see [`ConnectionMemo`].
    constant: bool,
    /// So does what the action sets (header values, a cohort): a match's effect is the
    /// connection's, and requests that match alike can share it.
    constant_action: bool,
    /// A match ends the phase (`allow`, `deny`).
    ends: bool,
    /// `when` reads `connection.client_ip` (a connection rule then waits for the handshake's end).
    reads_client_ip: bool,
    when: Expression<compiled::CompiledBool>,
    pub name: Arc<str>,
    /// `file:line` of the rule.
    pub location: Box<str>,
    action: Action,
    /// `mtls_edge_rule_evaluations_total` for this rule: matched, would_match, error (resolved
    /// once: a label lookup per request would cost more than most conditions).
    counters: [IntCounter; 3],
}

impl Rule {
    /// The action in words; a connection-phase deny refuses the handshake (no status).
    fn describe(&self) -> String {
        match (&self.action, self.phase) {
            (Action::Deny { .. }, Phase::Connection) => "deny (handshake)".into(),
            (Action::Deny { .. }, Phase::AfterHandshake) => "deny (after the handshake)".into(),
            (a, _) => a.describe(),
        }
    }
}

/// How a phase ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Decision {
    /// No `allow` or `deny` matched: the request goes on (a connection is accepted).
    #[default]
    Continue,
    Allow {
        rule: Arc<str>,
    },
    Deny {
        rule: Arc<str>,
        status: u16,
        body: Arc<str>,
    },
    /// A rule failed to evaluate: denied, fail closed.
    Error {
        rule: Arc<str>,
        message: String,
    },
}

/// A header change toward the origin, applied in rule order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp {
    Set(HeaderName, HeaderValue),
    Remove(HeaderName),
}

/// The result of one phase.
#[derive(Debug, Default)]
pub struct Outcome {
    pub decision: Decision,
    /// In rule order: a later rule's change wins over an earlier one's.
    pub headers: Vec<HeaderOp>,
    pub cohort: Option<String>,
    pub origin: Option<String>,
    /// What the proxy derives from this outcome for the cache key, made once for all the
    /// requests that share the outcome.
    pub cache_variants: std::sync::OnceLock<String>,
}

impl Outcome {
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The headers the rules set, as they stand after every change.
    pub fn headers_set(&self) -> Vec<(&HeaderName, &HeaderValue)> {
        let mut set: Vec<(&HeaderName, &HeaderValue)> = Vec::new();
        for op in &self.headers {
            match op {
                HeaderOp::Set(n, v) => {
                    set.retain(|(k, _)| *k != n);
                    set.push((n, v));
                }
                HeaderOp::Remove(n) => set.retain(|(k, _)| *k != n),
            }
        }
        set
    }

    pub fn denied(&self) -> bool {
        matches!(self.decision(), Decision::Deny { .. } | Decision::Error { .. })
    }
}

/// One rule's evaluation, for `rules explain`.
#[derive(Debug)]
pub struct Step {
    pub rule: Arc<str>,
    pub location: String,
    pub shadow: bool,
    pub action: String,
    /// `Ok(true)` when the condition held.
    pub result: Result<bool, String>,
}

impl Step {
    #[cold]
    fn of(rule: &Rule, result: &Result<bool, String>) -> Step {
        Step {
            rule: rule.name.clone(),
            location: rule.location.to_string(),
            shadow: rule.shadow,
            action: rule.describe(),
            result: result.clone(),
        }
    }
}

/// Every rule, compiled, with the lists they use.
pub struct RuleSet {
    rules: Vec<Rule>,
    /// The compiled conditions' tests (see `compiled`).
    tests: compiled::Tests,
    env: Arc<Env>,
    lists: Lists,
    /// Tells rule sets apart (a reload makes a new one), for [`ConnectionMemo`].
    id: u64,
    /// Some rule reads `connection.client_ip` (else the proxy does not format it).
    uses_client_ip: bool,
    /// Whether each phase has rules, known at load (asked on every handshake and request).
    has_connection_rules: bool,
    has_request_rules: bool,
    has_after_handshake_rules: bool,
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Per connection: the request-phase conditions that depend only on the connection (the
/// certificate, client IP, SNI, TLS version, ALPN, lists), evaluated once at its first request,
/// and the first few outcomes made only of effects that depend on the connection too. None of it
/// can change while the connection and the rule set last. What is kept of the conditions is the
/// list of rules a request still visits: a rule whose constant condition is false is not touched.
#[derive(Debug, Default)]
pub struct ConnectionMemo {
    visits: OnceLock<(u64, Vec<Visit>)>,
    /// Outcomes made only of such effects, by the rule set and the visits that held: the first
    /// few distinct ones of the connection (a device fetches a manifest, then an image...).
    outcomes: [OnceLock<Shared>; 4],
}

/// An outcome the requests of a connection share, and how many of them are not counted yet:
/// their matches are added to the rules' counters every [`Shared::BATCH`] requests and when
/// the connection closes, not one counter update per rule and request.
#[derive(Debug)]
struct Shared {
    id: u64,
    /// The visits that held, as bits (a connection shares outcomes over its first 64 visits).
    held: u64,
    out: Arc<Outcome>,
    /// The `matched` counters of the rules that held; `None` when a shadow rule is among them
    /// (each of its matches is logged, so each is counted as it happens).
    counters: Option<Box<[IntCounter]>>,
    pending: std::sync::atomic::AtomicU64,
}

impl Shared {
    const BATCH: u64 = 64;

    /// One more request shared this outcome: counted in the batch, or by `each` (shadow
    /// matches are counted and logged as they happen).
    fn count(&self, each: impl FnOnce()) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.counters.is_none() {
            return each();
        }
        if self.pending.fetch_add(1, Relaxed) + 1 >= Self::BATCH {
            self.flush();
        }
    }

    fn flush(&self) {
        let n = self.pending.swap(0, std::sync::atomic::Ordering::Relaxed);
        for c in self.counters.iter().flatten().filter(|_| n > 0) {
            c.inc_by(n);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Which of a phase's visits held: a bitset, inline for the first 64 visits.
#[derive(Debug, Default)]
struct Matches {
    first: u64,
    more: Vec<u64>,
}

impl Matches {
    /// The first 64 visits' bits.
    fn word(first: u64) -> Matches {
        Matches {
            first,
            more: Vec::new(),
        }
    }

    fn set(&mut self, k: usize) {
        match k.checked_sub(64) {
            None => self.first |= 1 << k,
            Some(k) => {
                let word = k / 64;
                if self.more.len() <= word {
                    self.more.resize(word + 1, 0);
                }
                self.more[word] |= 1 << (k % 64);
            }
        }
    }

    /// The positions set, in order.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.first)
            .chain(self.more.iter().copied())
            .enumerate()
            .flat_map(|(w, word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    let b = (bits != 0).then(|| bits.trailing_zeros() as usize)?;
                    bits &= bits - 1;
                    Some(w * 64 + b)
                })
            })
    }
}

/// A rule a request visits (16 bytes: a connection's visits are a few cache lines), and whether
/// its condition is known to hold for the whole connection. A constant condition that failed is
/// evaluated again by each request (it denies each time).
#[derive(Debug)]
pub struct Visit {
    rule: u32,
    /// What a request reads of the rule, copied (its compiled condition and the flags a match
    /// reads): a request does not touch the rule itself unless it matches.
    when: Option<compiled::CompiledBool>,
    holds: bool,
    shadow: bool,
    constant_action: bool,
    ends: bool,
}

const _: () = assert!(std::mem::size_of::<Visit>() == 16);

impl Visit {
    fn of(index: usize, rule: &Rule, holds: bool) -> Option<Visit> {
        Some(Visit {
            rule: u32::try_from(index).ok()?,
            when: rule.when.fast,
            holds,
            shadow: rule.shadow,
            constant_action: rule.constant_action,
            ends: rule.ends,
        })
    }
}

/// Whether an expression reads `connection.client_ip`, or the whole `connection` (which holds it).
fn reads_client_ip(program: &Program) -> bool {
    let mut paths = Vec::new();
    collect_paths(program.expression(), &mut Vec::new(), &mut paths);
    paths.iter().any(|(_, p)| match p.as_slice() {
        [root] => root == "connection",
        [root, field, ..] => root == "connection" && field == "client_ip",
        [] => false,
    })
}

/// Whether an expression depends only on the connection.
fn connection_constant(program: &Program) -> bool {
    let mut paths = Vec::new();
    collect_paths(program.expression(), &mut Vec::new(), &mut paths);
    paths
        .iter()
        .all(|(_, p)| matches!(p[0].as_str(), "client" | "lists" | "connection"))
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RuleSet({} rules)", self.rules.len())
    }
}

/// FNV-1a, 64 bits, as a non-negative int: stable across hosts, versions and restarts.
fn fnv1a(s: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// `stableHash(string)`.
fn stable_hash(s: &CelString) -> CelInt {
    CelInt::from(fnv1a(s.inner()))
}

/// An expression: the cel program (the reference), and its compiled form when it is in the
/// subset `compiled` covers.
struct Expression<F> {
    fast: Option<F>,
    /// Boxed: only the interpreter reads it.
    program: Box<Program>,
}

/// What an evaluation reads: the facts, and the cel interpreter's context over them, made on
/// first use (compiled expressions never need it).
struct Scope<'a> {
    facts: &'a Facts<'a>,
    tests: &'a compiled::Tests,
    env: &'a Arc<Env>,
    interpreter: std::cell::OnceCell<Context<'a, 'a>>,
}

impl<'a> Scope<'a> {
    fn new(env: &'a Arc<Env>, tests: &'a compiled::Tests, facts: &'a Facts<'a>) -> Self {
        Scope {
            facts,
            tests,
            env,
            interpreter: std::cell::OnceCell::new(),
        }
    }

    fn interpreter(&self) -> &Context<'a, 'a> {
        self.interpreter.get_or_init(|| {
            let mut ctx = Context::with_env(self.env.clone());
            ctx.set_variable_resolver(self.facts);
            ctx
        })
    }
}

impl Expression<compiled::CompiledBool> {
    /// Whether the condition holds; `None` when it fails (see `eval` for why).
    #[inline]
    fn holds(&self, scope: &Scope) -> Option<bool> {
        match self.fast {
            Some(c) => scope.tests.holds_once(c, scope.facts),
            None => self.eval(scope).ok(),
        }
    }

    #[inline(never)]
    fn eval(&self, scope: &Scope) -> Result<bool, String> {
        if let Some(c) = self.fast {
            return scope.tests.eval(c, scope.facts);
        }
        match self.program.execute(scope.interpreter()) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("condition gave {:?}, not a bool", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Expression<compiled::CompiledStr> {
    fn eval(&self, scope: &Scope) -> Result<String, String> {
        if let Some(f) = &self.fast {
            return f.eval(scope.facts);
        }
        match self.program.execute(scope.interpreter()) {
            Ok(Value::String(s)) => Ok(s.to_string()),
            Ok(other) => Err(format!("gave {:?}, not a string", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The CEL environment: the standard library, `list.contains(string)` and `stableHash(string)`.
fn environment() -> Env {
    let mut env = Env::stdlib();
    // Both declarations are static and unique: they cannot fail.
    let _ = cel::add_member_overload!(env, fn list_contains: (ListVal, CelString) -> CelBool, name = "contains");
    let _ = cel::add_overload!(env, fn stable_hash: (CelString) -> CelInt, name = "stableHash");
    env
}

impl RuleSet {
    pub fn empty() -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            tests: compiled::Tests::default(),
            env: Arc::new(environment()),
            lists: Lists::default(),
            id: next_id(),
            uses_client_ip: false,
            has_connection_rules: false,
            has_request_rules: false,
            has_after_handshake_rules: false,
        }
    }

    pub fn lists(&self) -> &Lists {
        &self.lists
    }

    pub fn uses_client_ip(&self) -> bool {
        self.uses_client_ip
    }

    pub fn has_phase(&self, phase: Phase) -> bool {
        match phase {
            Phase::Connection => self.has_connection_rules,
            Phase::Request => self.has_request_rules,
            Phase::AfterHandshake => self.has_after_handshake_rules,
        }
    }

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
            rules: Vec::new(),
            tests: compiled::Tests::default(),
            env: Arc::new(environment()),
            lists: Lists(Arc::new(lists)),
            id: next_id(),
            uses_client_ip: false,
            has_connection_rules: false,
            has_request_rules: false,
            has_after_handshake_rules: false,
        };
        let dir = ctx.path(&cfg.dir);
        let files = match rule_files(&dir) {
            Ok(f) => f,
            Err(e) => {
                ctx.error("rules.dir", e);
                return set;
            }
        };
        let mut names = std::collections::HashSet::new();
        let mut tests = compiled::Tests::default();
        for file in files {
            // How often each name has been seen in this file, to find the right one's line.
            let mut in_file: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
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
                match set.compile(spec, &text, line, origins, identity_header, &mut tests) {
                    Ok(rule) => set.rules.push(Rule {
                        location: location.into(),
                        ..rule
                    }),
                    Err(e) => ctx.error("rules.dir", format!("{location}: {e}")),
                }
            }
        }
        set.tests = tests;
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
        let [connection, request, after_handshake] = [Phase::Connection, Phase::Request, Phase::AfterHandshake]
            .map(|phase| set.rules.iter().any(|r| r.phase == phase));
        set.has_connection_rules = connection;
        set.has_request_rules = request;
        set.has_after_handshake_rules = after_handshake;
        set
    }

    fn compile(
        &self,
        spec: RuleSpec,
        text: &str,
        line: usize,
        origins: &[&str],
        identity_header: &dyn Fn(&HeaderName) -> bool,
        tests: &mut compiled::Tests,
    ) -> Result<Rule, String> {
        let name = spec.name.clone();
        let at = |field: &str| format!("rule '{name}': {field} (line {})", field_line(text, line, field));
        let phase = spec.phase;
        let expr = |field: &str, src: &str, want: Want| -> Result<Program, String> {
            let program = self.env.compile(src).map_err(|e| format!("{}: {e}", at(field)))?;
            self.check_names(&program, src, phase)
                .map_err(|e| format!("{}: {e}", at(field)))?;
            self.check_types(&program, phase, want)
                .map_err(|e| format!("{}: {e}", at(field)))?;
            Ok(program)
        };
        let when = expr("when", &spec.when, Want::Bool)?;
        let when = Expression {
            fast: compiled::compile_bool(when.expression(), &self.lists, tests),
            program: Box::new(when),
        };
        let mut string_expr = |p: Program| Expression {
            fast: compiled::compile_str(p.expression(), &self.lists, tests),
            program: Box::new(p),
        };
        let header = |n: &str| -> Result<HeaderName, String> {
            let h = HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("'{n}' is not a valid header name"))?;
            if identity_header(&h) {
                return Err(format!("'{n}' is an identity header: only the edge sets it"));
            }
            // Headers that frame or route the request: changing them toward the origin could
            // make the edge and the origin disagree about where a request ends.
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
            let mut out: Vec<(HeaderName, Expression<compiled::CompiledStr>)> = Vec::new();
            for (n, src) in h {
                out.push((
                    header(&n).map_err(|e| format!("{}: {e}", at("set_headers")))?,
                    string_expr(expr("set_headers", &src, Want::String)?),
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
            actions.push(Action::CacheCohort(string_expr(expr(
                "cache_cohort",
                &src,
                Want::String,
            )?)));
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
            constant: connection_constant(&when.program),
            constant_action: match &action {
                Action::SetHeaders(values) => values.iter().all(|(_, v)| connection_constant(&v.program)),
                Action::CacheCohort(v) => connection_constant(&v.program),
                Action::Allow | Action::Deny { .. } | Action::RemoveHeaders(_) | Action::Origin(_) => true,
            },
            ends: matches!(action, Action::Allow | Action::Deny { .. }),
            reads_client_ip: reads_client_ip(&when.program),
            when,
            action,
            counters,
        })
    }

    /// Every variable and field an expression names must exist in its phase.
    fn check_names(&self, program: &Program, src: &str, phase: Phase) -> Result<(), String> {
        let mut paths = Vec::new();
        collect_paths(program.expression(), &mut Vec::new(), &mut paths);
        for (id, path) in paths {
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
            let client = facts::ClientFacts::new(cert, true, 0);
            for path in ["/", "/firmware/images/x1/image.bin", "/api/acme/orders"] {
                let req = RequestInfo {
                    method: "GET",
                    host: "fleet.example",
                    path,
                    query: "",
                    headers: &headers,
                };
                let facts = Facts {
                    client: &client,
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

    /// Runs the rules of `phase` against `facts`. With `memo` (request phase), conditions that
    /// depend only on the connection are taken from its first evaluation, and an outcome made
    /// only of effects that depend on the connection is shared by the requests whose conditions
    /// match alike. With `trace`, every rule evaluated is recorded.
    pub fn evaluate(
        &self,
        phase: Phase,
        facts: &Facts,
        memo: Option<&ConnectionMemo>,
        trace: Option<&mut Vec<Step>>,
    ) -> Arc<Outcome> {
        let scope = Scope::new(&self.env, &self.tests, facts);
        if let (Some(memo), None) = (memo, &trace) {
            if let Some(out) = self.evaluate_on_connection(phase, &scope, memo) {
                return out;
            }
        }
        self.evaluate_in_full(phase, &scope, memo, trace)
    }

    /// The path of every request: the conditions a connection still visits, in order, up to the
    /// first rule that ends the phase; then the connection's outcome for that set of matches, or
    /// a new one. It has no error handling and records nothing, so that the code a request runs
    /// stays a few cache lines: `None` when a condition fails (the full path then evaluates
    /// again, and counts and logs the error).
    #[inline(never)]
    fn evaluate_on_connection(&self, phase: Phase, scope: &Scope, memo: &ConnectionMemo) -> Option<Arc<Outcome>> {
        let (id, visit) = match memo.visits.get() {
            Some(v) => v,
            None => memo.visits.get_or_init(|| self.visits(phase, scope)),
        };
        if *id != self.id || visit.len() > 64 {
            return None;
        }
        // Which visits held, as bits (a connection visits 64 rules at most on this path).
        let mut held = 0u64;
        let mut shared = true;
        for (k, v) in visit.iter().enumerate() {
            let holds = match (v.holds, v.when) {
                (true, _) => true,
                (false, Some(c)) => self.tests.holds(c, scope.facts)?,
                (false, None) => self.rules.get(v.rule as usize)?.when.holds(scope)?,
            };
            if !holds {
                continue;
            }
            held |= 1 << k;
            if !v.shadow {
                shared &= v.constant_action;
                if v.ends {
                    break;
                }
            }
        }
        if shared {
            let mut kept = memo.outcomes.iter().map_while(OnceLock::get);
            if let Some(s) = kept.find(|s| s.id == self.id && s.held == held) {
                s.count(|| self.count_matches(phase, visit, &Matches::word(held)));
                return Some(s.out.clone());
            }
        }
        Some(self.make_outcome(phase, scope, memo, visit, held, shared))
    }

    /// A new outcome for a connection's request, kept when requests can share it.
    #[cold]
    fn make_outcome(
        &self,
        phase: Phase,
        scope: &Scope,
        memo: &ConnectionMemo,
        visit: &[Visit],
        held: u64,
        shared: bool,
    ) -> Arc<Outcome> {
        let out = self.decide(phase, scope, visit, &Matches::word(held), None);
        if shared && !out.denied() {
            self.keep(memo, visit, held, &out);
        }
        out
    }

    /// Keeps a connection's new shared outcome in a free slot, if there is one (another request
    /// of the connection may take it first: then this outcome is not kept).
    #[cold]
    fn keep(&self, memo: &ConnectionMemo, visit: &[Visit], held: u64, out: &Arc<Outcome>) {
        let Some(free) = memo.outcomes.iter().find(|s| s.get().is_none()) else {
            return;
        };
        let rules: Vec<&Rule> = Matches::word(held)
            .iter()
            .filter_map(|k| visit.get(k).and_then(|v| self.rules.get(v.rule as usize)))
            .collect();
        let counters =
            (!rules.iter().any(|r| r.shadow)).then(|| rules.iter().map(|r| r.counters[MATCHED].clone()).collect());
        let _ = free.set(Shared {
            id: self.id,
            held,
            out: out.clone(),
            counters,
            pending: Default::default(),
        });
    }

    /// The rules of `phase` a connection visits: those whose condition depends only on the
    /// connection and is false are left out.
    #[cold]
    fn visits(&self, phase: Phase, scope: &Scope) -> (u64, Vec<Visit>) {
        let visit = self.in_phase(phase).filter_map(|(i, r)| {
            let known = r.constant.then(|| r.when.eval(scope));
            match known {
                Some(Ok(false)) => None,
                _ => Visit::of(i, r, known == Some(Ok(true))),
            }
        });
        (self.id, visit.collect())
    }

    fn in_phase(&self, phase: Phase) -> impl Iterator<Item = (usize, &Rule)> {
        self.rules.iter().enumerate().filter(move |(_, r)| r.phase == phase)
    }

    /// Counts the matches of a shared outcome.
    fn count_matches(&self, phase: Phase, visit: &[Visit], held: &Matches) {
        for k in held.iter() {
            if let Some(rule) = visit.get(k).and_then(|v| self.rules.get(v.rule as usize)) {
                count_match(rule, phase);
            }
        }
    }

    /// Every rule of the phase (or a connection's visits), errors handled, and each step
    /// recorded in `trace`: the connection phase, `rules explain`, requests whose conditions
    /// failed, and connections that visit more than 64 rules or began under another rule set.
    #[inline(never)]
    fn evaluate_in_full(
        &self,
        phase: Phase,
        scope: &Scope,
        memo: Option<&ConnectionMemo>,
        mut trace: Option<&mut Vec<Step>>,
    ) -> Arc<Outcome> {
        let remembered = memo
            .map(|m| m.visits.get_or_init(|| self.visits(phase, scope)))
            .filter(|(id, _)| *id == self.id);
        let every: Vec<Visit>;
        let visit = match remembered {
            Some((_, visit)) => visit.as_slice(),
            None => {
                every = self
                    .in_phase(phase)
                    .filter_map(|(i, rule)| Visit::of(i, rule, false))
                    .collect();
                every.as_slice()
            }
        };

        // Conditions first, in order, up to the first rule that ends the phase (a matching
        // allow or deny) or an error: which held, as a bitset over `visit`.
        let mut held = Matches::default();
        let mut failed = None;
        for (k, v) in visit.iter().enumerate() {
            let Some(rule) = self.rules.get(v.rule as usize) else {
                continue;
            };
            let result = match v.holds {
                true => Ok(true),
                false => rule.when.eval(scope),
            };
            if let Some(t) = trace.as_deref_mut() {
                t.push(Step::of(rule, &result));
            }
            match result {
                Ok(false) => {}
                Ok(true) => {
                    held.set(k);
                    if !rule.shadow && rule.ends {
                        break;
                    }
                }
                // A shadow rule's error changes nothing: counted and logged here.
                Err(message) if rule.shadow => count_error(rule, phase, &message),
                Err(message) => {
                    failed = Some((k, message));
                    break;
                }
            }
        }
        self.decide(phase, scope, visit, &held, failed)
    }

    /// Makes the outcome of the visits that `held` (and the one that `failed`): the actions in
    /// order, counted. Out of line: a request whose outcome is shared does not run it.
    #[inline(never)]
    fn decide(
        &self,
        phase: Phase,
        scope: &Scope,
        visit: &[Visit],
        held: &Matches,
        failed: Option<(usize, String)>,
    ) -> Arc<Outcome> {
        let mut out = Outcome::default();
        let failed_at = failed.as_ref().map(|(k, _)| *k);
        for k in held.iter().chain(failed_at) {
            let Some(v) = visit.get(k) else { continue };
            let Some(rule) = self.rules.get(v.rule as usize) else {
                continue;
            };
            let result = match &failed {
                Some((at, message)) if *at == k => Err(message.clone()),
                _ if rule.shadow => {
                    count_match(rule, phase);
                    continue;
                }
                _ => apply(rule, scope, &mut out),
            };
            match result {
                Ok(None) => record(rule, MATCHED),
                Ok(Some(decision)) => {
                    record(rule, MATCHED);
                    out.decision = decision;
                    break;
                }
                Err(message) => {
                    count_error(rule, phase, &message);
                    out.decision = Decision::Error {
                        rule: rule.name.clone(),
                        message,
                    };
                    break;
                }
            }
        }
        Arc::new(out)
    }
}

#[derive(Clone, Copy)]
enum Want {
    Bool,
    String,
}

const MATCHED: usize = 0;
const WOULD_MATCH: usize = 1;
const ERROR: usize = 2;

/// Counts a rule whose condition held: matched, or, for a shadow rule, would have matched.
#[inline]
fn count_match(rule: &Rule, phase: Phase) {
    match rule.shadow {
        false => record(rule, MATCHED),
        true => count_shadow_match(rule, phase),
    }
}

#[cold]
fn count_shadow_match(rule: &Rule, phase: Phase) {
    record(rule, WOULD_MATCH);
    info!(
        "shadow rule={} phase={} would={}",
        rule.name,
        phase.as_str(),
        rule.action.describe()
    );
}

/// Counts and logs a rule whose condition or action failed.
fn count_error(rule: &Rule, phase: Phase, message: &str) {
    record(rule, ERROR);
    warn!(
        "rule={} phase={} evaluation error: {message}",
        rule.name,
        phase.as_str()
    );
}

fn record(rule: &Rule, outcome: usize) {
    rule.counters[outcome].inc();
}

/// Applies a matched rule's action: `Some` decision ends the phase.
fn apply(rule: &Rule, scope: &Scope, out: &mut Outcome) -> Result<Option<Decision>, String> {
    match &rule.action {
        Action::Allow => {
            return Ok(Some(Decision::Allow {
                rule: rule.name.clone(),
            }))
        }
        Action::Deny { status, body } => {
            return Ok(Some(Decision::Deny {
                rule: rule.name.clone(),
                status: *status,
                body: body.clone(),
            }))
        }
        Action::SetHeaders(headers) => {
            for (name, value) in headers {
                let v = value.eval(scope)?;
                let v =
                    HeaderValue::from_str(&v).map_err(|_| format!("header {name}: value is not valid in a header"))?;
                out.headers.push(HeaderOp::Set(name.clone(), v));
            }
        }
        Action::RemoveHeaders(names) => out.headers.extend(names.iter().cloned().map(HeaderOp::Remove)),
        Action::CacheCohort(value) => out.cohort = Some(value.eval(scope)?),
        Action::Origin(o) => out.origin = Some(o.clone()),
    }
    Ok(None)
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

/// Every variable path (`client.cert.subject.cn`) an expression names, with its node id.
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

#[cfg(test)]
mod tests;
