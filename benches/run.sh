#!/usr/bin/env bash
# labfs benchmark suite: one command, one ratio table, the peers in the same run.
#
#   sudo bash benches/run.sh [--quick] [--reps N] [--labfs BIN] [--out DIR] [--keep]
#                            [--libfuse DIR | --passthrough-hp BIN] [--no-mergerfs]
#                            [--only LIST] [--max-load L] [--quiet-wait SECS] [--tree]
#                            [--labfs-transport auto|uring|devfuse]
#
# Builds labfs (release) unless --labfs BIN is given, compiles the driver
# benches/meta.rs with rustc, puts the local backend and the Atlas stand-in on two
# fresh ext4 images behind direct-io loop devices, mounts labfs over them with the
# default [cache] settings (and a second labfs with --atlas-passthrough for the I/O
# rows), the peers over their own directories of the local image, then measures,
# interleaved and repeated, each workload on:
#   native-local     LOCAL/lab/cache/...   the local backend's own directory
#   labfs-local      MNT/cache/...         an ephemeral (local-placed) labfs directory
#   mergerfs         MFS/...               mergerfs 2.33, recommended set with cache.files=partial
#   mergerfs-off     MFSOFF/...            mergerfs, recommended set with cache.files=off
#   passthrough_hp   PHP/...               libfuse's example/passthrough_hp (kernel passthrough)
#   passthrough_hp-uring                   the same with -o io_uring (FUSE over io_uring), when
#                                          /sys/module/fuse/parameters/enable_uring exists
#   native-atlas     ATLAS/lab/data/...    the Atlas stand-in's own directory
#   labfs-atlas      MNT/data/...          an authoritative (Atlas-placed) labfs directory
#   labfs-atlas-pt   MNTPT/data/...        the same through --atlas-passthrough (I/O rows only)
# and prints the table of medians and ratios (benches/meta.rs `report`), each row with
# the 1-minute load average of its samples; a row whose samples ran on a busy machine
# (median load above --max-load) gets no verdict. Results, the daemon logs and the raw
# samples go to --out (default /var/tmp/labfs-bench-results/DATE).
#
# --libfuse DIR: a libfuse source folder (3.16 or later); passthrough_hp is built in
#   DIR/build-labfs-bench with meson and ninja (under nice) unless already built there.
#   --passthrough-hp BIN gives the binary instead. Without either there is no such column.
# --quick: small sizes, one repetition (a smoke run, a few minutes once built).
# --only LIST: comma-separated subset of io,meta,src,promote,par,mem
#   (default io,meta,src,promote).
# --max-load L (default 3.0): load above which a sample counts as taken on a busy machine.
# --quiet-wait SECS (default 90): before each sample, wait up to SECS for the 1-minute
#   load to fall to --max-load (measure in the quiet moments of a shared machine).
# --tree: also the 100-directory tree layout of the metadata rows.
# --labfs-transport T (default devfuse): the FUSE transport of the labfs mounts
#   (LABFS_FUSE_TRANSPORT; uring sets the fuse module's enable_uring to Y for the run
#   and restores it). The labfs columns are then that transport's; run it once per
#   transport, alternating, for an A/B. The requests each transport answered (from
#   `labfs status`) go to OUT/transport.txt, as proof of which ran.
# Everything it mounts or attaches is undone on exit, also on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
REPS=""
LABFS_BIN=""
OUT=""
KEEP=0
USE_MERGERFS=1
ONLY="io,meta,src,promote"
LIBFUSE_SRC=""
PHP_BIN=""
MAX_LOAD=3.0
QUIET_WAIT=90
TREE=0
LABFS_TRANSPORT=devfuse

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --reps) REPS=$2; shift ;;
        --labfs) LABFS_BIN=$(realpath "$2"); shift ;;
        --out) OUT=$2; shift ;;
        --keep) KEEP=1 ;;
        --no-mergerfs) USE_MERGERFS=0 ;;
        --only) ONLY=$2; shift ;;
        --libfuse) LIBFUSE_SRC=$(realpath "$2"); shift ;;
        --passthrough-hp) PHP_BIN=$(realpath "$2"); shift ;;
        --max-load) MAX_LOAD=$2; shift ;;
        --quiet-wait) QUIET_WAIT=$2; shift ;;
        --tree) TREE=1 ;;
        --labfs-transport) LABFS_TRANSPORT=$2; shift ;;
        -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "run.sh: must run as root (loop devices, mounts, drop_caches): sudo bash $0" >&2
    exit 1
fi

# sudo's secure_path usually lacks ~/.cargo/bin.
for h in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
    [ -d "$h/.cargo/bin" ] && PATH="$PATH:$h/.cargo/bin"
done
export PATH

