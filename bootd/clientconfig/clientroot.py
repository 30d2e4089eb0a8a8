"""Build a client root: the minimal Debian a lab PC boots over NFS, with QEMU, an X server, a VNC
viewer, nbd-client and an init hook that fetches the host's rendered jobs/units from bootd and
starts them.

Runs debootstrap (the mirror is read from apt's own configuration at run time) and reports progress
as it goes. The root is exported read-only, so the hook installs the units under /run (tmpfs) and
/etc/fstab puts tmpfs on /tmp, /var/tmp and /var/log.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, TypedDict

PACKAGES = ["systemd-sysv", "udev", "iproute2", "kmod", "procps", "curl", "ca-certificates",
            # its own kernel and initramfs: root over NBD (nbd-client's stock hook) or NFSv4 (below)
            "linux-image-amd64", "initramfs-tools", "busybox", "zstd", "e2fsprogs", "nbd-client",
            # the screen: QEMU (with SeaBIOS and its VGA BIOS), Xorg, a VNC viewer
            "qemu-system-x86", "seabios", "xserver-xorg-core", "xserver-xorg-input-libinput",
            "xserver-xorg-video-fbdev", "tigervnc-viewer"]

# Modules in the initramfs, loaded early: QEMU's and common NICs, the block and file systems a root
# comes over (nbd + ext4, NFSv4 + overlay for the writable layer on top of a read-only NFS root).
INITRD_MODULES = ["virtio_pci", "virtio_net", "e1000", "e1000e", "nbd", "crc32c_generic", "ext4",
                  "nfsv4", "overlay"]

INITRAMFS_CONF = """# bootd client root: root over NBD (root=/dev/nbd0 nbdroot=...) or NFSv4 (root=/dev/nfs nfsroot=...)
MODULES=netboot
RESUME=none
FSTYPE=ext4
COMPRESS=zstd
"""

# Sets every NIC up before the stock scripts run klibc ipconfig: with the link still down its first
# DHCPDISCOVER fails and it retries only after 10 s, on every boot.
NETUP_SCRIPT = """#!/bin/sh
# bootd client root: NICs up before ipconfig (else its first DHCP round is lost: 10 s per boot).
PREREQ=""
case $1 in prereqs) echo "$PREREQ"; exit 0;; esac
for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] || ip link set "$n" up 2>/dev/null || true
done
exit 0
"""

# klibc's nfsmount (what the stock scripts/nfs calls) speaks NFSv2/3 only, and v3 needs rpcbind on the
# server; bootd's nfsroot= asks for vers=4.2. This wrapper takes its place in the initramfs: NFSv4 goes
# to the kernel's own client (mount(2) with addr= and clientaddr=), anything else to klibc's program.
NFSMOUNT_WRAPPER = """#!/bin/sh
# bootd client root: nfsmount [-o OPTS]... SERVER:PATH DIR, NFSv4 through the kernel's client.
v4=
for a in "$@"; do case "$a" in *vers=4*) v4=1 ;; esac; done
[ -n "$v4" ] || exec /bin/nfsmount.klibc "$@"
opts=
while [ $# -gt 2 ]; do
    case "$1" in
        -o) o=$2; shift 2 ;;
        -o*) o=${1#-o}; shift ;;
        *) break ;;
    esac
    for w in $(echo "$o" | tr , ' '); do
        case "$w" in nolock|retrans=*) ;; *) opts=${opts:+$opts,}$w ;; esac
    done
done
src=$1 dir=$2 server=${1%%:*}
client=
for f in /run/net-*.conf; do [ -e "$f" ] && . "$f" && client=$IPV4ADDR; done
modprobe nfsv4 2>/dev/null
exec mount -t nfs4 -o "$opts,addr=$server${client:+,clientaddr=$client}" "$src" "$dir"
"""

NFSMOUNT_HOOK = """#!/bin/sh
# bootd client root: put the NFSv4 nfsmount wrapper in place of klibc's (after klibc-utils copied it).
PREREQ="klibc-utils"
case $1 in prereqs) echo "$PREREQ"; exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
if [ -e "$DESTDIR/bin/nfsmount" ] && ! [ -e "$DESTDIR/bin/nfsmount.klibc" ]; then
    mv "$DESTDIR/bin/nfsmount" "$DESTDIR/bin/nfsmount.klibc"
