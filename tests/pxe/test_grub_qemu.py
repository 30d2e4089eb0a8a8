"""The rendered GRUB menu run by real GRUB (x86_64-efi, from grub-efi-amd64-bin) on OVMF in QEMU.

The NIC's iPXE UEFI driver PXE-boots grubx64.efi (the network GRUB bootd stocks into its boot root,
pxe/loaders.py; it searches `grub/grub.cfg-01-<mac>` first, like pxelinux). Everything is bootd's:
DHCP (a `boot: grub` room's UEFI PC gets grubx64.efi), TFTP, and the menu rendered on request.
pc01's own default (windows, the room's is debian) is the entry GRUB starts when the timeout runs out:
its "Loading ..." line appears, then the kernel's command line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from menu_vm import OVMF, need_assets, room_config, start_pc, stop_pc, tail, wait_for  # noqa: E402
from support import have  # noqa: E402

GRUB_MODULES = Path("/usr/lib/grub/x86_64-efi")

pytestmark = [pytest.mark.qemu, pytest.mark.netns]


def test_grub_runs_the_per_mac_default(lab, bootd_daemon, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for prog in ("qemu-system-x86_64", "grub-mkimage"):  # bootd runs grub-mkimage
        if not have(prog):
            pytest.skip(f"{prog} not installed")
    if not OVMF.exists() or not (GRUB_MODULES / "efinet.mod").exists():
        pytest.skip("ovmf / grub-efi-amd64-bin not installed")
    need_assets()
    mac = "52:54:00:77:03:01"
    boot = tmp_path / "storage" / "boot"
    d = bootd_daemon(room_config(lab, tmp_path, mac, "bootd-grub", 1, boot="grub"), ns=lab.server)
    assert (boot / "grubx64.efi").exists(), "bootd did not stock its network GRUB (pxe/loaders.py)"
    qemu, serial = start_pc(lab, "grub-qemu", mac, uefi=True)
    try:
        loading = wait_for(serial, r"Loading (Windows in QEMU|Debian desktop) \.\.\.", 240, qemu)
        assert loading, f"GRUB never started an entry; serial:\n{tail(serial)}"
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
    finally:
        stop_pc(qemu)
    assert loading.group(1) == "Windows in QEMU"  # pc01's own default, not the room's
    assert cmdline, f"the kernel did not start; serial:\n{tail(serial)}"
    assert "bootd.image=windows" in cmdline.group(0)
    kinds = [(ev["kind"], ev["detail"].get("path")) for ev in d.api.get(f"/api/v1/hosts/{mac}")["events"]]
    assert ("menu", f"grub/grub.cfg-01-{mac.replace(':', '-')}") in kinds, kinds