if [ "$QUICK" = 1 ]; then
    REPS=${REPS:-1}
    IO_MIB=64; IO_LABEL="64 MiB"; RAND_SECS=1
    META_N=1000; TREE_DIRS=20; READDIR_REPS=3
    SRC_FILES=500; GIT_STATUS_REPS=1; PROMOTE_MIB=64
    PAR_N=200; PAR_THREADS="2 4"
    MEM_D=50; MEM_F=200
    LOCAL_GB=4; ATLAS_GB=4
else
    REPS=${REPS:-5}
    IO_MIB=1024; IO_LABEL="1 GiB"; RAND_SECS=3
    META_N=5000; TREE_DIRS=100; READDIR_REPS=5
    SRC_FILES=4000; GIT_STATUS_REPS=3; PROMOTE_MIB=512
    PAR_N=2000; PAR_THREADS="2 4 8"
    MEM_D=1000; MEM_F=1000
    LOCAL_GB=16; ATLAS_GB=12
fi
MEM_TOTAL=$((MEM_D * MEM_F))

want() { [[ ",$ONLY," == *",$1,"* ]]; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$OUT/run.log" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }
above() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }
# Before a sample: wait (up to --quiet-wait seconds) for the machine to be quiet.
QUIET_GAVE_UP=0
quiet() {
    local waited=0
    while above "$(load1)" "$MAX_LOAD" && [ "$waited" -lt "$QUIET_WAIT" ]; do
        sleep 2
        waited=$((waited + 2))
    done
    if [ "$waited" -gt 0 ]; then
        if above "$(load1)" "$MAX_LOAD"; then
            QUIET_GAVE_UP=$((QUIET_GAVE_UP + 1))
            log "  (load still $(load1) after waiting ${waited} s: measuring anyway, the row will say so)"
        else
            log "  (waited ${waited} s for load $(load1) <= $MAX_LOAD)"
        fi
    fi
}
die() { log "FATAL: $*"; exit 1; }

