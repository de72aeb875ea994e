//! The command line: parse, call the library, map the outcome to an exit code.
//! Exit codes: 0 ok, 1 operational error, 2 usage or configuration error.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

pub use crate::exit::{load_config, load_config_for, EXIT_FAIL, EXIT_OK, EXIT_USAGE};

/// labfs: one /lab namespace over Atlas (NFS) and local SSD, placed by data class.
#[derive(Parser, Debug)]
#[command(name = "labfs", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace) or a RUST_LOG-style filter.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// The rules file.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        default_value = "/etc/labfs/labfs.toml"
    )]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount the namespace at MOUNTPOINT (daemonizes once the mount is ready).
    Mount(MountArgs),
    /// Print a path's class, backend, deciding rule (with its line) and read-only state.
    ///
    /// A path inside a labfs mount is asked of that mount (it need not exist yet);
    /// any other absolute path is a namespace path resolved with the rules file.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        /// A path inside a labfs mount, or a namespace path such as /media/x.
        path: PathBuf,
    },
    /// Validate the rules file and list data stored on the wrong backend.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Only validate the rules file; do not walk the backends.
        #[arg(long)]
        rules_only: bool,
    },
    /// Write the identity marker on a new Atlas (refuses if one exists).
    InitAtlas {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the backup scope of Atlas (include/exclude lists) derived from the rules.
    BackupScope {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup tool whose pattern syntax to print.
        #[arg(long, value_enum, default_value = "rsync")]
        format: crate::backup_scope::Format,
        /// Atlas as the backup host sees it (default: storage.atlas of the rules file).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Re-read the rules file of a running mount; an invalid file is refused and the
    /// old rules stay in force (same as SIGHUP to the daemon).
    Reload {
        /// The mountpoint (default /lab).
        #[arg(default_value = "/lab")]
        mountpoint: PathBuf,
    },
    /// Promote finished transitional data to Atlas: copied, verified, renamed into
    /// place atomically and tagged; the local copy is removed afterwards.
    Promote {
        /// Print the result as JSON (one object per PATH) for pipelines.
        #[arg(long)]
        json: bool,
        /// If the target exists on Atlas, add and replace its files one by one
        /// (each file atomically) instead of refusing.
        #[arg(long)]
        merge: bool,
        /// Wait for files open for writing to be closed instead of refusing.
        #[arg(long)]
        wait: bool,
        /// Files or directories inside a labfs mount, under a transitional rule.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show a mount's backends, health and what is at risk.
    ///
    /// Exits 0 when all is well, 1 when the mount does not answer, 3 when Atlas is
    /// not answering, 4 when at-risk data is older than its rule's max_unpromoted
    /// (3 wins over 4).
    Status {
        /// Print JSON for scripts (same as --format json).
        #[arg(long)]
        json: bool,
        /// Output format: text, json, or prometheus (node_exporter textfile collector).
        #[arg(long, value_enum)]
        format: Option<crate::status::Format>,
        /// Walk every local file for the at-risk report, however long it takes
        /// (default: stop after a fixed number of entries and name what was not reached).
        #[arg(long)]
        full: bool,
        /// The mountpoint, or any path inside it (default /lab).
        #[arg(default_value = "/lab")]
        mountpoint: PathBuf,
    },
    /// Print the built-in demo rules (the rules `labfs mount --demo` writes).
    DemoRules,
    /// Write the man page (roff) to stdout, or one page per command into DIR.
    #[command(hide = true)]
    Man {
        /// Directory for labfs.1 and labfs-COMMAND.1 pages.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a shell completion script.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Stay attached to the terminal instead of daemonizing.
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Mount a demo: the built-in rules over two directories under the demo
    /// directory (see --demo-dir), which also holds the rules file (labfs.toml).
    #[arg(long)]
    pub demo: bool,
    /// The demo's directory (created; reused by the next demo with the same
    /// directory; remove it with rm -rf once unmounted). Default:
    /// /var/tmp/labfs-demo-<mountpoint with / as ->, e.g. /var/tmp/labfs-demo-tmp-lab.
    #[arg(long, value_name = "DIR", requires = "demo")]
    pub demo_dir: Option<PathBuf>,
    /// Skip the Atlas identity checks (first-time setup and demos only).
    #[arg(long)]
    pub allow_unmarked: bool,
    /// Clear a dead mount left by a daemon that died, then mount.
    #[arg(long)]
    pub recover: bool,
    /// Extra FUSE mount options (comma separated), as in fstab.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Option<String>,
    /// Always use kernel passthrough for open Atlas files, also on NFS (faster; reads of
    /// an open file then hang with a hung NFS server instead of failing after the
    /// timeout). Without it, `[atlas] file_io` decides (default: only where Atlas is a
    /// local filesystem).
    #[arg(long)]
    pub atlas_passthrough: bool,
    /// Append the daemon's log to FILE (a daemonized mount otherwise logs to its
    /// stderr, i.e. the journal under systemd, and nowhere when started from a terminal).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Where to mount.
    pub mountpoint: PathBuf,
}

pub fn init_logging(level: Option<&str>) {
    let _ = init_logging_to(level, None);
}

/// Logging to stderr, or appended to `file`: plain lines without timestamps under
/// journald (`JOURNAL_STREAM`), which stamps them itself.
pub fn init_logging_to(level: Option<&str>, file: Option<&Path>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) if !l.contains('=') => EnvFilter::new(format!("labfs={l}")),
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("labfs=info")),
    };
    if let Some(path) = file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: cannot open the log file: {e}", path.display()))?;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .with_target(false)
            .try_init();
        return Ok(());
    }
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(tty)
        .with_target(false);
    if journald {
        // journald adds its own timestamps.
        let _ = b.without_time().try_init();
    } else {
        let _ = b.try_init();
    }
    Ok(())
}

