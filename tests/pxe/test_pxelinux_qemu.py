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


def test_a_power_on_is_one_boot_although_pxelinux_reads_its_menu_twice(lab, bootd_daemon, tmp_path):
    """ldlinux.c32 and then menu.c32 each read pxelinux.cfg/01-<mac>: one boot, one set of disks, and
    the disk on the kernel's command line is the one `bootctl disk list` shows (issue 16, lab run)."""
    import re
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
    from nbdtest import make_base

    need_assets()
    if not PXELINUX.exists() or not (MODULES / "ldlinux.c32").exists():
        pytest.skip("pxelinux / syslinux-common not installed")
    mac = "52:54:00:77:01:02"
    config = room_config(lab, tmp_path, mac, "bootd-lab", 2, boot="pxelinux", image_cmdline="bootd.hold=0")
    config["nbd"] = {"enabled": True}
    src = make_base(tmp_path / "windows.qcow2", size_mb=16)
    for img in config["images"]:
        if img["name"] == "windows":
            img["disk"] = str(src)
    d = bootd_daemon(config, ns=lab.server)
    deadline = time.monotonic() + 60
    while not any(i.get("current") for i in d.api.get("/api/v1/images")["images"]):
        assert time.monotonic() < deadline, "windows was not imported"
        time.sleep(0.2)
    qemu, serial = start_pc(lab, "pxe-qemu-one-boot", mac)
    try:
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
        assert cmdline, f"the kernel did not start; serial:\n{tail(serial)}"
    finally:
        stop_pc(qemu)
    word = re.search(r"bootd\.nbd=\S+:10809/([A-Za-z0-9_-]+)", cmdline.group(0))
    assert word, cmdline.group(0)
    events = d.api.get(f"/api/v1/hosts/{mac}")["events"]
    menu_reads = [e for e in events if e["kind"] == "menu" and e["detail"].get("outcome") == "complete"
                  and e["detail"].get("path") == f"pxelinux.cfg/01-{mac.replace(':', '-')}"]
    assert len(menu_reads) == 2, [(e["kind"], e["detail"]) for e in events]  # pxelinux does read it twice
    boots = [e for e in events if e["kind"] == "disk" and e["detail"].get("action") == "boot"]
    assert len(boots) == 1, [e["detail"] for e in boots]
    disks = [e for e in d.api.get("/api/v1/disks")["disks"] if e["mac"] == mac]
    assert word.group(1) in {e["export"] for e in disks} and len({e["boot"] for e in disks}) == 1, disks
