//! Tests for the rules-file parser.

use super::*;
use crate::rules::BackendKind;

const EXAMPLE: &str = r#"unplaced = "authoritative"          # optional, or "deny"
[storage]
atlas = "/mnt/atlas/lab"          # authoritative store: the Atlas NFS mount
local = "/var/lib/labfs/local"    # this node's local SSD
atlas_id = "..."                  # optional: the id written by `labfs init-atlas`
[cache]                           # optional
atlas_ttl = "auto"                # "auto" (from the Atlas mount) or a duration: "500ms", "1s", "2m", "1h", or whole seconds
local_ttl = "1h"
[atlas]                           # optional
timeout = "10s"
probe_interval = "2s"

[[rule]]
path = "/cache"                   # the path and everything below it
class = "ephemeral"

[[rule]]
path = "/scans/*/work"            # * matches one path component, ** any number
class = "transitional"
promote_class = "authoritative"   # optional, only meaningful for transitional

[[rule]]
path = "/media"
class = "authoritative"
read_only = true                  # EROFS through the mount for everyone...
writers = ["group:media-admin"]   # ...except these users/groups (optional): "user:NAME", "group:NAME", "uid:N", "gid:N", or bare "NAME" = user
"#;

fn errors(text: &str, check_paths: bool) -> Vec<(usize, String)> {
    match Config::parse(text, Path::new("labfs.toml"), check_paths) {
        Ok(_) => Vec::new(),
        Err(e) => e.errors.into_iter().map(|e| (e.line, e.message)).collect(),
    }
}

/// Asserts the exact list of error lines, each message containing a substring.
fn assert_errors(text: &str, check_paths: bool, expected: &[(usize, &str)]) {
    let got = errors(text, check_paths);
    let ok = got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .all(|((line, msg), (eline, esub))| line == eline && msg.contains(esub));
    assert!(ok, "expected {expected:#?}\ngot {got:#?}");
}

const STORAGE: &str = "[storage]\natlas = \"/srv/atlas\"\nlocal = \"/srv/local\"\n";

