"""The rendered GRUB menu run by real GRUB (x86_64-efi, from grub-efi-amd64-bin) on OVMF in QEMU.

The NIC's iPXE UEFI driver PXE-boots grubx64.efi (the network GRUB bootd stocks into its boot root,
pxe/loaders.py; it searches `grub/grub.cfg-01-<mac>` first, like pxelinux). Everything is bootd's:
DHCP (a `boot: grub` room's UEFI PC gets grubx64.efi), TFTP, and the menu rendered on request.
pc01's own default (windows, the room's is debian) is the entry GRUB starts when the timeout runs out:
its "Loading ..." line appears, then the kernel's command line.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import ROOT, artifact_dir, have  # noqa: E402

ASSETS = ROOT / ".cache" / "assets"
OVMF = Path("/usr/share/qemu/OVMF.fd")
GRUB_MODULES = Path("/usr/lib/grub/x86_64-efi")

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

def wait_for(path: Path, pattern: str, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        m = rx.search(path.read_text(errors="replace")) if path.exists() else None
        if m or proc.poll() is not None:
            return m
        time.sleep(0.25)
    return None


def test_grub_runs_the_per_mac_default(lab, bootd_daemon, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for prog in ("qemu-system-x86_64", "grub-mkimage"):  # bootd runs grub-mkimage
        if not have(prog):
            pytest.skip(f"{prog} not installed")
    if not OVMF.exists() or not (GRUB_MODULES / "efinet.mod").exists():
        pytest.skip("ovmf / grub-efi-amd64-bin not installed")
    if not (ASSETS / "vmlinuz").exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip("client assets missing and not buildable")
    mac = "52:54:00:77:03:01"
    boot = tmp_path / "storage" / "boot"
    boot.mkdir(parents=True)
    shutil.copy(ASSETS / "vmlinuz", boot / "vmlinuz")
    shutil.copy(ASSETS / "initrd.img", boot / "initrd.img")
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.150"}]},
        "nbd": {"enabled": False},
        "storage": {"directory": str(tmp_path / "storage")},
        "menu": {"title": "bootd-grub", "timeout": 1, "cmdline": "console=ttyS0"},
        "images": [{"name": "debian", "title": "Debian desktop", "kernel": "vmlinuz", "initrd": "initrd.img"},
                   {"name": "windows", "title": "Windows in QEMU", "kernel": "vmlinuz", "initrd": "initrd.img"}],
        "groups": [{"name": "room1", "images": ["debian", "windows"], "default_image": "debian", "boot": "grub"}],
        "hosts": [{"mac": mac, "name": "pc01", "group": "room1", "default_image": "windows"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    assert (boot / "grubx64.efi").exists(), "bootd did not stock its network GRUB (pxe/loaders.py)"
    serial = artifact_dir("grub-qemu") / "serial.log"
    if serial.exists():
        serial.unlink()
    tap = lab.add_tap()
    qemu = lab.server.popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "512", "-bios", str(OVMF),
         "-nographic", "-serial", f"file:{serial}", "-monitor", "none", "-no-reboot", "-boot", "n",
         "-nic", f"tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci,mac={mac}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        loading = wait_for(serial, r"Loading (Windows in QEMU|Debian desktop) \.\.\.", 240, qemu)
        assert loading, f"GRUB never started an entry; serial:\n{serial.read_text(errors='replace')[-3000:]}"
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
    assert loading.group(1) == "Windows in QEMU"  # pc01's own default, not the room's
    assert cmdline, f"the kernel did not start; serial:\n{serial.read_text(errors='replace')[-3000:]}"
    assert "bootd.image=windows" in cmdline.group(0)
    kinds = [(ev["kind"], ev["detail"].get("path")) for ev in d.api.get(f"/api/v1/hosts/{mac}")["events"]]
    assert ("menu", f"grub/grub.cfg-01-{mac.replace(':', '-')}") in kinds, kinds
