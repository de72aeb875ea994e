//! How the reads and writes of open Atlas files are served, decided once per mount.
//!
//! Kernel FUSE passthrough hands an open file's reads, writes and mmap to the backing
//! file in the kernel: native speed, but labfs no longer sees those calls, so its
//! watchdog cannot bound them. It is used by default only where the Atlas backend
//! cannot hang on a server: a local filesystem (ext4, xfs, btrfs, f2fs, tmpfs, ...),
//! such as the benchmark's Atlas stand-in.
//!
//! Everything else keeps the daemon path, where every read and write is a request on
//! the Atlas lane, bounded by the watchdog: an NFS mount, hard or soft (see
//! [`bounded`] for the measurement that rules soft mounts out), a FUSE or other
//! network filesystem, a mount that cannot be identified. `[atlas] file_io` or
//! `--atlas-passthrough` force either way. Passthrough I/O runs with the credentials
//! of the daemon that registered the backing file (root), as on the local SSD: forced
//! onto an NFS export that squashes root, it would run as the anonymous user. This
//! module owns the decision and its reason; it reads only `/proc/self`, never Atlas.

use std::os::fd::RawFd;
use std::time::Duration;

use serde::Serialize;

use crate::config::AtlasFileIo;

/// Local filesystems with no server behind them.
const LOCAL_BLOCK: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "tmpfs", "ramfs",
];

/// The decision for this mount, with the reason `labfs status` and the log give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AtlasIo {
    /// `"passthrough"` or `"daemon"`.
    pub mode: &'static str,
    pub why: String,
    #[serde(skip)]
    passthrough: bool,
    /// Atlas is a local filesystem: close(2) of its files reports nothing (no server
    /// holds deferred write errors), so the kernel need not send FLUSH at close.
    #[serde(skip)]
    local_fs: bool,
}

impl AtlasIo {
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }

    /// Whether close(2) of an Atlas file can report an error (NFS reports deferred
    /// write errors there; a local filesystem does not).
    pub fn close_reports_errors(&self) -> bool {
        !self.local_fs
    }

    /// Whether Atlas is a local filesystem (ext4, xfs, ... : no server behind it),
    /// whatever `file_io` decided.
    pub fn local_fs(&self) -> bool {
        self.local_fs
    }

    fn pass(why: String) -> AtlasIo {
        AtlasIo {
            mode: "passthrough",
            why,
            passthrough: true,
            local_fs: false,
        }
    }

    pub fn daemon(why: String) -> AtlasIo {
        AtlasIo {
            mode: "daemon",
            why,
            passthrough: false,
            local_fs: false,
        }
    }
}

/// One line of `/proc/self/mountinfo`: what the decision needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    /// The superblock's options (for NFS: `vers=`, `hard`/`soft`, `timeo=`, ...).
    pub super_options: Vec<String>,
}

/// Parse one mountinfo line (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS
/// [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`.
pub fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let mut it = line.split(' ');
    let mount_id = it.next()?.parse().ok()?;
    let _parent = it.next()?;
    let _dev = it.next()?;
    let _root = it.next()?;
    let mount_point = it.next()?.to_string();
    let _opts = it.next()?;
    for f in it.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fstype = it.next()?.to_string();
    let source = it.next()?.to_string();
    let super_options = it
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_string)
        .collect();
    Some(MountEntry {
        mount_id,
        mount_point,
        fstype,
        source,
        super_options,
    })
}

/// The mount that holds the open descriptor `fd` (its `mnt_id` in fdinfo).
pub fn mount_of_fd(fd: RawFd) -> std::io::Result<MountEntry> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let id: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no mnt_id in fdinfo"))?;
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    table
        .lines()
        .filter_map(parse_mountinfo_line)
        .find(|m| m.mount_id == id)
        .ok_or_else(|| std::io::Error::other(format!("mount {id} not in mountinfo")))
}