fi
cp /usr/share/bootd-client/nfsmount "$DESTDIR/bin/nfsmount"
chmod 755 "$DESTDIR/bin/nfsmount"
manual_add_modules nfsv4 overlay
"""

# A root the PC may not write to (NFS, exported read-only) gets a tmpfs on top: the PC writes where it
# likes and a reboot starts clean. An NBD root needs none: bootd gives each boot its own overlay.
OVERLAY_SCRIPT = """#!/bin/sh
# bootd client root: a tmpfs overlay over a read-only NFS root (or any root with bootd.overlay).
PREREQ=""
case $1 in prereqs) echo "$PREREQ"; exit 0;; esac
[ "$BOOT" = nfs ] || grep -qw bootd.overlay /proc/cmdline || exit 0
. /scripts/functions
modprobe overlay
mkdir -p /run/bootd-ro /run/bootd-rw
mount -t tmpfs -o mode=0755 bootd-rw /run/bootd-rw
mkdir -p /run/bootd-rw/upper /run/bootd-rw/work
mount -n -o move "${rootmnt}" /run/bootd-ro
if ! mount -t overlay -o lowerdir=/run/bootd-ro,upperdir=/run/bootd-rw/upper,workdir=/run/bootd-rw/work \
        bootd-root "${rootmnt}"; then
    mount -n -o move /run/bootd-ro "${rootmnt}"
    log_warning_msg "bootd: no overlay on the root (it stays read-only)"
fi
exit 0
"""

# Documentation and translations no PC reads (dpkg keeps them out of later updates in a draft too).
DPKG_EXCLUDES = """# bootd client root: no documentation or translations (copyright files stay)
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""

# What the PC's units print reaches the serial console too (an admin at a rack, and the e2e test, read
# the boot there), with timestamps from journald.
JOURNALD_CONF = """[Journal]
ForwardToConsole=yes
TTYPath=/dev/ttyS0
MaxLevelConsole=info
Storage=volatile
"""

URL_SCRIPT = r"""#!/bin/sh
# bootd-client-url: where this PC's rendered units are (and where it reports its screen): from the
# kernel command line, bootd.clients=URL, else bootd.config=URL, else
# http://<bootd.server>:8080/clients/<mac>/. BOOTD_CMDLINE overrides /proc/cmdline (tests).
set -eu
CMDLINE=${BOOTD_CMDLINE:-$(cat /proc/cmdline)}
arg() { for w in $CMDLINE; do case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac; done; return 1; }
URL=$(arg bootd.clients || arg bootd.config || true)
if [ -z "$URL" ]; then
    SERVER=$(arg bootd.server) || {
        echo "bootd-client: no bootd.clients= or bootd.server= on the command line" >&2
        exit 1
    }
    IFACE=$(ip -4 route show default 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="dev") {print $(i+1); exit}}')
    [ -n "$IFACE" ] || IFACE=$(ls /sys/class/net | grep -v '^lo$' | head -1)
    URL="http://$SERVER:8080/clients/$(cat "/sys/class/net/$IFACE/address")/"
fi
case "$URL" in */) echo "$URL" ;; *) echo "$URL/" ;; esac
"""

REPORT_SCRIPT = r"""#!/bin/sh
# bootd-client-report started UNIT... | failed REASON...: tell bootd how this PC's screen came up
# (POST <units URL>status), so `bootctl hosts PC` and the dashboard say why a PC shows no screen.
# Never fails its caller. BOOTD_RUN_DIR overrides /run (tests).
state=$1
shift
HERE=$(dirname "$0")
URL=$("$HERE/bootd-client-url") || exit 0
esc() { printf '%s' "$*" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\000-\037'; }
if [ "$state" = started ]; then
    body='{"state": "started", "units": ['
    sep=
    for u in "$@"; do body="$body$sep\"$(esc "$u")\""; sep=', '; done
    body="$body]}"
else
    body="{\"state\": \"failed\", \"reason\": \"$(esc "$*")\"}"
    mkdir -p "${BOOTD_RUN_DIR:-/run}/bootd" && : > "${BOOTD_RUN_DIR:-/run}/bootd/reported-failure"
fi
curl -fsS --max-time 10 --retry 3 --retry-delay 1 -H 'Content-Type: application/json' --data "$body" \
    "${URL}status" > /dev/null || echo "bootd-client: could not report '$state' to bootd" >&2
exit 0
"""

