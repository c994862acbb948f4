//! Conditions compiled to Rust closures: the common subset of CEL that rules are written in
//! (fields, string and int literals, `&&` `||` `!`, comparisons, `+` `%`, `in`, `startsWith`
//! `endsWith` `contains` `size`, lists, `stableHash`). The cel crate still parses, checks and
//! is the reference: an expression with anything else runs in its interpreter, and the tests
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

/// A compiled condition (`when`).
pub struct CompiledBool(BoolFn);

impl CompiledBool {
    pub fn eval(&self, f: &Facts) -> R<bool> {
        (self.0)(f)
    }
}

/// A compiled string value (`set_headers`, `cache_cohort`).
pub struct CompiledStr(StrFn);

impl CompiledStr {
    pub fn eval(&self, f: &Facts) -> R<String> {
        (self.0)(f).map(Cow::into_owned)
    }
}

pub fn compile_bool(e: &IdedExpr, lists: &Lists) -> Option<CompiledBool> {
    match node(e, lists)? {
        Node::Bool(b) => Some(CompiledBool(b)),
        _ => None,
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

/// Where a string field comes from. Kept as data (not a closure) so that the common shapes of a
/// condition (a field tested against literals) compile to one closure each.
enum StrSrc {
    Field(for<'a> fn(&'a Facts<'a>) -> &'a str),
    /// `client.cert.*` strings, by index in `facts::CLIENT_STRINGS`.
    Client(usize),
    /// `request.headers.NAME`: as the facts answer it (absent: `""`; several values joined).
    Header(HeaderName),
}

impl StrSrc {
    fn get<'a>(&self, f: &'a Facts<'a>) -> Cow<'a, str> {
        match self {
            StrSrc::Field(get) => Cow::Borrowed(get(f)),
            StrSrc::Client(i) => Cow::Borrowed(f.client.raw.strings.get(*i).map_or("", String::as_str)),
            StrSrc::Header(name) => f
                .request
                .map_or(Cow::Borrowed(""), |r| super::facts::header_value(r.headers, name)),
        }
    }

    fn header(name: &str) -> Option<StrSrc> {
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .ok()
            .map(StrSrc::Header)
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
        let field: for<'a> fn(&'a Facts<'a>) -> &'a str = match p.as_slice() {
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
            ["connection", "client_ip"] => |f| f.client_ip,
            ["connection", "sni"] => |f| &f.connection.sni,
            ["connection", "tls_version"] => |f| &f.connection.tls_version,
            ["connection", "alpn"] => |f| &f.connection.alpn,
            ["request", "method"] => |f| f.request.map_or("", |r| r.method),
            ["request", "host"] => |f| f.request.map_or("", |r| r.host),
            ["request", "path"] => |f| f.request.map_or("", |r| r.path),
            ["request", "query"] => |f| f.request.map_or("", |r| r.query),
            ["request", "headers", name] => return StrSrc::header(name),
            _ => return None,
        };
        Some(StrSrc::Field(field))
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

/// The common shapes, each one closure: a string field tested with `startsWith`, `endsWith` or
/// `contains` against a literal, compared (`==`, `!=`) with a literal, or looked up (`in`) in a
/// literal list; `negate` folds a `!` around it in.
fn fused(e: &Expr, negate: bool) -> Option<BoolFn> {
    let Expr::Call(c) = e else { return None };
    match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
        ("contains", Some(t), [a]) => {
            // The substring searcher is built once here, not on every request.
            let src = StrSrc::of(&t.expr)?;
            let finder = memchr::memmem::Finder::new(str_lit(&a.expr)?.as_bytes()).into_owned();
            Some(Box::new(move |f| {
                Ok(finder.find(src.get(f).as_bytes()).is_some() != negate)
            }))
        }
        ("startsWith" | "endsWith", Some(t), [a]) => {
            let (src, lit) = (StrSrc::of(&t.expr)?, Box::<str>::from(str_lit(&a.expr)?));
            let test: fn(&str, &str) -> bool = match c.func_name.as_str() {
                "startsWith" => |a, b| a.starts_with(b),
                _ => |a, b| a.ends_with(b),
            };
            Some(Box::new(move |f| Ok(test(&src.get(f), &lit) != negate)))
        }
        (op::EQUALS | op::NOT_EQUALS, None, [a, b]) => {
            let (src, lit) = match (StrSrc::of(&a.expr), str_lit(&b.expr)) {
                (Some(src), Some(lit)) => (src, lit),
                _ => (StrSrc::of(&b.expr)?, str_lit(&a.expr)?),
            };
            let (lit, negate) = (Box::<str>::from(lit), negate != (c.func_name == op::NOT_EQUALS));
            Some(Box::new(move |f| Ok((*src.get(f) == *lit) != negate)))
        }
        (op::IN, None, [a, b]) => {
            let Expr::List(l) = &b.expr else { return None };
            let set: Vec<Box<str>> = l
                .elements
                .iter()
                .map(|x| str_lit(&x.expr).map(Box::from))
                .collect::<Option<_>>()?;
            let src = StrSrc::of(&a.expr)?;
            Some(Box::new(move |f| {
                let v = src.get(f);
                Ok(set.iter().any(|s| **s == *v) != negate)
            }))
        }
        _ => None,
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
    if let Some(b) = fused(&e.expr, false) {
        return Some(Node::Bool(b));
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
                Some(Node::Int(Box::new(move |facts| Ok(s(facts)?.chars().count() as i64))))
            }
            _ => None,
        };
    }
    match (name, args.len()) {
        (op::LOGICAL_NOT, 1) => {
            if let Some(b) = fused(&args[0].expr, true) {
                return Some(Node::Bool(b));
            }
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
            Some(Node::Int(Box::new(move |f| Ok(s(f)?.chars().count() as i64))))
        }
        ("stableHash", 1) => {
            let s = arg(0)?.into_str()?;
            Some(Node::Int(Box::new(move |f| Ok(super::fnv1a(&s(f)?)))))
        }
        _ => None,
    }
}
