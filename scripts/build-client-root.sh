#!/usr/bin/env bash
# Build the client root for the opt-in client-screen test and `make demo-client`, with the product's own
# builder (`bootctl clientroot build`), into ${BOOTD_ASSETS:-<repo>/.cache/assets}/client-root/ (ignored):
#   root/            the tree (exported read-only over NFS in the test's NFS run)
#   clientroot.qcow2 the same tree as ext4 on a qcow2 disk (imported as a kind: native image: NBD run)
#   vmlinuz, initrd.img, kernel-version   its kernel and initramfs (the NFS run's boot files)
#   build.json       bootctl's summary (sizes, seconds)
#   cache/           debootstrap's .deb cache (a rebuild downloads nothing it already has)
# Idempotent: nothing is done while the inputs' hash (the builder's source, suite, mirror) matches the
# stamp; safe to run concurrently (flock). Prints root=, image=, kernel=, vmlinuz=, initrd= on stdout.
# Usage: scripts/build-client-root.sh [--force]     env BOOTD_ASSETS=DIR, BOOTD_DEBIAN_MIRROR=URL
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
. "$HERE/asset-lib.sh"
asset_dir client-root
log() { echo "build-client-root: $*" >&2; }
PY=${BOOTD_PYTHON:-$ROOT/.venv/bin/python}
SUITE=bookworm
MIRROR=${BOOTD_DEBIAN_MIRROR:-$("$PY" -c 'from bootd.clientconfig.clientroot import apt_mirror; print(apt_mirror())')}
hash=$( { echo "$SUITE $MIRROR"; cat "$ROOT/bootd/clientconfig/clientroot.py" "$HERE/build-client-root.sh"; } \
        | sha256sum | cut -c1-16)
report() {
    printf 'root=%s\nimage=%s\nkernel=%s\nvmlinuz=%s\ninitrd=%s\n' "$O/root" "$O/clientroot.qcow2" \
        "$(cat "$O/kernel-version")" "$O/vmlinuz" "$O/initrd.img"
}
if [ "${1:-}" != --force ] && [ "$(cat "$O/stamp" 2>/dev/null)" = "$hash" ] && [ -s "$O/clientroot.qcow2" ]; then
    log "up to date: $O"
    report
    exit 0
fi
# leftovers of an interrupted run: unmount before removing (never rm -rf through a mounted /proc)
for m in $(awk -v p="$O/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r); do umount -l "$m" || true; done
rm -rf "$O/root" "$O/clientroot.qcow2" "$O/stamp"
log "bootctl clientroot build (debootstrap $SUITE from $MIRROR, ~2 min)"
"$PY" -m bootd.cli.bootctl clientroot build "$O/root" --image "$O/clientroot.qcow2" --cache-dir "$O/cache" \
    --mirror "$MIRROR" --json > "$O/build.json"
kver=$(cd "$O/root/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//')
cp "$O/root/boot/vmlinuz-$kver" "$O/vmlinuz"
cp "$O/root/boot/initrd.img-$kver" "$O/initrd.img"
chmod 644 "$O/vmlinuz" "$O/initrd.img"
echo "$kver" > "$O/kernel-version"
echo "$hash" > "$O/stamp"
log "built in $O: $(du -sh "$O/root" | cut -f1) tree, $(du -h "$O/clientroot.qcow2" | cut -f1) qcow2"
report
