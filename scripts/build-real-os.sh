#!/usr/bin/env bash
# Build a real Debian 12 system disk for the opt-in end-to-end test, into
# ${BOOTD_ASSETS:-<repo>/.cache/assets}/real-os/ (ignored, never committed):
#   debian12.qcow2   qcow2, 2 GiB virtual, ext4 directly on the whole disk (no partition table),
#                    so a PC mounts root=/dev/nbd0. debootstrap bookworm (minbase) + linux-image-amd64,
#                    initramfs-tools, nbd-client (its stock initramfs hook/script), systemd, udev.
#                    /boot holds exactly one vmlinuz-* and its initrd.img-* (the boot server reads them
#                    from there); the initrd has nbd-client, all NIC drivers (virtio-net, e1000, ...),
#                    DHCP (ip=dhcp, klibc ipconfig), e2fsck (root is checked before it is mounted) and
#                    init-premount/bootd-netup (see NETUP below; the only non-stock initramfs script).
#                    bootd-marker.service (multi-user.target) prints to /dev/ttyS0
#                      BOOTD-REALOS-MARKER kernel=<uname -r> initrd=<cat /etc/bootd-initrd-marker> marker=<cat /etc/bootd-marker>
#                    and powers the machine off. /etc/bootd-marker is "A".
#                    The line also says fresh=yes|no: whether this is the disk's first boot (a file the
#                    unit leaves in /var/lib/bootd-realos/ was not there yet).
#   debian12-update.qcow2   the same system after an admin's update: a newer kernel from bookworm-backports
#                    installed beside the old one (Debian keeps both; /vmlinuz points at the new one),
#                    /etc/bootd-marker "B". (A whole disk, written into a draft by the test.)
#   vmlinuz, initrd.img, kernel-version, update-kernel-version   the kernels (for checks)
#   cache/           debootstrap's .deb cache (a rebuild downloads nothing it already has)
# The PC boots it with (stock nbd-client 3.24 local-top/nbd syntax; port may be omitted = 10809):
#   console=ttyS0 root=/dev/nbd0 nbdroot=SERVER:PORT/EXPORT ip=dhcp ro
#   (or nbdroot=SERVER,EXPORT,nbd0 for port 10809; beware nbdroot=SERVER:/EXPORT asks for "/EXPORT";
#   without nbdroot= the script takes DHCP option 17 root-path in the same syntax)
# Idempotent and cached: nothing is done when the inputs hash matches the stamp; safe to run
# concurrently (flock). Prints image=, update=, kernel=, update_kernel= lines on stdout.
# Usage: scripts/build-real-os.sh [--force]
#   env BOOTD_ASSETS=DIR, BOOTD_DEBIAN_MIRROR=URL, BOOTD_REALOS_SIZE=2G,
#       BOOTD_REALOS_NETUP=0 (no bootd-netup initramfs script: stock DHCP timing, ~10 s slower boot)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
. "$HERE/asset-lib.sh"
asset_dir real-os

force=0
[ "${1:-}" = "--force" ] && force=1
log() { echo "build-real-os: $*" >&2; }

SUITE=bookworm
IMG=$O/debian12.qcow2
UPD=$O/debian12-update.qcow2
UPDATE_SUITE=${SUITE}-backports  # where the update's newer kernel comes from
IMG_SIZE=${BOOTD_REALOS_SIZE:-2G}
HOSTNAME_=bootd-realos
PACKAGES=linux-image-amd64,initramfs-tools,busybox,zstd,nbd-client,systemd,systemd-sysv,udev,kmod,e2fsprogs
# Modules forced into the initrd and loaded early (the nbd hook adds every NIC driver anyway, udev
# loads the one the PC needs): QEMU's virtio-net-pci and e1000/e1000e, nbd, ext4 (+ crc32c for csums).
INITRD_MODULES="virtio_pci virtio_net e1000 e1000e nbd crc32c_generic ext4"
# 1 (default): add init-premount/bootd-netup, which sets every NIC up before the stock scripts run
# klibc ipconfig. Stock, ipconfig's first DHCP round sends nothing (its first send fails) and it
# retries only after 10 s: ~10 s lost on every boot. 0: the stock initramfs-tools behaviour.
NETUP=${BOOTD_REALOS_NETUP:-1}

