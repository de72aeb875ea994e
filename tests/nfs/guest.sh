#!/bin/bash
# Runs inside the NFS rig's VM (see tests/nfs/mod.rs): the guest kernel is Debian's own
# (with the NFS client, nfsd and fuse as modules), the root filesystem is the host's,
# read-only, and $OUT (the only writable host directory) receives the results.
#
#   guest.sh OUT LABFS [SCENARIO...]
#
# Sets up an NFS server on 127.0.0.1 exporting tmpfs directories (no_root_squash and
# root_squash), mounts them with the kernel client as v4.2 and v3, then runs each
# scenario of scenarios.sh in turn (all of them when none is named), writing
# OUT/<scenario>.result (PASS or FAIL) and OUT/<scenario>.log. OUT/rig.log has the
# setup; OUT/done is written last.
set -u
OUT=$1
LABFS=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
export OUT LABFS HERE
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec 3>&1 >"$OUT/rig.log" 2>&1
t0=$(date +%s.%N)
set -x

rig_fail() {
    echo "RIG SETUP FAILED: $*"
    echo "rig setup failed: $*" >"$OUT/rig.failed"
    date +%s.%N >"$OUT/done"
    exit 1
}

[ -x "$LABFS" ] || rig_fail "$LABFS is not visible in the VM"
for m in nfsd nfs nfsv3 nfsv4 fuse; do
    modprobe "$m" || rig_fail "modprobe $m"
done
ip link set lo up 2>/dev/null || true
hostname labfs-node-a

# Writable state for the NFS daemons (the root filesystem is read-only).
mount -t tmpfs tmpfs /var/lib/nfs || rig_fail "tmpfs on /var/lib/nfs"
mkdir -p /var/lib/nfs/rpc_pipefs /var/lib/nfs/v4recovery /var/lib/nfs/statd/sm /var/lib/nfs/statd/sm.bak
touch /var/lib/nfs/etab /var/lib/nfs/rmtab /var/lib/nfs/state
mount -t tmpfs tmpfs /srv || rig_fail "tmpfs on /srv"
mount -t tmpfs tmpfs /mnt || rig_fail "tmpfs on /mnt"
mkdir -p /run/rpcbind /run/sendsigs.omit.d
mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd || rig_fail "mount nfsd"
mount -t rpc_pipefs sunrpc /var/lib/nfs/rpc_pipefs || true

# ext4 images in memory: the VM kernel's tmpfs (6.1) has no user xattrs, which the
# exports (for v4.2 tags) and the local backends (for the trees promoted) need.
mkdir -p /run/images
mount -t tmpfs -o size=1200m tmpfs /run/images || rig_fail "tmpfs for the images"
modprobe loop || true
ext4_at() { # name size-MiB mountpoint
    truncate -s "${2}M" "/run/images/$1.img"
    mkfs.ext4 -q -F -O ^has_journal "/run/images/$1.img" || return 1
    mkdir -p "$3"
    mount -o loop,user_xattr,acl "/run/images/$1.img" "$3"
}

# The exports: each an ext4 filesystem of its own, like a real export.
export_dir() { # name fsid options
    ext4_at "$1" 256 "/srv/$1" || rig_fail "ext4 /srv/$1"
    echo "/srv/$1 127.0.0.1(rw,sync,no_subtree_check,fsid=$2,$3)" >>/etc/exports
}
: >/etc/exports
# The NFSv4 pseudo-root (the VM's / is 9p, which nfsd cannot export): v4 clients mount
# 127.0.0.1:/NAME, v3 clients 127.0.0.1:/srv/NAME.
echo "/srv 127.0.0.1(ro,fsid=0,no_subtree_check,crossmnt)" >>/etc/exports
export_dir nsq 101 no_root_squash
export_dir sq 102 root_squash
export_dir fail 103 no_root_squash
export_dir soft 104 no_root_squash
# Short grace and lease periods: v4 opens wait for the grace period after nfsd starts.
echo 10 >/proc/fs/nfsd/nfsv4leasetime || true
echo 10 >/proc/fs/nfsd/nfsv4gracetime || true
# No NFSv4 delegations: the two "nodes" below are two mounts of one kernel client,
# which the server sees as one NFSv4 client, so it would never recall one node's
# delegation when the other writes (real nodes are separate clients, whose delegations
# the server recalls on a conflicting open). nfsd grants delegations only with leases.
echo 0 >/proc/sys/fs/leases-enable || rig_fail "disabling leases (delegations)"
rpcbind -w || rig_fail rpcbind
rpc.statd --no-notify || echo "rpc.statd did not start; v3 mounts use nolock"
exportfs -ra || rig_fail "exportfs -ra"
rpc.nfsd 8 || rig_fail rpc.nfsd
rpc.mountd || rig_fail rpc.mountd
exportfs -v

V3LOCK=""
pgrep -x rpc.statd >/dev/null || V3LOCK=",nolock"
nfs_mount() { # export vers mountpoint [extra options]
    local src="127.0.0.1:/srv/$1"
    [ "$2" = 3 ] || src="127.0.0.1:/$1"
    mkdir -p "$3"
    mount -t nfs -o "vers=$2,hard,proto=tcp,timeo=50,retrans=2${4:+,$4}" "$src" "$3"
}
nfs_mount nsq 4.2 /mnt/a42 || rig_fail "mount v4.2"
nfs_mount nsq 3 /mnt/a3 "nolock" || rig_fail "mount v3"
nfs_mount fail 3 /mnt/f3 "nolock" || rig_fail "mount v3 (fail export)"
nfs_mount sq 4.2 /mnt/sq42 || rig_fail "mount v4.2 root_squash"
# The second node's view of the same export: its own client cache, attributes
# cached for 1 s (actimeo=1; see docs/operations.md, NFS export settings).
nfs_mount nsq 4.2 /mnt/b42 nosharecache,actimeo=1 || rig_fail "mount v4.2 nosharecache"
nfs_mount fail 4.2 /mnt/f42 || rig_fail "mount v4.2 (fail export)"
# Soft mounts whose requests should fail after timeo x (retrans + 1) = 1 s x 2 = 2 s
# (the soft_mount_hung_server scenarios measure what they do).
mkdir -p /mnt/s3 /mnt/s42
mount -t nfs -o vers=3,soft,proto=tcp,timeo=10,retrans=1,nolock 127.0.0.1:/srv/soft /mnt/s3 || rig_fail "mount v3 soft"
mount -t nfs -o vers=4.2,softerr,proto=tcp,timeo=10,retrans=1 127.0.0.1:/soft /mnt/s42 || rig_fail "mount v4.2 softerr"
findmnt -t nfs,nfs4
# The nodes' local SSDs.
ext4_at local 512 /mnt/local || rig_fail "ext4 for the local backends"
# The grace period: wait until an open on v4 is answered.
deadline=$(( $(date +%s) + 60 ))
until touch /mnt/a42/.grace-probe 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || rig_fail "v4 grace period did not end"
    sleep 0.5
done
rm -f /mnt/a42/.grace-probe
t1=$(date +%s.%N)
echo "rig ready in $(echo "$t1 - $t0" | bc 2>/dev/null || echo "?") s"
echo "$t0 $t1" >"$OUT/rig.times"
set +x

# shellcheck source=tests/nfs/scenarios.sh
. "$HERE/scenarios.sh"
if [ "$#" -eq 0 ]; then
    set -- $(scenario_list)
fi
for s in "$@"; do
    run_scenario "$s"
done
date +%s.%N >"$OUT/done"
