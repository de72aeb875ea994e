//! Mount lifecycle: checks before mounting, daemonizing once the mount is ready,
//! signals (SIGTERM/SIGINT unmount cleanly, SIGHUP reloads the rules), exit status.
//!
//! Two rules keep one node's daemons from undoing each other:
//! - one daemon per local backend: [`LocalLock`] (an `flock` on
//!   `LOCAL/.labfs/daemon.lock`, held for the daemon's life) refuses a second mount
//!   over the same local directory, naming the daemon that holds it;
//! - a daemon only unmounts its own mount: [`OwnMount`] remembers the device number
//!   (`0:NN`, the FUSE connection) of the mount it made, and at exit or on SIGTERM
//!   unmounts the path only while the topmost mount there is still that connection
//!   (after a plain `umount /lab` and a new `labfs mount`, the old daemon, kept alive
//!   by a bind mount, leaves the new mount alone when it exits).

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use tracing::{error, info, warn};

use crate::config::Config;
use crate::fs::{LabFs, MountOptions};

/// What `labfs mount` was asked to do.
pub struct MountRequest {
    pub config: Config,
    /// Where the rules came from, to re-read on SIGHUP (None for the demo).
    pub config_path: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_unmarked: bool,
    pub recover: bool,
    pub options: Vec<String>,
    /// The log goes to a file: once detached, stderr is not kept open either.
    pub detach_stderr: bool,
    pub mount_options: MountOptions,
}

/// Why a mount did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// State of a mountpoint before mounting.
#[derive(Debug, PartialEq, Eq)]
pub enum MountpointState {
    Ready,
    AlreadyLabfs,
    Stale,
    Missing,
    NotDirectory,
}

pub fn mountinfo_has(mountpoint: &Path) -> Option<String> {
    // Not canonicalize(mountpoint) itself: on a dead FUSE mount it may fail (ENOTCONN).
    let canon = match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| mountpoint.to_path_buf()),
        _ => fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf()),
    };
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = canon.to_string_lossy().replace(' ', "\\040");
    let mut found = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[4] == want {
            let sep = f.iter().position(|x| *x == "-")?;
            found = f.get(sep + 1).map(|s| s.to_string());
        }
    }
    found
}

pub fn mountpoint_state(mountpoint: &Path) -> MountpointState {
    if mountinfo_has(mountpoint).is_some_and(|t| t == "fuse.labfs") {
        // stat(2) of a mount whose daemon died may still be answered from the kernel's
        // attribute cache: ask the daemon itself (the status xattr touches no backend).
        return match xattr::get(mountpoint, crate::control::STATUS) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
                MountpointState::Stale
            }
            _ => MountpointState::AlreadyLabfs,
        };
    }
    match fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {
            if mountinfo_has(mountpoint).is_some_and(|t| t == "fuse.labfs") {
                MountpointState::AlreadyLabfs
            } else {
                MountpointState::Ready
            }
        }
        Ok(_) => MountpointState::NotDirectory,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => MountpointState::Stale,
        Err(e) if e.kind() == io::ErrorKind::NotFound => MountpointState::Missing,
        Err(_) => MountpointState::Stale,
    }
}

/// Lazy-unmount a dead mount left by a daemon that died.
pub fn lazy_unmount(mountpoint: &Path) -> io::Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    crate::sys::unmount(&c, true, false)
}

/// Where the lock of one local backend lives, relative to its root.
pub const LOCK_FILE: &str = ".labfs/daemon.lock";

/// The lock that makes a daemon the only one serving its local backend: an exclusive
/// `flock` on `LOCAL/.labfs/daemon.lock`, released by the kernel when the daemon
/// exits (also on SIGKILL). The file says who holds it (`pid=N mountpoint=PATH`).
pub struct LocalLock {
    file: fs::File,
}

