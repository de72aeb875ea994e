//! Placement rules: the one place that decides where a namespace path lives.
//!
//! Pure logic, no I/O. `labfs explain`, `labfs check` and the mount all call
//! [`Rules::resolve`], so what `explain` prints is what the mount does.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// The class of a piece of data (see docs/rules.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Authoritative,
    Runtime,
    Ephemeral,
    Transitional,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::Authoritative,
        Class::Runtime,
        Class::Ephemeral,
        Class::Transitional,
    ];

    /// Where data of this class is stored.
    pub fn backend(self) -> BackendKind {
        match self {
            Class::Authoritative | Class::Runtime => BackendKind::Atlas,
            Class::Ephemeral | Class::Transitional => BackendKind::Local,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Authoritative => "authoritative",
            Class::Runtime => "runtime",
            Class::Ephemeral => "ephemeral",
            Class::Transitional => "transitional",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two stores behind the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    Atlas,
    Local,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Atlas => "atlas",
            BackendKind::Local => "local",
        }
    }
    pub fn other(self) -> BackendKind {
        match self {
            BackendKind::Atlas => BackendKind::Local,
            BackendKind::Local => BackendKind::Atlas,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may write under a `read_only` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Writer {
    User { name: String, uid: u32 },
    Group { name: String, gid: u32 },
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Writer::User { name, uid } => write!(f, "user:{name} (uid {uid})"),
            Writer::Group { name, gid } => write!(f, "group:{name} (gid {gid})"),
        }
    }
}

/// What happens to a path that no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Unplaced {
    /// Unmatched paths are authoritative (stored on Atlas).
    #[default]
    Authoritative,
    /// Creating anything at an unmatched path fails with EACCES.
    Deny,
}

/// One `[[rule]]` of the rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The pattern as written, normalised (leading `/`, no trailing `/`).
    pub path: String,
    pub class: Class,
    pub read_only: bool,
    pub writers: Vec<Writer>,
    /// The class a promoted file takes (default authoritative).
    pub promote_class: Option<Class>,
    /// Transitional rules: how long data may stay unpromoted before `labfs status`
    /// reports it as overdue (`max_unpromoted`).
    pub max_unpromoted: Option<std::time::Duration>,
    /// 1-based line of the `[[rule]]` header in the rules file.
    pub line: usize,
}

/// What the rules decide for one namespace path.
#[derive(Clone, Debug)]
pub struct Placement {
    pub class: Class,
    /// The rule that decided, or `None` when no rule matched.
    pub rule: Option<Arc<Rule>>,
    pub read_only: bool,
}

impl Placement {
    pub fn backend(&self) -> BackendKind {
        self.class.backend()
    }

    /// Whether a caller may modify this path: a `read_only` rule still lets
    /// its listed writers through (root is not exempt, by design).
    pub fn may_write(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if !self.read_only {
            return true;
        }
        let Some(rule) = &self.rule else {
            return false;
        };
        rule.writers.iter().any(|w| match w {
            Writer::User { uid: u, .. } => *u == uid,
            Writer::Group { gid: g, .. } => *g == gid || groups.contains(g),
        })
    }

    /// Human-readable origin of this placement, e.g. `/media (line 14)`.
    pub fn rule_label(&self) -> String {
        match &self.rule {
            Some(rule) if rule.line > 0 => format!("{} (line {})", rule.path, rule.line),
            Some(rule) => format!("{} (built-in)", rule.path),
            None => "no rule (unplaced)".to_string(),
        }
    }
}

/// Checks a rule pattern as written and returns it without trailing slashes.
///
/// The error is a short reason, without the pattern itself.
pub fn normalize_pattern(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err("must be an absolute path starting with \"/\"".to_string());
    }
    let trimmed = raw.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_string());
    }
    for comp in trimmed[1..].split('/') {
        if comp.is_empty() {
            return Err("empty path component (\"//\")".to_string());
        }
        if comp == "." || comp == ".." {
            return Err(format!("\"{comp}\" components are not allowed"));
        }
        if comp.contains('*') && comp != "*" && comp != "**" {
            return Err(format!(
                "component \"{comp}\" mixes \"*\" with other characters \
                 (\"*\" and \"**\" must be whole components)"
            ));
        }
        if comp.contains('\0') {
            return Err("contains a NUL character".to_string());
        }
    }
    Ok(trimmed.to_string())
}

