//! Lua-free rules: YAML files of rules whose conditions are CEL expressions, compiled and
//! checked once at load ([`Compiler`]), then evaluated per handshake (`connection` phase) or per
//! request (`request` phase) in file and line order. The first `allow` or `deny` that matches
//! ends a phase; the other actions accumulate. Errors at run time deny (fail closed).

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

pub(crate) mod compile;
mod condition;
pub mod explain;
pub mod facts;
pub mod lists;

use std::sync::Arc;

use cel::common::types::{CelBool, CelInt, CelString};
use cel::Env;
use http::{HeaderName, HeaderValue};
use log::{info, warn};
use pingora_prometheus::prometheus::IntCounter;

pub use compile::{Compiler, FRAMING};
pub use condition::{Condition, StrExpr};
pub use facts::{ConnectionInfo, Facts, RequestInfo};
use lists::{contains as list_contains, ListVal, Lists};

/// When a rule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// In the TLS handshake, once the chain has verified: a deny refuses the handshake.
    Connection,
    /// The connection phase from its first rule that reads `connection.client_ip` on: pingora's
    /// handshake callbacks see no socket, so these rules run when the connection's first
    /// request arrives, before it is served (a deny closes the connection unanswered). Set at
    /// load, never written in a rule file.
    AfterHandshake,
    /// For each request, before any cache lookup.
    Request,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connection | Phase::AfterHandshake => "connection",
            Phase::Request => "request",
        }
    }
}

/// What a rule does when its condition holds.
pub enum Action {
    Allow,
    Deny { status: u16, body: Arc<str> },
    SetHeaders(Vec<(HeaderName, StrExpr)>),
    RemoveHeaders(Vec<HeaderName>),
    CacheCohort(StrExpr),
    Origin(String),
}

