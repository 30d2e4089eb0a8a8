#!/usr/bin/env bash
# Build the test/demo client assets from Debian packages into .cache/assets (ignored, never committed):
#   vmlinuz            Debian 6.1 kernel (newest linux-image-6.1.0-*-amd64 apt knows; downloaded, not installed)
#   kernel-version     its version string (e.g. 6.1.0-56-amd64)
#   kernel/lib/modules/<kver>/   its full module tree, with modules.dep made by busybox depmod
#   initrd.img         busybox-static initramfs: NIC/nbd/ext4 modules, nbd-client (+ libs), /init
#                      from scripts/assets/init (DHCP, NBD disk from bootd.nbd=, prints BOOTD-MARKER/FRESH)
#   images/os-A.qcow2, images/os-B.qcow2   small ext4 OS images whose /marker is "A" / "B"
# Idempotent: each part is rebuilt only when missing or when its inputs changed; safe to run
# concurrently (flock). Usage: scripts/build-assets.sh [--refresh-kernel]   (env BOOTD_ASSETS=DIR)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
A=${BOOTD_ASSETS:-$ROOT/.cache/assets}
mkdir -p "$A"
A=$(cd "$A" && pwd)
exec 9>"$A/.lock"
flock 9

refresh=0
[ "${1:-}" = "--refresh-kernel" ] && refresh=1
log() { echo "build-assets: $*" >&2; }

# ---- kernel -------------------------------------------------------------------------------------
newest_kernel() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1 \
        | sed 's/^linux-image-//'
}
KVER=
[ -s "$A/kernel-version" ] && KVER=$(cat "$A/kernel-version")
if [ $refresh = 1 ] || [ -z "$KVER" ] || [ ! -s "$A/vmlinuz" ] || [ ! -s "$A/kernel/lib/modules/$KVER/modules.dep" ]; then
    KVER=$(newest_kernel)
    [ -n "$KVER" ] || { log "apt knows no linux-image-6.1.0-*-amd64 (run apt-get update)"; exit 1; }
    log "kernel $KVER: downloading"
    tmp=$(mktemp -d "$A/.kernel.XXXXXX")
    (cd "$tmp" && apt-get download -q "linux-image-$KVER" >/dev/null 2>"$tmp/apt.err") \
        || { cat "$tmp/apt.err" >&2; rm -rf "$tmp"; exit 1; }
    dpkg-deb -x "$tmp"/linux-image-"$KVER"_*.deb "$tmp/root"
    busybox depmod -b "$tmp/root" "$KVER"
    rm -rf "$A/kernel"
    mv "$tmp/root" "$A/kernel"
    rm -rf "$tmp"
    cp "$A/kernel/boot/vmlinuz-$KVER" "$A/vmlinuz.tmp" && mv "$A/vmlinuz.tmp" "$A/vmlinuz"
    echo "$KVER" > "$A/kernel-version.tmp" && mv "$A/kernel-version.tmp" "$A/kernel-version"
fi
MODDIR=$A/kernel/lib/modules/$KVER

# ---- initramfs ----------------------------------------------------------------------------------
# Modules the client loads at boot, in this order (modprobe pulls in their dependencies):
# crc32c_generic before ext4 (metadata_csum, no udev to load it on demand); NICs QEMU offers
# (e1000 is the default for -machine pc, e1000e for q35, virtio-net); nbd; virtio_blk/ata for
# helpers that give the guest a local disk.
MODULES="crc32c_generic ext4 virtio_pci virtio_net e1000 e1000e nbd virtio_blk ata_piix sd_mod"
inputs_hash=$( { echo "$KVER $MODULES"; cat "$HERE/build-assets.sh" "$HERE/assets/init" "$HERE/assets/udhcpc.script" \
    /usr/sbin/nbd-client; busybox 2>&1 | sed -n 1p; } | sha256sum | cut -c1-16)