HOOK_SCRIPT = r"""#!/bin/sh
# bootd-client-start: fetch this host's rendered jobs/units from bootd and start them, then report
# to bootd that the screen's units started (or why not). The URL: bootd-client-url. Units go to /run
# (tmpfs: nothing of them is kept).
# BOOTD_CMDLINE, BOOTD_RUN_DIR and BOOTD_NO_START=1 override /proc/cmdline, /run and the start (tests).
set -eu
RUN=${BOOTD_RUN_DIR:-/run}
HERE=$(dirname "$0")
fail() {
    echo "bootd-client: $*" >&2
    "$HERE/bootd-client-report" failed "$*"
    exit 1
}
URL=$("$HERE/bootd-client-url") || exit 1
mkdir -p "$RUN/systemd/system" "$RUN/bootd/init"
NAMES=$(curl -fsS --retry 10 --retry-delay 1 --retry-connrefused "$URL") || fail "cannot fetch $URL"
UNITS=
for name in $NAMES; do
    case "$name" in
        *[!A-Za-z0-9._-]*) echo "bootd-client: refusing file name $name" >&2; continue ;;
        *.service) dest=$RUN/systemd/system/$name; UNITS="$UNITS $name" ;;
        *.conf) dest=$RUN/bootd/init/$name ;;
        *) continue ;;
    esac
    curl -fsS --retry 5 --retry-delay 1 -o "$dest.tmp" "$URL$name" || fail "cannot fetch $URL$name"
    mv "$dest.tmp" "$dest"
    echo "bootd-client: fetched $name"
done
if [ "${BOOTD_NO_START:-0}" = 1 ]; then
    exit 0
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    [ -n "$UNITS" ] || fail "bootd sent no systemd units for this PC ($URL)"
    systemctl daemon-reload
    # Instances first, then X servers, then viewers (the units order themselves as well).
    for kind in qemuinstance xserver viewer; do
        for u in $UNITS; do case "$u" in "$kind"*) systemctl start --no-block "$u" ;; esac; done
    done
    echo "bootd-client: started$UNITS"
    "$HERE/bootd-client-report" started $UNITS
elif command -v initctl >/dev/null; then
    for f in "$RUN"/bootd/init/*.conf; do cp "$f" /etc/init/ 2>/dev/null || true; done
    initctl reload-configuration
    for f in "$RUN"/bootd/init/qemuinstance*.conf; do initctl start "$(basename "$f" .conf)" || true; done
    "$HERE/bootd-client-report" started
else
    fail "neither systemd nor Upstart runs here"
fi
"""

HOOK_UNIT = """[Unit]
Description=bootd: fetch and start this host's QEMU instances, X servers and viewers
Wants=network-online.target
After=network-online.target
# bootd hears of a failure even when the hook could not say it (e.g. a client-root update broke it)
OnFailure=bootd-client-failed.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/bootd-client-start

[Install]
WantedBy=multi-user.target
"""

FAILED_UNIT = """[Unit]
Description=bootd: tell bootd that this PC's screen did not come up
# the hook already said why
ConditionPathExists=!/run/bootd/reported-failure

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/bootd-client-report failed bootd-client.service failed (journalctl -u bootd-client)
"""

FSTAB = """# bootd client root. The initramfs mounted the root (NBD: this PC's own copy-on-write disk of
# this boot; NFS: read-only, with a tmpfs overlay on top); it is only remounted read-write here.
/dev/root / auto defaults 0 0
tmpfs /tmp tmpfs defaults,mode=1777 0 0
tmpfs /var/tmp tmpfs defaults,mode=1777 0 0
"""