pub fn main() -> i32 {
    // Installed as /sbin/mount.fuse.labfs, the binary is mount(8)'s helper.
    if let Some(code) = crate::mount_helper::dispatch() {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    let log_file = match &cli.command {
        Command::Mount(m) => m.log_file.clone().or_else(|| {
            crate::mount_helper::split_options(m.options.as_deref().unwrap_or(""), true)
                .ok()
                .and_then(|o| o.log_file)
        }),
        _ => None,
    };
    if let Err(e) = init_logging_to(cli.log_level.as_deref(), log_file.as_deref()) {
        eprintln!("labfs: {e}");
        return EXIT_USAGE;
    }
    // Commands that only print end like `ls` when their reader goes away (`| head`).
    if matches!(
        cli.command,
        Command::Explain { .. }
            | Command::Check { .. }
            | Command::BackupScope { .. }
            | Command::Status { .. }
            | Command::DemoRules
            | Command::Completions { .. }
    ) {
        if let Err(e) = crate::sys::end_quietly_on_broken_pipe() {
            tracing::debug!("SIGPIPE: {e}");
        }
    }
    match cli.command {
        Command::Mount(m) => mount(m),
        Command::Explain { config, path } => crate::explain::run(&config.config, &path),
        Command::Check { config, rules_only } => crate::check::run(&config.config, rules_only),
        Command::InitAtlas { config } => {
            let cfg = match load_config(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match crate::atlas_id::init(&cfg.storage.atlas) {
                Ok(id) => {
                    println!(
                        "Atlas {} initialised with id {id}",
                        cfg.storage.atlas.display()
                    );
                    println!("Record it in the rules file to pin this node to it:\n  [storage]\n  atlas_id = \"{id}\"");
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("labfs: {e}");
                    EXIT_FAIL
                }
            }
        }
        Command::Status {
            json,
            format,
            full,
            mountpoint,
        } => {
            let format = match (format, json) {
                (Some(f), _) => f,
                (None, true) => crate::status::Format::Json,
                (None, false) => crate::status::Format::Text,
            };
            crate::status::run(&mountpoint, format, full)
        }
        Command::DemoRules => {
            print!("{}", crate::config::DEMO_RULES_TOML);
            EXIT_OK
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "labfs", &mut std::io::stdout());
            EXIT_OK
        }
        Command::Promote {
            json,
            merge,
            wait,
            paths,
        } => crate::promote::client::run(&paths, json, merge, wait),
        Command::BackupScope {
            config,
            format,
            root,
        } => crate::backup_scope::run(&config.config, format, root),
        Command::Reload { mountpoint } => crate::control::reload_cli(&mountpoint),
    }
}

/// `labfs mount` (also reached through the mount(8) helper).
pub fn mount(m: MountArgs) -> i32 {
    let (config, config_path, allow_unmarked) = if m.demo {
        let dir = m
            .demo_dir
            .clone()
            .unwrap_or_else(|| default_demo_dir(&m.mountpoint));
        let rules_file = match prepare_demo(&dir, &m.mountpoint) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("labfs: demo: {e}");
                return EXIT_FAIL;
            }
        };
        match load_config_for(&rules_file, Some("nothing mounted")) {
            Ok(c) => (c, Some(rules_file), true),
            Err(code) => return code,
        }
    } else {
        match load_config_for(&m.config.config, Some("nothing mounted")) {
            Ok(c) => (c, Some(m.config.config.clone()), m.allow_unmarked),
            Err(code) => return code,
        }
    };
    // The same option list as fstab's (see src/mount_helper.rs).
    let opts = match crate::mount_helper::split_options(m.options.as_deref().unwrap_or(""), false) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("labfs: -o: {e}");
            return EXIT_USAGE;
        }
    };
    let log_file = m.log_file.clone().or(opts.log_file.clone());
    if !m.foreground && log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!(
            "labfs: note: the daemon's log goes nowhere once it detaches from this terminal; \
             add --log-file FILE (or run it under systemd, which keeps it in the journal)"
        );
    }
    let req = crate::daemon::MountRequest {
        config,
        config_path,
        mountpoint: m.mountpoint.clone(),
        foreground: m.foreground,
        allow_unmarked: allow_unmarked || opts.allow_unmarked,
        recover: m.recover || opts.recover,
        options: opts.kernel,
        detach_stderr: log_file.is_some(),
        mount_options: crate::fs::MountOptions {
            atlas_passthrough: m.atlas_passthrough || opts.atlas_passthrough,
        },
    };
    match crate::daemon::mount(req) {
        Ok(()) => {
            if !m.foreground {
                println!("labfs: mounted {}", m.mountpoint.display());
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("labfs: {e}");
            EXIT_FAIL
        }
    }
}

