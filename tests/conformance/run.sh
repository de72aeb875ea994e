#!/bin/bash
# Runs public POSIX suites against ext4 (the reference) and a labfs mount (a local
# path and an Atlas path), and prints a results table.  See docs/conformance.md.
#
# The suites are NOT fetched by this script: give it folders that already hold them.
# With --build it builds them from those source folders first (autotools/meson/cargo);
# without it, it expects them built in place.
#
#   tests/conformance/run.sh [--build] [--labfs BIN] [--out DIR] [--targets "ext4 local atlas"]
#       [--only "pjdfstest pjdfstest-rs ltp fsx fsstress stress-ng test_syscalls"]
#       [--pjdfstest DIR] [--pjdfstest-rs DIR] [--ltp DIR] [--xfstests DIR]
#       [--stress-ng DIR] [--libfuse DIR] [--backing ext4|tmpfs] [--load CPUS]
#   tests/conformance/run.sh --report --out DIR [--targets ...] [--only ...]
#       (only print the table of an earlier run; several runs with different --only or
#       --targets may share one --out DIR and run in parallel, each with its own mounts)
#
# A suite whose folder is not given is skipped.  Must run as root (mounts, loop
# devices, and the suites switch users themselves).  Every mount it makes lives under
# one mktemp directory and is undone on exit.
#
# --load CPUS runs `stress-ng --cpu CPUS` beside the suites (a busy node), and the
# table says so; the daemon's watchdog counters are recorded per suite either way.
#
# Output: DIR/<target>/<suite>.results with one "PASS|FAIL|SKIP name [detail]" line per
# test, DIR/<target>/<suite>.log with the raw output, DIR/<target>/<suite>.commit (the
# commit measured), DIR/<target>/<suite>.health (labfs
# targets: the daemon's Atlas-watchdog counters during the suite, and the load average),
# and DIR/table.md (also printed): failures and skips ext4 does not have, each marked
# documented (listed in tests/conformance/exceptions, explained in docs/semantics.md) or
# NOT documented.
set -u

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

LABFS="$repo/target/release/labfs"
OUT=""
TARGETS="ext4 local atlas"
ONLY="pjdfstest pjdfstest-rs ltp fsx fsstress stress-ng test_syscalls"
BUILD=0
REPORT=0
BACKING=ext4
LOAD=0
PJD="" PJDRS="" LTP="" XFS="" SNG="" LIBFUSE=""
# How long each stressor of stress-ng runs (SNG_STRESSORS="a b" runs only those), and
# how many fsx operations.
SNG_TIME=${SNG_TIME:-4}
FSX_OPS=${FSX_OPS:-20000}
FSSTRESS_OPS=${FSSTRESS_OPS:-4000}

die() { echo "run.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --build) BUILD=1 ;;
    --report) REPORT=1 ;;
    --labfs) LABFS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --targets) TARGETS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --backing) BACKING=$2; shift ;;
    --load) LOAD=$2; shift ;;
    --pjdfstest) PJD=$(cd "$2" && pwd) || die "no folder $2"; shift ;;
    --pjdfstest-rs) PJDRS=$(cd "$2" && pwd) || die "no folder $2"; shift ;;
    --ltp) LTP=$(cd "$2" && pwd) || die "no folder $2"; shift ;;
    --xfstests) XFS=$(cd "$2" && pwd) || die "no folder $2"; shift ;;
    --stress-ng) SNG=$(cd "$2" && pwd) || die "no folder $2"; shift ;;
    --libfuse) LIBFUSE=$(cd "$2" && pwd) || die "no folder $2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
if [ "$REPORT" = 1 ]; then
    [ -n "$OUT" ] && [ -d "$OUT" ] || die "--report needs --out DIR of an earlier run"
    BUILD=0
fi
[ "$(id -u)" = 0 ] || die "must run as root"

