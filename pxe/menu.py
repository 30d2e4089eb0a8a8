"""The boot menu of one host, independent of the firmware that will show it.

A `BootMenu` is what the three renderers (pxe/ipxe.py, pxe/pxelinux.py, pxe/grub.py) turn into text:
the same items, the same default and timeout, so a room that switches flavour sees the same choices.
Items already carry the complete kernel command line; renderers only quote and lay it out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from bootd.bootplan import ADMIN_KEY as ADMIN_KEY  # the plan never gives an image these keys
from bootd.bootplan import LOCAL_KEY as LOCAL_KEY


@dataclass(frozen=True)
class MenuItem:
    key: str
    title: str
    kind: Literal["linux", "local"] = "linux"
    kernel: Optional[str] = None  # path relative to the boot root
    initrd: Optional[str] = None
    cmdline: str = ""
    image: Optional[str] = None
    snapshot_id: Optional[int] = None
    version: Optional[str] = None
    previous: bool = False

    def linux_files(self) -> tuple[str, str]:
        """(kernel, initrd) of a "linux" item: every such item is built with both (pxe/booter.py)."""
        if self.kernel is None or self.initrd is None:
            raise ValueError(f"menu item {self.key!r} has no kernel or initrd to boot")
        return self.kernel, self.initrd


@dataclass(frozen=True)
class BootMenu:
    """A host's menu: `default` is the key booted when `timeout` seconds pass (0 = at once)."""

    mac: Optional[str]
    host_name: Optional[str]
    title: str
    timeout: int
    default: str
    items: tuple[MenuItem, ...]
    server: str  # bootd's address as the client reaches it
    http_base: str  # e.g. http://10.77.0.1:8080
    pxelinux_ui: str = "menu.c32"
    notes: tuple[str, ...] = field(default=())  # problems worth a comment in the rendered file
    # the admin menu's URL without credentials (http://HOST:PORT/boot/admin/MAC.ipxe): iPXE adds an
    # "Admin" entry that logs in and fetches it with HTTP Basic; None: no admin entry
    admin_url: Optional[str] = None
    # pxelinux/GRUB rooms: the entries students do not see, offered behind the bootloader's own password
    # (boot once; state changes need iPXE or the dashboard), and that password's hash in each format
    admin_items: tuple[MenuItem, ...] = field(default=())
    pxelinux_passwd: Optional[str] = None
    grub_pbkdf2: Optional[str] = None

    def item(self, key: str) -> Optional[MenuItem]:
        for it in self.items:
            if it.key == key:
                return it
        return None

    @property
    def default_item(self) -> Optional[MenuItem]:
        return self.item(self.default)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def clean_text(text: str) -> str:
    """One line of menu text: no control characters (a newline would start a new directive)."""
    return _CONTROL.sub(" ", text).strip()
