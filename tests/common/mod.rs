//! The `MountedLab` fixture: a real labfs mount over two private tmpfs backends,
//! plus helpers to run shell commands (as root or as another user) with timeouts.
//!
//! Every test builds its own `MountedLab`; tests run in parallel, so nothing here
//! touches global state beyond the mounts it creates and removes itself.
//!
//! ```ignore
//! let lab = MountedLab::builder().rules(r#"
//! [[rule]]
//! path = "/cache"
//! class = "ephemeral"
//! "#).unplaced_deny().mount();
//! lab.sh(r#"echo hi > "$LAB/cache/f""#);
//! assert!(lab.local_path("cache/f").exists());
//! ```
//!
//! Scripts run by `lab.sh*` get `set -eu`, cwd = the mountpoint and these variables:
//! `LAB` (mountpoint), `ATLAS`, `LOCAL` (backend roots), `CFG` (rules file),
//! `LABFS` (the binary), `SCRATCH` (a world-writable directory outside the mount).
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The labfs binary under test.
pub const LABFS: &str = env!("CARGO_BIN_EXE_labfs");

/// How long a mount may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound for any one command a test runs.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// A lab living longer than this is assumed hung: the watchdog SIGKILLs the daemon,
/// which aborts the FUSE connection and turns any hang into a test failure.
const LAB_LIFETIME: Duration = Duration::from_secs(900);

/// The non-root user tests act as.
pub const USER: u32 = 1000;
/// A gid listed as writer of `/media` in [`DEFAULT_RULES`].
pub const MEDIA_WRITER_GID: u32 = 4242;

/// Rules used when a test does not call [`LabBuilder::rules`].
///
/// Namespace directories by backend: `/docs`, `/scans`, `/state`, `/media` and anything
/// unmatched live on Atlas; `/cache` and `/scans/*/work` live on local.
pub const DEFAULT_RULES: &str = r#"
[[rule]]
path = "/cache"
class = "ephemeral"

[[rule]]
path = "/scans/*/work"
class = "transitional"

[[rule]]
path = "/docs"
class = "authoritative"

[[rule]]
path = "/state"
class = "runtime"

[[rule]]
path = "/media"
class = "authoritative"
read_only = true
writers = ["gid:4242"]
"#;

/// The two backends, with a namespace directory that the default rules place on each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Atlas,
    Local,
}

/// Both backends, for tests that run the same checks on each.
pub const BOTH: [Backend; 2] = [Backend::Atlas, Backend::Local];

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Atlas => "atlas",
            Backend::Local => "local",
        }
    }
    /// A top-level namespace directory that [`DEFAULT_RULES`] place on this backend.
    pub fn dir(self) -> &'static str {
        match self {
            Backend::Atlas => "docs",
            Backend::Local => "cache",
        }
    }
    pub fn other(self) -> Backend {
        match self {
            Backend::Atlas => Backend::Local,
            Backend::Local => Backend::Atlas,
        }
    }
}

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct Out {
    /// Exit code, or 128 + signal number when killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
    pub fn tuple(self) -> (i32, String, String) {
        (self.code, self.stdout, self.stderr)
    }
}

