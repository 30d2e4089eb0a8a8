"""An unknown PC netboots, shows up in `bootctl host list --unknown` with its firmware, is adopted into a
room with one command, and from its next power-on boots that room's snapshot (issue 16, hosts as data).

Image `demo`: v1 (marker A) is current for every group, v2 (marker B) is promoted for room1 only. The
PC is in no config: before adoption it boots A; after `bootctl host adopt MAC --group room1` it boots B
with a fresh disk, and its reservation is the address given."""
from __future__ import annotations

import pytest
from harness import lab_config, running_bootd_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

STRANGER = "52:54:00:77:0a:01"


@pytest.mark.timeout(600)
def test_unknown_pc_is_adopted_into_a_room_and_boots_its_snapshot(assets, pc_logs):
    groups = [{"name": "room1", "images": ["demo"], "default_image": "demo"}]
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, groups=groups),
                           assets) as bl:
        v2 = bl.new_snapshot_from("demo", "demo@v1", assets.image_b, "marker B")
        bl.bootctl("snapshot", "promote", v2["name"], "--group", "room1")

        first = bl.pc("stranger", mac=STRANGER).boot(timeout=180)
        assert first.ok, first.describe()
        assert first.marker == "A", first.describe()
        unknown = bl.bootctl_json("host", "list", "--unknown")
        rows = unknown if isinstance(unknown, list) else unknown.get("unknown", unknown.get("hosts", []))
        mine = [r for r in rows if r["mac"] == STRANGER]
        assert mine and mine[0]["arch"] == "bios", unknown

        fixed_ip = str(bl.lab.subnet.network_address + 77)
        bl.bootctl("host", "adopt", STRANGER, "--group", "room1", "--name", "pc77", "--ip", fixed_ip)
        listed = bl.bootctl_json("host", "list", "--unknown")
        rows = listed if isinstance(listed, list) else listed.get("unknown", listed.get("hosts", []))
        assert STRANGER not in [r["mac"] for r in rows], listed

        second = bl.pc("pc77", mac=STRANGER).boot(timeout=180)
        assert second.ok, second.describe()
        assert second.marker == "B", second.describe()
        assert second.fresh is True, second.describe()
        assert second.ip == fixed_ip, second.describe()
