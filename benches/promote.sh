#!/usr/bin/env bash
# labfs promote benchmark: promotes a tree of mixed file sizes (1 GiB by default) under
# a transitional path of a real labfs mount and, in the same run and on the same
# filesystems, times `cp -a` + `sync` of the same tree to the same Atlas filesystem.
# Prints both throughputs and their ratio (labfs promote / cp -a + sync).
#
#   sudo bash benches/promote.sh [--labfs BIN] [--size-mib N] [--reps N]
#                                [--atlas-fs ext4|tmpfs] [--keep]
#
# Atlas is a separate filesystem: by default a fresh ext4 image on a direct-io loop
# device (writes and fsyncs reach the backing disk); --atlas-fs tmpfs for a RAM-only
# run. The local backend is a tmpfs (the source tree is in RAM, so the timings are the
# copy to Atlas, not reading the source). Each repetition builds a fresh tree, times
# `cp -a TREE ATLAS/... && sync -f ATLAS` (then deletes that copy), then times
# `labfs promote MNT/.../TREE` (copy + blake3 + O_DIRECT read-back + syncfs + rename + local
# removal). Everything it mounts is undone on exit, also on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LABFS_BIN=""
SIZE_MIB=1024
REPS=3
ATLAS_FS=ext4
KEEP=0

while [ $# -gt 0 ]; do
    case "$1" in
        --labfs) LABFS_BIN=$(realpath "$2"); shift ;;
        --size-mib) SIZE_MIB=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --atlas-fs) ATLAS_FS=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
if [ -z "$LABFS_BIN" ]; then
    (cd "$REPO" && cargo build --release --quiet)
    LABFS_BIN="$REPO/target/release/labfs"
fi

W=$(mktemp -d /var/tmp/labfs-promote-bench.XXXXXX)
LOOP=""
cleanup() {
    set +e
    if mountpoint -q "$W/mnt"; then umount "$W/mnt" || umount -l "$W/mnt"; fi
    sleep 0.2
    for m in "$W/atlas" "$W/local"; do
        if mountpoint -q "$m"; then umount "$m" || umount -l "$m"; fi
    done
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    if [ "$KEEP" -eq 1 ]; then
        echo "kept $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT INT TERM

mkdir -p "$W/atlas" "$W/local" "$W/mnt"
LOCAL_MIB=$((SIZE_MIB * 2 + 256))
mount -t tmpfs -o "size=${LOCAL_MIB}m,mode=0755" tmpfs "$W/local"
case "$ATLAS_FS" in
    ext4)
        truncate -s "$((SIZE_MIB * 3 + 1024))M" "$W/atlas.img"
        mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$W/atlas.img"
        LOOP=$(losetup -f --show --direct-io=on "$W/atlas.img")
        mount -t ext4 "$LOOP" "$W/atlas"
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
"$LABFS_BIN" init-atlas --config "$W/labfs.toml" >/dev/null
"$LABFS_BIN" mount --config "$W/labfs.toml" "$W/mnt" >/dev/null 2>>"$W/daemon.log"
mkdir -p "$W/mnt/scans/bench/work"

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

CP_TIMES=()
PR_TIMES=()
echo "labfs promote benchmark: ${SIZE_MIB} MiB per tree, Atlas = $ATLAS_DESC, local = tmpfs, $REPS repetition(s)"
echo "labfs: $LABFS_BIN ($("$LABFS_BIN" --version))"
printf '%-4s %8s %10s %16s %18s\n' rep files bytes "cp -a+sync (s)" "labfs promote (s)"
for rep in $(seq 1 "$REPS"); do
    tree="$W/local/lab/scans/bench/work/tree$rep"
    mkdir -p "$tree"
    files=$(make_tree "$tree")
    bytes=$(du -sb --apparent-size "$tree" | cut -f1)
    sync
    t0=$(now)
    cp -a "$tree" "$W/atlas/lab/cp-copy"
    sync -f "$W/atlas/lab"
    t1=$(now)
    cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
    rm -rf "$W/atlas/lab/cp-copy"
    sync -f "$W/atlas/lab"
    [ "$ATLAS_FS" = ext4 ] && fstrim "$W/atlas" 2>/dev/null || true
    t0=$(now)
    "$LABFS_BIN" promote "$W/mnt/scans/bench/work/tree$rep" >/dev/null
    t1=$(now)
    pr_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
    if [ -e "$tree" ]; then echo "promotion left the local copy in place" >&2; exit 1; fi
    rm -rf "$W/atlas/lab/scans/bench/work/tree$rep"
    sync -f "$W/atlas/lab"
    CP_TIMES+=("$cp_s")
    PR_TIMES+=("$pr_s")
    printf '%-4s %8s %10s %16.3f %18.3f\n' "$rep" "$files" "$bytes" "$cp_s" "$pr_s"
done
cp_med=$(printf '%s\n' "${CP_TIMES[@]}" | median)
pr_med=$(printf '%s\n' "${PR_TIMES[@]}" | median)
awk -v cp="$cp_med" -v pr="$pr_med" -v bytes="$bytes" 'BEGIN {
    mib = bytes / 1048576
    printf "median: cp -a + sync %.3f s (%.0f MiB/s); labfs promote %.3f s (%.0f MiB/s)\n", cp, mib / cp, pr, mib / pr
    printf "throughput ratio labfs promote / (cp -a + sync): %.2f\n", cp / pr
}'