/// How long a soft NFS mount lets one RPC wait before failing it (the RPC layer's
/// major timeout: over TCP the timeout grows by `timeo` per retransmission up to
/// `timeo` × (`retrans` + 1), which is also when the request fails; over UDP it
/// doubles). `None` for a hard mount or options that cannot be read.
pub fn nfs_soft_bound(opts: &[String]) -> Option<Duration> {
    let has = |o: &str| opts.iter().any(|x| x == o);
    if !(has("soft") || has("softerr")) || has("hard") {
        return None;
    }
    let num = |k: &str| {
        opts.iter()
            .find_map(|o| o.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let timeo = num("timeo=")?; // deciseconds
    let retrans = num("retrans=")?;
    let udp = opts.iter().any(|o| o == "proto=udp" || o == "proto=udp6");
    let ds = if udp {
        // Doubling per retransmission, each capped at 60 s.
        (0..=retrans.min(32))
            .map(|k| (timeo << k).min(600))
            .sum::<u64>()
    } else {
        // Capped at 600 s (NFS_MAX_TCP_TIMEOUT).
        (timeo.saturating_mul(retrans + 1)).min(6000)
    };
    Some(Duration::from_millis(ds * 100))
}

/// Whether the Atlas backend on mount `m` bounds its own failures within `timeout`:
/// `Ok(why)` when it does, `Err(why not)`.
///
/// NFS never qualifies by itself, not even `soft`/`softerr` within the timeout: with
/// the server's traffic dropped, the NFS rig measured reads of a file open on a soft
/// mount ending after 2× the RPC major timeout on v3 and 11× on v4.2 (`timeo=10,
/// retrans=1`: 4.0 s and 22 s for a nominal 2 s; docs/benchmarks.md), so the options
/// do not give a bound labfs could promise.
pub fn bounded(m: &MountEntry, timeout: Duration) -> Result<String, String> {
    let fs = m.fstype.as_str();
    if LOCAL_BLOCK.contains(&fs) {
        return Ok(format!(
            "Atlas is on {fs} ({}), a local filesystem: no server can hang its I/O",
            m.mount_point
        ));
    }
    if fs == "nfs" || fs == "nfs4" {
        return Err(match nfs_soft_bound(&m.super_options) {
            Some(t) => format!(
                "Atlas is a soft NFS mount ({}): its requests should fail after {:.1} s (timeo, retrans; [atlas] timeout {:.1} s), but a hung server was measured to keep reads waiting up to 11 times that",
                m.mount_point,
                t.as_secs_f64(),
                timeout.as_secs_f64()
            ),
            None => format!(
                "Atlas is a hard NFS mount ({}): a hung server would hang reads and writes of open files in the NFS client",
                m.mount_point
            ),
        });
    }
    Err(format!(
        "Atlas is on {fs} ({}), whose behaviour with a hung server is not known",
        m.mount_point
    ))
}

/// The decision: `--atlas-passthrough` (always), else `[atlas] file_io`, else what
/// the backend mount bounds (`mount`: the Atlas root's mount, or why it is unknown).
pub fn decide(
    flag: bool,
    knob: AtlasFileIo,
    mount: Result<&MountEntry, &str>,
    timeout: Duration,
) -> AtlasIo {
    let local_fs = mount.is_ok_and(|m| LOCAL_BLOCK.contains(&m.fstype.as_str()));
    AtlasIo {
        local_fs,
        ..decide_mode(flag, knob, mount, timeout)
    }
}

fn decide_mode(
    flag: bool,
    knob: AtlasFileIo,
    mount: Result<&MountEntry, &str>,
    timeout: Duration,
) -> AtlasIo {
    if flag {
        return AtlasIo::pass(
            "--atlas-passthrough: reads and writes of open Atlas files are not bounded by labfs"
                .into(),
        );
    }
    match knob {
        AtlasFileIo::Passthrough => {
            return AtlasIo::pass(
                "[atlas] file_io = \"passthrough\": reads and writes of open Atlas files are not bounded by labfs"
                    .into(),
            )
        }
        AtlasFileIo::Daemon => {
            return AtlasIo::daemon("[atlas] file_io = \"daemon\"".into());
        }
        AtlasFileIo::Auto => {}
    }
    match mount {
        Ok(m) => match bounded(m, timeout) {
            Ok(why) => AtlasIo::pass(why),
            Err(why) => AtlasIo::daemon(why),
        },
        Err(e) => AtlasIo::daemon(format!("the Atlas mount could not be identified: {e}")),
    }
}

/// The decision for the Atlas backend whose root is open as `root_fd`.
pub fn for_backend(flag: bool, config: &crate::config::Config, root_fd: RawFd) -> AtlasIo {
    let mount = mount_of_fd(root_fd).map_err(|e| e.to_string());
    decide(
        flag,
        config.atlas_health.file_io,
        mount.as_ref().map_err(|e| e.as_str()),
        config.atlas_health.timeout,
    )
}

/// Where Atlas metadata requests (lookup, getattr, setattr, create, ...) run, and
/// why: decided once per mount, like [`AtlasIo`].
///
/// On the Atlas lane (threads of their own, each call timed by the watchdog), a hung
/// server cannot take the threads that serve local paths. That costs a hand-off per
/// request: a wake-up of a lane thread, often on the other CPU (about 45 us on the
/// benchmark VM against 5 us on the same CPU: docs/benchmarks.md), which doubled the
/// cost of a `tar x` on Atlas against the same requests on a local path. Where Atlas
/// is a local filesystem there is no server to hang (the same reason its open files
/// are passed through the kernel), so its requests run inline like local ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AtlasMetadataMode {
    /// `"inline"` or `"lane"`.
    pub mode: &'static str,
    pub why: String,
}

impl AtlasMetadataMode {
    pub fn inline(&self) -> bool {
        self.mode == "inline"
    }
}

/// The metadata decision: `[atlas] metadata = "lane"` always hands Atlas requests to
/// the lane; `auto` runs them inline only on a local filesystem (`mount` as for
/// [`decide`]).
pub fn decide_metadata(
    knob: crate::config::AtlasMetadata,
    mount: Result<&MountEntry, &str>,
) -> AtlasMetadataMode {
    let lane = |why: String| AtlasMetadataMode { mode: "lane", why };
    if knob == crate::config::AtlasMetadata::Lane {
        return lane("[atlas] metadata = \"lane\"".into());
    }
    match mount {
        Ok(m) if LOCAL_BLOCK.contains(&m.fstype.as_str()) => AtlasMetadataMode {
            mode: "inline",
            why: format!(
                "Atlas is on {} ({}), a local filesystem: no server can hang its calls",
                m.fstype, m.mount_point
            ),
        },
        Ok(m) => lane(format!(
            "Atlas is on {} ({}): each request is bounded by [atlas] timeout",
            m.fstype, m.mount_point
        )),
        Err(e) => lane(format!("the Atlas mount could not be identified: {e}")),
    }
}

/// The metadata decision for the Atlas backend whose root is open as `root_fd`.
pub fn metadata_for_backend(config: &crate::config::Config, root_fd: RawFd) -> AtlasMetadataMode {
    let mount = mount_of_fd(root_fd).map_err(|e| e.to_string());
    decide_metadata(
        config.atlas_health.metadata,
        mount.as_ref().map_err(|e| e.as_str()),
    )
}

/// The NFS client's own attribute-cache minimums when the mount does not name them
/// (nfs(5): `acregmin` 3 s, `acdirmin` 30 s; mountinfo lists only values that differ).
const NFS_DEFAULT_ACREGMIN: Duration = Duration::from_secs(3);
const NFS_DEFAULT_ACDIRMIN: Duration = Duration::from_secs(30);
/// `atlas_ttl` where nothing better is known (a FUSE or other network filesystem, an
/// unidentified mount): the TTL labfs used before `auto`.
const FALLBACK_TTL: Duration = Duration::from_secs(1);

/// `[cache] atlas_ttl = "auto"` (the default): how long the kernel may cache Atlas
/// entries and attributes, from what the Atlas mount itself caches, and why.
///
/// - NFS: the shorter of the mount's `acregmin` and `acdirmin` (default 3 s; `actimeo=N`
///   sets both; `noac` gives 0). The NFS client answers labfs's own `fstatat` from its
///   attribute cache for at least that long, so a shorter labfs TTL sends round trips
///   that see nothing newer; the multi-node window stays NFS's own plus at most this.
/// - A local filesystem (no server and no NFS cache of its own): 3 s, NFS's default
///   `acregmin`, so changes made beside labfs (another node through this host's NFS
///   server, a tool on the backend) show here no later than on a default NFS client.
/// - Anything else: 1 s.
pub fn auto_ttl(mount: Result<&MountEntry, &str>) -> (Duration, String) {
    let m = match mount {
        Ok(m) => m,
        Err(e) => {
            return (
                FALLBACK_TTL,
                format!("the Atlas mount could not be identified ({e}): 1 s"),
            )
        }
    };
    let fs = m.fstype.as_str();
    if fs == "nfs" || fs == "nfs4" {
        let opt = |k: &str| {
            m.super_options
                .iter()
                .find_map(|o| o.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
        };
        if m.super_options.iter().any(|o| o == "noac") {
            return (
                Duration::ZERO,
                format!("Atlas is NFS with noac ({})", m.mount_point),
            );
        }
        let reg = opt("acregmin=").unwrap_or(NFS_DEFAULT_ACREGMIN);
        let dir = opt("acdirmin=").unwrap_or(NFS_DEFAULT_ACDIRMIN);
        let ttl = reg.min(dir);
        return (
            ttl,
            format!(
                "Atlas is NFS ({}): acregmin {} s, acdirmin {} s",
                m.mount_point,
                reg.as_secs(),
                dir.as_secs()
            ),
        );
    }
    if LOCAL_BLOCK.contains(&fs) {
        return (
            NFS_DEFAULT_ACREGMIN,
            format!(
                "Atlas is on {fs} ({}), a local filesystem: 3 s, an NFS client's default acregmin",
                m.mount_point
            ),
        );
    }
    (
        FALLBACK_TTL,
        format!("Atlas is on {fs} ({}): 1 s", m.mount_point),
    )
}

/// [`auto_ttl`] for the Atlas backend whose root is open as `root_fd`.
pub fn auto_ttl_for_backend(root_fd: RawFd) -> (Duration, String) {
    let mount = mount_of_fd(root_fd).map_err(|e| e.to_string());
    auto_ttl(mount.as_ref().map_err(|e| e.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(line: &str) -> MountEntry {
        parse_mountinfo_line(line).expect("parses")
    }

    const NFS_HARD: &str = "61 29 0:53 / /mnt/atlas rw,relatime shared:32 - nfs4 srv:/lab rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.2,local_lock=none,addr=10.0.0.1";

    #[test]
    fn parses_a_mountinfo_line() {
        let m = entry(NFS_HARD);
        assert_eq!(m.mount_id, 61);
        assert_eq!(m.mount_point, "/mnt/atlas");
        assert_eq!(m.fstype, "nfs4");
        assert_eq!(m.source, "srv:/lab");
        assert!(m.super_options.iter().any(|o| o == "hard"));
        let no_optional = entry("22 1 8:1 / / rw - ext4 /dev/sda1 rw,errors=remount-ro");
        assert_eq!(no_optional.fstype, "ext4");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn hard_nfs_keeps_the_daemon_path() {
        let d = decide(
            false,
            AtlasFileIo::Auto,
            Ok(&entry(NFS_HARD)),
            Duration::from_secs(10),
        );
        assert_eq!(d.mode, "daemon", "{d:?}");
        assert!(d.why.contains("hard NFS"), "{}", d.why);
    }

    #[test]
    fn soft_nfs_keeps_the_daemon_path_too() {
        let soft = NFS_HARD
            .replace("hard,", "soft,")
            .replace("timeo=600", "timeo=20");
        // 2 s × (2 + 1) = 6 s.
        let m = entry(&soft);
        assert_eq!(
            nfs_soft_bound(&m.super_options),
            Some(Duration::from_secs(6))
        );
        let d = decide(false, AtlasFileIo::Auto, Ok(&m), Duration::from_secs(10));
        assert_eq!(d.mode, "daemon", "{d:?}");
        assert!(
            d.why.contains("soft NFS") && d.why.contains("6.0 s"),
            "{}",
            d.why
        );
        let softerr = NFS_HARD.replace("hard,", "softerr,");
        assert!(nfs_soft_bound(&entry(&softerr).super_options).is_some());
        // softreval is not soft.
        let reval = NFS_HARD.replace("hard,", "hard,softreval,");
        assert_eq!(nfs_soft_bound(&entry(&reval).super_options), None);
    }

    #[test]
    fn udp_backs_off_exponentially() {
        let opts: Vec<String> = ["soft", "proto=udp", "timeo=11", "retrans=3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // 1.1 + 2.2 + 4.4 + 8.8 s
        assert_eq!(nfs_soft_bound(&opts), Some(Duration::from_millis(16_500)));
    }

    #[test]
    fn local_block_filesystems_pass_through_and_fuse_does_not() {
        let ext4 = entry("30 1 7:0 / /srv/atlas rw - ext4 /dev/loop0 rw");
        let d = decide(false, AtlasFileIo::Auto, Ok(&ext4), Duration::from_secs(10));
        assert_eq!(d.mode, "passthrough");
        assert!(!d.close_reports_errors());
        let nfs = decide(
            true,
            AtlasFileIo::Auto,
            Ok(&entry(NFS_HARD)),
            Duration::from_secs(10),
        );
        assert!(
            nfs.close_reports_errors(),
            "forced passthrough on NFS keeps FLUSH"
        );
        let fuse = entry("40 1 0:60 / /srv/atlas rw - fuse.mergerfs atlas rw,user_id=0");
        let d = decide(false, AtlasFileIo::Auto, Ok(&fuse), Duration::from_secs(10));
        assert_eq!(d.mode, "daemon");
        let cifs = entry("41 1 0:61 / /srv/atlas rw - cifs //s/x rw,soft");
        assert_eq!(
            decide(false, AtlasFileIo::Auto, Ok(&cifs), Duration::from_secs(10)).mode,
            "daemon"
        );
        let unknown = decide(false, AtlasFileIo::Auto, Err("no"), Duration::from_secs(10));
        assert_eq!(unknown.mode, "daemon");
    }

    #[test]
    fn the_flag_and_the_knob_force_either_way() {
        let fuse = entry("40 1 0:60 / /srv/atlas rw - fuse.mergerfs atlas rw");
        let t = Duration::from_secs(10);
        assert_eq!(
            decide(true, AtlasFileIo::Daemon, Ok(&fuse), t).mode,
            "passthrough"
        );
        assert_eq!(
            decide(false, AtlasFileIo::Passthrough, Ok(&fuse), t).mode,
            "passthrough"
        );
        let ext4 = entry("30 1 7:0 / /srv/atlas rw - ext4 /dev/loop0 rw");
        assert_eq!(
            decide(false, AtlasFileIo::Daemon, Ok(&ext4), t).mode,
            "daemon"
        );
    }

    #[test]
    fn metadata_runs_inline_only_on_a_local_filesystem() {
        use crate::config::AtlasMetadata;
        let ext4 = entry("70 29 7:1 / /srv/atlas rw,relatime shared:40 - ext4 /dev/loop1 rw");
        let nfs = entry(NFS_HARD);
        let fuse = entry("71 29 0:60 / /srv/atlas rw,relatime - fuse.mergerfs a:b rw");
        assert!(decide_metadata(AtlasMetadata::Auto, Ok(&ext4)).inline());
        assert!(!decide_metadata(AtlasMetadata::Auto, Ok(&nfs)).inline());
        assert!(!decide_metadata(AtlasMetadata::Auto, Ok(&fuse)).inline());
        assert!(!decide_metadata(AtlasMetadata::Auto, Err("no")).inline());
        assert!(!decide_metadata(AtlasMetadata::Lane, Ok(&ext4)).inline());
    }

    #[test]
    fn auto_ttl_follows_the_nfs_attribute_cache() {
        let nfs = entry(NFS_HARD);
        assert_eq!(auto_ttl(Ok(&nfs)).0, Duration::from_secs(3));
        let actimeo =
            entry(&NFS_HARD.replace("hard,", "hard,acregmin=1,acregmax=1,acdirmin=1,acdirmax=1,"));
        assert_eq!(auto_ttl(Ok(&actimeo)).0, Duration::from_secs(1));
        let dirs_short = entry(&NFS_HARD.replace("hard,", "hard,acdirmin=2,"));
        assert_eq!(auto_ttl(Ok(&dirs_short)).0, Duration::from_secs(2));
        let noac = entry(&NFS_HARD.replace("hard,", "hard,noac,"));
        assert_eq!(auto_ttl(Ok(&noac)).0, Duration::ZERO);
        let ext4 = entry("70 29 7:1 / /srv/atlas rw,relatime shared:40 - ext4 /dev/loop1 rw");
        assert_eq!(auto_ttl(Ok(&ext4)).0, Duration::from_secs(3));
        let fuse = entry("71 29 0:60 / /srv/atlas rw,relatime - fuse.mergerfs a:b rw");
        assert_eq!(auto_ttl(Ok(&fuse)).0, Duration::from_secs(1));
        assert_eq!(auto_ttl(Err("no")).0, Duration::from_secs(1));
    }
}
