"""Boot programs in the boot root: put the loaders the config names there from Debian's packages.

An admin should not have to copy undionly.kpxe or pxelinux.0 by hand before the first PC boots, the way
dnsmasq or LTSP setups need. At start-up (and on reload) every loader the config names that is missing
from the boot root is copied from the Debian package that ships it (ipxe, pxelinux, syslinux-common,
grub-efi-amd64-bin; for Secure Boot shim-signed and grub-efi-amd64-signed). Files already there are left
alone: an admin's own build wins. Copies, not symlinks: the TFTP server refuses links that leave its root.

Secure Boot: the PC's firmware runs only what Microsoft's UEFI CA signed, which is shim; shim runs only
what Debian's key signed, which is Debian's network GRUB and Debian's kernels. shim loads `grubx64.efi`
from its own directory (over TFTP or HTTP, as it was loaded), so the signed GRUB goes next to shim under
that name, in a directory of its own (`secureboot/`): the unsigned GRUB bootd builds keeps `grubx64.efi`
at the top. Both GRUBs have the prefix `/grub` on the device they came from, so they read the per-host
menu `grub/grub.cfg` from bootd over the protocol that loaded them.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bootd.config import LoaderConfig

log = logging.getLogger("bootd.loaders")

# Where Debian 12 ships each stock boot program.
STOCK = {
    "undionly.kpxe": "/usr/lib/ipxe/undionly.kpxe",
    "undionly.kkpxe": "/usr/lib/ipxe/undionly.kkpxe",
    "ipxe.efi": "/usr/lib/ipxe/ipxe.efi",
    "snponly.efi": "/usr/lib/ipxe/snponly.efi",
    "ipxe.pxe": "/usr/lib/ipxe/ipxe.pxe",
    "pxelinux.0": "/usr/lib/PXELINUX/pxelinux.0",
    "lpxelinux.0": "/usr/lib/PXELINUX/lpxelinux.0",
}
# pxelinux loads these from its own directory.
SYSLINUX_MODULES_DIR = "/usr/lib/syslinux/modules/bios"
SYSLINUX_MODULES = ["ldlinux.c32", "menu.c32", "vesamenu.c32", "libutil.c32", "libcom32.c32", "chain.c32"]
GRUB_EFI_DIR = "/usr/lib/grub/x86_64-efi"
SIGNED_SHIM = "/usr/lib/shim/shimx64.efi.signed"  # shim-signed: signed by Microsoft's UEFI CA
SIGNED_GRUB = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"  # grub-efi-amd64-signed: Debian's key
# shim's MokManager, which it loads from its own directory when an admin enrolls a Machine Owner Key
SIGNED_MOKMANAGER = "/usr/lib/shim/mmx64.efi.signed"
GRUB_MODULES = ["normal", "configfile", "linux", "efinet", "tftp", "http", "net", "echo", "test", "sleep",
                "efi_gop", "efi_uga", "all_video", "chain", "part_gpt", "part_msdos", "fat", "ext2", "reboot", "halt"]


def _copy(src: str, dest: Path) -> bool:
    if not os.path.isfile(src):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    tmp.replace(dest)
    return True


def _make_grub(dest: Path) -> bool:
    """A network GRUB for UEFI that reads grub/grub.cfg-<mac> (then grub/grub.cfg) from the server."""
    if not (os.path.isdir(GRUB_EFI_DIR) and shutil.which("grub-mkimage")):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / dest.name
        # "/grub" on the boot device: (tftp,SERVER)/grub after a PXE boot, (http,SERVER:PORT)/grub after a
        # UEFI HTTP boot (the prefix Debian's signed network GRUB has too)
        r = subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/grub", "-o", str(out),
                            *[m for m in GRUB_MODULES if os.path.exists(f"{GRUB_EFI_DIR}/{m}.mod")]],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("grub-mkimage failed: %s", r.stderr.strip())
            return False
        os.chmod(out, 0o644)
        shutil.move(str(out), str(dest))
    return True


def install_loaders(boot_root: Path, loaders: LoaderConfig) -> list[str]:
    """Copy every missing loader named by `loaders` (a LoaderConfig) into `boot_root`; returns what was
    installed. Names with no stock source are reported once and left to the admin."""
    boot_root.mkdir(parents=True, exist_ok=True)
    installed: list[str] = []
    names: set[str] = {getattr(loaders, f) for f in type(loaders).model_fields if f != "shim_x64"}
    for name in sorted(names):
        dest = boot_root / name
        if dest.exists():
            continue
        base = os.path.basename(name)
        ok = False
        if base in STOCK:
            ok = _copy(STOCK[base], dest)
        elif base == "grubx64.efi":
            ok = _make_grub(dest)
        if ok:
            installed.append(name)
        else:
            log.info("loader %s is not in the boot root and no stock copy is known; clients that need it "
                     "will get 'file not found'", name)
        if base in ("pxelinux.0", "lpxelinux.0"):
            for mod in SYSLINUX_MODULES:
                mdest = dest.parent / mod
                if not mdest.exists() and _copy(f"{SYSLINUX_MODULES_DIR}/{mod}", mdest):
                    installed.append(str(mdest.relative_to(boot_root)))
    installed += _install_secureboot(boot_root, loaders)
    if installed:
        log.info("installed stock loaders into %s: %s", boot_root, ", ".join(installed))
    return installed


def _install_secureboot(boot_root: Path, loaders: LoaderConfig) -> list[str]:
    """Debian's signed shim, network GRUB and MokManager, side by side; each left alone when there."""
    out = []
    for rel, src, package in ((loaders.shim_x64, SIGNED_SHIM, "shim-signed"),
                              (loaders.secureboot_grub, SIGNED_GRUB, "grub-efi-amd64-signed"),
                              (loaders.beside_shim("mmx64.efi"), SIGNED_MOKMANAGER, "shim-helpers-amd64-signed")):
        dest = boot_root / rel
        if dest.exists():
            continue
        if _copy(src, dest):
            out.append(rel)
        else:
            log.info("Secure Boot loader %s: %s is missing (apt install %s); PCs of secureboot: true rooms "
                     "will get 'file not found'", rel, src, package)
    return out
