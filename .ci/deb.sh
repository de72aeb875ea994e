#!/bin/sh
# The Debian package: build it with cargo-deb, install it with dpkg -i on this
# machine, mount from an fstab line through the installed helper
# (/usr/sbin/mount.fuse.labfs), then remove it again. Run as root from the repository
# (.ci/run calls it); cargo-deb comes from crates.io and is reused when present.
set -eu
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked

cargo build --release --locked
x=target/deb-extra
rm -rf "$x"
mkdir -p "$x/man" "$x/completions"
target/release/labfs man --dir "$x/man"
target/release/labfs completions bash > "$x/completions/labfs"
target/release/labfs completions zsh > "$x/completions/_labfs"
target/release/labfs completions fish > "$x/completions/labfs.fish"
sed 's|/usr/local/bin/labfs|/usr/bin/labfs|g; s|/usr/local/share/doc/labfs|/usr/share/doc/labfs|g' \
    mount-helpers/labfs@.service > "$x/labfs@.service"
# Links to the installed binary (dangling here; cargo-deb packs them as symlinks).
ln -sfn /usr/bin/labfs "$x/mount.fuse.labfs"
ln -sfn /usr/bin/labfs "$x/mount.labfs"
cargo deb --no-build --no-strip
deb=$(ls -t target/debian/labfs_*.deb | head -n 1)
echo "deb.sh: built $deb"
dpkg-deb --contents "$deb"

work=$(mktemp -d)
cleanup() {
    umount "$work/lab" 2>/dev/null || true
    umount "$work/atlas" "$work/local" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

dpkg -i "$deb"
test -x /usr/bin/labfs
test "$(readlink -f /usr/sbin/mount.fuse.labfs)" = /usr/bin/labfs
test -f /usr/share/man/man1/labfs.1 || test -f /usr/share/man/man1/labfs.1.gz
test -f /usr/share/man/man1/labfs-status.1 || test -f /usr/share/man/man1/labfs-status.1.gz
test -f /usr/share/bash-completion/completions/labfs
grep -q 'ExecStart=/usr/bin/labfs mount' /usr/lib/systemd/system/labfs@.service
test -f /usr/share/doc/labfs/examples/labfs.toml
# No file under /etc comes from the package (no xattr.conf: labfs does not list its
# attributes, so cp -a and mv need no skip line).
if dpkg -L labfs | grep -q '^/etc/'; then
    echo "deb.sh: the package ships files under /etc" >&2
    exit 1
fi

mkdir -p "$work/atlas" "$work/local" "$work/lab"
mount -t tmpfs tmpfs "$work/atlas"
mount -t tmpfs tmpfs "$work/local"
cat > "$work/labfs.toml" <<TOML
[storage]
atlas = "$work/atlas"
local = "$work/local"

[[rule]]
path = "/cache"
class = "ephemeral"

[[dir]]
path = "/cache"
mode = "1777"
TOML
/usr/bin/labfs init-atlas --config "$work/labfs.toml"
printf '%s %s fuse.labfs allow_other,_netdev,nofail 0 0\n' "$work/labfs.toml" "$work/lab" > "$work/fstab"
mount -T "$work/fstab" "$work/lab"
test "$(findmnt -n -o FSTYPE "$work/lab")" = fuse.labfs
echo hi > "$work/lab/cache/x"
test -f "$work/local/cache/x"
/usr/bin/labfs status "$work/lab" >/dev/null
/usr/bin/labfs status --format prometheus "$work/lab" | grep -q '^labfs_atlas_up{.*} 1$'
umount "$work/lab"
dpkg -r labfs
test ! -e /usr/sbin/mount.fuse.labfs
echo "deb.sh: package built, installed, mounted from fstab through /usr/sbin/mount.fuse.labfs, removed"