#[test]
fn example_parses_as_written() {
    let cfg = match Config::parse(EXAMPLE, Path::new("labfs.toml"), false) {
        Ok(cfg) => cfg,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(cfg.source, Path::new("labfs.toml"));
    assert_eq!(cfg.storage.atlas, Path::new("/mnt/atlas/lab"));
    assert_eq!(cfg.storage.local, Path::new("/var/lib/labfs/local"));
    assert_eq!(cfg.storage.atlas_id.as_deref(), Some("..."));
    assert_eq!(cfg.cache, CacheConfig::default());
    assert_eq!(cfg.atlas_health, HealthConfig::default());
    assert_eq!(cfg.rules.unplaced(), Unplaced::Authoritative);
    let rules = cfg.rules.rules();
    assert_eq!(rules.len(), 3);
    assert_eq!(
        (rules[0].path.as_str(), rules[0].class, rules[0].line),
        ("/cache", Class::Ephemeral, 13)
    );
    assert_eq!(rules[1].promote_class, Some(Class::Authoritative));
    assert_eq!(rules[1].line, 17);
    assert!(rules[2].read_only);
    assert!(matches!(&rules[2].writers[..], [Writer::Group { name, .. }] if name == "media-admin"));

    let media = cfg.rules.resolve("/media/film.mkv");
    assert!(media.read_only);
    assert_eq!(media.rule_label(), "/media (line 22)");
    assert_eq!(
        cfg.rules.resolve("/scans/s1/work/x").backend(),
        BackendKind::Local
    );
    assert_eq!(
        cfg.rules.resolve("/home").rule_label(),
        "no rule (unplaced)"
    );
}

#[test]
fn collects_every_error_with_its_line() {
    let text = r#"unplaced = "maybe"
colour = "red"
[storage]
atlas = "/mnt/atlas"
local = "relative/dir"
atlass = "/x"
[cache]
atlas_ttl = "5x"
local_ttl = -3
[atlas]
timeout = "0s"

[[rule]]
path = "/cache"
class = "ephemral"

[[rule]]
path = "scans/*/work"
class = "transitional"
promote_class = "ephemeral"

[[rule]]
path = "/cache/"
class = "runtime"
read_only = "yes"
promote_class = "authoritative"

[[rule]]
class = "runtime"
writer = ["x"]

[[rule]]
path = "/a*b/../x"
class = 7
"#;
    assert_errors(
        text,
        false,
        &[
            (1, "unknown unplaced value \"maybe\" (expected authoritative or deny)"),
            (2, "unknown key \"colour\" (expected one of unplaced, storage, cache, atlas, limits, fuse, rule, dir)"),
            (5, "storage.local must be an absolute path, got \"relative/dir\""),
            (6, "unknown key \"atlass\" in [storage]"),
            (8, "bad duration \"5x\" for cache.atlas_ttl"),
            (9, "bad duration -3 for cache.local_ttl"),
            (11, "atlas.timeout must be greater than zero"),
            (13, "duplicate rule for \"/cache\": same path as \"/cache/\" at line 22"),
            (
                15,
                "unknown class \"ephemral\" (expected one of authoritative, runtime, ephemeral, transitional)",
            ),
            (18, "invalid rule path \"scans/*/work\": must be an absolute path"),
            (20, "promote_class \"ephemeral\" must be an Atlas class"),
            (22, "duplicate rule for \"/cache/\": same path as \"/cache\" at line 13"),
            (25, "rule.read_only must be true or false, found string"),
            (26, "promote_class is only allowed on transitional rules (this rule is runtime)"),
            (28, "rule is missing \"path\""),
            (30, "unknown key \"writer\" in [[rule]]"),
            (33, "invalid rule path \"/a*b/../x\": component \"a*b\" mixes"),
            (34, "rule.class must be a string, found integer"),
        ],
    );
}

#[test]
fn display_prefixes_source_and_line() {
    let text = format!("{STORAGE}[[rule]]\npath = \"/x\"\nclass = \"ephemral\"\n");
    let err = match Config::parse(&text, Path::new("labfs.toml"), false) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert_eq!(
        err.to_string(),
        "labfs.toml:6: unknown class \"ephemral\" (expected one of authoritative, runtime, ephemeral, transitional)"
    );
}

#[test]
fn syntax_errors_carry_their_line() {
    assert_errors(
        "[storage]\natlas = \"/a\"\nlocal = \"/b\n",
        false,
        &[(3, "TOML syntax error")],
    );
    assert_errors(
        &format!("{STORAGE}[[rule]]\npath = \"/a\"\npath = \"/b\"\nclass = \"runtime\"\n"),
        false,
        &[(6, "TOML syntax error")],
    );
}

#[test]
fn storage_is_required_and_distinct() {
    assert_errors("", false, &[(0, "missing [storage] section")]);
    assert_errors(
        "[storage]\natlas = \"/a\"\n",
        false,
        &[(1, "missing storage.local")],
    );
    assert_errors(
        "storage = 3\n",
        false,
        &[(1, "storage must be a table ([storage]), found integer")],
    );
    assert_errors(
        "[storage]\natlas = \"/srv/x\"\nlocal = \"/srv/x/\"\n",
        false,
        &[(3, "storage.atlas and storage.local are the same directory")],
    );
    assert_errors(
        "[storage]\natlas = \"/srv/x\"\nlocal = \"/srv/x/local\"\n",
        false,
        &[(3, "storage.local must not be inside storage.atlas")],
    );
    assert_errors(
        "[storage]\natlas = \"/srv\"\nlocal = 5\natlas_id = \"\"\n",
        false,
        &[
            (3, "storage.local must be a string, found integer"),
            (4, "storage.atlas_id must not be empty"),
        ],
    );
}

#[test]
fn storage_paths_are_checked_on_the_host() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let atlas = dir.path().join("atlas");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap_or_else(|e| panic!("write: {e}"));
    let text = format!(
        "[storage]\natlas = \"{}\"\nlocal = \"{}\"\n",
        atlas.display(),
        file.display()
    );
    assert_errors(
        &text,
        true,
        &[(2, "does not exist"), (3, "is not a directory")],
    );
    assert_errors(&text, false, &[]);

    std::fs::create_dir(&atlas).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let local = dir.path().join("local");
    std::os::unix::fs::symlink(&atlas, &local).unwrap_or_else(|e| panic!("symlink: {e}"));
    let text = format!(
        "[storage]\natlas = \"{}\"\nlocal = \"{}\"\n",
        atlas.display(),
        local.display()
    );
    assert_errors(&text, true, &[(3, "are the same directory")]);

    let path = dir.path().join("labfs.toml");
    assert!(Config::load(&path).is_err_and(|e| e.errors[0].message.starts_with("cannot read")));
    std::fs::remove_file(&local).unwrap_or_else(|e| panic!("rm: {e}"));
    std::fs::create_dir(&local).unwrap_or_else(|e| panic!("mkdir: {e}"));
    std::fs::write(&path, &text).unwrap_or_else(|e| panic!("write: {e}"));
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.source, path);
    assert_eq!(cfg.storage.local, local);
}

