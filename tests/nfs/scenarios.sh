# The NFS scenarios, sourced by guest.sh inside the VM (see tests/nfs/mod.rs).
# Each scenario is a function sc_NAME, run by run_scenario in a bash of its own with
# `set -euo pipefail` and a time limit; it passes when it returns 0. Helpers below.
#
# NFS mounts made by guest.sh (all of 127.0.0.1:/srv/..., hard, tcp):
#   /mnt/a42   nsq (no_root_squash), vers=4.2       /mnt/a3  the same export, vers=3
#   /mnt/b42   nsq, vers=4.2, nosharecache,actimeo=1 (a second node's client cache)
#   /mnt/sq42  sq (root_squash), vers=4.2
#   /mnt/f42, /mnt/f3  fail (no_root_squash), vers=4.2 and 3
#   /mnt/s3   soft (no_root_squash), vers=3, soft,timeo=10,retrans=1
#   /mnt/s42  soft, vers=4.2, softerr,timeo=10,retrans=1
# The server side of each export is /srv/NAME.

SCENARIOS="
promote_tree_v42
promote_tree_v3
tags_xattr_v42_store_v3
root_squash_detected_and_promote_refused
failed_promote_leaves_nothing
crash_recovery_v42
silly_rename_hidden
open_unlinked_file
estale_passed_through
hung_server
soft_mount_hung_server_v3
soft_mount_hung_server_v42
export_not_mounted_refused
two_nodes_staleness
concurrent_promotes
"

scenario_list() { echo $SCENARIOS; }

# Per-scenario time limit (seconds); the whole group must stay within ~10 min.
SCENARIO_LIMIT=${SCENARIO_LIMIT:-150}

run_scenario() {
    local s=$1 t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 10 "$SCENARIO_LIMIT" bash -c '
        set -euo pipefail
        . "$HERE/scenarios.sh"
        SCEN=$1
        trap cleanup_labs EXIT
        set -x
        "sc_$1"
    ' scenario "$s" >"$OUT/$s.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    if [ "$rc" -eq 0 ]; then
        echo PASS >"$OUT/$s.result"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "FAIL (timed out after ${SCENARIO_LIMIT}s)" >"$OUT/$s.result"
    else
        echo "FAIL (exit $rc)" >"$OUT/$s.result"
    fi
    echo "$t0 $t1" >"$OUT/$s.times"
    # Whatever a scenario left behind must not disturb the next one.
    iptables -F INPUT 2>/dev/null || true
    for m in $(awk '$3 == "fuse.labfs" {print $2}' /proc/mounts); do
        umount -l "$m" 2>/dev/null || true
    done
}

RULES='
[[rule]]
path = "/cache"
class = "ephemeral"

[[rule]]
path = "/scans/*/work"
class = "transitional"

[[rule]]
path = "/docs"
class = "authoritative"
'

LABS=""

# lab_up ID ATLAS_DIR [EXTRA_TOML [MOUNT_PREFIX]]: a labfs mount whose Atlas is
# ATLAS_DIR (a directory on an NFS mount; created and marked if new) and whose local
# backend is a tmpfs directory. Sets LAB_ID, ATLAS_ID, LOCAL_ID, CFG_ID, LOG_ID. MOUNT_PREFIX runs the
# daemon under a wrapper (e.g. `unshare -u` for a second node with its own host name).
lab_up() {
    local id=$1 nfs=$2 extra=${3:-} prefix=${4:-}
    local atlas="$nfs" local="/mnt/local/$SCEN-$id" mnt="/mnt/lab/$SCEN-$id"
    local cfg="/mnt/cfg/$SCEN-$id.toml" log="$OUT/$SCEN-$id.daemon.log"
    mkdir -p "$atlas" "$local" "$mnt" /mnt/cfg
    printf '[storage]\natlas = "%s"\nlocal = "%s"\n%s\n%s\n' "$atlas" "$local" "$extra" "$RULES" >"$cfg"
    if [ ! -e "$atlas/.labfs/atlas-id" ]; then
        "$LABFS" init-atlas --config "$cfg"
    fi
    RUST_LOG=labfs=debug $prefix "$LABFS" mount --config "$cfg" --log-file "$log" "$mnt"
    findmnt -t fuse.labfs "$mnt" >/dev/null
    printf -v "LAB_$id" %s "$mnt"
    printf -v "ATLAS_$id" %s "$atlas"
    printf -v "LOCAL_$id" %s "$local"
    printf -v "CFG_$id" %s "$cfg"
    printf -v "LOG_$id" %s "$log"
    LABS="$LABS $mnt"
}

