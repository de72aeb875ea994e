//! `labfs backup-scope`: the backup scope of Atlas, derived from the rules.
//!
//! The architecture says backup scope follows classification: authoritative and
//! runtime data is backed up; ephemeral data never is; transitional data only once it
//! is promoted, and promoted data is the only transitional data that lives on Atlas,
//! so transitional subtrees on Atlas are included. Of labfs's own state on Atlas
//! (`/.labfs`) the identity marker and the tag store are included, promotion staging
//! (`/.labfs/staging`, half-copied trees) is not.
//!
//! A path's class is decided by the most specific rule that matches it, a rule covers
//! everything below its pattern, and paths no rule matches are authoritative. Each
//! output format states exactly that in the tool's own pattern language:
//!
//! - `rsync`: a filter list for `--exclude-from` (first match wins). Rules are listed
//!   most specific first, each as `DIR/***` (the directory and everything in it). An
//!   included rule nested inside an excluded one also gets dir-only includes (`+ A/`)
//!   for its ancestors, because rsync does not descend into an excluded directory.
//! - `borg`: a `--patterns-from` file (first match wins) with the Atlas root as
//!   recursion root; `sh:` patterns match a path and everything below it, like rules.
//!   Excludes use `!` (do not even descend) unless an included rule is nested inside,
//!   then `-` (descend, so the nested include is found).
//! - `restic`: an `--exclude-file` (last match wins, excluded directories are never
//!   entered, no directory-only patterns). It cannot exclude a subtree yet keep a
//!   subtree of it, so such an excluded rule is left out (backed up: over-including is
//!   the safe side) and the output says so in a comment and on stderr.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::exit::load_config;
use crate::exit::{EXIT_FAIL, EXIT_OK};
use crate::rules::{canonical_pattern, compare_specificity, Class, Rule};

/// The backup tools whose pattern syntax `backup-scope` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Rsync,
    Restic,
    Borg,
}

/// One component of a rule pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Star,
    DStar,
}

fn segs(pattern: &str) -> Vec<Seg> {
    canonical_pattern(pattern)
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| match c {
            "*" => Seg::Star,
            "**" => Seg::DStar,
            lit => Seg::Lit(lit.to_string()),
        })
        .collect()
}

/// Whether some path is matched by both segment patterns (exactly, not below).
fn intersects(a: &[Seg], b: &[Seg]) -> bool {
    match (a.first(), b.first()) {
        (None, None) => true,
        (Some(Seg::DStar), _) => {
            intersects(&a[1..], b) || (!b.is_empty() && intersects(a, &b[1..]))
        }
        (_, Some(Seg::DStar)) => {
            intersects(a, &b[1..]) || (!a.is_empty() && intersects(&a[1..], b))
        }
        (None, Some(_)) | (Some(_), None) => false,
        (Some(x), Some(y)) => {
            let one = match (x, y) {
                (Seg::Lit(p), Seg::Lit(q)) => p == q,
                _ => true,
            };
            one && intersects(&a[1..], &b[1..])
        }
    }
}

/// Whether some path matched by `inner` is at or below a path matched by `outer`.
fn may_be_below(outer: &[Seg], inner: &[Seg]) -> bool {
    let mut o = outer.to_vec();
    o.push(Seg::DStar);
    intersects(&o, inner)
}

/// A rule as the backup sees it.
#[derive(Clone, Debug)]
struct Entry {
    rule: String,
    line: usize,
    class: Class,
    segs: Vec<Seg>,
    /// For an excluded rule: labels of more specific included rules nested inside it.
    nested_includes: Vec<String>,
    /// For an included rule: it sits inside a less specific excluded rule.
    inside_exclude: bool,
    /// labfs's own state rather than a rule: what it is.
    builtin: Option<&'static str>,
}

impl Entry {
    fn included(&self) -> bool {
        self.class != Class::Ephemeral
    }
    fn label(&self) -> String {
        if let Some(what) = self.builtin {
            format!("{} ({what})", self.rule)
        } else if self.line > 0 {
            format!("{} (line {})", self.rule, self.line)
        } else {
            format!("{} (built-in)", self.rule)
        }
    }
    fn why(&self) -> &'static str {
        if self.builtin.is_some() {
            return if self.included() {
                "backed up"
            } else {
                "never backed up"
            };
        }
        match self.class {
            Class::Authoritative => "authoritative: backed up",
            Class::Runtime => "runtime: backed up",
            Class::Transitional => "transitional: only promoted data is on Atlas, backed up",
            Class::Ephemeral => "ephemeral: never backed up",
        }
    }
}