# The Debian mirror apt on this machine uses (sources are read at run time, never hard-coded).
mirror() {
    if [ -n "${BOOTD_DEBIAN_MIRROR:-}" ]; then echo "$BOOTD_DEBIAN_MIRROR"; return; fi
    # shellcheck disable=SC2016  # apt expands $(REPO_URI) itself
    apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s { print $1; exit }'
}
MIRROR=$(mirror)
[ -n "$MIRROR" ] || { log "no apt source for $SUITE found (set BOOTD_DEBIAN_MIRROR)"; exit 1; }
for t in debootstrap mke2fs qemu-img flock; do
    command -v "$t" >/dev/null || { log "$t missing (apt-get install debootstrap e2fsprogs qemu-utils util-linux)"; exit 1; }
done

PY=${BOOTD_PYTHON:-$ROOT/.venv/bin/python}  # bootd's own code: the netup script and the disk maker
# The initramfs script that sets the NICs up early: the client root's own (bootd/clientconfig/clientroot.py).
netup_script() {
    "$PY" -c \
        'import sys; from bootd.clientconfig.clientroot import NETUP_SCRIPT; sys.stdout.write(NETUP_SCRIPT)'
}
inputs_hash=$( { echo "$SUITE $MIRROR $IMG_SIZE $PACKAGES $INITRD_MODULES $NETUP"; cat "$HERE/build-real-os.sh";
    netup_script;
    dpkg-query -W -f '${Version}\n' debootstrap e2fsprogs 2>/dev/null; } | sha256sum | cut -c1-16)
report() {
    printf 'image=%s\nupdate=%s\nkernel=%s\nupdate_kernel=%s\n' "$IMG" "$UPD" "$(cat "$O/kernel-version")" \
        "$(cat "$O/update-kernel-version")"
}
if [ $force = 0 ] && [ -s "$IMG" ] && [ -s "$UPD" ] && [ -s "$O/vmlinuz" ] && [ -s "$O/initrd.img" ] \
   && [ "$(cat "$O/debian12.stamp" 2>/dev/null)" = "$inputs_hash" ]; then
    log "up to date: $IMG (kernel $(cat "$O/kernel-version")), $UPD (kernel $(cat "$O/update-kernel-version"))"
    report
    exit 0
fi