impl LocalLock {
    /// Take the lock of `local` for a mount at `mountpoint`, or say who holds it.
    pub fn take(local: &Path, mountpoint: &Path) -> Result<LocalLock, MountError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = local.join(".labfs");
        match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(MountError::Refused(format!(
                    "{}: cannot create labfs's state directory: {e}",
                    dir.display()
                )))
            }
        }
        let path = local.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| MountError::Refused(format!("{}: {e}", path.display())))?;
        // `umount` returns before the previous daemon has seen its session end (a few
        // ms later it exits and the kernel drops its lock): `umount /lab && labfs mount`
        // waits up to 2 s for that instead of refusing.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Err(e) = crate::sys::try_lock_exclusive(&file) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) && std::time::Instant::now() < deadline {
                thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(MountError::Refused(format!(
                    "{}: lock: {e}",
                    path.display()
                )));
            }
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another labfs daemon".to_string()
            } else {
                format!("the labfs daemon {holder}")
            };
            return Err(MountError::Refused(format!(
                "{}: local backend already served by {who}; one daemon per local backend. \
                 Unmount that mount first (a daemon whose mount was unmounted while a bind mount \
                 of it, e.g. a container volume, remains keeps serving it until the last one goes).",
                local.display()
            )));
        }
        let lock = LocalLock { file };
        lock.record(mountpoint);
        Ok(lock)
    }

    /// Write who holds the lock (called again in the daemon after forking).
    pub fn record(&self, mountpoint: &Path) {
        let text = format!(
            "pid={} mountpoint={}\n",
            std::process::id(),
            mountpoint.display()
        );
        let mut f = &self.file;
        let _ = crate::sys::truncate_fd(&self.file, 0);
        let _ = io::Seek::seek(&mut f, io::SeekFrom::Start(0));
        let _ = f.write_all(text.as_bytes());
    }
}

/// The topmost mount at `mountpoint` in /proc/self/mountinfo: (device `MAJ:MIN`,
/// filesystem type). For a FUSE mount the minor is the connection number
/// (/sys/fs/fuse/connections/NN).
pub fn mount_at(mountpoint: &Path) -> Option<(String, String)> {
    let canon = fs::canonicalize(mountpoint.parent().unwrap_or(Path::new("/")))
        .ok()
        .and_then(|d| mountpoint.file_name().map(|n| d.join(n)))
        .unwrap_or_else(|| mountpoint.to_path_buf());
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = canon.to_string_lossy().replace(' ', "\\040");
    let mut found = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[4] == want {
            let sep = f.iter().position(|x| *x == "-")?;
            found = f.get(sep + 1).map(|t| (f[2].to_string(), t.to_string()));
        }
    }
    found
}

/// The mount this daemon made: its path and its device (the FUSE connection).
#[derive(Clone, Debug)]
pub struct OwnMount {
    pub path: PathBuf,
    pub dev: Option<String>,
}

impl OwnMount {
    /// Read right after mounting, before any other process can mount over it.
    pub fn observe(path: &Path) -> OwnMount {
        let dev = mount_at(path)
            .filter(|(_, t)| t == "fuse.labfs")
            .map(|(d, _)| d);
        if dev.is_none() {
            warn!(
                "{}: cannot find this daemon's mount in /proc/self/mountinfo; it will not unmount the path itself",
                path.display()
            );
        }
        OwnMount {
            path: path.to_path_buf(),
            dev,
        }
    }

    /// Unmount the path if the topmost mount there is still this daemon's connection
    /// (`lazy`: detach when busy); log what was done either way.
    pub fn unmount_if_ours(&self, lazy: bool) {
        let mp = self.path.display();
        let Some(ours) = &self.dev else {
            info!("{mp}: not unmounting: this daemon's mount was never identified");
            return;
        };
        match mount_at(&self.path) {
            None => info!("{mp}: nothing mounted there any more; nothing to unmount"),
            Some((dev, fstype)) if dev != *ours => info!(
                "{mp}: the mount there now is another one ({fstype} {dev}, this daemon's was {ours}); left alone"
            ),
            Some(_) => {
                let Ok(c) = CString::new(self.path.as_os_str().as_encoded_bytes()) else {
                    return;
                };
                let Err(e) = crate::sys::unmount(&c, false, true) else {
                    info!("{mp}: unmounted this daemon's mount ({ours})");
                    return;
                };
                if !lazy && e.raw_os_error() != Some(libc::EBUSY) {
                    warn!("{mp}: unmount of this daemon's mount ({ours}): {e}");
                    return;
                }
                if crate::sys::unmount(&c, true, true).is_ok() {
                    info!("{mp}: busy ({e}); lazily detached this daemon's mount ({ours})");
                } else {
                    warn!(
                        "{mp}: could not detach this daemon's mount ({ours}): {}",
                        io::Error::last_os_error()
                    );
                }
            }
        }
    }
}