[ -x "$LABFS" ] || die "no labfs binary at $LABFS (cargo build --release, or --labfs BIN)"
case "$BACKING" in ext4|tmpfs) ;; *) die "--backing is ext4 or tmpfs" ;; esac
case "$LOAD" in *[!0-9]*|"") die "--load takes a number of CPU hogs" ;; esac

# The commit of the worktree the binary was built in (target/release/labfs), recorded
# beside each suite's results (DIR/<target>/<suite>.commit) and shown per row.
bin_repo=$(dirname "$(readlink -f "$LABFS")")
if commit=$(git -C "$bin_repo" rev-parse --short HEAD 2>/dev/null); then
    git -C "$bin_repo" diff --quiet HEAD -- src 2>/dev/null || commit="$commit+uncommitted src changes"
else
    commit="unknown (binary outside a git worktree)"
fi

W=$(mktemp -d /tmp/labfs-conformance.XXXXXX)
[ -n "$OUT" ] || OUT="$W/out"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
chmod 0755 "$W"

# The LTP syscall test folders this yardstick runs (issue 10 item 3).
LTP_DIRS="open openat openat2 creat link linkat unlink unlinkat rename renameat renameat2
 chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat setxattr getxattr listxattr
 removexattr fsetxattr fgetxattr flistxattr fremovexattr lgetxattr llistxattr lremovexattr
 fcntl statx mknod mknodat"

want() { case " $ONLY " in *" $1 "*) return 0 ;; esac; return 1; }

# ---------------------------------------------------------------------------
# Building (only with --build, from the given source folders)
# ---------------------------------------------------------------------------
build() {
    if [ -n "$PJD" ] && want pjdfstest && [ ! -x "$PJD/pjdfstest" ]; then
        (cd "$PJD" && autoreconf -ifs && ./configure && make pjdfstest) || die "building pjdfstest failed"
    fi
    if [ -n "$PJDRS" ] && want pjdfstest-rs; then
        (cd "$PJDRS/rust" && cargo build --release) || die "building pjdfstest (Rust) failed"
    fi
    if [ -n "$XFS" ] && { want fsx || want fsstress; }; then
        (cd "$XFS" && { [ -f include/builddefs ] || { make configure && ./configure; }; } && make -C lib && make -C ltp fsx fsstress) \
            || die "building fsx/fsstress failed"
    fi
    if [ -n "$SNG" ] && want stress-ng && [ ! -x "$SNG/stress-ng" ]; then
        (cd "$SNG" && make -j"$(nproc)") || die "building stress-ng failed"
    fi
    if [ -n "$LIBFUSE" ] && want test_syscalls; then
        (cd "$LIBFUSE" && { [ -d build-conform ] || meson setup build-conform -Dtests=true; } && ninja -C build-conform test/test_syscalls example/passthrough_hp) \
            || die "building libfuse's test_syscalls failed"
    fi
    if [ -n "$LTP" ] && want ltp; then
        (cd "$LTP" && { [ -f include/config.h ] || { make autotools && ./configure; }; } && make -C lib && make -C libs) \
            || die "building LTP's library failed"
        for d in $LTP_DIRS; do
            make -C "$LTP/testcases/kernel/syscalls/$d" >/dev/null || echo "run.sh: LTP $d did not build" >&2
        done
    fi
}
[ "$BUILD" = 1 ] && build

