//! Named lists that rules look things up in (`lists.NAME.contains(x)`, or `x in lists.NAME`):
//! plain files, one entry a line, `#` comments, loaded once into hash sets for O(1) lookups.
//! Serial and fingerprint lists keep entries in a normalized binary form, and normalize what
//! they are asked, so `0A:1B`, `0a1b` and `A1B` are the same serial.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock};

use cel::common::traits::{Container, Indexer};
use cel::common::types::{CelBool, CelString, Type};
use cel::common::value::{CowVal, StaticVal, Val};
use cel::ExecutionError;

/// What a list holds, which decides how its entries are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// Certificate serial numbers in hex, with or without colons, in either case.
    Serial,
    /// SHA-256 fingerprints in hex (64 digits), with or without colons, in either case.
    Sha256,
    /// Exact strings (subjects, SANs, IPs...).
    Text,
}

/// Longest serial RFC 5280 allows, in bytes.
const MAX_SERIAL: usize = 20;

/// Hash sets with ahash (in the tree through pingora), seeded at random: a serial lookup with
/// std's SipHash was a tenth of the 20-rule benchmark.
type Set<T> = HashSet<T, ahash::RandomState>;

#[derive(Debug)]
enum Entries {
    /// Serials as (length, big-endian bytes without leading zeros), inline: no allocation each.
    Serial(Set<[u8; MAX_SERIAL + 1]>),
    Sha256(Set<[u8; 32]>),
    Text(Set<Box<str>>),
}

/// One loaded list.
#[derive(Debug)]
pub struct RuleList {
    entries: Entries,
}

