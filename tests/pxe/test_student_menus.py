"""What students see (issue 17): `menu.student_entries` per menu, group and host; a hidden entry is not in
the menu text at all, gets no disk, and stays in the plan's `hidden` for the admin menu. With an admin
account the iPXE menu ends with "Admin" (login, then the admin menu fetched with HTTP Basic).

Room1 boots debian (v1 then v2 promoted: "previous: v1" exists) and windows (v1); pc02 follows the room.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from golden import check_golden

from bootd.admins import Accounts
from bootd.config import parse_config
from bootd.daemon import Context
from bootd.state import open_state
from pxe.booter import Booter, render
from pxe.tokens import fallback_token
from snapshots.store import SnapshotStore

GOLDEN = Path(__file__).parent / "golden"
PC01, PC02, PC03 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"

CONFIG = """
interfaces:
  - {name: br0, address: 10.77.0.1/24}
menu: {title: "Lab 5", timeout: 7, cmdline: "console=ttyS0"}
images:
  - {name: debian, title: "Debian 12", kernel: vmlinuz, initrd: initrd.img}
  - {name: windows, title: "Windows 11", kernel: vmlinuz, initrd: initrd.img}
groups:
  - {name: room1, images: [debian, windows], default_image: debian}
  - {name: room2, images: [debian, windows], default_image: debian, student_entries: [current, previous]}
hosts:
  - {mac: "52:54:00:00:00:01", name: pc01, group: room2, student_entries: [current, images]}
  - {mac: "52:54:00:00:00:02", name: pc02, group: room1}
  - {mac: "52:54:00:00:00:03", name: pc03, group: room2}
"""


@pytest.fixture
def ctx(tmp_path):
    state = open_state(tmp_path / "state.db")
    store = SnapshotStore(state, tmp_path / "snapshots", min_free_bytes=0)
    for image in ("debian", "windows"):
        store.create_image(image, "1M", "t")
        store.promote(f"{image}@v1", "*", "t")
    d = store.draft("debian", "t")
    store.seal(d.id, "v2", "t")
    store.promote("debian@v2", "*", "t")
    yield Context(config=parse_config(CONFIG), config_path="test", store=state, snapshots=store)
    state.close()


def menu(ctx, mac):
    return asyncio.run(Booter(ctx).menu_for(mac, "10.77.0.1"))


def text_of(ctx, mac, flavour):
    return render(menu(ctx, mac), flavour).replace(fallback_token(ctx.store, mac), "@TOKEN@")


@pytest.mark.parametrize("flavour", ["ipxe", "pxelinux", "grub"])
def test_golden_student_menu_shows_only_the_current_snapshot(ctx, flavour):
    m = menu(ctx, PC02)
    text = text_of(ctx, PC02, flavour)
    check_golden(GOLDEN / f"student-pc02.{flavour}", text)
    assert [i.key for i in m.items] == ["debian", "local"]
    # hidden entries are not in the text at all, not even their titles
    assert "Windows" not in text and "previous" not in text and "v1" not in text
    plan = Booter(ctx).plan(PC02)
    assert {e.key for e in plan.hidden} == {"windows", "debian-prev"}
    assert plan.disk.extra == ()  # no disk for what students cannot pick


def test_group_and_host_widen_the_student_view(ctx):
    assert [i.key for i in menu(ctx, PC03).items] == ["debian", "debian-prev", "local"]  # room2: previous
    assert [i.key for i in menu(ctx, PC01).items] == ["debian", "windows", "local"]  # the host's own list


def test_no_local_disk_and_nothing_visible_falls_back_to_local(ctx):
    cfg = parse_config(CONFIG.replace("room1, images: [debian, windows], default_image: debian}",
                                      "room1, images: [debian, windows], default_image: debian, student_entries: []}"))
    ctx.set_config(cfg)
    m = menu(ctx, PC02)
    assert [i.key for i in m.items] == ["local"] and m.default == "local"


@pytest.mark.parametrize("flavour", ["ipxe", "pxelinux", "grub"])
def test_golden_student_menu_with_an_admin_account(ctx, flavour):
    Accounts(ctx.store, PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)).add(
        "alice", "correct horse", by="t")
    text = text_of(ctx, PC02, flavour)
    check_golden(GOLDEN / f"student-admin-pc02.{flavour}", text)
    assert "correct horse" not in text and "alice" not in text
    if flavour == "ipxe":
        assert "item bootd-admin Admin (login)" in text
        assert ("chain --replace http://${username:uristring}:${password:uristring}@10.77.0.1:8080"
                f"/boot/admin/{PC02}.ipxe") in text
    ctx.set_config(parse_config(CONFIG.replace('cmdline: "console=ttyS0"}',
                                               'cmdline: "console=ttyS0", admin_entry: false}')))
    assert "bootd-admin" not in render(menu(ctx, PC02), flavour)