# ---------------------------------------------------------------------------
# Mounts: ext4 reference, two backends, the labfs mount
# ---------------------------------------------------------------------------
MOUNTS=()
LOOPS=()
DAEMON_PID=""
LOAD_PID=""
cleanup() {
    set +e
    if [ -n "$LOAD_PID" ]; then
        kill "$LOAD_PID" 2>/dev/null
        wait "$LOAD_PID" 2>/dev/null
    fi
    if mountpoint -q "$W/mnt" 2>/dev/null; then
        umount "$W/mnt" 2>/dev/null || umount -l "$W/mnt"
    fi
    if [ -n "$DAEMON_PID" ]; then
        kill "$DAEMON_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}"
    done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    rm -f "$W"/*.img
    # The scratch folder, once every mount in it is gone (and unless it holds the results).
    case "$OUT/" in "$W"/*) ;; *) grep -q " $W/" /proc/mounts || rm -rf --one-file-system "$W" ;; esac
}
trap cleanup EXIT
trap 'exit 130' INT TERM

backing_fs() { # name -> mounted directory $W/name
    local d="$W/$1"
    mkdir -p "$d"
    if [ "$BACKING" = ext4 ] || [ "$1" = ref ]; then
        truncate -s 4G "$W/$1.img"
        mkfs.ext4 -q -F "$W/$1.img" || die "mkfs.ext4 failed"
        mount -o loop,user_xattr,acl "$W/$1.img" "$d" || die "mounting $1 failed"
    else
        mount -t tmpfs -o size=2g,mode=0755 tmpfs "$d" || die "mounting $1 failed"
    fi
    MOUNTS+=("$d")
    chmod 0755 "$d"
}
if [ "$REPORT" = 0 ]; then
backing_fs ref
backing_fs atlas
backing_fs local
mkdir -p "$W/mnt"
CFG="$W/labfs.toml"
cat > "$CFG" <<EOF
# written by tests/conformance/run.sh
[storage]
atlas = "$W/atlas"
local = "$W/local"

[[rule]]
path = "/cache"
class = "ephemeral"

[[rule]]
path = "/docs"
class = "authoritative"
EOF
"$LABFS" init-atlas --config "$CFG" >/dev/null || die "labfs init-atlas failed"
DLOG="$OUT/labfs-daemon.$$.log"
"$LABFS" mount --foreground --config "$CFG" "$W/mnt" >"$DLOG" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 200); do
    grep -q " $W/mnt fuse.labfs " /proc/mounts && break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "labfs mount exited: $(tail -5 "$DLOG")"
    sleep 0.1
done
grep -q " $W/mnt fuse.labfs " /proc/mounts || die "labfs did not mount"
mkdir -p "$W/mnt/cache" "$W/mnt/docs"
if [ "$LOAD" -gt 0 ]; then
    hog=$(command -v stress-ng || echo "$SNG/stress-ng")
    [ -x "$hog" ] || die "--load needs stress-ng (installed, or --stress-ng DIR)"
    "$hog" --cpu "$LOAD" --timeout 0 >/dev/null 2>&1 &
    LOAD_PID=$!
    echo "run.sh: loading the node with $hog --cpu $LOAD (pid $LOAD_PID)" >&2
fi
fi

# The daemon's Atlas-watchdog counters, to show that no request timed out on a
# healthy backend (docs/semantics.md, *Atlas outages*): a snapshot before a suite,
# the difference after it.
health_snapshot() { "$LABFS" status --json "$W/mnt" >"$1" 2>/dev/null || true; }
health_delta() { # before.json after.json -> one line "counter=delta ..."
    python3 - "$1" "$2" <<'PY' 2>/dev/null || echo "unknown (labfs status --json did not answer)"
import json, sys
def load(p):
    with open(p) as f:
        return json.load(f)
a, b = load(sys.argv[1]), load(sys.argv[2])
ha, hb = a["atlas_health"], b["atlas_health"]
ea, eb = a["stats"]["errors_by_errno"], b["stats"]["errors_by_errno"]
out = [f"{k}={hb[k] - ha[k]}" for k in ("backend_timeouts", "node_busy_timeouts", "refused_requests")]
out.append(f"ETIMEDOUT={eb.get('ETIMEDOUT', 0) - ea.get('ETIMEDOUT', 0)}")
out.append(f"most_cpu_wait_ms={hb['most_cpu_wait_ms']} slowest_call_ms={hb['slowest_call_ms']} state={hb['state']}")
print(" ".join(out))
PY
}

target_dir() {
    case "$1" in
    ext4) echo "$W/ref" ;;
    local) echo "$W/mnt/cache" ;;
    atlas) echo "$W/mnt/docs" ;;
    esac
}
# Where the target's files are on the backing filesystem (for test_syscalls).
real_dir() {
    case "$1" in
    ext4) echo "$W/ref" ;;
    local) echo "$W/local/cache" ;;
    atlas) echo "$W/atlas/docs" ;;
    esac
}
fresh_dir() { # target name -> a new empty directory for one suite
    local d
    d="$(target_dir "$1")/$2"
    rm -rf "$d" 2>/dev/null
    mkdir -p "$d" && chmod 0755 "$d"
    echo "$d"
}

# ---------------------------------------------------------------------------
# Suites: each writes $R (results) and $L (log)
# ---------------------------------------------------------------------------
run_pjdfstest() { # C version: every .t file, each TAP assertion is one test
    local d t name
    d=$(fresh_dir "$T" pjd)
    for t in $(cd "$PJD/tests" && find . -name '*.t' | sort); do
        name=${t#./}
        echo "=== $name" >>"$L"
        (cd "$d" && timeout 900 sh "$PJD/tests/$name" 2>&1) >"$W/tap" || true
        cat "$W/tap" >>"$L"
        awk -v f="$name" '
            /^ok /     { print "PASS " f ":" $2; n++ }
            /^not ok .*# TODO/ { print "XFAIL " f ":" $3; n++; next }
            /^not ok / { d=$0; sub(/^not ok [0-9]* ?-? ?/, "", d); print "FAIL " f ":" $3 " " d; n++ }
            /^1\.\./   { split($1, p, "\\.\\."); plan=p[2] }
            END { if (plan != "" && n < plan) print "FAIL " f ":died after " n " of " plan }
        ' "$W/tap" >>"$R"
    done
}

run_pjdfstest_rs() {
    local d bin="$PJDRS/rust/target/release/pjdfstest"
    d=$(fresh_dir "$T" pjdrs)
    # Two unprivileged users that exist here; the suite switches to them.
    cat >"$W/pjdrs.toml" <<EOF
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}
[settings]
naptime = 0.01
allow_remount = false
[dummy_auth]
entries = [["nobody", "nogroup"], ["$(id -nu 1000)", "$(id -ng 1000)"]]
EOF
    # A second filesystem for the EXDEV tests.
    mkdir -p "$W/second"
    mountpoint -q "$W/second" || { mount -t tmpfs -o size=64m,mode=0755 tmpfs "$W/second" && MOUNTS+=("$W/second"); }
    (cd "$d" && NO_COLOR=1 timeout 3600 "$bin" -c "$W/pjdrs.toml" -p "$d" -s "$W/second" 2>&1) >"$L" || true

    # "name   ok" / "name   FAILED" (then the reason, tab-indented) / "name   skipped".
    awk '
        /^[a-z0-9_:]+ +ok$/ { print "PASS " $1; next }
        /^[a-z0-9_:]+ +failed as expected$/ { print "PASS " $1; next }
        /^[a-z0-9_:]+ +FAILED$/ { f=$1; getline r; gsub(/^[ \t]+/, "", r); print "FAIL " f " " r; next }
        /^[a-z0-9_:]+ +PASSED UNEXPECTEDLY$/ { print "FAIL " $1 " passed unexpectedly"; next }
        /^[a-z0-9_:]+ +skipped$/ { f=$1; getline r; gsub(/^[ \t]+/, "", r); print "SKIP " f " " r; next }
    ' "$L" >>"$R"
}

run_ltp() {
    local d dir t rc
    d=$(fresh_dir "$T" ltp)
    chmod 0777 "$d"
    for dir in $LTP_DIRS; do
        for t in $(cd "$LTP/testcases/kernel/syscalls/$dir" 2>/dev/null && find . -maxdepth 1 -type f -perm -u+x ! -name '*.sh' | sort); do
            t=${t#./}
            # *_64 are the same tests built with 64-bit offsets for 32-bit hosts.
            case "$t" in *_child|*_helper|*_64) continue ;; esac

            echo "=== $dir/$t" >>"$L"
            (cd "$LTP/testcases/kernel/syscalls/$dir" &&
                TMPDIR="$d" LTPROOT="$LTP" LTP_SINGLE_FS_TYPE=ext4 LTP_TIMEOUT_MUL=3 \
                    PATH="$PATH:$LTP/testcases/kernel/syscalls/$dir" \
                    timeout 600 "./$t" 2>&1) >"$W/ltp.out"
            rc=$?
            cat "$W/ltp.out" >>"$L"
            # A test that made its temporary directory elsewhere did not test the target.
            if grep -q " as tmpdir " "$W/ltp.out" && ! grep -q "Using $d/" "$W/ltp.out"; then
                echo "FAIL $t ran outside $d: $(grep -m1 ' as tmpdir ' "$W/ltp.out")" >>"$R"
                continue
            fi
            case $rc in
            0) echo "PASS $t" ;;
            124) echo "FAIL $t timed out after 600 s (run.sh's limit)" ;;
            32) echo "SKIP $t $(grep -m1 TCONF "$W/ltp.out" | sed 's/.*TCONF: //')" ;;
            *) echo "FAIL $t rc=$rc $(grep -m1 -E 'TFAIL|TBROK' "$W/ltp.out" | sed 's/^[^:]*: //')" ;;
            esac >>"$R"
        done
    done
}

run_fsx() {
    local d name args
    d=$(fresh_dir "$T" fsx)
    # name:options.  -N ops, -S seed (fixed: reruns are comparable).
    for spec in "fsx-default:" "fsx-no-mmap:-R -W"; do
        name=${spec%%:*}
        args=${spec#*:}
        echo "=== $name $args" >>"$L"
        # shellcheck disable=SC2086
        (cd "$d" && timeout 1200 "$XFS/ltp/fsx" -q -N "$FSX_OPS" -S 1 $args "$d/$name.file" 2>&1) >>"$L"
        case $? in
        0) echo "PASS $name" ;;
        124) echo "FAIL $name timed out after 1200 s (run.sh's limit)" ;;
        *) echo "FAIL $name $(tail -1 "$L")" ;;
        esac >>"$R"
    done
}

run_fsstress() {
    local d rc
    d=$(fresh_dir "$T" fsstress)
    echo "=== fsstress -p 4 -n $FSSTRESS_OPS -s 1" >>"$L"
    timeout 1800 "$XFS/ltp/fsstress" -d "$d/work" -p 4 -n "$FSSTRESS_OPS" -s 1 >>"$L" 2>&1
    rc=$?
    case $rc in
    0) echo "PASS fsstress" ;;
    124) echo "FAIL fsstress timed out after 1800 s (run.sh's limit)" ;;
    *) echo "FAIL fsstress rc=$rc" ;;
    esac >>"$R"
    if rm -rf "$d/work" 2>>"$L"; then echo "PASS fsstress-cleanup"; else echo "FAIL fsstress-cleanup rm -rf"; fi >>"$R"
}

run_stress_ng() {
    local d s rc
    d=$(fresh_dir "$T" stressng)
    chmod 0777 "$d"
    for s in ${SNG_STRESSORS:-$("$SNG/stress-ng" --class filesystem? 2>&1 | sed 's/.*: //')}; do
        echo "=== $s" >>"$L"
        # `io` calls syncfs(2) on every mount of the host, and syncfs reports a writeback
        # error of that filesystem (another mount's too): trace its failing syncfs calls
        # so that a failure names the mount it came from.
        trace=()
        if [ "$s" = io ] && command -v strace >/dev/null; then
            trace=(strace -f --seccomp-bpf -y -e trace=syncfs -e status=failed -o "$W/sng.strace")
            : >"$W/sng.strace"
        fi
        (cd "$d" && timeout $((SNG_TIME * 10 + 60)) "${trace[@]}" "$SNG/stress-ng" --temp-path "$d" --"$s" 1 \
            --timeout "${SNG_TIME}s" --verify --metrics-brief 2>&1) >"$W/sng.out"
        rc=$?
        cat "$W/sng.out" >>"$L"
        if [ ${#trace[@]} -gt 0 ] && [ $rc != 0 ]; then
            # "syncfs(63</path>) = -1 EPERM (...)" -> "syncfs EPERM on /path"
            sed -n 's/.*syncfs([0-9]*<\([^>]*\)>) *= -1 \([A-Z]*\).*/syncfs \2 on \1/p' "$W/sng.strace" |
                grep -v EBADF | sort -u | sed 's/^/run.sh: /' >>"$W/sng.out"
        fi
        if [ $rc = 124 ]; then
            echo "FAIL $s timed out after $((SNG_TIME * 10 + 60)) s (run.sh's limit)"
        elif grep -qE "skipped: [1-9]" "$W/sng.out"; then
            echo "SKIP $s $(grep -m1 -iE 'not (supported|implemented)|skipping|skipped|disabled' "$W/sng.out" | sed 's/.*] //')"
        elif [ $rc = 0 ]; then
            echo "PASS $s"
        else
            echo "FAIL $s rc=$rc $(grep -m1 -E 'fail|error' "$W/sng.out" | sed 's/.*] //')$(grep '^run.sh: syncfs' "$W/sng.out" | sed 's/^run.sh: / /' | tr '\n' ';')"
        fi >>"$R"
    done
}