cleanup_labs() {
    local rc=$?
    set +e
    iptables -F INPUT 2>/dev/null
    for m in $LABS; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    return $rc
}

fail() {
    echo "FAILED: $*" >&2
    exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds.
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(( $(date +%s) + secs ))
    until "$@"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "timed out after ${secs}s waiting until $what" >&2
            return 1
        fi
        sleep 0.1
    done
}

PY=/usr/bin/python3

# A tree with hard links, symlinks, a sparse file and user xattrs, owned by uid 1000
# (and one file by 1001:1002 with an odd mode).
make_tree() {
    local d=$1
    mkdir -p "$d/sub/deeper"
    echo "hello" >"$d/a.txt"
    head -c 300000 /dev/urandom >"$d/sub/blob"
    ln "$d/a.txt" "$d/sub/hardlink"
    ln -s ../a.txt "$d/sub/symlink"
    ln -s /nonexistent/target "$d/dangling"
    truncate -s 8M "$d/sparse"
    printf 'middle' | dd of="$d/sparse" bs=1 seek=$((4 * 1024 * 1024)) conv=notrunc status=none
    setfattr -n user.note -v "kept on NFS" "$d/a.txt"
    setfattr -n user.dirnote -v "on a dir" "$d/sub"
    echo deep >"$d/sub/deeper/f"
    chown -R 1000:1000 "$d"
    chown -h 1000:1000 "$d/sub/symlink" "$d/dangling"
    chown 1001:1002 "$d/sub/deeper/f"
    chmod 0640 "$d/sub/deeper/f"
    chmod 2751 "$d/sub/deeper"
}

# The promoted tree on Atlas (server side, as the server sees it) is the tree made by
# make_tree, with owners and modes kept.
check_tree() {
    local d=$1
    [ "$(cat "$d/a.txt")" = hello ] || fail "a.txt content"
    [ "$(stat -c %i "$d/a.txt")" = "$(stat -c %i "$d/sub/hardlink")" ] || fail "hard link split"
    [ "$(stat -c %h "$d/a.txt")" = 2 ] || fail "link count"
    [ "$(readlink "$d/sub/symlink")" = ../a.txt ] || fail "symlink"
    [ "$(readlink "$d/dangling")" = /nonexistent/target ] || fail "dangling symlink"
    [ "$(stat -c %s "$d/sparse")" = $((8 * 1024 * 1024)) ] || fail "sparse size"
    [ "$(stat -c %b "$d/sparse")" -lt 1024 ] || fail "sparse file lost its holes ($(stat -c %b "$d/sparse") blocks)"
    [ "$(dd if="$d/sparse" bs=1 skip=$((4 * 1024 * 1024)) count=6 status=none)" = middle ] || fail "sparse content"
    [ "$(stat -c %u:%g "$d/a.txt")" = 1000:1000 ] || fail "owner of a.txt: $(stat -c %u:%g "$d/a.txt")"
    [ "$(stat -c %u:%g "$d/sub/symlink")" = 1000:1000 ] || fail "owner of the symlink"
    [ "$(stat -c %u:%g:%a "$d/sub/deeper/f")" = 1001:1002:640 ] || fail "owner/mode of deeper/f: $(stat -c %u:%g:%a "$d/sub/deeper/f")"
    [ "$(stat -c %a "$d/sub/deeper")" = 2751 ] || fail "mode of deeper: $(stat -c %a "$d/sub/deeper")"
}

# ---------------------------------------------------------------------------

promote_tree_on() { # NFS_DIR SERVER_DIR
    lab_up n "$1/$SCEN-n"
    local src="$LAB_n/scans/s1/work/out"
    mkdir -p "$src"
    make_tree "$src"
    "$LABFS" promote "$src" || fail "labfs promote failed"
    # Gone from local, present through the mount and on the server itself.
    [ ! -e "$LOCAL_n/scans/s1/work/out" ] || fail "local copy still there"
    check_tree "$src"
    check_tree "$2/$SCEN-n/scans/s1/work/out"
    [ "$(getfattr --only-values -n user.labfs.state "$src/a.txt")" = promoted ] || fail "state tag"
    [ "$(getfattr --only-values -n user.labfs.class "$src/sub/blob")" = authoritative ] || fail "class tag"
    getfattr --only-values -n user.labfs.digest "$src/sub/blob" | grep -q '^blake3:' || fail "digest tag"
    "$LABFS" status "$LAB_n"
}