OUT=${OUT:-/var/tmp/labfs-bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
TSV=$OUT/results.tsv
: >"$TSV"
: >"$OUT/run.log"
WORK=$(mktemp -d /var/tmp/labfs-bench.XXXXXX)

# ---- cleanup: everything below registers what it sets up ----
MOUNTS=()   # unmounted in reverse order
LOOPS=()
PIDS=()     # daemons we started (waited for after their unmount)

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        local m=${MOUNTS[i]}
        if mountpoint -q "$m" 2>/dev/null; then
            umount "$m" 2>/dev/null || { sleep 1; umount "$m" 2>/dev/null; } || umount -l "$m"
        fi
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null && sleep 1
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    [ -n "${URING_SAVED:-}" ] && echo "$URING_SAVED" >"$URING_PARAM"
    if [ "$KEEP" = 1 ]; then
        echo "run.sh: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    [ "$rc" -ne 0 ] && echo "run.sh: failed (exit $rc); log: $OUT/run.log" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- tools ----
for t in losetup mkfs.ext4 mount umount mountpoint rustc awk tar; do
    command -v "$t" >/dev/null || die "$t is required"
done
HAVE_FIO=0; command -v fio >/dev/null && HAVE_FIO=1
HAVE_MERGERFS=0; [ "$USE_MERGERFS" = 1 ] && command -v mergerfs >/dev/null && HAVE_MERGERFS=1
HAVE_GIT=0; command -v git >/dev/null && HAVE_GIT=1
HAVE_PY=0; command -v python3 >/dev/null && HAVE_PY=1
[ "$HAVE_FIO" = 1 ] || log "fio not installed (apt-get install -y fio): 4K random I/O uses benches/meta.rs"
[ "$HAVE_MERGERFS" = 1 ] || log "mergerfs not installed or disabled (apt-get install -y mergerfs): no mergerfs column"

# ---- build ----
LABFS_GIVEN=1
if [ -z "$LABFS_BIN" ]; then
    LABFS_GIVEN=0
    log "building labfs (cargo build --release) in $REPO"
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        (cd "$REPO" && sudo -u "$SUDO_USER" env PATH="$PATH" cargo build --release --bin labfs) >>"$OUT/build.log" 2>&1 \
            || die "cargo build failed: $OUT/build.log"
    else
        (cd "$REPO" && cargo build --release --bin labfs) >>"$OUT/build.log" 2>&1 || die "cargo build failed: $OUT/build.log"
    fi
    LABFS_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/labfs
fi
[ -x "$LABFS_BIN" ] || die "no labfs binary at $LABFS_BIN"
if [ -z "$PHP_BIN" ] && [ -n "$LIBFUSE_SRC" ]; then
    [ -f "$LIBFUSE_SRC/example/passthrough_hp.cc" ] || die "--libfuse $LIBFUSE_SRC: no example/passthrough_hp.cc there"
    PHP_BIN=$LIBFUSE_SRC/build-labfs-bench/example/passthrough_hp
    if [ ! -x "$PHP_BIN" ]; then
        for t in meson ninja; do command -v "$t" >/dev/null || die "$t is required to build passthrough_hp (apt-get install -y meson ninja-build)"; done
        log "building passthrough_hp in $LIBFUSE_SRC/build-labfs-bench (meson, ninja, nice)"
        (cd "$LIBFUSE_SRC" && nice -n 10 meson setup build-labfs-bench -Dexamples=true -Dtests=false -Dutils=false \
            && nice -n 10 ninja -C build-labfs-bench example/passthrough_hp) >>"$OUT/build.log" 2>&1 \
            || die "building passthrough_hp failed: $OUT/build.log"
    fi
fi
[ -z "$PHP_BIN" ] || [ -x "$PHP_BIN" ] || die "no passthrough_hp binary at $PHP_BIN"
[ -n "$PHP_BIN" ] || log "no --libfuse DIR or --passthrough-hp BIN: no passthrough_hp column"
META=$WORK/meta
rustc -C opt-level=3 --edition 2021 "$REPO/benches/meta.rs" -o "$META" 2>>"$OUT/build.log" \
    || die "rustc benches/meta.rs failed: $OUT/build.log"

# ---- machine ----
{
    echo "date: $(date -Is)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "kernel: $(uname -r)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    # The tree moves while the suite runs: name what was built, or say that the binary
    # was given and the repository's HEAD need not be its commit.
    if [ "$LABFS_GIVEN" = 1 ]; then
        echo "labfs: $LABFS_BIN (given with --labfs; $REPO is at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), not necessarily this binary's commit)"
    else
        echo "labfs: $LABFS_BIN (built from $REPO at $(git -C "$REPO" describe --always --dirty --abbrev=7 2>/dev/null || echo '?'))"
    fi
    echo "mode: $([ "$QUICK" = 1 ] && echo quick || echo full), reps $REPS"
    echo "fio: $([ "$HAVE_FIO" = 1 ] && fio --version || echo none); mergerfs: $([ "$HAVE_MERGERFS" = 1 ] && mergerfs --version 2>&1 | head -1 || echo none)"
    echo "passthrough_hp: ${PHP_BIN:-none}$([ -n "$LIBFUSE_SRC" ] && echo " (libfuse $(sed -n "s/^ *version: '\(.*\)',/\1/p" "$LIBFUSE_SRC/meson.build" | head -1))")"
    echo "max load for a verdict: $MAX_LOAD (1-minute average, $(nproc) CPUs)"
    echo "load at start: $(cat /proc/loadavg)"
} | tee "$OUT/machine.txt" >&2

# ---- helpers ----
is_mounted() { # MOUNTPOINT FSTYPE
    awk -v mp="$1" -v ty="$2" '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($5 == mp && $(i + 1) == ty) f = 1; break } }
        END { exit !f }' /proc/self/mountinfo
}

drop() { # 3: page cache + dentries/inodes; 2: dentries/inodes only (FUSE sends FORGET)
    sync
    echo "$1" >/proc/sys/vm/drop_caches
}

# WORKLOAD TARGET VALUE UNIT [LOAD]: the 1-minute load when the sample started.
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$TSV"; }

declare -A DPID=()   # target -> the labfs daemon serving it
cpu_ticks() { # TARGET: utime+stime (clock ticks) of the daemon serving it, if any
    local p=${DPID[$1]:-}
    if [ -n "$p" ]; then awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0; else echo 0; fi
}
TICK_MS=$((1000 / $(getconf CLK_TCK)))

failed() { # WORKLOAD TARGET CMD...
    local w=$1 t=$2
    shift 2
    log "FAILED: $w [$t]: $*"
    echo "$w [$t]: $*" >>"$OUT/failures.txt"
}

done_one() { # WORKLOAD TARGET VALUE UNIT CPU0 LOAD0
    local c1
    c1=$(cpu_ticks "$2")
    record "$1" "$2" "$3" "$4" "$6"
    if [ -n "${DPID[$2]:-}" ]; then
        log "  $1 [$2]: $3 $4 (daemon cpu $(((c1 - $5) * TICK_MS)) ms; load $6 -> $(load1))"
    else
        log "  $1 [$2]: $3 $4 (load $6 -> $(load1))"
    fi
}

# measure WORKLOAD TARGET CMD...: CMD prints "VALUE UNIT" (benches/meta.rs).
measure() {
    local w=$1 t=$2 out c0 l0
    shift 2
    quiet
    l0=$(load1)
    c0=$(cpu_ticks "$t")
    if ! out=$("$@" 2>>"$OUT/run.log"); then
        failed "$w" "$t" "$@"
        return 0
    fi
    done_one "$w" "$t" "${out% *}" "${out#* }" "$c0" "$l0"
}

# timeit WORKLOAD TARGET CMD...: wall seconds of CMD (a command or a shell function).
timeit() {
    local w=$1 t=$2 t0 t1 c0 l0
    shift 2
    quiet
    l0=$(load1)
    c0=$(cpu_ticks "$t")
    t0=$EPOCHREALTIME
    if ! "$@" >/dev/null 2>>"$OUT/run.log"; then
        failed "$w" "$t" "$@"
        return 0
    fi
    t1=$EPOCHREALTIME
    done_one "$w" "$t" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')" s "$c0" "$l0"
}

# ---- backends on their own ext4 images (direct-io loops) ----
mkimage() { # NAME GB -> mounts $WORK/NAME
    local img=$WORK/$1.img dev
    truncate -s "$2G" "$img"
    dev=$(losetup --find --show --direct-io=on "$img")
    LOOPS+=("$dev")
    mkfs.ext4 -q -F -i 8192 -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$dev"
    mkdir -p "$WORK/$1"
    mount -t ext4 "$dev" "$WORK/$1"
    MOUNTS+=("$WORK/$1")
    log "$1: $dev ($(losetup -n -l -O DIO "$dev" | tr -d ' ' | sed 's/1/direct-io/;s/0/buffered/')) on $WORK/$1"
}
log "creating the backend images"
mkimage local "$LOCAL_GB"
mkimage atlas "$ATLAS_GB"
L=$WORK/local
A=$WORK/atlas
mkdir -p "$L/lab/cache" "$A/lab/data"
# A RAM disk for inputs (the tarball), so reading them costs the same for every target.
mkdir -p "$WORK/ram"
mount -t tmpfs -o size=2g tmpfs "$WORK/ram"
MOUNTS+=("$WORK/ram")

CFG=$WORK/labfs.toml
cat >"$CFG" <<EOF
[storage]
atlas = "$A/lab"
local = "$L/lab"
[[rule]]
path = "/cache"
class = "ephemeral"
[[rule]]
path = "/scans/*/work"
class = "transitional"
EOF

mount_labfs() { # CONFIG MNT LOGNAME EXTRA-ARGS... ; sets MOUNTED_PID
    local cfg=$1 mnt=$2 logf=$OUT/$3
    shift 3
    mkdir -p "$mnt"
    RUST_LOG=${LABFS_LOG:-labfs=info} LABFS_FUSE_TRANSPORT=$LABFS_TRANSPORT "$LABFS_BIN" mount --config "$cfg" --foreground --allow-unmarked "$@" "$mnt" \
        </dev/null >>"$logf" 2>&1 &
    MOUNTED_PID=$!
    PIDS+=("$MOUNTED_PID")
    MOUNTS+=("$mnt")
    for _ in $(seq 300); do
        is_mounted "$mnt" fuse.labfs && return 0
        kill -0 "$MOUNTED_PID" 2>/dev/null || die "labfs exited before mounting $mnt: $(tail -5 "$logf")"
        sleep 0.1
    done
    die "labfs did not mount $mnt within 30 s: $(tail -5 "$logf")"
}

case "$LABFS_TRANSPORT" in
    devfuse|auto) ;;
    uring)
        URING_PARAM=/sys/module/fuse/parameters/enable_uring
        [ -w "$URING_PARAM" ] || die "--labfs-transport uring: this kernel has no $URING_PARAM"
        URING_SAVED=$(cat "$URING_PARAM")
        echo Y >"$URING_PARAM"
        ;;
    *) die "--labfs-transport must be auto, uring or devfuse" ;;
