"""A menu fetched while a config-listed image is still importing says so (issue 16, lab run).

bootd says READY (and DHCP serves) before the background import of `images[].disk` is done: waiting for
a multi-GB copy would hold every PC of every room, and a reload imports new images the same way. So the
plan marks an image whose import is running and has nothing promoted: its entry's title and the menu's
notes say "still importing", and it is not the default (the local disk boots until the import is done).
The import is real (SnapshotService, qemu-img convert of a disk of non-zero data); the test checks the
job was still running when the menu was made, so it cannot pass on a finished import.
"""
from __future__ import annotations

import asyncio
import os
import struct

import yaml

from bootd.config import parse_config
from bootd.daemon import Context
from bootd.state import open_state
from pxe.booter import Booter, render
from snapshots.service import SnapshotService

PC = "52:54:00:00:0f:01"


def big_disk(path, mib: int) -> None:
    """A raw disk of `mib` MiB: an MBR with one Linux partition (so the import sees a disk, not raw
    data) over non-zero data (qemu-img copies every cluster of it)."""
    block = bytearray(os.urandom(1 << 20))
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, mib * 2048 - 2048)
    block[446:510] = entry + bytes(48)
    block[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(block)
        block[:512] = os.urandom(512)
        for _ in range(mib - 1):
            f.write(block)


def test_a_menu_during_the_start_up_import_says_the_image_is_still_importing(tmp_path):
    disk = tmp_path / "exam.raw"
    big_disk(disk, 256)
    (tmp_path / "var").mkdir()
    config = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
              "storage": {"directory": str(tmp_path / "var"), "min_free_mb": 0},
              "images": [{"name": "exam", "title": "Exam", "disk": str(disk)}],
              "groups": [{"name": "room1", "images": ["exam"]}],
              "hosts": [{"mac": PC, "name": "pc01", "group": "room1"}]}
    state = open_state(tmp_path / "state.db")
    ctx = Context(config=parse_config(yaml.safe_dump(config)), config_path="test", store=state)
    svc = SnapshotService()

    async def main():
        await svc.start(ctx)  # starts the import of exam.raw in the background, as at daemon start
        job = next(j for j in svc.jobs.running() if j.kind == "import" and j.target == "exam")
        during = await Booter(ctx).menu_for(PC, "10.77.0.1")
        still_running = job.state == "running"
        await asyncio.to_thread(svc.jobs.wait, job.id, 120)
        after = await Booter(ctx).menu_for(PC, "10.77.0.1")
        return job, during, still_running, after

    try:
        job, during, still_running, after = asyncio.run(main())
    finally:
        asyncio.run(svc.stop())
        state.close()
    assert still_running, "the import ended before the menu was made: use a bigger disk"
    assert job.state == "done", job.error

    exam = during.item("exam")
    assert exam.snapshot_id is None and "still importing" in exam.title
    assert any("exam is still importing" in n for n in during.notes)
    assert during.default == "local"  # not a kernel with no disk under it
    for flavour in ("ipxe", "pxelinux", "grub"):
        assert "still importing" in render(during, flavour)

    # once imported (and made current for all groups), the same PC's menu boots its disk
    exam = after.item("exam")
    assert exam.snapshot_id is not None and "importing" not in exam.title and after.default == "exam"
    assert not any("importing" in n for n in after.notes)