sc_promote_tree_v42() {
    promote_tree_on /mnt/a42 /srv/nsq
    # A program's own renameat2 flags on Atlas get the NFS client's answer, EINVAL.
    mkdir -p "$LAB_n/docs"
    echo 1 >"$LAB_n/docs/r1"
    $PY - "$LAB_n/docs/r1" "$LAB_n/docs/r2" <<'PYEOF'
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r = libc.renameat2(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 1)  # RENAME_NOREPLACE
e = ctypes.get_errno()
assert r == -1 and e == errno.EINVAL, (r, e)
assert os.path.exists(sys.argv[1]) and not os.path.exists(sys.argv[2])
print("renameat2(RENAME_NOREPLACE) on Atlas: EINVAL, nothing renamed")
PYEOF
    [ "$(getfattr --only-values -n user.note /srv/nsq/$SCEN-n/scans/s1/work/out/a.txt)" = "kept on NFS" ] \
        || fail "user xattr not kept on v4.2"
    [ "$(getfattr --only-values -n user.dirnote /srv/nsq/$SCEN-n/scans/s1/work/out/sub)" = "on a dir" ] \
        || fail "user xattr of a directory not kept on v4.2"
}

sc_promote_tree_v3() {
    promote_tree_on /mnt/a3 /srv/nsq
    # v3 has no xattrs: the tags are in the store, the job warned about user.note.
    ls /srv/nsq/$SCEN-n/.labfs/tags/scans/s1/work/out/ | grep -q 'a.txt.labfs-tags' || fail "no tag record on v3"
}

sc_tags_xattr_v42_store_v3() {
    lab_up x /mnt/a42/$SCEN-x
    lab_up y /mnt/a3/$SCEN-y
    "$LABFS" status "$LAB_x" | tee "$OUT/$SCEN.status-v42"
    "$LABFS" status "$LAB_y" | tee "$OUT/$SCEN.status-v3"
    grep -q '^xattr mode: xattr' "$OUT/$SCEN.status-v42" || fail "v4.2 is not in xattr mode"
    grep -q '^xattr mode: store' "$OUT/$SCEN.status-v3" || fail "v3 is not in store mode"
    mkdir -p "$LAB_x/scans/t/work/f" "$LAB_y/scans/t/work/f"
    echo x >"$LAB_x/scans/t/work/f/x"
    echo y >"$LAB_y/scans/t/work/f/y"
    "$LABFS" promote "$LAB_x/scans/t/work/f" "$LAB_y/scans/t/work/f"
    getfattr --only-values -n user.labfs.class "$ATLAS_x/scans/t/work/f/x" >/dev/null || fail "no xattr tag on v4.2"
    [ -z "$(ls -A "$ATLAS_x/.labfs/tags" 2>/dev/null)" ] || fail "v4.2 wrote store records"
    [ "$(getfattr --only-values -n user.labfs.class "$LAB_y/scans/t/work/f/y")" = authoritative ] || fail "v3 tag not shown"
    ls "$ATLAS_y/.labfs/tags/scans/t/work/f/" | grep -q 'y.labfs-tags' || fail "no store record on v3"
}

sc_root_squash_detected_and_promote_refused() {
    # The administrator prepared the export for a squashed node: the Atlas directory
    # belongs to the anonymous user, so labfs's own writes (as nobody) work there.
    mkdir -p "/srv/sq/$SCEN-q"
    chown 65534:65534 "/srv/sq/$SCEN-q"
    lab_up q "/mnt/sq42/$SCEN-q" 2>"$OUT/$SCEN.mount-err"
    cat "$OUT/$SCEN.mount-err"
    grep -qi 'root_squash' "$OUT/$SCEN.mount-err" || fail "mount did not say root_squash"
    grep -qi 'root_squash' "$LOG_q" || fail "mount did not report root_squash"
    "$LABFS" status "$LAB_q" | tee "$OUT/$SCEN.status"
    grep -qi 'root squash' "$OUT/$SCEN.status" || fail "status does not say root squash"
    mkdir -p "$LAB_q/scans/s/work/out"
    echo data >"$LAB_q/scans/s/work/out/f"
    chown -R 1000:1000 "$LAB_q/scans/s/work/out"
    if "$LABFS" promote "$LAB_q/scans/s/work/out" 2>"$OUT/$SCEN.promote-err"; then
        fail "promotion under root_squash succeeded"
    fi
    cat "$OUT/$SCEN.promote-err"
    grep -qi 'root_squash' "$OUT/$SCEN.promote-err" || fail "refusal does not name root_squash"
    [ -f "$LOCAL_q/scans/s/work/out/f" ] || fail "local copy lost"
    [ ! -e "/srv/sq/$SCEN-q/scans/s/work/out" ] || fail "something left on Atlas"
    [ -z "$(find "/srv/sq/$SCEN-q/.labfs/staging" -mindepth 2 2>/dev/null)" ] || fail "staging left on Atlas"
}

