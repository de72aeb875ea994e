//! The rules file (TOML) -> [`Config`], reporting every error with its line.
//!
//! Parsing walks a span-preserving `toml_edit` document by hand instead of
//! using serde, so that one pass can collect *all* mistakes, each with the
//! line it is on. See docs/rules.md for the format.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Document, Item, Table, TableLike};

use crate::rules::{canonical_pattern, normalize_pattern, Class, Rule, Rules, Unplaced, Writer};

/// The built-in demo rules, as a rules file without `[storage]`.
/// [`Config::demo`] parses this text, so what `labfs` prints is what it uses.
pub const DEMO_RULES_TOML: &str = r#"# labfs built-in demo rules. Paths no rule matches are authoritative (Atlas).
unplaced = "authoritative"

# Rebuildable data: caches and scratch space stay on this node's SSD.
[[rule]]
path = "/cache"
class = "ephemeral"

[[rule]]
path = "/scratch"
class = "ephemeral"

# AI model caches: large and re-downloadable.
[[rule]]
path = "/models"
class = "ephemeral"

[[rule]]
path = "/transcode"
class = "ephemeral"

# Scan work areas: written locally, promoted to Atlas when finished.
[[rule]]
path = "/scans/*/work"
class = "transitional"

# Service state that must survive losing this node.
[[rule]]
path = "/appdata"
class = "runtime"

[[rule]]
path = "/config"
class = "runtime"

# The media library: read-only through the mount.
[[rule]]
path = "/media"
class = "authoritative"
read_only = true
"#;

/// Everything labfs needs from the rules file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`<demo>` for the built-in rules).
    pub source: PathBuf,
    pub storage: Storage,
    pub rules: Rules,
    pub cache: CacheConfig,
    pub atlas_health: HealthConfig,
    /// `[[dir]]` tables: directories ensured at every mount.
    pub dirs: Vec<DeclaredDir>,
    pub limits: Limits,
    /// `[fuse] transport`: how the kernel's requests reach the daemon.
    pub transport: Transport,
}

/// `[fuse] transport` (see src/fuse/ring.rs): FUSE over io_uring or the classic
/// /dev/fuse read/write loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// io_uring when the kernel offers it (the fuse module's `enable_uring` and the
    /// INIT flag), else /dev/fuse.
    #[default]
    Auto,
    /// io_uring or no mount.
    Uring,
    /// /dev/fuse only.
    Devfuse,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "auto" => Some(Transport::Auto),
            "uring" | "io_uring" => Some(Transport::Uring),
            "devfuse" | "dev_fuse" => Some(Transport::Devfuse),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Uring => "uring",
            Transport::Devfuse => "devfuse",
        }
    }
}

/// A `[[dir]]`: a directory labfs creates at mount if missing (and whose owner,
/// group and mode it sets), on the backend its path's rule places it, e.g. the
/// ephemeral top levels of a rebuilt node or a `read_only` tree's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredDir {
    /// Namespace path, normalised.
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (with setgid/sticky), e.g. 0o2775.
    pub mode: u32,
    pub line: usize,
}

/// Bounds on what one user may hold in the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Files one uid may hold open through the mount; 0 = a quarter of the daemon's
    /// descriptor limit (`[limits] open_files_per_uid`).
    pub open_files_per_uid: usize,
}

/// Where the two backends keep their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// The authoritative store: the Atlas NFS mount.
    pub atlas: PathBuf,
    /// This node's local SSD.
    pub local: PathBuf,
    /// The id written by `labfs init-atlas`, checked at mount time.
    pub atlas_id: Option<String>,
}

/// How long the kernel may cache attributes and entries, per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Short: other nodes change Atlas behind our back. `None` (`"auto"`, the
    /// default): derived from the Atlas mount (src/fs/atlas_io.rs, [`crate::fs::atlas_io::auto_ttl`]).
    pub atlas_ttl: Option<Duration>,
    /// Long: only this node writes its local SSD.
    pub local_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            atlas_ttl: None,
            local_ttl: Duration::from_secs(3600),
        }
    }
}

