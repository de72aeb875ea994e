//! What `labfs status` shows: backends and their health, requests and errors, what
//! is at risk; as a table, JSON, or node_exporter textfile metrics.
//!
//! The report travels through the mount in pieces (see [`crate::control`]): the
//! kernel caps one xattr value at 64 KiB, and a report with thousands of rules or
//! at-risk subtrees is larger than that.

use std::path::Path;

use serde::Serialize;

use crate::exit::{EXIT_FAIL, EXIT_OK};
use crate::fs::health::HealthReport;
use crate::fs::LabFs;

/// Atlas is not answering.
pub const EXIT_ATLAS_DOWN: i32 = 3;
/// At-risk data is older than its rule's `max_unpromoted`.
pub const EXIT_OVERDUE: i32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// node_exporter textfile-collector format.
    Prometheus,
}

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
    /// Kernel passthrough or the daemon for open Atlas files, and why.
    pub atlas_file_io: crate::fs::atlas_io::AtlasIo,
    /// Where Atlas metadata requests run (inline or on the Atlas lane), and why.
    pub atlas_metadata: crate::fs::atlas_io::AtlasMetadataMode,
    /// The FUSE transport in use (io_uring or /dev/fuse), why, and requests over each.
    pub fuse_transport: crate::fuse::ring::TransportReport,
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
    match crate::sys::with_fd(fd, |fd| crate::sys::fs_space(fd)) {
        Ok(sp) => (Some(sp.avail), Some(sp.total)),
        Err(_) => (None, None),
    }
}

/// The status report; `full`: walk every local file for the at-risk report.
pub fn collect(fs: &LabFs, full: bool) -> Status {
    let health = fs.health.report();
    // Never touch Atlas from status (it may hang): the health probe's last answer.
    let (af, at) = fs.health.atlas_space();
    let (lf, lt) = space(fs.local.root_fd(), true);
    Status {
        rules_file: fs.live().source.clone(),
        atlas: BackendStatus {
            name: "atlas",
            path: crate::check::shown(fs.atlas.root_path.as_os_str()),
            free_bytes: af,
            total_bytes: at,
        },
        local: BackendStatus {
            name: "local",
            path: crate::check::shown(fs.local.root_path.as_os_str()),
            free_bytes: lf,
            total_bytes: lt,
        },
        atlas_health: health,
        atlas_file_io: fs.atlas_io(),
        atlas_metadata: fs.atlas_metadata(),
        fuse_transport: crate::fuse::ring::report(),
        inodes: fs.inodes.len(),
        open_files: fs.handles.open_files(),
        stats: crate::stats::snapshot(fs),
        promote: crate::promote::status_part(fs, full),
    }
}

/// Why the report could not be fetched.
#[derive(Debug)]
pub enum FetchError {
    /// The path itself is unusable (ENOENT, EACCES, ...).
    Path(std::io::Error),
    /// The daemon behind the mount died (ENOTCONN).
    Dead,
    /// Not a labfs mount, or its daemon does not answer the status request.
    NotLabfs(Option<std::io::Error>),
    /// The pieces do not make a report.
    Garbled(String),
}

impl FetchError {
    /// The message `labfs status` (and `labfs reload`) print for `path`.
    pub fn message(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            FetchError::Path(e) => format!("{p}: {e}"),
            FetchError::Dead => format!(
                "{p}: the labfs daemon of this mount died (Transport endpoint is not connected); \
                 mount again with `labfs mount --recover ...` (see docs/operations.md, Recovery)"
            ),
            FetchError::NotLabfs(None) => format!("{p}: not a labfs mount"),
            FetchError::NotLabfs(Some(e)) => {
                format!("{p}: not a labfs mount, or its daemon is not answering ({e})")
            }
            FetchError::Garbled(why) => format!("{p}: unreadable status from the daemon: {why}"),
        }
    }
}