fn precheck(req: &MountRequest) -> Result<LocalLock, MountError> {
    let mp = &req.mountpoint;
    match mountpoint_state(mp) {
        MountpointState::Ready => {}
        MountpointState::AlreadyLabfs => {
            return Err(MountError::Refused(format!(
                "{}: already a labfs mount. Unmount it first (`umount {}`), or check it with `labfs status {}`.",
                mp.display(),
                mp.display(),
                mp.display()
            )))
        }
        MountpointState::Stale if req.recover => {
            warn!("{}: removing the dead mount left by a previous daemon", mp.display());
            lazy_unmount(mp)?;
        }
        MountpointState::Stale => {
            return Err(MountError::Refused(format!(
                "{}: the previous labfs daemon died (Transport endpoint is not connected). Run `labfs mount --recover ...` (or `umount -l {}`) and mount again.",
                mp.display(),
                mp.display()
            )))
        }
        MountpointState::Missing => {
            return Err(MountError::Refused(format!("{}: mountpoint does not exist", mp.display())))
        }
        MountpointState::NotDirectory => {
            return Err(MountError::Refused(format!("{}: mountpoint is not a directory", mp.display())))
        }
    }
    let s = &req.config.storage;
    if req.allow_unmarked {
        warn!(
            "--allow-unmarked: NOT checking that {} is really Atlas. Authoritative data may land on a plain local directory. Use this only for first-time setup and demos.",
            s.atlas.display()
        );
        eprintln!(
            "labfs: WARNING: --allow-unmarked: not checking that {} is Atlas; for setup and demos only",
            s.atlas.display()
        );
    } else {
        crate::atlas_id::verify_within(
            &s.atlas,
            &s.local,
            s.atlas_id.as_deref(),
            req.config.atlas_health.timeout,
        )
        .map_err(|e| MountError::Refused(e.to_string()))?;
    }
    // Before anything touches the local backend's state (recovery replays journals).
    LocalLock::take(&s.local, mp)
}

fn pipe() -> io::Result<(fs::File, fs::File)> {
    let (r, w) = crate::sys::pipe_cloexec()?;
    Ok((fs::File::from(r), fs::File::from(w)))
}