sc_failed_promote_leaves_nothing() {
    # 1. Another node creates the target on Atlas while the job stages: the commit
    # refuses, changes nothing of the other node's and keeps the local copy.
    lab_up f /mnt/f42/$SCEN-f "" "env LABFS_PROMOTE_DELAY_MS=1000"
    local src="$LAB_f/scans/s9/work/out" srv="/srv/fail/$SCEN-f"
    mkdir -p "$src"
    for i in $(seq 1 12); do echo "$i" >"$src/f$i"; done
    "$LABFS" promote "$src" &
    local pid=$!
    wait_for 30 "the job stages" sh -c "ls $srv/.labfs/staging/*/*/data/f* >/dev/null 2>&1"
    mkdir -p "$srv/scans/s9/work/out"
    echo other >"$srv/scans/s9/work/out/theirs"
    if wait "$pid"; then fail "promotion succeeded over a target that appeared"; fi
    [ "$(ls -A "$srv/scans/s9/work/out")" = theirs ] || fail "the other node's directory was changed"
    [ "$(ls "$LOCAL_f/scans/s9/work/out" | wc -l)" = 12 ] || fail "local copy changed"
    [ -z "$(find "$srv/.labfs/staging" -mindepth 2 2>/dev/null)" ] || fail "staging left"

    # 2. A commit that fails after making the parent chain (v3: tags in the store):
    # nothing at all is left on Atlas, no parent chain and no tag record.
    lab_up g /mnt/f3/$SCEN-g "" "env LABFS_PROMOTE_FAIL_AT=placing"
    src="$LAB_g/scans/s8/work/out" srv="/srv/fail/$SCEN-g"
    mkdir -p "$src"
    echo data >"$src/f"
    if "$LABFS" promote "$src"; then fail "the promotion did not fail"; fi
    [ "$(cat "$LOCAL_g/scans/s8/work/out/f")" = data ] || fail "local copy changed"
    find "$srv" -path "$srv/.labfs" -prune -o -print | sort | tee "$OUT/$SCEN.atlas-after"
    ! grep -q /work "$OUT/$SCEN.atlas-after" || fail "parent chain left on Atlas"
    find "$srv/.labfs/tags" -type f 2>/dev/null | tee "$OUT/$SCEN.records-after"
    [ ! -s "$OUT/$SCEN.records-after" ] || fail "tag record left on Atlas"
    [ -z "$(find "$srv/.labfs/staging" -mindepth 2 2>/dev/null)" ] || fail "staging left"
}

sc_crash_recovery_v42() {
    # The daemon dies after verifying, and (as if it died between the claim and the
    # rename) an empty placeholder of mode 0 is at the target: the next mount's
    # recovery takes it over and puts the tree in place on NFS.
    lab_up c /mnt/a42/$SCEN-c "" "env LABFS_PROMOTE_CRASH_AT=verified"
    local src="$LAB_c/scans/s5/work/out" srv="/srv/nsq/$SCEN-c"
    mkdir -p "$src/sub"
    echo a >"$src/a"
    echo b >"$src/sub/b"
    if "$LABFS" promote "$src"; then fail "the daemon did not crash"; fi
    grep -q 'LABFS_PROMOTE_CRASH_AT=verified' "$LOG_c" || fail "no crash logged"
    mkdir -p "$srv/scans/s5/work"
    mkdir -m 0 "$srv/scans/s5/work/out"
    "$LABFS" mount --recover --config "$CFG_c" --log-file "$LOG_c" "$LAB_c"
    grep -q 'recovering the promotion' "$LOG_c" || fail "recovery did not run"
    [ "$(cat "$srv/scans/s5/work/out/sub/b")" = b ] || fail "the tree is not in place on Atlas"
    [ "$(cat "$src/a")" = a ] || fail "not readable through the mount"
    [ ! -e "$LOCAL_c/scans/s5/work/out" ] || fail "the local copy is still there"
    [ -z "$(find "$srv/.labfs/staging" -mindepth 2 2>/dev/null)" ] || fail "staging left"
}

