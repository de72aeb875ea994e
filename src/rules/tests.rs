//! Unit and property tests for the placement matcher.

use super::*;
use proptest::prelude::*;

fn rule(path: &str, class: Class, line: usize) -> Rule {
    Rule {
        path: path.to_string(),
        class,
        read_only: false,
        writers: Vec::new(),
        promote_class: None,
        max_unpromoted: None,
        line,
    }
}

fn rules(specs: &[(&str, Class)]) -> Rules {
    let list = specs
        .iter()
        .enumerate()
        .map(|(i, (p, c))| rule(p, *c, i + 1))
        .collect();
    Rules::new(list, Unplaced::Authoritative)
}

fn winner(r: &Rules, path: &str) -> Option<String> {
    r.resolve(path).rule.map(|x| x.path.clone())
}

use Class::*;

fn demo_like() -> Rules {
    rules(&[
        ("/cache", Ephemeral),
        ("/scratch", Ephemeral),
        ("/models", Ephemeral),
        ("/transcode", Ephemeral),
        ("/scans/*/work", Transitional),
        ("/appdata", Runtime),
        ("/config", Runtime),
        ("/media", Authoritative),
    ])
}

#[test]
fn rule_covers_its_path_and_everything_below() {
    let r = demo_like();
    assert_eq!(winner(&r, "/cache").as_deref(), Some("/cache"));
    assert_eq!(winner(&r, "/cache/x/y").as_deref(), Some("/cache"));
    assert_eq!(winner(&r, "/cachex"), None);
    assert_eq!(
        winner(&r, "/scans/a/work").as_deref(),
        Some("/scans/*/work")
    );
    assert_eq!(
        winner(&r, "/scans/a/work/b/c").as_deref(),
        Some("/scans/*/work")
    );
    assert_eq!(winner(&r, "/scans/a"), None);
    assert_eq!(winner(&r, "/scans"), None);
    assert_eq!(r.resolve("/scans/a/work/x").backend(), BackendKind::Local);
}

#[test]
fn paths_are_bytes_and_non_utf8_names_are_placed() {
    use std::os::unix::ffi::OsStrExt;
    let r = demo_like();
    let b = |s: &[u8]| std::ffi::OsStr::from_bytes(s).to_os_string();
    // A non-UTF-8 name below a rule takes the rule; as a wildcard component too.
    assert_eq!(r.resolve(&b(b"/cache/\xff\xfe")).class, Ephemeral);
    assert_eq!(
        r.resolve(&b(b"/scans/\xe9t\xe9/work/f")).class,
        Transitional
    );
    // It never equals a literal.
    assert_eq!(
        r.resolve(&b(b"/cach\xe9")).rule.map(|x| x.path.clone()),
        None
    );
    assert!(r.may_place_below(&b(b"/scans/\xff"), BackendKind::Local));
    // No depth limit: a path of thousands of components resolves.
    let mut deep = b"/cache".to_vec();
    for _ in 0..5000 {
        deep.extend_from_slice(b"/d");
    }
    assert_eq!(r.resolve(&b(&deep)).class, Ephemeral);
}

#[test]
fn no_rule_is_authoritative_and_writable() {
    let r = Rules::new(Vec::new(), Unplaced::Deny);
    for path in ["/", "/a", "/a/b"] {
        let p = r.resolve(path);
        assert_eq!(p.class, Authoritative);
        assert!(p.rule.is_none());
        assert!(!p.read_only);
        assert_eq!(p.rule_label(), "no rule (unplaced)");
    }
    assert_eq!(r.unplaced(), Unplaced::Deny);
}

#[test]
fn root_rule_matches_everything() {
    let r = rules(&[("/", Runtime), ("/cache", Ephemeral)]);
    assert_eq!(winner(&r, "/").as_deref(), Some("/"));
    assert_eq!(winner(&r, "/x/y").as_deref(), Some("/"));
    assert_eq!(winner(&r, "/cache/y").as_deref(), Some("/cache"));
    assert_eq!(r.uniform_backend("/x"), Some(BackendKind::Atlas));
    assert_eq!(r.uniform_backend("/"), None);
}

