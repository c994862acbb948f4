//! Rule expressions as trees the edge evaluates itself: the subset of CEL that rules are written
//! in (fields, string and int literals, `&&` `||` `!`, comparisons, `+` `%`, `in`, `startsWith`
//! `endsWith` `contains` `size`, `exists` and `all` over a certificate's SANs, lists,
//! `stableHash`). An expression with anything else runs in the cel crate's interpreter, which
//! stays the reference: the tests check that both give the same answer, errors included.

use std::borrow::Cow;
use std::sync::Arc;

use cel::common::ast::{operators as op, ComprehensionExpr, Expr, IdedExpr, LiteralValue};
use cel::{Context, Env, Program, Value};
use http::HeaderName;

use super::facts::{Facts, Sans, StrField};
use super::lists::{Lists, RuleList};

type R<T> = Result<T, String>;

/// Why an expression failed, boxed: a result then fits in two registers on the way back up.
pub struct Fail(Box<str>);

impl From<Fail> for String {
    fn from(f: Fail) -> String {
        f.0.into()
    }
}

pub type Tree<T> = Result<T, Fail>;

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail(s.into())
    }
}

/// A compiled condition (`when`).
pub enum Condition {
    Tree(Cond),
    /// Boxed: a program is large, and only the interpreter reads it.
    Cel(Box<Program>),
}

/// A compiled string expression (`set_headers` values, `cache_cohort`).
pub enum StrExpr {
    Tree(Str),
    Cel(Box<Program>),
}

impl Condition {
    pub fn compile(program: Program, lists: &Lists) -> Condition {
        match Compiler::new(lists).cond(program.expression()) {
            Some(tree) => Condition::Tree(tree),
            None => Condition::Cel(Box::new(program)),
        }
    }

    /// Whether the condition holds, or why it failed.
    #[inline]
    pub fn holds(&self, env: &Arc<Env>, f: &Facts) -> Tree<bool> {
        match self {
            Condition::Tree(c) => c.eval(f, None),
            Condition::Cel(p) => match interpret(p, env, f)? {
                Value::Bool(b) => Ok(b),
                other => Err(format!("condition gave {:?}, not a bool", other.type_of()).into()),
            },
        }
    }

    pub fn eval(&self, env: &Arc<Env>, f: &Facts) -> R<bool> {
        self.holds(env, f).map_err(String::from)
    }

    /// Whether the condition runs in the interpreter.
    #[cfg(test)]
    pub fn interpreted(&self) -> bool {
        matches!(self, Condition::Cel(_))
    }
}

impl StrExpr {
    pub fn compile(program: Program, lists: &Lists) -> StrExpr {
        match Compiler::new(lists).string(program.expression()) {
            Some(tree) => StrExpr::Tree(tree),
            None => StrExpr::Cel(Box::new(program)),
        }
    }

    pub fn eval(&self, env: &Arc<Env>, f: &Facts) -> R<String> {
        match self {
            StrExpr::Tree(s) => Ok(s.eval(f, None).into_owned()),
            StrExpr::Cel(p) => match interpret(p, env, f)? {
                Value::String(s) => Ok(s.to_string()),
                other => Err(format!("gave {:?}, not a string", other.type_of())),
            },
        }
    }
}

fn interpret(p: &Program, env: &Arc<Env>, f: &Facts) -> R<Value> {
    let mut ctx = Context::with_env(env.clone());
    ctx.set_variable_resolver(f);
    p.execute(&ctx).map_err(|e| e.to_string())
}