/// Fetch the status report of the mount holding `path`, piece by piece: every piece
/// of one request token comes from the same report, generated once by the daemon.
pub fn fetch(path: &Path, full: bool) -> Result<serde_json::Value, FetchError> {
    if let Err(e) = std::fs::symlink_metadata(path) {
        return Err(if e.raw_os_error() == Some(libc::ENOTCONN) {
            FetchError::Dead
        } else {
            FetchError::Path(e)
        });
    }
    let token = crate::control::status_token();
    let mode = if full { "full" } else { "quick" };
    let mut raw: Vec<u8> = Vec::new();
    loop {
        let name = format!(
            "{}{token}.{mode}.{}",
            crate::control::STATUS_PIECE,
            raw.len()
        );
        let piece = match xattr::get(path, &name) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(FetchError::NotLabfs(None)),
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) => FetchError::Dead,
                    Some(libc::ENODATA) | Some(libc::ENOTSUP) => FetchError::NotLabfs(None),
                    Some(libc::ENOENT) | Some(libc::EACCES) | Some(libc::ENOTDIR) => {
                        FetchError::Path(e)
                    }
                    _ => FetchError::NotLabfs(Some(e)),
                })
            }
        };
        let last = piece.len() < crate::control::PIECE_BYTES;
        raw.extend_from_slice(&piece);
        if last {
            break;
        }
        if raw.len() > (1 << 30) {
            return Err(FetchError::Garbled("larger than 1 GiB".into()));
        }
    }
    serde_json::from_slice(&raw).map_err(|e| FetchError::Garbled(e.to_string()))
}

/// `labfs status [--format F] [--full] MOUNTPOINT`.
pub fn run(mountpoint: &Path, format: Format, full: bool) -> i32 {
    let v = match fetch(mountpoint, full) {
        Ok(v) => v,
        Err(e) => {
            if format == Format::Prometheus {
                print!("{}", prometheus_down(mountpoint));
            }
            eprintln!("labfs: {}", e.message(mountpoint));
            return EXIT_FAIL;
        }
    };
    match format {
        Format::Json => match serde_json::to_string_pretty(&v) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("labfs: {e}");
                return EXIT_FAIL;
            }
        },
        Format::Text => print_table(&v),
        Format::Prometheus => print!("{}", prometheus(&v, mountpoint)),
    }
    let code = exit_code(&v);
    if format != Format::Json {
        match code {
            EXIT_ATLAS_DOWN => eprintln!("labfs: Atlas is not answering (exit {code})"),
            EXIT_OVERDUE => eprintln!(
                "labfs: at-risk data is older than its rule's max_unpromoted (exit {code}): promote it"
            ),
            _ => {}
        }
    }
    code
}

/// 0, or [`EXIT_ATLAS_DOWN`], or [`EXIT_OVERDUE`] (Atlas down wins).
pub fn exit_code(v: &serde_json::Value) -> i32 {
    if v["atlas_health"]["answering"].as_bool() == Some(false) {
        return EXIT_ATLAS_DOWN;
    }
    let overdue = v["at_risk"]["subtrees"]
        .as_array()
        .is_some_and(|s| s.iter().any(|t| t["overdue"].as_bool() == Some(true)));
    if overdue {
        return EXIT_OVERDUE;
    }
    EXIT_OK
}

/// A Prometheus label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Metrics {
    out: String,
    mp: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.out
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let mut l = format!("mountpoint=\"{}\"", self.mp);
        for (k, v) in labels {
            l.push_str(&format!(",{k}=\"{}\"", label(v)));
        }
        self.out.push_str(&format!("{name}{{{l}}} {value}\n"));
    }
}

fn prometheus_down(mountpoint: &Path) -> String {
    let mut m = Metrics {
        out: String::new(),
        mp: label(&mountpoint.display().to_string()),
    };
    m.family(
        "labfs_up",
        "gauge",
        "Whether the labfs mount answered the status request.",
    );
    m.sample("labfs_up", &[], 0.0);
    m.out
}

