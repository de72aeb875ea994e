//! The command line: parse, call the library, map the outcome to an exit code.
//! Exit codes: 0 ok, 1 operational error, 2 usage or configuration error.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

pub use crate::exit::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};

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
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// The mountpoint (default /lab).
        #[arg(default_value = "/lab")]
        mountpoint: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Stay attached to the terminal instead of daemonizing.
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Mount a demo: built-in rules over two directories under /var/tmp/labfs-demo.
    #[arg(long)]
    pub demo: bool,
    /// Skip the Atlas identity checks (first-time setup and demos only).
    #[arg(long)]
    pub allow_unmarked: bool,
    /// Clear a dead mount left by a daemon that died, then mount.
    #[arg(long)]
    pub recover: bool,
    /// Extra FUSE mount options (comma separated), as in fstab.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Option<String>,
    /// Use kernel passthrough for open Atlas files too (faster; reads of an open file
    /// then hang with a hung NFS server instead of failing after the timeout).
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
    let tty = unsafe { libc::isatty(2) } == 1;
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

pub fn load_config(path: &Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        if e.operational {
            eprintln!("labfs: {}: nothing mounted:\n{e}", path.display());
            return EXIT_FAIL;
        }
        eprintln!(
            "labfs: {}: invalid rules file, nothing mounted:\n{e}",
            path.display()
        );
        EXIT_USAGE
    })
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
        Command::Status { json, mountpoint } => crate::status::run(&mountpoint, json),
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
        let base = PathBuf::from("/var/tmp/labfs-demo");
        let (atlas, local) = (base.join("atlas"), base.join("local"));
        for d in [&atlas, &local] {
            if let Err(e) = std::fs::create_dir_all(d) {
                eprintln!("labfs: {}: {e}", d.display());
                return EXIT_FAIL;
            }
        }
        if let Err(e) = std::fs::create_dir_all(&m.mountpoint) {
            eprintln!("labfs: {}: {e}", m.mountpoint.display());
            return EXIT_FAIL;
        }
        println!(
            "labfs demo: Atlas stand-in {}, local SSD stand-in {}; rules:\n{}",
            atlas.display(),
            local.display(),
            crate::config::DEMO_RULES_TOML
        );
        (Config::demo(atlas, local), None, true)
    } else {
        match load_config(&m.config.config) {
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
    if !m.foreground && log_file.is_none() && unsafe { libc::isatty(2) } == 1 {
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
