//! Conditions compiled to native code: the common subset of CEL that rules are written in
//! (fields, string and int literals, `&&` `||` `!`, comparisons, `+` `%`, `in`, `startsWith`
//! `endsWith` `contains` `size`, lists, `stableHash`). The most common shapes are data ([`Test`])
//! run by one function; the rest of the subset are closures. The cel crate still parses, checks
//! and is the reference: an expression with anything else runs in its interpreter, and the tests
//! check that both give the same result. Compiled, a condition touches a few cache lines where
//! the interpreter resolves names and overloads through maps (about 4 µs a request, cold).

use std::borrow::Cow;
use std::sync::Arc;

use cel::common::ast::{operators as op, Expr, IdedExpr, LiteralValue};
use http::HeaderName;

use super::facts::Facts;
use super::lists::{Lists, RuleList};

type R<T> = Result<T, String>;
type BoolFn = Box<dyn Fn(&Facts) -> R<bool> + Send + Sync>;
type IntFn = Box<dyn Fn(&Facts) -> R<i64> + Send + Sync>;
type StrFn = Box<dyn for<'a> Fn(&'a Facts<'a>) -> R<Cow<'a, str>> + Send + Sync>;

/// A compiled expression, by its static type. Timestamps are unix seconds (every timestamp
/// rules see is whole seconds).
enum Node {
    Bool(BoolFn),
    Int(IntFn),
    Str(StrFn),
    /// A string literal, kept apart so that comparisons with it borrow instead of cloning.
    StrLit(String),
    Time(IntFn),
    /// `lists.NAME`: only as the target of `contains` or the right side of `in`.
    List(Arc<RuleList>),
    /// A literal list of strings or ints: only as the right side of `in`.
    StrSet(Vec<String>),
    IntSet(Vec<i64>),
}

/// A compiled condition (`when`). The common shapes are data run by one small function (see
/// [`Test`]): a request then touches the rule's own cache lines and that one function, instead of
/// a closure, its vtable and its captures for each condition.
pub enum CompiledBool {
    Test(Test),
    /// `a && b && ...`
    All(Box<[Part]>),
    /// `a || b || ...`
    Any(Box<[Part]>),
    Tree(BoolFn),
}

/// An operand of `&&` or `||`: a test, or any other compiled condition.
pub enum Part {
    Test(Test),
    Tree(BoolFn),
}

impl CompiledBool {
    pub fn eval(&self, f: &Facts) -> R<bool> {
        match self {
            CompiledBool::Test(t) => Ok(t.eval(f)),
            CompiledBool::All(parts) => logic(parts, f, false),
            CompiledBool::Any(parts) => logic(parts, f, true),
            CompiledBool::Tree(b) => b(f),
        }
    }
}

