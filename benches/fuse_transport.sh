#!/usr/bin/env bash
# The FUSE transport A/B of issue 12 (docs/benchmarks.md, "FUSE over io_uring: prototype"):
# the same minimal passthrough server (benches/fuse_transport.rs) over /dev/fuse and over
# FUSE over io_uring, beside native tmpfs and labfs local, in one interleaved run.
#
#   sudo bash benches/fuse_transport.sh [--reps N] [--files N] [--src-files N]
#                                       [--labfs BIN] [--proto BIN] [--passthrough-hp BIN]
#                                       [--loads "quiet cpu2 affinity"] [--out DIR]
#
# Targets, each over its own directory of one tmpfs (so the figures are FUSE's cost, not a
# disk's):
#   native          the tmpfs directory itself
#   proto-devfuse   fuse_transport --transport devfuse (one /dev/fuse reader, as fuser)
#   proto-devfuse2  the same with two /dev/fuse readers
#   proto-uring     fuse_transport --transport uring (one ring per CPU, depth 8)
#   labfs-local     target/release/labfs, an ephemeral (local-placed) directory
#   php, php-uring  libfuse passthrough_hp, plain and -o io_uring (with --passthrough-hp)
# Workloads: the N-file loop (create 512 B, stat, list, unlink) from Rust (benches/meta.rs
# `loop`) and from Python (benches/loop.py), and `tar x` of a source tree (crates of
# ~/.cargo/registry/src, about --src-files files). Each --loads condition is run in turn:
# "quiet" is the machine as it is, "cpu2" has `stress-ng --cpu 2` running beside;
# "affinity" runs the Rust loop pinned (taskset) to CPU 0 and then to CPU 1 on native, on
# proto-devfuse-cpu0 (one /dev/fuse reader pinned to CPU 0), proto-devfuse-pin2 (two
# readers, one pinned to each CPU) and proto-uring (whose ring threads pin themselves).
# Every sample records the 1-minute load average at its start. Prints the medians.
# /sys/module/fuse/parameters/enable_uring is set to Y for the run and restored on exit.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
REPS=3
FILES=5000
SRC_FILES=4000
LABFS_BIN=$REPO/target/release/labfs
PROTO_BIN=""
PHP_BIN=""
LOADS="quiet cpu2 affinity"
OUT=/var/tmp/labfs-transport-$(date -u +%Y%m%dT%H%M%S)
while [ $# -gt 0 ]; do
    case $1 in
        --reps) REPS=$2; shift ;;
        --files) FILES=$2; shift ;;
        --src-files) SRC_FILES=$2; shift ;;
        --labfs) LABFS_BIN=$(realpath "$2"); shift ;;
        --proto) PROTO_BIN=$(realpath "$2"); shift ;;
        --passthrough-hp) PHP_BIN=$(realpath "$2"); shift ;;
        --loads) LOADS=$2; shift ;;
        --out) OUT=$2; shift ;;
        *) echo "fuse_transport.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "fuse_transport.sh: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root (it mounts)"
