"""The NBD engine's rows in the state store: its only SQL (tables of bootd/state.py's migration 3).

disk_boots counts each host's boots, disk_exports holds the exports of running boots (so a restart
re-adds them), disk_layers the persistent hosts' own layers. DiskManager (manager.py, exports.py) decides; this
module reads and writes, in portable SQL (no SQLite-only statements), through bootd.state.StateStore.
"""
from __future__ import annotations

import sqlite3
from typing import Optional

from bootd.state import StateStore


class DiskTables:
    """disk_boots, disk_exports and disk_layers; each method is one transaction."""

    def __init__(self, state: StateStore):
        self.state = state

    # -- exports of running boots ---------------------------------------------------------------------
    def exports(self) -> list[sqlite3.Row]:
        return self.state.query("SELECT * FROM disk_exports")

    def add_export(self, name: str, mac: str, boot: int, main: bool, snapshot_key: str,
                   snapshot_id: Optional[int], snapshot_name: str, base_path: str, overlay: str, node: str,
                   persistent: bool, size: int, server_ip: str, created: float, last_active: float) -> None:
        with self.state.transaction() as cur:
            cur.execute("INSERT INTO disk_exports(name, mac, boot, main, snapshot_key, snapshot_id, snapshot_name, "
                        "base_path, overlay, node, persistent, size, server_ip, created, last_active) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (name, mac, boot, int(main), snapshot_key, snapshot_id, snapshot_name, base_path, overlay,
                         node, int(persistent), size, server_ip, created, last_active))

    def set_export_size(self, name: str, size: int) -> None:
        with self.state.transaction() as cur:
            cur.execute("UPDATE disk_exports SET size=? WHERE name=?", (size, name))

    def touch_exports(self, mac: str, now: float) -> None:
        """The host's exports were in use at `now`."""
        with self.state.transaction() as cur:
            cur.execute("UPDATE disk_exports SET last_active=? WHERE mac=?", (now, mac))

    def drop_exports(self, names: list[str], layer_of: Optional[str] = None) -> None:
        """Delete these exports' rows and, with `layer_of`, that MAC's persistent layer, all or nothing."""
        with self.state.transaction() as cur:
            for name in names:
                cur.execute("DELETE FROM disk_exports WHERE name=?", (name,))
            if layer_of is not None:
                cur.execute("DELETE FROM disk_layers WHERE mac=?", (layer_of,))

    def new_boot(self, mac: str, now: float, drop: list[str]) -> int:
        """Count a new boot of `mac` and drop its earlier exports' rows (`drop`) in one transaction; the
        boot's number (1 for the first)."""
        with self.state.transaction() as cur:
            cur.execute("INSERT INTO disk_boots(mac, boot, started) VALUES (?, 1, ?) ON CONFLICT(mac) DO "
                        "UPDATE SET boot=disk_boots.boot+1, started=excluded.started", (mac, now))
            row = cur.execute("SELECT boot FROM disk_boots WHERE mac=?", (mac,)).fetchone()
            assert row is not None  # upserted just above, in this transaction
            boot = int(row[0])
            for name in drop:
                cur.execute("DELETE FROM disk_exports WHERE name=?", (name,))
        return boot

    # -- persistent layers ----------------------------------------------------------------------------
    def layers(self) -> list[sqlite3.Row]:
        return self.state.query("SELECT * FROM disk_layers")

    def layer(self, mac: str) -> Optional[sqlite3.Row]:
        rows = self.state.query("SELECT * FROM disk_layers WHERE mac=?", (mac,))
        return rows[0] if rows else None

    def put_layer(self, mac: str, path: str, snapshot_key: str, snapshot_id: Optional[int], snapshot_name: str,
                  base_path: str, created: float) -> None:
        """The host's layer (replacing a row whose file had gone)."""
        with self.state.transaction() as cur:
            cur.execute("INSERT INTO disk_layers(mac, path, snapshot_key, snapshot_id, snapshot_name, base_path, "
                        "created) VALUES (?,?,?,?,?,?,?) ON CONFLICT(mac) DO UPDATE SET path=excluded.path, "
                        "snapshot_key=excluded.snapshot_key, snapshot_id=excluded.snapshot_id, "
                        "snapshot_name=excluded.snapshot_name, base_path=excluded.base_path, "
                        "created=excluded.created",
                        (mac, path, snapshot_key, snapshot_id, snapshot_name, base_path, created))

    def drop_layer(self, mac: str) -> None:
        with self.state.transaction() as cur:
            cur.execute("DELETE FROM disk_layers WHERE mac=?", (mac,))