sc_silly_rename_hidden() {
    lab_up s /mnt/a42/$SCEN-s
    mkdir -p "$LAB_s/docs/d"
    echo keep >"$LAB_s/docs/d/keep"
    echo gone >"$LAB_s/docs/d/victim"
    exec 7<"$LAB_s/docs/d/victim"
    rm "$LAB_s/docs/d/victim"
    ls -a "$ATLAS_s/docs/d" | tee "$OUT/$SCEN.on-nfs"
    grep -q '^\.nfs' "$OUT/$SCEN.on-nfs" || fail "the NFS client made no silly rename (nothing to test)"
    ls -a "$LAB_s/docs/d" | tee "$OUT/$SCEN.through-labfs"
    ! grep -q '^\.nfs' "$OUT/$SCEN.through-labfs" || fail "silly-rename name listed through labfs"
    "$LABFS" check --config "$CFG_s" | tee "$OUT/$SCEN.check" || true
    ! grep -q '\.nfs' "$OUT/$SCEN.check" || fail "labfs check counts the silly-rename file"
    exec 7<&-
}

sc_open_unlinked_file() {
    lab_up u /mnt/a42/$SCEN-u
    mkdir -p "$LAB_u/docs"
    echo -n "0123456789" >"$LAB_u/docs/f"
    $PY - "$LAB_u/docs/f" <<'PYEOF'
import os, sys
p = sys.argv[1]
fd = os.open(p, os.O_RDWR)
os.unlink(p)
st = os.fstat(fd)
assert st.st_size == 10, st
assert os.pread(fd, 10, 0) == b"0123456789"
os.ftruncate(fd, 4)
assert os.fstat(fd).st_size == 4
os.pwrite(fd, b"xy", 4)
assert os.pread(fd, 10, 0) == b"0123xy", os.pread(fd, 10, 0)
assert os.fstat(fd).st_size == 6
os.close(fd)
assert not os.path.exists(p)
print("open-then-unlinked: fstat, ftruncate, read, write all work")
PYEOF
}

sc_estale_passed_through() {
    lab_up e /mnt/a42/$SCEN-e '[cache]
atlas_ttl = "100ms"'
    mkdir -p "$LAB_e/docs"
    echo data >"$LAB_e/docs/f"
    # The file is removed on the server behind the client's back while open here.
    $PY - "$LAB_e/docs/f" "/srv/nsq/$SCEN-e/docs/f" <<'PYEOF'
import errno, os, sys, time
p, server = sys.argv[1], sys.argv[2]
fd = os.open(p, os.O_RDONLY)
os.unlink(server)
deadline = time.monotonic() + 30
while True:
    try:
        os.fstat(fd)
        os.pread(fd, 4, 0)
    except OSError as e:
        print("errno", e.errno, errno.errorcode.get(e.errno))
        assert e.errno != errno.ENOENT, "ESTALE turned into ENOENT"
        assert e.errno == errno.ESTALE, e
        break
    assert time.monotonic() < deadline, "the stale file handle was never noticed"
    time.sleep(0.2)
PYEOF
}