/// CEL's commutative `&&` (`decisive` false) and `||` (true): an operand with the decisive value
/// wins wherever it is, over errors in the others; otherwise the first error, if any.
fn logic(parts: &[Part], f: &Facts, decisive: bool) -> R<bool> {
    let mut error = None;
    for part in parts {
        let v = match part {
            Part::Test(t) => Ok(t.eval(f)),
            Part::Tree(b) => b(f),
        };
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

/// A compiled string value (`set_headers`, `cache_cohort`).
pub struct CompiledStr(StrFn);

impl CompiledStr {
    pub fn eval(&self, f: &Facts) -> R<String> {
        (self.0)(f).map(Cow::into_owned)
    }
}

pub fn compile_bool(e: &IdedExpr, lists: &Lists) -> Option<CompiledBool> {
    if let Some(t) = Test::of(&e.expr, false) {
        return Some(CompiledBool::Test(t));
    }
    for (op, all) in [(op::LOGICAL_AND, true), (op::LOGICAL_OR, false)] {
        let mut operands = Vec::new();
        if chain(e, op, &mut operands) {
            let part = |x: &IdedExpr| match Test::of(&x.expr, false) {
                Some(t) => Some(Part::Test(t)),
                None => match node(x, lists)? {
                    Node::Bool(b) => Some(Part::Tree(b)),
                    _ => None,
                },
            };
            let parts = operands.into_iter().map(part).collect::<Option<Box<[_]>>>()?;
            return Some(if all {
                CompiledBool::All(parts)
            } else {
                CompiledBool::Any(parts)
            });
        }
    }
    match node(e, lists)? {
        Node::Bool(b) => Some(CompiledBool::Tree(b)),
        _ => None,
    }
}

/// The operands of a chain of one logical operator (`a && b && c`), in order; false when `e`
/// is not such a chain.
fn chain<'e>(e: &'e IdedExpr, name: &str, out: &mut Vec<&'e IdedExpr>) -> bool {
    match &e.expr {
        Expr::Call(c) if c.func_name == name && c.target.is_none() && c.args.len() == 2 => {
            for a in &c.args {
                if !chain(a, name, out) {
                    out.push(a);
                }
            }
            true
        }
        _ => false,
    }
}

pub fn compile_str(e: &IdedExpr, lists: &Lists) -> Option<CompiledStr> {
    node(e, lists)?.into_str().map(CompiledStr)
}

impl Node {
    /// A string node as a closure (a literal is cloned on each evaluation).
    fn into_str(self) -> Option<StrFn> {
        match self {
            Node::Str(s) => Some(s),
            Node::StrLit(lit) => Some(Box::new(move |_| Ok(Cow::Owned(lit.clone())))),
            _ => None,
        }
    }
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

/// Where a string field comes from, as data read by one `match` (no call per field).
pub enum StrSrc {
    ClientIp,
    Sni,
    TlsVersion,
    Alpn,
    Method,
    Host,
    Path,
    Query,
    /// `client.cert.*` strings, by index in `facts::CLIENT_STRINGS`.
    Client(usize),
    /// `request.headers.NAME`: as the facts answer it (absent: `""`; several values joined).
    /// Boxed, to keep tests small.
    Header(Box<HeaderName>),
}

impl StrSrc {
    #[inline(never)]
    fn get<'a>(&self, f: &'a Facts<'a>) -> Cow<'a, str> {
        match self {
            StrSrc::ClientIp => Cow::Borrowed(f.client_ip),
            StrSrc::Sni => Cow::Borrowed(&f.connection.sni),
            StrSrc::TlsVersion => Cow::Borrowed(&f.connection.tls_version),
            StrSrc::Alpn => Cow::Borrowed(&f.connection.alpn),
            StrSrc::Method => Cow::Borrowed(f.request.map_or("", |r| r.method)),
            StrSrc::Host => Cow::Borrowed(f.request.map_or("", |r| r.host)),
            StrSrc::Path => Cow::Borrowed(f.request.map_or("", |r| r.path)),
            StrSrc::Query => Cow::Borrowed(f.request.map_or("", |r| r.query)),
            StrSrc::Client(i) => Cow::Borrowed(f.client.raw.strings.get(*i).map_or("", String::as_str)),
            StrSrc::Header(name) => f
                .request
                .map_or(Cow::Borrowed(""), |r| super::facts::header_value(r.headers, &**name)),
        }
    }

    fn header(name: &str) -> Option<StrSrc> {
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .ok()
            .map(|h| StrSrc::Header(Box::new(h)))
    }

    /// The string field an expression names, if it is one.
    fn of(e: &Expr) -> Option<StrSrc> {
        if let Expr::Call(c) = e {
            // `request.headers["name"]`
            return match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
                (op::INDEX, None, [a, b]) if path(&a.expr)? == ["request", "headers"] => match &b.expr {
                    Expr::Literal(LiteralValue::String(name)) => StrSrc::header(name.inner()),
                    _ => None,
                },
                _ => None,
            };
        }
        let p = path(e)?;
        Some(match p.as_slice() {
            ["client", "cert", "present" | "verified" | "days_until_expiry" | "not_before" | "not_after"] => {
                return None
            }
            ["client", "cert", ..] => {
                let name = p.join(".");
                return super::facts::CLIENT_STRINGS
                    .iter()
                    .position(|n| *n == name)
                    .map(StrSrc::Client);
            }
            ["connection", "client_ip"] => StrSrc::ClientIp,
            ["connection", "sni"] => StrSrc::Sni,
            ["connection", "tls_version"] => StrSrc::TlsVersion,
            ["connection", "alpn"] => StrSrc::Alpn,
            ["request", "method"] => StrSrc::Method,
            ["request", "host"] => StrSrc::Host,
            ["request", "path"] => StrSrc::Path,
            ["request", "query"] => StrSrc::Query,
            ["request", "headers", name] => return StrSrc::header(name),
            _ => return None,
        })
    }

    fn into_node(self) -> Node {
        Node::Str(Box::new(move |f| Ok(self.get(f))))
    }
}

fn field(p: &[&str], lists: &Lists) -> Option<Node> {
    match p {
        ["client", "cert", "present"] => Some(Node::Bool(Box::new(|f| Ok(f.client.raw.present)))),
        ["client", "cert", "verified"] => Some(Node::Bool(Box::new(|f| Ok(f.client.raw.verified)))),
        ["client", "cert", "days_until_expiry"] => Some(Node::Int(Box::new(|f| Ok(f.client.raw.days)))),
        ["client", "cert", "not_before"] => Some(Node::Time(Box::new(|f| Ok(f.client.raw.not_before)))),
        ["client", "cert", "not_after"] => Some(Node::Time(Box::new(|f| Ok(f.client.raw.not_after)))),
        ["lists", name] => Some(Node::List(lists.get_list(name)?.0.clone())),
        ["now"] => Some(Node::Time(Box::new(|f| Ok(f.now)))),
        _ => None,
    }
}

fn str_lit(e: &Expr) -> Option<&str> {
    match e {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

/// A literal string, inline when short (most are): comparing with it reads the rule's own lines.
pub enum Lit {
    Inline(u8, [u8; 22]),
    Heap(Box<[u8]>),
}

impl Lit {
    fn new(s: &str) -> Lit {
        let b = s.as_bytes();
        let mut inline = [0; 22];
        match inline.get_mut(..b.len()) {
            Some(dst) => {
                dst.copy_from_slice(b);
                Lit::Inline(b.len() as u8, inline)
            }
            None => Lit::Heap(b.into()),
        }
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        match self {
            Lit::Inline(n, b) => &b[..usize::from(*n)],
            Lit::Heap(b) => b,
        }
    }
}

/// The common shape of a condition: a string field tested against literals (`startsWith`,
/// `endsWith`, `contains`, `==`, `!=`, `in [...]`), or two ints or two timestamps compared, with
/// any `!` folded in. No test can fail.
pub enum Test {
    Str { src: StrSrc, op: StrOp, negate: bool },
    Int { a: IntSrc, cmp: Cmp, b: IntSrc },
}

pub enum StrOp {
    StartsWith(Lit),
    EndsWith(Lit),
    Eq(Lit),
    /// The searcher is built once here, not on every request (`str::contains` builds one per
    /// call); short strings are searched directly.
    Contains(Lit, Box<memchr::memmem::Finder<'static>>),
    In(Box<[Lit]>),
}

/// CEL's `size` of a string: its code points. Short ASCII strings (most queries and headers)
/// are counted without the general, vectorized count.
fn code_points(s: &str) -> i64 {
    let n = match s.len() < 64 && s.is_ascii() {
        true => s.len(),
        false => s.chars().count(),
    };
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// An int or a timestamp (unix seconds) a test compares.
pub enum IntSrc {
    Lit(i64),
    Now,
    NotBefore,
    NotAfter,
    DaysUntilExpiry,
    /// `size(s)`: the number of code points.
    Size(StrSrc),
}

#[derive(Clone, Copy)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Test {
    #[inline(never)]
    pub fn eval(&self, f: &Facts) -> bool {
        match self {
            Test::Str { src, op, negate } => {
                let v = src.get(f);
                let v = v.as_bytes();
                let held = match op {
                    StrOp::StartsWith(l) => v.starts_with(l.bytes()),
                    StrOp::EndsWith(l) => v.ends_with(l.bytes()),
                    StrOp::Eq(l) => v == l.bytes(),
                    // Short strings are searched directly, long ones with the searcher.
                    StrOp::Contains(l, _) if v.len() < 64 => {
                        let l = l.bytes();
                        l.is_empty() || v.iter().enumerate().any(|(i, &b)| b == l[0] && v[i..].starts_with(l))
                    }
                    StrOp::Contains(_, finder) => finder.find(v).is_some(),
                    StrOp::In(set) => set.iter().any(|l| v == l.bytes()),
                };
                held != *negate
            }
            Test::Int { a, cmp, b } => {
                let (x, y) = (a.get(f), b.get(f));
                match cmp {
                    Cmp::Eq => x == y,
                    Cmp::Ne => x != y,
                    Cmp::Lt => x < y,
                    Cmp::Le => x <= y,
                    Cmp::Gt => x > y,
                    Cmp::Ge => x >= y,
                }
            }
        }
    }

    /// The test `e` is (negated when `negate`), if it has one of the shapes.
    fn of(e: &Expr, negate: bool) -> Option<Test> {
        let Expr::Call(c) = e else { return None };
        let str_test = |src: &Expr, op: StrOp, negate: bool| {
            Some(Test::Str {
                src: StrSrc::of(src)?,
                op,
                negate,
            })
        };
        match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
            (op::LOGICAL_NOT, None, [a]) => Test::of(&a.expr, !negate),
            ("contains", Some(t), [a]) => {
                let l = str_lit(&a.expr)?;
                let finder = memchr::memmem::Finder::new(l.as_bytes()).into_owned();
                str_test(&t.expr, StrOp::Contains(Lit::new(l), Box::new(finder)), negate)
            }
            ("startsWith", Some(t), [a]) => str_test(&t.expr, StrOp::StartsWith(Lit::new(str_lit(&a.expr)?)), negate),
            ("endsWith", Some(t), [a]) => str_test(&t.expr, StrOp::EndsWith(Lit::new(str_lit(&a.expr)?)), negate),
            (op::IN, None, [a, b]) => {
                let Expr::List(l) = &b.expr else { return None };
                let set = l
                    .elements
                    .iter()
                    .map(|x| str_lit(&x.expr).map(Lit::new))
                    .collect::<Option<_>>()?;
                str_test(&a.expr, StrOp::In(set), negate)
            }
            (op::EQUALS | op::NOT_EQUALS, None, [a, b]) => {
                let negate = negate != (c.func_name == op::NOT_EQUALS);
                if let Some(l) = str_lit(&b.expr) {
                    return str_test(&a.expr, StrOp::Eq(Lit::new(l)), negate);
                }
                if let Some(l) = str_lit(&a.expr) {
                    return str_test(&b.expr, StrOp::Eq(Lit::new(l)), negate);
                }
                let cmp = if negate { Cmp::Ne } else { Cmp::Eq };
                Test::ints(&a.expr, cmp, &b.expr)
            }
            (op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS, None, [a, b]) => {
                let cmp = match (c.func_name.as_str(), negate) {
                    (op::LESS, false) | (op::GREATER_EQUALS, true) => Cmp::Lt,
                    (op::LESS_EQUALS, false) | (op::GREATER, true) => Cmp::Le,
                    (op::GREATER, false) | (op::LESS_EQUALS, true) => Cmp::Gt,
                    _ => Cmp::Ge,
                };
                Test::ints(&a.expr, cmp, &b.expr)
            }
            _ => None,
        }
    }

    /// Two ints, or two timestamps, compared (CEL compares nothing else with these operators).
    fn ints(a: &Expr, cmp: Cmp, b: &Expr) -> Option<Test> {
        let ((a, a_time), (b, b_time)) = (IntSrc::of(a)?, IntSrc::of(b)?);
        (a_time == b_time).then_some(Test::Int { a, cmp, b })
    }
}

impl IntSrc {
    #[inline(always)]
    fn get(&self, f: &Facts) -> i64 {
        match self {
            IntSrc::Lit(i) => *i,
            IntSrc::Now => f.now,
            IntSrc::NotBefore => f.client.raw.not_before,
            IntSrc::NotAfter => f.client.raw.not_after,
            IntSrc::DaysUntilExpiry => f.client.raw.days,
            IntSrc::Size(s) => code_points(&s.get(f)),
        }
    }

    /// The int `e` names, and whether it is a timestamp.
    fn of(e: &Expr) -> Option<(IntSrc, bool)> {
        if let Expr::Literal(LiteralValue::Int(i)) = e {
            return Some((IntSrc::Lit(*i.inner()), false));
        }
        if let Expr::Call(c) = e {
            return match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
                ("size", Some(s), []) | ("size", None, [s]) => Some((IntSrc::Size(StrSrc::of(&s.expr)?), false)),
                _ => None,
            };
        }
        match path(e)?.as_slice() {
            ["now"] => Some((IntSrc::Now, true)),
            ["client", "cert", "not_before"] => Some((IntSrc::NotBefore, true)),
            ["client", "cert", "not_after"] => Some((IntSrc::NotAfter, true)),
            ["client", "cert", "days_until_expiry"] => Some((IntSrc::DaysUntilExpiry, false)),
            _ => None,
        }
    }
}

fn literal(l: &LiteralValue) -> Option<Node> {
    match l {
        LiteralValue::Boolean(b) => {
            let b = *b.inner();
            Some(Node::Bool(Box::new(move |_| Ok(b))))
        }
        LiteralValue::Int(i) => {
            let i = *i.inner();
            Some(Node::Int(Box::new(move |_| Ok(i))))
        }
        LiteralValue::String(s) => Some(Node::StrLit(s.inner().to_string())),
        _ => None,
    }
}

fn node(e: &IdedExpr, lists: &Lists) -> Option<Node> {
    if let Some(src) = StrSrc::of(&e.expr) {
        return Some(src.into_node());
    }
    if let Some(t) = Test::of(&e.expr, false) {
        return Some(Node::Bool(Box::new(move |f| Ok(t.eval(f)))));
    }
    if let Some(p) = path(&e.expr) {
        return field(&p, lists);
    }
    match &e.expr {
        Expr::Literal(l) => literal(l),
        Expr::List(l) if l.optional_indices.is_empty() => {
            let items: Vec<&LiteralValue> = l
                .elements
                .iter()
                .map(|x| match &x.expr {
                    Expr::Literal(v) => Some(v),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            if let Some(strs) = items
                .iter()
                .map(|v| match v {
                    LiteralValue::String(s) => Some(s.inner().to_string()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
            {
                return Some(Node::StrSet(strs));
            }
            items
                .iter()
                .map(|v| match v {
                    LiteralValue::Int(i) => Some(*i.inner()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(Node::IntSet)
        }
        Expr::Call(c) => call(&c.func_name, c.target.as_deref(), &c.args, lists),
        _ => None,
    }
}

fn call(name: &str, target: Option<&IdedExpr>, args: &[IdedExpr], lists: &Lists) -> Option<Node> {
    let arg = |i: usize| args.get(i).and_then(|a| node(a, lists));
    if let Some(t) = target {
        let this = node(t, lists)?;
        return match (name, this, args.len()) {
            ("startsWith" | "endsWith" | "contains", this @ (Node::Str(_) | Node::StrLit(_)), 1) => {
                let s = this.into_str()?;
                let f: fn(&str, &str) -> bool = match name {
                    "startsWith" => |a, b| a.starts_with(b),
                    "endsWith" => |a, b| a.ends_with(b),
                    _ => |a, b| a.contains(b),
                };
                match arg(0)? {
                    Node::StrLit(lit) => Some(Node::Bool(Box::new(move |facts| Ok(f(&s(facts)?, &lit))))),
                    x => {
                        let x = x.into_str()?;
                        Some(Node::Bool(Box::new(move |facts| Ok(f(&s(facts)?, &x(facts)?)))))
                    }
                }
            }
            ("contains", Node::List(list), 1) => {
                let x = arg(0)?.into_str()?;
                Some(Node::Bool(Box::new(move |facts| Ok(list.contains(&x(facts)?)))))
            }
            ("size", this @ (Node::Str(_) | Node::StrLit(_)), 0) => {
                let s = this.into_str()?;
                Some(Node::Int(Box::new(move |facts| Ok(code_points(&s(facts)?)))))
            }
            _ => None,
        };
    }
    match (name, args.len()) {
        (op::LOGICAL_NOT, 1) => {
            let Node::Bool(a) = arg(0)? else { return None };
            Some(Node::Bool(Box::new(move |f| a(f).map(|v| !v))))
        }
        (op::LOGICAL_AND | op::LOGICAL_OR, 2) => {
            let (Node::Bool(a), Node::Bool(b)) = (arg(0)?, arg(1)?) else {
                return None;
            };
            // CEL's commutative logic: a decisive side wins over an error on the other.
            let decisive = name == op::LOGICAL_OR;
            Some(Node::Bool(Box::new(move |f| match a(f) {
                Ok(v) if v == decisive => Ok(v),
                Ok(_) => b(f),
                Err(e) => match b(f) {
                    Ok(v) if v == decisive => Ok(v),
                    _ => Err(e),
                },
            })))
        }
        (op::EQUALS | op::NOT_EQUALS, 2) => {
            let negate = name == op::NOT_EQUALS;
            let eq: BoolFn = match (arg(0)?, arg(1)?) {
                (Node::StrLit(a), Node::StrLit(b)) => Box::new(move |_| Ok(a == b)),
                (Node::Str(a), Node::StrLit(lit)) | (Node::StrLit(lit), Node::Str(a)) => {
                    Box::new(move |f| Ok(a(f)? == lit.as_str()))
                }
                (Node::Str(a), Node::Str(b)) => Box::new(move |f| Ok(a(f)? == b(f)?)),
                (Node::Int(a), Node::Int(b)) | (Node::Time(a), Node::Time(b)) => Box::new(move |f| Ok(a(f)? == b(f)?)),
                (Node::Bool(a), Node::Bool(b)) => Box::new(move |f| Ok(a(f)? == b(f)?)),
                _ => return None,
            };
            Some(Node::Bool(Box::new(move |f| eq(f).map(|v| v != negate))))
        }
        (op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS, 2) => {
            let (a, b) = match (arg(0)?, arg(1)?) {
                (Node::Int(a), Node::Int(b)) | (Node::Time(a), Node::Time(b)) => (a, b),
                _ => return None,
            };
            let cmp: fn(i64, i64) -> bool = match name {
                op::LESS => |x, y| x < y,
                op::LESS_EQUALS => |x, y| x <= y,
                op::GREATER => |x, y| x > y,
                _ => |x, y| x >= y,
            };
            Some(Node::Bool(Box::new(move |f| Ok(cmp(a(f)?, b(f)?)))))
        }
        (op::ADD, 2) => match (arg(0)?, arg(1)?) {
            (a @ (Node::Str(_) | Node::StrLit(_)), b @ (Node::Str(_) | Node::StrLit(_))) => {
                let (a, b) = (a.into_str()?, b.into_str()?);
                Some(Node::Str(Box::new(move |f| {
                    let mut s = a(f)?.into_owned();
                    s.push_str(&b(f)?);
                    Ok(Cow::Owned(s))
                })))
            }
            (Node::Int(a), Node::Int(b)) => Some(Node::Int(Box::new(move |f| {
                a(f)?.checked_add(b(f)?).ok_or_else(|| "integer overflow".to_string())
            }))),
            _ => None,
        },
        (op::MODULO, 2) => {
            let (Node::Int(a), Node::Int(b)) = (arg(0)?, arg(1)?) else {
                return None;
            };
            Some(Node::Int(Box::new(move |f| {
                let (x, y) = (a(f)?, b(f)?);
                x.checked_rem(y)
                    .ok_or_else(|| format!("modulus by zero or overflow: {x} % {y}"))
            })))
        }
        (op::IN, 2) => match (arg(0)?, arg(1)?) {
            (x @ (Node::Str(_) | Node::StrLit(_)), Node::List(list)) => {
                let x = x.into_str()?;
                Some(Node::Bool(Box::new(move |f| Ok(list.contains(&x(f)?)))))
            }
            (x @ (Node::Str(_) | Node::StrLit(_)), Node::StrSet(set)) => {
                let x = x.into_str()?;
                Some(Node::Bool(Box::new(move |f| {
                    let v = x(f)?;
                    Ok(set.iter().any(|s| *s == v))
                })))
            }
            (Node::Int(x), Node::IntSet(set)) => Some(Node::Bool(Box::new(move |f| Ok(set.contains(&x(f)?))))),
            _ => None,
        },
        ("size", 1) => {
            let s = arg(0)?.into_str()?;
            Some(Node::Int(Box::new(move |f| Ok(code_points(&s(f)?)))))
        }
        ("stableHash", 1) => {
            let s = arg(0)?.into_str()?;
            Some(Node::Int(Box::new(move |f| Ok(super::fnv1a(&s(f)?)))))
        }
        _ => None,
    }
}
