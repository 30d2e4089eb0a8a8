"""pxelinux flavour of a BootMenu: BIOS PCs that load pxelinux.0 and everything else over TFTP.

Paths are relative to the directory pxelinux.0 was loaded from (the boot root). The UI module
(menu.c32 by default) and its libraries (ldlinux.c32, libutil.c32) must be in the boot root too.
"""
from __future__ import annotations

from pxe.menu import BootMenu, MenuItem, clean_text


def _text(s: str) -> str:
    # '^' marks a hotkey in MENU LABEL; keep titles literal.
    return clean_text(s).replace("^", "")


def _path(p: str) -> str:
    return clean_text(p).lstrip("/")


def render_pxelinux(menu: BootMenu) -> str:
    out = [f"# bootd menu for {_text(menu.host_name or 'unknown host')} ({menu.mac or 'no MAC'}); rendered per request"]
    out += [f"# note: {_text(n)}" for n in menu.notes]
    if menu.timeout > 0:
        out += [f"UI {clean_text(menu.pxelinux_ui)}",
                f"MENU TITLE {_text(menu.title)}",
                f"TIMEOUT {menu.timeout * 10}",  # tenths of a second
                "PROMPT 0",
                f"ONTIMEOUT {menu.default}"]
    else:
        out += ["PROMPT 0"]  # no UI and no prompt: the default boots at once
    out.append(f"DEFAULT {menu.default}")
    gap = False
    for it in menu.items:
        out.append("")
        if (it.kind == "local" or it.previous) and not gap and menu.timeout > 0:
            out += ["MENU SEPARATOR", ""]
            gap = True
        out += _label(menu, it)
    if menu.admin_items and menu.pxelinux_passwd and menu.timeout > 0:
        # each admin entry asks for the password when picked (menu.c32); students see the titles only
        out += ["", "MENU SEPARATOR"]
        for it in menu.admin_items:
            out += [""] + _label(menu, it) + [f"  MENU PASSWD {clean_text(menu.pxelinux_passwd)}"]
    out.append("")
    return "\n".join(out)


def _label(menu: BootMenu, it: MenuItem) -> list[str]:
    lines = [f"LABEL {it.key}", f"  MENU LABEL {_text(it.title)}"]
    if it.key == menu.default:
        lines.append("  MENU DEFAULT")
    if it.kind == "local":
        lines.append("  LOCALBOOT 0")
        return lines
    kernel, initrd = it.linux_files()
    lines += [f"  LINUX {_path(kernel)}",
              f"  INITRD {_path(initrd)}",
              f"  APPEND {clean_text(it.cmdline)}".rstrip()]
    return lines