run_test_syscalls() {
    local d rd bin="$LIBFUSE/build-conform/test/test_syscalls" mode rc
    d=$(fresh_dir "$T" tsys)
    rd="$(real_dir "$T")/tsys"
    # plain and unlinked: with REALDIR, as libfuse's own test runs it (a few tests create
    # files behind the filesystem's back); unlinked-mnt: -u without REALDIR, so that the
    # end-of-run checks of unlinked files (skipped when any test failed) run too.
    for mode in plain unlinked unlinked-mnt; do
        echo "=== test_syscalls ($mode)" >>"$L"
        case $mode in
        plain) (timeout 900 "$bin" "$d" ":$rd" 2>&1) >"$W/tsys.out" ;;
        unlinked) (timeout 900 "$bin" "$d" ":$rd" -u 2>&1) >"$W/tsys.out" ;;
        unlinked-mnt) (timeout 900 "$bin" "$d" -u 2>&1) >"$W/tsys.out" ;;
        esac

        rc=$?
        cat "$W/tsys.out" >>"$L"
        # "+   0.001s   2 [create+unlink] START", then "... OK", or the test's own
        # lines "  2 [create+unlink] reason" (a failure) or "... SKIP".  A test is
        # its number and name plus the mode.
        awk -v m="$mode" '
            function strip(   s) { s=$0; sub(/^\+ *[0-9.]+s/, "", s); sub(/^ */, "", s); return s }
            function key(   s) { s=strip(); sub(/^[0-9]+ \[/, "", s); sub(/\].*/, "", s); gsub(/ /, "_", s); return s }
            function num(   s) { s=strip(); sub(/ .*/, "", s); return s }

            /^\+.*\] START$/ { next }
            /^\+.*\] OK$/ { k=num() "-" key(); if (!(k in bad)) print "PASS " k "(" m ")"; next }
            / *[0-9]+ \[.*\] SKIP$/ { print "SKIP " num() "-" key() "(" m ")"; next }
            # A test that prints progress ends its own line with the next "+ ... OK".
            /^ *[0-9]+ \[.*\+ +[0-9.]+s +[0-9]+ \[.*\] OK$/ { k=num() "-" key(); if (!(k in bad)) print "PASS " k "(" m ")"; next }
            /^ *[0-9]+ \[/ { k=num() "-" key(); r=$0; sub(/^[^]]*\] /, "", r); if (!(k in bad)) print "FAIL " k "(" m ") " r; bad[k]=1 }
        ' "$W/tsys.out" >>"$R"
        # Exit 0: all passed; 1 with "N tests failed": finished; anything else: it died.
        if [ $rc != 0 ] && ! { [ $rc = 1 ] && grep -q "tests failed" "$W/tsys.out"; }; then
            echo "FAIL test_syscalls($mode) exited $rc: $(tail -n 1 "$W/tsys.out")" >>"$R"
        fi


    done
}