#[test]
fn double_star_matches_zero_or_more_components() {
    let r = rules(&[("/a/**/b", Ephemeral)]);
    assert_eq!(winner(&r, "/a/b").as_deref(), Some("/a/**/b"));
    assert_eq!(winner(&r, "/a/x/y/b/z").as_deref(), Some("/a/**/b"));
    assert_eq!(winner(&r, "/a/x"), None);
    let r = rules(&[("/**/.cache", Ephemeral)]);
    assert_eq!(winner(&r, "/.cache").as_deref(), Some("/**/.cache"));
    assert_eq!(
        winner(&r, "/home/u/.cache/f").as_deref(),
        Some("/**/.cache")
    );
    assert!(r.is_rule_ancestor("/home/u"));
}

#[test]
fn specificity_order() {
    let more = |a: &str, b: &str| compare_specificity(a, b) == Ordering::Greater;
    // More non-`**` components wins.
    assert!(more("/scans/*/work", "/scans/special"));
    assert!(more("/a/**/b", "/a"));
    // Then literal > `*` > `**`, from the root.
    assert!(more("/a/b", "/a/*"));
    assert!(more("/a/b", "/a/**/b"));
    assert!(more("/a/*/c", "/*/b/c"));
    assert!(more("/home", "/**/.cache"));
    // Then byte order of the components: the one sorting first wins.
    assert!(more("/**/a", "/**/b"));
    // Equivalent spellings are equal.
    assert_eq!(compare_specificity("/a/", "/a/**"), Ordering::Equal);
    assert_eq!(compare_specificity("/a/**/*", "/a/*"), Ordering::Equal);

    let r = rules(&[
        ("/a/*", Ephemeral),
        ("/a/b", Runtime),
        ("/a/**/c", Transitional),
    ]);
    // Equal counts; `b` beats `**` at the second component.
    assert_eq!(winner(&r, "/a/b/c").as_deref(), Some("/a/b"));
    assert_eq!(winner(&r, "/a/x/c").as_deref(), Some("/a/*"));
    // `*` beats `**` at the second component: `/a/**/c` is shadowed here.
    assert_eq!(winner(&r, "/a/x/y/c").as_deref(), Some("/a/*"));
    let all: Vec<String> = r
        .matching("/a/b/c")
        .iter()
        .map(|x| x.path.clone())
        .collect();
    assert_eq!(all, ["/a/b", "/a/*", "/a/**/c"]);
}

