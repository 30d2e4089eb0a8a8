"""iPXE flavour of a BootMenu: the main path, kernel and initrd fetched over HTTP."""
from __future__ import annotations

from urllib.parse import quote

from pxe.menu import ADMIN_KEY, BootMenu, MenuItem, clean_text


def _text(s: str) -> str:
    # iPXE expands ${...} in every command line: a title must not reach into settings.
    return clean_text(s).replace("$", "")


def file_url(menu: BootMenu, path: str) -> str:
    return f"{menu.http_base}/boot/files/{quote(path.lstrip('/'), safe='/._-~+')}"


def render_ipxe(menu: BootMenu) -> str:
    out = ["#!ipxe",
           f"# bootd menu for {_text(menu.host_name or 'unknown host')} ({menu.mac or 'no MAC'}); rendered per request"]
    out += [f"# note: {_text(n)}" for n in menu.notes]
    out += ["", ":start"]
    if menu.timeout > 0:
        out.append(f"menu {_text(menu.title)}")
        gap = False
        for it in menu.items:
            if (it.kind == "local" or it.previous) and not gap:
                out.append("item --gap --")
                gap = True
            out.append(f"item {it.key} {_text(it.title)}")
        if menu.admin_url:
            out += ["item --gap --", f"item {ADMIN_KEY} Admin (login)"]
        out.append(f"choose --default {menu.default} --timeout {menu.timeout * 1000} target || goto {menu.default}")
        out.append("goto ${target}")
    else:
        out.append(f"goto {menu.default}")
    for it in menu.items:
        out += ["", f":{it.key}"]
        out += _item_body(menu, it)
    if menu.admin_url and menu.timeout > 0:
        out += ["", f":{ADMIN_KEY}"] + admin_login(menu.admin_url, "start")
    # A failed fetch asks DHCP again before the menu comes back: if this PC's server died mid-boot, the
    # server that answers now (a standby on the same database, bootd/cluster.py) hands out its own script
    out += ["", ":failed", "echo bootd: boot failed, asking DHCP again in 5 s",
            "sleep 5", "dhcp && chain --replace --autofree ${filename} || goto start", ""]
    return "\n".join(out)


def with_credentials(url: str) -> str:
    """`url` with iPXE's ${username}/${password} as its user part: iPXE sends them as HTTP Basic.
    The credentials stay in the PC's settings; no menu text ever holds them."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://${{username:uristring}}:${{password:uristring}}@{rest}"


def admin_login(admin_url: str, back: str) -> list[str]:
    """iPXE lines: ask for name and password, fetch the admin menu with them; on a refusal say so,
    forget both (the next login form starts empty) and go to label `back`."""
    return ["login || goto " + back,
            f"chain --replace {with_credentials(admin_url)} || goto {ADMIN_KEY}-refused",
            f":{ADMIN_KEY}-refused",
            "clear username",
            "clear password",
            "echo bootd: login refused: wrong name or password, or locked out for a while",
            "prompt Press any key to return to the menu",
            f"goto {back}"]


def _item_body(menu: BootMenu, it: MenuItem) -> list[str]:
    if it.kind == "local":
        # Leaving iPXE hands control back to the firmware, which boots the next device: the disk.
        return ["echo Booting from local disk", "exit 0"]
    cmdline = _text(it.cmdline)
    kernel, initrd = it.linux_files()
    return [f"echo Booting {_text(it.title)}",
            f"kernel {file_url(menu, kernel)} initrd=initrd {cmdline}".rstrip() + " || goto failed",
            f"initrd --name initrd {file_url(menu, initrd)} || goto failed",
            "boot || goto failed"]