fn code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn collect(rx: &mpsc::Receiver<Vec<u8>>, wait: Duration) -> Option<String> {
    rx.recv_timeout(wait)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Runs `cmd` in its own process group with stdin from /dev/null, capturing output.
/// On timeout the whole process group is SIGKILLed and `Err` describes what happened.
fn exec(mut cmd: Command, timeout: Duration) -> Result<Out, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot spawn {desc}: {e}"))?;
    let pgid = child.id() as i32;
    let out_rx = drain(child.stdout.take().expect("stdout piped"));
    let err_rx = drain(child.stderr.take().expect("stderr piped"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => {
            // Background jobs left behind by the command may hold the pipes open.
            let mut stdout = collect(&out_rx, Duration::from_secs(10));
            let mut stderr = collect(&err_rx, Duration::from_secs(10));
            if stdout.is_none() || stderr.is_none() {
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                stdout = stdout.or_else(|| collect(&out_rx, Duration::from_secs(2)));
                stderr = stderr.or_else(|| collect(&err_rx, Duration::from_secs(2)));
            }
            Ok(Out {
                code: code_of(status),
                stdout: stdout.unwrap_or_default(),
                stderr: stderr.unwrap_or_default(),
            })
        }
        Ok(Err(e)) => Err(format!("waiting for {desc}: {e}")),
        Err(_) => {
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let killed = rx.recv_timeout(Duration::from_secs(5)).is_ok();
            let stdout = collect(&out_rx, Duration::from_secs(2)).unwrap_or_default();
            let stderr = collect(&err_rx, Duration::from_secs(2)).unwrap_or_default();
            Err(format!(
                "TIMED OUT after {timeout:?} (hang?): {desc}\n{}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                if killed {
                    "killed with SIGKILL"
                } else {
                    "still not dead 5 s after SIGKILL (uninterruptible sleep?)"
                }
            ))
        }
    }
}

/// A shell script (or program) to run: builder for cwd, env, user, timeout.
#[derive(Clone, Debug)]
pub struct Sh {
    program: OsString,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    user: Option<(u32, u32, Option<Vec<u32>>)>,
    timeout: Duration,
}

impl Sh {
    /// `sh -c "set -eu\n<script>"`.
    pub fn script(script: &str) -> Sh {
        Sh::program("sh", &["-c", &format!("set -eu\n{script}")])
    }

    /// A program with arguments, no shell.
    pub fn program(program: &str, args: &[&str]) -> Sh {
        Sh {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            cwd: None,
            envs: Vec::new(),
            user: None,
            timeout: CMD_TIMEOUT,
        }
    }

    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Sh {
        self.cwd = Some(dir.as_ref().to_path_buf());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Sh {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Run as `uid:gid` with no supplementary groups (via `setpriv`).
    pub fn user(mut self, uid: u32, gid: u32) -> Sh {
        self.user = Some((uid, gid, None));
        self
    }

    /// Run as `uid:gid` with exactly these supplementary groups.
    pub fn user_groups(mut self, uid: u32, gid: u32, groups: &[u32]) -> Sh {
        self.user = Some((uid, gid, Some(groups.to_vec())));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Sh {
        self.timeout = t;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.user {
            None => {
                let mut c = Command::new(&self.program);
                c.args(&self.args);
                c
            }
            Some((uid, gid, groups)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"));
                match groups {
                    Some(g) if !g.is_empty() => {
                        let list: Vec<String> = g.iter().map(u32::to_string).collect();
                        c.arg(format!("--groups={}", list.join(",")));
                    }
                    _ => {
                        c.arg("--clear-groups");
                    }
                }
                c.arg("--").arg(&self.program).args(&self.args);
                c
            }
        };
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        if let Some((uid, gid, groups)) = &self.user {
            s.push_str(&format!("[as {uid}:{gid} groups {groups:?}] "));
        }
        s.push_str(&self.program.to_string_lossy());
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Runs to completion (panics only on timeout / spawn failure).
    pub fn status(&self) -> Out {
        exec(self.command(), self.timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs, asserts exit 0 and returns stdout (stderr is printed on failure).
    pub fn ok(&self) -> String {
        let out = self.status();
        assert!(
            out.ok(),
            "command failed with exit {}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.code,
            self.describe(),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Runs, asserts a non-zero exit and returns the output.
    pub fn fails(&self) -> Out {
        let out = self.status();
        assert!(
            !out.ok(),
            "command unexpectedly succeeded: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.describe(),
            out.stdout,
            out.stderr
        );
        out
    }

    /// Starts in the background (own process group, output to /dev/null unless
    /// redirected in the script).
    pub fn spawn(&self) -> Bg {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.describe()));
        Bg {
            pid: child.id() as i32,
            child: Some(child),
            status: None,
        }
    }
}

/// Runs `cmd args`, asserts success, returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    Sh::program(cmd, args).ok()
}

/// Runs `cmd args` in `cwd`, asserts success, returns stdout.
pub fn run_in(cwd: impl AsRef<Path>, cmd: &str, args: &[&str]) -> String {
    Sh::program(cmd, args).cwd(cwd).ok()
}

/// Runs `cmd args`, returns (code, stdout, stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String, String) {
    Sh::program(cmd, args).status().tuple()
}

/// Runs a `sh` script (with `set -eu`), asserts success, returns stdout.
pub fn sh(script: &str) -> String {
    Sh::script(script).ok()
}

/// Runs a `sh` script in `cwd`, asserts success, returns stdout.
pub fn sh_in(cwd: impl AsRef<Path>, script: &str) -> String {
    Sh::script(script).cwd(cwd).ok()
}

/// Runs a `sh` script, returns (code, stdout, stderr).
pub fn sh_status(script: &str) -> (i32, String, String) {
    Sh::script(script).status().tuple()
}

/// `setpriv --reuid=UID --regid=GID --clear-groups -- sh -c SCRIPT`, asserts success.
pub fn sh_as(uid: u32, gid: u32, script: &str) -> String {
    Sh::script(script).user(uid, gid).ok()
}

pub fn sh_as_status(uid: u32, gid: u32, script: &str) -> (i32, String, String) {
    Sh::script(script).user(uid, gid).status().tuple()
}

/// Like [`sh_as`] with supplementary groups (`setpriv --groups=`).
pub fn sh_as_groups(uid: u32, gid: u32, groups: &[u32], script: &str) -> String {
    Sh::script(script).user_groups(uid, gid, groups).ok()
}

pub fn sh_as_groups_status(
    uid: u32,
    gid: u32,
    groups: &[u32],
    script: &str,
) -> (i32, String, String) {
    Sh::script(script)
        .user_groups(uid, gid, groups)
        .status()
        .tuple()
}

/// A background process (own process group); SIGKILLed with its group on drop.
pub struct Bg {
    pid: i32,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl Bg {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to the process itself.
    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid, sig) };
    }

    /// Sends `sig` to the whole process group.
    pub fn signal_group(&self, sig: i32) {
        unsafe { libc::kill(-self.pid, sig) };
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(s)) = child.try_wait() {
                    self.status = Some(s);
                }
            }
        }
        self.status
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is (still) blocked in syscall number `nr`
    /// (from `/proc/PID/syscall`; e.g. `libc::SYS_flock`).
    pub fn blocked_in_syscall(&self, nr: i64) -> bool {
        fs::read_to_string(format!("/proc/{}/syscall", self.pid))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .is_some_and(|first| first == nr.to_string())
    }

