"""Kernel arguments per group and per host (issue 16, lab run): global (menu.cmdline) -> image -> group ->
host, then bootd's own, on every entry of every flavour. Goldens: tests/pxe/golden/args-*.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from golden import check_golden

from bootd.bootplan import plan_for
from bootd.config import parse_config
from bootd.daemon import Context
from bootd.state import open_state
from pxe.booter import Booter, render
from pxe.tokens import fallback_token

GOLDEN = Path(__file__).parent / "golden"

CONFIG = """
interfaces:
  - {name: br0, address: 10.77.0.1/24}
http: {port: 8080}
nbd: {port: 10809}
menu: {title: "Lab 4", timeout: 5, cmdline: "console=ttyS0", student_entries: [current, previous, images]}
images:
  - {name: debian, title: "Debian 12", kernel: debian/vmlinuz, initrd: debian/initrd.img, cmdline: quiet}
  - {name: exam, title: "Exam", kernel: vmlinuz, initrd: initrd.img}
groups:
  - {name: room4, images: [debian, exam], default_image: debian, cmdline: "splash i915.modeset=0"}
hosts:
  - {mac: "52:54:00:00:04:01", name: pc41, group: room4, cmdline: "video=800x600 i915.modeset=1"}
  - {mac: "52:54:00:00:04:02", name: pc42, group: room4}
  - {mac: "52:54:00:00:04:03", name: pc43, cmdline: "noapic"}
"""
PC41, PC42, PC43 = "52:54:00:00:04:01", "52:54:00:00:04:02", "52:54:00:00:04:03"


@pytest.fixture
def ctx(tmp_path):
    store = open_state(tmp_path / "state.db")
    yield Context(config=parse_config(CONFIG), config_path="test", store=store)
    store.close()


def args_before_bootd(cmdline: str) -> list[str]:
    words = cmdline.split()
    return words[:next(i for i, w in enumerate(words) if w.startswith("bootd."))]


def test_arguments_merge_global_image_group_host(ctx):
    assert plan_for(ctx.config, None, PC41).settings.cmdline == "splash i915.modeset=0 video=800x600 i915.modeset=1"
    menus = {mac: asyncio.run(Booter(ctx).menu_for(mac, "10.77.0.1")) for mac in (PC41, PC42, PC43)}
    assert args_before_bootd(menus[PC41].item("debian").cmdline) == \
        ["console=ttyS0", "quiet", "splash", "i915.modeset=0", "video=800x600", "i915.modeset=1"]
    assert args_before_bootd(menus[PC41].item("exam").cmdline) == \
        ["console=ttyS0", "splash", "i915.modeset=0", "video=800x600", "i915.modeset=1"]
    assert args_before_bootd(menus[PC42].item("debian").cmdline) == \
        ["console=ttyS0", "quiet", "splash", "i915.modeset=0"]
    assert args_before_bootd(menus[PC43].item("exam").cmdline) == ["console=ttyS0", "noapic"]


@pytest.mark.parametrize("flavour", ["ipxe", "pxelinux", "grub"])
def test_golden_group_and_host_arguments(ctx, flavour):
    menu = asyncio.run(Booter(ctx).menu_for(PC41, "10.77.0.1"))
    text = render(menu, flavour)
    check_golden(GOLDEN / f"args-pc41.{flavour}", text.replace(fallback_token(ctx.store, PC41), "@TOKEN@"))