#[test]
fn writers_resolve_names_and_ids() {
    let text = format!(
        "{STORAGE}[[rule]]\npath = \"/m\"\nclass = \"authoritative\"\nread_only = true\n\
         writers = [\"user:root\", \"group:root\", \"uid:1234\", \"gid:55\", \"root\"]\n"
    );
    let cfg = Config::parse(&text, Path::new("t"), false).unwrap_or_else(|e| panic!("{e}"));
    let w = &cfg.rules.rules()[0].writers;
    assert_eq!(
        w[0],
        Writer::User {
            name: "root".into(),
            uid: 0
        }
    );
    assert_eq!(
        w[1],
        Writer::Group {
            name: "root".into(),
            gid: 0
        }
    );
    assert_eq!(
        w[2],
        Writer::User {
            name: "1234".into(),
            uid: 1234
        }
    );
    assert_eq!(
        w[3],
        Writer::Group {
            name: "55".into(),
            gid: 55
        }
    );
    assert_eq!(
        w[4],
        Writer::User {
            name: "root".into(),
            uid: 0
        }
    );
    let p = cfg.rules.resolve("/m/x");
    assert!(p.may_write(1234, 1, &[]) && p.may_write(7, 7, &[55]) && !p.may_write(7, 7, &[8]));

    let bad = format!(
        "{STORAGE}[[rule]]\npath = \"/m\"\nclass = \"authoritative\"\nread_only = true\nwriters = [\n\
         \"user:no-such-user-labfs\",\n\"group:no-such-group-labfs\",\n\"uid:x\",\n\"who:me\",\n\"user:\",\n3,\n]\n"
    );
    // Offline checks accept unknown names (they match nobody) but not bad syntax.
    assert_errors(
        &bad,
        false,
        &[
            (11, "invalid uid \"x\" in writers (expected a number)"),
            (12, "unknown writer kind \"who\""),
            (13, "empty name in writers entry \"user:\""),
            (14, "rule.writers entries must be strings, found integer"),
        ],
    );
    let offline = Config::parse(
        &bad.replace("\"uid:x\",\n\"who:me\",\n\"user:\",\n3,\n", ""),
        Path::new("t"),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!offline.rules.resolve("/m").may_write(NOBODY_ID - 1, 0, &[]));

    // On the host, unknown names are errors (storage must exist: use "/" and a tempdir).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let host = bad.replace(
        STORAGE,
        &format!(
            "[storage]\natlas = \"/\"\nlocal = \"{}\"\n",
            dir.path().display()
        ),
    );
    let got = errors(&host, true);
    assert_eq!(got[0].0, 3, "{got:?}");
    assert!(got[0]
        .1
        .contains("storage.local must not be inside storage.atlas"));
    assert_eq!(
        got[1],
        (
            9,
            "unknown user \"no-such-user-labfs\" in writers".to_string()
        )
    );
    assert_eq!(
        got[2],
        (
            10,
            "unknown group \"no-such-group-labfs\" in writers".to_string()
        )
    );

    assert_errors(
        &format!("{STORAGE}[[rule]]\npath = \"/m\"\nclass = \"runtime\"\nwriters = \"root\"\n"),
        false,
        &[(7, "rule.writers must be an array of strings, found string")],
    );
}