/// labfs's own state on Atlas: identity marker and tag store are backed up, the
/// staging area of promotions in progress never is. Both come before every rule.
const STAGING: &str = "/.labfs/staging";
const STATE: &str = "/.labfs";

fn builtin(path: &str, class: Class, what: &'static str) -> Entry {
    Entry {
        rule: path.to_string(),
        line: 0,
        class,
        segs: segs(path),
        nested_includes: Vec::new(),
        inside_exclude: false,
        builtin: Some(what),
    }
}

/// labfs's state, then the rules most specific first, with nesting worked out.
fn entries(rules: &[std::sync::Arc<Rule>]) -> Vec<Entry> {
    let mut v: Vec<Entry> = rules
        .iter()
        .map(|r| Entry {
            rule: r.path.clone(),
            line: r.line,
            class: r.class,
            segs: segs(&r.path),
            nested_includes: Vec::new(),
            inside_exclude: false,
            builtin: None,
        })
        .collect();
    v.sort_by(|a, b| match compare_specificity(&b.rule, &a.rule) {
        Ordering::Equal => a.line.cmp(&b.line),
        o => o,
    });
    v.insert(0, builtin(STATE, Class::Runtime, "labfs identity and tags"));
    v.insert(
        0,
        builtin(STAGING, Class::Ephemeral, "promotions in progress"),
    );
    // v[i] is more specific than v[j] for i < j. Candidates come from a trie of the
    // included rules, so the work grows with the rules that could nest, not with
    // every pair (10,000 rules would otherwise be 10^8 comparisons).
    let mut trie = Trie::default();
    for (i, e) in v.iter().enumerate() {
        if e.included() {
            trie.insert(&e.segs, i);
        }
    }
    for j in 0..v.len() {
        if v[j].included() {
            continue;
        }
        let mut cands = Vec::new();
        trie.below(&v[j].segs, &mut cands);
        cands.sort_unstable();
        cands.dedup();
        for i in cands.into_iter().filter(|&i| i < j) {
            if may_be_below(&v[j].segs, &v[i].segs) {
                let label = v[i].label();
                v[j].nested_includes.push(label);
                v[i].inside_exclude = true;
            }
        }
    }
    v
}

/// Rule patterns by segment, to find the ones that may lie below a pattern.
#[derive(Default)]
struct Trie {
    lit: std::collections::HashMap<String, Trie>,
    star: Option<Box<Trie>>,
    dstar: Option<Box<Trie>>,
    here: Vec<usize>,
}

impl Trie {
    fn insert(&mut self, segs: &[Seg], id: usize) {
        let Some(first) = segs.first() else {
            self.here.push(id);
            return;
        };
        let next = match first {
            Seg::Lit(l) => self.lit.entry(l.clone()).or_default(),
            Seg::Star => self.star.get_or_insert_with(Default::default),
            Seg::DStar => self.dstar.get_or_insert_with(Default::default),
        };
        next.insert(&segs[1..], id);
    }

    fn all(&self, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.here);
        for t in self.lit.values() {
            t.all(out);
        }
        for t in self.star.iter().chain(self.dstar.iter()) {
            t.all(out);
        }
    }

    /// Every pattern that may match a path at or below one `outer` matches (a
    /// superset; the caller checks each with `may_be_below`).
    fn below(&self, outer: &[Seg], out: &mut Vec<usize>) {
        let Some(first) = outer.first() else {
            self.all(out);
            return;
        };
        if let Some(d) = &self.dstar {
            d.all(out);
        }
        match first {
            Seg::DStar => self.all(out),
            Seg::Lit(l) => {
                if let Some(t) = self.lit.get(l) {
                    t.below(&outer[1..], out);
                }
                if let Some(t) = &self.star {
                    t.below(&outer[1..], out);
                }
            }
            Seg::Star => {
                for t in self.lit.values() {
                    t.below(&outer[1..], out);
                }
                if let Some(t) = &self.star {
                    t.below(&outer[1..], out);
                }
            }
        }
    }
}

