//! What `labfs status` shows: backends and their health, requests and errors.

use serde::Serialize;

use crate::fs::health::HealthReport;
use crate::fs::LabFs;

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub name: &'static str,
    pub path: String,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub rules_file: String,
    pub atlas: BackendStatus,
    pub local: BackendStatus,
    pub atlas_health: HealthReport,
    pub inodes: usize,
    pub open_files: usize,
    /// Requests, latency per backend, errors by errno, rule hits since the mount.
    pub stats: crate::stats::StatsSnapshot,
    /// Promotion: `xattr_mode`, `promotions` in flight, `at_risk` report.
    #[serde(flatten)]
    pub promote: crate::promote::StatusPart,
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn space(fd: i32, ask: bool) -> (Option<u64>, Option<u64>) {
    if !ask {
        return (None, None);
    }
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(fd, &mut sv) } != 0 {
        return (None, None);
    }
    (
        Some(sv.f_bavail * sv.f_frsize),
        Some(sv.f_blocks * sv.f_frsize),
    )
}

pub fn collect(fs: &LabFs) -> Status {
    let health = fs.health.report();
    // Never touch Atlas from status (it may hang): the health probe's last answer.
    let (af, at) = fs.health.atlas_space();
    let (lf, lt) = space(fs.local.root_fd(), true);
    Status {
        rules_file: fs.live().source.clone(),
        atlas: BackendStatus {
            name: "atlas",
            path: fs.atlas.root_path.display().to_string(),
            free_bytes: af,
            total_bytes: at,
        },
        local: BackendStatus {
            name: "local",
            path: fs.local.root_path.display().to_string(),
            free_bytes: lf,
            total_bytes: lt,
        },
        atlas_health: health,
        inodes: fs.inodes.len(),
        open_files: fs.handles.open_files(),
        stats: crate::stats::snapshot(fs),
        promote: crate::promote::status_part(fs),
    }
}

/// `labfs status [--json] MOUNTPOINT`.
pub fn run(mountpoint: &std::path::Path, json: bool) -> i32 {
    let raw = match xattr::get(mountpoint, crate::control::STATUS) {
        Ok(Some(v)) => v,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            eprintln!(
                "labfs: {}: the labfs daemon of this mount died (Transport endpoint is not connected); \
                 mount again with `labfs mount --recover ...` (see docs/operations.md, Recovery)",
                mountpoint.display()
            );
            return crate::exit::EXIT_FAIL;
        }
        Ok(None) | Err(_) => {
            eprintln!(
                "labfs: {}: not a labfs mount (or its daemon is not answering)",
                mountpoint.display()
            );
            return crate::exit::EXIT_FAIL;
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&raw));
        return crate::exit::EXIT_OK;
    }
    let v: serde_json::Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("labfs: unreadable status: {e}");
            return crate::exit::EXIT_FAIL;
        }
    };
    print_table(&v);
    crate::exit::EXIT_OK
}

fn gib(v: &serde_json::Value) -> String {
    v.as_u64()
        .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "?".into())
}

fn print_table(v: &serde_json::Value) {
    println!("rules:   {}", v["rules_file"].as_str().unwrap_or("?"));
    let h = &v["atlas_health"];
    let answering = h["answering"].as_bool().unwrap_or(false);
    println!("BACKEND  PATH                                  FREE        TOTAL       HEALTH");
    for b in ["atlas", "local"] {
        let x = &v[b];
        let health = if b == "local" {
            "ok".to_string()
        } else if answering {
            format!(
                "answering ({:.1} ms)",
                h["last_probe_latency_ms"].as_f64().unwrap_or(0.0)
            )
        } else {
            format!(
                "NOT ANSWERING since {} ({:.0} s; {}; {} requests refused with ETIMEDOUT)",
                h["down_since_utc"].as_str().unwrap_or("?"),
                h["down_for_s"].as_f64().unwrap_or(0.0),
                h["reason"].as_str().unwrap_or(""),
                h["refused_requests"]
            )
        };
        println!(
            "{:<8} {:<37} {:<11} {:<11} {}",
            b,
            x["path"].as_str().unwrap_or("?"),
            gib(&x["free_bytes"]),
            gib(&x["total_bytes"]),
            health
        );
    }
    println!(
        "inodes remembered: {}   open files: {}",
        v["inodes"], v["open_files"]
    );
    crate::stats::print_table(&v["stats"]);
    crate::promote::print_status(v);
}
