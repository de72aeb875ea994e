#!/bin/sh
# Install labfs, its mount(8) helpers and the systemd unit.
#
#   cargo build --release && sudo mount-helpers/install.sh
#   sudo mount-helpers/install.sh --uninstall
#
# Installs:
#   $PREFIX/bin/labfs                      the binary (PREFIX=/usr/local)
#   $SBIN/mount.fuse.labfs -> the binary   so fstab type fuse.labfs works (SBIN=/sbin)
#   $SBIN/mount.labfs      -> the binary   so `mount -t labfs` works
#   $UNITDIR/labfs@.service                (UNITDIR=/etc/systemd/system)
#   $DOCDIR/operations.md                  (DOCDIR=$PREFIX/share/doc/labfs)
# Nothing else: /etc/labfs and /etc/xattr.conf are never touched (labfs does not list
# its user.labfs.* attributes, so cp -a and mv need no xattr.conf line).
# mount(8) looks for helpers in /sbin only (not in PATH), hence SBIN.
# DESTDIR=/some/root installs below that root (packaging, tests); systemd is then not
# told about the unit, and the paths printed are the ones written (below DESTDIR).
# On Debian and derivatives, prefer the package (docs/operations.md, Install).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
PREFIX=${PREFIX:-/usr/local}
SBIN=${SBIN:-/sbin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
DOCDIR=${DOCDIR:-$PREFIX/share/doc/labfs}
DESTDIR=${DESTDIR:-}

bin="$PREFIX/bin/labfs"

reload_systemd() {
    if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
    fi
}

if [ "${1:-}" = "--uninstall" ]; then
    for n in mount.fuse.labfs mount.labfs; do
        l="$DESTDIR$SBIN/$n"
        # Only remove our own links.
        if [ -L "$l" ] && [ "$(readlink "$l")" = "$bin" ]; then
            rm -f "$l"
        fi
    done
    rm -f "$DESTDIR$UNITDIR/labfs@.service" "$DESTDIR$bin" "$DESTDIR$DOCDIR/operations.md"
    reload_systemd
    echo "labfs uninstalled from ${DESTDIR:-/} (/etc/labfs is never touched)"
    exit 0
fi

src=${1:-$repo/target/release/labfs}
if [ ! -x "$src" ]; then
    echo "install.sh: $src: no labfs binary; build it first: cargo build --release" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ] && [ -z "$DESTDIR" ]; then
    echo "install.sh: run as root (it writes $PREFIX/bin, $SBIN and $UNITDIR)" >&2
    exit 1
fi

install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$SBIN" "$DESTDIR$UNITDIR" "$DESTDIR$DOCDIR"
# Copy then rename: a running daemon keeps its old binary, never a half-written one.
install -m 0755 "$src" "$DESTDIR$bin.new"
mv -f "$DESTDIR$bin.new" "$DESTDIR$bin"
for n in mount.fuse.labfs mount.labfs; do
    ln -sfn "$bin" "$DESTDIR$SBIN/$n"
done
sed "s|/usr/local/bin/labfs|$bin|g; s|/usr/local/share/doc/labfs|$DOCDIR|g" \
    "$here/labfs@.service" > "$DESTDIR$UNITDIR/labfs@.service"
chmod 0644 "$DESTDIR$UNITDIR/labfs@.service"
if [ -f "$repo/docs/operations.md" ]; then
    install -m 0644 "$repo/docs/operations.md" "$DESTDIR$DOCDIR/operations.md"
fi
reload_systemd

echo "installed $DESTDIR$bin, $DESTDIR$SBIN/mount.fuse.labfs, $DESTDIR$SBIN/mount.labfs, $DESTDIR$UNITDIR/labfs@.service"
if [ -z "$DESTDIR" ] && [ ! -e /etc/labfs/labfs.toml ]; then
    echo "next: write /etc/labfs/labfs.toml (docs/rules.md), run 'labfs init-atlas' once per Atlas,"
    echo "      then add the fstab line or enable labfs@lab.service (docs/operations.md)"
fi