/// The expansions of a pattern where each `**` is either dropped (zero components)
/// or kept (one or more), for tools whose `**` needs at least one component.
fn expansions(s: &[Seg]) -> Vec<Vec<Seg>> {
    let mut out: Vec<Vec<Seg>> = vec![Vec::new()];
    for seg in s {
        if *seg == Seg::DStar {
            let kept: Vec<Vec<Seg>> = out
                .iter()
                .map(|p| {
                    let mut p = p.clone();
                    p.push(Seg::DStar);
                    p
                })
                .collect();
            out.extend(kept);
        } else {
            for p in &mut out {
                p.push(seg.clone());
            }
        }
    }
    out.sort_by_key(|p| p.len());
    out.dedup();
    out
}

/// A literal name escaped for rsync's and restic's wildcard matching.
fn escape_backslash(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// A literal name escaped for borg's `sh:` style (brackets, as in fnmatch).
fn escape_brackets(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        match c {
            '*' | '?' | '[' => {
                s.push('[');
                s.push(c);
                s.push(']');
            }
            _ => s.push(c),
        }
    }
    s
}

fn join(s: &[Seg], escape: fn(&str) -> String) -> String {
    let mut out = String::new();
    for seg in s {
        out.push('/');
        match seg {
            Seg::Lit(l) => out.push_str(&escape(l)),
            Seg::Star => out.push('*'),
            Seg::DStar => out.push_str("**"),
        }
    }
    out
}

/// `/a/b` as rsync wants it: `/a/b/***` for a subtree, `/a/b/` for a directory only.
fn rsync_lines(sign: char, s: &[Seg], dir_only: bool) -> Vec<String> {
    expansions(s)
        .iter()
        .map(|p| {
            let base = join(p, escape_backslash);
            if dir_only {
                format!("{sign} {base}/")
            } else if base.is_empty() {
                format!("{sign} /***")
            } else {
                format!("{sign} {base}/***")
            }
        })
        .collect()
}

/// What `labfs backup-scope` prints; `warnings` go to stderr.
pub struct Scope {
    pub text: String,
    pub warnings: Vec<String>,
}

fn path_str(p: &Path) -> String {
    p.display().to_string().trim_end_matches('/').to_string()
}