/// The report as node_exporter textfile-collector metrics.
pub fn prometheus(v: &serde_json::Value, mountpoint: &Path) -> String {
    let mut m = Metrics {
        out: String::new(),
        mp: label(&mountpoint.display().to_string()),
    };
    let num = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    m.family(
        "labfs_up",
        "gauge",
        "Whether the labfs mount answered the status request.",
    );
    m.sample("labfs_up", &[], 1.0);
    let h = &v["atlas_health"];
    m.family(
        "labfs_atlas_up",
        "gauge",
        "Whether Atlas answers (1) or not (0).",
    );
    let up = h["answering"].as_bool().unwrap_or(false);
    m.sample("labfs_atlas_up", &[], if up { 1.0 } else { 0.0 });
    m.family(
        "labfs_atlas_outage_seconds",
        "gauge",
        "How long Atlas has not been answering (0 when it answers).",
    );
    m.sample("labfs_atlas_outage_seconds", &[], num(&h["down_for_s"]));
    m.family(
        "labfs_atlas_refused_requests",
        "gauge",
        "Requests answered ETIMEDOUT during the current outage.",
    );
    m.sample(
        "labfs_atlas_refused_requests",
        &[],
        num(&h["refused_requests"]),
    );

    let tr = &v["fuse_transport"];
    m.family(
        "labfs_fuse_requests",
        "counter",
        "FUSE requests received since the mount, per transport (/dev/fuse or io_uring).",
    );
    m.sample(
        "labfs_fuse_requests",
        &[("transport", "devfuse")],
        num(&tr["requests_devfuse"]),
    );
    m.sample(
        "labfs_fuse_requests",
        &[("transport", "io_uring")],
        num(&tr["requests_io_uring"]),
    );

    // At risk, per transitional rule (every one, 0 when nothing is at risk).
    let mut per_rule: std::collections::BTreeMap<String, (f64, f64, f64, f64, Option<f64>)> =
        Default::default();
    if let Some(hits) = v["stats"]["rule_hits"].as_array() {
        for r in hits.iter().filter(|r| r["class"] == "transitional") {
            if let Some(p) = r["rule"].as_str() {
                per_rule.insert(p.to_string(), (0.0, 0.0, 0.0, 0.0, None));
            }
        }
    }
    let r = &v["at_risk"];
    for s in r["subtrees"].as_array().into_iter().flatten() {
        let rule = s["rule_path"].as_str().unwrap_or("?").to_string();
        let e = per_rule.entry(rule).or_insert((0.0, 0.0, 0.0, 0.0, None));
        e.0 += num(&s["bytes"]);
        e.1 += num(&s["files"]);
        e.2 = e.2.max(num(&s["age_secs"]));
        if s["overdue"].as_bool() == Some(true) {
            e.3 += 1.0;
        }
        if let Some(max) = s["max_unpromoted_secs"].as_f64() {
            e.4 = Some(max);
        }
    }
    m.family(
        "labfs_at_risk_bytes",
        "gauge",
        "Unpromoted transitional data on this node's SSD, by rule.",
    );
    for (rule, x) in &per_rule {
        m.sample("labfs_at_risk_bytes", &[("rule", rule)], x.0);
    }
    m.family(
        "labfs_at_risk_files",
        "gauge",
        "Unpromoted transitional files on this node's SSD, by rule.",
    );
    for (rule, x) in &per_rule {
        m.sample("labfs_at_risk_files", &[("rule", rule)], x.1);
    }
    m.family(
        "labfs_at_risk_oldest_age_seconds",
        "gauge",
        "Age of the oldest unpromoted file (by mtime), by rule (0 when none).",
    );
    for (rule, x) in &per_rule {
        m.sample("labfs_at_risk_oldest_age_seconds", &[("rule", rule)], x.2);
    }
    m.family(
        "labfs_at_risk_overdue_subtrees",
        "gauge",
        "At-risk subtrees older than their rule's max_unpromoted, by rule.",
    );
    for (rule, x) in &per_rule {
        m.sample("labfs_at_risk_overdue_subtrees", &[("rule", rule)], x.3);
    }
    m.family(
        "labfs_at_risk_max_unpromoted_seconds",
        "gauge",
        "The rule's max_unpromoted, for rules that have one and data at risk.",
    );
    for (rule, x) in &per_rule {
        if let Some(max) = x.4 {
            m.sample(
                "labfs_at_risk_max_unpromoted_seconds",
                &[("rule", rule)],
                max,
            );
        }
    }
    m.family(
        "labfs_at_risk_scan_complete",
        "gauge",
        "Whether the at-risk walk reached every local file (0: see labfs status --full).",
    );
    let complete = r["complete"].as_bool().unwrap_or(false);
    m.sample(
        "labfs_at_risk_scan_complete",
        &[],
        if complete { 1.0 } else { 0.0 },
    );

    m.family(
        "labfs_promotions_in_flight",
        "gauge",
        "Promotions running now.",
    );
    let in_flight = v["promotions"].as_array().map_or(0, Vec::len);
    m.sample("labfs_promotions_in_flight", &[], in_flight as f64);
    m.family(
        "labfs_promotions_failed_total",
        "counter",
        "Promotions that failed since the mount.",
    );
    m.sample(
        "labfs_promotions_failed_total",
        &[],
        num(&v["promotions_failed"]),
    );

    let st = &v["stats"];
    m.family(
        "labfs_requests_total",
        "counter",
        "Requests served per backend lane since the mount.",
    );
    for lane in ["atlas", "local"] {
        m.sample(
            "labfs_requests_total",
            &[("lane", lane)],
            num(&st[lane]["requests"]),
        );
    }
    m.family(
        "labfs_request_errors_total",
        "counter",
        "Failed requests per backend lane since the mount.",
    );
    for lane in ["atlas", "local"] {
        m.sample(
            "labfs_request_errors_total",
            &[("lane", lane)],
            num(&st[lane]["errors"]),
        );
    }
    m.family(
        "labfs_errors_total",
        "counter",
        "Failed requests by errno since the mount.",
    );
    if let Some(errs) = st["errors_by_errno"].as_object() {
        for (errno, n) in errs {
            m.sample("labfs_errors_total", &[("errno", errno)], num(n));
        }
    }
    m.family(
        "labfs_uptime_seconds",
        "gauge",
        "Seconds since the mount (counters start at zero then).",
    );
    m.sample("labfs_uptime_seconds", &[], num(&st["uptime_s"]));
    m.out
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
    let io = &v["atlas_file_io"];
    println!(
        "open Atlas files: {} ({})",
        match io["mode"].as_str() {
            Some("passthrough") => "kernel passthrough",
            Some("daemon") => "through the daemon (bounded)",
            _ => "?",
        },
        io["why"].as_str().unwrap_or("?")
    );
    let md = &v["atlas_metadata"];
    if md.is_object() {
        println!(
            "Atlas metadata requests: {} ({})",
            match md["mode"].as_str() {
                Some("inline") => "inline, like local ones",
                Some("lane") => "on the Atlas lane (bounded)",
                _ => "?",
            },
            md["why"].as_str().unwrap_or("?")
        );
    }
    let tr = &v["fuse_transport"];
    println!(
        "FUSE transport: {} ({}); requests over /dev/fuse: {}, over io_uring: {}",
        tr["in_use"].as_str().unwrap_or("?"),
        tr["why"].as_str().unwrap_or("?"),
        tr["requests_devfuse"],
        tr["requests_io_uring"]
    );
    println!(
        "inodes remembered: {}   open files: {}",
        v["inodes"], v["open_files"]
    );
    crate::stats::print_table(&v["stats"]);
    crate::promote::print_status(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_atlas_down_wins_over_overdue() {
        let ok =
            serde_json::json!({"atlas_health": {"answering": true}, "at_risk": {"subtrees": []}});
        assert_eq!(exit_code(&ok), EXIT_OK);
        let overdue = serde_json::json!({"atlas_health": {"answering": true},
            "at_risk": {"subtrees": [{"overdue": false}, {"overdue": true}]}});
        assert_eq!(exit_code(&overdue), EXIT_OVERDUE);
        let down = serde_json::json!({"atlas_health": {"answering": false},
            "at_risk": {"subtrees": [{"overdue": true}]}});
        assert_eq!(exit_code(&down), EXIT_ATLAS_DOWN);
        let m = prometheus(&down, Path::new("/lab"));
        assert!(m.contains("labfs_atlas_up{mountpoint=\"/lab\"} 0\n"), "{m}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
