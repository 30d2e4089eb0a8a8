"""`dhcp.default_group`: what a PC that is not under `hosts` boots (issue 16, lab run).

Before it, an unknown PC got every image over iPXE and no group: a pxelinux room could not boot a PC
nobody had listed yet. With it, the unknown PC's boot plan has the group's images, default, menu flavour
(so DHCP hands it pxelinux.0, through the real codec and policy) and kernel arguments.
"""
from __future__ import annotations

import asyncio

import pytest
import yaml

from bootd.bootplan import plan_for
from bootd.config import ConfigError, load_config, parse_config
from bootd.daemon import Context
from bootd.dhcp.codec import DISCOVER, DhcpMessage, decode, encode
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.policy import DhcpPolicy
from bootd.state import open_state
from pxe.booter import Booter, render

UNKNOWN = "52:54:00:00:0d:99"
KNOWN = "52:54:00:00:0d:01"


def lab(default_group: str | None) -> dict:
    cfg = {
        "interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
        "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.109"}]},
        "images": [{"name": "deb"}, {"name": "win"}, {"name": "exam"}],
        "menu": {"student_entries": ["current", "previous", "images"]},
        "groups": [{"name": "room1", "images": ["deb", "win"]},
                   {"name": "oldroom", "images": ["exam", "deb"], "default_image": "deb", "boot": "pxelinux",
                    "cmdline": "nomodeset"}],
        "hosts": [{"mac": KNOWN, "name": "pc01", "group": "room1"}],
    }
    if default_group is not None:
        cfg["dhcp"]["default_group"] = default_group
    return cfg


def bios_pxe_discover(mac: str) -> DhcpMessage:
    opts = {53: bytes([DISCOVER]), 60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00",
            97: b"\x00" + bytes(range(16)), 55: bytes([1, 3, 66, 67])}
    return decode(encode(DhcpMessage(xid=0x1600, chaddr=bytes.fromhex(mac.replace(":", "")), options=opts)))


@pytest.fixture
def store(tmp_path):
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def offered_file(cfg, store, mac: str) -> bytes:
    policy = DhcpPolicy(cfg, LeaseTable(store))
    out = policy.handle(bios_pxe_discover(mac), policy.interfaces["br0"], 68, 1_800_000_000.0, None)
    assert out.reply is not None
    return out.reply.file


def test_an_unknown_pc_boots_the_default_group(store):
    cfg = parse_config(yaml.safe_dump(lab("oldroom")))
    plan = plan_for(cfg, None, UNKNOWN)
    s = plan.settings
    assert (s.group, s.images, s.default_image, s.boot, s.cmdline) == \
           ("oldroom", ("exam", "deb"), "deb", "pxelinux", "nomodeset")
    assert [e.key for e in plan.entries] == ["exam", "deb"] and plan.default == "deb"
    # DHCP's loader choice follows the plan: a BIOS PXE ROM of an unknown PC gets pxelinux.0
    assert offered_file(cfg, store, UNKNOWN) == b"pxelinux.0"
    # its menu: the group's entries and kernel arguments
    ctx = Context(config=cfg, config_path="test", store=store)
    menu = asyncio.run(Booter(ctx).menu_for(UNKNOWN, "10.77.0.1"))
    assert [i.key for i in menu.items] == ["exam", "deb", "local"] and menu.default == "deb"
    assert "nomodeset" in menu.item("deb").cmdline.split()
    assert "DEFAULT deb" in render(menu, "pxelinux")
    # a menu asked for without a MAC (pxelinux.cfg/default from an address no binding names): the group's
    # images and arguments, no disk
    anonymous = asyncio.run(Booter(ctx).menu_for(None, "10.77.0.1"))
    assert [i.key for i in anonymous.items] == ["exam", "deb", "local"] and anonymous.default == "deb"
    assert "nomodeset" in anonymous.item("deb").cmdline.split()
    # a listed PC keeps its own group
    assert plan_for(cfg, None, KNOWN).settings.group == "room1"
    assert offered_file(cfg, store, KNOWN) == b"undionly.kpxe"


def test_without_default_group_an_unknown_pc_gets_every_image_over_ipxe(store):
    cfg = parse_config(yaml.safe_dump(lab(None)))
    s = plan_for(cfg, None, UNKNOWN).settings
    assert (s.group, s.images, s.boot, s.cmdline) == (None, ("deb", "win", "exam"), "ipxe", "")
    assert offered_file(cfg, store, UNKNOWN) == b"undionly.kpxe"


def test_an_unknown_default_group_is_a_config_error_with_its_line(tmp_path):
    path = tmp_path / "bootd.yaml"
    path.write_text(yaml.safe_dump(lab("nosuchroom"), sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "default_group" in text)
    assert f"bootd.yaml:{line} dhcp.default_group: unknown group 'nosuchroom'" in str(err.value)