#[test]
fn rule_table_shape_and_missing_keys() {
    assert_errors(
        &format!("{STORAGE}[rule]\npath = \"/a\"\n"),
        false,
        &[(4, "rule must be written as [[rule]] tables, found table")],
    );
    assert_errors(
        &format!("{STORAGE}\n[[rule]]\npath = \"/a\"\n\n[[rule]]\nclass = \"runtime\"\n"),
        false,
        &[
            (5, "rule is missing \"class\""),
            (8, "rule is missing \"path\""),
        ],
    );
    // Equivalent spellings of one pattern are duplicates too.
    assert_errors(
        &format!("{STORAGE}[[rule]]\npath = \"/a/**\"\nclass = \"runtime\"\n[[rule]]\npath = \"/a\"\nclass = \"ephemeral\"\n"),
        false,
        &[(4, "same path as \"/a\" at line 7"), (7, "same path as \"/a/**\" at line 4")],
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
    for bad in [
        "",
        "s",
        "1.5s",
        "-1s",
        "1d",
        "1 hour",
        "99999999999999999999h",
    ] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
    let text = format!("{STORAGE}[cache]\natlas_ttl = 0\nlocal_ttl = \"250ms\"\n[atlas]\ntimeout = 3\nprobe_interval = \"1m\"\n");
    let cfg = Config::parse(&text, Path::new("t"), false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.cache.atlas_ttl, Some(Duration::ZERO));
    let auto = format!("{STORAGE}[cache]\natlas_ttl = \"auto\"\n");
    let auto_cfg = Config::parse(&auto, Path::new("l.toml"), false).expect("auto parses");
    assert_eq!(auto_cfg.cache.atlas_ttl, None);
    let bad = format!("{STORAGE}[cache]\natlas_ttl = \"automatic\"\n");
    assert_errors(
        &bad,
        false,
        &[(5, "bad duration \"automatic\" for cache.atlas_ttl")],
    );
    assert_eq!(cfg.cache.local_ttl, Duration::from_millis(250));
    assert_eq!(cfg.atlas_health.timeout, Duration::from_secs(3));
    assert_eq!(cfg.atlas_health.probe_interval, Duration::from_secs(60));
    assert_errors(
        &format!("{STORAGE}[atlas]\ntimeout = true\n"),
        false,
        &[(
            5,
            "atlas.timeout must be a duration string or integer, found boolean",
        )],
    );
}

#[test]
fn atlas_file_io() {
    use crate::config::AtlasFileIo;
    let parse = |v: &str| {
        Config::parse(
            &format!("{STORAGE}[atlas]\nfile_io = \"{v}\"\n"),
            Path::new("t"),
            false,
        )
        .map(|c| c.atlas_health.file_io)
    };
    assert_eq!(
        Config::parse(STORAGE, Path::new("t"), false)
            .map(|c| c.atlas_health.file_io)
            .ok(),
        Some(AtlasFileIo::Auto)
    );
    assert_eq!(parse("auto").ok(), Some(AtlasFileIo::Auto));
    assert_eq!(parse("passthrough").ok(), Some(AtlasFileIo::Passthrough));
    assert_eq!(parse("daemon").ok(), Some(AtlasFileIo::Daemon));
    assert_errors(
        &format!("{STORAGE}[atlas]\nfile_io = \"fast\"\n"),
        false,
        &[(
            5,
            "atlas.file_io must be \"auto\", \"passthrough\" or \"daemon\"",
        )],
    );
}

#[test]
fn fuse_transport() {
    use crate::config::Transport;
    let parse = |v: &str| {
        Config::parse(
            &format!("{STORAGE}[fuse]\ntransport = \"{v}\"\n"),
            Path::new("t"),
            false,
        )
        .map(|c| c.transport)
    };
    assert_eq!(
        Config::parse(STORAGE, Path::new("t"), false)
            .map(|c| c.transport)
            .ok(),
        Some(Transport::Auto)
    );
    assert_eq!(parse("auto").ok(), Some(Transport::Auto));
    assert_eq!(parse("uring").ok(), Some(Transport::Uring));
    assert_eq!(parse("devfuse").ok(), Some(Transport::Devfuse));
    assert_errors(
        &format!("{STORAGE}[fuse]\ntransport = \"fast\"\n"),
        false,
        &[(
            5,
            "fuse.transport must be \"auto\", \"uring\" or \"devfuse\"",
        )],
    );
    assert_errors(
        &format!("{STORAGE}[fuse]\nqueue_depth = 8\n"),
        false,
        &[(5, "queue_depth")],
    );
}

#[test]
fn unplaced_deny() {
    let cfg = Config::parse(
        &format!("unplaced = \"deny\"\n{STORAGE}"),
        Path::new("t"),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.rules.unplaced(), Unplaced::Deny);
}

#[test]
fn demo_rules() {
    let cfg = Config::demo(PathBuf::from("/a"), PathBuf::from("/l"));
    assert_eq!(cfg.source, Path::new("<demo>"));
    assert_eq!(cfg.storage.atlas, Path::new("/a"));
    let r = &cfg.rules;
    assert_eq!(r.rules().len(), 8);
    assert_eq!(r.unplaced(), Unplaced::Authoritative);
    use Class::*;
    for (path, class) in [
        ("/cache/x", Ephemeral),
        ("/scratch", Ephemeral),
        ("/models/llama", Ephemeral),
        ("/transcode/a", Ephemeral),
        ("/scans/s1/work/img", Transitional),
        ("/scans/s1/raw", Authoritative),
        ("/appdata/db", Runtime),
        ("/config", Runtime),
        ("/media/film", Authoritative),
        ("/home/u", Authoritative),
    ] {
        assert_eq!(r.resolve(path).class, class, "{path}");
    }
    assert!(r.resolve("/media").read_only);
    assert!(!r.resolve("/media").may_write(0, 0, &[]));
    // The text `labfs` prints is a valid rules file once [storage] is added.
    let full = format!("{DEMO_RULES_TOML}{STORAGE}");
    assert!(Config::parse(&full, Path::new("t"), false).is_ok());
}

#[test]
fn unknown_writers_are_reported_with_every_other_error_in_one_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, l) = (dir.path().join("a"), dir.path().join("l"));
    std::fs::create_dir(&a).expect("mkdir");
    std::fs::create_dir(&l).expect("mkdir");
    let text = format!(
        "[storage]\natlas = {:?}\nlocal = {:?}\n\n[[rule]]\npath = \"/m\"\nclass = \"authoritative\"\n\
         read_only = true\nwriters = [\"user:no-such-user-labfs\"]\n\n[[rule]]\npath = \"/x\"\nclass = \"ephemral\"\n",
        a.display().to_string(),
        l.display().to_string()
    );
    let file = dir.path().join("labfs.toml");
    std::fs::write(&file, text).expect("write");
    let e = Config::load(&file).expect_err("two errors");
    let got: Vec<(usize, String)> = e.errors.into_iter().map(|e| (e.line, e.message)).collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0].0, 9);
    assert!(
        got[0].1.contains("unknown user \"no-such-user-labfs\""),
        "{got:#?}"
    );
    assert_eq!(got[1].0, 13);
    assert!(got[1].1.contains("unknown class \"ephemral\""), "{got:#?}");
}