/// The canonical form of a pattern: two patterns with the same canonical form
/// match exactly the same paths (`/a/` = `/a/**` = `/a`, `/a/**/*` = `/a/*`).
pub fn canonical_pattern(pattern: &str) -> String {
    let segs = canonical_segments(pattern);
    if segs.is_empty() {
        return "/".to_string();
    }
    let mut out = String::new();
    for seg in &segs {
        out.push('/');
        out.push_str(match seg {
            Segment::Literal(lit) => lit,
            Segment::Star => "*",
            Segment::DoubleStar => "**",
        });
    }
    out
}

/// Orders two patterns by specificity (`Greater` = `a` is more specific and
/// wins when both match). Total for patterns with distinct canonical forms.
pub fn compare_specificity(a: &str, b: &str) -> Ordering {
    cmp_segments(&canonical_segments(a), &canonical_segments(b))
}

/// One component of a canonical pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Star,
    DoubleStar,
}

impl Segment {
    fn weight(&self) -> u8 {
        match self {
            Segment::Literal(_) => 2,
            Segment::Star => 1,
            Segment::DoubleStar => 0,
        }
    }
}

/// Splits a pattern into segments, rewriting each run of wildcards as its
/// `*`s followed by at most one `**`, and dropping a trailing `**` (a rule
/// covers everything below its pattern anyway). Equivalent patterns thus get
/// identical segments, so they rank and deduplicate identically.
fn canonical_segments(pattern: &str) -> Vec<Segment> {
    fn flush(out: &mut Vec<Segment>, stars: &mut usize, dstar: &mut bool) {
        out.extend(std::iter::repeat_n(Segment::Star, *stars));
        if *dstar {
            out.push(Segment::DoubleStar);
        }
        *stars = 0;
        *dstar = false;
    }
    let mut out = Vec::new();
    let (mut stars, mut dstar) = (0, false);
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        match comp {
            "*" => stars += 1,
            "**" => dstar = true,
            lit => {
                flush(&mut out, &mut stars, &mut dstar);
                out.push(Segment::Literal(lit.into()));
            }
        }
    }
    flush(&mut out, &mut stars, &mut false);
    out
}

/// Specificity: more non-`**` segments wins; then, from the root, the first
/// differing segment kind decides (literal > `*` > `**`); then the pattern
/// text that sorts first byte-wise wins.
fn cmp_segments(a: &[Segment], b: &[Segment]) -> Ordering {
    fn text(s: &Segment) -> &str {
        match s {
            Segment::Literal(l) => l,
            Segment::Star => "*",
            Segment::DoubleStar => "**",
        }
    }
    let count = |s: &[Segment]| s.iter().filter(|x| **x != Segment::DoubleStar).count();
    count(a)
        .cmp(&count(b))
        .then_with(|| {
            a.iter()
                .map(Segment::weight)
                .cmp(b.iter().map(Segment::weight))
        })
        .then_with(|| b.iter().map(text).cmp(a.iter().map(text)))
}

/// A trie node of the matcher; the pattern ending here is `terminal`.
#[derive(Clone, Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, u32>,
    star: Option<u32>,
    dstar: Option<u32>,
    /// Reached through a `**` edge: it also consumes any number of components.
    is_dstar: bool,
    /// Rank of the most specific rule whose canonical pattern ends here.
    terminal: Option<u32>,
    /// Per backend, the highest rank of a rule ending strictly below this node.
    below: [Option<u32>; 2],
}

fn backend_index(b: BackendKind) -> usize {
    match b {
        BackendKind::Atlas => 0,
        BackendKind::Local => 1,
    }
}

/// What the rules say about a path and the subtree under it.
struct Descent {
    /// Winner for the path itself.
    here: Option<u32>,
    /// Winner for a child whose name no pattern mentions: every strict
    /// descendant is won by this rule or by one ranked higher.
    floor: Option<u32>,
    /// Per backend, the highest-ranked rule that some descendant could reach.
    below: [Option<u32>; 2],
}

thread_local! {
    /// Reused NFA state sets, so `resolve` does not allocate per call.
    static SCRATCH: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

fn with_scratch<R>(mut f: impl FnMut(&mut Vec<u32>, &mut Vec<u32>) -> R) -> R {
    let res = SCRATCH.try_with(|cell| {
        let mut guard = cell.try_borrow_mut().ok()?;
        let (a, b) = &mut *guard;
        Some(f(a, b))
    });
    match res {
        Ok(Some(r)) => r,
        // Thread-local unavailable (thread teardown): use fresh sets.
        _ => f(&mut Vec::new(), &mut Vec::new()),
    }
}

fn push_unique(set: &mut Vec<u32>, n: u32) {
    if !set.contains(&n) {
        set.push(n);
    }
}

/// The validated placement rules with a precomputed matcher.
///
/// Matching runs a small NFA over a trie of canonical patterns: literal
/// children are a hash lookup, so cost grows with path depth and the number
/// of wildcard branches, not with the number of rules.
#[derive(Clone)]
pub struct Rules {
    rules: Vec<Arc<Rule>>,
    unplaced: Unplaced,
    /// Rules sorted least specific first; the index is the rule's rank.
    by_rank: Vec<Arc<Rule>>,
    nodes: Vec<Node>,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("rules", &self.rules)
            .field("unplaced", &self.unplaced)
            .finish_non_exhaustive()
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(Vec::new(), Unplaced::default())
    }
}