/// How an unresponsive Atlas is detected, and how open Atlas files are served (`[atlas]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// An Atlas request fails after this long instead of hanging the caller.
    pub timeout: Duration,
    /// How often a down Atlas is probed to notice it is back.
    pub probe_interval: Duration,
    /// `[atlas] file_io`: kernel passthrough or the daemon for open Atlas files.
    pub file_io: AtlasFileIo,
    /// `[atlas] metadata`: where Atlas metadata requests run.
    pub metadata: AtlasMetadata,
}

/// `[atlas] metadata` (see src/fs/atlas_io.rs, [`crate::fs::atlas_io::AtlasMetadataMode`]):
/// `auto` runs Atlas requests inline, like local ones, only where Atlas is a local
/// filesystem; `lane` hands every Atlas request to the Atlas lane threads, bounded by
/// the watchdog, whatever the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtlasMetadata {
    #[default]
    Auto,
    Lane,
}

/// `[atlas] file_io` (see src/fs/atlas_io.rs): `auto` passes open Atlas files through
/// the kernel only where the backend bounds its own failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtlasFileIo {
    #[default]
    Auto,
    Passthrough,
    Daemon,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            timeout: Duration::from_secs(10),
            probe_interval: Duration::from_secs(2),
            file_io: AtlasFileIo::Auto,
            metadata: AtlasMetadata::Auto,
        }
    }
}

/// All problems found in one rules file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub source: PathBuf,
    pub errors: Vec<ConfigError>,
    /// The file is fine but the machine is not (a storage path that does not answer):
    /// an operational error (exit 1), not a configuration error (exit 2).
    pub operational: bool,
}

/// One problem, at a 1-based line (0 when it belongs to no line).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match e.line {
                0 => write!(f, "{}: {}", self.source.display(), e.message)?,
                n => write!(f, "{}:{}: {}", self.source.display(), n, e.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    pub fn default_path() -> PathBuf {
        PathBuf::from("/etc/labfs/labfs.toml")
    }

    /// Reads and parses a rules file, checking the storage directories exist.
    ///
    /// Checking the storage paths touches the Atlas NFS mount, which may hang: that
    /// check runs on a helper thread and gives up after `[atlas] timeout`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source: path.to_path_buf(),
            errors: vec![ConfigError {
                line: 0,
                message: format!("cannot read the rules file: {e}"),
            }],
            operational: false,
        })?;
        // The offline parse gives the [atlas] timeout that bounds the host check. When
        // it fails, the host check still runs (with the default timeout), so that
        // writer names unknown here are reported with every other error, in one pass.
        let offline = Config::parse(&text, path, false);
        let bound = offline
            .as_ref()
            .map_or(HealthConfig::default().timeout, |c| c.atlas_health.timeout);
        let (tx, rx) = std::sync::mpsc::channel();
        let (t, p) = (text.clone(), path.to_path_buf());
        let spawned = std::thread::Builder::new()
            .name("config-check".into())
            .spawn(move || {
                let _ = tx.send(Config::parse(&t, &p, true));
            });
        let Ok(checker) = spawned else {
            return Config::parse(&text, path, true);
        };
        match rx.recv_timeout(bound) {
            // Joined, so that a daemon forking after this has one thread (sys::fork).
            Ok(r) => {
                let _ = checker.join();
                r
            }
            Err(_) if offline.is_err() => offline,
            Err(_) => {
                let Ok(offline) = offline else {
                    return offline;
                };
                Err(ConfigErrors {
                source: path.to_path_buf(),
                errors: vec![ConfigError {
                    line: 0,
                    message: format!(
                        "storage paths {} and {} did not answer within {:?}: is the Atlas NFS server up and the export mounted?",
                        offline.storage.atlas.display(),
                        offline.storage.local.display(),
                        bound
                    ),
                }],
                operational: true,
            })
            }
        }
    }

    /// Parses rules-file text. With `check_paths = false` the file is checked
    /// on its own (e.g. for another host): storage directories are not looked
    /// at, and writer names unknown here are accepted but match nobody.
    pub fn parse(text: &str, source: &Path, check_paths: bool) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            source: source.to_path_buf(),
            errors,
            operational: false,
        };
        let parsed = parse_text(text, check_paths, true).map_err(fail)?;
        let Some(storage) = parsed.storage else {
            let missing = ConfigError {
                line: 0,
                message: "missing [storage] section".to_string(),
            };
            return Err(fail(vec![missing]));
        };
        Ok(Config {
            source: source.to_path_buf(),
            storage,
            rules: parsed.rules,
            cache: parsed.cache,
            atlas_health: parsed.health,
            dirs: parsed.dirs,
            limits: parsed.limits,
            transport: parsed.transport,
        })
    }

    /// The built-in demo rules ([`DEMO_RULES_TOML`]) over the given stores.
    pub fn demo(atlas: PathBuf, local: PathBuf) -> Config {
        let parsed = parse_text(DEMO_RULES_TOML, false, false)
            .unwrap_or_else(|e| panic!("DEMO_RULES_TOML is invalid: {e:?}"));
        Config {
            source: PathBuf::from("<demo>"),
            storage: Storage {
                atlas,
                local,
                atlas_id: None,
            },
            rules: parsed.rules,
            cache: parsed.cache,
            atlas_health: parsed.health,
            dirs: parsed.dirs,
            limits: parsed.limits,
            transport: parsed.transport,
        }
    }
}

