#!/usr/bin/env bash
# A/B of labfs's two FUSE transports (docs/benchmarks.md, "labfs over FUSE-io_uring"):
# the metadata loop (benches/loop.py, 5,000 files), `tar x` of TREE and a warm
# `git status` of it, on a local (ephemeral) and an Atlas (authoritative) path of one
# labfs mount whose backends are two directories of /var/tmp, and natively on those
# directories; devfuse, uring and native interleaved, REPS rounds. Each row: wall ms,
# daemon CPU ticks, requests over /dev/fuse and over io_uring (from `labfs status`),
# 1-minute load. As root; sets enable_uring=Y for the run and restores it.
#
#   sudo REPS=3 OUT=ab.tsv TREE=some.tar bash benches/transport_ab.sh
#
# Without TREE, a tar of the first 60 crates of ~/.cargo/registry/src is made in $W.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LABFS=${LABFS:-$REPO/target/release/labfs}
REPS=${REPS:-3}
W=$(mktemp -d /var/tmp/labfs-transport-ab.XXXX)
OUT=${OUT:-$W/ab.tsv}
P=/sys/module/fuse/parameters/enable_uring; SAVED=$(cat $P); echo Y > $P
trap 'echo $SAVED > $P; for m in $W/mnt-*; do umount $m 2>/dev/null || umount -l $m 2>/dev/null || true; done' EXIT
# a tarball of ~5000 small files
TREE=${TREE:-}
if [ -z "$TREE" ]; then
  TREE=$W/tree.tar
  R=$(ls -d ~/.cargo/registry/src/*/ | head -1)
  (cd "$R" && ls | head -60 | tar -cf "$TREE" -T -)
fi
NFILES=$(tar -tf "$TREE" | wc -l)
echo "tree.tar: $NFILES entries" >&2
mkdir -p $W/atlas $W/local
cat > $W/labfs.toml <<EOT
[storage]
atlas = "$W/atlas"
local = "$W/local"
[[rule]]
path = "/cache"
class = "ephemeral"
EOT
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
load() { cut -d' ' -f1 /proc/loadavg; }
ms() { local t0=$(date +%s%N); "$@" >/dev/null 2>&1; echo $(( ($(date +%s%N)-t0)/1000000 )); }
echo -e "rep\ttarget\tworkload\tms\tdaemon_cpu_ticks\treq_devfuse\treq_uring\tload" > $OUT
for rep in $(seq $REPS); do
 for tr in devfuse uring native; do
  M=$W/mnt-$tr; mkdir -p $M
  if [ $tr != native ]; then
    LABFS_FUSE_TRANSPORT=$tr $LABFS mount --config $W/labfs.toml --foreground --allow-unmarked $M >$W/log-$tr 2>&1 &
    PID=$!
    for i in $(seq 100); do grep -q " $M fuse.labfs" /proc/mounts && break; sleep 0.1; done
    mkdir -p $M/cache $M/docs; L=$M/cache; A=$M/docs
  else
    PID=$$; mkdir -p $W/local/cache $W/atlas/docs; L=$W/local/cache; A=$W/atlas/docs
  fi
  for where in local atlas; do
    D=$L; [ $where = atlas ] && D=$A
    for wl in loop tarx gitst; do
      rm -rf $D/w; mkdir -p $D/w
      [ $wl = gitst ] && { tar -C $D/w -xf $TREE; git -C $D/w init -q; git -C $D/w add -A; git -C $D/w -c gc.auto=0 -c user.name=a -c user.email=a@b commit -qm x; git -C $D/w status >/dev/null; }
      sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
      [ $wl = gitst ] && git -C $D/w status >/dev/null
      c0=$( [ $tr != native ] && cpu $PID || echo 0 )
      s0=$( [ $tr != native ] && $LABFS status --json $M | python3 -c 'import json,sys; t=json.load(sys.stdin)["fuse_transport"]; print(t["requests_devfuse"], t["requests_io_uring"])' || echo "0 0")
      case $wl in
        loop) t=$(ms python3 $REPO/benches/loop.py $D/w 5000) ;;
        tarx) t=$(ms tar -C $D/w -xf $TREE) ;;
        gitst) t=$(ms git -C $D/w status) ;;
      esac
      c1=$( [ $tr != native ] && cpu $PID || echo 0 )
      s1=$( [ $tr != native ] && $LABFS status --json $M | python3 -c 'import json,sys; t=json.load(sys.stdin)["fuse_transport"]; print(t["requests_devfuse"], t["requests_io_uring"])' || echo "0 0")
      set -- $s0 $s1
      echo -e "$rep\t$tr-$where\t$wl\t$t\t$((c1-c0))\t$(($3-$1))\t$(($4-$2))\t$(load)" | tee -a $OUT
      rm -rf $D/w
    done
  done
  if [ $tr != native ]; then umount $M || { sleep 1; umount $M; } || umount -l $M; wait $PID || true; fi
 done
done
echo "results: $OUT" >&2
