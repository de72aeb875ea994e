//! labfs: one `/lab` namespace over Atlas (NFS) and local SSD, routed by placement rules.
//!
//! Architecture map (docs/architecture.md tells the same story at more length):
//! - [`rules`]: pure placement: namespace path -> class, backend, rule.
//! - [`config`]: the rules file -> [`config::Config`], every error with its line.
//! - [`error`]: the one error type and the one errno table.
//! - [`fs`]: the filesystem core (inodes, handles, backends); never sees fuser types.
//! - [`fuse`]: the only module that imports fuser; replies and dispatch lanes.
//! - [`daemon`]: mount lifecycle: readiness, signals, clean unmount.
//! - [`cli`]: the command line.

pub mod atlas_id;
pub mod backup_scope;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod declared;
pub mod error;
pub mod exit;
pub mod explain;
pub mod fs;
pub mod fuse;
pub mod mount_helper;
pub mod promote;
pub mod rules;
pub mod stats;
pub mod status;
pub mod sys;
pub mod tags;
