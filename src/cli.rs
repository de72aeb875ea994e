//! The command line: parse, call the library, map the outcome to an exit code.
//! Exit codes: 0 ok, 1 operational error, 2 usage or configuration error.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAIL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

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
    #[arg(long, short = 'c', value_name = "FILE", default_value = "/etc/labfs/labfs.toml")]
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
    /// Where to mount.
    pub mountpoint: PathBuf,
}

pub fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) if !l.contains('=') => EnvFilter::new(format!("labfs={l}")),
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("labfs=info")),
    };
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
}

pub fn load_config(path: &Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        eprintln!("labfs: {}: invalid rules file, nothing mounted:\n{e}", path.display());
        EXIT_USAGE
    })
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    init_logging(cli.log_level.as_deref());
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
                    println!("Atlas {} initialised with id {id}", cfg.storage.atlas.display());
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
    }
}

fn mount(m: MountArgs) -> i32 {
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
    let options: Vec<String> = m
        .options
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty() && !matches!(*o, "allow_other" | "default_permissions" | "rw" | "_netdev" | "auto" | "noauto" | "nofail" | "user" | "users") && !o.starts_with("x-"))
        .map(String::from)
        .collect();
    let req = crate::daemon::MountRequest {
        config,
        config_path,
        mountpoint: m.mountpoint.clone(),
        foreground: m.foreground,
        allow_unmarked,
        recover: m.recover,
        options,
        mount_options: crate::fs::MountOptions {
            atlas_passthrough: m.atlas_passthrough,
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
