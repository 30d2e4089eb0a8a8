"""A small bootable test disk made without mounting: FAT + syslinux, the project's Debian kernel and
initramfs (scripts/build-assets.sh) with a second cpio on top whose /init prints a marker, reports
whether the disk still holds the previous run's write, writes it, and powers off (or holds the
screen with text for the viewer test)."""
from __future__ import annotations

import gzip
import io
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("BOOTD_ASSETS", ROOT / ".cache" / "assets"))

DISK_MIB = 48
FAT_KIB = 32 * 1024
STATE_SECTOR = 40 * 2048       # 40 MiB into the disk, past the FAT filesystem
DIRTY = "DIRTY-FROM-GUEST"

GUEST_INIT = r"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk
say() { echo "$*" > /dev/ttyS0; echo "$*" > /dev/tty1; }
MODE=poweroff
for w in $(cat /proc/cmdline); do case "$w" in bootdtest.mode=*) MODE=${w#*=} ;; esac; done
say "BOOTD-CLIENT-MARKER: guest booted from its NBD disk"
modprobe virtio_pci 2>/dev/null; modprobe virtio_blk 2>/dev/null
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || say "BOOTD-DISK: missing"
state=$(dd if=/dev/vda bs=512 skip=@SECTOR@ count=1 2>/dev/null | head -c 16)
if [ "$state" = "@DIRTY@" ]; then say "BOOTD-DISK: dirty"; else say "BOOTD-DISK: clean"; fi
printf '@DIRTY@' | dd of=/dev/vda bs=512 seek=@SECTOR@ conv=notrunc,fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
[ "$(dd if=/dev/vda bs=512 skip=@SECTOR@ count=1 2>/dev/null | head -c 16)" = "@DIRTY@" ] && say "BOOTD-WRITE: ok"
if [ "$MODE" = hold ]; then
    printf '\033[2J\033[H\033[?25l' > /dev/tty1   # clear, home, no blinking cursor
    for n in 1 2 3 4 5 6; do echo "BOOTD GUEST SCREEN $n: hello from the instance" > /dev/tty1; done
    say "BOOTD-HOLD: screen ready"
    while :; do sleep 60; done
fi
sync
say "BOOTD-POWEROFF"
poweroff -f
"""

SYSLINUX_CFG = """DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0 console=tty1 quiet bootdtest.mode={mode}
"""


def assets_ready() -> bool:
    return (ASSETS / "vmlinuz").is_file() and (ASSETS / "initrd.img").is_file()


def _newc(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A minimal cpio newc archive (name -> (mode, data)), directories first."""
    out = io.BytesIO()
    ino = 1000
    for name, (mode, data) in list(files.items()) + [("TRAILER!!!", (0, b""))]:
        ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def make_guest_disk(path: Path, mode: str = "poweroff") -> Path:
    """Build the disk at `path` (raw). Needs .cache/assets (scripts/build-assets.sh)."""
    work = path.parent / (path.name + ".d")
    work.mkdir(parents=True, exist_ok=True)
    init = GUEST_INIT.replace("@SECTOR@", str(STATE_SECTOR)).replace("@DIRTY@", DIRTY)
    overlay = gzip.compress(_newc({"init": (0o100755, init.encode())}), 6)
    initrd = work / "initrd.img"
    initrd.write_bytes((ASSETS / "initrd.img").read_bytes() + overlay)
    cfg = work / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG.format(mode=mode))
    with open(path, "wb") as f:
        f.truncate(DISK_MIB * 1024 * 1024)
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True, timeout=60)  # noqa: E731
    run("mkfs.vfat", "-n", "BOOTDTEST", str(path), str(FAT_KIB))
    run("syslinux", "--install", str(path))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    for src, name in ((ASSETS / "vmlinuz", "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
        subprocess.run(["mcopy", "-i", str(path), str(src), f"::{name}"], check=True, capture_output=True,
                       env=env, timeout=60)
    return path
