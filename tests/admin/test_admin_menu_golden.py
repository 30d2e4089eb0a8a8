"""Golden admin menu (issue 17): what an admin sees at pc01 of room1, with the snapshot store's versions,
notes and ages; room-wide changes behind a confirmation menu; no credentials in the text."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from golden import check_golden  # noqa: E402

from bootd.config import parse_config  # noqa: E402
from bootd.daemon import Context  # noqa: E402
from bootd.http.admin_menu import MenuAction, render_admin_menu  # noqa: E402
from bootd.state import open_state  # noqa: E402
from snapshots.store import SnapshotStore  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "pxe" / "golden"
PC01, STRANGER = "52:54:00:00:00:01", "52:54:00:00:00:99"

CONFIG = """
interfaces:
  - {name: br0, address: 10.77.0.1/24}
menu: {title: "Lab 5", timeout: 7}
images:
  - {name: debian, title: "Debian 12", kernel: vmlinuz, initrd: initrd.img}
groups:
  - {name: room1, images: [debian], default_image: debian}
  - {name: room2, images: [debian], default_image: debian}
hosts:
  - {mac: "52:54:00:00:00:01", name: pc01, group: room1}
"""


@pytest.fixture
def ctx(tmp_path):
    state = open_state(tmp_path / "state.db")
    store = SnapshotStore(state, tmp_path / "snapshots", min_free_bytes=0)
    store.create_image("debian", "1M", "t")
    store.promote("debian@v1", "room1", "t")
    d = store.draft("debian", "t")
    store.seal(d.id, "office suite\x1b[2J and ${password}", "t")  # a hostile note is shown harmless
    store.draft("debian@v2", "t", host=PC01)  # pc01 is in maintenance on a draft of v2
    yield Context(config=parse_config(CONFIG), config_path="test", store=state, snapshots=store)
    state.close()


def render(ctx, mac):
    store = ctx.snapshots
    now = max(s.sealed_at or s.created_at for s in store.snapshots("debian")) + 2 * 3600
    links: list[MenuAction] = []

    def link(a: MenuAction) -> str:
        links.append(a)
        return f"/boot/admin/{mac}/do/NONCE{len(links)}"
    lines = render_admin_menu(ctx, mac, "alice", "http://10.77.0.1:8080", link, now)
    return "#!ipxe\n" + "\n".join(lines) + "\n", links


def test_golden_admin_menu(ctx):
    text, links = render(ctx, PC01)
    check_golden(GOLDEN / "admin-pc01.ipxe", text)
    assert [a.action for a in links] == ["boot", "boot", "boot", "pin", "pin", "promote", "rollback", "seal"]
    assert "\x1b" not in text and "${password}" not in text.replace("${password:uristring}", "")
    assert "Adopt" not in text  # pc01 is a known host


def test_an_unknown_pc_is_offered_adoption_into_each_room(ctx):
    text, links = render(ctx, STRANGER)
    assert [a.args for a in links if a.action == "adopt"] == [{"group": "room1"}, {"group": "room2"}]
    assert "item a" in text and "Adopt this PC into room room2" in text