have() {
    case "$1" in
    pjdfstest) [ -n "$PJD" ] && [ -x "$PJD/pjdfstest" ] ;;
    pjdfstest-rs) [ -n "$PJDRS" ] && [ -x "$PJDRS/rust/target/release/pjdfstest" ] ;;
    ltp) [ -n "$LTP" ] ;;
    fsx) [ -n "$XFS" ] && [ -x "$XFS/ltp/fsx" ] ;;
    fsstress) [ -n "$XFS" ] && [ -x "$XFS/ltp/fsstress" ] ;;
    stress-ng) [ -n "$SNG" ] && [ -x "$SNG/stress-ng" ] ;;
    test_syscalls) [ -n "$LIBFUSE" ] && [ -x "$LIBFUSE/build-conform/test/test_syscalls" ] ;;
    esac
}

[ "$REPORT" = 1 ] && ONLY_RUN="" || ONLY_RUN=$ONLY
for S in $ONLY_RUN; do
    have "$S" || { echo "run.sh: skipping $S (no built suite given)" >&2; continue; }
    for T in $TARGETS; do
        mkdir -p "$OUT/$T"
        R="$OUT/$T/$S.results"
        L="$OUT/$T/$S.log"
        : >"$R"
        : >"$L"
        echo "run.sh: $S on $T ($(target_dir "$T"))" >&2
        start=$(date +%s)
        load_start=$(cut -d' ' -f1 /proc/loadavg)
        [ "$T" = ext4 ] || health_snapshot "$W/health.before"
        case "$S" in
        pjdfstest) run_pjdfstest ;;
        pjdfstest-rs) run_pjdfstest_rs ;;
        ltp) run_ltp ;;
        fsx) run_fsx ;;
        fsstress) run_fsstress ;;
        stress-ng) run_stress_ng ;;
        test_syscalls) run_test_syscalls ;;
        esac
        health="load --load=$LOAD loadavg=$load_start..$(cut -d' ' -f1 /proc/loadavg)"
        if [ "$T" != ext4 ]; then
            health_snapshot "$W/health.after"
            health="$health $(health_delta "$W/health.before" "$W/health.after")"
        fi
        echo "$health" >"$OUT/$T/$S.health"
        echo "$commit" >"$OUT/$T/$S.commit"
        echo "run.sh: $S on $T: $(grep -cE '^(PASS|XFAIL)' "$R") passed, $(grep -c '^FAIL' "$R") failed, $(grep -c '^SKIP' "$R") skipped in $(($(date +%s) - start)) s; $health" >&2
        grep -q " $W/mnt fuse.labfs " /proc/mounts || die "the labfs mount is gone (daemon died?), see $DLOG"
    done