sc_hung_server() {
    lab_up h /mnt/a42/$SCEN-h '[atlas]
timeout = "3s"
probe_interval = "1s"'
    mkdir -p "$LAB_h/docs" "$LAB_h/cache"
    echo before >"$LAB_h/docs/f"
    # Written on the server, not through the mount: no page of it is in this node's
    # caches, so the read below must reach the daemon (and through it the server).
    head -c $((4 * 1024 * 1024)) /dev/urandom >"/srv/nsq/$SCEN-h/docs/big"
    # A program with an Atlas file open before the outage reads during it.
    $PY - "$LAB_h/docs/big" "$OUT/$SCEN.reader" <<'PYEOF' &
import errno, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
# The file was just written through the mount, so its pages may be in the page cache
# (kept across opens while Atlas shows the same version): drop them, so the read
# below must reach the daemon.
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.pread(fd, 6, 0)
open(sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[2] + ".go"):
    time.sleep(0.05)
t0 = time.monotonic()
try:
    os.pread(fd, 4096, 3 * 1024 * 1024 + 512 * 1024)  # not read before: not cached
    res = "read-ok"
except OSError as e:
    res = errno.errorcode.get(e.errno, str(e.errno))
with open(sys.argv[2], "w") as f:
    f.write("%s %d\n" % (res, (time.monotonic() - t0) * 1000))
PYEOF
    local reader=$!
    wait_for 20 "the reader has the file open" test -e "$OUT/$SCEN.reader.ready"
    iptables -A INPUT -i lo -p tcp --dport 2049 -j DROP
    touch "$OUT/$SCEN.reader.go"
    local t0 t1 err
    t0=$(date +%s%N)
    if err=$(cat "$LAB_h/docs/new-name" 2>&1); then fail "an Atlas read succeeded with the server hung"; fi
    t1=$(date +%s%N)
    echo "$err"
    echo "$err" | grep -q 'Connection timed out' || fail "not ETIMEDOUT: $err"
    [ $(( (t1 - t0) / 1000000 )) -le 6000 ] || fail "took $(( (t1 - t0) / 1000000 )) ms (bound 3 s + slack)"
    # Local paths keep working during the outage.
    echo local >"$LAB_h/cache/x"
    [ "$(cat "$LAB_h/cache/x")" = local ] || fail "local path"
    wait "$reader" || fail "the reader failed"
    cat "$OUT/$SCEN.reader"
    # The read of an open file, at an offset nobody read before, is refused
    # (ETIMEDOUT) within the bound: never hung.
    read -r res ms <"$OUT/$SCEN.reader"
    [ "$res" = ETIMEDOUT ] || fail "reader: $res"
    [ "$ms" -le 6000 ] || fail "the reader waited $ms ms (bound 3 s + slack)"
    "$LABFS" status "$LAB_h" | tee "$OUT/$SCEN.status" || true
    grep -q 'NOT ANSWERING' "$OUT/$SCEN.status" || fail "status does not say Atlas is not answering"
    # A hard mount: open Atlas files went through the daemon, which is what bounded
    # the reader above.
    grep -q 'open Atlas files: through the daemon (bounded) (Atlas is a hard NFS mount' "$OUT/$SCEN.status" \
        || fail "status does not say open Atlas files go through the daemon on a hard mount"
    iptables -D INPUT -i lo -p tcp --dport 2049 -j DROP
    wait_for 120 "Atlas paths work again" sh -c "cat '$LAB_h/docs/f' >/dev/null 2>&1"
    [ "$(cat "$LAB_h/docs/f")" = before ] || fail "content after the outage"
    echo after >"$LAB_h/docs/g"
    [ "$(cat /srv/nsq/$SCEN-h/docs/g)" = after ] || fail "write after the outage"
    wait_for 30 "status says Atlas answers" sh -c "'$LABFS' status '$LAB_h' >'$OUT/$SCEN.status-after' && grep -q '^atlas .* answering (' '$OUT/$SCEN.status-after'"
}