fn nibble(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

/// Hex digits (colons skipped) packed into `out` as big-endian bytes, the first byte padded
/// when the count is odd; returns how many digits there were (leading zeros dropped when `trim`
/// is set). No allocation.
fn pack_hex(s: &str, trim: bool, out: &mut [u8]) -> Option<usize> {
    let mut nibbles = [0u8; 64];
    let (mut n, mut any) = (0, false);
    for d in s.trim().bytes().filter(|b| *b != b':') {
        let v = nibble(d)?;
        any = true;
        if trim && n == 0 && v == 0 {
            continue;
        }
        *nibbles.get_mut(n)? = v;
        n += 1;
    }
    let bytes = n.div_ceil(2);
    if !any || bytes > out.len() {
        return None;
    }
    let odd = n % 2;
    for (i, v) in nibbles[..n].iter().enumerate() {
        let pos = i + odd; // position in the digit string padded to whole bytes
        out[pos / 2] |= v << if pos % 2 == 0 { 4 } else { 0 };
    }
    Some(n)
}

/// A serial in hex (colons allowed, any case, leading zeros ignored) as its normalized key:
/// its length, then its bytes.
pub fn serial_key(s: &str) -> Option<[u8; MAX_SERIAL + 1]> {
    let mut bytes = [0u8; MAX_SERIAL];
    let n = pack_hex(s, true, &mut bytes)?.div_ceil(2);
    let mut key = [0u8; MAX_SERIAL + 1];
    key[0] = n as u8;
    key[1..=n].copy_from_slice(&bytes[..n]);
    Some(key)
}

fn sha256_key(s: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    (pack_hex(s, false, &mut key)? == 64).then_some(key)
}

impl RuleList {
    fn with_capacity(kind: ListKind, capacity: usize) -> RuleList {
        let entries = match kind {
            ListKind::Serial => Entries::Serial(Set::with_capacity_and_hasher(capacity, Default::default())),
            ListKind::Sha256 => Entries::Sha256(Set::with_capacity_and_hasher(capacity, Default::default())),
            ListKind::Text => Entries::Text(Set::with_capacity_and_hasher(capacity, Default::default())),
        };
        RuleList { entries }
    }

    /// Adds line `n` of a list file (comments and blank lines are skipped).
    fn add_line(&mut self, n: usize, raw: &str) -> Result<(), String> {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return Ok(());
        }
        let bad = |what: &str| format!("line {n}: '{line}' is not {what}");
        match &mut self.entries {
            Entries::Serial(set) => {
                set.insert(serial_key(line).ok_or_else(|| bad("a hex serial of at most 20 bytes"))?)
            }
            Entries::Sha256(set) => set.insert(sha256_key(line).ok_or_else(|| bad("a SHA-256 in hex (64 digits)"))?),
            Entries::Text(set) => set.insert(Box::from(line)),
        };
        Ok(())
    }

    /// Parses a list file's text. Errors name the line.
    #[cfg(test)]
    pub fn parse(kind: ListKind, text: &str) -> Result<RuleList, String> {
        RuleList::from_reader(kind, text.lines().count(), text.as_bytes())
    }

    /// A list from its file's text, line by line, into a set sized once for `lines` entries so
    /// that it never rehashes while it grows. Errors name the line.
    pub fn from_reader(kind: ListKind, lines: usize, mut text: impl std::io::BufRead) -> Result<RuleList, String> {
        let mut list = RuleList::with_capacity(kind, lines);
        let (mut line, mut n) = (String::new(), 0);
        loop {
            line.clear();
            n += 1;
            match text.read_line(&mut line) {
                Ok(0) => return Ok(list),
                Ok(_) => list.add_line(n, &line)?,
                Err(e) => return Err(format!("line {n}: {e}")),
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Serial(s) => s.len(),
            Entries::Sha256(s) => s.len(),
            Entries::Text(s) => s.len(),
        }
    }

    /// Whether a certificate's serial is in the list: for a serial list, by the key the
    /// certificate keeps (made once per connection); for the others, as text.
    pub fn contains_serial(&self, cert: &crate::identity::ViewerCert) -> bool {
        match &self.entries {
            Entries::Serial(s) => cert
                .serial_key
                .get_or_init(|| serial_key(&cert.serial_hex))
                .is_some_and(|k| s.contains(&k)),
            _ => self.contains(&cert.serial_hex),
        }
    }

    /// Whether `item` (normalized the list's way) is in the list.
    pub fn contains(&self, item: &str) -> bool {
        match &self.entries {
            Entries::Serial(s) => serial_key(item).is_some_and(|k| s.contains(&k)),
            Entries::Sha256(s) => sha256_key(item).is_some_and(|k| s.contains(&k)),
            Entries::Text(s) => s.contains(item),
        }
    }
}

static LIST_TYPE: LazyLock<Type> = LazyLock::new(|| Type::new_opaque_type("mtls_edge.list"));
static LISTS_TYPE: LazyLock<Type> = LazyLock::new(|| Type::new_opaque_type("mtls_edge.lists"));

/// A list as a CEL value; cloning shares the entries.
#[derive(Debug, Clone)]
pub struct ListVal(pub Arc<RuleList>);

impl Val for ListVal {
    fn get_type(&self) -> &Type {
        &LIST_TYPE
    }

    fn cel_type() -> &'static Type {
        &LIST_TYPE
    }

    fn as_container(&self) -> Option<&dyn Container> {
        Some(self)
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl StaticVal for ListVal {}

impl Container for ListVal {
    fn contains(&self, value: &dyn Val) -> Result<bool, ExecutionError> {
        match value.downcast_ref::<CelString>() {
            Some(s) => Ok(self.0.contains(s.inner())),
            None => Err(ExecutionError::UnexpectedType {
                got: value.get_type().name().to_owned(),
                want: "string".to_owned(),
            }),
        }
    }
}

/// `lists.NAME.contains(x)`: the member function rules call on a list.
pub fn contains(this: &ListVal, item: &CelString) -> CelBool {
    CelBool::from(this.0.contains(item.inner()))
}

/// Every configured list, as the CEL variable `lists`.
#[derive(Debug, Clone, Default)]
pub struct Lists(pub Arc<BTreeMap<String, ListVal>>);

impl Val for Lists {
    indexed_val!(LISTS_TYPE);

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl StaticVal for Lists {}

impl Lists {
    pub fn get_list(&self, name: &str) -> Option<&ListVal> {
        self.0.get(name)
    }
}

impl Indexer for Lists {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        let name = idx.downcast_ref::<CelString>().map(|s| s.inner().to_string());
        match name.as_deref().and_then(|n| self.0.get(n)) {
            Some(list) => Ok(CowVal::Borrowed(list)),
            None => Err(ExecutionError::NoSuchKey(Arc::new(name.unwrap_or_default()))),
        }
    }

    steal_via_get!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_match_with_or_without_colons_in_either_case_and_leading_zeros() {
        let list = RuleList::parse(ListKind::Serial, "# revoked\n0A:1B:2C\n  ff00 # trailing comment\n\n").unwrap();
        assert_eq!(list.len(), 2);
        for s in ["0a1b2c", "0A:1B:2C", "a1b2c", "00:0a:1b:2c", "A1B2C"] {
            assert!(list.contains(s), "{s}");
        }
        assert!(list.contains("FF:00"));
        assert!(!list.contains("0a1b2d"));
        assert!(!list.contains("not hex"));
    }

    #[test]
    fn bad_entries_are_refused_with_their_line() {
        let e = RuleList::parse(ListKind::Serial, "0a\nzz\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("zz"), "{e}");
        let too_long = "ab".repeat(21);
        assert!(RuleList::parse(ListKind::Serial, &too_long).is_err());
        let e = RuleList::parse(ListKind::Sha256, "abcd\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn fingerprints_and_text() {
        let fp = "AB:".repeat(31) + "AB";
        let list = RuleList::parse(ListKind::Sha256, &fp).unwrap();
        assert!(list.contains(&"ab".repeat(32)));
        let list = RuleList::parse(ListKind::Text, "CN=a\nspiffe://x/y\n").unwrap();
        assert!(list.contains("spiffe://x/y"));
        assert!(!list.contains("cn=a"));
    }
}