const TOP_KEYS: &[&str] = &[
    "unplaced", "storage", "cache", "atlas", "limits", "fuse", "rule", "dir",
];
const DIR_KEYS: &[&str] = &["path", "owner", "group", "mode"];
const LIMITS_KEYS: &[&str] = &["open_files_per_uid"];
const FUSE_KEYS: &[&str] = &["transport"];
const STORAGE_KEYS: &[&str] = &["atlas", "local", "atlas_id"];
const CACHE_KEYS: &[&str] = &["atlas_ttl", "local_ttl"];
const ATLAS_KEYS: &[&str] = &["timeout", "probe_interval", "file_io", "metadata"];
const RULE_KEYS: &[&str] = &[
    "path",
    "class",
    "read_only",
    "writers",
    "promote_class",
    "max_unpromoted",
];
const DURATION_FORMS: &str =
    "expected e.g. \"500ms\", \"1s\", \"2m\", \"1h\" or a whole number of seconds";

/// Id given to writers unknown on this host when not checking the host.
const NOBODY_ID: u32 = u32::MAX;

struct Parsed {
    storage: Option<Storage>,
    rules: Rules,
    cache: CacheConfig,
    health: HealthConfig,
    dirs: Vec<DeclaredDir>,
    limits: Limits,
    transport: Transport,
}

