"""Golden menus from the real snapshot store (snapshots.catalog.SnapshotCatalog through the Booter).

Room1 boots debian and windows; debian was promoted v1 then v2 (so "previous: v1" is offered), windows
v1 then v2, and pc01 is pinned to windows@v1 (its per-host override; its "previous" entry is what the
room boots). pc02 follows the room. Same renderers as the config catalog: only the catalog changed.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from golden import check_golden

from bootd.config import parse_config
from bootd.daemon import Context
from bootd.state import open_state
from pxe.booter import Booter, render
from pxe.tokens import fallback_token
from snapshots.store import SnapshotStore

GOLDEN = Path(__file__).parent / "golden"
PC01, PC02 = "52:54:00:00:00:01", "52:54:00:00:00:02"

CONFIG = """
interfaces:
  - {name: br0, address: 10.77.0.1/24}
menu: {title: "Lab 3", timeout: 7, cmdline: "console=ttyS0", student_entries: [current, previous, images]}
images:
  - {name: debian, title: "Debian 12", kernel: vmlinuz, initrd: initrd.img, cmdline: quiet}
  - {name: windows, title: "Windows 11", kernel: vmlinuz, initrd: initrd.img}
groups:
  - {name: room1, images: [debian, windows], default_image: debian, boot: ipxe}
hosts:
  - {mac: "52:54:00:00:00:01", name: pc01, group: room1}
  - {mac: "52:54:00:00:00:02", name: pc02, group: room1}
"""


@pytest.fixture
def ctx(tmp_path):
    state = open_state(tmp_path / "state.db")
    store = SnapshotStore(state, tmp_path / "snapshots", min_free_bytes=0)
    for image in ("debian", "windows"):
        store.create_image(image, "1M", "t")
        d = store.draft(image, "t")
        store.seal(d.id, "v2", "t")
        store.promote(f"{image}@v1", "room1", "t")
        store.promote(f"{image}@v2", "room1", "t")
    store.pin("windows@v1", PC01, "t")
    yield Context(config=parse_config(CONFIG), config_path="test", store=state, snapshots=store)
    state.close()


def menu(ctx, mac):
    return asyncio.run(Booter(ctx).menu_for(mac, "10.77.0.1"))


@pytest.mark.parametrize("host,mac", [("pc01", PC01), ("pc02", PC02)])
@pytest.mark.parametrize("flavour", ["ipxe", "pxelinux", "grub"])
def test_golden_snapshot_menus(ctx, host, mac, flavour):
    text = render(menu(ctx, mac), flavour).replace(fallback_token(ctx.store, mac), "@TOKEN@")
    path = GOLDEN / f"snap-{host}.{flavour}"
    check_golden(path, text)


def test_pin_and_previous(ctx):
    m1, m2 = menu(ctx, PC01), menu(ctx, PC02)
    ids = {(i.image, i.version): i.snapshot_id for i in m2.items if i.image}
    assert [(i.key, i.version, i.previous) for i in m2.items] == [
        ("debian", "debian@v2", False), ("windows", "windows@v2", False),
        ("debian-prev", "debian@v1", True), ("windows-prev", "windows@v1", True), ("local", None, False)]
    assert [(i.key, i.version, i.previous) for i in m1.items] == [
        ("debian", "debian@v2", False), ("windows", "windows@v1", False),
        ("debian-prev", "debian@v1", True), ("windows-prev", "windows@v2", True), ("local", None, False)]
    assert m1.default == m2.default == "debian"
    assert f"bootd.snapshot={ids[('windows', 'windows@v1')]}" in m1.item("windows").cmdline.split()
    assert "pinned" in m1.item("windows").title


def test_rollback_changes_the_next_menu(ctx):
    ctx.snapshots.rollback("debian", "room1", "t")
    m = menu(ctx, PC02)
    assert m.item("debian").version == "debian@v1"
    assert m.item("debian-prev") is None  # nothing older to roll back to
