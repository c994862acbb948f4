//! Conditions compiled to native code: the common subset of CEL that rules are written in
//! (fields, string and int literals, `&&` `||` `!`, comparisons, `+` `%`, `in`, `startsWith`
//! `endsWith` `contains` `size`, lists, `stableHash`). A condition is a chain of tests in its rule
//! set's flat table ([`Tests`]): the common shapes are data read by one loop, the rest of the
//! subset are closures the table holds. The cel crate still parses, checks and is the reference:
//! an expression with anything else runs in its interpreter, and the tests check that both give
//! the same result. Compiled, a condition touches a few cache lines where the interpreter
//! resolves names and overloads through maps (about 4 µs a request, cold).

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

/// A rule set's compiled conditions, flat: the tests of every condition in one array (24 bytes
/// each), their string literals in one buffer, and the header names, searchers and closures
/// they use in tables. The conditions a request evaluates then read a few contiguous cache lines
/// and run one loop ([`Tests::holds`]), not a tree of boxes and closures, each with its own code.
#[derive(Default)]
pub struct Tests {
    tests: Vec<Test>,
    /// String literals, each a length (u16, little-endian) and its bytes; a test's in a row.
    lits: Vec<u8>,
    headers: Vec<HeaderName>,
    finders: Vec<memchr::memmem::Finder<'static>>,
    trees: Vec<BoolFn>,
}

/// A compiled condition (`when`): tests `start..start + len` of the rule set's [`Tests`], which
/// must all hold (`&&`), or one of which must (`any`: `||`). A lone test is a chain of one.
#[derive(Clone, Copy, Debug)]
pub struct CompiledBool {
    start: u32,
    len: u16,
    any: bool,
}

impl Tests {
    /// Whether `c` holds; `None` when, before the chain is decided, one of its closures fails or
    /// a header's value would have to be built ([`Tests::eval`] then gives CEL's answer and the
    /// error). Every request runs this, inlined into its loop over the rules (the tables'
    /// addresses are then loaded once a request); other callers take [`Tests::holds_once`].
    #[inline(always)]
    pub fn holds(&self, c: CompiledBool, f: &Facts) -> Option<bool> {
        let tests = self.tests.get(c.start as usize..)?.get(..usize::from(c.len))?;
        for t in tests {
            let v = self.test(t, f, |s| s.borrowed(f, &self.headers))?;
            if v == c.any {
                return Some(v);
            }
        }
        Some(!c.any)
    }

    /// Whether test `t` holds, its fields read by `read`; `None` when a field cannot be read
    /// that way or a closure fails.
    #[inline(always)]
    fn test<S: AsRef<str>>(&self, t: &Test, f: &Facts, read: impl Fn(StrSrc) -> Option<S>) -> Option<bool> {
        Some(match *t {
            Test::Str {
                src,
                how,
                negate,
                n,
                lits,
            } => self.matches(read(src)?.as_ref().as_bytes(), how, n, lits) != negate,
            Test::Contains {
                src,
                negate,
                finder,
                lit,
            } => self.contains(read(src)?.as_ref().as_bytes(), finder, lit) != negate,
            Test::Int { a, cmp, b, lit } => cmp.holds(self.int(a, lit, f, &read)?, self.int(b, lit, f, &read)?),
            Test::Tree(i) => self.trees.get(i as usize)?(f).ok()?,
        })
    }

    /// [`Tests::holds`], out of line.
    #[inline(never)]
    pub fn holds_once(&self, c: CompiledBool, f: &Facts) -> Option<bool> {
        self.holds(c, f)
    }

