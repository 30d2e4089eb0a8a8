"""The admin workflow on real boots: promote B for the room, roll back to A, a pinned PC keeps its pin,
a persistent PC keeps its own changes across boots.

Room `lab`: pc-room follows the group, pc-pinned is pinned to v2 (B) from the start. pc-persist is in
group `staff` (same image, never promoted there) with `persistent: true`. Each round boots the PCs at once.
"""
from __future__ import annotations

import pytest
from harness import boot_all, lab_config, running_bootd_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

ROOM, PINNED, PERSIST = "52:54:00:77:02:01", "52:54:00:77:02:02", "52:54:00:77:02:03"


def _round(pcs):
    results = boot_all(pcs, timeout=180)
    for r in results:
        assert r.ok, r.describe()
    return {r.name: r for r in results}


@pytest.mark.timeout(600)
def test_promote_rollback_pin_persistent(assets, pc_logs):
    hosts = [{"mac": ROOM, "name": "pc-room", "group": "lab"},
             {"mac": PINNED, "name": "pc-pinned", "group": "lab"},
             {"mac": PERSIST, "name": "pc-persist", "group": "staff", "persistent": True}]
    groups = [{"name": "lab", "images": ["demo"], "default_image": "demo"},
              {"name": "staff", "images": ["demo"], "default_image": "demo"}]
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, hosts=hosts,
                                                           groups=groups), assets) as bl:
        v2 = bl.new_snapshot_from("demo", "demo@v1", assets.image_b, "marker B")
        assert v2["name"] == "demo@v2", v2
        bl.bootctl("snapshot", "pin", "demo@v2", "pc-pinned")
        pcs = [bl.pc("pc-room", mac=ROOM), bl.pc("pc-pinned", mac=PINNED), bl.pc("pc-persist", mac=PERSIST)]

        # 1: v1 is current everywhere; the pin wins for pc-pinned.
        r = _round(pcs)
        assert (r["pc-room"].marker, r["pc-pinned"].marker, r["pc-persist"].marker) == ("A", "B", "A")
        assert r["pc-persist"].fresh is True

        # 2: promote v2 for the room: the room boots B; staff (pc-persist) is untouched and keeps its file.
        bl.bootctl("snapshot", "promote", "demo@v2", "--group", "lab")
        r = _round(pcs)
        assert (r["pc-room"].marker, r["pc-pinned"].marker, r["pc-persist"].marker) == ("B", "B", "A")
        assert r["pc-room"].fresh is True
        assert r["pc-persist"].fresh is False, r["pc-persist"].describe()

        # 3: roll the room back: A again (fresh), the pin still holds, the persistent disk still has its file.
        out = bl.bootctl("snapshot", "rollback", "demo", "--group", "lab")
        assert "demo@v1" in out.stdout, out.stdout
        r = _round(pcs)
        assert (r["pc-room"].marker, r["pc-pinned"].marker, r["pc-persist"].marker) == ("A", "B", "A")
        assert r["pc-room"].fresh is True and r["pc-pinned"].fresh is True
        assert r["pc-persist"].fresh is False