impl Rules {
    /// Builds the matcher. Assumes validated input (see `config`): patterns
    /// are normalised and no two share a canonical form; if they do anyway,
    /// the one with the lower line number wins.
    pub fn new(rules: Vec<Rule>, unplaced: Unplaced) -> Rules {
        let rules: Vec<Arc<Rule>> = rules.into_iter().map(Arc::new).collect();
        let segs: Vec<Vec<Segment>> = rules.iter().map(|r| canonical_segments(&r.path)).collect();
        let mut order: Vec<usize> = (0..rules.len()).collect();
        order.sort_by(|&a, &b| {
            cmp_segments(&segs[a], &segs[b])
                .then_with(|| rules[b].line.cmp(&rules[a].line))
                .then_with(|| b.cmp(&a))
        });
        let by_rank: Vec<Arc<Rule>> = order.iter().map(|&i| Arc::clone(&rules[i])).collect();

        let mut nodes = vec![Node::default()];
        for (rank, &i) in order.iter().enumerate() {
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            let mut at = 0usize;
            for seg in &segs[i] {
                let next = match seg {
                    Segment::Literal(lit) => nodes[at].literal.get(lit).copied(),
                    Segment::Star => nodes[at].star,
                    Segment::DoubleStar => nodes[at].dstar,
                };
                at = match next {
                    Some(n) => n as usize,
                    None => {
                        let id = nodes.len();
                        let id32 = u32::try_from(id).unwrap_or(u32::MAX);
                        nodes.push(Node {
                            is_dstar: *seg == Segment::DoubleStar,
                            ..Node::default()
                        });
                        match seg {
                            Segment::Literal(lit) => {
                                nodes[at].literal.insert(lit.clone(), id32);
                            }
                            Segment::Star => nodes[at].star = Some(id32),
                            Segment::DoubleStar => nodes[at].dstar = Some(id32),
                        }
                        id
                    }
                };
            }
            nodes[at].terminal = nodes[at].terminal.max(Some(rank));
        }

        // Children always have higher ids than their parent: fold bottom-up.
        for id in (0..nodes.len()).rev() {
            let node = &nodes[id];
            let children: Vec<u32> = node
                .literal
                .values()
                .copied()
                .chain(node.star)
                .chain(node.dstar)
                .collect();
            let mut below = [None, None];
            for c in children {
                let child = &nodes[c as usize];
                for (b, slot) in below.iter_mut().enumerate() {
                    *slot = (*slot).max(child.below[b]);
                }
                if let Some(r) = child.terminal {
                    let b = backend_index(by_rank[r as usize].class.backend());
                    below[b] = below[b].max(Some(r));
                }
            }
            nodes[id].below = below;
        }

        Rules {
            rules,
            unplaced,
            by_rank,
            nodes,
        }
    }

    /// The placement of `path` (absolute, normalised: "/", "/a", "/a/b").
    pub fn resolve<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> Placement {
        let path = path.as_ref().as_bytes();
        let best = with_scratch(|cur, next| {
            let mut best = None;
            self.run(path, cur, next, |r| best = best.max(Some(r)));
            best
        });
        self.placement(best)
    }

    /// Every rule matching `path`, most specific (the winner) first; for
    /// `labfs explain`.
    pub fn matching<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> Vec<Arc<Rule>> {
        let path = path.as_ref().as_bytes();
        let mut ranks = Vec::new();
        with_scratch(|cur, next| self.run(path, cur, next, |r| push_unique(&mut ranks, r)));
        ranks.sort_unstable_by(|a, b| b.cmp(a));
        ranks
            .into_iter()
            .map(|r| Arc::clone(&self.by_rank[r as usize]))
            .collect()
    }

