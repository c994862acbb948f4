//! The `rules:` section → a [`RuleSet`]: its lists read, every `*.yaml` of its directory in name
//! order, and each entry turned into a rule, with every error under `rules...` naming the file,
//! the line and the field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::HeaderName;
use log::info;

use super::Files;
use crate::config::{self, RuleSpec};
use crate::rules::lists::{ListKind, ListVal, Lists, RuleList};
use crate::rules::{Action, Compiler, Phase, Rule, RuleSet, FRAMING};
use crate::state::LoadedList;

/// Loads every list and rule file of `cfg`. `origins` are the names a rule may choose;
/// `identity_header` says whether a header name is one of the edge's identity headers.
pub(super) fn load(
    f: &mut Files,
    cfg: &config::Rules,
    origins: &[&str],
    identity_header: &dyn Fn(&HeaderName) -> bool,
) -> (RuleSet, Vec<LoadedList>) {
    let mut lists = BTreeMap::new();
    let mut loaded = Vec::new();
    for (name, l) in &cfg.lists {
        let path = f.path(&l.file);
        f.depends_on(path.clone());
        let started = std::time::Instant::now();
        match list(l.kind, &path) {
            Ok(list) => {
                info!(
                    "list {name}: {} entries from {} in {} ms",
                    list.len(),
                    path.display(),
                    started.elapsed().as_millis()
                );
                loaded.push(LoadedList {
                    name: name.clone(),
                    entries: list.len(),
                    loaded_at: crate::rules::facts::unix_now(),
                });
                lists.insert(name.clone(), ListVal(Arc::new(list)));
            }
            Err(e) => f.error(format!("rules.lists.{name}.file"), e),
        }
    }
    let compiler = Compiler::new(Lists(Arc::new(lists)));
    let dir = f.path(&cfg.dir);
    f.depends_on(dir.clone());
    let files = match rule_files(&dir) {
        Ok(files) => files,
        Err(e) => {
            f.error("rules.dir", e);
            return (compiler.finish(Vec::new(), false), loaded);
        }
    };
    let mut rules = Vec::new();
    let mut names = HashSet::new();
    let mut uses_client_ip = false;
    for file in files {
        f.depends_on(file.clone());
        // How often each name has been seen in this file, to find the right one's line.
        let mut in_file: HashMap<String, usize> = HashMap::new();
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                f.error("rules.dir", format!("cannot read {}: {e}", file.display()));
                continue;
            }
        };
        let parsed: config::RuleFile = match serde_yaml::from_str(&text) {
            Ok(p) => p,
            Err(e) => {
                f.error("rules.dir", format!("{}: {e}", file.display()));
                continue;
            }
        };
        for spec in parsed.rules {
            let nth = in_file.entry(spec.name.clone()).or_default();
            *nth += 1;
            let line = line_of(&text, &spec.name, *nth);
            let location = format!("{}:{line}", file.display());
            if !names.insert(spec.name.clone()) {
                f.error(
                    "rules.dir",
                    format!("{location}: rule '{}': the name is used twice", spec.name),
                );
                continue;
            }
            // Conservative (a string literal may mention it): only spares formatting the IP.
            uses_client_ip |= std::iter::once(&spec.when)
                .chain(&spec.cache_cohort)
                .chain(spec.set_headers.iter().flat_map(BTreeMap::values))
                .any(|e| e.contains("client_ip"));
            let name = spec.name.clone();
            let at = Position {
                text: &text,
                line,
                name: &name,
            };
            match rule(&compiler, spec, &at, location.clone(), origins, identity_header) {
                Ok(r) => rules.push(r),
                Err(e) => f.error("rules.dir", format!("{location}: {e}")),
            }
        }
    }
    (compiler.finish(rules, uses_client_ip), loaded)
}

/// A list file, read twice: once to count its lines (the set is sized once, never rehashed),
/// then line by line (a million-line file is never held whole).
fn list(kind: config::ListKind, path: &Path) -> Result<RuleList, String> {
    use std::io::BufRead;
    let open = || {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let mut lines = 0;
    let mut reader = open()?;
    loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if buf.is_empty() {
            break;
        }
        lines += buf.iter().filter(|b| **b == b'\n').count();
        let n = buf.len();
        reader.consume(n);
    }
    let kind = match kind {
        config::ListKind::Serial => ListKind::Serial,
        config::ListKind::Sha256 => ListKind::Sha256,
        config::ListKind::Text => ListKind::Text,
    };
    RuleList::from_reader(kind, lines + 1, open()?).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where a rule is, to point errors at its fields.
struct Position<'a> {
    text: &'a str,
    line: usize,
    name: &'a str,
}

impl Position<'_> {
    fn at(&self, field: &str) -> String {
        format!(
            "rule '{}': {field} (line {})",
            self.name,
            field_line(self.text, self.line, field)
        )
    }
}

/// One rule entry → a rule: its expressions compiled, exactly one action, and what that action
/// may do in its phase checked.
fn rule(
    compiler: &Compiler,
    spec: RuleSpec,
    at: &Position,
    location: String,
    origins: &[&str],
    identity_header: &dyn Fn(&HeaderName) -> bool,
) -> Result<Rule, String> {
    let name = spec.name.as_str();
    let phase = match spec.phase {
        config::RulePhase::Connection => Phase::Connection,
        config::RulePhase::Request => Phase::Request,
    };
    let field = |f: &'static str| move |e: String| format!("{}: {e}", at.at(f));
    let when = compiler.condition(&spec.when, phase).map_err(field("when"))?;
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
            let value = compiler.string(&src, phase).map_err(field("set_headers"))?;
            out.push((header(&n).map_err(field("set_headers"))?, value));
        }
        actions.push(Action::SetHeaders(out));
    }
    if let Some(h) = spec.remove_headers {
        let names = h
            .iter()
            .map(|n| header(n))
            .collect::<Result<_, _>>()
            .map_err(field("remove_headers"))?;
        actions.push(Action::RemoveHeaders(names));
    }
    if let Some(src) = spec.cache_cohort {
        actions.push(Action::CacheCohort(
            compiler.string(&src, phase).map_err(field("cache_cohort"))?,
        ));
    }
    if let Some(o) = spec.origin {
        if !origins.contains(&o.as_str()) {
            return Err(format!(
                "{}: unknown origin '{o}' (defined: {})",
                at.at("origin"),
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
    let shadow = spec.mode == config::RuleMode::Shadow;
    Ok(compiler.rule(name, location, phase, shadow, when, action))
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