# A soft NFS mount whose requests should fail within [atlas] timeout (timeo x (retrans
# + 1) = 2 s here) still keeps open Atlas files on the daemon path (src/fs/atlas_io.rs),
# because the NFS client does not keep to that bound: with the server hung, a file
# opened on the NFS mount itself (what a kernel passthrough read or write would run on)
# is measured beside one opened through labfs. The labfs read and write+fsync end with
# an error within labfs's bound; the NFS ones end with an error too, and their times
# go to $OUT/$SCEN.io (docs/benchmarks.md quotes them). Local paths keep working.
# (This VM's kernel, Debian 6.1, has no FUSE passthrough at all: 6.9+.)
soft_mount_hung_server() { # NFS_MOUNT SERVER_DIR
    local nfs=$1 srv=$2
    lab_up s "$nfs/$SCEN-s" '[atlas]
timeout = "4s"
probe_interval = "1s"'
    mkdir -p "$LAB_s/docs" "$LAB_s/cache"
    "$LABFS" status "$LAB_s" | tee "$OUT/$SCEN.status-before"
    grep -Fq 'open Atlas files: through the daemon (bounded) (Atlas is a soft NFS mount' "$OUT/$SCEN.status-before" \
        || fail "status does not say open Atlas files on a soft mount go through the daemon"
    grep -Fq 'whose requests fail after' "$OUT/$SCEN.status-before" && fail "status trusts the soft mount's timeout"
    grep -q 'open Atlas files: through the daemon, bounded by \[atlas\] timeout (Atlas is a soft NFS mount' "$LOG_s" \
        || fail "the log does not say why"
    # Written on the server: no page of them is in this node's caches.
    head -c $((4 * 1024 * 1024)) /dev/urandom >"$srv/$SCEN-s/docs/big"
    head -c $((4 * 1024 * 1024)) /dev/urandom >"$srv/$SCEN-s/docs/direct"
    echo before >"$LAB_s/docs/f"
    # One file open through labfs, one open on the NFS mount itself; each thread
    # reads where nobody read before, then writes and fsyncs, then closes.
    $PY - "$LAB_s/docs/big" "$nfs/$SCEN-s/docs/direct" "$OUT/$SCEN.io" <<'PYEOF' &
import errno, os, sys, threading, time
fds = {"labfs": os.open(sys.argv[1], os.O_RDWR), "nfs": os.open(sys.argv[2], os.O_RDWR)}
for fd in fds.values():
    os.pread(fd, 6, 0)
open(sys.argv[3] + ".ready", "w").close()
while not os.path.exists(sys.argv[3] + ".go"):
    time.sleep(0.05)
out = []
def timed(what, f):
    t0 = time.monotonic()
    try:
        f()
        res = "ok"
    except OSError as e:
        res = errno.errorcode.get(e.errno, str(e.errno))
    out.append("%s %s %d" % (what, res, (time.monotonic() - t0) * 1000))
def run(name, fd):
    timed(name + "-read", lambda: os.pread(fd, 4096, 3 * 1024 * 1024 + 512 * 1024))
    timed(name + "-write+fsync", lambda: (os.pwrite(fd, b"x" * 4096, 0), os.fsync(fd)))
    timed(name + "-close", lambda: os.close(fd))
ts = [threading.Thread(target=run, args=kv) for kv in fds.items()]
for t in ts:
    t.start()
for t in ts:
    t.join()
with open(sys.argv[3], "w") as f:
    f.write("\n".join(sorted(out)) + "\n")
PYEOF
    local io=$!
    wait_for 20 "the files are open" test -e "$OUT/$SCEN.io.ready"
    iptables -A INPUT -i lo -p tcp --dport 2049 -j DROP
    touch "$OUT/$SCEN.io.go"
    # Local paths keep working during the outage.
    echo local >"$LAB_s/cache/x"
    [ "$(cat "$LAB_s/cache/x")" = local ] || fail "local path"
    wait "$io" || fail "the program with the open files failed"
    cat "$OUT/$SCEN.io"
    [ "$(grep -c . "$OUT/$SCEN.io")" = 6 ] || fail "missing results"
    local what res ms
    while read -r what res ms; do
        case "$what" in
        labfs-read | labfs-write+fsync)
            # Through the daemon: ETIMEDOUT from labfs's bound (or EIO from NFS first).
            [ "$res" = EIO ] || [ "$res" = ETIMEDOUT ] || fail "$what: $res"
            # The bound: [atlas] timeout (4 s) + slack for the emulated VM.
            [ "$ms" -le 6000 ] || fail "$what took $ms ms (bound 4 s + slack)"
            ;;
        nfs-read | nfs-write+fsync)
            # The NFS client's own answer: an error, after however long it took.
            [ "$res" = EIO ] || [ "$res" = ETIMEDOUT ] || fail "$what: $res"
            ;;
        *-close)
            # The write error was reported by fsync already; close must not hang.
            [ "$ms" -le 30000 ] || fail "$what took $ms ms"
            ;;
        esac
    done <"$OUT/$SCEN.io"
    iptables -D INPUT -i lo -p tcp --dport 2049 -j DROP
    wait_for 120 "Atlas paths work again" sh -c "cat '$LAB_s/docs/f' >/dev/null 2>&1"
    [ "$(cat "$LAB_s/docs/f")" = before ] || fail "content after the outage"
    echo after >"$LAB_s/docs/g"
    [ "$(cat "$srv/$SCEN-s/docs/g")" = after ] || fail "write after the outage"
}

sc_soft_mount_hung_server_v3() {
    soft_mount_hung_server /mnt/s3 /srv/soft
}

sc_soft_mount_hung_server_v42() {
    soft_mount_hung_server /mnt/s42 /srv/soft
}

sc_export_not_mounted_refused() {
    # The export was initialised, but at boot it is not mounted: the mountpoint is
    # a bare directory (here: a directory on the node's own tmpfs).
    mkdir -p /mnt/bare /mnt/local/bare /mnt/lab/bare
    printf '[storage]\natlas = "/mnt/bare"\nlocal = "/mnt/local/bare"\n%s\n' "$RULES" >/mnt/cfg/bare.toml
    if "$LABFS" mount --config /mnt/cfg/bare.toml /mnt/lab/bare 2>"$OUT/$SCEN.err"; then
        umount /mnt/lab/bare
        fail "mounted over a bare directory"
    fi
    cat "$OUT/$SCEN.err"
    grep -qi 'mounted' "$OUT/$SCEN.err" || fail "the message does not say the export is not mounted"
    [ -z "$(ls -A /mnt/bare)" ] || fail "labfs wrote into the bare mountpoint"
}

