"""DiskReport: what the disk engine says about itself - `bootctl disk list`, the status block, the
unit's STATUS= warning, per-export I/O counts and the Prometheus gauges."""
from __future__ import annotations

import time
from typing import Any, Optional

from nbdexport.errors import DiskError
from nbdexport.exports import ExportSet
from nbdexport.overlays import allocated_bytes
from nbdexport.reaper import Reaper

IO_KEYS = ("read_bytes", "written_bytes", "read_requests", "write_requests", "connections")


class DiskReport:
    def __init__(self, exports: ExportSet, reaper: Reaper):
        self.exports = exports
        self.reaper = reaper
        self.gatekeeper_error: Optional[str] = None  # why the gatekeeper is not running, or runs slowly

    async def list(self) -> list[dict[str, Any]]:
        """One entry per export and per idle persistent layer: what `bootctl disk list` shows."""
        ex = self.exports
        stats: dict[str, dict[str, Any]] = {}
        try:
            for s in await ex.qsd.execute("query-blockstats", {"query-nodes": True}):
                if s.get("node-name"):
                    stats[s["node-name"]] = s["stats"]
        except DiskError:
            pass
        conn = self.reaper.peer_ips()
        out: list[dict[str, Any]] = []
        seen_layers = set()
        for r in sorted(ex.rows.values(), key=lambda r: (r.mac, not r.main)):
            st = stats.get(r.node, {})
            io = self.export_io(r.name)
            # a connection the splicer counts, or any from the host's addresses (one an earlier bootd's
            # splicer still carries after a kill -9 is counted by no one here)
            connected = bool(io and io["connections"]) or self.reaper.connected(r.mac, conn)
            if r.persistent:
                seen_layers.add(r.overlay)
            out.append({"mac": r.mac, "host": ex.host_name(r.mac) or r.mac, "export": r.name,
                        "snapshot": r.snap.name, "snapshot_id": r.snap.id, "persistent": r.persistent,
                        "boot": r.boot, "main": r.main, "size": r.size,
                        "overlay_bytes": allocated_bytes(r.overlay), "overlay_max": ex.overlay_limit(r),
                        "overlay_full": r.full,
                        "connected": connected,
                        "since": r.created, "last_active": max(r.last_active, time.time() if connected else 0),
                        "wr_highest_offset": st.get("wr_highest_offset"), "uri": r.export(ex.s.port, False).uri,
                        **(io or {})})
        for lr in ex.tables.layers():
            if lr["path"] in seen_layers:
                continue
            out.append({"mac": lr["mac"], "host": ex.host_name(lr["mac"]) or lr["mac"], "export": None,
                        "snapshot": lr["snapshot_name"], "snapshot_id": lr["snapshot_id"], "persistent": True,
                        "boot": None, "main": True, "size": None, "overlay_bytes": allocated_bytes(lr["path"]),
                        "connected": False, "since": lr["created"], "last_active": None,
                        "wr_highest_offset": None, "uri": None})
        return out

    def status(self) -> dict[str, Any]:
        ex = self.exports
        rep = ex.last_space
        path, why = self.data_path()
        return {"exports": len(ex.rows), "data_path": path, "data_path_reason": why,
                "qsd": ex.qsd.status(), "aio": ex.aio,
                "aio_error": ex.aio_error, "subclusters": ex.s.subclusters,
                "gatekeeper": (ex.gatekeeper.status() if ex.gatekeeper is not None
                               else {"error": self.gatekeeper_error} if self.gatekeeper_error else None),
                "free_mb": rep.free >> 20 if rep else None, "space_low": bool(rep and rep.low)}

    def data_path(self) -> tuple[str, Optional[str]]:
        """How negotiated NBD connections reach the daemon (handoff / splicer / python-relay), and why not
        faster; "direct" when the daemon serves TCP itself (nbd.gatekeeper: false: no per-host policy)."""
        ex = self.exports
        if ex.gatekeeper is not None:
            return ex.gatekeeper.data_path()
        if ex.daemon_socket is None:
            return "direct", "nbd.gatekeeper is false: any client can list and open every export"
        return "refused", self.gatekeeper_error or "the NBD gatekeeper is not running"

    def warning(self) -> Optional[str]:
        """One line for the unit's STATUS= when disks are served in a degraded or unsafe way."""
        path, why = self.data_path()
        if path in ("python-relay", "refused") and not self.exports.s.tls:
            return f"NBD data path {path}: {why}"
        if path == "direct":
            return "NBD without access control (nbd.gatekeeper: false)"
        return None

    def export_io(self, name: str) -> Optional[dict[str, int]]:
        """Bytes and requests read and written through export `name` and its live connections, as the
        hand-off library and the splicer counted them (None without the gatekeeper: qemu 7.2 counts
        nothing per NBD export)."""
        ex = self.exports
        if ex.gatekeeper is None:
            return None
        io = ex.gatekeeper.splicer.io(name)
        for k, v in ex.gatekeeper.relay_io(name).items():
            io[k] = io.get(k, 0) + v
        if ex.handoff is not None:
            for k, v in ex.handoff.io(name).items():
                io[k] = io.get(k, 0) + v
        return io

    def gauges(self) -> dict[str, float]:
        ex = self.exports
        rep = ex.last_space
        out: dict[str, float] = {"exports": len(ex.rows), "qsd_restarts": ex.qsd.restarts,
                                 "qsd_up": int(ex.qsd.up.is_set())}
        if ex.qsd.pid:  # the daemon's I/O: per-export byte counts are not in qemu 7.2's query-blockstats
            try:
                with open(f"/proc/{ex.qsd.pid}/io") as f:
                    proc_io = dict(line.split(": ", 1) for line in f.read().splitlines())
                out["qsd_read_bytes"] = int(proc_io["read_bytes"])
                out["qsd_write_bytes"] = int(proc_io["write_bytes"])
                out["qsd_rchar"] = int(proc_io["rchar"])
                out["qsd_wchar"] = int(proc_io["wchar"])
            except (OSError, KeyError, ValueError):
                pass
        if rep:
            out["free_bytes"] = rep.free
            out["space_low"] = int(rep.low)
        out["overlay_bytes"] = sum(allocated_bytes(r.overlay) for r in ex.rows.values())
        for r in ex.rows.values():  # per export, labelled by host (the export name is a secret)
            io = self.export_io(r.name)
            if io is None:
                break
            host = str(ex.host_name(r.mac) or r.mac).replace("\\", "\\\\").replace('"', '\\"')
            labels = f'{{host="{host}",mac="{r.mac}",disk="{"main" if r.main else r.node}"}}'
            for k in IO_KEYS:
                out[f"export_{k}{labels}"] = io[k]
        return out
