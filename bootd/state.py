"""The state store: everything bootd must remember across restarts, in one SQLite file.

This module is the only one that speaks SQL dialect details (WAL, pragmas, migrations), so a
PostgreSQL store can follow behind the same methods. Transactions are short: the DHCP hot path
writes one lease per commit in WAL mode with synchronous=NORMAL, which survives a kill -9 of bootd
(the WAL is in the OS page cache) and costs no fsync per packet.

Schema changes are forward-only migrations, numbered; `PRAGMA user_version` holds the version the
file is at, and each migration runs in its own transaction together with the version bump, so a crash
mid-migration leaves the old version intact.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: list[Migration] = [
    Migration(1, "core: hosts, leases, boot events", """
        CREATE TABLE hosts (
            mac        TEXT PRIMARY KEY,
            name       TEXT,
            first_seen REAL NOT NULL,
            last_seen  REAL NOT NULL,
            last_ip    TEXT,
            arch       TEXT
        );
        CREATE TABLE leases (
            ip         TEXT PRIMARY KEY,
            mac        TEXT NOT NULL,
            client_id  TEXT,
            hostname   TEXT,
            state      TEXT NOT NULL,     -- offered | bound | released | declined
            expires    REAL NOT NULL,
            updated    REAL NOT NULL
        );
        CREATE INDEX leases_mac ON leases(mac);
        CREATE TABLE boot_events (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            ts         REAL NOT NULL,
            mac        TEXT,
            kind       TEXT NOT NULL,
            detail     TEXT,
            nbytes     INTEGER,
            duration   REAL
        );
        CREATE INDEX boot_events_mac_ts ON boot_events(mac, ts);
    """),
    Migration(2, "snapshots: images, snapshots, assignments, audit (snapshots/ owner)", """
        CREATE TABLE images (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            name         TEXT NOT NULL UNIQUE,
            virtual_size INTEGER NOT NULL,
            created_at   REAL NOT NULL,
            created_by   TEXT NOT NULL,
            source       TEXT
        );
        CREATE TABLE snapshots (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            image_id     INTEGER NOT NULL REFERENCES images(id),
            version      INTEGER,
            state        TEXT NOT NULL CHECK (state IN ('draft', 'sealed', 'deleting', 'deleted')),
            parent_id    INTEGER REFERENCES snapshots(id),
            backing_id   INTEGER REFERENCES snapshots(id),
            file         TEXT NOT NULL UNIQUE,
            virtual_size INTEGER NOT NULL,
            note         TEXT NOT NULL DEFAULT '',
            created_at   REAL NOT NULL,
            created_by   TEXT NOT NULL,
            sealed_at    REAL,
            sealed_by    TEXT,
            deleted_at   REAL,
            UNIQUE (image_id, version)
        );
        CREATE INDEX snapshots_backing ON snapshots(backing_id);
        CREATE TABLE assignments (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            image_id     INTEGER NOT NULL REFERENCES images(id),
            kind         TEXT NOT NULL CHECK (kind IN ('current', 'test', 'pin', 'maintenance')),
            target       TEXT NOT NULL,
            snapshot_id  INTEGER NOT NULL REFERENCES snapshots(id),
            status       TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'rolled-back', 'ended')),
            created_at   REAL NOT NULL,
            created_by   TEXT NOT NULL,
            reason       TEXT NOT NULL DEFAULT '',
            ended_at     REAL,
            ended_by     TEXT
        );
        CREATE UNIQUE INDEX assignments_one_active ON assignments(image_id, kind, target) WHERE status = 'active';
        CREATE INDEX assignments_snapshot ON assignments(snapshot_id, status);
        CREATE TABLE audit (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            at           REAL NOT NULL,
            actor        TEXT NOT NULL,
            action       TEXT NOT NULL,
            image        TEXT,
            snapshot_id  INTEGER,
            target       TEXT,
            reason       TEXT NOT NULL DEFAULT '',
            detail       TEXT
        );
        CREATE INDEX audit_image ON audit(image, id);
    """),
    Migration(3, "disks: per-host NBD exports, boots, persistent layers (nbdexport/ owner)", """
        CREATE TABLE disk_boots (
            mac         TEXT PRIMARY KEY,
            boot        INTEGER NOT NULL,          -- boots of this host so far (prepare_boot calls)
            started     REAL NOT NULL
        );
        CREATE TABLE disk_exports (
            name        TEXT PRIMARY KEY,          -- the NBD export name: a random token
            mac         TEXT NOT NULL,
            boot        INTEGER NOT NULL,
            main        INTEGER NOT NULL,
            snapshot_key  TEXT NOT NULL,           -- snapshot id, or file:PATH for a bare file
            snapshot_id   INTEGER,
            snapshot_name TEXT NOT NULL,
            base_path   TEXT NOT NULL,
            overlay     TEXT NOT NULL,
            node        TEXT NOT NULL,
            persistent  INTEGER NOT NULL,
            size        INTEGER NOT NULL,
            server_ip   TEXT NOT NULL,
            created     REAL NOT NULL,
            last_active REAL NOT NULL
        );
        CREATE INDEX disk_exports_mac ON disk_exports(mac);
        CREATE TABLE disk_layers (
            mac           TEXT PRIMARY KEY,        -- a persistent host's own layer
            path          TEXT NOT NULL,
            snapshot_key  TEXT NOT NULL,
            snapshot_id   INTEGER,
            snapshot_name TEXT NOT NULL,
            base_path     TEXT NOT NULL,
            created       REAL NOT NULL
        );
    """),
    Migration(4, "dhcp: address reservations made at run time (bootd/dhcp owner)", """
        CREATE TABLE dhcp_reservations (
            mac        TEXT PRIMARY KEY,
            ip         TEXT NOT NULL UNIQUE,
            name       TEXT,
            created    REAL NOT NULL
        );
    """),
    Migration(5, "pxe: fallback NBD export tokens per host, until ctx.disks serves (pxe/ owner)", """
        CREATE TABLE pxe_tokens (
            mac        TEXT PRIMARY KEY,
            token      TEXT NOT NULL UNIQUE,
            created    REAL NOT NULL
        );
    """),
]


class StateStore:
    """SQLite state with WAL and forward migrations. One connection, used from the event loop thread.

    Calls are short and synchronous on purpose: a lease write is ~20 µs, cheaper than a thread hop.
    """

    def __init__(self, path: str | Path, migrations: Optional[list[Migration]] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                    timeout=10.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=10000")
        self._lock = threading.RLock()
        self.migrate(MIGRATIONS if migrations is None else migrations)

    # -- schema --------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self, migrations: list[Migration]) -> list[int]:
        """Apply every migration newer than the file; returns the versions applied."""
        applied = []
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version <= self.version:
                continue
            with self._lock:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    if m.version <= self.version:  # another process got there first
                        self.conn.execute("ROLLBACK")
                        continue
                    for stmt in _split_sql(m.sql):
                        self.conn.execute(stmt)
                    self.conn.execute(f"PRAGMA user_version={int(m.version)}")
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
            applied.append(m.version)
        return applied

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE .. COMMIT; rolled back on any exception, so a change is all or nothing."""
        with self._lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self.conn.close()

    # -- hosts -----------------------------------------------------------------------------------
    def touch_host(self, mac: str, ip: Optional[str] = None, arch: Optional[str] = None,
                   name: Optional[str] = None, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self.conn.execute(
                """INSERT INTO hosts(mac, name, first_seen, last_seen, last_ip, arch)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(mac) DO UPDATE SET last_seen=excluded.last_seen,
                     last_ip=COALESCE(excluded.last_ip, hosts.last_ip),
                     arch=COALESCE(excluded.arch, hosts.arch),
                     name=COALESCE(excluded.name, hosts.name)""",
                (mac.lower(), name, now, now, ip, arch))

    def hosts(self) -> list[dict]:
        return [dict(r) for r in self.query("SELECT * FROM hosts ORDER BY mac")]

    def host(self, mac: str) -> Optional[dict]:
        rows = self.query("SELECT * FROM hosts WHERE mac=?", (mac.lower(),))
        return dict(rows[0]) if rows else None

    def mac_for_ip(self, ip: str) -> Optional[str]:
        """The MAC that holds (or last held) an address: for protocols that only see the peer IP."""
        rows = self.query("SELECT mac FROM leases WHERE ip=? AND state IN ('bound','offered')", (ip,))
        if rows:
            return rows[0]["mac"]
        rows = self.query("SELECT mac FROM hosts WHERE last_ip=? ORDER BY last_seen DESC LIMIT 1", (ip,))
        return rows[0]["mac"] if rows else None

    # -- boot events -------------------------------------------------------------------------------
    def record_event(self, mac: Optional[str], kind: str, detail: Optional[dict] = None,
                     nbytes: Optional[int] = None, duration: Optional[float] = None,
                     ts: Optional[float] = None) -> None:
        ts = time.time() if ts is None else ts
        with self._lock:
            self.conn.execute(
                "INSERT INTO boot_events(ts, mac, kind, detail, nbytes, duration) VALUES (?,?,?,?,?,?)",
                (ts, mac.lower() if mac else None, kind, json.dumps(detail, sort_keys=True) if detail else None,
                 nbytes, duration))

    def events(self, mac: Optional[str] = None, limit: int = 100, since: Optional[float] = None) -> list[dict]:
        sql = "SELECT * FROM boot_events"
        cond, params = [], []
        if mac:
            cond.append("mac=?")
            params.append(mac.lower())
        if since is not None:
            cond.append("ts>=?")
            params.append(since)
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(int(limit))
        rows = self.query(sql, tuple(params))
        out = []
        for r in reversed(rows):
            d = dict(r)
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def prune_events(self, older_than: float) -> int:
        with self._lock:
            return self.conn.execute("DELETE FROM boot_events WHERE ts < ?", (older_than,)).rowcount


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (sqlite3.execute runs one at a time; executescript would
    commit on its own and break the migration's atomicity). complete_statement knows about
    semicolons inside strings, comments and trigger bodies."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            stmt = buf.strip()
            if stmt.strip(";").strip() and not all(
                    l.strip().startswith("--") or not l.strip() for l in stmt.rstrip(";").splitlines()):
                out.append(stmt)
            buf = ""
    rest = buf.rstrip(";").strip()
    if rest and not all(l.strip().startswith("--") or not l.strip() for l in rest.splitlines()):
        out.append(rest)
    return out


def json_default(o: Any) -> Any:
    return str(o)