esac
MNT=$WORK/mnt
mount_labfs "$CFG" "$MNT" labfs.log
DAEMON_PID=$MOUNTED_PID
DPID[labfs-local]=$DAEMON_PID
DPID[labfs-atlas]=$DAEMON_PID
log "labfs mounted at $MNT (pid $DAEMON_PID); $(grep -m1 -o 'passthrough[^"]*' "$OUT/labfs.log" || true)"
MNTPT=""
if "$LABFS_BIN" mount --help 2>&1 | grep -q -- --atlas-passthrough; then
    MNTPT=$WORK/mnt-pt
    # One daemon per local backend: this second mount (the same Atlas, as a second
    # node would have it) gets a local directory of its own.
    mkdir -p "$L/lab-pt"
    sed "s|^local = .*|local = \"$L/lab-pt\"|" "$CFG" >"$WORK/labfs-pt.toml"
    mount_labfs "$WORK/labfs-pt.toml" "$MNTPT" labfs-atlas-passthrough.log --atlas-passthrough
    DPID[labfs-atlas-pt]=$MOUNTED_PID
fi
# The peers, each over its own directory of the local image, each in the foreground
# (so its pid is known: its CPU time is logged like labfs's).
peer_up() { # TARGET MNT FSTYPE CMD... ; registers the mount and the pid
    local t=$1 mnt=$2 ty=$3 logf=$OUT/$1.log
    shift 3
    mkdir -p "$mnt"
    "$@" </dev/null >>"$logf" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    MOUNTS+=("$mnt")
    for _ in $(seq 100); do
        is_mounted "$mnt" "$ty" && break
        kill -0 "$pid" 2>/dev/null || die "$t exited before mounting: $(tail -5 "$logf")"
        sleep 0.1
    done
    is_mounted "$mnt" "$ty" || die "$t did not mount $mnt"
    DPID[$t]=$pid
    PEERS+=("$t")
    log "$t mounted at $mnt (pid $pid): $*"
}
PEERS=()
declare -A PEER_ROOT=()
if [ "$HAVE_MERGERFS" = 1 ]; then
    # mergerfs's "basic setup" option sets (man mergerfs): with mmap (cache.files=partial)
    # and without (cache.files=off); minfreespace lowered for the small image.
    for mode in partial off; do
        t=mergerfs; [ "$mode" = off ] && t=mergerfs-off
        mkdir -p "$L/peers/$t"
        opts="allow_other,use_ino,cache.files=$mode,dropcacheonclose=true,category.create=mfs,minfreespace=16M,fsname=bench-$t"
        peer_up "$t" "$WORK/$t" fuse.mergerfs mergerfs -f -o "$opts" "$L/peers/$t" "$WORK/$t"
        PEER_ROOT[$t]=$WORK/$t/bench
    done
