"""The main path with real firmware: the stock iPXE ROM in QEMU gets bootd's DHCP answer, fetches
`/boot/<mac>.ipxe`, shows bootd's menu, and boots the host's default entry with kernel and initrd over
HTTP. The boot timeline then reads dhcp -> script -> kernel -> initrd, with bytes and durations.
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


def test_ipxe_menu_boots_over_http(lab, bootd_daemon, tmp_path):
    if os.geteuid() != 0 or not have("qemu-system-x86_64"):
        pytest.skip("needs root and qemu-system-x86_64")
    if not (ASSETS / "vmlinuz").exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip("client assets missing and not buildable")
    mac = "52:54:00:77:02:01"
    boot = tmp_path / "storage" / "boot"
    boot.mkdir(parents=True)
    shutil.copy(ASSETS / "vmlinuz", boot / "vmlinuz")
    shutil.copy(ASSETS / "initrd.img", boot / "initrd.img")
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.150"}]},
        "nbd": {"enabled": False},
        "storage": {"directory": str(tmp_path / "storage")},
        "menu": {"title": "bootd-ipxe", "timeout": 2, "cmdline": "console=ttyS0"},
        "images": [{"name": "debian", "title": "Debian desktop", "kernel": "vmlinuz", "initrd": "initrd.img"},
                   {"name": "windows", "title": "Windows in QEMU", "kernel": "vmlinuz", "initrd": "initrd.img"}],
        "groups": [{"name": "room1", "images": ["debian", "windows"], "default_image": "debian"}],
        "hosts": [{"mac": mac, "name": "pc07", "group": "room1", "default_image": "windows"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    serial = artifact_dir("ipxe-qemu") / "serial.log"
    if serial.exists():
        serial.unlink()
    tap = lab.add_tap()
    qemu = lab.server.popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "384", "-nographic",
         "-serial", f"file:{serial}", "-monitor", "none", "-no-reboot", "-boot", "n",
         "-nic", f"tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci,mac={mac}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        shown = wait_for(serial, r"bootd-ipxe: pc07", 120, qemu)
        assert shown, f"bootd's iPXE menu never showed; serial:\n{serial.read_text(errors='replace')[-3000:]}"
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
        assert cmdline, f"the kernel did not start; serial:\n{serial.read_text(errors='replace')[-3000:]}"
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
    line = cmdline.group(0)
    assert "bootd.image=windows" in line, line  # pc07's own default
    assert f"bootd.config=http://{lab.server_ip}:8080/clients/{mac}/" in line
    events = d.api.get("/api/v1/hosts/pc07")["events"]
    kinds = [ev["kind"] for ev in events if ev["kind"] in ("dhcp", "script", "kernel", "initrd")]
    # the DHCP server records its own steps; then the script and the two files over HTTP, in order
    assert "dhcp" in kinds and kinds.index("dhcp") < kinds.index("script"), kinds
    assert kinds[kinds.index("script"):] == ["script", "kernel", "initrd"], kinds
    sizes = {ev["kind"]: ev["nbytes"] for ev in events}
    assert sizes["kernel"] == (boot / "vmlinuz").stat().st_size
    assert sizes["initrd"] == (boot / "initrd.img").stat().st_size
    out = d.bootctl("hosts", "pc07", check=True).stdout
    assert "script" in out and "initrd.img" in out
