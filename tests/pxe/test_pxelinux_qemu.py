"""The rendered pxelinux menu loaded by the real pxelinux.0 in QEMU (SeaBIOS + the stock iPXE ROM).

Everything is bootd's: DHCP (a `boot: pxelinux` room's BIOS PC gets pxelinux.0, also from an iPXE ROM),
TFTP (pxelinux.0, its .c32 modules, kernel, initrd) and `pxelinux.cfg/01-<mac>` rendered on request.
pc01's own entry overrides its room's default image: the test sees bootd's menu title for pc01 on the
serial console and then the kernel starting with the command line of pc01's default (windows), not
the room's (debian), after the menu timeout.
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
PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
MODULES = Path("/usr/lib/syslinux/modules/bios")

pytestmark = [pytest.mark.qemu, pytest.mark.netns]


def _need():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for prog in ("qemu-system-x86_64",):
        if not have(prog):
            pytest.skip(f"{prog} not installed")
    if not PXELINUX.exists() or not (MODULES / "ldlinux.c32").exists():
        pytest.skip("pxelinux / syslinux-common not installed")
    if not (ASSETS / "vmlinuz").exists() or not (ASSETS / "initrd.img").exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True)
        if r.returncode != 0 or not (ASSETS / "vmlinuz").exists():
            pytest.skip(f"client assets missing and not buildable: {r.stderr[-500:]}")


def wait_for(path: Path, pattern: str, timeout: float, proc: subprocess.Popen) -> re.Match | None:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            return rx.search(path.read_text(errors="replace")) if path.exists() else None
        time.sleep(0.25)
    return None


def test_pxelinux_boots_the_per_mac_default(lab, bootd_daemon, tmp_path):
    _need()
    mac = "52:54:00:77:01:01"
    boot = tmp_path / "storage" / "boot"
    boot.mkdir(parents=True)
    shutil.copy(PXELINUX, boot / "pxelinux.0")
    for mod in ("ldlinux.c32", "menu.c32", "libutil.c32", "libcom32.c32"):
        shutil.copy(MODULES / mod, boot / mod)
    shutil.copy(ASSETS / "vmlinuz", boot / "vmlinuz")
    shutil.copy(ASSETS / "initrd.img", boot / "initrd.img")
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.150"}]},
        "nbd": {"enabled": False},
        "storage": {"directory": str(tmp_path / "storage")},
        "menu": {"title": "bootd-lab", "timeout": 2, "cmdline": "console=ttyS0"},
        "images": [{"name": "debian", "title": "Debian desktop", "kernel": "vmlinuz", "initrd": "initrd.img",
                    "cmdline": "bootd.hold=0"},
                   {"name": "windows", "title": "Windows in QEMU", "kernel": "vmlinuz", "initrd": "initrd.img",
                    "cmdline": "bootd.hold=0"}],
        "groups": [{"name": "room1", "images": ["debian", "windows"], "default_image": "debian",
                    "boot": "pxelinux"}],
        "hosts": [{"mac": mac, "name": "pc01", "group": "room1", "default_image": "windows"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    art = artifact_dir("pxe-qemu")
    serial = art / "serial.log"
    if serial.exists():
        serial.unlink()
    tap = lab.add_tap()
    qemu = lab.server.popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "384", "-nographic",
         "-serial", f"file:{serial}", "-monitor", "none", "-no-reboot", "-boot", "n",
         "-nic", f"tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci,mac={mac}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        title = wait_for(serial, r"bootd-lab: pc01", 120, qemu)
        assert title, f"bootd's pxelinux menu for pc01 never showed; serial:\n{serial.read_text(errors='replace')[-3000:]}"
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
        assert cmdline, f"the kernel did not start; serial:\n{serial.read_text(errors='replace')[-3000:]}"
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
    line = cmdline.group(0)
    assert "bootd.image=windows" in line, line  # pc01's own default, not the room's debian
    assert f"bootd.config=http://{lab.server_ip}:8080/clients/{mac}/" in line
    assert f"bootd.server={lab.server_ip}" in line
    # the menu file came from bootd's provider (TFTP boot event "menu") and the kernel over TFTP after it
    kinds = [(ev["kind"], ev["detail"].get("path")) for ev in d.api.get(f"/api/v1/hosts/{mac}")["events"]]
    assert ("menu", f"pxelinux.cfg/01-{mac.replace(':', '-')}") in kinds, kinds
    assert ("kernel", "vmlinuz") in kinds, kinds
    order = [k for k, _ in kinds]
    assert order.index("dhcp") < order.index("loader") < order.index("menu") < order.index("kernel"), order