fi
if [ -n "$PHP_BIN" ]; then
    mkdir -p "$L/peers/passthrough_hp"
    # Its defaults: kernel passthrough for read/write where offered, long attribute and
    # entry timeouts, keep_cache, splice.
    peer_up passthrough_hp "$WORK/php" fuse "$PHP_BIN" --foreground "$L/peers/passthrough_hp" "$WORK/php"
    PEER_ROOT[passthrough_hp]=$WORK/php/bench
    # The same daemon over FUSE-over-io_uring (libfuse 3.18+, kernel CONFIG_FUSE_IO_URING):
    # what a transport labfs's fuser does not speak would buy, daemon for daemon.
    URING_PARAM=/sys/module/fuse/parameters/enable_uring
    if [ -w "$URING_PARAM" ] && "$PHP_BIN" --help 2>&1 | grep -q io_uring; then
        [ -n "${URING_SAVED:-}" ] || URING_SAVED=$(cat "$URING_PARAM")
        echo Y >"$URING_PARAM"
        mkdir -p "$L/peers/passthrough_hp-uring"
        peer_up passthrough_hp-uring "$WORK/php-uring" fuse "$PHP_BIN" --foreground -o io_uring "$L/peers/passthrough_hp-uring" "$WORK/php-uring"
        PEER_ROOT[passthrough_hp-uring]=$WORK/php-uring/bench
        grep -q io_uring < <(ls -l "/proc/${DPID[passthrough_hp-uring]}/fd" 2>/dev/null) \
            || log "passthrough_hp -o io_uring holds no io_uring: it fell back to /dev/fuse reads"
    fi
fi
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
record memory "RSS right after mount" "$(($(rss_kib "$DAEMON_PID") / 1024))" MiB

# Target name -> directory that holds its test directories.
declare -A ROOT=(
    [native-local]=$L/lab/cache/native
    [labfs-local]=$MNT/cache/labfs
    [native-atlas]=$A/lab/data/native
    [labfs-atlas]=$MNT/data/labfs
)
TARGETS=(native-local labfs-local)
for t in "${PEERS[@]}"; do ROOT[$t]=${PEER_ROOT[$t]}; TARGETS+=("$t"); done
TARGETS+=(native-atlas labfs-atlas)
IO_TARGETS=("${TARGETS[@]}")
[ -n "$MNTPT" ] && { ROOT[labfs-atlas-pt]=$MNTPT/data/labfs-pt; IO_TARGETS+=(labfs-atlas-pt); }
for t in "${IO_TARGETS[@]}"; do mkdir -p "${ROOT[$t]}"; done

# ---- workloads ----
fio_iops() { # FILE RW [extra fio args]: prints "IOPS IOPS"
    local f=$1 rw=$2 field
    shift 2
    [ "$rw" = randread ] && field=8 || field=49
    fio --name=bench --filename="$f" --rw="$rw" --bs=4k --size="${IO_MIB}M" --ioengine=psync --direct=0 \
        --time_based --runtime="$RAND_SECS" --norandommap --randrepeat=0 --invalidate=0 --minimal "$@" \
        | awk -F';' -v f="$field" '{ print $f " IOPS" }'
}