def apt_mirror(root: str = "/") -> str:
    """The Debian mirror apt uses here: first `deb` URI in sources.list or a deb822 .sources file."""
    base = Path(root) / "etc/apt"
    candidates: list[str] = []
    lst = base / "sources.list"
    files = ([lst] if lst.exists() else []) + sorted((base / "sources.list.d").glob("*.list")) \
        + sorted((base / "sources.list.d").glob("*.sources"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and "security" not in fields.get("Suites", ""):
                    candidates += fields.get("URIs", "").split()
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and "security" not in m.group(2):
                    candidates.append(m.group(1))
    for uri in candidates:
        if uri.startswith(("http://", "https://", "file:/")):
            return uri
    raise RuntimeError("no Debian mirror found in apt's configuration (/etc/apt/sources.list*)")


_PHASES = [("Retrieving Release", "release"), ("Retrieving Packages", "index"), ("Resolving", "resolve"),
           ("Retrieving", "download"), ("Validating", "download"), ("Extracting", "extract"),
           ("Installing core", "install"), ("Unpacking", "unpack"), ("Configuring", "configure"),
           ("Base system installed", "done")]


class ClientRootSummary(TypedDict):
    """What build_client_root made, for bootctl's report."""

    target: str
    suite: str
    mirror: str
    packages: list[str]
    kernel: str
    seconds: float
    bytes: int
    image: Optional[str]
    image_bytes: int


def build_client_root(target: str | os.PathLike[str], suite: str = "bookworm", mirror: Optional[str] = None,
                      packages: Optional[list[str]] = None, progress: Callable[[str], None] = print,
                      debootstrap: str = "debootstrap", cache_dir: Optional[str] = None,
                      image: Optional[str | os.PathLike[str]] = None, image_size: str = "3G") -> ClientRootSummary:
    """Make a client root in `target` (must not exist or be empty), and with `image` also the same tree
    as a qcow2 disk (ext4 on the whole disk) to import as a `kind: native` image: that is how client
    roots get snapshots, tests on one PC, promotes and rollbacks. Returns a summary."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise RuntimeError(f"{target} exists and is not empty")
    packages_of = {debootstrap: "debootstrap", "chroot": "coreutils", "mke2fs": "e2fsprogs", "qemu-img": "qemu-utils"}
    for tool in [debootstrap, "chroot"] + (["mke2fs", "qemu-img"] if image else []):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt install {packages_of[tool]})")
    if image is not None and Path(image).exists():
        raise RuntimeError(f"{image} exists")
    mirror = mirror or apt_mirror()
    pkgs = packages if packages is not None else PACKAGES
    started = time.monotonic()
    steps = 5 if image else 4
    progress(f"[1/{steps}] debootstrap {suite} from {mirror} into {target} (+{len(pkgs)} packages)")
    argv = [debootstrap, "--variant=minbase", "--verbose", f"--include={','.join(pkgs)}"]
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        argv.append(f"--cache-dir={Path(cache_dir).resolve()}")
    argv += [suite, str(target), mirror]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    counts: dict[str, int] = {}
    phase = None
    last_report = 0.0
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if not line.startswith("I: "):
            continue
        msg = line[3:]
        for prefix, name in _PHASES:
            if msg.startswith(prefix):
                counts[name] = counts.get(name, 0) + 1
                now = time.monotonic()
                if name != phase or now - last_report > 2:
                    progress(f"      {name:<9} {counts[name]:>4}  {msg[:70]}  ({now - started:.0f} s)")
                    phase, last_report = name, now
                break
    rc = proc.wait()
    _unmount_below(target)
    if rc != 0:
        raise RuntimeError(f"debootstrap failed ({rc}):\n" + "\n".join(tail))
    progress(f"[2/{steps}] installing the bootd client hook, initramfs scripts and settings")
    install_hook(target)
    (target / "etc/apt/sources.list").write_text(f"deb {mirror} {suite} main\n")
    kernel = ""
    if any((target / "boot").glob("vmlinuz-*")):
        progress(f"[3/{steps}] update-initramfs (root over NBD or NFSv4)")
        kernel = _make_initramfs(target)
    else:
        progress(f"[3/{steps}] no kernel in the package list: no initramfs")
    _clean(target)
    size = tree_bytes(target)
    image_bytes = 0
    if image is not None:
        progress(f"[4/{steps}] {image}: ext4 ({size / 1e6:.0f} MB of files) on a {image_size} qcow2 disk")
        image_bytes = make_disk_image(target, Path(image), image_size)
    progress(f"[{steps}/{steps}] done")
    return {"target": str(target), "suite": suite, "mirror": mirror, "packages": pkgs, "kernel": kernel,
            "seconds": round(time.monotonic() - started, 1), "bytes": size,
            "image": str(image) if image is not None else None, "image_bytes": image_bytes}


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root`, each inode once (hard links are not counted twice)."""
    seen: dict[tuple[int, int], int] = {}
    for f in root.rglob("*"):
        st = f.lstat()
        if f.is_file() and not f.is_symlink():
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    return sorted((m for m in points if m.startswith(prefix)), reverse=True)


def _unmount_below(root: Path) -> None:
    for m in _mounts_below(root):
        if subprocess.run(["umount", m], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", m], capture_output=True)


def _in_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                           "LANG=C.UTF-8", *argv], capture_output=True, text=True)


def _make_initramfs(root: Path) -> str:
    """Regenerate the one kernel's initramfs with the hooks install_hook put in; check what it holds."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {root}/boot, found {kernels or 'none'}")
    kver = kernels[0]
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        subprocess.run(["mount", "-t", "sysfs", "sysfs", str(root / "sys")], check=True)
        r = _in_root(root, "update-initramfs", "-u", "-k", kver)
        if r.returncode != 0:
            raise RuntimeError(f"update-initramfs failed:\n{(r.stdout + r.stderr)[-3000:]}")
        listing = _in_root(root, "lsinitramfs", f"/boot/initrd.img-{kver}").stdout
        _in_root(root, "passwd", "-l", "root")
        _in_root(root, "apt-get", "clean")
    finally:
        _unmount_below(root)
        policy.unlink(missing_ok=True)
    wants = ["nbd-client", "scripts/local-top/nbd", "bin/nfsmount", "bin/nfsmount.klibc",
             "scripts/init-premount/bootd-netup", "scripts/init-bottom/bootd-overlay"]
    missing = [w for w in wants if not re.search(rf"(^|/){re.escape(w)}$", listing, re.M)]
    missing += [m for m in ("nbd", "nfsv4", "overlay", "virtio_net", "e1000")
                if not re.search(rf"/{m}\.ko(\.\w+)?$", listing, re.M)]
    if missing:
        raise RuntimeError(f"the initramfs of {kver} lacks {', '.join(missing)}")
    return kver


def _clean(root: Path) -> None:
    """What must not go into a root every PC shares: caches, logs, the build's machine id."""
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "var/log/*.log", "var/log/apt/*"):
        for f in root.glob(pattern):
            if f.is_file() or f.is_symlink():
                f.unlink()
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    for d in ("usr/share/man", "usr/share/info"):
        shutil.rmtree(root / d, ignore_errors=True)
    for f in (root / "usr/share/locale").glob("*"):
        if f.name != "locale.alias":
            shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    for f in (root / "usr/share/doc").glob("*/*"):
        if f.name != "copyright":
            shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    (root / "etc/machine-id").write_text("")  # empty: systemd makes one per boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")