/// Mount and serve. Without `foreground`, returns in the parent once the mount is ready
/// (or failed), and the child serves until unmounted.
pub fn mount(req: MountRequest) -> Result<(), MountError> {
    let lock = precheck(&req)?;
    if req.foreground {
        return serve(req, lock, None);
    }
    let (mut rd, wr) = pipe()?;
    // Fork before any thread exists (sys::fork refuses otherwise): the child becomes
    // the daemon.
    match crate::sys::fork()? {
        crate::sys::Forked::Child => {
            drop(rd);
            // Detach from the terminal's session (fails only for a group leader,
            // which a freshly forked child is not).
            let _ = crate::sys::new_session();
            // The lock's open file is shared with the parent, which exits: it stays held.
            lock.record(&req.mountpoint);
            let code = match serve(req, lock, Some(wr)) {
                Ok(()) => 0,
                Err(e) => {
                    error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
        crate::sys::Forked::Parent(_) => {
            drop(wr);
            drop(lock);
            let mut msg = String::new();
            let _ = rd.read_to_string(&mut msg);
            if msg.starts_with("ready") {
                Ok(())
            } else if msg.is_empty() {
                Err(MountError::Refused(
                    "the daemon exited before the mount was ready (see its log)".into(),
                ))
            } else {
                Err(MountError::Refused(msg.trim().to_string()))
            }
        }
    }
}

/// Block SIGTERM, SIGINT and SIGHUP before any thread starts: the mask is inherited
/// by threads created afterwards, so they are taken only by the signal thread's wait.
fn block_signals() -> io::Result<crate::sys::SignalSet> {
    crate::sys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
}

fn serve(
    req: MountRequest,
    _lock: LocalLock,
    mut ready_pipe: Option<fs::File>,
) -> Result<(), MountError> {
    let sigset = block_signals()?;
    // Files are created with the caller's umask (applied per request), never the daemon's.
    crate::sys::set_umask(0);
    // The inode table's hash tables double as the kernel remembers more inodes. With
    // glibc's default (a threshold that rises after the first large free), the old
    // tables would stay in the heap; a fixed threshold keeps every large table in its
    // own mapping, returned to the system as soon as it is freed.
    crate::sys::set_mmap_threshold(256 * 1024);
    let fs = match LabFs::new(
        &req.config,
        req.mount_options.clone(),
        Box::new(crate::tags::StoredTags),
    ) {
        Ok(fs) => Arc::new(fs),
        Err(e) => {
            let msg = format!("cannot open the backends: {e}");
            if let Some(p) = ready_pipe.as_mut() {
                let _ = p.write_all(msg.as_bytes());
            }
            return Err(MountError::Refused(msg));
        }
    };
    crate::fs::budget::apply_at_mount(&fs, &req.config.limits);
    fs.health
        .start_probe(fs.atlas.root_fd(), req.config.atlas_health.probe_interval);
    crate::promote::recover_on_mount(&fs);
    crate::declared::ensure(&fs, &req.config.dirs);
    if !fs.health.is_down() {
        fs.note_root();
    }
    crate::stats::mark_start();
    let fsname = format!("labfs:{}", req.config.storage.atlas.display());
    let mountpoint = req.mountpoint.clone();
    let config_path = req.config_path.clone();
    let fs2 = fs.clone();
    let mut pipe_for_error = ready_pipe.take();
    let own = Arc::new(parking_lot::Mutex::new(None::<OwnMount>));
    let own2 = own.clone();
    crate::fuse::ring::configure(req.config.transport);
    let result = crate::fuse::serve(fs.clone(), &mountpoint, &fsname, &req.options, || {
        // Mounted, not serving yet: the mount at the path is this daemon's.
        let me = OwnMount::observe(&mountpoint);
        info!(
            "mounted {} (atlas {}, local {}, connection {})",
            mountpoint.display(),
            req.config.storage.atlas.display(),
            req.config.storage.local.display(),
            me.dev.as_deref().unwrap_or("?")
        );
        *own2.lock() = Some(me.clone());
        if let Some(mut p) = pipe_for_error.take() {
            let _ = p.write_all(b"ready");
            drop(p);
            detach_stdio(req.detach_stderr);
        }
        let _ = thread::Builder::new().name("signals".into()).spawn(move || loop {
            let Ok(sig) = sigset.wait() else {
                continue;
            };
            match sig {
                libc::SIGHUP => {
                    let _ = reload(&fs2, config_path.as_deref());
                }
                _ => {
                    info!("signal {sig}: unmounting {}", me.path.display());
                    crate::promote::shutdown(&fs2);
                    me.unmount_if_ours(true);
                    info!(
                        "{} detached; the daemon exits once no open file or bind mount of it (a container's volume) remains",
                        me.path.display()
                    );
                    return;
                }
            }
        });
    });
    // The session ended: the kernel dropped the connection (unmounted everywhere, or
    // aborted). A dead mount of ours may still be at the path; another daemon's mount
    // may be there instead, and is left alone.
    let me = own.lock().take();
    let ours_was_there = me
        .as_ref()
        .is_some_and(|m| m.dev.is_some() && mount_at(&m.path).map(|(d, _)| d) == m.dev);
    if let Some(me) = me {
        me.unmount_if_ours(true);
    }
    // A plain `umount` ends the session without a signal: stop promotions at a safe
    // point here too (the journal lets the next mount finish or roll them back).
    crate::promote::shutdown(&fs);
    match result {
        // The kernel ends the session with ENODEV, or ECONNABORTED when unmounting
        // tore the connection down first (a race with the last close after a lazy
        // detach): both are a clean end once the mount is gone.
        Ok(()) => {
            info!("{} unmounted; exiting", req.mountpoint.display());
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) && !ours_was_there => {
            info!("{} unmounted; exiting", req.mountpoint.display());
            Ok(())
        }
        Err(e) => {
            let msg = format!("mount {}: {e}", req.mountpoint.display());
            if let Some(mut p) = pipe_for_error {
                let _ = p.write_all(msg.as_bytes());
            }
            Err(MountError::Refused(msg))
        }
    }
}

/// What the last reload did, for `labfs reload` to print (`user.labfs.ctl.reload`).
static LAST_RELOAD: parking_lot::Mutex<String> = parking_lot::Mutex::new(String::new());

/// The report of the last reload ("" before any).
pub fn last_reload() -> String {
    LAST_RELOAD.lock().clone()
}

/// Re-read the rules file (SIGHUP, `labfs reload`) and apply every setting that can
/// change live: the rules, `[cache]` TTLs, `[atlas] timeout` and `probe_interval`.
/// `[storage]` (backends, Atlas id) and mount options need a remount: the report says
/// so. Keeps the old settings if the new file is invalid; the error says why.
pub fn reload(fs: &LabFs, path: Option<&Path>) -> Result<(), String> {
    let Some(path) = path else {
        info!("reload: the demo's built-in rules do not change");
        return Err("the demo's built-in rules cannot be reloaded".into());
    };
    match Config::load(path) {
        Ok(c) => {
            let mut applied = vec!["rules".to_string()];
            let mut remount = Vec::new();
            let (atlas, local) = (&fs.atlas.root_path, &fs.local.root_path);
            if c.storage.atlas != *atlas || c.storage.local != *local {
                remount.push(format!(
                    "[storage] atlas/local (the backends stay {} and {})",
                    atlas.display(),
                    local.display()
                ));
            }
            let old = fs.live();
            let atlas_ttl = fs.atlas_ttl_under(&c);
            if atlas_ttl != old.atlas_ttl || c.cache.local_ttl != old.local_ttl {
                applied.push(format!(
                    "[cache] atlas_ttl {:?}{}, local_ttl {:?}",
                    atlas_ttl,
                    if c.cache.atlas_ttl.is_none() {
                        " (auto)"
                    } else {
                        ""
                    },
                    c.cache.local_ttl
                ));
            }
            let h = &c.atlas_health;
            if h.timeout != fs.health.timeout() || h.probe_interval != fs.health.probe_interval() {
                applied.push(format!(
                    "[atlas] timeout {:?} (was {:?}), probe_interval {:?} (was {:?})",
                    h.timeout,
                    fs.health.timeout(),
                    h.probe_interval,
                    fs.health.probe_interval()
                ));
            }
            let io = fs.atlas_io_under(&c);
            if io != fs.atlas_io() {
                remount.push(format!(
                    "open Atlas files would get {} ({})",
                    io.mode, io.why
                ));
            }
            let tr = crate::fuse::ring::report();
            if let Ok(want) = crate::fuse::ring::configured(c.transport) {
                if want.as_str() != tr.configured {
                    remount.push(format!(
                        "[fuse] transport {} (in force: {}, serving over {})",
                        want.as_str(),
                        tr.configured,
                        tr.in_use
                    ));
                }
            }
            fs.reload(&c);
            fs.health.set_timing(h.timeout, h.probe_interval);
            let mut report = format!(
                "reloaded from {}: applied {}",
                path.display(),
                applied.join("; ")
            );
            if remount.is_empty() {
                report.push_str("; nothing needs a remount");
            } else {
                report.push_str(&format!(
                    "; needs a remount to change: {}",
                    remount.join("; ")
                ));
                warn!("reload: needs a remount to change: {}", remount.join("; "));
            }
            info!("{report}");
            *LAST_RELOAD.lock() = report;
            Ok(())
        }
        Err(e) => {
            error!("rules NOT reloaded, the old rules stay in force:\n{e}");
            *LAST_RELOAD.lock() = format!("NOT reloaded: {e}");
            Err(e.to_string())
        }
    }
}

/// Whether the daemon may keep logging to the stderr it inherited: a regular file
/// (`2>>log`) or the journal (systemd). A terminal, pipe or socket would keep the
/// caller's `$(labfs mount ...)` or ssh session waiting for the daemon to exit.
fn stderr_is_a_log() -> bool {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        return true;
    }
    crate::fs::backend::fstat(2)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        .unwrap_or(false)
}

/// After daemonizing: stdin/stdout to /dev/null; stderr too unless it is a log
/// ([`stderr_is_a_log`]) or the log goes to a file.
fn detach_stdio(detach_stderr: bool) {
    // Nothing to report to: the parent has gone and the log may be what failed.
    let _ = crate::sys::stdio_to_dev_null(detach_stderr || !stderr_is_a_log());
}