io_battery() { # TARGET DIR
    local t=$1 f=$2/io.dat
    drop 3
    measure "seq write $IO_LABEL (+fsync)" "$t" "$META" io seqwrite "$f" "$IO_MIB"
    drop 3
    measure "seq read $IO_LABEL (cold cache)" "$t" "$META" io seqread "$f"
    measure "seq read $IO_LABEL (page cache)" "$t" "$META" io seqread "$f"
    drop 3
    local -a rr=("$META" io randread "$f" "$RAND_SECS") rw=("$META" io randwrite "$f" "$RAND_SECS")
    if [ "$HAVE_FIO" = 1 ]; then
        rr=(fio_iops "$f" randread)
        rw=(fio_iops "$f" randwrite --end_fsync=1)
    fi
    # Informational: with a cold cache this is the device plus readahead policy.
    measure "4k rand read (cold start, ${RAND_SECS}s)" "$t" "${rr[@]}"
    cat "$f" >/dev/null
    measure "4k rand read (file in page cache)" "$t" "${rr[@]}"
    measure "4k rand write (${RAND_SECS}s +fsync)" "$t" "${rw[@]}"
    [ "$HAVE_FIO" = 1 ] && measure "4k rand write, 4 jobs (${RAND_SECS}s +fsync)" "$t" fio_iops "$f" randwrite --end_fsync=1 --numjobs=4 --group_reporting
    rm -f "$f"
}

meta_battery() { # TARGET ROOT REP
    local t=$1 root=$2 rep=$3 layout d
    local -a dirs
    local layouts=flat
    [ "$TREE" = 1 ] && layouts="flat tree"
    for layout in $layouts; do
        if [ "$layout" = flat ]; then dirs=(); else dirs=(--dirs "$TREE_DIRS"); fi
        local lab="$layout"
        [ "$layout" = tree ] && lab="tree of $TREE_DIRS dirs"
        d=$root/m-$layout-$rep
        mkdir -p "$d"
        measure "create $META_N files ($lab)" "$t" "$META" create "$d" "$META_N" "${dirs[@]}"
        # The first listing of the directory just filled (no cache holds it yet).
        measure "readdir first after create ($lab)" "$t" "$META" readdir "$d"
        # The first stat after a write refreshes attributes the write invalidated;
        # the second is served from what the kernel already holds.
        measure "stat after create ($lab)" "$t" "$META" stat "$d" "$META_N" "${dirs[@]}"
        measure "stat warm ($lab)" "$t" "$META" stat "$d" "$META_N" "${dirs[@]}"
        "$META" readdir "$d" >/dev/null 2>&1 || true
        measure "readdir warm ($lab)" "$t" "$META" readdir "$d" --reps "$READDIR_REPS"
        drop 2
        measure "stat cold ($lab)" "$t" "$META" stat "$d" "$META_N" "${dirs[@]}"
        drop 2
        measure "readdir cold ($lab)" "$t" "$META" readdir "$d"
        drop 2
        measure "ls -l cold: readdir+stat ($lab)" "$t" "$META" lsl "$d"
        measure "unlink $META_N files ($lab)" "$t" "$META" unlink "$d" "$META_N" "${dirs[@]}"
        rmdir "$d" 2>/dev/null || rm -rf "$d"
    done
    d=$root/loop-$rep
    mkdir -p "$d"
    measure "$META_N-file loop: create+stat+readdir+unlink" "$t" "$META" loop "$d" "$META_N"
    rm -rf "$d"
    if [ "$HAVE_PY" = 1 ]; then
        mkdir -p "$d"
        measure "$META_N-file loop, Python" "$t" python3 "$REPO/benches/loop.py" "$d" "$META_N"
        rm -rf "$d"
    fi
}