/// The scope in `format` for rules `rules`, with Atlas at `root`, from `source`.
pub fn render(rules: &[std::sync::Arc<Rule>], format: Format, root: &Path, source: &str) -> Scope {
    let es = entries(rules);
    let root_s = path_str(root);
    let mut t = String::new();
    let mut warnings = Vec::new();
    let _ = writeln!(t, "# labfs backup scope of Atlas {root_s}");
    let _ = writeln!(t, "# generated by `labfs backup-scope --format {}` from {source}; regenerate when the rules change", name(format));
    let _ = writeln!(
        t,
        "# in: authoritative, runtime, transitional (promoted; unpromoted data is never on Atlas), paths no rule matches, /.labfs"
    );
    let _ = writeln!(
        t,
        "# out: ephemeral, /.labfs/staging (promotions in progress)"
    );
    match format {
        Format::Rsync => {
            let _ = writeln!(
                t,
                "# use: rsync -aHAX --exclude-from=THIS_FILE {root_s}/ DEST/"
            );
            let _ = writeln!(
                t,
                "# (first matching line wins; DIR/*** is DIR and everything in it)"
            );
            let nested: Vec<&Entry> = es
                .iter()
                .filter(|e| e.included() && e.inside_exclude)
                .collect();
            if !nested.is_empty() {
                let _ = writeln!(t, "# directories leading to data kept inside excluded subtrees (the directories only)");
                let mut seen: std::collections::HashSet<String> = Default::default();
                for e in nested {
                    for k in 1..e.segs.len() {
                        for l in rsync_lines('+', &e.segs[..k], true) {
                            if seen.insert(l.clone()) {
                                t.push_str(&l);
                                t.push('\n');
                            }
                        }
                    }
                }
            }
            for e in &es {
                let _ = writeln!(t, "# {}: {}", e.label(), e.why());
                let sign = if e.included() { '+' } else { '-' };
                for l in rsync_lines(sign, &e.segs, false) {
                    t.push_str(&l);
                    t.push('\n');
                }
            }
            let _ = writeln!(t, "# anything else: no rule, authoritative: backed up");
        }
        Format::Borg => {
            let _ = writeln!(
                t,
                "# use: borg create --patterns-from THIS_FILE REPO::ARCHIVE"
            );
            let _ = writeln!(
                t,
                "# (first matching line wins; sh:DIR matches DIR and everything in it)"
            );
            let _ = writeln!(t, "R {root_s}");
            for e in &es {
                let _ = writeln!(t, "# {}: {}", e.label(), e.why());
                let pat = format!("sh:{root_s}{}", join(&e.segs, escape_brackets));
                let pat = if e.segs.is_empty() {
                    format!("sh:{root_s}")
                } else {
                    pat
                };
                let sign = match (e.included(), e.nested_includes.is_empty()) {
                    (true, _) => '+',
                    // Descend: more specific included rules live inside.
                    (false, false) => '-',
                    (false, true) => '!',
                };
                let _ = writeln!(t, "{sign} {pat}");
            }
            let _ = writeln!(t, "# anything else: no rule, authoritative: backed up");
        }
        Format::Restic => {
            let _ = writeln!(t, "# use: restic backup --exclude-file=THIS_FILE {root_s}");
            let _ = writeln!(t, "# (only exclusions: everything not listed is backed up)");
            // Last match wins: least specific first. Included rules need no line unless
            // they sit inside an excluded one, which restic cannot express (see below).
            for e in es.iter().rev() {
                if e.included() {
                    continue;
                }
                if !e.nested_includes.is_empty() {
                    let msg = format!(
                        "{} is ephemeral but {} inside it is backed up; restic cannot exclude a directory and keep part of it, so {} is backed up whole (use --format rsync or borg for an exact scope)",
                        e.label(),
                        e.nested_includes.join(", "),
                        e.rule
                    );
                    let _ = writeln!(t, "# NOT EXCLUDED: {msg}");
                    warnings.push(msg);
                    continue;
                }
                let _ = writeln!(t, "# {}: {}", e.label(), e.why());
                let _ = writeln!(t, "{root_s}{}", join(&e.segs, escape_backslash));
            }
        }
    }
    Scope { text: t, warnings }
}

fn name(f: Format) -> &'static str {
    match f {
        Format::Rsync => "rsync",
        Format::Restic => "restic",
        Format::Borg => "borg",
    }
}

