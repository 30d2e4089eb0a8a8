"""Lab PCs boot from bootd with stock firmware: SeaBIOS + iPXE ROM, OVMF (UEFI loader), pxelinux.

One bootd serves the room; the three PCs boot at once (module fixture), each test checks its own.
"""
from __future__ import annotations

import pytest
from conftest import artifacts_for
from harness import boot_all, lab_config, running_bootd_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

BIOS_MAC = "52:54:00:77:01:01"
UEFI_MAC = "52:54:00:77:01:02"
PXELINUX_MAC = "52:54:00:77:01:03"


@pytest.fixture(scope="module")
def room(assets):
    hosts = [
        {"mac": BIOS_MAC, "name": "pc-bios", "group": "lab"},
        {"mac": UEFI_MAC, "name": "pc-uefi", "group": "lab"},
        # pxelinux for this PC only, and its own default image (the group's default is "demo")
        {"mac": PXELINUX_MAC, "name": "pc-pxelinux", "group": "lab", "boot": "pxelinux", "default_image": "demob"},
    ]
    logs = artifacts_for("test_boot")
    with running_bootd_lab(logs, lambda lab: lab_config(lab, images={"demo": assets.image_a, "demob": assets.image_b},
                                                        hosts=hosts, menu_timeout=1), assets) as bl:
        pcs = {"bios": bl.pc("pc-bios", mac=BIOS_MAC, firmware="bios"),
               "uefi": bl.pc("pc-uefi", mac=UEFI_MAC, firmware="uefi"),
               "pxelinux": bl.pc("pc-pxelinux", mac=PXELINUX_MAC, firmware="bios")}
        results = boot_all(list(pcs.values()), timeout=180)
        yield bl, pcs, dict(zip(pcs, results, strict=True))


def _proto(detail: dict) -> str:
    return detail.get("proto") or detail.get("protocol") or ""


def _kinds(events):
    return [e["kind"] for e in events]


def test_bios_boots_group_current_and_is_fresh_again(room):
    bl, pcs, first = room
    r = first["bios"]
    assert r.ok and r.marker == "A" and r.fresh is True, r.describe()
    assert "iPXE" in r.log and "[script]" in r.log, r.describe()
    # bootd's iPXE menu was shown (title with the host's name, both images of the room), then its default
    assert "bootd lab: pc-bios" in r.log and "demob test OS" in r.log, r.describe()
    assert "Booting demo test OS" in r.log, r.describe()
    kinds = _kinds(bl.events(BIOS_MAC))
    for k in ("dhcp", "script", "kernel", "initrd"):
        assert k in kinds, (k, kinds)
    # Second boot of the same PC: the disk is a fresh copy-on-write view again.
    again = pcs["bios"].boot(timeout=180)
    assert again.ok and again.marker == "A" and again.fresh is True, again.describe()


def test_uefi_boots_through_the_uefi_loader(room):
    bl, pcs, first = room
    r = first["uefi"]
    assert r.ok and r.marker == "A" and r.fresh is True, r.describe()
    # OVMF's own PXE client took bootd's offer (no PXE-E16, no fallback to UEFI HTTP boot) and fetched
    # the UEFI loader (ipxe.efi) over TFTP; the loader then ran bootd's iPXE menu.
    assert "Start PXE over IPv4" in r.log and "PXE-E16" not in r.log, r.describe()
    assert "[script]" in r.log and "bootd lab: pc-uefi" in r.log, r.describe()
    loaders = [e["detail"] for e in bl.events(UEFI_MAC) if e["kind"] == "loader"]
    assert any(d.get("path", "").endswith("ipxe.efi") and _proto(d) == "tftp" for d in loaders), loaders


def test_pxelinux_host_gets_pxelinux_menu_and_its_default(room):
    bl, pcs, first = room
    r = first["pxelinux"]
    assert "PXELINUX" in r.log and "bootd lab: pc-pxelinux" in r.log, r.describe()  # menu.c32 showed bootd's menu
    assert r.ok and r.marker == "B" and r.fresh is True, r.describe()
    events = bl.events(PXELINUX_MAC)
    menus = [e["detail"] for e in events if e["kind"] == "menu"]
    assert any("pxelinux.cfg" in d.get("path", "") and _proto(d) == "tftp" for d in menus), events
