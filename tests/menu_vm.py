"""A lab PC in QEMU that boots bootd's menus: shared by the iPXE, pxelinux and GRUB menu tests.

The room config has two images (debian, windows) over the project's test kernel and initrd, the host's
own default is `windows` while the room's is `debian`, so a test sees that the per-host menu is the one
that boots.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
from support import ROOT, artifact_dir, have

ASSETS = ROOT / ".cache" / "assets"
OVMF = Path("/usr/share/qemu/OVMF.fd")


def need_assets() -> None:
    if os.geteuid() != 0 or not have("qemu-system-x86_64"):
        pytest.skip("needs root and qemu-system-x86_64")
    if not (ASSETS / "vmlinuz").exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip("client assets missing and not buildable")


def room_config(lab, tmp_path: Path, mac: str, title: str, timeout: int, boot: Optional[str] = None,
                image_cmdline: str = "") -> dict:
    """Config for a room of two images whose host `pc01` (mac) defaults to windows; the kernel and
    initrd are copied into the boot root."""
    root = tmp_path / "storage" / "boot"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "vmlinuz", root / "vmlinuz")
    shutil.copy(ASSETS / "initrd.img", root / "initrd.img")
    images = [{"name": name, "title": t, "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": image_cmdline}
              for name, t in (("debian", "Debian desktop"), ("windows", "Windows in QEMU"))]
    group = {"name": "room1", "images": ["debian", "windows"], "default_image": "debian"}
    if boot:
        group["boot"] = boot
    return {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.150"}]},
        "nbd": {"enabled": False},
        "storage": {"directory": str(tmp_path / "storage")},
        "menu": {"title": title, "timeout": timeout, "cmdline": "console=ttyS0",
                 "student_entries": ["current", "previous", "images"]},  # the tests pick other entries
        "images": images,
        "groups": [group],
        "hosts": [{"mac": mac, "name": "pc01", "group": "room1", "default_image": "windows"}],
    }


def start_pc(lab, name: str, mac: str, uefi: bool = False) -> tuple[subprocess.Popen, Path]:
    """Switch on a PC (SeaBIOS + iPXE ROM, or OVMF) on a tap of the lab bridge; serial to a file."""
    serial = artifact_dir(name) / "serial.log"
    if serial.exists():
        serial.unlink()
    tap = lab.add_tap()
    firmware = ["-machine", "q35", "-m", "512", "-bios", str(OVMF)] if uefi else ["-machine", "pc", "-m", "384"]
    qemu = lab.server.popen(
        ["qemu-system-x86_64", *firmware, "-accel", "tcg", "-nographic",
         "-serial", f"file:{serial}", "-monitor", "none", "-no-reboot", "-boot", "n",
         "-nic", f"tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci,mac={mac}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return qemu, serial


def stop_pc(qemu: subprocess.Popen) -> None:
    qemu.kill()
    qemu.wait(timeout=10)


def wait_for(path: Path, pattern: str, timeout: float, proc: subprocess.Popen) -> Optional[re.Match]:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        m = rx.search(path.read_text(errors="replace")) if path.exists() else None
        if m or proc.poll() is not None:
            return m
        time.sleep(0.25)
    return None


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no serial output)"
