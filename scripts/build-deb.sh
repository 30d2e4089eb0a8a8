#!/usr/bin/env bash
# `make deb`: build bootd_<version>_<arch>.deb from this tree with dpkg-deb (no debian/ directory).
#
# Layout (README "Install on a server" says why): a venv under /opt/bootd made from Debian's python3
# (pydantic 2, qemu.qmp and a recent aiohttp are not in Debian 12; Debian's own python3-libnbd and
# python3-systemd come in through --system-site-packages), /usr/bin/bootd and bootctl linking into it,
# the C helpers compiled here (scripts/build-helpers.py) into /usr/lib/bootd/helpers, the unit, a starter
# config as a conffile, /var/lib/bootd. Depends: deps/runtime-packages.txt (no gcc).
#
# Usage: scripts/build-deb.sh [OUT_DIR]   (default: the repository root). Prints the .deb's path.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$SRC}")
PY=/usr/bin/python3
VERSION=$(sed -n 's/^version *= *//p' "$SRC/setup.cfg")
ARCH=$(dpkg --print-architecture)
PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
NEXT_PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
[ -n "$VERSION" ] || { echo "build-deb: no version in setup.cfg" >&2; exit 1; }

WORK=$(mktemp -d /tmp/bootd-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/stage
VENV=/opt/bootd

# 1. a wheel from a copy of the tree (setuptools writes build/ and *.egg-info next to the sources)
mkdir -p "$WORK/src" "$WORK/wheels"
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude=./test-artifacts \
    --exclude=./build --exclude='*.egg-info' --exclude='__pycache__' --exclude='./.*_cache' \
    --exclude=./.hypothesis --exclude='*.deb' -cf - . | tar -C "$WORK/src" -xf -
pip_log=$WORK/pip.log
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK/src" >"$pip_log" 2>&1 \
    || { tail -30 "$pip_log" >&2; exit 1; }

# 2. the venv, built in the staging tree, then made to live at /opt/bootd. Without system site packages
#    while installing, so every PyPI dependency lands in the venv (not satisfied by a host-only package).
$PY -m venv "$STAGE$VENV"
"$STAGE$VENV/bin/python" -m pip install -q --no-compile "$WORK"/wheels/bootd-*.whl >"$pip_log" 2>&1 \
    || { tail -30 "$pip_log" >&2; exit 1; }
"$STAGE$VENV/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null 2>&1 || true
sed -i 's/^include-system-site-packages = .*/include-system-site-packages = true/' "$STAGE$VENV/pyvenv.cfg"
grep -rlI --null "$STAGE$VENV" "$STAGE$VENV/bin" "$STAGE$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s|$STAGE$VENV|$VENV|g"
rm -f "$STAGE$VENV"/bin/{activate.csh,activate.fish,Activate.ps1}
# byte-compiled here (the unit's ProtectSystem=strict keeps /opt read-only at run time), with the
# installed paths in the code objects
"$STAGE$VENV/bin/python" -m compileall -q -j 0 -s "$STAGE" -p / "$STAGE$VENV/lib" >/dev/null
find "$STAGE$VENV" -name direct_url.json -delete
if grep -rlI "$WORK" "$STAGE$VENV" >/dev/null; then
    echo "build-deb: the venv still names the build directory:" >&2
    grep -rlI "$WORK" "$STAGE$VENV" >&2
    exit 1
fi

# 3. the C helpers, compiled now with bootd's flags (bootd looks for them in /usr/lib/bootd/helpers)
"$STAGE$VENV/bin/python" "$SRC/scripts/build-helpers.py" "$STAGE/usr/lib/bootd/helpers" >/dev/null

# 4. commands, unit, config, docs, state directory
install -d "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE/etc/bootd" "$STAGE/usr/share/doc/bootd"
ln -s "$VENV/bin/bootd" "$STAGE/usr/bin/bootd"
ln -s "$VENV/bin/bootctl" "$STAGE/usr/bin/bootctl"
install -m 0644 "$SRC/systemd/bootd.service" "$STAGE/lib/systemd/system/bootd.service"
install -m 0640 "$SRC/configs/bootd.yaml" "$STAGE/etc/bootd/bootd.yaml"
install -m 0644 "$SRC/README.md" "$SRC/configs/example.yaml" "$STAGE/usr/share/doc/bootd/"
printf 'bootd %s\nLicense: GPL-3.0-or-later (/usr/share/common-licenses/GPL-3)\n' "$VERSION" \
    > "$STAGE/usr/share/doc/bootd/copyright"
install -d -m 0750 "$STAGE/var/lib/bootd"

# 5. control files
DEPENDS="python3 (>= $PYVER), python3 (<< $NEXT_PYVER), libc6, libgcc-s1"
for p in $(grep -v '^\s*#' "$SRC/deps/runtime-packages.txt" | awk 'NF && $2 != "suggests" {print $1}'); do
    [ "$p" = python3 ] || DEPENDS="$DEPENDS, $p"
done
SUGGESTS=$(grep -v '^\s*#' "$SRC/deps/runtime-packages.txt" | awk '$2 == "suggests" {print $1}' | paste -sd, | sed 's/,/, /g')
install -d "$STAGE/DEBIAN"
cat > "$STAGE/DEBIAN/control" <<EOF
Package: bootd
Version: $VERSION
Architecture: $ARCH
Maintainer: bootd developers <bootd@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Depends: $DEPENDS
Suggests: $SUGGESTS, nfs-ganesha, nfs-ganesha-vfs, nfs-kernel-server
Section: net
Priority: optional
Description: network-boot server for computer labs
 DHCP/proxyDHCP, TFTP and HTTP boot menus, NBD copy-on-write disks from OS snapshots, one daemon
 (bootd) and its admin tool (bootctl). Configuration: /etc/bootd/bootd.yaml.
EOF
echo /etc/bootd/bootd.yaml > "$STAGE/DEBIAN/conffiles"
# Maintainer scripts as dh_installsystemd writes them: enable the unit, start it on a fresh install
# (the starter config serves nothing), restart it on upgrade, stop it on removal.
cat > "$STAGE/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ] || [ "$1" = abort-upgrade ]; then
    if deb-systemd-helper debian-installed bootd.service; then
        deb-systemd-helper update-state bootd.service >/dev/null || true
    else
        deb-systemd-helper enable bootd.service >/dev/null || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then action=restart; else action=start; fi
        deb-systemd-invoke $action bootd.service >/dev/null || true
    fi
fi
EOF
cat > "$STAGE/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop bootd.service >/dev/null || true
fi
EOF
cat > "$STAGE/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ]; then
    deb-systemd-helper mask bootd.service >/dev/null || true
fi
if [ "$1" = purge ]; then
    deb-systemd-helper purge bootd.service >/dev/null || true
    deb-systemd-helper unmask bootd.service >/dev/null || true
    # /var/lib/bootd (state database, snapshots, disks) is kept: remove it by hand if it is no longer wanted
fi
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

mkdir -p "$OUT"
DEB="$OUT/bootd_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