impl Action {
    pub fn describe(&self) -> String {
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

/// A compiled rule.
pub struct Rule {
    pub name: Arc<str>,
    /// `file:line` of the rule.
    pub location: Box<str>,
    pub phase: Phase,
    shadow: bool,
    /// `when` reads `connection.client_ip` (a connection rule then waits for the handshake's end).
    reads_client_ip: bool,
    when: Condition,
    action: Action,
    /// `mtls_edge_rule_evaluations_total` for this rule: matched, would_match, error (resolved
    /// once: a label lookup hashes and locks).
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
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub decision: Decision,
    /// In rule order: a later rule's change wins over an earlier one's.
    pub headers: Vec<HeaderOp>,
    pub cohort: Option<String>,
    pub origin: Option<String>,
    /// The rules whose actions applied, in order, by index (`RuleSet::name`), for the access log.
    pub matched: Vec<u16>,
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

/// Every rule, compiled, with the lists they use.
pub struct RuleSet {
    /// In file name order, then in file order.
    rules: Vec<Rule>,
    env: Arc<Env>,
    lists: Lists,
    /// Some rule reads `connection.client_ip` (else the proxy does not format it).
    uses_client_ip: bool,
    /// The rules of each phase (`Phase as usize`), by index, in order.
    by_phase: [Vec<u16>; 3],
}

impl RuleSet {
    fn new(rules: Vec<Rule>, env: Arc<Env>, lists: Lists, uses_client_ip: bool) -> RuleSet {
        let by_phase = [Phase::Connection, Phase::AfterHandshake, Phase::Request].map(|phase| {
            (0..rules.len())
                .filter(|&i| rules[i].phase == phase)
                .filter_map(|i| u16::try_from(i).ok())
                .collect()
        });
        RuleSet {
            rules,
            env,
            lists,
            uses_client_ip,
            by_phase,
        }
    }
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

/// The CEL environment: the standard library, `list.contains(string)` and `stableHash(string)`.
fn environment() -> Env {
    let mut env = Env::stdlib();
    // Both declarations are static and unique: they cannot fail.
    let _ = cel::add_member_overload!(env, fn list_contains: (ListVal, CelString) -> CelBool, name = "contains");
    let _ = cel::add_overload!(env, fn stable_hash: (CelString) -> CelInt, name = "stableHash");
    env
}

const MATCHED: usize = 0;
const WOULD_MATCH: usize = 1;
const ERROR: usize = 2;

/// A string expression outside the rules (the rate limit's key), with the environment and lists
/// it runs with.
pub struct Expression {
    source: String,
    expr: StrExpr,
    env: Arc<Env>,
}

impl Expression {
    pub fn eval(&self, facts: &Facts) -> Result<String, String> {
        self.expr.eval(&self.env, facts)
    }
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expression({:?})", self.source)
    }
}

impl RuleSet {
    pub fn empty() -> RuleSet {
        RuleSet::new(Vec::new(), Arc::new(environment()), Lists::default(), false)
    }

    pub fn lists(&self) -> &Lists {
        &self.lists
    }

    pub fn uses_client_ip(&self) -> bool {
        self.uses_client_ip
    }

    pub fn has_phase(&self, phase: Phase) -> bool {
        !self.by_phase[phase as usize].is_empty()
    }

    /// The name of rule `index` (as `Outcome::matched` holds them).
    pub fn name(&self, index: u16) -> Option<&str> {
        self.rules.get(usize::from(index)).map(|r| &*r.name)
    }

    /// Runs the rules of `phases` against `facts`, in order, as one phase. With `trace`, every
    /// rule evaluated is recorded.
    pub fn evaluate(&self, phases: &[Phase], facts: &Facts, mut trace: Option<&mut Vec<Step>>) -> Outcome {
        let mut out = Outcome::default();
        // Connection rules come before those that wait for the handshake's end: phase by phase
        // is file order.
        let indices = phases.iter().flat_map(|p| &self.by_phase[*p as usize]);
        for (index, rule) in indices.filter_map(|&i| Some((i, self.rules.get(usize::from(i))?))) {
            let result = match (rule.when.holds(&self.env, facts), trace.as_deref_mut()) {
                // Most rules do not match: that way is the short one.
                (Ok(false), None) => continue,
                (result, None) => result.map_err(String::from),
                (result, Some(t)) => {
                    let result = result.map_err(String::from);
                    t.push(Step {
                        rule: rule.name.clone(),
                        location: rule.location.to_string(),
                        shadow: rule.shadow,
                        action: rule.describe(),
                        result: result.clone(),
                    });
                    result
                }
            };
            let applied = match (result, rule.shadow) {
                (Ok(false), _) => continue,
                (Ok(true), true) => {
                    count_shadow_match(rule);
                    continue;
                }
                // A shadow rule's error changes nothing: counted and logged.
                (Err(message), true) => {
                    count_error(rule, &message);
                    continue;
                }
                (Ok(true), false) => self.apply(rule, facts, &mut out),
                (Err(message), false) => Err(message),
            };
            match applied {
                Ok(decision) => {
                    rule.counters[MATCHED].inc();
                    out.matched.push(index);
                    if let Some(d) = decision {
                        out.decision = d;
                        break;
                    }
                }
                Err(message) => {
                    count_error(rule, &message);
                    out.matched.push(index);
                    out.decision = Decision::Error {
                        rule: rule.name.clone(),
                        message,
                    };
                    break;
                }
            }
        }
        out
    }

    /// Applies a matched rule's action: `Some` decision ends the phase.
    fn apply(&self, rule: &Rule, facts: &Facts, out: &mut Outcome) -> Result<Option<Decision>, String> {
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
                    // From the String itself: no second copy.
                    let v = HeaderValue::try_from(value.eval(&self.env, facts)?)
                        .map_err(|_| format!("header {name}: value is not valid in a header"))?;
                    out.headers.push(HeaderOp::Set(name.clone(), v));
                }
            }
            Action::RemoveHeaders(names) => out.headers.extend(names.iter().cloned().map(HeaderOp::Remove)),
            Action::CacheCohort(value) => out.cohort = Some(value.eval(&self.env, facts)?),
            Action::Origin(o) => out.origin = Some(o.clone()),
        }
        Ok(None)
    }
}

#[cold]
fn count_shadow_match(rule: &Rule) {
    rule.counters[WOULD_MATCH].inc();
    info!(
        "shadow rule={} phase={} would={}",
        rule.name,
        rule.phase.as_str(),
        rule.action.describe()
    );
}

/// Counts and logs a rule whose condition or action failed.
#[cold]
fn count_error(rule: &Rule, message: &str) {
    rule.counters[ERROR].inc();
    warn!(
        "rule={} phase={} evaluation error: {message}",
        rule.name,
        rule.phase.as_str()
    );
}

#[cfg(test)]
mod tests;