fn parse_text(
    text: &str,
    check_host: bool,
    need_storage: bool,
) -> Result<Parsed, Vec<ConfigError>> {
    let mut p = Parser::new(text, check_host);
    let doc = match Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let mut message = format!("TOML syntax error: {}", e.message().trim_end());
            // Quote the offending text when short, e.g. the repeated key.
            let snippet = e.span().and_then(|s| text.get(s)).map(str::trim);
            if let Some(snippet) =
                snippet.filter(|s| !s.is_empty() && s.len() <= 40 && !s.contains('\n'))
            {
                message.push_str(&format!(" (at `{snippet}`)"));
            }
            return Err(vec![ConfigError {
                line: p.line_of(e.span()),
                message,
            }]);
        }
    };
    let root = doc.as_table();
    p.check_keys(root, None, TOP_KEYS);

    let mut unplaced = Unplaced::default();
    if let Some((value, line)) = p.string(root, "", "unplaced") {
        match value {
            "authoritative" => unplaced = Unplaced::Authoritative,
            "deny" => unplaced = Unplaced::Deny,
            other => p.error(
                line,
                format!("unknown unplaced value \"{other}\" (expected authoritative or deny)"),
            ),
        }
    }

    let storage = match p.section(root, "storage") {
        Some((table, line)) => p.storage(table, line),
        None => {
            if need_storage && !root.contains_key("storage") {
                p.error(
                    0,
                    "missing [storage] section (storage.atlas and storage.local are required)",
                );
            }
            None
        }
    };

    let mut cache = CacheConfig::default();
    if let Some((table, _)) = p.section(root, "cache") {
        p.check_keys(table, Some("[cache]"), CACHE_KEYS);
        if table.get("atlas_ttl").and_then(|i| i.as_str()) == Some("auto") {
            cache.atlas_ttl = None;
        } else if let Some(d) = p.duration(table, "cache", "atlas_ttl") {
            cache.atlas_ttl = Some(d);
        }
        if let Some(d) = p.duration(table, "cache", "local_ttl") {
            cache.local_ttl = d;
        }
    }

    let mut health = HealthConfig::default();
    if let Some((table, _)) = p.section(root, "atlas") {
        p.check_keys(table, Some("[atlas]"), ATLAS_KEYS);
        for (key, slot) in [
            ("timeout", &mut health.timeout),
            ("probe_interval", &mut health.probe_interval),
        ] {
            if let Some(d) = p.duration(table, "atlas", key) {
                if d.is_zero() {
                    p.error(
                        p.value_line(table, key),
                        format!("atlas.{key} must be greater than zero"),
                    );
                } else {
                    *slot = d;
                }
            }
        }
        if let Some((v, line)) = p.string(table, "atlas", "metadata") {
            match v {
                "auto" => health.metadata = AtlasMetadata::Auto,
                "lane" => health.metadata = AtlasMetadata::Lane,
                other => p.error(
                    line,
                    format!("atlas.metadata must be \"auto\" or \"lane\", not {other:?}"),
                ),
            }
        }
        if let Some((v, line)) = p.string(table, "atlas", "file_io") {
            match v {
                "auto" => health.file_io = AtlasFileIo::Auto,
                "passthrough" => health.file_io = AtlasFileIo::Passthrough,
                "daemon" => health.file_io = AtlasFileIo::Daemon,
                other => p.error(
                    line,
                    format!(
                        "atlas.file_io must be \"auto\", \"passthrough\" or \"daemon\", not {other:?}"
                    ),
                ),
            }
        }
    }

    let mut limits = Limits::default();
    if let Some((table, _)) = p.section(root, "limits") {
        p.check_keys(table, Some("[limits]"), LIMITS_KEYS);
        if let Some(item) = table.get("open_files_per_uid") {
            match item.as_integer().map(usize::try_from) {
                Some(Ok(n)) => limits.open_files_per_uid = n,
                _ => p.error(
                    p.value_line(table, "open_files_per_uid"),
                    "limits.open_files_per_uid must be a whole number >= 0 (0: a quarter of the daemon's open-file limit)",
                ),
            }
        }
    }

    let mut transport = Transport::default();
    if let Some((table, _)) = p.section(root, "fuse") {
        p.check_keys(table, Some("[fuse]"), FUSE_KEYS);
        if let Some((v, line)) = p.string(table, "fuse", "transport") {
            match Transport::parse(v) {
                Some(t) => transport = t,
                None => p.error(
                    line,
                    format!("fuse.transport must be \"auto\", \"uring\" or \"devfuse\", not {v:?}"),
                ),
            }
        }
    }

    let rules = p.rules(root);
    let dirs = p.dirs(root);
    if p.errors.is_empty() {
        Ok(Parsed {
            storage,
            rules: Rules::new(rules, unplaced),
            cache,
            health,
            dirs,
            limits,
            transport,
        })
    } else {
        p.errors.sort_by_key(|e| e.line);
        Err(p.errors)
    }
}

struct Parser {
    /// Byte offset where each line starts, to turn spans into line numbers.
    line_starts: Vec<usize>,
    check_host: bool,
    errors: Vec<ConfigError>,
}

impl Parser {
    fn new(text: &str, check_host: bool) -> Parser {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Parser {
            line_starts,
            check_host,
            errors: Vec::new(),
        }
    }

