"""Golden tests of the three menu flavours, and the Booter/Catalog seam.

The lab: two images, a room that offers both with `debian` as its default, and pc01 whose own entry
overrides the room's default (it boots `windows`). pc02 has no override. Goldens hold `@TOKEN@` where the
host's NBD export token goes (random per host, read back from the state store).
Regenerate with BOOTD_UPDATE_GOLDEN=1 after a deliberate change (that run fails: tests/golden.py), and read the diff.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from golden import check_golden as check_golden_file

from bootd.config import parse_config
from bootd.daemon import Context
from bootd.macaddr import parse_mac
from bootd.state import open_state
from pxe.booter import Booter, render
from pxe.catalog import BootHost, CatalogEntry, boot_host, entry_key
from pxe.service import GRUB_RE, IPXE_RE, PXELINUX_RE
from pxe.tokens import fallback_token

GOLDEN = Path(__file__).parent / "golden"

CONFIG = """
interfaces:
  - {name: br0, address: 10.77.0.1/24}
http: {port: 8080}
nbd: {port: 10809}
menu: {title: "Lab 3", timeout: 7, cmdline: "console=ttyS0", student_entries: [current, previous, images]}
images:
  - {name: debian, title: "Debian 12 desktop", kernel: debian/vmlinuz, initrd: debian/initrd.img, cmdline: quiet}
  - {name: windows, title: "Windows 11 (QEMU)", kernel: vmlinuz, initrd: initrd.img}
groups:
  - {name: room1, images: [debian, windows], default_image: debian, boot: pxelinux}
hosts:
  - {mac: "52:54:00:00:00:01", name: pc01, group: room1, default_image: windows}
  - {mac: "52:54:00:00:00:02", name: pc02, group: room1}
