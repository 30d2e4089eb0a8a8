"""Config models of NFS exports of client roots: pure pydantic, so `bootd check-config` loads no service.

bootd/config.py validates `nfs:` with NfsConfig; bootd/nfs.py (the service) renders and applies it.
"""
from __future__ import annotations

import ipaddress
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bootd.clientconfig.model import SafePath, Token


class ClientRootConfig(BaseModel):
    """A client root directory exported read-only to the lab."""

    model_config = ConfigDict(extra="forbid")

    name: Token                       # NFSv4 pseudo path <nfs.pseudo_root>/<name> (Ganesha)
    path: SafePath                    # the directory on this server
    export_id: Optional[int] = Field(None, ge=1, le=65000)  # Ganesha Export_Id (default: base + index)


class NfsConfig(BaseModel):
    """How bootd exports client roots over NFS."""

    model_config = ConfigDict(extra="forbid")

    server: Literal["auto", "kernel", "ganesha", "off"] = "auto"
    roots: list[ClientRootConfig] = []
    subnets: Optional[list[ipaddress.IPv4Network]] = None  # default: the served interfaces' subnets
    exports_file: SafePath = "/etc/exports.d/bootd.exports"
    ganesha_exports_file: SafePath = "/etc/ganesha/bootd-exports.conf"
    ganesha_pidfile: SafePath = "/run/ganesha/ganesha.pid"
    export_id_base: int = Field(default=1000, ge=1, le=60000)
    pseudo_root: SafePath = "/bootd"
    check: bool = True                # after applying, check the NFS server answers on port 2049
    check_timeout: float = Field(default=3.0, gt=0, le=60)

    @model_validator(mode="after")
    def _unique(self) -> "NfsConfig":
        names, ids, paths = set(), set(), set()
        for i, r in enumerate(self.roots):
            if r.name in names:
                raise ValueError(f"client root name {r.name!r} is used twice")
            names.add(r.name)
            if r.path in paths:
                raise ValueError(f"client root path {r.path!r} is exported twice")
            paths.add(r.path)
            eid = r.export_id or self.export_id_base + i
            if eid in ids:
                raise ValueError(f"Ganesha export id {eid} is used twice")
            ids.add(eid)
        return self