done

# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------
measured() { # a suite with results for at least one target in $OUT
    local T
    for T in $TARGETS; do [ -f "$OUT/$T/$1.results" ] && return 0; done
    return 1
}
{
    if [ "$REPORT" = 1 ]; then
        echo "results in $OUT (each row names the commit it was measured on), kernel $(uname -r)"
    else
        echo "labfs binary $LABFS ($("$LABFS" --version 2>/dev/null | head -1)), commit $commit, backing $BACKING, kernel $(uname -r)"
    fi
    loads=$(cat "$OUT"/*/*.health 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' ')
    [ -n "$loads" ] && echo "load generator: ${loads% }; load average (1 min) at each suite's start..end in DIR/<target>/<suite>.health"

    echo
    printf '| suite |'; for T in $TARGETS; do printf ' %s |' "$T"; done; echo ' measured on |'
    printf '| --- |'; for T in $TARGETS; do printf ' --- |'; done; echo ' --- |'
    for S in $ONLY; do
        measured "$S" || continue
        printf '| %s |' "$S"
        for T in $TARGETS; do
            R="$OUT/$T/$S.results"
            [ -f "$R" ] || { printf ' not run |'; continue; }
            # An expected failure (TAP "# TODO") counts as passed, as prove counts it.
            p=$(grep -cE '^(PASS|XFAIL)' "$R"); f=$(grep -c '^FAIL' "$R"); s=$(grep -c '^SKIP' "$R")
            printf ' %s/%s pass%s |' "$p" "$((p + f))" "$([ "$s" = 0 ] || echo ", $s skip")"
        done
        # The commit(s) the row's results were measured on (a row may mix runs).
        printf ' %s |\n' "$(for T in $TARGETS; do cat "$OUT/$T/$S.commit" 2>/dev/null || echo '?'; done | sort -u | tr '\n' ' ' | sed 's/ $//')"
    done
    echo
    for T in $TARGETS; do
        for S in $ONLY; do
            [ -f "$OUT/$T/$S.results" ] || continue
            # Failures the reference does not have.
            if [ "$T" != ext4 ] && [ -f "$OUT/ext4/$S.results" ]; then
                grep '^FAIL' "$OUT/$T/$S.results" | awk '{print $2}' | sort >"$W/f.t"
                grep '^FAIL' "$OUT/ext4/$S.results" | awk '{print $2}' | sort >"$W/f.e"
                comm -23 "$W/f.t" "$W/f.e" >"$W/f.x"
                # Split into the documented exceptions (tests/conformance/exceptions) and the rest.
                awk -v s="$S" '$1 == s { print $2 }' "$here/exceptions" 2>/dev/null | sort >"$W/f.d"
                doc=$(comm -12 "$W/f.x" "$W/f.d" | tr '\n' ' ')
                extra=$(comm -23 "$W/f.x" "$W/f.d" | tr '\n' ' ')
                [ -n "$extra" ] && echo "- $T $S, failing here but not on ext4, NOT documented: $extra"
                [ -n "$doc" ] && echo "- $T $S, failing here but not on ext4, documented exceptions (docs/semantics.md): $doc"
                # Tests ext4 runs and this target skips.
                grep '^SKIP' "$OUT/$T/$S.results" | awk '{print $2}' | sort >"$W/s.t"
                grep '^SKIP' "$OUT/ext4/$S.results" | awk '{print $2}' | sort >"$W/s.e"
                comm -23 "$W/s.t" "$W/s.e" >"$W/s.x"
                doc=$(comm -12 "$W/s.x" "$W/f.d" | tr '\n' ' ')
                extra=$(comm -23 "$W/s.x" "$W/f.d" | tr '\n' ' ')
                [ -n "$extra" ] && echo "- $T $S, skipped here but not on ext4, NOT documented: $extra"
                [ -n "$doc" ] && echo "- $T $S, skipped here but not on ext4, documented exceptions: $doc"
            elif [ "$T" = ext4 ]; then
                fails=$(grep '^FAIL' "$OUT/$T/$S.results" | awk '{print $2}' | tr '\n' ' ')
                [ -n "$fails" ] && echo "- ext4 $S failures (the suite's own on this kernel): $fails"
            fi
            # A request timed out on a healthy backend: a watchdog that misfired.
            h="$OUT/$T/$S.health"
            if [ -f "$h" ] && grep -qE '(timeouts|requests|ETIMEDOUT)=[1-9]' "$h"; then
                echo "- $T $S: requests answered ETIMEDOUT or refused during the suite: $(cat "$h")"
            fi
        done
    done
} >"$OUT/table.md"
cat "$OUT/table.md"
echo "run.sh: results in $OUT" >&2