if [ ! -s "$A/initrd.img" ] || [ "$(cat "$A/initrd.stamp" 2>/dev/null)" != "$inputs_hash" ]; then
    log "initrd.img: building for $KVER"
    tmp=$(mktemp -d "$A/.initrd.XXXXXX")
    R=$tmp/root
    mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,usr/bin,usr/sbin,lib/modules/"$KVER"}
    cp /bin/busybox "$R/bin/busybox"
    for app in $(busybox --list-full); do
        [ -e "$R/$app" ] || ln -s /bin/busybox "$R/$app"
    done
    # module closure from modules.dep (names compare with '-' and '_' equal)
    closure=$(awk -v want="$MODULES" '
        function base(p,  b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); gsub(/-/, "_", b); return b }
        BEGIN { n = split(want, w, " ") }
        { f = $1; sub(/:$/, "", f); path[base(f)] = f; deps[f] = ""
          for (i = 2; i <= NF; i++) deps[f] = deps[f] " " $i }
        function add(f,  d, k, i) { if (f in seen) return; seen[f] = 1; print f
          k = split(deps[f], d, " "); for (i = 1; i <= k; i++) add(d[i]) }
        END { for (i = 1; i <= n; i++) { m = w[i]; gsub(/-/, "_", m)
                if (m in path) add(path[m]) } }' "$MODDIR/modules.dep")
    for f in $closure; do
        mkdir -p "$R/lib/modules/$KVER/$(dirname "$f")"
        cp "$MODDIR/$f" "$R/lib/modules/$KVER/$f"
    done
    for f in modules.builtin modules.builtin.modinfo modules.order; do
        [ -e "$MODDIR/$f" ] && cp "$MODDIR/$f" "$R/lib/modules/$KVER/"
    done
    busybox depmod -b "$R" "$KVER"
    # modules the kernel lacks both as .ko and built in are a build error, not a silent boot failure
    for m in $MODULES; do
        mm=${m//-/_}
        if ! grep -qE "/${mm//_/[-_]}\.ko(\.[a-z]+)?$" <(sed 's/:.*//' "$R/lib/modules/$KVER/modules.dep") \
           && ! grep -qE "/${mm//_/[-_]}\.ko$" "$MODDIR/modules.builtin"; then
            log "module $m not found in $KVER"; exit 1
        fi
        grep -qE "/${mm//_/[-_]}\.ko$" "$MODDIR/modules.builtin" || echo "$m"
    done > "$R/etc/modules"
    # nbd-client (busybox-static has none) with the libraries ldd lists and the dynamic loader
    cp /usr/sbin/nbd-client "$R/sbin/nbd-client"
    for lib in $(ldd /usr/sbin/nbd-client | awk '/=>/ && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
    cp "$HERE/assets/init" "$R/init"
    cp "$HERE/assets/udhcpc.script" "$R/etc/udhcpc.script"
    chmod 755 "$R/init" "$R/etc/udhcpc.script"
    (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) > "$tmp/initrd.img"
    mv "$tmp/initrd.img" "$A/initrd.img"
    echo "$inputs_hash" > "$A/initrd.stamp"
    rm -rf "$tmp"
fi

# ---- OS images ----------------------------------------------------------------------------------
# Two small ext4 filesystems (no partition table) made with mke2fs -d, no mounting; /marker differs.
IMG_SIZE=${BOOTD_IMAGE_SIZE:-64M}
img_hash=$( { echo "$IMG_SIZE"; sed -n '/^# ---- OS images/,$p' "$HERE/build-assets.sh"; } | sha256sum | cut -c1-16)
mkdir -p "$A/images"
for name in A B; do
    out=$A/images/os-$name.qcow2
    if [ -s "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$img_hash" ]; then continue; fi
    log "images/os-$name.qcow2: building"
    tmp=$(mktemp -d "$A/.image.XXXXXX")
    mkdir -p "$tmp/root/etc" "$tmp/root/home"
    echo "$name" > "$tmp/root/marker"
    printf 'NAME="bootd test OS %s"\nID=bootd-test\nVERSION_ID=%s\n' "$name" "$name" > "$tmp/root/etc/os-release"
    mke2fs -q -t ext4 -L "bootd-os-$name" -d "$tmp/root" -E root_owner=0:0 "$tmp/os.raw" "$IMG_SIZE" >/dev/null
    qemu-img convert -q -f raw -O qcow2 "$tmp/os.raw" "$tmp/os.qcow2"
    mv "$tmp/os.qcow2" "$out"
    echo "$img_hash" > "$out.stamp"
    rm -rf "$tmp"
done
log "ready in $A: vmlinuz initrd.img images/os-A.qcow2 images/os-B.qcow2 (kernel $KVER)"