/// A boolean expression.
pub enum Cond {
    Lit(bool),
    /// `client.cert.present` (`false`) or `client.cert.verified` (`true`).
    Field {
        verified: bool,
    },
    Not(Box<Cond>),
    /// `&&`, flattened.
    All(Box<[Cond]>),
    /// `||`, flattened.
    Any(Box<[Cond]>),
    /// `a == b`, `a.startsWith(b)`, `a.endsWith(b)`, `a.contains(b)`.
    Str {
        a: Str,
        how: How,
        b: Str,
    },
    /// The same against a literal.
    StrLit {
        a: Str,
        how: How,
        lit: Box<str>,
    },
    /// A field against a literal, the commonest shape.
    FieldLit {
        field: StrField,
        how: How,
        lit: Box<str>,
    },
    /// `a in ["x", "y"]`.
    StrIn {
        a: Str,
        set: Box<[Box<str>]>,
    },
    /// Two ints, or two timestamps, compared.
    Cmp {
        a: Num,
        cmp: Cmp,
        b: Num,
    },
    /// `a in [1, 2]`.
    IntIn {
        a: Num,
        set: Box<[i64]>,
    },
    BoolEq {
        a: Box<Cond>,
        b: Box<Cond>,
    },
    /// `a in lists.NAME`, `lists.NAME.contains(a)`.
    InList {
        a: Str,
        list: Arc<RuleList>,
    },
    /// The same for `client.cert.serial`, by the key the certificate keeps.
    SerialInList(Arc<RuleList>),
    /// `a in client.cert.san.dns`.
    InSans {
        a: Str,
        sans: Sans,
    },
    /// `client.cert.san.dns.exists(d, ...)` (`all: false`) or `.all(d, ...)`; the body reads the
    /// element as [`Str::Item`].
    Each {
        all: bool,
        sans: Sans,
        body: Box<Cond>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    Eq,
    Prefix,
    Suffix,
    Contains,
}

impl How {
    fn holds(self, a: &str, b: &str) -> bool {
        match self {
            How::Eq => a == b,
            How::Prefix => a.starts_with(b),
            How::Suffix => a.ends_with(b),
            // Most fields are short: a plain scan beats setting up the general searcher.
            How::Contains if a.len() < 64 => b.is_empty() || a.as_bytes().windows(b.len()).any(|w| w == b.as_bytes()),
            How::Contains => a.contains(b),
        }
    }
}

/// A string expression. Reading one never fails.
pub enum Str {
    Lit(Box<str>),
    Field(StrField),
    /// `request.headers.NAME`: `""` when absent, several values joined.
    Header(HeaderName),
    /// The element an `exists` or `all` is at.
    Item,
    Concat(Box<Str>, Box<Str>),
}

/// An int, or a timestamp as unix seconds (every timestamp rules see is whole seconds).
pub enum Num {
    Lit(i64),
    Now,
    NotBefore,
    NotAfter,
    DaysUntilExpiry,
    /// `size(s)`: code points.
    Size(Box<Str>),
    StableHash(Box<Str>),
    Add(Box<Num>, Box<Num>),
    Mod(Box<Num>, Box<Num>),
}

/// A comparison, as the orderings for which it holds: less (bit 0), equal (1), greater (2).
#[derive(Clone, Copy, Debug)]
pub struct Cmp(u8);

impl Cmp {
    fn of(op: &str) -> Option<Cmp> {
        Some(Cmp(match op {
            op::LESS => 0b001,
            op::LESS_EQUALS => 0b011,
            op::EQUALS => 0b010,
            op::NOT_EQUALS => 0b101,
            op::GREATER_EQUALS => 0b110,
            op::GREATER => 0b100,
            _ => return None,
        }))
    }