    /// The process state letter from `/proc/PID/stat` (`S`, `D`, `Z`, ...).
    pub fn state(&self) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let after = &stat[stat.rfind(')')? + 1..];
        after.trim_start().chars().next()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.try_status().is_some() {
            // Group members may outlive the leader.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
            return;
        }
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(mut child) = self.child.take() {
            // Never block a test forever on an unkillable process.
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                eprintln!(
                    "warning: background process {} did not die after SIGKILL",
                    self.pid
                );
            }
        }
    }
}

/// Polls `cond` every few ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// `ls`-style sorted names of a directory (through whatever filesystem it is on).
pub fn names(dir: impl AsRef<Path>) -> Vec<String> {
    let dir = dir.as_ref();
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// `uid:gid` of a path without following symlinks.
pub fn owner(path: impl AsRef<Path>) -> String {
    use std::os::unix::fs::MetadataExt;
    let p = path.as_ref();
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    format!("{}:{}", m.uid(), m.gid())
}

/// Contents of a file (panics with the path on error).
pub fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// `st_mode` without following symlinks.
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .mode()
}

/// `st_ino` without following symlinks.
pub fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .ino()
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let f = std::ffi::CString::new(from.as_os_str().as_bytes()).expect("no NUL in path");
    let t = std::ffi::CString::new(to.as_os_str().as_bytes()).expect("no NUL in path");
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the backend filesystem itself takes `user.*` xattrs (tmpfs: kernel >= 6.6).
pub fn backend_takes_user_xattrs(lab: &MountedLab, backend_file: &Path) -> bool {
    let f = backend_file.display();
    let (code, _, err) = lab.sh_status(&format!(
        r#"setfattr -n user.probe -v 1 "{f}" && setfattr -x user.probe "{f}""#
    ));
    if code != 0 {
        eprintln!("SKIP user xattr assertions: backend {f} does not take user xattrs: {err}");
    }
    code == 0
}