#[test]
fn declared_dirs_parse_with_owner_group_and_mode() {
    let text = format!(
        "{STORAGE}[[dir]]\npath = \"/models/\"\nowner = \"root\"\ngroup = 1234\nmode = \"2775\"\n\n\
         [[dir]]\npath = \"/media\"\nowner = 1000\nmode = 0o750\n\n[[dir]]\npath = \"/scratch\"\n"
    );
    let cfg = match Config::parse(&text, Path::new("labfs.toml"), false) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let got: Vec<(&str, u32, u32, u32)> = cfg
        .dirs
        .iter()
        .map(|d| (d.path.as_str(), d.uid, d.gid, d.mode))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/models", 0, 1234, 0o2775),
            ("/media", 1000, 0, 0o750),
            ("/scratch", 0, 0, 0o755)
        ]
    );
}

#[test]
fn declared_dir_mistakes_are_reported_with_their_lines() {
    assert_errors(
        &format!(
            "{STORAGE}[[dir]]\npath = \"/a/*\"\n[[dir]]\npath = \"/b\"\n[[dir]]\npath = \"/c\"\nmode = \"9\"\n\
             colour = 1\n[[dir]]\npath = \"/b\"\n[[dir]]\nowner = \"x\"\n"
        ),
        false,
        &[
            (5, "must be an absolute namespace path without wildcards"),
            (10, "dir.mode must be an octal mode"),
            (11, "unknown key \"colour\" in [[dir]]"),
            (12, "duplicate dir \"/b\": already declared at line 6"),
            (14, "dir is missing \"path\""),
        ],
    );
}