    fn holds(self, x: i64, y: i64) -> bool {
        self.0 & (1 << (x.cmp(&y) as i8 + 1)) != 0
    }
}

/// CEL's commutative `&&` (`decisive: false`) and `||` (`true`): an operand with the deciding
/// value wins wherever it is, over errors in the others; otherwise the first error, if any.
fn logic(decisive: bool, mut values: impl Iterator<Item = Tree<bool>>) -> Tree<bool> {
    let mut error = None;
    for v in values.by_ref() {
        match v {
            Ok(v) if v == decisive => return Ok(v),
            Ok(_) => {}
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    error.map_or(Ok(!decisive), Err)
}

impl Cond {
    fn eval(&self, f: &Facts, item: Option<&str>) -> Tree<bool> {
        Ok(match self {
            Cond::Lit(b) => *b,
            Cond::Field { verified } => f.cert.is_some() && (!verified || f.verified),
            Cond::Not(c) => !c.eval(f, item)?,
            Cond::All(cs) => return logic(false, cs.iter().map(|c| c.eval(f, item))),
            Cond::Any(cs) => return logic(true, cs.iter().map(|c| c.eval(f, item))),
            Cond::Str { a, how, b } => how.holds(&a.eval(f, item), &b.eval(f, item)),
            Cond::StrLit { a, how, lit } => how.holds(&a.eval(f, item), lit),
            Cond::FieldLit { field, how, lit } => how.holds(f.str_field(*field), lit),
            Cond::StrIn { a, set } => {
                let a = a.eval(f, item);
                set.iter().any(|s| **s == *a)
            }
            Cond::Cmp { a, cmp, b } => cmp.holds(a.eval(f, item)?, b.eval(f, item)?),
            Cond::IntIn { a, set } => set.contains(&a.eval(f, item)?),
            Cond::BoolEq { a, b } => a.eval(f, item)? == b.eval(f, item)?,
            Cond::InList { a, list } => list.contains(&a.eval(f, item)),
            Cond::SerialInList(list) => f.cert.is_some_and(|c| list.contains_serial(c)),
            Cond::InSans { a, sans } => {
                let a = a.eval(f, item);
                f.sans(*sans).iter().any(|s| *s == *a)
            }
            Cond::Each { all, sans, body } => {
                let mut each = f.sans(*sans).iter().map(|s| body.eval(f, Some(s)));
                return logic(!all, &mut each);
            }
        })
    }
}

impl Str {
    pub fn eval<'a>(&'a self, f: &'a Facts<'a>, item: Option<&'a str>) -> Cow<'a, str> {
        match self {
            Str::Lit(s) => Cow::Borrowed(s),
            Str::Field(field) => Cow::Borrowed(f.str_field(*field)),
            Str::Header(name) => f.request.map_or(Cow::Borrowed(""), |r| r.header(name)),
            Str::Item => Cow::Borrowed(item.unwrap_or_default()),
            Str::Concat(a, b) => {
                let mut s = a.eval(f, item).into_owned();
                s.push_str(&b.eval(f, item));
                Cow::Owned(s)
            }
        }
    }
}

/// CEL's `size` of a string: its code points.
fn code_points(s: &str) -> i64 {
    let n = if s.is_ascii() { s.len() } else { s.chars().count() };
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Num {
    fn eval(&self, f: &Facts, item: Option<&str>) -> Tree<i64> {
        Ok(match self {
            Num::Lit(i) => *i,
            Num::Now => f.now,
            Num::NotBefore => f.cert.map_or(0, |c| c.not_before),
            Num::NotAfter => f.cert.map_or(0, |c| c.not_after),
            Num::DaysUntilExpiry => f.days_until_expiry(),
            Num::Size(s) => code_points(&s.eval(f, item)),
            Num::StableHash(s) => super::fnv1a(&s.eval(f, item)),
            Num::Add(a, b) => a
                .eval(f, item)?
                .checked_add(b.eval(f, item)?)
                .ok_or_else(|| Fail::from("integer overflow".to_string()))?,
            Num::Mod(a, b) => {
                let (x, y) = (a.eval(f, item)?, b.eval(f, item)?);
                x.checked_rem(y)
                    .ok_or_else(|| Fail::from(format!("modulus by zero or overflow: {x} % {y}")))?
            }
        })
    }
}

/// Whether a number is an int or a timestamp: CEL compares only like with like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Time,
}

/// What a list expression is, for `in`.
enum ListOf {
    Strs(Box<[Box<str>]>),
    Ints(Box<[i64]>),
    Named(Arc<RuleList>),
    Sans(Sans),
}

/// Turns cel expressions into trees; `None` for anything outside the subset.
struct Compiler<'l> {
    lists: &'l Lists,
    /// The variable an enclosing `exists` or `all` binds (one level: nested ones are interpreted).
    item: Option<String>,
}

fn path(e: &Expr) -> Option<Vec<&str>> {
    match e {
        Expr::Ident(name) => Some(vec![name.as_str()]),
        Expr::Select(s) if !s.test => {
            let mut p = path(&s.operand.expr)?;
            p.push(&s.field);
            Some(p)
        }
        _ => None,
    }
}

/// `a HOW b`, with a literal `b` kept apart.
fn str_test(a: Str, how: How, b: Str) -> Cond {
    match (a, b) {
        (Str::Field(field), Str::Lit(lit)) => Cond::FieldLit { field, how, lit },
        (a, Str::Lit(lit)) => Cond::StrLit { a, how, lit },
        (a, b) => Cond::Str { a, how, b },
    }
}

/// `a` in a named list.
fn in_list(a: Str, list: Arc<RuleList>) -> Cond {
    match a {
        Str::Field(StrField::Serial) => Cond::SerialInList(list),
        a => Cond::InList { a, list },
    }
}

fn header(name: &str) -> Option<Str> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .ok()
        .map(Str::Header)
}

impl<'l> Compiler<'l> {
    fn new(lists: &'l Lists) -> Self {
        Compiler { lists, item: None }
    }

    fn cond(&mut self, e: &IdedExpr) -> Option<Cond> {
        match &e.expr {
            Expr::Literal(LiteralValue::Boolean(b)) => Some(Cond::Lit(*b.inner())),
            Expr::Comprehension(c) => self.each(c),
            Expr::Call(c) => self.call(&c.func_name, c.target.as_deref(), &c.args),
            _ => match path(&e.expr)?.as_slice() {
                ["client", "cert", "present"] => Some(Cond::Field { verified: false }),
                ["client", "cert", "verified"] => Some(Cond::Field { verified: true }),
                _ => None,
            },
        }
    }

