//! Exit codes of every `labfs` command, in one place so commands need not import the
//! command line to say how they ended: 0 ok, 1 operational error, 2 usage or
//! configuration error. Also how a command that reads the rules file reports that it
//! cannot, as its exit code.

use std::path::Path;

use crate::config::Config;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAIL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// Load the rules file for a command that does not mount (check, explain, ...).
pub fn load_config(path: &Path) -> Result<Config, i32> {
    load_config_for(path, None)
}

/// Load the rules file; `outcome` (e.g. "nothing mounted") is what a failure means.
pub fn load_config_for(path: &Path, outcome: Option<&str>) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        let tail = outcome.map(|o| format!(", {o}")).unwrap_or_default();
        if let [only] = &e.errors[..] {
            if only.line == 0 && only.message.starts_with("cannot read") {
                eprintln!("labfs: {}: {}{tail}", path.display(), only.message);
                return EXIT_USAGE;
            }
        }
        if e.operational {
            eprintln!("labfs: {}: cannot be used{tail}:\n{e}", path.display());
            return EXIT_FAIL;
        }
        eprintln!("labfs: {}: invalid rules file{tail}:\n{e}", path.display());
        EXIT_USAGE
    })
}