    /// Whether some strict descendant of `path` could resolve to `backend`.
    /// Conservative: may say `true` when no descendant actually can, never
    /// `false` when one can.
    pub fn may_place_below<P: AsRef<OsStr> + ?Sized>(
        &self,
        path: &P,
        backend: BackendKind,
    ) -> bool {
        let d = self.descend(path.as_ref().as_bytes());
        self.backend_of(d.floor) == backend || d.below[backend_index(backend)] > d.floor
    }

    /// `Some(b)` when `path` and all its descendants resolve to backend `b`;
    /// `None` when they may not (a conservative answer, like
    /// [`Rules::may_place_below`]).
    pub fn uniform_backend<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> Option<BackendKind> {
        let d = self.descend(path.as_ref().as_bytes());
        let here = self.backend_of(d.here);
        let other = here.other();
        let mixed = self.backend_of(d.floor) == other || d.below[backend_index(other)] > d.floor;
        (!mixed).then_some(here)
    }

    /// Whether `path` is a strict ancestor of a path some rule's pattern names
    /// exactly (`/scans` and `/scans/x` for `/scans/*/work`): under
    /// `unplaced = "deny"` such directories may still be created.
    pub fn is_rule_ancestor<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> bool {
        let d = self.descend(path.as_ref().as_bytes());
        d.below.iter().any(Option::is_some)
    }

    pub fn unplaced(&self) -> Unplaced {
        self.unplaced
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    fn placement(&self, rank: Option<u32>) -> Placement {
        match rank {
            Some(r) => {
                let rule = &self.by_rank[r as usize];
                Placement {
                    class: rule.class,
                    read_only: rule.read_only,
                    rule: Some(Arc::clone(rule)),
                }
            }
            None => Placement {
                class: Class::Authoritative,
                rule: None,
                read_only: false,
            },
        }
    }

    fn backend_of(&self, rank: Option<u32>) -> BackendKind {
        rank.map_or(BackendKind::Atlas, |r| {
            self.by_rank[r as usize].class.backend()
        })
    }

    fn descend(&self, path: &[u8]) -> Descent {
        with_scratch(|cur, next| {
            let mut here = None;
            self.run(path, cur, next, |r| here = here.max(Some(r)));
            let mut below = [None, None];
            for &n in cur.iter() {
                for (b, slot) in below.iter_mut().enumerate() {
                    *slot = (*slot).max(self.nodes[n as usize].below[b]);
                }
            }
            self.step(cur, None, next);
            let floor = next
                .iter()
                .map(|&n| self.nodes[n as usize].terminal)
                .fold(here, Option::max);
            Descent { here, floor, below }
        })
    }

    /// Runs the NFA over `path`, calling `on_match` with the rank of every
    /// rule whose pattern matches a prefix of it (hence the path). Leaves the
    /// states after the last component in `cur`.
    fn run(
        &self,
        path: &[u8],
        cur: &mut Vec<u32>,
        next: &mut Vec<u32>,
        mut on_match: impl FnMut(u32),
    ) {
        cur.clear();
        cur.push(0);
        self.close(cur);
        self.visit_terminals(cur, &mut on_match);
        for comp in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            if cur.is_empty() {
                break;
            }
            // Patterns are UTF-8: a name that is not can match only wildcards, which
            // is what a name no pattern mentions does.
            self.step(cur, std::str::from_utf8(comp).ok(), next);
            std::mem::swap(cur, next);
            self.visit_terminals(cur, &mut on_match);
        }
    }

    /// One NFA step; `comp = None` stands for a name no pattern mentions.
    fn step(&self, cur: &[u32], comp: Option<&str>, next: &mut Vec<u32>) {
        next.clear();
        for &n in cur {
            let node = &self.nodes[n as usize];
            if node.is_dstar {
                push_unique(next, n);
            }
            if let Some(c) = comp {
                if !node.literal.is_empty() {
                    if let Some(&m) = node.literal.get(c) {
                        push_unique(next, m);
                    }
                }
            }
            if let Some(m) = node.star {
                push_unique(next, m);
            }
        }
        self.close(next);
    }

    /// Adds the `**` children of the set (a `**` may match zero components).
    fn close(&self, set: &mut Vec<u32>) {
        let mut i = 0;
        while i < set.len() {
            if let Some(d) = self.nodes[set[i] as usize].dstar {
                push_unique(set, d);
            }
            i += 1;
        }
    }

    fn visit_terminals(&self, set: &[u32], on_match: &mut impl FnMut(u32)) {
        for &n in set {
            if let Some(r) = self.nodes[n as usize].terminal {
                on_match(r);
            }
        }
    }
}

#[cfg(test)]
mod tests;
