"""One power-on is one boot, although pxelinux reads its menu twice (issue 16, lab run).

pxelinux.0 loads ldlinux.c32, which reads pxelinux.cfg/01-<mac>; then the UI module (menu.c32) reads the
same file again. Each read used to start a boot: two sets of overlays, two boots in `bootctl disk list`,
and the exports on the first menu's command lines were torn down under the PC. Here a real TFTP server
with the menus service's providers, a real DiskManager (qemu-storage-daemon on loopback) over a real
snapshot store, and curl as the TFTP client walk the chain twice: pxelinux.0, ldlinux.c32, the menu,
the menu again.
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest

from bootd.config import parse_config
from bootd.daemon import Context
from bootd.dhcp.leases import LeaseTable
from bootd.state import open_state
from bootd.tftp.server import TftpServer
from pxe.service import MenuService

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from nbdtest import Harness  # noqa: E402  (tests/nbd is no package: `nbd` is libnbd's module)

import snapshots.store as snapstore  # noqa: E402

PC = "52:54:00:00:0e:01"
MENU = f"pxelinux.cfg/01-{PC.replace(':', '-')}"
NBD_WORD = re.compile(r"bootd\.nbd=\S+/([A-Za-z0-9_-]+)")
CONFIG = f"""
interfaces:
  - {{name: br0, address: 127.0.0.1/8}}
menu: {{student_entries: [current, previous, images]}}
images:
  - {{name: a, kernel: vmlinuz, initrd: initrd.img}}
  - {{name: b, kernel: vmlinuz, initrd: initrd.img}}
groups:
  - {{name: room1, images: [a, b], boot: pxelinux}}
hosts:
  - {{mac: "{PC}", name: pc01, group: room1}}
"""


async def tftp_get(port: int, path: str) -> bytes:
    p = await asyncio.create_subprocess_exec(
        "curl", "-s", "--max-time", "20", f"tftp://127.0.0.1:{port}/{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await p.communicate()
    assert p.returncode == 0, f"curl tftp {path}: exit {p.returncode}"
    return out


@pytest.fixture
def lab(tmp_path):
    from nbdexport.service import DiskService

    state = open_state(tmp_path / "state.db")
    # the PC's address is 127.0.0.1 by a live lease: its menu goes to it (bootd/peers.py)
    LeaseTable(state).bind("127.0.0.1", PC, expires=time.time() + 600, now=time.time())
    root = tmp_path / "boot"
    root.mkdir()
    for name in ("pxelinux.0", "ldlinux.c32", "menu.c32"):
        (root / name).write_bytes(name.encode() * 100)
    hs = Harness(tmp_path)
    hs.store = state
    store = snapstore.SnapshotStore(state, tmp_path / "snapshots")
    for name in ("a", "b"):
        store.create_image(name, "1M", "t")
        store.promote(f"{name}@v1", "room1", "t")
    ctx = Context(config=parse_config(CONFIG), config_path="test", store=state)
    ctx.snapshots = store
    svc = DiskService()
    svc.ctx = ctx
    hs.snapshots, hs.resolve = store, svc._resolve
    try:
        hs.start()
        ctx.disks = hs.m
        yield ctx, hs, root
    finally:
        hs.stop()
        state.close()


def test_a_power_on_that_reads_its_menu_twice_is_one_boot(lab):
    ctx, hs, root = lab

    async def power_on(port: int) -> tuple[bytes, bytes]:
        await tftp_get(port, "pxelinux.0")
        await tftp_get(port, "ldlinux.c32")
        first = await tftp_get(port, MENU)  # ldlinux.c32 reads the menu
        await tftp_get(port, "menu.c32")
        second = await tftp_get(port, MENU)  # menu.c32 reads it again
        return first, second

    async def main():
        server = TftpServer(str(root), store=ctx.store, metrics=ctx.metrics)
        await server.start([("127.0.0.1", 0)])
        ctx.tftp = server
        menus = MenuService()
        await menus.start(ctx)
        try:
            port = server.addresses[0][1]
            one = await power_on(port)
            rows_one = await hs.m.list()
            two = await power_on(port)
            rows_two = await hs.m.list()
        finally:
            await menus.stop()
            await server.stop()
        return one, rows_one, two, rows_two

    (first, second), rows_one, (third, fourth), rows_two = hs.run(main())
    boots = [e for e in ctx.store.events(PC, limit=100) if e["kind"] == "disk" and e["detail"].get("action") == "boot"]
    assert len(boots) == 2, f"two power-ons must be two boots, not {len(boots)}"
    # within one power-on: the same menu, the same exports, one boot in `bootctl disk list`
    assert first == second and fourth == third
    names = NBD_WORD.findall(first.decode())
    assert len(names) == 2 and set(names) == {r["export"] for r in rows_one if r["mac"] == PC}
    assert len({r["boot"] for r in rows_one if r["mac"] == PC}) == 1
    # the next power-on (pxelinux.0 and ldlinux.c32 fetched again) is a new boot with new exports
    assert not set(NBD_WORD.findall(third.decode())) & set(names)
    assert set(NBD_WORD.findall(third.decode())) == {r["export"] for r in rows_two if r["mac"] == PC}
    assert {r["boot"] for r in rows_two if r["mac"] == PC}.isdisjoint({r["boot"] for r in rows_one})
