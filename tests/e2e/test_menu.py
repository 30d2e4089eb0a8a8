"""A person at a lab PC switches snapshot from bootd's boot menu: the room's current is v2 (B), the menu
offers the previous snapshot v1 (A); picking it with the keyboard boots A."""
from __future__ import annotations

import pytest
from harness import lab_config, running_bootd_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

MAC = "52:54:00:77:05:01"


def test_pick_previous_snapshot_from_the_ipxe_menu(assets, pc_logs):
    # A long menu timeout: the key press, not the timeout, decides (iPXE stops the countdown on a key).
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, menu_timeout=60,
                                                           hosts=[{"mac": MAC, "name": "pc-menu", "group": "lab"}]),
                           assets) as bl:
        bl.new_snapshot_from("demo", "demo@v1", assets.image_b, "marker B")
        bl.bootctl("snapshot", "promote", "demo@v2", "--group", "lab")
        pc = bl.pc("pc-menu", mac=MAC).start()
        shown = pc.serial.wait_for(r"bootd lab: pc-menu", timeout=120, alive=pc.running)
        assert shown is not None, pc.wait(1).describe()
        pc.serial.wait_for(r"previous", timeout=10, alive=pc.running)  # the whole menu is drawn
        pc.send_keys("down", "ret")  # the entry under the default: the previous snapshot
        r = pc.wait(timeout=180)
        assert "demo test OS (v2)" in r.log, r.describe()  # the default the PC did not take
        assert r.ok and r.marker == "A" and r.fresh is True, r.describe()