/// Serialises `drop_caches` (global to the machine) against tests that compare inode
/// numbers over time, so one test's cache drop cannot disturb another test.
static INODE_CACHE_LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by a test that compares inode numbers over time: no cache drop meanwhile.
pub fn inode_numbers_compared() -> std::sync::RwLockReadGuard<'static, ()> {
    INODE_CACHE_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

/// Asks the kernel to forget unused dentries/inodes (of every filesystem), so the next
/// lookups reach labfs again. Returns false (with a note) where that is not allowed.
pub fn drop_kernel_caches() -> bool {
    let _excl = INODE_CACHE_LOCK.write().unwrap_or_else(|e| e.into_inner());
    let (code, _, err) = sh_status("sync; echo 2 > /proc/sys/vm/drop_caches");
    if code != 0 {
        eprintln!("note: cannot drop caches ({err}); checking without it");
    }
    code == 0
}

// ---------------------------------------------------------------------------
// Mount bookkeeping
// ---------------------------------------------------------------------------

/// Decodes the octal escapes (`\040`) of a /proc/self/mountinfo field.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystem type of the topmost mount at exactly `path`, if any.
/// The FUSE transport every lab is asked to use (`LABFS_TEST_TRANSPORT`: `uring`,
/// `devfuse`, `auto`), if set.
pub fn test_transport() -> Option<String> {
    std::env::var("LABFS_TEST_TRANSPORT")
        .ok()
        .filter(|v| !v.is_empty())
}

/// After a daemon is killed and reaped, waits (bounded) until requests to its mount
/// fail ENOTCONN. Over /dev/fuse the kernel aborts the connection as the daemon's last
/// descriptor closes, before it can be reaped; over FUSE-over-io_uring the ring's own
/// references to /dev/fuse go a few milliseconds later, and a request made in between
/// ends ECONNABORTED (or ECANCELED) instead. Anything else fails the test.
pub fn wait_dead_mount(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = match fs::read_dir(path) {
            Ok(_) => panic!("{} still answers after its daemon died", path.display()),
            Err(e) => e,
        };
        match e.raw_os_error() {
            Some(libc::ENOTCONN) => return,
            Some(libc::ECONNABORTED | libc::ECANCELED) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5))
            }
            _ => panic!("{}: {e} (expected ENOTCONN)", path.display()),
        }
    }
}

/// The fuse module lets daemons serve over io_uring (`enable_uring` is Y).
pub fn kernel_enables_uring() -> bool {
    fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| matches!(v.trim(), "Y" | "y" | "1"))
}

pub fn mount_fstype(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        if let Some(sep) = fields.iter().position(|f| *f == "-") {
            if let Some(fstype) = fields.get(sep + 1) {
                found = Some((*fstype).to_owned());
            }
        }
    }
    found
}

fn is_mounted(path: &Path) -> bool {
    mount_fstype(path).is_some()
}

/// `umount PATH`, falling back to `umount -l PATH`; never panics.
fn force_unmount(path: &Path) {
    for _ in 0..3 {
        if !is_mounted(path) {
            return;
        }
        let plain = exec(
            {
                let mut c = Command::new("umount");
                c.arg(path);
                c
            },
            Duration::from_secs(30),
        );
        if matches!(plain, Ok(ref o) if o.ok()) {
            continue;
        }
        let lazy = exec(
            {
                let mut c = Command::new("umount");
                c.arg("-l").arg(path);
                c
            },
            Duration::from_secs(30),
        );
        if !matches!(lazy, Ok(ref o) if o.ok()) {
            eprintln!(
                "warning: could not unmount {}: {plain:?} / {lazy:?}",
                path.display()
            );
        }
    }
}