t0=$(date +%s)
# leftovers of an interrupted run (their mounts first: never rm -rf through a mounted /proc or /sys)
for old in "$O"/.build.*; do
    [ -d "$old" ] || continue
    for m in $(awk -v p="$old/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r); do umount -l "$m" || true; done
    rm -rf "$old"
done
tmp=$(mktemp -d "$O/.build.XXXXXX")
R=$tmp/root
unmount_all() {
    local m
    for m in $(awk -v p="$R/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done
}
cleanup() { unmount_all; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- debootstrap --------------------------------------------------------------------------------
mkdir -p "$O/cache/debootstrap"
log "debootstrap $SUITE from $MIRROR (minbase + ${PACKAGES//,/ })"
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$O/cache/debootstrap" \
    "$SUITE" "$R" "$MIRROR" > "$tmp/debootstrap.log" 2>&1 \
    || { tail -40 "$tmp/debootstrap.log" >&2; [ -f "$R/debootstrap/debootstrap.log" ] && tail -40 "$R/debootstrap/debootstrap.log" >&2; exit 1; }
unmount_all    # debootstrap normally unmounts its /proc and /sys itself

# ---- configuration ------------------------------------------------------------------------------
echo "$HOSTNAME_" > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' "$HOSTNAME_" > "$R/etc/hosts"
# Root comes from the initramfs (nbd-client in local-top); systemd only remounts it rw.
printf '# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/nbd0 / ext4 defaults 0 1\n' > "$R/etc/fstab"
echo "deb $MIRROR $SUITE main" > "$R/etc/apt/sources.list"
: > "$R/etc/resolv.conf"
: > "$R/etc/machine-id"          # empty: systemd makes one per boot (machine stays anonymous)
rm -f "$R/var/lib/dbus/machine-id"
echo A > "$R/etc/bootd-marker"

# initramfs: nbd-client's stock hook adds nbd-client, nbd.ko and all NIC drivers; the modules listed
# below are also loaded early. No resume device (none in this image, and none of the host's).
# FSTYPE: the root device does not exist at build time, so name its type (fsck hook, ext4 module).
cat > "$R/etc/initramfs-tools/conf.d/bootd.conf" <<'EOF'
# bootd real-OS test image: root over NBD, network via ip=dhcp (klibc ipconfig)
MODULES=netboot
RESUME=none
FSTYPE=ext4
COMPRESS=zstd
EOF
for m in $INITRD_MODULES; do
    grep -qx "$m" "$R/etc/initramfs-tools/modules" || echo "$m" >> "$R/etc/initramfs-tools/modules"
done
if [ "$NETUP" = 1 ]; then
    mkdir -p "$R/etc/initramfs-tools/scripts/init-premount"
    netup_script > "$R/etc/initramfs-tools/scripts/init-premount/bootd-netup"
    chmod 755 "$R/etc/initramfs-tools/scripts/init-premount/bootd-netup"
fi

# The marker unit: print one line to the serial port, then power off at once (a test waits for QEMU
# to exit). sync first so writes reach the NBD server.
cat > "$R/usr/local/sbin/bootd-marker" <<'EOF'
#!/bin/sh
initrd=$(cat /etc/bootd-initrd-marker 2>/dev/null || true)
marker=$(cat /etc/bootd-marker 2>/dev/null || true)
if [ -e /var/lib/bootd-realos/booted ]; then fresh=no; else fresh=yes; fi
mkdir -p /var/lib/bootd-realos && date > /var/lib/bootd-realos/booted
line="BOOTD-REALOS-MARKER kernel=$(uname -r) initrd=$initrd marker=$marker fresh=$fresh"
echo "$line" > /dev/ttyS0 2>/dev/null || true
echo "$line" > /dev/kmsg 2>/dev/null || true
sync
systemctl poweroff --force --force || poweroff -f
EOF
chmod 755 "$R/usr/local/sbin/bootd-marker"
cat > "$R/etc/systemd/system/bootd-marker.service" <<'EOF'
[Unit]
Description=bootd real-OS marker: report to ttyS0 and power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/bootd-marker

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/bootd-marker.service "$R/etc/systemd/system/multi-user.target.wants/bootd-marker.service"
ln -sf /lib/systemd/system/multi-user.target "$R/etc/systemd/system/default.target"

# ---- inside the chroot: lock root, one kernel, regenerate the initramfs --------------------------
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
in_root passwd -l root >/dev/null
kernels=$(cd "$R/boot" && ls vmlinuz-* 2>/dev/null | sed 's/^vmlinuz-//')
[ "$(echo "$kernels" | grep -c .)" = 1 ] || { log "expected exactly one kernel in /boot, found: ${kernels:-none}"; exit 1; }
KVER=$kernels
log "update-initramfs for $KVER"
in_root update-initramfs -u -k "$KVER" > "$tmp/initramfs.log" 2>&1 || { cat "$tmp/initramfs.log" >&2; exit 1; }
in_root lsinitramfs "/boot/initrd.img-$KVER" > "$tmp/initrd.list"
wants="/nbd-client scripts/local-top/nbd /ipconfig /fsck.ext4"
[ "$NETUP" = 1 ] && wants="$wants scripts/init-premount/bootd-netup /ip"
for want in $wants; do
    grep -q "$want\$" "$tmp/initrd.list" || { log "initrd lacks $want"; exit 1; }
done
for m in virtio_net e1000 e1000e nbd ext4; do
    grep -qE "/$m\.ko(\.[a-z]+)?\$" "$tmp/initrd.list" || grep -qE "/$m\.ko\$" "$R/lib/modules/$KVER/modules.builtin" \
        || { log "initrd lacks module $m"; exit 1; }
done
in_root apt-get clean
unmount_all
rm -f "$R/usr/sbin/policy-rc.d"
rm -rf "$R/var/lib/apt/lists/"* "$R/var/cache/apt/"*.bin "$R/var/log/"*.log "$R/var/log/apt/"* "$R/root/.bash_history"
[ "$(ls "$R"/boot/initrd.img-* | wc -l)" = 1 ] || { log "expected exactly one initrd in /boot"; exit 1; }
[ -d "$R/debootstrap" ] && rm -rf "$R/debootstrap"
# nothing may still be mounted below the tree we are about to copy into the filesystem
if awk -v p="$R/" 'index($2, p) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    log "still mounted below $R"; exit 1
fi

# ---- disk images: ext4 on the whole disk, made from the tree without mounting ---------------------
make_disk() {  # make_disk OUT.qcow2: the tree $R as an ext4 disk (the client-root builder's own function)
    "$PY" -c 'import sys; from pathlib import Path
from bootd.clientconfig.clientroot import make_disk_image
make_disk_image(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], label=sys.argv[4])' "$R" "$1" "$IMG_SIZE" "$HOSTNAME_"
}
log "debian12.qcow2: mke2fs -d ($(du -sh "$R" | cut -f1) of files, $IMG_SIZE disk)"
make_disk "$tmp/debian12.qcow2"
cp "$R/boot/vmlinuz-$KVER" "$tmp/vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$tmp/initrd.img"
chmod 644 "$tmp/vmlinuz" "$tmp/initrd.img"

# ---- the update: a newer kernel beside the old one, marker B ----------------------------------------
log "update: linux-image-amd64 from $UPDATE_SUITE"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
echo "deb $MIRROR $UPDATE_SUITE main" > "$R/etc/apt/sources.list.d/update.list"
cp /etc/resolv.conf "$R/etc/resolv.conf"
mkdir -p "$O/cache/apt-archives/partial"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind "$O/cache/apt-archives" "$R/var/cache/apt/archives"
{ in_root apt-get update -q && in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends -t "$UPDATE_SUITE" linux-image-amd64; } > "$tmp/update.log" 2>&1 \
    || { tail -40 "$tmp/update.log" >&2; exit 1; }
unmount_all
rm -f "$R/usr/sbin/policy-rc.d" "$R/etc/apt/sources.list.d/update.list"
: > "$R/etc/resolv.conf"
rm -rf "$R/var/lib/apt/lists/"* "$R/var/cache/apt/"*.bin "$R/var/log/"*.log "$R/var/log/apt/"*
echo B > "$R/etc/bootd-marker"
UKVER=$(cd "$R/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | grep -vx "$KVER")
[ "$(echo "$UKVER" | grep -c .)" = 1 ] || { log "expected one new kernel beside $KVER, found: ${UKVER:-none}"; exit 1; }
[ -s "$R/boot/initrd.img-$UKVER" ] || { log "no initramfs for $UKVER"; exit 1; }
log "debian12-update.qcow2: kernels $KVER and $UKVER"
make_disk "$tmp/debian12-update.qcow2"

mv "$tmp/debian12.qcow2" "$IMG"
mv "$tmp/debian12-update.qcow2" "$UPD"
mv "$tmp/vmlinuz" "$O/vmlinuz"
mv "$tmp/initrd.img" "$O/initrd.img"
echo "$KVER" > "$O/kernel-version"
echo "$UKVER" > "$O/update-kernel-version"
cp "$tmp/initrd.list" "$O/initrd.list"
cp "$tmp/initramfs.log" "$O/update-initramfs.log"
echo "$inputs_hash" > "$O/debian12.stamp"
log "built $IMG and $UPD in $(( $(date +%s) - t0 )) s: kernels $KVER, $UKVER; qcow2 $(du -h "$IMG" | cut -f1), $(du -h "$UPD" | cut -f1)"
report
