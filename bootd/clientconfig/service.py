"""The same rendered client files over TFTP (for clients whose init has only a TFTP client):
  clients/<mac>/index          file names, one per line
  clients/<mac>/index.json     the index with what each instance boots
  clients/<mac>/<file>         one rendered job or unit
The MAC may be spelled with ':' or '-'. Rendered at request time from the config in force.
"""
from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Optional

from bootd.macaddr import MAC_PATTERN, normalize_mac
from bootd.peers import may_act_for, refuse
from bootd.service import Service

from .render import RenderError
from .resolve import NoClientConfig, UnknownHost, render_for

if TYPE_CHECKING:
    from bootd.daemon import Context
    from bootd.seams import TftpFiles

log = logging.getLogger("bootd.clients")

CLIENT_FILE_RE = re.compile(rf"clients/(?P<mac>{MAC_PATTERN})/(?P<file>[A-Za-z0-9._-]{{1,64}})")


class ClientFileProvider:
    """TFTP provider (bootd/tftp/server.py seam) for clients/<mac>/<file>."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def __call__(self, path: str, client_ip: str, client_mac: Optional[str]) -> Optional[bytes]:
        m = CLIENT_FILE_RE.fullmatch(path)
        if m is None:
            return None
        try:
            mac = normalize_mac(m.group("mac"))
            if not may_act_for(self.ctx, client_ip, mac):
                refuse(self.ctx, "tftp", client_ip, mac, "client configs")
                return None
            rendered = await render_for(self.ctx, mac)
        except (UnknownHost, NoClientConfig, RenderError, ValueError) as e:
            self.ctx.metrics.inc("clients", "errors", reason="tftp")
            log.info("tftp %s: %s", path, e)
            return None  # falls through to the boot root, which has no such file: "file not found"
        name = m.group("file")
        if name == "index":
            data = "".join(f"{n}\n" for n in rendered.files)
        elif name == "index.json":
            data = json.dumps(rendered.index(), indent=1) + "\n"
        else:
            file_text = rendered.files.get(name)
            if file_text is None:
                return None
            data = file_text
        self.ctx.metrics.inc("clients", "served", via="tftp")
        return data.encode()


class ClientFilesService(Service):
    """Registers the TFTP provider (HTTP routes are in bootd/http/client_api.py)."""

    name = "clients"

    def __init__(self) -> None:
        self.tftp: Optional[TftpFiles] = None
        self.provider: Optional[ClientFileProvider] = None

    async def start(self, ctx: Context) -> None:
        self.tftp = ctx.tftp
        if self.tftp is None:
            log.info("clients: no TFTP server: client files only over HTTP")
            return
        self.provider = ClientFileProvider(ctx)
        self.tftp.add_provider(self.provider, CLIENT_FILE_RE)

    async def stop(self) -> None:
        if self.tftp is not None and self.provider is not None:
            self.tftp.remove_provider(self.provider)
        self.provider = None

    async def reload(self, ctx: Context) -> None:
        if ctx.tftp is not self.tftp:
            await self.stop()
            await self.start(ctx)

    def status(self) -> dict[str, object]:
        return {"tftp": self.provider is not None}