fn require_root_and_fuse() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "labfs integration tests must run as root (they mount tmpfs and FUSE filesystems \
         and switch users with setpriv); run them via .ci/run or `sudo cargo test --release`"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (`modprobe fuse`) or create the node \
         (`mknod -m 0666 /dev/fuse c 10 229`) before running the integration tests"
    );
}

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

/// Builder for [`MountedLab`].
#[derive(Clone, Debug)]
pub struct LabBuilder {
    rules: String,
    unplaced_deny: bool,
    xattr_less_atlas: bool,
    init_atlas: bool,
    allow_unmarked: bool,
    mount_args: Vec<String>,
    envs: Vec<(String, String)>,
    wrapper: Vec<String>,
}

/// Why a mount did not come up.
#[derive(Debug)]
pub struct MountFailure {
    /// Exit code of `labfs mount --foreground`, if it exited.
    pub code: Option<i32>,
    /// Everything the daemon wrote.
    pub log: String,
    pub reason: String,
}

impl LabBuilder {
    /// The `[[rule]]` tables (the `[storage]` section is generated).
    pub fn rules(mut self, rules: &str) -> Self {
        self.rules = rules.to_owned();
        self
    }

    /// `unplaced = "deny"`.
    pub fn unplaced_deny(mut self) -> Self {
        self.unplaced_deny = true;
        self
    }

    /// Atlas on ramfs instead of tmpfs: a filesystem with no xattr (and no ACL) support.
    pub fn xattr_less_atlas(mut self) -> Self {
        self.xattr_less_atlas = true;
        self
    }

    /// Do not run `labfs init-atlas` before mounting.
    pub fn skip_init_atlas(mut self) -> Self {
        self.init_atlas = false;
        self
    }

    /// Pass `--allow-unmarked` to `labfs mount`.
    pub fn allow_unmarked(mut self) -> Self {
        self.allow_unmarked = true;
        self
    }

    /// An extra argument for `labfs mount` (before the mountpoint).
    pub fn mount_arg(mut self, arg: &str) -> Self {
        self.mount_args.push(arg.to_owned());
        self
    }