    fn line_of(&self, span: Option<Range<usize>>) -> usize {
        span.map_or(0, |s| {
            self.line_starts.partition_point(|&start| start <= s.start)
        })
    }

    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(ConfigError {
            line,
            message: message.into(),
        });
    }

    fn key_line(&self, table: &dyn TableLike, key: &str) -> usize {
        self.line_of(table.key(key).and_then(|k| k.span()))
    }

    /// The line of a key's value (arrays may span lines), else of the key.
    fn value_line(&self, table: &dyn TableLike, key: &str) -> usize {
        match table.get(key).map(|item| self.line_of(item.span())) {
            Some(line) if line > 0 => line,
            _ => self.key_line(table, key),
        }
    }

    fn check_keys(&mut self, table: &dyn TableLike, section: Option<&str>, allowed: &[&str]) {
        let unknown: Vec<String> = table
            .iter()
            .map(|(k, _)| k.to_string())
            .filter(|k| !allowed.contains(&k.as_str()))
            .collect();
        for key in unknown {
            let line = self.key_line(table, &key);
            let place = section.map(|s| format!(" in {s}")).unwrap_or_default();
            self.error(
                line,
                format!(
                    "unknown key \"{key}\"{place} (expected one of {})",
                    allowed.join(", ")
                ),
            );
        }
    }

    fn type_error(
        &mut self,
        table: &dyn TableLike,
        section: &str,
        key: &str,
        expected: &str,
        item: &Item,
    ) {
        let name = qualified(section, key);
        let line = self.value_line(table, key);
        self.error(
            line,
            format!("{name} must be {expected}, found {}", item.type_name()),
        );
    }

    /// A sub-table such as `[storage]`, with the line of its header.
    fn section<'d>(&mut self, root: &'d Table, name: &str) -> Option<(&'d dyn TableLike, usize)> {
        let item = root.get(name)?;
        let line = self.key_line(root, name);
        match item.as_table_like() {
            Some(table) => Some((table, line)),
            None => {
                let found = item.type_name();
                self.error(
                    line,
                    format!("{name} must be a table ([{name}]), found {found}"),
                );
                None
            }
        }
    }

    /// A string value and its line; `None` if absent or (reported) mistyped.
    fn string<'d>(
        &mut self,
        table: &'d dyn TableLike,
        section: &str,
        key: &str,
    ) -> Option<(&'d str, usize)> {
        let item = table.get(key)?;
        match item.as_str() {
            Some(s) => Some((s, self.value_line(table, key))),
            None => {
                self.type_error(table, section, key, "a string", item);
                None
            }
        }
    }

    fn duration(&mut self, table: &dyn TableLike, section: &str, key: &str) -> Option<Duration> {
        let item = table.get(key)?;
        let parsed = match (item.as_integer(), item.as_str()) {
            (Some(n), _) => u64::try_from(n).ok().map(Duration::from_secs),
            (None, Some(s)) => parse_duration(s),
            (None, None) => {
                self.type_error(table, section, key, "a duration string or integer", item);
                return None;
            }
        };
        if parsed.is_none() {
            let shown = item.as_str().map_or_else(
                || item.as_integer().unwrap_or_default().to_string(),
                |s| format!("\"{s}\""),
            );
            let name = qualified(section, key);
            self.error(
                self.value_line(table, key),
                format!("bad duration {shown} for {name} ({DURATION_FORMS})"),
            );
        }
        parsed
    }

    fn storage(&mut self, table: &dyn TableLike, line: usize) -> Option<Storage> {
        self.check_keys(table, Some("[storage]"), STORAGE_KEYS);
        let atlas = self.storage_dir(table, "atlas", line, "the Atlas NFS mount");
        let local = self.storage_dir(table, "local", line, "this node's local SSD directory");
        let atlas_id = match self.string(table, "storage", "atlas_id") {
            Some(("", l)) => {
                self.error(l, "storage.atlas_id must not be empty");
                None
            }
            Some((id, _)) => Some(id.to_string()),
            None => None,
        };
        let (atlas, local) = (atlas?, local?);
        let local_line = self.value_line(table, "local");
        let same_dir = match (self.check_host, atlas.canonicalize(), local.canonicalize()) {
            (true, Ok(a), Ok(l)) => a == l,
            _ => false,
        };
        if atlas == local || same_dir {
            self.error(
                local_line,
                format!(
                    "storage.atlas and storage.local are the same directory (\"{}\")",
                    local.display()
                ),
            );
        } else if local.starts_with(&atlas) {
            self.error(local_line, "storage.local must not be inside storage.atlas");
        } else if atlas.starts_with(&local) {
            self.error(local_line, "storage.atlas must not be inside storage.local");
        }
        Some(Storage {
            atlas,
            local,
            atlas_id,
        })
    }

    fn storage_dir(
        &mut self,
        table: &dyn TableLike,
        key: &str,
        line: usize,
        what: &str,
    ) -> Option<PathBuf> {
        let Some((raw, l)) = self.string(table, "storage", key) else {
            if table.get(key).is_none() {
                self.error(line, format!("missing storage.{key} ({what})"));
            }
            return None;
        };
        if !raw.starts_with('/') {
            self.error(
                l,
                format!("storage.{key} must be an absolute path, got \"{raw}\""),
            );
            return None;
        }
        let path = PathBuf::from(raw);
        if self.check_host {
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => self.error(l, format!("storage.{key} \"{raw}\" is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.error(l, format!("storage.{key} \"{raw}\" does not exist"));
                }
                Err(e) => self.error(l, format!("storage.{key} \"{raw}\" cannot be checked: {e}")),
            }
        }
        Some(path)
    }

    fn rules(&mut self, root: &Table) -> Vec<Rule> {
        let Some(item) = root.get("rule") else {
            return Vec::new();
        };
        let Some(tables) = item.as_array_of_tables() else {
            let line = self.key_line(root, "rule");
            let found = item.type_name();
            self.error(
                line,
                format!("rule must be written as [[rule]] tables, found {found}"),
            );
            return Vec::new();
        };
        let mut rules = Vec::new();
        // (canonical pattern, [(line, path as written)]) in first-seen order.
        let mut groups: Vec<(String, Vec<(usize, String)>)> = Vec::new();
        for table in tables.iter() {
            let line = self.line_of(table.span());
            if let Some((rule, written)) = self.rule(table, line) {
                let canonical = canonical_pattern(&written);
                match groups.iter_mut().find(|(c, _)| *c == canonical) {
                    Some((_, seen)) => seen.push((line, written)),
                    None => groups.push((canonical, vec![(line, written)])),
                }
                rules.extend(rule);
            }
        }
        for (_, seen) in groups.iter().filter(|(_, seen)| seen.len() > 1) {
            for (i, (line, path)) in seen.iter().enumerate() {
                let others: Vec<String> = seen
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (l, p))| format!("\"{p}\" at line {l}"))
                    .collect();
                let msg = format!(
                    "duplicate rule for \"{path}\": same path as {}",
                    others.join(", ")
                );
                self.error(*line, msg);
            }
        }
        rules
    }

    /// One `[[rule]]`: when its path is valid, the path as written (for
    /// duplicate detection) and the rule itself if the rest is valid too.
    fn rule(&mut self, table: &Table, line: usize) -> Option<(Option<Rule>, String)> {
        self.check_keys(table, Some("[[rule]]"), RULE_KEYS);
        let path = match self.string(table, "rule", "path") {
            Some((raw, l)) => match normalize_pattern(raw) {
                Ok(p) => Some((p, raw.to_string())),
                Err(why) => {
                    self.error(l, format!("invalid rule path \"{raw}\": {why}"));
                    None
                }
            },
            None => {
                if table.get("path").is_none() {
                    self.error(line, "rule is missing \"path\"");
                }
                None
            }
        };
        let class = match self.string(table, "rule", "class") {
            Some((name, l)) => self.class(name, l),
            None => {
                if table.get("class").is_none() {
                    self.error(line, "rule is missing \"class\"");
                }
                None
            }
        };
        let read_only = match table.get("read_only") {
            None => false,
            Some(item) => item.as_bool().unwrap_or_else(|| {
                self.type_error(table, "rule", "read_only", "true or false", item);
                false
            }),
        };
        let writers = self.writers(table);
        let promote_class = self.promote_class(table, class);
        let max_unpromoted = self.duration(table, "rule", "max_unpromoted");
        if max_unpromoted.is_some() && class.is_some_and(|c| c != Class::Transitional) {
            self.error(
                self.value_line(table, "max_unpromoted"),
                "max_unpromoted is only allowed on transitional rules",
            );
        }
        let (path, written) = path?;
        let rule = class.map(|class| Rule {
            path,
            class,
            read_only,
            writers,
            promote_class,
            max_unpromoted,
            line,
        });
        Some((rule, written))
    }

    /// The `[[dir]]` tables.
    fn dirs(&mut self, root: &Table) -> Vec<DeclaredDir> {
        let Some(item) = root.get("dir") else {
            return Vec::new();
        };
        let Some(tables) = item.as_array_of_tables() else {
            let line = self.key_line(root, "dir");
            let found = item.type_name();
            self.error(
                line,
                format!("dir must be written as [[dir]] tables, found {found}"),
            );
            return Vec::new();
        };
        let mut out: Vec<DeclaredDir> = Vec::new();
        for table in tables.iter() {
            let line = self.line_of(table.span());
            self.check_keys(table, Some("[[dir]]"), DIR_KEYS);
            let path = match self.string(table, "dir", "path") {
                Some((raw, l)) => {
                    if !raw.starts_with('/')
                        || raw.contains(['*', '?', '[', '\0'])
                        || raw.split('/').any(|c| c == "..")
                    {
                        self.error(
                            l,
                            format!("dir.path \"{raw}\" must be an absolute namespace path without wildcards or \"..\""),
                        );
                        None
                    } else {
                        Some(crate::explain::normalize(raw))
                    }
                }
                None => {
                    if table.get("path").is_none() {
                        self.error(line, "dir is missing \"path\"");
                    }
                    None
                }
            };
            if path.as_deref() == Some("/") {
                self.error(
                    line,
                    "dir.path \"/\" is the namespace root, which always exists",
                );
            }
            let uid = self.owner(table, "owner", lookup_user, "user");
            let gid = self.owner(table, "group", lookup_group, "group");
            let mode = match table.get("mode") {
                None => Some(0o755),
                Some(item) => {
                    let parsed = match (item.as_integer(), item.as_str()) {
                        (Some(n), _) => u32::try_from(n).ok(),
                        (None, Some(s)) => {
                            let digits = s.trim_start_matches("0o");
                            u32::from_str_radix(digits, 8).ok()
                        }
                        _ => None,
                    };
                    match parsed.filter(|m| *m <= 0o7777) {
                        Some(m) => Some(m),
                        None => {
                            self.error(
                                self.value_line(table, "mode"),
                                "dir.mode must be an octal mode such as \"0755\", \"2775\" or 0o755",
                            );
                            None
                        }
                    }
                }
            };
            if let (Some(path), Some(uid), Some(gid), Some(mode)) = (path, uid, gid, mode) {
                if let Some(first) = out.iter().find(|d| d.path == path) {
                    let msg = format!(
                        "duplicate dir \"{path}\": already declared at line {}",
                        first.line
                    );
                    self.error(line, msg);
                    continue;
                }
                out.push(DeclaredDir {
                    path,
                    uid,
                    gid,
                    mode,
                    line,
                });
            }
        }
        out
    }

    /// `owner`/`group` of a `[[dir]]`: a name or a number (default 0, root); `None`
    /// when wrong (reported).
    fn owner(
        &mut self,
        table: &Table,
        key: &str,
        lookup: impl Fn(&str) -> io::Result<Option<u32>>,
        what: &str,
    ) -> Option<u32> {
        let Some(item) = table.get(key) else {
            return Some(0);
        };
        let line = self.value_line(table, key);
        if let Some(n) = item.as_integer() {
            return match u32::try_from(n) {
                Ok(id) => Some(id),
                Err(_) => {
                    self.error(line, format!("dir.{key} {n} is not a valid id"));
                    None
                }
            };
        }
        let Some(name) = item.as_str() else {
            self.type_error(table, "dir", key, "a name or a number", item);
            return None;
        };
        if let Ok(id) = name.parse::<u32>() {
            return Some(id);
        }
        match lookup(name) {
            Ok(Some(id)) => Some(id),
            Ok(None) if !self.check_host => Some(NOBODY_ID),
            Ok(None) => {
                self.error(line, format!("unknown {what} \"{name}\" in dir.{key}"));
                None
            }
            Err(e) => {
                self.error(line, format!("cannot look up {what} \"{name}\": {e}"));
                None
            }
        }
    }

    fn class(&mut self, name: &str, line: usize) -> Option<Class> {
        let class = Class::parse(name);
        if class.is_none() {
            let all: Vec<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
            self.error(
                line,
                format!(
                    "unknown class \"{name}\" (expected one of {})",
                    all.join(", ")
                ),
            );
        }
        class
    }

    fn promote_class(&mut self, table: &Table, class: Option<Class>) -> Option<Class> {
        let (name, line) = self.string(table, "rule", "promote_class")?;
        let promote = self.class(name, line)?;
        if let Some(class) = class.filter(|c| *c != Class::Transitional) {
            self.error(
                line,
                format!(
                    "promote_class is only allowed on transitional rules (this rule is {class})"
                ),
            );
        }
        if promote.backend() != crate::rules::BackendKind::Atlas {
            self.error(
                line,
                format!(
                    "promote_class \"{promote}\" must be an Atlas class (authoritative or runtime): \
                     promotion moves files to Atlas"
                ),
            );
        }
        Some(promote)
    }

    fn writers(&mut self, table: &Table) -> Vec<Writer> {
        let Some(item) = table.get("writers") else {
            return Vec::new();
        };
        let Some(array) = item.as_array() else {
            self.type_error(table, "rule", "writers", "an array of strings", item);
            return Vec::new();
        };
        let mut writers = Vec::new();
        for value in array.iter() {
            let line = match self.line_of(value.span()) {
                0 => self.value_line(table, "writers"),
                l => l,
            };
            match value.as_str() {
                None => self.error(
                    line,
                    format!(
                        "rule.writers entries must be strings, found {}",
                        value.type_name()
                    ),
                ),
                Some(spec) => match parse_writer(spec, self.check_host) {
                    Ok(w) => writers.push(w),
                    Err(msg) => self.error(line, msg),
                },
            }
        }
        writers
    }
}

