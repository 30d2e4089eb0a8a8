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
    """Split a migration into statements (sqlite3.execute runs one at a time; executescript commits)."""
    out, buf = [], []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0] if "--" in line and "'" not in line else line
        buf.append(stripped)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            out.append(joined)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return out


def json_default(o: Any) -> Any:
    return str(o)