TAR=$WORK/ram/src.tar
make_tarball() {
    local reg="" h list n=0 c
    for h in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
        for c in "$h"/.cargo/registry/src/*/; do [ -d "$c" ] && reg=${c%/} && break 2; done
    done
    list=$WORK/src.list
    : >"$list"
    if [ -n "$reg" ]; then
        for c in $(ls "$reg" | LC_ALL=C sort); do
            [ "$n" -ge "$SRC_FILES" ] && break
            echo "$c" >>"$list"
            n=$((n + $(find "$reg/$c" -type f | wc -l)))
        done
        tar cf "$TAR" -C "$reg" -T "$list"
        SRC_DESC="$n files from $(wc -l <"$list") crates of ~/.cargo/registry/src"
    else
        reg=/usr/share
        find "$reg/doc" -type f | head -n "$SRC_FILES" | sed "s|^$reg/||" >"$list"
        tar cf "$TAR" -C "$reg" -T "$list"
        SRC_DESC="$(wc -l <"$list") files of /usr/share/doc"
    fi
    log "source tree: $SRC_DESC, $(du -h "$TAR" | cut -f1) tarball"
}

git_import() { gitq "$1" add -A && gitq "$1" commit -q -m import; }
gitq() { git -c user.name=bench -c user.email=bench@localhost -c gc.auto=0 -c safe.directory='*' -C "$@"; }

src_battery() { # TARGET ROOT REP
    local t=$1 root=$2 rep=$3 d i
    d=$root/src-$rep
    mkdir -p "$d"
    sync
    timeit "tar x ($SRC_COUNT files)" "$t" tar xf "$TAR" -C "$d"
    if [ "$HAVE_GIT" = 1 ]; then
        gitq "$d" init -q
        timeit "git add -A + commit" "$t" git_import "$d"
        gitq "$d" status --porcelain >/dev/null
        for ((i = 0; i < GIT_STATUS_REPS; i++)); do
            timeit "git status (warm)" "$t" gitq "$d" status --porcelain
        done
        drop 2
        timeit "git status (cold dentries)" "$t" gitq "$d" status --porcelain
        timeit "git clone --local" "$t" gitq "$root" clone -q --local "$d" "$d.clone"
        rm -rf "$d.clone"
    fi
    timeit "rm -rf source tree" "$t" rm -rf "$d"
}

par_battery() { # TARGET ROOT REP
    local t=$1 root=$2 rep=$3 n d
    for n in $PAR_THREADS; do
        d=$root/par-$n-$rep
        mkdir -p "$d"
        measure "parallel $n threads: create+stat+unlink $PAR_N each" "$t" "$META" parallel "$d" "$n" "$PAR_N"
        rm -rf "$d"
    done
}

# Promote against cp -a + sync of the same tree to the same Atlas filesystem. Rows:
# native-atlas = cp -a + sync, labfs-atlas = labfs promote (copy with the blake3
# digest, every range read back from Atlas with O_DIRECT, one syncfs, rename, local
# removal), both MiB/s of the tree's bytes. The daemon log (labfs.log) has each
# job's phase times ("planned in ..., staged in ...").
make_promote_tree() { # DIR MIB: half the bytes in 4 big files, the rest in 4 MiB, 128 KiB, 16 KiB files
    python3 - "$1" "$2" <<'PY'
import os, sys
root, mib = sys.argv[1], int(sys.argv[2])
total = mib << 20
blob = os.urandom(8 << 20)
def write(path, size):
    with open(path, "wb") as f:
        off = 0
        while off < size:
            n = min(size - off, len(blob))
            start = (off * 7919) % (len(blob) - n + 1)
            f.write(blob[start:start + n])
            off += n
plan = [(4, total // 8), (total // 4 // (4 << 20), 4 << 20),
        (total // 8 // (128 << 10), 128 << 10), (total // 8 // (16 << 10), 16 << 10)]
i = 0
for count, size in plan:
    for _ in range(max(1, count)):
        d = os.path.join(root, "d%02d" % (i % 16), "e%02d" % ((i // 16) % 8))
        os.makedirs(d, exist_ok=True)
        write(os.path.join(d, "f%06d" % i), size)
        i += 1
PY
}
cp_sync() { cp -a "$1" "$2" && sync -f "$2"; }
promote_battery() { # REP
    # The tree is written through the mount, as the scan pipeline writes it (transitional:
    # stored on the local backend); cp -a reads the same files from the backend directly.
    local rep=$1 tree=$L/lab/scans/bench/work/tree$1 bytes mib
    mkdir -p "$MNT/scans/bench/work/tree$rep"
    make_promote_tree "$MNT/scans/bench/work/tree$rep" "$PROMOTE_MIB"
    [ -d "$tree" ] || die "the transitional tree is not on the local backend ($tree)"
    bytes=$(du -sb --apparent-size "$tree" | cut -f1)
    mib=$(awk -v b="$bytes" 'BEGIN { printf "%.3f", b / 1048576 }')
    sync
    rate_of() { awk -v m="$mib" -v a="$1" -v b="$2" 'BEGIN { printf "%.3f MiB/s", m / (b - a) }'; }
    local t0 t1 l0
    quiet; l0=$(load1); t0=$EPOCHREALTIME
    if cp_sync "$tree" "$A/lab/cp-copy"; then
        t1=$EPOCHREALTIME
        done_one "promote $PROMOTE_MIB MiB tree (native: cp -a + sync)" native-atlas "$(rate_of "$t0" "$t1" | cut -d' ' -f1)" MiB/s 0 "$l0"
    else
        failed promote native-atlas cp -a
    fi
    rm -rf "$A/lab/cp-copy"
    sync -f "$A/lab"
    local c0
    quiet; l0=$(load1); c0=$(cpu_ticks labfs-atlas); t0=$EPOCHREALTIME
    if "$LABFS_BIN" promote "$MNT/scans/bench/work/tree$rep" >>"$OUT/promote.log" 2>&1; then
        t1=$EPOCHREALTIME
        done_one "promote $PROMOTE_MIB MiB tree (native: cp -a + sync)" labfs-atlas "$(rate_of "$t0" "$t1" | cut -d' ' -f1)" MiB/s "$c0" "$l0"
    else
        failed promote labfs-atlas "$LABFS_BIN" promote
    fi
    [ -e "$tree" ] && log "  promote left the local copy of tree$rep in place"
    rm -rf "$tree" "$A/lab/scans/bench/work/tree$rep"
    sync -f "$A/lab"
}

HOME_SAVE=${HOME:-/root}
export HOME=$WORK   # git: no user config, no global hooks
export GIT_CONFIG_NOSYSTEM=1

SRC_COUNT=0
if want src; then
    make_tarball
    SRC_COUNT=$(tar tf "$TAR" | grep -vc '/$')
fi

for ((rep = 1; rep <= REPS; rep++)); do
    log "=== repetition $rep of $REPS"
    if want io; then
        for t in "${IO_TARGETS[@]}"; do io_battery "$t" "${ROOT[$t]}"; done
    fi
    if want meta; then
        for t in "${TARGETS[@]}"; do meta_battery "$t" "${ROOT[$t]}" "$rep"; done
    fi
    if want src; then
        for t in "${TARGETS[@]}"; do src_battery "$t" "${ROOT[$t]}" "$rep"; done
    fi
    if want par; then
        for t in "${TARGETS[@]}"; do par_battery "$t" "${ROOT[$t]}" "$rep"; done
    fi
    if want promote; then
        promote_battery "$rep"
    fi
done
export HOME=$HOME_SAVE

status_inodes() { "$LABFS_BIN" status --json "$MNT" 2>/dev/null | awk -F'[:,]' '/"inodes"/ { gsub(/ /, "", $2); print $2 }'; }

if want mem; then
    log "=== memory: $MEM_TOTAL files looked up through labfs"
    mem=$L/lab/cache/mil
    log "  populating $mem natively: $("$META" populate "$mem" "$MEM_D" "$MEM_F" --threads 2)"
    drop 2
    before=$(rss_kib "$DAEMON_PID")
    inodes0=$(status_inodes)
    measure "walk $MEM_TOTAL files: readdir+lstat (cold)" native-local "$META" walk "$mem"
    # Sample the table and RSS while the walk runs: the kernel may reclaim inodes (and
    # send FORGET) before the walk ends if anything on the machine needs memory.
    (
        while :; do
            echo "$(status_inodes) $(rss_kib "$DAEMON_PID")"
            sleep 0.5
        done
    ) >"$OUT/mem-samples.txt" 2>/dev/null &
    sampler=$!
    measure "walk $MEM_TOTAL files: readdir+lstat (cold)" labfs-local "$META" walk "$MNT/cache/mil"
    echo "$(status_inodes) $(rss_kib "$DAEMON_PID")" >>"$OUT/mem-samples.txt"
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null || true
    read -r inodes1 peak < <(sort -n -k1,1 "$OUT/mem-samples.txt" | tail -1)
    peak_rss=$(sort -n -k2,2 "$OUT/mem-samples.txt" | tail -1 | cut -d' ' -f2)
    t0=$EPOCHREALTIME
    drop 2
    # FORGETs arrive asynchronously: wait until the table stops shrinking.
    last=-1
    for _ in $(seq 120); do
        sleep 1
        cur=$(status_inodes)
        [ "$cur" = "$last" ] && break
        last=$cur
    done
    after=$(rss_kib "$DAEMON_PID")
    inodes2=$(status_inodes)
    record memory "RSS before the walk" "$((before / 1024))" "MiB (inodes in table: $inodes0)"
    record memory "RSS at the largest table during the walk" "$((peak / 1024))" "MiB (inodes in table: $inodes1 of $MEM_TOTAL)"
    record memory "RSS high-water mark during the walk" "$((peak_rss / 1024))" MiB
    [ "${inodes1:-0}" -gt 1 ] && record memory "RSS per remembered inode (at the largest table)" \
        "$(((peak - before) * 1024 / inodes1))" "bytes"
    record memory "RSS after drop_caches (kernel FORGET)" "$((after / 1024))" \
        "MiB (inodes in table: $inodes2, settled after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s)"
    log "  RSS KiB: before $before, peak $peak, after forget $after; inodes $inodes0 -> $inodes1 -> $inodes2"
fi

echo "load at end: $(cat /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2
# Which FUSE transport each labfs mount served over, and the requests over each.
for m in "$MNT" ${MNTPT:+"$MNTPT"}; do
    "$LABFS_BIN" status "$m" 2>/dev/null | grep -m1 '^FUSE transport' | sed "s|^|$m: |"
done | tee "$OUT/transport.txt" >&2 || true
if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    log "labfs daemon died during the run: see $OUT/labfs.log"
fi
grep -E ' (ERROR|WARN) ' "$OUT"/labfs*.log | grep -v -- '--allow-unmarked' | head -20 | sed 's/^/  daemon: /' >&2 || true

"$META" report "$TSV" --max-load "$MAX_LOAD" | tee "$OUT/report.md"
if [ -s "$OUT/failures.txt" ]; then
    echo
    echo "FAILED measurements ($(wc -l <"$OUT/failures.txt")): see $OUT/failures.txt and $OUT/run.log"
fi
echo
echo "results: $OUT (report.md, results.tsv, run.log, labfs.log, machine.txt)"