fn qualified(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

/// `"500ms"`, `"1s"`, `"2m"`, `"1h"`, or a bare number of seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    match unit.trim_start() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// A `writers` entry: `user:NAME`, `group:NAME`, `uid:N`, `gid:N` or `NAME`.
fn parse_writer(spec: &str, check_host: bool) -> Result<Writer, String> {
    let (kind, name) = spec.split_once(':').unwrap_or(("user", spec));
    if name.is_empty() {
        return Err(format!("empty name in writers entry \"{spec}\""));
    }
    let number = |what: &str| {
        name.parse::<u32>()
            .map_err(|_| format!("invalid {what} \"{name}\" in writers (expected a number)"))
    };
    let lookup = |what: &str, found: io::Result<Option<u32>>| match found {
        Ok(Some(id)) => Ok(id),
        Ok(None) if !check_host => Ok(NOBODY_ID),
        Ok(None) => Err(format!("unknown {what} \"{name}\" in writers")),
        Err(e) => Err(format!("cannot look up {what} \"{name}\": {e}")),
    };
    let name_s = name.to_string();
    match kind {
        "user" => Ok(Writer::User {
            uid: lookup("user", lookup_user(name))?,
            name: name_s,
        }),
        "group" => Ok(Writer::Group {
            gid: lookup("group", lookup_group(name))?,
            name: name_s,
        }),
        "uid" => Ok(Writer::User {
            uid: number("uid")?,
            name: name_s,
        }),
        "gid" => Ok(Writer::Group {
            gid: number("gid")?,
            name: name_s,
        }),
        other => Err(format!(
            "unknown writer kind \"{other}\" in \"{spec}\" (expected user:NAME, group:NAME, uid:N, gid:N or NAME)"
        )),
    }
}

fn lookup_user(name: &str) -> io::Result<Option<u32>> {
    crate::sys::user_id(name)
}

fn lookup_group(name: &str) -> io::Result<Option<u32>> {
    crate::sys::group_id(name)
}

#[cfg(test)]
mod tests;