#[test]
fn max_unpromoted_is_a_duration_on_transitional_rules_only() {
    let ok = format!(
        "{STORAGE}[[rule]]\npath = \"/scans/*/work\"\nclass = \"transitional\"\nmax_unpromoted = \"24h\"\n"
    );
    let cfg = match Config::parse(&ok, Path::new("labfs.toml"), false) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        cfg.rules.rules()[0].max_unpromoted,
        Some(Duration::from_secs(86_400))
    );
    assert_errors(
        &format!(
            "{STORAGE}[[rule]]\npath = \"/c\"\nclass = \"ephemeral\"\nmax_unpromoted = \"1h\"\n\
             [[rule]]\npath = \"/s\"\nclass = \"transitional\"\nmax_unpromoted = \"soon\"\n"
        ),
        false,
        &[
            (7, "max_unpromoted is only allowed on transitional rules"),
            (11, "bad duration \"soon\" for rule.max_unpromoted"),
        ],
    );
}

#[test]
fn the_packaged_example_rules_file_parses() {
    let text = include_str!("../../mount-helpers/labfs.toml.example");
    let cfg = match Config::parse(text, Path::new("labfs.toml.example"), false) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(cfg.dirs.len(), 3);
    let scans = cfg
        .rules
        .rules()
        .iter()
        .find(|r| r.path == "/scans/*/work")
        .map(|r| r.max_unpromoted);
    assert_eq!(scans, Some(Some(Duration::from_secs(86_400))));
}

#[test]
fn limits_open_files_per_uid_parses_and_rejects_negatives() {
    let ok = Config::parse(
        &format!("{STORAGE}[limits]\nopen_files_per_uid = 64\n"),
        Path::new("t.toml"),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.limits.open_files_per_uid, 64);
    assert_errors(
        &format!("{STORAGE}[limits]\nopen_files_per_uid = -1\n"),
        false,
        &[(5, "limits.open_files_per_uid must be a whole number")],
    );
}