    /// An extra environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Start the daemon through this command (e.g. `setpriv --bounding-set -setuid`),
    /// which must exec `labfs mount ...` given as its trailing arguments.
    pub fn daemon_wrapper(mut self, argv: &[&str]) -> Self {
        self.wrapper = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Mounts; panics (with the daemon log) if the mount does not become ready.
    pub fn mount(self) -> MountedLab {
        match self.try_mount() {
            Ok(lab) => lab,
            Err(f) => panic!(
                "labfs mount failed: {} (exit {:?})\n--- daemon log ---\n{}",
                f.reason, f.code, f.log
            ),
        }
    }

    /// Mounts, or reports why not (the backends are cleaned up either way).
    pub fn try_mount(self) -> Result<MountedLab, MountFailure> {
        require_root_and_fuse();
        let dir = tempfile::Builder::new()
            .prefix("labfs-it-")
            .tempdir()
            .expect("create tempdir");
        // Non-root test users must be able to reach the mountpoint.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
        let root = dir.path().canonicalize().expect("canonicalize tempdir");
        let atlas = root.join("atlas");
        let local = root.join("local");
        let mnt = root.join("mnt");
        let scratch = root.join("scratch");
        for d in [&atlas, &local, &mnt, &scratch] {
            fs::create_dir(d).expect("create fixture dir");
        }
        fs::set_permissions(&scratch, fs::Permissions::from_mode(0o1777)).expect("chmod scratch");

        let mut lab = MountedLab {
            cfg: root.join("labfs.toml"),
            log: root.join("daemon.log"),
            atlas,
            local,
            mnt,
            scratch,
            root,
            backends_mounted: Vec::new(),
            daemon: None,
            daemon_pid: Arc::new(Mutex::new(None)),
            watchdog: None,
            mount_args: self.mount_args.clone(),
            envs: self.envs.clone(),
            wrapper: self.wrapper.clone(),
            _dir: dir,
        };

        let atlas_mount = if self.xattr_less_atlas {
            vec!["-t", "ramfs", "-o", "mode=0755", "ramfs"]
        } else {
            vec!["-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs"]
        };
        for (target, args) in [
            (lab.atlas.clone(), atlas_mount),
            (
                lab.local.clone(),
                vec!["-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs"],
            ),
        ] {
            let mut a: Vec<&str> = args;
            let t = target.to_string_lossy().into_owned();
            a.push(&t);
            let (code, _, err) = run_status("mount", &a);
            if code != 0 {
                return Err(MountFailure {
                    code: None,
                    log: String::new(),
                    reason: format!("mount {a:?} failed: {err}"),
                });
            }
            lab.backends_mounted.push(target);
        }

        let mut cfg = String::from("# written by tests/common/mod.rs\n");
        if self.unplaced_deny {
            cfg.push_str("unplaced = \"deny\"\n");
        }
        cfg.push_str(&format!(
            "\n[storage]\natlas = \"{}\"\nlocal = \"{}\"\n",
            lab.atlas.display(),
            lab.local.display()
        ));
        cfg.push_str(&self.rules);
        cfg.push('\n');
        fs::write(&lab.cfg, cfg).expect("write rules file");

        if self.init_atlas {
            let cfg_s = lab.cfg.to_string_lossy().into_owned();
            let out = Sh::program(LABFS, &["init-atlas", "--config", &cfg_s]).status();
            if !out.ok() {
                return Err(MountFailure {
                    code: Some(out.code),
                    log: format!("{}{}", out.stdout, out.stderr),
                    reason: "labfs init-atlas failed".into(),
                });
            }
        }
        if self.allow_unmarked {
            lab.mount_args.push("--allow-unmarked".into());
        }

        match lab.start_daemon() {
            Ok(()) => {
                lab.start_watchdog();
                Ok(lab)
            }
            Err((code, reason)) => Err(MountFailure {
                code,
                log: lab.daemon_log(),
                reason,
            }),
        }
    }
}

/// A running labfs mount over two private tmpfs backends; torn down on drop.
pub struct MountedLab {
    root: PathBuf,
    atlas: PathBuf,
    local: PathBuf,
    mnt: PathBuf,
    scratch: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    backends_mounted: Vec<PathBuf>,
    daemon: Option<Child>,
    daemon_pid: Arc<Mutex<Option<u32>>>,
    watchdog: Option<mpsc::Sender<()>>,
    mount_args: Vec<String>,
    envs: Vec<(String, String)>,
    wrapper: Vec<String>,
    // Last: removed after everything above is unmounted.
    _dir: tempfile::TempDir,
}

impl MountedLab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            rules: DEFAULT_RULES.to_owned(),
            unplaced_deny: false,
            xattr_less_atlas: false,
            init_atlas: true,
            allow_unmarked: false,
            mount_args: Vec::new(),
            envs: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// A lab with [`DEFAULT_RULES`].
    pub fn new() -> MountedLab {
        MountedLab::builder().mount()
    }