    fn call(&mut self, name: &str, target: Option<&IdedExpr>, args: &[IdedExpr]) -> Option<Cond> {
        if let Some(t) = target {
            let [arg] = args else { return None };
            let how = match name {
                "startsWith" => How::Prefix,
                "endsWith" => How::Suffix,
                "contains" => {
                    if let Some(list) = self.named_list(t) {
                        return Some(in_list(self.string(arg)?, list));
                    }
                    How::Contains
                }
                _ => return None,
            };
            return Some(str_test(self.string(t)?, how, self.string(arg)?));
        }
        match (name, args) {
            (op::LOGICAL_NOT, [a]) => Some(Cond::Not(Box::new(self.cond(a)?))),
            (op::LOGICAL_AND | op::LOGICAL_OR, [_, _]) => {
                let mut operands = Vec::new();
                self.chain(name, args, &mut operands)?;
                let operands = operands.into_boxed_slice();
                Some(match name == op::LOGICAL_AND {
                    true => Cond::All(operands),
                    false => Cond::Any(operands),
                })
            }
            (op::EQUALS | op::NOT_EQUALS, [a, b]) => {
                let eq = self.equals(a, b)?;
                Some(match name == op::NOT_EQUALS {
                    true => Cond::Not(Box::new(eq)),
                    false => eq,
                })
            }
            (op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS, [a, b]) => {
                let ((a, ka), (b, kb)) = (self.num(a)?, self.num(b)?);
                (ka == kb).then_some(Cond::Cmp {
                    a,
                    cmp: Cmp::of(name)?,
                    b,
                })
            }
            (op::IN, [a, b]) => Some(match self.list(b)? {
                ListOf::Strs(set) => Cond::StrIn {
                    a: self.string(a)?,
                    set,
                },
                ListOf::Ints(set) => {
                    let (a, kind) = self.num(a)?;
                    (kind == Kind::Int).then_some(Cond::IntIn { a, set })?
                }
                ListOf::Named(list) => Cond::InList {
                    a: self.string(a)?,
                    list,
                },
                ListOf::Sans(sans) => Cond::InSans {
                    a: self.string(a)?,
                    sans,
                },
            }),
            _ => None,
        }
    }

    /// The operands of a chain of one logical operator, flattened.
    fn chain(&mut self, name: &str, args: &[IdedExpr], out: &mut Vec<Cond>) -> Option<()> {
        for a in args {
            match &a.expr {
                Expr::Call(c) if c.func_name == name && c.target.is_none() && c.args.len() == 2 => {
                    self.chain(name, &c.args, out)?
                }
                _ => out.push(self.cond(a)?),
            }
        }
        Some(())
    }

    /// `a == b` for strings, ints, timestamps or bools.
    fn equals(&mut self, a: &IdedExpr, b: &IdedExpr) -> Option<Cond> {
        if let (Some(a), Some(b)) = (self.string(a), self.string(b)) {
            return Some(match a {
                // `"x" == field` reads as `field == "x"`.
                Str::Lit(lit) => str_test(b, How::Eq, Str::Lit(lit)),
                a => str_test(a, How::Eq, b),
            });
        }
        if let (Some((a, ka)), Some((b, kb))) = (self.num(a), self.num(b)) {
            return (ka == kb).then_some(Cond::Cmp {
                a,
                cmp: Cmp::of(op::EQUALS)?,
                b,
            });
        }
        Some(Cond::BoolEq {
            a: Box::new(self.cond(a)?),
            b: Box::new(self.cond(b)?),
        })
    }

    /// `SANS.exists(x, body)` or `SANS.all(x, body)`, as the cel parser expands them.
    fn each(&mut self, c: &ComprehensionExpr) -> Option<Cond> {
        if self.item.is_some() || c.iter_var2.is_some() {
            return None;
        }
        let sans = self.sans(&c.iter_range)?;
        let all = match &c.accu_init.expr {
            Expr::Literal(LiteralValue::Boolean(b)) => *b.inner(),
            _ => return None,
        };
        let Expr::Call(step) = &c.loop_step.expr else {
            return None;
        };
        let want = if all { op::LOGICAL_AND } else { op::LOGICAL_OR };
        let [accu, body] = step.args.as_slice() else {
            return None;
        };
        let accumulates = matches!(&accu.expr, Expr::Ident(n) if *n == c.accu_var);
        let result_is_accu = matches!(&c.result.expr, Expr::Ident(n) if *n == c.accu_var);
        if step.func_name != want || !accumulates || !result_is_accu {
            return None;
        }
        self.item = Some(c.iter_var.clone());
        let body = self.cond(body);
        self.item = None;
        Some(Cond::Each {
            all,
            sans,
            body: Box::new(body?),
        })
    }

