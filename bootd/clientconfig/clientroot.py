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

PACKAGES = ["systemd-sysv", "udev", "iproute2", "isc-dhcp-client", "curl", "ca-certificates", "kmod",
            "qemu-system-x86", "xserver-xorg-core", "xserver-xorg-input-libinput", "xinit",
            "tigervnc-viewer", "nbd-client"]

HOOK_SCRIPT = r"""#!/bin/sh
# bootd-client-start: fetch this host's rendered jobs/units from bootd and start them.
# The URL comes from the kernel command line (bootd.clients=URL, else bootd.config=URL, else
# http://<bootd.server>:8080/clients/<mac>/). Units go to /run (the root is read-only NFS).
# BOOTD_CMDLINE, BOOTD_RUN_DIR and BOOTD_NO_START=1 override /proc/cmdline, /run and the start (tests).
set -eu
CMDLINE=${BOOTD_CMDLINE:-$(cat /proc/cmdline)}
RUN=${BOOTD_RUN_DIR:-/run}
arg() { for w in $CMDLINE; do case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac; done; return 1; }
IFACE=$(ip -4 route show default 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="dev") {print $(i+1); exit}}')
[ -n "$IFACE" ] || IFACE=$(ls /sys/class/net | grep -v '^lo$' | head -1)
MAC=$(cat "/sys/class/net/$IFACE/address")
URL=$(arg bootd.clients || arg bootd.config || true)
if [ -z "$URL" ]; then
    SERVER=$(arg bootd.server) || {
        echo "bootd-client: no bootd.clients= or bootd.server= on the command line" >&2
        exit 1
    }
    URL="http://$SERVER:8080/clients/$MAC/"
fi
case "$URL" in */) ;; *) URL="$URL/" ;; esac
mkdir -p "$RUN/systemd/system" "$RUN/bootd/init"
NAMES=$(curl -fsS --retry 10 --retry-delay 1 --retry-connrefused "$URL")
UNITS=
for name in $NAMES; do
    case "$name" in
        *[!A-Za-z0-9._-]*) echo "bootd-client: refusing file name $name" >&2; continue ;;
        *.service) dest=$RUN/systemd/system/$name; UNITS="$UNITS $name" ;;
        *.conf) dest=$RUN/bootd/init/$name ;;
        *) continue ;;
    esac
    curl -fsS --retry 5 --retry-delay 1 -o "$dest.tmp" "$URL$name" && mv "$dest.tmp" "$dest"
    echo "bootd-client: fetched $name"
done
if [ "${BOOTD_NO_START:-0}" = 1 ]; then
    exit 0
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null && [ -n "$UNITS" ]; then
    systemctl daemon-reload
    # Instances first, then X servers, then viewers (the units order themselves as well).
    for kind in qemuinstance xserver viewer; do
        for u in $UNITS; do case "$u" in "$kind"*) systemctl start --no-block "$u" ;; esac; done
    done
elif command -v initctl >/dev/null; then
    for f in "$RUN"/bootd/init/*.conf; do cp "$f" /etc/init/ 2>/dev/null || true; done
    initctl reload-configuration
    for f in "$RUN"/bootd/init/qemuinstance*.conf; do initctl start "$(basename "$f" .conf)" || true; done
fi
"""

HOOK_UNIT = """[Unit]
Description=bootd: fetch and start this host's QEMU instances, X servers and viewers
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/bootd-client-start

[Install]
WantedBy=multi-user.target
"""

FSTAB = """# bootd client root: the root is read-only NFS; what must be writable lives in memory.
tmpfs /tmp tmpfs defaults,mode=1777 0 0
tmpfs /var/tmp tmpfs defaults,mode=1777 0 0
tmpfs /var/log tmpfs defaults 0 0
tmpfs /var/lib/dhcp tmpfs defaults 0 0
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
    seconds: float
    bytes: int


def build_client_root(target: str | os.PathLike[str], suite: str = "bookworm", mirror: Optional[str] = None,
                      packages: Optional[list[str]] = None, progress: Callable[[str], None] = print,
                      debootstrap: str = "debootstrap") -> ClientRootSummary:
    """Make a client root in `target` (must not exist or be empty). Returns a summary."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise RuntimeError(f"{target} exists and is not empty")
    if shutil.which(debootstrap) is None:
        raise RuntimeError("debootstrap is not installed")
    mirror = mirror or apt_mirror()
    pkgs = packages if packages is not None else PACKAGES
    started = time.monotonic()
    progress(f"[1/3] debootstrap {suite} from {mirror} into {target} (+{len(pkgs)} packages)")
    argv = [debootstrap, "--variant=minbase", "--verbose", f"--include={','.join(pkgs)}", suite, str(target), mirror]
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
    if rc != 0:
        raise RuntimeError(f"debootstrap failed ({rc}):\n" + "\n".join(tail))
    progress("[2/3] installing the bootd init hook")
    install_hook(target)
    progress("[3/3] done")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file() and not f.is_symlink())
    return {"target": str(target), "suite": suite, "mirror": mirror, "packages": pkgs,
            "seconds": round(time.monotonic() - started, 1), "bytes": size}


def install_hook(root: str | os.PathLike[str]) -> None:
    """The init hook (script + enabled unit) and a read-only-root fstab, into an existing root."""
    root = Path(root)
    script = root / "usr/local/sbin/bootd-client-start"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(HOOK_SCRIPT)
    script.chmod(0o755)
    unit = root / "etc/systemd/system/bootd-client.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(HOOK_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "bootd-client.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/bootd-client.service")
    (root / "etc/fstab").write_text(FSTAB)
    (root / "etc/hostname").write_text("bootd-client\n")