/// `labfs backup-scope [--config FILE] [--format F] [--root DIR]`.
pub fn run(config: &Path, format: Format, root: Option<PathBuf>) -> i32 {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let root = root.unwrap_or_else(|| cfg.storage.atlas.clone());
    let names_ok = cfg
        .rules
        .rules()
        .iter()
        .all(|r| !r.path.contains('\n') && !r.path.contains('\r'));
    if !names_ok {
        eprintln!("labfs: a rule pattern contains a line break, which no backup tool's pattern file can hold");
        return EXIT_FAIL;
    }
    let scope = render(
        cfg.rules.rules(),
        format,
        &root,
        &config.display().to_string(),
    );
    for w in &scope.warnings {
        eprintln!("labfs: warning: {w}");
    }
    print!("{}", scope.text);
    EXIT_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rule(path: &str, class: Class, line: usize) -> Arc<Rule> {
        Arc::new(Rule {
            path: path.to_string(),
            class,
            read_only: false,
            writers: Vec::new(),
            promote_class: None,
            max_unpromoted: None,
            line,
        })
    }

    fn sample() -> Vec<Arc<Rule>> {
        vec![
            rule("/cache", Class::Ephemeral, 1),
            rule("/cache/*/keep", Class::Authoritative, 4),
            rule("/scans/*/work", Class::Transitional, 7),
            rule("/appdata", Class::Runtime, 10),
            rule("/appdata/*/node_modules", Class::Ephemeral, 13),
        ]
    }

    fn lines(s: &Scope) -> Vec<&str> {
        s.text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn intersection_of_patterns() {
        assert!(intersects(&segs("/a/*"), &segs("/a/b")));
        assert!(!intersects(&segs("/a/*"), &segs("/a/b/c")));
        assert!(intersects(&segs("/**/x"), &segs("/x")));
        assert!(intersects(&segs("/**/x"), &segs("/a/*/x")));
        assert!(!intersects(&segs("/a"), &segs("/b")));
        assert!(may_be_below(&segs("/cache"), &segs("/cache/*/keep")));
        assert!(may_be_below(
            &segs("/**/node_modules"),
            &segs("/x/node_modules/keep")
        ));
        assert!(!may_be_below(&segs("/cache"), &segs("/docs")));
    }

    #[test]
    fn rsync_lists_most_specific_first_with_ancestors_of_nested_includes() {
        let s = render(
            &sample(),
            Format::Rsync,
            Path::new("/mnt/atlas/lab"),
            "t.toml",
        );
        assert_eq!(
            lines(&s),
            vec![
                "+ /cache/",
                "+ /cache/*/",
                "- /.labfs/staging/***",
                "+ /.labfs/***",
                "- /appdata/*/node_modules/***",
                "+ /cache/*/keep/***",
                "+ /scans/*/work/***",
                "+ /appdata/***",
                "- /cache/***",
            ]
        );
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn borg_descends_only_into_excludes_with_nested_includes() {
        let s = render(
            &sample(),
            Format::Borg,
            Path::new("/mnt/atlas/lab/"),
            "t.toml",
        );
        assert_eq!(
            lines(&s),
            vec![
                "R /mnt/atlas/lab",
                "! sh:/mnt/atlas/lab/.labfs/staging",
                "+ sh:/mnt/atlas/lab/.labfs",
                "! sh:/mnt/atlas/lab/appdata/*/node_modules",
                "+ sh:/mnt/atlas/lab/cache/*/keep",
                "+ sh:/mnt/atlas/lab/scans/*/work",
                "+ sh:/mnt/atlas/lab/appdata",
                "- sh:/mnt/atlas/lab/cache",
            ]
        );
    }

    #[test]
    fn restic_keeps_what_it_cannot_exclude_exactly_and_says_so() {
        let s = render(
            &sample(),
            Format::Restic,
            Path::new("/mnt/atlas/lab"),
            "t.toml",
        );
        assert_eq!(
            lines(&s),
            vec![
                "/mnt/atlas/lab/appdata/*/node_modules",
                "/mnt/atlas/lab/.labfs/staging"
            ]
        );
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].contains("/cache (line 1)"),
            "{}",
            s.warnings[0]
        );
        assert!(s.text.contains("# NOT EXCLUDED: /cache (line 1)"));
    }

    #[test]
    fn double_star_is_expanded_for_rsync_only() {
        let r = vec![rule("/**/node_modules", Class::Ephemeral, 1)];
        let rs = render(&r, Format::Rsync, Path::new("/x"), "t");
        assert!(lines(&rs).ends_with(&["- /node_modules/***", "- /**/node_modules/***"]));
        let b = render(&r, Format::Borg, Path::new("/x"), "t");
        assert!(lines(&b).contains(&"! sh:/x/**/node_modules"));
        let re = render(&r, Format::Restic, Path::new("/x"), "t");
        assert!(lines(&re).contains(&"/x/**/node_modules"));
    }

    #[test]
    fn special_characters_are_escaped_per_tool() {
        let r = vec![rule("/a[1]/b?", Class::Ephemeral, 1)];
        let rs = render(&r, Format::Rsync, Path::new("/x"), "t");
        assert!(lines(&rs).contains(&"- /a\\[1\\]/b\\?/***"));
        let b = render(&r, Format::Borg, Path::new("/x"), "t");
        assert!(lines(&b).contains(&"! sh:/x/a[[]1]/b[?]"));
    }

    #[test]
    fn a_root_rule_covers_everything() {
        let r = vec![
            rule("/", Class::Ephemeral, 1),
            rule("/keep", Class::Runtime, 2),
        ];
        let s = render(&r, Format::Rsync, Path::new("/x"), "t");
        assert_eq!(
            lines(&s),
            vec![
                "- /.labfs/staging/***",
                "+ /.labfs/***",
                "+ /keep/***",
                "- /***"
            ]
        );
    }
}
