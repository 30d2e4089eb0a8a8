"""The rendered pxelinux menu loaded by the real pxelinux.0 in QEMU (SeaBIOS + the stock iPXE ROM).

Everything is bootd's: DHCP (a `boot: pxelinux` room's BIOS PC gets pxelinux.0, also from an iPXE ROM),
TFTP (pxelinux.0, its .c32 modules, kernel, initrd) and `pxelinux.cfg/01-<mac>` rendered on request.
pc01's own entry overrides its room's default image: the test sees bootd's menu title for pc01 on the
serial console and then the kernel starting with the command line of pc01's default (windows), not
the room's (debian), after the menu timeout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from menu_vm import need_assets, room_config, start_pc, stop_pc, tail, wait_for  # noqa: E402

PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
MODULES = Path("/usr/lib/syslinux/modules/bios")

pytestmark = [pytest.mark.qemu, pytest.mark.netns]


def test_pxelinux_boots_the_per_mac_default(lab, bootd_daemon, tmp_path):
    need_assets()
    if not PXELINUX.exists() or not (MODULES / "ldlinux.c32").exists():
        pytest.skip("pxelinux / syslinux-common not installed")
    mac = "52:54:00:77:01:01"
    config = room_config(lab, tmp_path, mac, "bootd-lab", 2, boot="pxelinux", image_cmdline="bootd.hold=0")
    d = bootd_daemon(config, ns=lab.server)
    qemu, serial = start_pc(lab, "pxe-qemu", mac)
    try:
        title = wait_for(serial, r"bootd-lab: pc01", 120, qemu)
        assert title, f"bootd's pxelinux menu for pc01 never showed; serial:\n{tail(serial)}"
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
        assert cmdline, f"the kernel did not start; serial:\n{tail(serial)}"
    finally:
        stop_pc(qemu)
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