/// `/var/tmp/labfs-demo-tmp-lab` for the mountpoint `/tmp/lab`.
pub fn default_demo_dir(mountpoint: &Path) -> PathBuf {
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let flat: String = crate::explain::normalize(&abs.to_string_lossy())
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    PathBuf::from(format!("/var/tmp/labfs-demo-{flat}"))
}

/// Create (or reuse) the demo directory: `atlas/`, `local/` and `labfs.toml` (the
/// built-in rules with a `[storage]` naming them; an existing file is kept, so an
/// edited demo rules file survives remounts and `labfs reload` reads it).
fn prepare_demo(dir: &Path, mountpoint: &Path) -> Result<PathBuf, String> {
    let dir = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (atlas, local) = (dir.join("atlas"), dir.join("local"));
    for d in [&atlas, &local, &mountpoint.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let file = dir.join("labfs.toml");
    let reused = file.exists();
    if !reused {
        let text = format!(
            "# labfs demo rules file, written by `labfs mount --demo`.\n\
             # Edit it and run `labfs reload {mp}`; `labfs check --config {f}` and\n\
             # `labfs explain --config {f} /cache/x` read it too.\n\
             {rules}\n[storage]\natlas = {a:?}\nlocal = {l:?}\n",
            mp = mountpoint.display(),
            f = file.display(),
            a = atlas.display().to_string(),
            l = local.display().to_string(),
            rules = crate::config::DEMO_RULES_TOML
        );
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    println!(
        "labfs demo in {} ({}): Atlas stand-in {}, local SSD stand-in {}, rules {}",
        dir.display(),
        if reused {
            "reused from an earlier demo"
        } else {
            "new"
        },
        atlas.display(),
        local.display(),
        file.display()
    );
    println!(
        "  it stays after `umount {}`: the next demo there reuses it; remove it with `rm -rf {}`",
        mountpoint.display(),
        dir.display()
    );
    Ok(file)
}

/// `labfs man [--dir DIR]`: the man pages generated from the clap definitions.
fn man(dir: Option<&Path>) -> i32 {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut out = Vec::new();
        if let Err(e) = clap_mangen::Man::new(cmd).render(&mut out) {
            eprintln!("labfs: man: {e}");
            return EXIT_FAIL;
        }
        use std::io::Write;
        return match std::io::stdout().write_all(&out) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("labfs: man: {e}");
                EXIT_FAIL
            }
        };
    };
    let mut pages = vec![("labfs".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("labfs-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, c) in pages {
        let mut out = Vec::new();
        let path = dir.join(format!("{name}.1"));
        let written = clap_mangen::Man::new(c)
            .render(&mut out)
            .and_then(|()| std::fs::write(&path, &out));
        if let Err(e) = written {
            eprintln!("labfs: {}: {e}", path.display());
            return EXIT_FAIL;
        }
    }
    EXIT_OK
}