URING_PARAM=/sys/module/fuse/parameters/enable_uring
[ -w "$URING_PARAM" ] || die "$URING_PARAM missing: the kernel has no FUSE over io_uring"
[ -x "$LABFS_BIN" ] || die "no labfs binary at $LABFS_BIN (cargo build --release)"
if [ -z "$PROTO_BIN" ]; then
    PROTO_BIN=$(cd "$REPO" && cargo bench --bench fuse_transport --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*fuse_transport[^"]*\)".*/\1/p' | tail -1)
fi
[ -x "$PROTO_BIN" ] || die "no prototype binary (cargo bench --bench fuse_transport --no-run)"
for t in python3 stress-ng tar rustc taskset; do command -v "$t" >/dev/null || die "$t is required"; done

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/labfs-transport.XXXXXX)
URING_WAS=$(cat "$URING_PARAM")
MOUNTS=()
PIDS=()
STRESS_PID=""
cleanup() {
    set +e
    [ -n "$STRESS_PID" ] && kill "$STRESS_PID" 2>/dev/null && wait "$STRESS_PID" 2>/dev/null
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    echo "$URING_WAS" >"$URING_PARAM"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mount -t tmpfs -o size=4g tmpfs "$WORK" && MOUNTS+=("$WORK")
rustc -O --edition 2021 "$REPO/benches/meta.rs" -o "$WORK/meta" 2>"$OUT/rustc.log" || die "rustc benches/meta.rs: $OUT/rustc.log"

# The source tree: whole crates of the cargo registry, about SRC_FILES files.
reg=""
for c in "${HOME:-/root}"/.cargo/registry/src/*/; do [ -d "$c" ] && reg=${c%/} && break; done
[ -n "$reg" ] || die "no ~/.cargo/registry/src to make the source tree of"
n=0
: >"$WORK/src.list"
for c in $(ls "$reg" | LC_ALL=C sort); do
    [ "$n" -ge "$SRC_FILES" ] && break
    echo "$c" >>"$WORK/src.list"
    n=$((n + $(find "$reg/$c" -type f | wc -l)))
done
tar cf "$WORK/src.tar" -C "$reg" -T "$WORK/src.list"
log "source tree: $n files of $(wc -l <"$WORK/src.list") crates"

echo Y >"$URING_PARAM"
declare -A ROOT DPID
wait_mount() { # MNT PID LOG
    for _ in $(seq 300); do
        mountpoint -q "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "daemon for $1 exited: $(tail -3 "$3")"
        sleep 0.1
    done
    die "$1 not mounted after 30 s"
}
up() { # NAME ROOT-UNDER-MOUNT MNT CMD...
    local name=$1 sub=$2 mnt=$3
    shift 3
    mkdir -p "$mnt"
    "$@" </dev/null >>"$OUT/$name.log" 2>&1 &
    DPID[$name]=$!
    PIDS+=($!)
    wait_mount "$mnt" "$!" "$OUT/$name.log"
    MOUNTS+=("$mnt")
    ROOT[$name]=$mnt$sub
    mkdir -p "${ROOT[$name]}"
}
mkdir -p "$WORK/native" "$WORK/b-devfuse" "$WORK/b-devfuse2" "$WORK/b-uring" "$WORK/b-devfuse-cpu0" "$WORK/b-devfuse-pin2" "$WORK/labfs/local/lab" "$WORK/labfs/atlas/lab"
ROOT[native]=$WORK/native
TARGETS=(native)
up proto-devfuse "" "$WORK/m-devfuse" "$PROTO_BIN" --transport devfuse "$WORK/b-devfuse" "$WORK/m-devfuse"
up proto-devfuse2 "" "$WORK/m-devfuse2" "$PROTO_BIN" --transport devfuse --threads 2 "$WORK/b-devfuse2" "$WORK/m-devfuse2"
up proto-uring "" "$WORK/m-uring" "$PROTO_BIN" --transport uring "$WORK/b-uring" "$WORK/m-uring"
grep -q io_uring < <(ls -l "/proc/${DPID[proto-uring]}/fd") || die "proto-uring holds no io_uring"
TARGETS+=(proto-devfuse proto-devfuse2 proto-uring)
case " $LOADS " in
    *" affinity "*)
        up proto-devfuse-cpu0 "" "$WORK/m-devfuse-cpu0" "$PROTO_BIN" --transport devfuse --pin "$WORK/b-devfuse-cpu0" "$WORK/m-devfuse-cpu0"
        up proto-devfuse-pin2 "" "$WORK/m-devfuse-pin2" "$PROTO_BIN" --transport devfuse --threads 2 --pin "$WORK/b-devfuse-pin2" "$WORK/m-devfuse-pin2" ;;
esac
cat >"$WORK/labfs.toml" <<EOF
[storage]
atlas = "$WORK/labfs/atlas/lab"
local = "$WORK/labfs/local/lab"
[[rule]]
path = "/cache"
class = "ephemeral"
EOF
up labfs-local /cache "$WORK/m-labfs" "$LABFS_BIN" mount --config "$WORK/labfs.toml" --foreground --allow-unmarked "$WORK/m-labfs"
TARGETS+=(labfs-local)
if [ -n "$PHP_BIN" ]; then
    mkdir -p "$WORK/b-php" "$WORK/b-php-uring"
    up php "" "$WORK/m-php" "$PHP_BIN" --foreground "$WORK/b-php" "$WORK/m-php"
    up php-uring "" "$WORK/m-php-uring" "$PHP_BIN" --foreground -o io_uring "$WORK/b-php-uring" "$WORK/m-php-uring"
    TARGETS+=(php php-uring)
fi
log "targets: ${TARGETS[*]}"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc); labfs: $LABFS_BIN; prototype: $PROTO_BIN"
    echo "labfs commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?)"
    echo "files: $FILES; source tree: $n files; reps: $REPS; loads: $LOADS"
} >"$OUT/machine.txt"
RES=$OUT/results.tsv
printf 'load\ttarget\tworkload\trep\tseconds\tload1\tdaemon_cpu_ms\tdaemon_ctxsw\n' >"$RES"
load1() { cut -d' ' -f1 /proc/loadavg; }
TICK_MS=$((1000 / $(getconf CLK_TCK)))
# "CPU-ms CONTEXT-SWITCHES" of a target's daemon so far (all its threads), "- -" for native.
dstat() {
    local pid=${DPID[$1]:-}
    [ -n "$pid" ] || { echo "- -"; return; }
    local cpu ctx
    cpu=$(awk -v t="$TICK_MS" '{ sub(/.*\) /, ""); print ($12 + $13) * t }' "/proc/$pid/stat")
    ctx=$(cat /proc/"$pid"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }')
    echo "$cpu $ctx"
}
sample() { # COND TARGET WORKLOAD REP CMD... (CMD prints "SECONDS s" or is timed here)
    local cond=$1 t=$2 w=$3 rep=$4 l0 t0 t1 v s0 s1 dcpu dctx
    shift 4
    l0=$(load1)
    s0=$(dstat "$t")
    if [ "$w" = "tar x" ]; then
        t0=$EPOCHREALTIME
        "$@" >>"$OUT/run.log" 2>&1 || die "$t $w failed: $(tail -3 "$OUT/run.log")"
        t1=$EPOCHREALTIME
        v=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
    else
        v=$("$@" 2>>"$OUT/run.log") || die "$t $w failed: $(tail -3 "$OUT/run.log")"
        v=${v% *}
    fi
    s1=$(dstat "$t")
    if [ "${s0% *}" = - ]; then
        dcpu=-; dctx=-
    else
        dcpu=$((${s1% *} - ${s0% *})); dctx=$((${s1#* } - ${s0#* }))
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$cond" "$t" "$w" "$rep" "$v" "$l0" "$dcpu" "$dctx" >>"$RES"
    log "$cond $t $w #$rep: $v s (load $l0; daemon $dcpu ms CPU, $dctx context switches)"
}

for cond in $LOADS; do
    case $cond in
        quiet) ;;
        affinity)
            for ((rep = 1; rep <= REPS; rep++)); do
                for t in native proto-devfuse-cpu0 proto-devfuse-pin2 proto-uring; do
                    d=${ROOT[$t]}/loop
                    mkdir -p "$d"
                    for cpu in 0 1; do
                        sample "$cond" "$t" "loop (Rust), caller on CPU $cpu" "$rep" taskset -c "$cpu" "$WORK/meta" loop "$d" "$FILES"
                    done
                    rmdir "$d"
                done
            done
            continue ;;
        cpu2)
            stress-ng --cpu 2 --quiet >/dev/null 2>&1 &
            STRESS_PID=$!
            sleep 5 ;;
        *) die "unknown load condition $cond (quiet, cpu2)" ;;
    esac
    for ((rep = 1; rep <= REPS; rep++)); do
        for t in "${TARGETS[@]}"; do
            d=${ROOT[$t]}/loop
            mkdir -p "$d"
            sample "$cond" "$t" "loop (Rust)" "$rep" "$WORK/meta" loop "$d" "$FILES"
            sample "$cond" "$t" "loop (Python)" "$rep" python3 "$REPO/benches/loop.py" "$d" "$FILES"
            rmdir "$d"
            d=${ROOT[$t]}/src
            mkdir -p "$d"
            sync
            sample "$cond" "$t" "tar x" "$rep" tar xf "$WORK/src.tar" -C "$d"
            rm -rf "$d"
        done
    done
    if [ -n "$STRESS_PID" ]; then
        kill "$STRESS_PID" && wait "$STRESS_PID" 2>/dev/null || true
        STRESS_PID=""
    fi
done

# Unmount the prototypes so they print their request counts, then the table.
for t in proto-devfuse proto-devfuse2 proto-uring proto-devfuse-cpu0 proto-devfuse-pin2; do
    [ -n "${DPID[$t]:-}" ] || continue
    umount "$WORK/m-${t#proto-}"
    wait "${DPID[$t]}" || log "$t exited with $?"
    log "$t: $(grep -h 'fuse_transport:' "$OUT/$t.log" | tr '\n' ' ')"
done
python3 - "$RES" <<'EOF' | tee "$OUT/summary.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
conds = list(dict.fromkeys(r["load"] for r in rows))
targets = list(dict.fromkeys(r["target"] for r in rows))
works = list(dict.fromkeys(r["workload"] for r in rows))
all_targets, all_works = targets, works
for c in conds:
    here = [r for r in rows if r["load"] == c]
    targets = [t for t in all_targets if any(r["target"] == t for r in here)]
    works = [w for w in all_works if any(r["workload"] == w for r in here)]
    print(f"\n{c}: median seconds (ratio to native), load1 median/max")
    print("| workload | " + " | ".join(targets) + " |")
    print("|---" * (len(targets) + 1) + "|")
    for w in works:
        cells, nat = [], None
        for t in targets:
            s = [r for r in rows if r["load"] == c and r["target"] == t and r["workload"] == w]
            if not s:
                cells.append("-")
                continue
            m = statistics.median(float(r["seconds"]) for r in s)
            ld = [float(r["load1"]) for r in s]
            nat = m if t == "native" else nat
            ratio = f" ({m / nat:.1f}×)" if nat and t != "native" else ""
            cells.append(f"{m:.3f}{ratio} [{statistics.median(ld):.1f}/{max(ld):.1f}]")
        print(f"| {w} | " + " | ".join(cells) + " |")
    print(f"\n{c}: daemon CPU ms / context switches per sample (medians)")
    print("| workload | " + " | ".join(t for t in targets if t != "native") + " |")
    print("|---" * len(targets) + "|")
    for w in works:
        cells = []
        for t in targets:
            if t == "native":
                continue
            s = [r for r in rows if r["load"] == c and r["target"] == t and r["workload"] == w and r["daemon_cpu_ms"] != "-"]
            if not s:
                cells.append("-")
                continue
            cpu = statistics.median(float(r["daemon_cpu_ms"]) for r in s)
            ctx = statistics.median(float(r["daemon_ctxsw"]) for r in s)
            cells.append(f"{cpu:.0f} ms / {ctx:.0f}")
        print(f"| {w} | " + " | ".join(cells) + " |")
    # Same repetition, back to back: the ratio of each pair, then its median.
    pairs = [("proto-uring", "proto-devfuse"), ("php-uring", "php")]
    for a, b in pairs:
        if a not in targets or b not in targets:
            continue
        out = []
        for w in works:
            by = {}
            for r in rows:
                if r["load"] == c and r["workload"] == w and r["target"] in (a, b):
                    by.setdefault(r["rep"], {})[r["target"]] = float(r["seconds"])
            q = [v[a] / v[b] for v in by.values() if a in v and b in v and v[b] > 0]
            if q:
                out.append(f"{w} {statistics.median(q):.2f} (range {min(q):.2f}-{max(q):.2f})")
        print(f"\n{c}: {a} / {b} time, median of per-repetition ratios: " + "; ".join(out))
EOF
log "results in $OUT"