sc_two_nodes_staleness() {
    lab_up a /mnt/a42/$SCEN-a
    # Node b: the same export through its own client cache, its own local SSD.
    mkdir -p "/mnt/b42/$SCEN-a"
    lab_up_second b "/mnt/b42/$SCEN-a"
    mkdir -p "$LAB_a/docs"
    # create on a -> seen on b within atlas_ttl (1 s) + the NFS client's cache (actimeo)
    local t0
    t0=$(date +%s%N)
    echo one >"$LAB_a/docs/x"
    wait_for 10 "b sees a's new file" test -e "$LAB_b/docs/x"
    echo "create seen after $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/$SCEN.windows"
    [ "$(cat "$LAB_b/docs/x")" = one ] || fail "content of the new file on b"
    t0=$(date +%s%N)
    echo two-changed >"$LAB_a/docs/x"
    if ! wait_for 10 "b sees a's change" sh -c "[ \"\$(cat '$LAB_b/docs/x')\" = two-changed ]"; then
        echo "server: $(cat /srv/nsq/$SCEN-a/docs/x); b's NFS client: $(cat /mnt/b42/$SCEN-a/docs/x);" \
            "b's labfs: $(cat "$LAB_b/docs/x"); stat via b's labfs: $(stat -c '%s %Y %i' "$LAB_b/docs/x")" \
            "via b's NFS: $(stat -c '%s %Y %i' /mnt/b42/$SCEN-a/docs/x)"
        fail "b never saw a's change"
    fi
    echo "change seen after $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/$SCEN.windows"
    t0=$(date +%s%N)
    rm "$LAB_a/docs/x"
    wait_for 10 "b sees a's delete" sh -c "! test -e '$LAB_b/docs/x'"
    echo "delete seen after $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/$SCEN.windows"
    # The documented window (docs/semantics.md, Atlas over NFS): atlas_ttl (1 s) plus
    # the NFS client's attribute cache of node b (actimeo=1): 2 s, plus slack for a
    # VM under emulation on a shared machine: every wait above has a 10 s deadline;
    # the measured windows are in $OUT/$SCEN.windows.
}

# A second node: its own host name (so staging directories are its own), its own
# local SSD, its own NFS client cache.
lab_up_second() { # ID ATLAS_DIR
    printf '#!/bin/sh\nhostname labfs-node-b\nexec "$@"\n' >/mnt/cfg/node-b.sh
    chmod +x /mnt/cfg/node-b.sh
    lab_up "$1" "$2" "" "unshare -u /mnt/cfg/node-b.sh"
}

sc_concurrent_promotes() {
    lab_up a /mnt/a42/$SCEN-a
    mkdir -p "/mnt/b42/$SCEN-a"
    lab_up_second b "/mnt/b42/$SCEN-a"
    # The same namespace path on both nodes.
    for n in a b; do
        local l="LAB_$n"
        mkdir -p "${!l}/scans/c/work/same" "${!l}/scans/c/work/mine-$n"
        for i in $(seq 1 20); do echo "$n $i" >"${!l}/scans/c/work/same/f$i"; done
        echo "$n" >"${!l}/scans/c/work/mine-$n/f"
    done
    "$LABFS" promote "$LAB_a/scans/c/work/same" >"$OUT/$SCEN.a" 2>&1 &
    local pa=$!
    "$LABFS" promote "$LAB_b/scans/c/work/same" >"$OUT/$SCEN.b" 2>&1 &
    local pb=$!
    local ra=0 rb=0
    wait $pa || ra=$?
    wait $pb || rb=$?
    cat "$OUT/$SCEN.a" "$OUT/$SCEN.b"
    [ $(( (ra == 0) + (rb == 0) )) = 1 ] || fail "same path: exit codes $ra and $rb (want exactly one winner)"
    local win lose
    if [ $ra = 0 ]; then win=a lose=b; else win=b lose=a; fi
    local server="/srv/nsq/$SCEN-a/scans/c/work/same"
    [ "$(cat "$server/f7")" = "$win 7" ] || fail "Atlas holds a mix: $(cat "$server/f7")"
    [ "$(cat "$server"/f* | cut -d' ' -f1 | sort -u)" = "$win" ] || fail "Atlas holds a mix of both trees"
    local ll="LOCAL_$lose"
    [ "$(ls "${!ll}/scans/c/work/same" | wc -l)" = 20 ] || fail "the loser lost its local copy"
    # Different paths at once: all succeed.
    "$LABFS" promote "$LAB_a/scans/c/work/mine-a" & pa=$!
    "$LABFS" promote "$LAB_b/scans/c/work/mine-b" & pb=$!
    wait $pa || fail "promotion of mine-a failed"
    wait $pb || fail "promotion of mine-b failed"
    [ "$(cat "/srv/nsq/$SCEN-a/scans/c/work/mine-a/f")" = a ] || fail "mine-a"
    [ "$(cat "/srv/nsq/$SCEN-a/scans/c/work/mine-b/f")" = b ] || fail "mine-b"
}