#[test]
fn normalize_and_canonicalize() {
    assert_eq!(normalize_pattern("/cache/").as_deref(), Ok("/cache"));
    assert_eq!(normalize_pattern("/").as_deref(), Ok("/"));
    assert_eq!(normalize_pattern("/a/*/**").as_deref(), Ok("/a/*/**"));
    for bad in [
        "cache", "", "/a//b", "/a/./b", "/a/..", "/a*b", "/***", "/x/*y",
    ] {
        assert!(normalize_pattern(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(canonical_pattern("/a/**"), "/a");
    assert_eq!(canonical_pattern("/**"), "/");
    assert_eq!(canonical_pattern("/a/**/*/**/b"), "/a/*/**/b");
    assert_eq!(canonical_pattern("/a/**/*"), "/a/*");
}

#[test]
fn subtree_queries() {
    let r = demo_like();
    use BackendKind::*;
    assert_eq!(r.uniform_backend("/"), None);
    assert_eq!(r.uniform_backend("/cache"), Some(Local));
    assert_eq!(r.uniform_backend("/cache/a"), Some(Local));
    assert_eq!(r.uniform_backend("/media"), Some(Atlas));
    assert_eq!(r.uniform_backend("/home"), Some(Atlas));
    assert_eq!(r.uniform_backend("/scans"), None);
    assert_eq!(r.uniform_backend("/scans/x"), None);
    assert_eq!(r.uniform_backend("/scans/x/work"), Some(Local));
    assert_eq!(r.uniform_backend("/scans/x/raw"), Some(Atlas));
    assert!(r.may_place_below("/", Local));
    assert!(r.may_place_below("/scans", Local));
    assert!(!r.may_place_below("/media", Local));
    assert!(!r.may_place_below("/cache", Atlas));
    assert!(r.is_rule_ancestor("/"));
    assert!(r.is_rule_ancestor("/scans"));
    assert!(r.is_rule_ancestor("/scans/x"));
    assert!(!r.is_rule_ancestor("/scans/x/work"));
    assert!(!r.is_rule_ancestor("/cache"));
    assert!(!r.is_rule_ancestor("/home"));

    // A child wildcard rule covers every descendant, hiding the parent's class.
    let r = rules(&[("/a", Authoritative), ("/a/*", Ephemeral)]);
    assert_eq!(r.uniform_backend("/a"), None);
    assert!(!r.may_place_below("/a", Atlas));
    assert_eq!(r.uniform_backend("/a/x"), Some(Local));
}

#[test]
fn write_permission() {
    let mut media = rule("/media", Authoritative, 14);
    media.read_only = true;
    media.writers = vec![
        Writer::User {
            name: "alice".into(),
            uid: 1000,
        },
        Writer::Group {
            name: "media-admin".into(),
            gid: 500,
        },
    ];
    let r = Rules::new(vec![media], Unplaced::Authoritative);
    let p = r.resolve("/media/x");
    assert!(p.read_only);
    assert_eq!(p.rule_label(), "/media (line 14)");
    assert!(p.may_write(1000, 1000, &[]));
    assert!(p.may_write(1001, 500, &[]));
    assert!(p.may_write(1001, 1001, &[20, 500]));
    assert!(!p.may_write(1001, 1001, &[20]));
    assert!(!p.may_write(0, 0, &[]));
    assert!(r.resolve("/other").may_write(1001, 1001, &[]));
}

// ---- property tests against a naive reference matcher ----

fn comps(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// Whether `p` matches exactly the components `c`.
fn glob(p: &[&str], c: &[&str]) -> bool {
    match p.split_first() {
        None => c.is_empty(),
        Some((&"**", rest)) => (0..=c.len()).any(|k| glob(rest, &c[k..])),
        Some((&"*", rest)) => !c.is_empty() && glob(rest, &c[1..]),
        Some((lit, rest)) => c.first() == Some(lit) && glob(rest, &c[1..]),
    }
}

/// Whether `c` followed by at least one more component can match `p` exactly.
fn extends(p: &[&str], c: &[&str]) -> bool {
    if c.is_empty() {
        return !p.is_empty();
    }
    match p.split_first() {
        None => false,
        Some((&"**", rest)) => extends(rest, c) || extends(p, &c[1..]),
        Some((&"*", rest)) => extends(rest, &c[1..]),
        Some((lit, rest)) => c[0] == *lit && extends(rest, &c[1..]),
    }
}

fn naive_resolve<'a>(list: &'a [Rule], path: &str) -> Option<&'a Rule> {
    let c = comps(path);
    list.iter()
        .filter(|r| (0..=c.len()).any(|k| glob(&comps(&r.path), &c[..k])))
        .max_by(|a, b| compare_specificity(&a.path, &b.path))
}

fn pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "*", "**"]), 0..4)
        .prop_map(|v| format!("/{}", v.join("/")))
}

fn a_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "d"]), 0..6)
        .prop_map(|v| format!("/{}", v.join("/")))
}