"""

PC01 = "52:54:00:00:00:01"
PC02 = "52:54:00:00:00:02"


@pytest.fixture
def ctx(tmp_path):
    store = open_state(tmp_path / "state.db")
    yield Context(config=parse_config(CONFIG), config_path="test", store=store)
    store.close()


def menu(ctx, mac, server="10.77.0.1", **kw):
    return asyncio.run(Booter(ctx, **kw).menu_for(mac, server))


def check_golden(name: str, text: str, token: str) -> None:
    path = GOLDEN / name
    check_golden_file(path, text.replace(token, "@TOKEN@"))


@pytest.mark.parametrize("flavour", ["ipxe", "pxelinux", "grub"])
def test_golden_overridden_host(ctx, flavour):
    m = menu(ctx, PC01)
    check_golden(f"pc01.{flavour}", render(m, flavour), fallback_token(ctx.store, PC01))


@pytest.mark.parametrize("flavour", ["ipxe", "pxelinux", "grub"])
def test_golden_group_default_host(ctx, flavour):
    m = menu(ctx, PC02)
    check_golden(f"pc02.{flavour}", render(m, flavour), fallback_token(ctx.store, PC02))


def test_override_changes_only_the_default(ctx):
    a, b = menu(ctx, PC01), menu(ctx, PC02)
    assert a.default == "windows" and b.default == "debian"
    assert [i.key for i in a.items] == [i.key for i in b.items] == ["debian", "windows", "local"]
    # the same entries in every flavour
    for m in (a, b):
        for flavour in ("ipxe", "pxelinux", "grub"):
            text = render(m, flavour)
            for it in m.items:
                assert it.title in text, (flavour, it.title)


def test_cmdline_carries_server_disk_and_config(ctx):
    m = menu(ctx, PC01, server="10.77.0.1")
    token = fallback_token(ctx.store, PC01)
    deb = m.item("debian")
    words = deb.cmdline.split()
    assert words[:2] == ["console=ttyS0", "quiet"]
    assert "bootd.server=10.77.0.1" in words
    assert f"bootd.nbd=10.77.0.1:10809/{token}" in words
    assert f"bootd.config=http://10.77.0.1:8080/clients/{PC01}/" in words
    assert "bootd.image=debian" in words


def test_fallback_token_is_per_host_random_and_stable(ctx):
    t1, t2 = fallback_token(ctx.store, PC01), fallback_token(ctx.store, PC02)
    assert t1 != t2 and len(t1) == 24 and re.fullmatch(r"[0-9a-f]+", t1)
    assert fallback_token(ctx.store, PC01.upper()) == t1
    assert PC01.replace(":", "") not in t1


def test_effective_settings(ctx):
    cfg = ctx.config
    h = boot_host(cfg, "52-54-00-00-00-01")
    assert h == BootHost(mac=PC01, name="pc01", group="room1", images=("debian", "windows"),
                         default_image="windows", boot="pxelinux", persistent=False,
                         student_entries=("current", "previous", "images"))
    unknown = boot_host(cfg, "52:54:00:ff:ff:ff")
    assert unknown.name is None and unknown.images == ("debian", "windows") and unknown.default_image == "debian"
    assert unknown.boot == "ipxe"


def test_host_image_list_override(tmp_path):
    text = CONFIG.replace('default_image: windows}', 'images: [windows]}')
    cfg = parse_config(text)
    store = open_state(tmp_path / "s.db")
    try:
        m = menu(Context(config=cfg, config_path="test", store=store), PC01)
        assert [i.key for i in m.items] == ["windows", "local"] and m.default == "windows"
    finally:
        store.close()


class TwoSnapshotCatalog:
    """A catalog with snapshots (current + previous), as the snapshot store gives: the renderers take it
    unchanged."""

    def entries_for(self, host):
        return [CatalogEntry(key="debian-v3", image="debian", title="Debian (v3)", kernel="vmlinuz",
                             initrd="initrd.img", snapshot_id=3, version="v3", default=True),
                CatalogEntry(key="debian-v2", image="debian", title="Previous: Debian (v2)", kernel="vmlinuz",
                             initrd="initrd.img", snapshot_id=2, version="v2", previous=True)]


def test_a_snapshot_catalog_plugs_in(ctx):
    m = menu(ctx, PC02, catalog=TwoSnapshotCatalog())
    assert [i.key for i in m.items] == ["debian-v3", "debian-v2", "local"]
    assert m.default == "debian-v3"
    assert "bootd.snapshot=3" in m.item("debian-v3").cmdline.split()
    assert m.item("debian-v2").previous
    ipxe = render(m, "ipxe")
    # previous and local come after a separator
    assert ipxe.index("item --gap --") < ipxe.index("item debian-v2")
    assert "MENU SEPARATOR\n\nLABEL debian-v2" in render(m, "pxelinux")
    ctx.config.menu.previous_snapshot_entry = False
    m = menu(ctx, PC02, catalog=TwoSnapshotCatalog())
    assert [i.key for i in m.items] == ["debian-v3", "local"]
    ctx.config.menu.local_disk_entry = False
    m = menu(ctx, PC02, catalog=TwoSnapshotCatalog())
    assert [i.key for i in m.items] == ["debian-v3"]


def test_titles_cannot_inject_directives(ctx):
    class Evil:
        def entries_for(self, host):
            return [CatalogEntry(key="x", image="x", title="X\nLABEL evil\n  KERNEL evil ${x} 'q'",
                                 kernel="k", initrd="i", cmdline="a\nboot evil", default=True)]
    m = menu(ctx, PC02, catalog=Evil())
    for flavour in ("ipxe", "pxelinux", "grub"):
        text = render(m, flavour)
        assert not re.search(r"^\s*LABEL evil", text, re.M), flavour
        assert not re.search(r"^\s*boot evil", text, re.M), flavour
    assert "${x}" not in render(m, "ipxe")
    assert "'X LABEL evil   KERNEL evil ${x} '\\''q'\\'''" in render(m, "grub")
    with pytest.raises(ValueError):
        CatalogEntry(key="bad key", image="x", title="x", kernel="k", initrd="i")


def test_timeout_zero_boots_the_default_at_once(ctx):
    ctx.config.menu.timeout = 0
    m = menu(ctx, PC01)
    ipxe = render(m, "ipxe")
    assert "choose" not in ipxe and "\ngoto windows\n" in ipxe
    pxl = render(m, "pxelinux")
    assert "UI " not in pxl and "TIMEOUT" not in pxl and "DEFAULT windows" in pxl
    assert "set timeout=0" in render(m, "grub")


def test_unknown_mac_menu_has_no_host_arguments(ctx):
    m = menu(ctx, None)
    assert m.notes and all("bootd.nbd=" not in i.cmdline and "bootd.config=" not in i.cmdline for i in m.items)


def test_entry_key_and_mac_parsing():
    assert entry_key("Debian", "v3") == "debian-v3"
    assert entry_key("Win 11 (x)") == "win-11-x"
    assert parse_mac("525400000001") == PC01
    assert parse_mac("52-54-00-00-00-01") == PC01
    assert parse_mac("boot") is None


def test_tftp_names():
    assert PXELINUX_RE.fullmatch("pxelinux.cfg/01-52-54-00-00-00-01").group("mac") == "52-54-00-00-00-01"
    assert PXELINUX_RE.fullmatch("pxelinux.cfg/default").group("mac") is None
    assert PXELINUX_RE.fullmatch("pxelinux.cfg/C0A8") is None
    assert GRUB_RE.fullmatch("grub/grub.cfg-01-52-54-00-00-00-01").group("mac")
    assert GRUB_RE.fullmatch("grub/grub.cfg-52:54:00:00:00:01").group("mac")
    assert GRUB_RE.fullmatch("grub/grub.cfg").group("mac") is None
    assert IPXE_RE.fullmatch("52:54:00:00:00:01.ipxe")


def test_grub_menus_pass_grub_script_check(ctx, tmp_path):
    """GRUB's own parser (grub-common's grub-script-check) accepts every rendered GRUB menu."""
    import shutil
    import subprocess
    if not shutil.which("grub-script-check"):
        pytest.skip("grub-script-check (grub-common) not installed")

    class Odd:
        def entries_for(self, host):
            return [CatalogEntry(key="odd", image="odd", title="It's \"odd\" {x} $y; `z`", kernel="k k",
                                 initrd="i", cmdline="a='b c' d=$e f;g", default=True)]
    menus = [menu(ctx, PC01), menu(ctx, PC02), menu(ctx, PC02, catalog=Odd())]
    for i, m in enumerate(menus):
        path = tmp_path / f"grub{i}.cfg"
        path.write_text(render(m, "grub"))
        r = subprocess.run(["grub-script-check", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, (path.read_text(), r.stdout, r.stderr)
    odd = render(menus[2], "grub")
    assert "  linux '/k k' console=ttyS0 'a='\\''b' 'c'\\''' 'd=$e' 'f;g' bootd.server" in odd, odd
    bad = tmp_path / "bad.cfg"
    bad.write_text(render(menus[0], "grub").replace("}", "", 1))
    assert subprocess.run(["grub-script-check", str(bad)], capture_output=True).returncode != 0
