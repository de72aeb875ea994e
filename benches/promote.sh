#!/usr/bin/env bash
# labfs promote benchmark: promotes a tree of mixed file sizes (1 GiB by default) under
# a transitional path of a real labfs mount and, in the same run and on the same
# filesystems, times `cp -a` + `sync` of the same tree to the same Atlas filesystem.
# Prints both throughputs and their ratio (labfs promote / cp -a + sync).
#
#   sudo bash benches/promote.sh [--labfs BIN]... [--size-mib N] [--reps N]
#                                [--atlas-fs ext4|tmpfs] [--local-fs tmpfs|ext4]
#                                [--strace] [--keep]
#
# Atlas is a separate filesystem: by default a fresh ext4 image on a direct-io loop
# device (writes and fsyncs reach the backing disk); --atlas-fs tmpfs for a RAM-only
# run. The local backend is a tmpfs by default (the source tree is in RAM, so the
# timings are the copy to Atlas, not reading the source); --local-fs ext4 puts it on a
# second direct-io loop image, as benches/run.sh does. Each repetition builds a fresh
# tree, times `cp -a TREE ATLAS/... && sync -f ATLAS` (then deletes that copy), then
# for each binary (--labfs, repeatable: an interleaved A/B) mounts it, builds the same
# tree again and times `labfs promote MNT/.../TREE` (copy + blake3 + O_DIRECT
# read-back + syncfs + rename + local removal), with the daemon's CPU time, the job's
# phases from the daemon log and the 1-minute load at the start. --strace also counts
# the daemon's system calls during the promotion (strace -c -f: slower, so its times
# are not comparable; the counts per file are). Everything it mounts is undone on
# exit, also on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BINS=()
SIZE_MIB=1024
REPS=3
ATLAS_FS=ext4
KEEP=0
LOCAL_FS=tmpfs
STRACE=0

while [ $# -gt 0 ]; do
    case "$1" in
        --labfs) BINS+=("$(realpath "$2")"); shift ;;
        --local-fs) LOCAL_FS=$2; shift ;;
        --strace) STRACE=1 ;;
        --size-mib) SIZE_MIB=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --atlas-fs) ATLAS_FS=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "benches/promote.sh must run as root (it mounts tmpfs, ext4 and FUSE)" >&2
    exit 2
fi
for t in python3 mkfs.ext4 losetup; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 2; }
done
if [ "${#BINS[@]}" -eq 0 ]; then
    (cd "$REPO" && cargo build --release --quiet)
    BINS=("$REPO/target/release/labfs")
fi
[ "$STRACE" -eq 0 ] || command -v strace >/dev/null || { echo "missing tool: strace" >&2; exit 2; }

W=$(mktemp -d /var/tmp/labfs-promote-bench.XXXXXX)
LOOPS=()
DPID=""
cleanup() {
    set +e
    if mountpoint -q "$W/mnt"; then umount "$W/mnt" || umount -l "$W/mnt"; fi
    [ -n "$DPID" ] && wait "$DPID" 2>/dev/null
    for m in "$W/atlas" "$W/local"; do
        if mountpoint -q "$m"; then umount "$m" || umount -l "$m"; fi
    done
    for l in "${LOOPS[@]}"; do losetup -d "$l"; done
    if [ "$KEEP" -eq 1 ]; then
        echo "kept $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT INT TERM

mkdir -p "$W/atlas" "$W/local" "$W/mnt"
ext4_image() { # NAME MIB MOUNTPOINT
    truncate -s "${2}M" "$W/$1.img"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$W/$1.img"
    local loop
    loop=$(losetup -f --show --direct-io=on "$W/$1.img")
    LOOPS+=("$loop")
    mount -t ext4 "$loop" "$3"
}
case "$LOCAL_FS" in
    tmpfs) mount -t tmpfs -o "size=$((SIZE_MIB * 2 + 256))m,mode=0755" tmpfs "$W/local" ;;
    ext4) ext4_image local "$((SIZE_MIB * 3 + 1024))" "$W/local" ;;
    *) echo "--local-fs must be tmpfs or ext4" >&2; exit 2 ;;
esac
case "$ATLAS_FS" in
    ext4)
        ext4_image atlas "$((SIZE_MIB * 3 + 1024))" "$W/atlas"
        ATLAS_DESC="ext4 on a direct-io loop device"
        ;;
    tmpfs)
        mount -t tmpfs -o "size=$((SIZE_MIB * 3 + 256))m,mode=0755" tmpfs "$W/atlas"
        ATLAS_DESC="tmpfs"
        ;;
    *) echo "--atlas-fs must be ext4 or tmpfs" >&2; exit 2 ;;
esac
mkdir -p "$W/atlas/lab" "$W/local/lab"
cat > "$W/labfs.toml" <<EOF
[storage]
atlas = "$W/atlas/lab"
local = "$W/local/lab"

[[rule]]
path = "/scans/*/work"
class = "transitional"
EOF
"${BINS[0]}" init-atlas --config "$W/labfs.toml" >/dev/null
# /scans/bench is Atlas's (only /scans/*/work is transitional).
mkdir -p "$W/atlas/lab/scans/bench"