    fn string(&mut self, e: &IdedExpr) -> Option<Str> {
        match &e.expr {
            Expr::Literal(LiteralValue::String(s)) => return Some(Str::Lit(s.inner().into())),
            Expr::Ident(name) if self.item.as_deref() == Some(name.as_str()) => return Some(Str::Item),
            Expr::Call(c) => {
                return match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
                    (op::ADD, None, [a, b]) => Some(Str::Concat(Box::new(self.string(a)?), Box::new(self.string(b)?))),
                    // `request.headers["name"]`
                    (op::INDEX, None, [a, b]) if path(&a.expr)? == ["request", "headers"] => match &b.expr {
                        Expr::Literal(LiteralValue::String(name)) => header(name.inner()),
                        _ => None,
                    },
                    _ => None,
                };
            }
            _ => {}
        }
        if self.item.is_some() && path(&e.expr)?.first().copied() == self.item.as_deref() {
            return None;
        }
        match path(&e.expr)?.as_slice() {
            ["request", "headers", name] => header(name),
            p => StrField::of(p).map(Str::Field),
        }
    }

    fn num(&mut self, e: &IdedExpr) -> Option<(Num, Kind)> {
        match &e.expr {
            Expr::Literal(LiteralValue::Int(i)) => return Some((Num::Lit(*i.inner()), Kind::Int)),
            Expr::Call(c) => {
                let int = |n: Num| Some((n, Kind::Int));
                return match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
                    ("size", Some(s), []) | ("size", None, [s]) => int(Num::Size(Box::new(self.string(s)?))),
                    ("stableHash", None, [s]) => int(Num::StableHash(Box::new(self.string(s)?))),
                    (op::ADD | op::MODULO, None, [a, b]) => {
                        let ((a, ka), (b, kb)) = (self.num(a)?, self.num(b)?);
                        if ka != Kind::Int || kb != Kind::Int {
                            return None;
                        }
                        let (a, b) = (Box::new(a), Box::new(b));
                        int(match c.func_name == op::ADD {
                            true => Num::Add(a, b),
                            false => Num::Mod(a, b),
                        })
                    }
                    _ => None,
                };
            }
            _ => {}
        }
        Some(match path(&e.expr)?.as_slice() {
            ["now"] => (Num::Now, Kind::Time),
            ["client", "cert", "not_before"] => (Num::NotBefore, Kind::Time),
            ["client", "cert", "not_after"] => (Num::NotAfter, Kind::Time),
            ["client", "cert", "days_until_expiry"] => (Num::DaysUntilExpiry, Kind::Int),
            _ => return None,
        })
    }

    fn named_list(&self, e: &IdedExpr) -> Option<Arc<RuleList>> {
        match path(&e.expr)?.as_slice() {
            ["lists", name] => Some(self.lists.get_list(name)?.0.clone()),
            _ => None,
        }
    }

    fn sans(&self, e: &IdedExpr) -> Option<Sans> {
        match path(&e.expr)?.as_slice() {
            ["client", "cert", "san", kind] => Sans::of(kind),
            _ => None,
        }
    }

    fn list(&self, e: &IdedExpr) -> Option<ListOf> {
        if let Some(list) = self.named_list(e) {
            return Some(ListOf::Named(list));
        }
        if let Some(sans) = self.sans(e) {
            return Some(ListOf::Sans(sans));
        }
        let Expr::List(l) = &e.expr else { return None };
        if !l.optional_indices.is_empty() {
            return None;
        }
        let lit = |x: &IdedExpr| match &x.expr {
            Expr::Literal(v) => Some(v.clone()),
            _ => None,
        };
        let items: Vec<LiteralValue> = l.elements.iter().map(lit).collect::<Option<_>>()?;
        let strs = items.iter().map(|v| match v {
            LiteralValue::String(s) => Some(Box::from(s.inner())),
            _ => None,
        });
        if let Some(strs) = strs.collect::<Option<Box<[Box<str>]>>>() {
            return Some(ListOf::Strs(strs));
        }
        let ints = items.iter().map(|v| match v {
            LiteralValue::Int(i) => Some(*i.inner()),
            _ => None,
        });
        ints.collect::<Option<Box<[i64]>>>().map(ListOf::Ints)
    }
}