    /// A lab with [`DEFAULT_RULES`] and `/docs` (atlas) and `/cache` (local) created
    /// through the mount.
    pub fn with_dirs() -> MountedLab {
        let lab = MountedLab::new();
        lab.sh(r#"mkdir "$LAB/docs" "$LAB/cache""#);
        lab
    }

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }
    /// `rel` (namespace path, leading `/` optional) under the mountpoint.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel.trim_start_matches('/'))
    }
    pub fn atlas_path(&self, rel: &str) -> PathBuf {
        self.atlas.join(rel.trim_start_matches('/'))
    }
    pub fn local_path(&self, rel: &str) -> PathBuf {
        self.local.join(rel.trim_start_matches('/'))
    }
    pub fn backend_path(&self, b: Backend, rel: &str) -> PathBuf {
        match b {
            Backend::Atlas => self.atlas_path(rel),
            Backend::Local => self.local_path(rel),
        }
    }
    /// A world-writable (1777) directory outside the mount, private to this lab.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }
    pub fn scratch_path(&self, rel: &str) -> PathBuf {
        self.scratch.join(rel)
    }
    pub fn config_path(&self) -> &Path {
        &self.cfg
    }
    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.cfg).expect("read rules file")
    }

    /// 1-based line of the `[[rule]]` header whose `path` is `pattern`.
    pub fn rule_line(&self, pattern: &str) -> usize {
        let text = self.config_text();
        let mut header = None;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t == "[[rule]]" {
                header = Some(i + 1);
            } else if t.replace(' ', "") == format!("path=\"{pattern}\"") {
                return header.expect("path before any [[rule]]");
            }
        }
        panic!("no rule with path {pattern:?} in\n{text}");
    }

    /// Everything the daemon has written to stdout/stderr so far (all mounts).
    pub fn daemon_log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls the daemon log until it contains `needle` (log lines may lag the reply).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.daemon_log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon not running").id()
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mnt)
    }

    /// SIGKILLs the daemon and lazily unmounts the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        *self.daemon_pid.lock().unwrap() = None;
        if is_mounted(&self.mnt) {
            let _ = run_status("umount", &["-l", &self.mnt.to_string_lossy()]);
        }
        assert!(!is_mounted(&self.mnt), "mount still present after kill9");
    }

    /// Starts the daemon again with the same config and waits until it is ready.
    pub fn remount(&mut self) {
        assert!(
            self.daemon.is_none() && !is_mounted(&self.mnt),
            "remount() while still mounted: call unmount() or kill9() first"
        );
        if let Err((code, reason)) = self.start_daemon() {
            panic!(
                "remount failed: {reason} (exit {code:?})\n--- daemon log ---\n{}",
                self.daemon_log()
            );
        }
    }

    /// `umount MOUNTPOINT`, then waits for the daemon and returns its exit status.
    pub fn unmount_status(&mut self) -> ExitStatus {
        let out = Sh::program("umount", &[&self.mnt.to_string_lossy()]).status();
        assert!(
            out.ok(),
            "umount {} failed: {}{}",
            self.mnt.display(),
            out.stdout,
            out.stderr
        );
        let mut child = self.daemon.take().expect("daemon not running");
        *self.daemon_pid.lock().unwrap() = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait daemon") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "labfs daemon did not exit within 20 s of umount\n--- daemon log ---\n{}",
                    self.daemon_log()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// `umount MOUNTPOINT` and asserts the daemon exits 0.
    pub fn unmount(&mut self) {
        let status = self.unmount_status();
        assert!(
            status.success(),
            "labfs daemon exited with {status} after umount\n--- daemon log ---\n{}",
            self.daemon_log()
        );
    }

    // ---- shell helpers bound to this lab ----

    /// A script with cwd = mountpoint and `LAB`, `ATLAS`, `LOCAL`, `CFG`, `LABFS`,
    /// `SCRATCH` set.
    pub fn cmd(&self, script: &str) -> Sh {
        Sh::script(script)
            .cwd(&self.mnt)
            .env("LAB", &self.mnt)
            .env("ATLAS", &self.atlas)
            .env("LOCAL", &self.local)
            .env("CFG", &self.cfg)
            .env("LABFS", LABFS)
            .env("SCRATCH", &self.scratch)
            .env("HOME", &self.scratch)
    }
    pub fn sh(&self, script: &str) -> String {
        self.cmd(script).ok()
    }
    pub fn sh_status(&self, script: &str) -> (i32, String, String) {
        self.cmd(script).status().tuple()
    }
    pub fn sh_as(&self, uid: u32, gid: u32, script: &str) -> String {
        self.cmd(script).user(uid, gid).ok()
    }
    pub fn sh_as_status(&self, uid: u32, gid: u32, script: &str) -> (i32, String, String) {
        self.cmd(script).user(uid, gid).status().tuple()
    }
    pub fn sh_as_groups(&self, uid: u32, gid: u32, groups: &[u32], script: &str) -> String {
        self.cmd(script).user_groups(uid, gid, groups).ok()
    }
    pub fn sh_as_groups_status(
        &self,
        uid: u32,
        gid: u32,
        groups: &[u32],
        script: &str,
    ) -> (i32, String, String) {
        self.cmd(script)
            .user_groups(uid, gid, groups)
            .status()
            .tuple()
    }

    /// `labfs SUBCOMMAND --config CFG ARGS...` → (code, stdout, stderr).
    pub fn labfs(&self, subcommand: &str, args: &[&str]) -> (i32, String, String) {
        let cfg = self.cfg.to_string_lossy().into_owned();
        let mut all = vec![subcommand, "--config", &cfg];
        all.extend_from_slice(args);
        Sh::program(LABFS, &all).status().tuple()
    }

    // ---- internals ----

    fn start_daemon(&mut self) -> Result<(), (Option<i32>, String)> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let log2 = log.try_clone().expect("dup log fd");
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(LABFS),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(LABFS);
                c
            }
        };
        cmd.arg("mount")
            .arg("--foreground")
            .arg("--config")
            .arg(&self.cfg)
            .args(&self.mount_args)
            .arg(&self.mnt)
            .env("RUST_LOG", "labfs=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // LABFS_TEST_TRANSPORT=uring (the io_uring pass of .ci/run): every lab's daemon
        // serves over that FUSE transport; a test's own env (below) still wins.
        if let Some(t) = test_transport() {
            cmd.env("LABFS_FUSE_TRANSPORT", t);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| (None, format!("cannot spawn {LABFS}: {e}")))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(fstype) = mount_fstype(&self.mnt) {
                if fstype == "fuse.labfs" {
                    break;
                }
                if !fstype.starts_with("fuse") {
                    // Not ours (yet); keep waiting.
                } else {
                    let _ = child.kill();
                    let _ = child.wait();
                    force_unmount(&self.mnt);
                    return Err((
                        None,
                        format!("mounted with fstype {fstype:?}, expected \"fuse.labfs\""),
                    ));
                }
            }
            if let Some(status) = child.try_wait().expect("try_wait daemon") {
                return Err((
                    Some(code_of(status)),
                    format!("labfs mount exited ({status}) before the mount was ready"),
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                force_unmount(&self.mnt);
                return Err((None, format!("mount not ready within {READY_TIMEOUT:?}")));
            }
            thread::sleep(Duration::from_millis(5));
        }
        *self.daemon_pid.lock().unwrap() = Some(child.id());
        self.daemon = Some(child);
        Ok(())
    }

    fn start_watchdog(&mut self) {
        let (tx, rx) = mpsc::channel::<()>();
        let pid = Arc::clone(&self.daemon_pid);
        let mnt = self.mnt.clone();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(LAB_LIFETIME) {
                if let Some(p) = *pid.lock().unwrap() {
                    eprintln!(
                        "watchdog: lab at {} alive for {LAB_LIFETIME:?}; SIGKILLing daemon {p}",
                        mnt.display()
                    );
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
            }
        });
        self.watchdog = Some(tx);
    }

    fn dump_log(&self) {
        let log = self.daemon_log();
        let name = thread::current()
            .name()
            .unwrap_or("unnamed")
            .replace("::", "-");
        let keep_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("labfs-test-logs");
        let kept = fs::create_dir_all(&keep_dir)
            .and_then(|_| fs::write(keep_dir.join(format!("{name}.log")), &log))
            .map(|_| keep_dir.join(format!("{name}.log")));
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(300)..].join("\n");
        eprintln!(
            "--- labfs daemon log for {name} (last {} of {} lines; full log: {}) ---\n{tail}\n--- end of daemon log ---",
            lines.len().min(300),
            lines.len(),
            kept.map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("not saved: {e}")),
        );
    }
}

impl Drop for MountedLab {
    fn drop(&mut self) {
        if let Some(stop) = self.watchdog.take() {
            let _ = stop.send(());
        }
        force_unmount(&self.mnt);
        if let Some(mut child) = self.daemon.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        *self.daemon_pid.lock().unwrap() = None;
        if thread::panicking() {
            self.dump_log();
        }
        for b in self.backends_mounted.drain(..).rev() {
            force_unmount(&b);
        }
        let _ = &self.root;
    }
}