    /// CEL's commutative `&&` and `||`: an operand with the deciding value wins wherever it is,
    /// over errors in the others; otherwise the first error, if any.
    pub fn eval(&self, c: CompiledBool, f: &Facts) -> R<bool> {
        if let Some(v) = self.holds_once(c, f) {
            return Ok(v);
        }
        let mut error = None;
        for i in c.start..c.start + u32::from(c.len) {
            let v = match self.tests.get(i as usize) {
                Some(Test::Tree(t)) => self.trees.get(*t as usize).map_or(Ok(false), |t| t(f)),
                Some(t) => Ok(self.test(t, f, |s| Some(s.get(f, &self.headers))) == Some(true)),
                None => Ok(false),
            };
            match v {
                Ok(v) if v == c.any => return Ok(v),
                Ok(_) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        error.map_or(Ok(!c.any), Err)
    }

    /// Whether `v` is, starts with or ends with one of the `n` literals at `at`: one compare
    /// for all three.
    #[inline(always)]
    fn matches(&self, v: &[u8], how: How, n: u16, at: u32) -> bool {
        let mut at = at as usize;
        for _ in 0..n {
            let lit = self.lit(&mut at);
            let fits = match how {
                How::Exact => v.len() == lit.len(),
                How::Prefix | How::Suffix => v.len() >= lit.len(),
            };
            let from = match how {
                How::Suffix => v.len().wrapping_sub(lit.len()),
                How::Exact | How::Prefix => 0,
            };
            if fits && v.get(from..from.wrapping_add(lit.len())) == Some(lit) {
                return true;
            }
        }
        false
    }

    /// Short strings are searched directly, long ones with the searcher built at load
    /// (`str::contains` would build one per call).
    #[inline(always)]
    fn contains(&self, v: &[u8], finder: u16, at: u32) -> bool {
        let lit = self.lit(&mut (at as usize));
        match (v.len() < 64, lit.first()) {
            (_, None) => true,
            (true, Some(&first)) => v
                .iter()
                .enumerate()
                .any(|(i, &b)| b == first && v[i..].starts_with(lit)),
            (false, _) => self
                .finders
                .get(usize::from(finder))
                .is_some_and(|s| s.find(v).is_some()),
        }
    }

    /// The literal at `at`, moving `at` past it.
    #[inline(always)]
    fn lit(&self, at: &mut usize) -> &[u8] {
        let Some([lo, hi, rest @ ..]) = self.lits.get(*at..) else {
            return &[];
        };
        let n = usize::from(u16::from_le_bytes([*lo, *hi]));
        *at += 2 + n;
        rest.get(..n).unwrap_or(&[])
    }

    #[inline(always)]
    fn int<S: AsRef<str>>(&self, src: IntSrc, lit: i64, f: &Facts, read: impl Fn(StrSrc) -> Option<S>) -> Option<i64> {
        Some(match src {
            IntSrc::Lit => lit,
            IntSrc::Now => f.now,
            IntSrc::NotBefore => f.client.raw.not_before,
            IntSrc::NotAfter => f.client.raw.not_after,
            IntSrc::DaysUntilExpiry => f.client.raw.days,
            IntSrc::Size(s) => code_points(read(s)?.as_ref()),
        })
    }

    /// Adds literals; `None` when they do not fit the encoding (a literal over 64 KiB, or a
    /// buffer over 4 GiB): the condition then runs in the interpreter.
    fn add_lits(&mut self, lits: &[&str]) -> Option<(u16, u32)> {
        let n = u16::try_from(lits.len()).ok()?;
        let at = u32::try_from(self.lits.len()).ok()?;
        let lens = lits
            .iter()
            .map(|l| u16::try_from(l.len()).ok())
            .collect::<Option<Vec<_>>>()?;
        // Every literal must stay addressable by a u32 offset.
        u32::try_from(self.lits.len() + lits.iter().map(|l| l.len() + 2).sum::<usize>()).ok()?;
        for (l, len) in lits.iter().zip(lens) {
            self.lits.extend_from_slice(&len.to_le_bytes());
            self.lits.extend_from_slice(l.as_bytes());
        }
        Some((n, at))
    }

    /// The index of a header name in the table, added once.
    fn header(&mut self, name: HeaderName) -> Option<u16> {
        let i = match self.headers.iter().position(|h| *h == name) {
            Some(i) => i,
            None => {
                self.headers.push(name);
                self.headers.len() - 1
            }
        };
        u16::try_from(i).ok()
    }
}

/// A test before it joins the table: closures go to their own table.
enum Operand {
    Test(Test),
    Tree(BoolFn),
}

/// A compiled string value (`set_headers`, `cache_cohort`).
pub struct CompiledStr(StrFn);

impl CompiledStr {
    pub fn eval(&self, f: &Facts) -> R<String> {
        (self.0)(f).map(Cow::into_owned)
    }
}

pub fn compile_bool(e: &IdedExpr, lists: &Lists, tests: &mut Tests) -> Option<CompiledBool> {
    let mut operands = Vec::new();
    let any = match chain(e, op::LOGICAL_AND, &mut operands) {
        true => false,
        false => chain(e, op::LOGICAL_OR, &mut operands),
    };
    if operands.is_empty() {
        operands.push(e);
    }
    let operands = operands
        .into_iter()
        .map(|x| match Test::of(&x.expr, false, tests) {
            Some(t) => Some(Operand::Test(t)),
            None => match node(x, lists, tests)? {
                Node::Bool(b) => Some(Operand::Tree(b)),
                _ => None,
            },
        })
        .collect::<Option<Vec<_>>>()?;
    let start = u32::try_from(tests.tests.len()).ok()?;
    let len = u16::try_from(operands.len()).ok()?;
    for o in operands {
        let t = match o {
            Operand::Test(t) => t,
            Operand::Tree(b) => {
                tests.trees.push(b);
                Test::Tree(u32::try_from(tests.trees.len() - 1).ok()?)
            }
        };
        tests.tests.push(t);
    }
    Some(CompiledBool { start, len, any })
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

pub fn compile_str(e: &IdedExpr, lists: &Lists, tests: &mut Tests) -> Option<CompiledStr> {
    node(e, lists, tests)?.into_str().map(CompiledStr)
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
#[derive(Clone, Copy)]
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
    Client(u8),
    /// `request.headers.NAME`, by index in the header names of [`Tests`]: as the facts answer
    /// it (absent: `""`; several values joined).
    Header(u16),
}

impl StrSrc {
    /// The field as the facts answer it (a header named twice joined, bytes that are not UTF-8
    /// replaced).
    fn get<'a>(self, f: &'a Facts<'a>, headers: &[HeaderName]) -> Cow<'a, str> {
        match (self, f.request) {
            (StrSrc::Header(i), Some(r)) => match headers.get(usize::from(i)) {
                Some(name) => super::facts::header_value(r.headers, name),
                None => Cow::Borrowed(""),
            },
            _ => Cow::Borrowed(self.borrowed(f, headers).unwrap_or_default()),
        }
    }

    /// The field as the request path reads it: borrowed, or `None` for a header value that
    /// would have to be built (named twice, or not visible ASCII); the full path then reads it
    /// with [`StrSrc::get`].
    #[inline(never)]
    fn borrowed<'a>(self, f: &'a Facts<'a>, headers: &[HeaderName]) -> Option<&'a str> {
        Some(match self {
            StrSrc::ClientIp => f.client_ip,
            StrSrc::Sni => &f.connection.sni,
            StrSrc::TlsVersion => &f.connection.tls_version,
            StrSrc::Alpn => &f.connection.alpn,
            StrSrc::Method => f.request.map_or("", |r| r.method),
            StrSrc::Host => f.request.map_or("", |r| r.host),
            StrSrc::Path => f.request.map_or("", |r| r.path),
            StrSrc::Query => f.request.map_or("", |r| r.query),
            StrSrc::Client(i) => f.client.raw.strings.get(usize::from(i)).map_or("", String::as_str),
            StrSrc::Header(i) => match (f.request, headers.get(usize::from(i))) {
                (Some(r), Some(name)) => super::facts::header_text(r.headers, name)?,
                _ => "",
            },
        })
    }

    fn header(name: &str, tests: &mut Tests) -> Option<StrSrc> {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()?;
        tests.header(name).map(StrSrc::Header)
    }

    /// The string field an expression names, if it is one.
    fn of(e: &Expr, tests: &mut Tests) -> Option<StrSrc> {
        if let Expr::Call(c) = e {
            // `request.headers["name"]`
            return match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
                (op::INDEX, None, [a, b]) if path(&a.expr)? == ["request", "headers"] => match &b.expr {
                    Expr::Literal(LiteralValue::String(name)) => StrSrc::header(name.inner(), tests),
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
                let i = super::facts::CLIENT_STRINGS.iter().position(|n| *n == name)?;
                return u8::try_from(i).ok().map(StrSrc::Client);
            }
            ["connection", "client_ip"] => StrSrc::ClientIp,
            ["connection", "sni"] => StrSrc::Sni,
            ["connection", "tls_version"] => StrSrc::TlsVersion,
            ["connection", "alpn"] => StrSrc::Alpn,
            ["request", "method"] => StrSrc::Method,
            ["request", "host"] => StrSrc::Host,
            ["request", "path"] => StrSrc::Path,
            ["request", "query"] => StrSrc::Query,
            ["request", "headers", name] => return StrSrc::header(name, tests),
            _ => return None,
        })
    }

    /// The field as a closure, for expressions outside the tests' shapes (a header's name is
    /// copied into it).
    fn into_node(self, tests: &Tests) -> Node {
        let (src, headers): (StrSrc, Vec<HeaderName>) = match self {
            StrSrc::Header(i) => (
                StrSrc::Header(0),
                tests.headers.get(usize::from(i)).into_iter().cloned().collect(),
            ),
            other => (other, Vec::new()),
        };
        Node::Str(Box::new(move |f| Ok(src.get(f, &headers))))
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

/// The common shape of a condition: a string field tested against literals (`==`, `!=`,
/// `startsWith`, `endsWith`, `in [...]`, `contains`), or two ints or two timestamps compared,
/// with any `!` folded in; or, in a chain, any other compiled condition (a closure). Only a
/// closure can fail.
#[derive(Clone, Copy)]
enum Test {
    /// The field is, starts with or ends with one of `n` literals at `lits`.
    Str {
        src: StrSrc,
        how: How,
        negate: bool,
        n: u16,
        lits: u32,
    },
    Contains {
        src: StrSrc,
        negate: bool,
        /// The searcher for long fields, in [`Tests`].
        finder: u16,
        lit: u32,
    },
    /// `a cmp b`, where a literal operand is `lit`.
    Int { a: IntSrc, cmp: Cmp, b: IntSrc, lit: i64 },
    /// A closure in [`Tests`].
    Tree(u32),
}

const _: () = assert!(std::mem::size_of::<Test>() == 24);

#[derive(Clone, Copy, PartialEq)]
enum How {
    Exact,
    Prefix,
    Suffix,
}

/// CEL's `size` of a string: its code points. Short ASCII strings (most queries and headers)
/// are counted without the general, vectorized count.
fn code_points(s: &str) -> i64 {
    let n = match s.len() < 64 && s.is_ascii() {
        true => s.len(),
        false => count_chars(s),
    };
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cold]
fn count_chars(s: &str) -> usize {
    s.chars().count()
}

/// An int or a timestamp (unix seconds) a test compares.
#[derive(Clone, Copy)]
enum IntSrc {
    /// The test's literal.
    Lit,
    Now,
    NotBefore,
    NotAfter,
    DaysUntilExpiry,
    /// `size(s)`: the number of code points.
    Size(StrSrc),
}

/// A comparison, as the orderings for which it holds: less (bit 0), equal (1), greater (2).
/// Negating it is taking the other orderings.
#[derive(Clone, Copy)]
struct Cmp(u8);

impl Cmp {
    #[inline(always)]
    fn holds(self, x: i64, y: i64) -> bool {
        self.0 & (1 << (x.cmp(&y) as i8 + 1)) != 0
    }

    fn of(op: &str, negate: bool) -> Option<Cmp> {
        let bits = match op {
            op::LESS => 0b001,
            op::LESS_EQUALS => 0b011,
            op::EQUALS => 0b010,
            op::NOT_EQUALS => 0b101,
            op::GREATER_EQUALS => 0b110,
            op::GREATER => 0b100,
            _ => return None,
        };
        Some(Cmp(if negate { bits ^ 0b111 } else { bits }))
    }
}

impl Test {
    /// The test `e` is (negated when `negate`), if it has one of the shapes; its literals,
    /// header names and searchers are added to `tests`.
    fn of(e: &Expr, negate: bool, tests: &mut Tests) -> Option<Test> {
        let Expr::Call(c) = e else { return None };
        let mut str_test = |src: &Expr, how: How, lits: &[&str], negate: bool| {
            let src = StrSrc::of(src, tests)?;
            let (n, lits) = tests.add_lits(lits)?;
            Some(Test::Str {
                src,
                how,
                negate,
                n,
                lits,
            })
        };
        match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
            (op::LOGICAL_NOT, None, [a]) => Test::of(&a.expr, !negate, tests),
            ("contains", Some(t), [a]) => {
                let l = str_lit(&a.expr)?;
                let src = StrSrc::of(&t.expr, tests)?;
                let finder = u16::try_from(tests.finders.len()).ok()?;
                let (_, lit) = tests.add_lits(&[l])?;
                tests
                    .finders
                    .push(memchr::memmem::Finder::new(l.as_bytes()).into_owned());
                Some(Test::Contains {
                    src,
                    negate,
                    finder,
                    lit,
                })
            }
            ("startsWith", Some(t), [a]) => str_test(&t.expr, How::Prefix, &[str_lit(&a.expr)?], negate),
            ("endsWith", Some(t), [a]) => str_test(&t.expr, How::Suffix, &[str_lit(&a.expr)?], negate),
            (op::IN, None, [a, b]) => {
                let Expr::List(l) = &b.expr else { return None };
                let set = l
                    .elements
                    .iter()
                    .map(|x| str_lit(&x.expr))
                    .collect::<Option<Vec<_>>>()?;
                str_test(&a.expr, How::Exact, &set, negate)
            }
            (op::EQUALS | op::NOT_EQUALS, None, [a, b]) => {
                let negate = negate != (c.func_name == op::NOT_EQUALS);
                if let Some(l) = str_lit(&b.expr) {
                    return str_test(&a.expr, How::Exact, &[l], negate);
                }
                if let Some(l) = str_lit(&a.expr) {
                    return str_test(&b.expr, How::Exact, &[l], negate);
                }
                Test::ints(&a.expr, Cmp::of(op::EQUALS, negate)?, &b.expr, tests)
            }
            (op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS, None, [a, b]) => {
                Test::ints(&a.expr, Cmp::of(&c.func_name, negate)?, &b.expr, tests)
            }
            _ => None,
        }
    }

    /// Two ints, or two timestamps, compared (CEL compares nothing else with these operators);
    /// at most one of them a literal.
    fn ints(a: &Expr, cmp: Cmp, b: &Expr, tests: &mut Tests) -> Option<Test> {
        let ((a, a_time, a_lit), (b, b_time, b_lit)) = (IntSrc::of(a, tests)?, IntSrc::of(b, tests)?);
        let lit = match (a_lit, b_lit) {
            (Some(_), Some(_)) => return None,
            (x, y) => x.or(y).unwrap_or(0),
        };
        (a_time == b_time).then_some(Test::Int { a, cmp, b, lit })
    }
}

impl IntSrc {
    /// The int `e` names, whether it is a timestamp, and its value if it is a literal.
    fn of(e: &Expr, tests: &mut Tests) -> Option<(IntSrc, bool, Option<i64>)> {
        if let Expr::Literal(LiteralValue::Int(i)) = e {
            return Some((IntSrc::Lit, false, Some(*i.inner())));
        }
        if let Expr::Call(c) = e {
            return match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
                ("size", Some(s), []) | ("size", None, [s]) => {
                    Some((IntSrc::Size(StrSrc::of(&s.expr, tests)?), false, None))
                }
                _ => None,
            };
        }
        let (src, time) = match path(e)?.as_slice() {
            ["now"] => (IntSrc::Now, true),
            ["client", "cert", "not_before"] => (IntSrc::NotBefore, true),
            ["client", "cert", "not_after"] => (IntSrc::NotAfter, true),
            ["client", "cert", "days_until_expiry"] => (IntSrc::DaysUntilExpiry, false),
            _ => return None,
        };
        Some((src, time, None))
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

fn node(e: &IdedExpr, lists: &Lists, tests: &mut Tests) -> Option<Node> {
    if let Some(src) = StrSrc::of(&e.expr, tests) {
        return Some(src.into_node(tests));
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
        Expr::Call(c) => call(&c.func_name, c.target.as_deref(), &c.args, lists, tests),
        _ => None,
    }
}

fn call(name: &str, target: Option<&IdedExpr>, args: &[IdedExpr], lists: &Lists, tests: &mut Tests) -> Option<Node> {
    if let Some(t) = target {
        let this = node(t, lists, tests)?;
        let mut arg = |i: usize| args.get(i).and_then(|a| node(a, lists, tests));
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
    let mut arg = |i: usize| args.get(i).and_then(|a| node(a, lists, tests));
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