fn rule_list() -> impl Strategy<Value = Vec<Rule>> {
    prop::collection::vec(
        (pattern(), prop::sample::select(Class::ALL.to_vec())),
        0..12,
    )
    .prop_map(|v| {
        let mut seen = std::collections::HashSet::new();
        v.into_iter()
            .filter(|(p, _)| seen.insert(canonical_pattern(p)))
            .enumerate()
            .map(|(i, (p, c))| rule(normalize_pattern(&p).as_deref().unwrap_or("/"), c, i + 1))
            .collect()
    })
}

fn join(base: &str, suffix: &str) -> String {
    match (base, suffix) {
        ("/", s) => s.to_string(),
        (b, "/") => b.to_string(),
        (b, s) => format!("{b}{s}"),
    }
}

proptest! {
    #[test]
    fn matcher_agrees_with_reference(list in rule_list(), paths in prop::collection::vec(a_path(), 1..16)) {
        let r = Rules::new(list.clone(), Unplaced::Authoritative);
        for p in &paths {
            let expected = naive_resolve(&list, p);
            let got = r.resolve(p);
            prop_assert_eq!(got.rule.as_ref().map(|x| &x.path), expected.map(|x| &x.path), "path {}", p);
            prop_assert_eq!(got.class, expected.map_or(Authoritative, |x| x.class));
            let ancestor = list.iter().any(|x| extends(&comps(&canonical_pattern(&x.path)), &comps(p)));
            prop_assert_eq!(r.is_rule_ancestor(p), ancestor, "ancestor {}", p);
        }
    }

    #[test]
    fn rule_order_does_not_matter(
        (list, shuffled) in rule_list().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        paths in prop::collection::vec(a_path(), 1..16),
    ) {
        let a = Rules::new(list, Unplaced::Authoritative);
        let b = Rules::new(shuffled, Unplaced::Authoritative);
        for p in &paths {
            prop_assert_eq!(winner(&a, p), winner(&b, p));
            prop_assert_eq!(winner(&a, p), winner(&a, p));
            prop_assert_eq!(a.uniform_backend(p), b.uniform_backend(p));
        }
    }

    #[test]
    fn below_a_pattern_its_rule_or_a_more_specific_one_wins(list in rule_list(), fill in a_path(), suffix in a_path()) {
        let r = Rules::new(list.clone(), Unplaced::Authoritative);
        for x in &list {
            // Instantiate the pattern: `*` takes a name, `**` takes `fill`.
            let mut inst = String::new();
            for c in comps(&x.path) {
                match c {
                    "*" => inst.push_str("/z"),
                    "**" => inst.push_str(if fill == "/" { "" } else { &fill }),
                    lit => { inst.push('/'); inst.push_str(lit); }
                }
            }
            let inst = if inst.is_empty() { "/".to_string() } else { inst };
            let q = join(&inst, &suffix);
            let got = r.resolve(&q).rule;
            prop_assert!(got.is_some(), "{} does not match {}", q, x.path);
            let got = got.map(|g| g.path.clone()).unwrap_or_default();
            prop_assert_ne!(compare_specificity(&got, &x.path), Ordering::Less, "{} won {} over {}", got, q, x.path);
        }
    }

    #[test]
    fn subtree_answers_are_sound(list in rule_list(), base in a_path(), suffixes in prop::collection::vec(a_path(), 1..24)) {
        let r = Rules::new(list, Unplaced::Authoritative);
        let uniform = r.uniform_backend(&base);
        if let Some(b) = uniform {
            prop_assert_eq!(r.resolve(&base).backend(), b);
        }
        for s in suffixes.iter().filter(|s| s.as_str() != "/") {
            let got = r.resolve(&join(&base, s)).backend();
            if let Some(b) = uniform {
                prop_assert_eq!(got, b, "{}{} vs uniform {:?}", base, s, b);
            }
            prop_assert!(r.may_place_below(&base, got), "{}{} -> {:?} not predicted", base, s, got);
        }
    }
}
