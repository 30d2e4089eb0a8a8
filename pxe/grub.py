"""GRUB flavour of a BootMenu: UEFI PCs running GRUB's network image, files over TFTP.

GRUB's netboot root is the device it was loaded from: `(tftp,SERVER)` after a PXE boot, where kernel and
initrd are absolute paths from the boot root; `(http,SERVER:PORT)` after a UEFI HTTP boot, where bootd
serves the boot root under /boot/files (`files` = "/boot/files").
"""
from __future__ import annotations

import re

from pxe.menu import BootMenu, MenuItem, clean_text

_BARE = re.compile(r"^[A-Za-z0-9_./:=,@%+-]+$")


def _quote(s: str) -> str:
    """A GRUB single-quoted word (no expansion inside; a quote is closed, escaped, reopened)."""
    return "'" + clean_text(s).replace("'", "'\\''") + "'"


def _word(s: str) -> str:
    """One GRUB word: bare when nothing in it is special to GRUB's parser, else single-quoted."""
    s = clean_text(s)
    return s if _BARE.match(s) else _quote(s)


def _path(p: str, files: str = "") -> str:
    return _word(files.rstrip("/") + "/" + clean_text(p).lstrip("/"))


def render_grub(menu: BootMenu, files: str = "") -> str:
    """The menu as grub.cfg; `files`: where the boot root is on GRUB's root device ("" over TFTP)."""
    out = [f"# bootd menu for {clean_text(menu.host_name or 'unknown host')} ({menu.mac or 'no MAC'});"
           " rendered per request"]
    out += [f"# note: {clean_text(n)}" for n in menu.notes]
    out += [f"set default={_word(menu.default)}",
            f"set timeout={menu.timeout}",
            "set timeout_style=menu",
            f"echo {_quote(menu.title)}"]
    guarded = bool(menu.admin_items and menu.grub_pbkdf2)
    if guarded:
        # with superusers set, an entry without --unrestricted (and the editor, the shell) needs the login
        out += [f"set superusers={_quote(GRUB_ADMIN)}",
                f"password_pbkdf2 {GRUB_ADMIN} {_word(menu.grub_pbkdf2 or '')}"]
    for it in menu.items:
        out.append("")
        out += _entry(it, unrestricted=guarded, files=files)
    if guarded:
        for it in menu.admin_items:
            out.append("")
            out += _entry(it, unrestricted=False, files=files)
    out.append("")
    return "\n".join(out)


GRUB_ADMIN = "admin"  # the GRUB superuser's name (menu.admin_grub_pbkdf2 is its password)


def _entry(it: MenuItem, unrestricted: bool = False, files: str = "") -> list[str]:
    head = f"menuentry {_quote(it.title)} --id {it.key} {'--unrestricted ' if unrestricted else ''}{{"
    if it.kind == "local":
        # Back to the UEFI boot manager, which tries the next boot option: the local disk.
        return [head, "  exit", "}"]
    # The command line is passed word by word; quote each so GRUB expands nothing in it.
    args = " ".join(_word(w) for w in clean_text(it.cmdline).split())
    kernel, initrd = it.linux_files()
    return [head,
            f"  echo {_quote('Loading ' + it.title + ' ...')}",
            f"  linux {_path(kernel, files)} {args}".rstrip(),
            f"  initrd {_path(initrd, files)}",
            "}"]
