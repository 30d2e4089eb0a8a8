"""The main path with real firmware: the stock iPXE ROM in QEMU gets bootd's DHCP answer, fetches
`/boot/<mac>.ipxe`, shows bootd's menu, and boots the host's default entry with kernel and initrd over
HTTP. The boot timeline then reads dhcp -> script -> kernel -> initrd, with bytes and durations.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from menu_vm import need_assets, room_config, start_pc, stop_pc, tail, wait_for  # noqa: E402

pytestmark = [pytest.mark.qemu, pytest.mark.netns]


def test_ipxe_menu_boots_over_http(lab, bootd_daemon, tmp_path):
    need_assets()
    mac = "52:54:00:77:02:01"
    boot = tmp_path / "storage" / "boot"
    d = bootd_daemon(room_config(lab, tmp_path, mac, "bootd-ipxe", 2), ns=lab.server)
    qemu, serial = start_pc(lab, "ipxe-qemu", mac)
    try:
        shown = wait_for(serial, r"bootd-ipxe: pc01", 120, qemu)
        assert shown, f"bootd's iPXE menu never showed; serial:\n{tail(serial)}"
        cmdline = wait_for(serial, r"Command line: [^\r\n]*", 240, qemu)
        assert cmdline, f"the kernel did not start; serial:\n{tail(serial)}"
    finally:
        stop_pc(qemu)
    line = cmdline.group(0)
    assert "bootd.image=windows" in line, line  # pc01's own default
    assert f"bootd.config=http://{lab.server_ip}:8080/clients/{mac}/" in line
    events = d.api.get("/api/v1/hosts/pc01")["events"]
    kinds = [ev["kind"] for ev in events if ev["kind"] in ("dhcp", "script", "kernel", "initrd")]
    # the DHCP server records its own steps; then the script and the two files over HTTP, in order
    assert "dhcp" in kinds and kinds.index("dhcp") < kinds.index("script"), kinds
    assert kinds[kinds.index("script"):] == ["script", "kernel", "initrd"], kinds
    sizes = {ev["kind"]: ev["nbytes"] for ev in events}
    assert sizes["kernel"] == (boot / "vmlinuz").stat().st_size
    assert sizes["initrd"] == (boot / "initrd.img").stat().st_size
    out = d.bootctl("hosts", "pc01", check=True).stdout
    assert "script" in out and "initrd.img" in out