def make_disk_image(root: Path, image: Path, size: str, label: str = "bootd-client") -> int:
    """The tree as ext4 on a whole qcow2 disk (no partition table: PCs mount root=/dev/nbd0), made
    without mounting; checked with e2fsck. Returns the qcow2 file's size."""
    if _mounts_below(root):
        raise RuntimeError(f"something is still mounted below {root}")
    image.parent.mkdir(parents=True, exist_ok=True)
    raw = image.with_name(image.name + ".raw.tmp")
    tmp = image.with_name(image.name + ".tmp")
    try:
        for argv in (["mke2fs", "-q", "-t", "ext4", "-L", label, "-d", str(root), "-E", "root_owner=0:0",
                      str(raw), size],
                     ["e2fsck", "-fn", str(raw)],
                     ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)]):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{argv[0]} failed:\n{(r.stdout + r.stderr)[-2000:]}")
        tmp.rename(image)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return image.stat().st_size


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    f.chmod(mode)


def install_hook(root: str | os.PathLike[str]) -> None:
    """The client hook (script + enabled unit), the initramfs scripts (NICs up early, NFSv4 root, tmpfs
    overlay on a read-only root), console logging and the fstab, into an existing root."""
    root = Path(root)
    _write(root, "usr/local/sbin/bootd-client-start", HOOK_SCRIPT, 0o755)
    _write(root, "usr/local/sbin/bootd-client-url", URL_SCRIPT, 0o755)
    _write(root, "usr/local/sbin/bootd-client-report", REPORT_SCRIPT, 0o755)
    _write(root, "etc/systemd/system/bootd-client.service", HOOK_UNIT)
    _write(root, "etc/systemd/system/bootd-client-failed.service", FAILED_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "bootd-client.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/bootd-client.service")
    _write(root, "etc/systemd/journald.conf.d/bootd-console.conf", JOURNALD_CONF)
    _write(root, "etc/initramfs-tools/conf.d/bootd.conf", INITRAMFS_CONF)
    mods = root / "etc/initramfs-tools/modules"
    have = mods.read_text().split("\n") if mods.exists() else []
    _write(root, "etc/initramfs-tools/modules", "\n".join(have + [m for m in INITRD_MODULES if m not in have]) + "\n")
    _write(root, "etc/initramfs-tools/scripts/init-premount/bootd-netup", NETUP_SCRIPT, 0o755)
    _write(root, "etc/initramfs-tools/scripts/init-bottom/bootd-overlay", OVERLAY_SCRIPT, 0o755)
    _write(root, "etc/initramfs-tools/hooks/bootd-nfsmount", NFSMOUNT_HOOK, 0o755)
    _write(root, "usr/share/bootd-client/nfsmount", NFSMOUNT_WRAPPER, 0o755)
    _write(root, "etc/dpkg/dpkg.cfg.d/bootd-excludes", DPKG_EXCLUDES)
    _write(root, "etc/fstab", FSTAB)
    _write(root, "etc/hostname", "bootd-client\n")
    _write(root, "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tbootd-client\n::1\t\tlocalhost\n")
    default = root / "etc/systemd/system/default.target"
    if not default.is_symlink():
        default.parent.mkdir(parents=True, exist_ok=True)
        default.symlink_to("/lib/systemd/system/multi-user.target")