mount_labfs() { # BIN: mounts it in the foreground (so its pid is known), sets DPID
    RUST_LOG=labfs=info "$1" mount --config "$W/labfs.toml" --foreground "$W/mnt" \
        </dev/null >>"$W/daemon.log" 2>&1 &
    DPID=$!
    for _ in $(seq 300); do
        grep -qs " $W/mnt fuse.labfs " /proc/mounts && return 0
        kill -0 "$DPID" 2>/dev/null || { echo "labfs exited: $(tail -5 "$W/daemon.log")" >&2; exit 1; }
        sleep 0.1
    done
    echo "labfs did not mount within 30 s" >&2
    exit 1
}
unmount_labfs() {
    umount "$W/mnt"
    wait "$DPID" 2>/dev/null || true
    DPID=""
}
cpu_ms() { awk -v t="$(getconf CLK_TCK)" '{ printf "%d", ($14 + $15) * 1000 / t }' "/proc/$1/stat"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# Mixed sizes: half the bytes in 4 big files, a quarter in 4 MiB files, the rest in
# 128 KiB and 16 KiB files, spread over nested directories.
make_tree() {
    python3 - "$1" "$SIZE_MIB" <<'PY'
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
print(i)
PY
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }

declare -A PR_TIMES=()
CP_TIMES=()
echo "labfs promote benchmark: ${SIZE_MIB} MiB per tree, Atlas = $ATLAS_DESC, local = $LOCAL_FS, $REPS repetition(s)"
for i in "${!BINS[@]}"; do echo "binary $i: ${BINS[$i]} ($("${BINS[$i]}" --version))"; done
printf '%-4s %-3s %8s %10s %6s %12s %10s %9s  %s\n' rep bin files bytes load "cp+sync (s)" "promote (s)" "cpu (ms)" "phases / syscalls per file"
tree_rel=lab/scans/bench/work
for rep in $(seq 1 "$REPS"); do
    tree="$W/local/$tree_rel/tree$rep"
    mkdir -p "$tree"
    files=$(make_tree "$tree")
    bytes=$(du -sb --apparent-size "$tree" | cut -f1)
    sync
    l0=$(load1)
    t0=$(now)
    cp -a "$tree" "$W/atlas/lab/cp-copy"
    sync -f "$W/atlas/lab"
    t1=$(now)
    cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
    CP_TIMES+=("$cp_s")
    printf '%-4s %-3s %8s %10s %6s %12.3f\n' "$rep" cp "$files" "$bytes" "$l0" "$cp_s"
    rm -rf "$W/atlas/lab/cp-copy" "$tree"
    sync -f "$W/atlas/lab"
    [ "$ATLAS_FS" = ext4 ] && fstrim "$W/atlas" 2>/dev/null || true
    for i in "${!BINS[@]}"; do
        mkdir -p "$tree"
        make_tree "$tree" >/dev/null
        sync
        mount_labfs "${BINS[$i]}"
        trace=""
        if [ "$STRACE" -eq 1 ]; then
            strace -c -f -q -o "$W/strace.$rep.$i" -p "$DPID" &
            trace=$!
            sleep 1 # strace attaches to every thread before the job starts
        fi
        c0=$(cpu_ms "$DPID")
        l0=$(load1)
        t0=$(now)
        "${BINS[$i]}" promote "$W/mnt/scans/bench/work/tree$rep" >/dev/null
        t1=$(now)
        c1=$(cpu_ms "$DPID")
        extra=$(grep "tree$rep: planned in" "$W/daemon.log" | tail -1 | grep -o 'planned in.*' || true)
        if [ -n "$trace" ]; then
            kill -INT "$trace"
            wait "$trace" 2>/dev/null || true
            extra="$extra; $(awk -v f="$files" '$NF == "total" { printf "%.1f calls per file", $4 / f }' "$W/strace.$rep.$i"): $(awk 'NR > 2 && $NF != "total" && $1 !~ /^-/ && NF >= 5 { print $4, $NF }' "$W/strace.$rep.$i" | sort -rn | awk -v f="$files" '{ printf "%s %.1f, ", $2, $1 / f }' | cut -c1-300)"
        fi
        unmount_labfs
        pr_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
        PR_TIMES[$i]="${PR_TIMES[$i]:-} $pr_s"
        printf '%-4s %-3s %8s %10s %6s %12s %10.3f %9s  %s\n' "$rep" "$i" "$files" "$bytes" "$l0" "" "$pr_s" "$((c1 - c0))" "$extra"
        if [ -e "$tree" ]; then echo "promotion left the local copy in place" >&2; exit 1; fi
        rm -rf "$W/atlas/$tree_rel/tree$rep"
        sync -f "$W/atlas/lab"
        [ "$ATLAS_FS" = ext4 ] && fstrim "$W/atlas" 2>/dev/null || true
    done
done
cp_med=$(printf '%s\n' "${CP_TIMES[@]}" | median)
for i in "${!BINS[@]}"; do
    # shellcheck disable=SC2086 # the list of times, split on purpose
    pr_med=$(printf '%s\n' ${PR_TIMES[$i]} | median)
    awk -v i="$i" -v cp="$cp_med" -v pr="$pr_med" -v bytes="$bytes" 'BEGIN {
        mib = bytes / 1048576
        printf "binary %s: median cp -a + sync %.3f s (%.0f MiB/s); labfs promote %.3f s (%.0f MiB/s); ratio %.2f\n", i, cp, mib / cp, pr, mib / pr, cp / pr
    }'
done
