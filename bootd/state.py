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

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

EVENT_LOG_MANAGED = 6  # the schema version from which events are coalesced and pruned


log = logging.getLogger("bootd.state")

SqlParams = Union[tuple[object, ...], Mapping[str, object]]
"""The parameters of one statement: positional (?) or named (:name)."""


class StateError(sqlite3.DatabaseError):
    """The state database cannot be used (corrupt, not a database, unreadable); the message names the
    file. A sqlite3.DatabaseError, so callers that catch sqlite3.Error still do."""


# What opening a StateStore can raise besides StateError: a failed migration (same sqlite3 class, the
# message names the file and the migration), or an OSError on the file's directory.
STATE_OPEN_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, OSError)


def _is_damage(e: sqlite3.Error) -> bool:
    """A file that is not (or no longer) a valid database, as opposed to a constraint or a busy lock."""
    return type(e) is sqlite3.DatabaseError or getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


@dataclass
class EventLimits:
    """How much boot-event log state.db keeps (config `events`): at 1 000 answered packets a second an
    unbounded log grew by ~30 GB a day."""

    retention: float = 7 * 86400.0  # seconds an event is kept
    max_rows: int = 200_000  # the newest rows kept
    coalesce: float = 60.0  # a repeat of a MAC's last event within this many seconds counts on its row
    audit_retention: float = 365 * 86400.0  # seconds a snapshot-store audit row is kept (longer than events)

    @property
    def slack(self) -> int:
        """Inserts between two row-cap prunes; each prune keeps max_rows - slack rows, so the cap holds."""
        return max(1, min(1000, self.max_rows // 10))


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
    Migration(6, "boot events: repeats counted on one row (bootd/dhcp owner, issue 13)", """
        ALTER TABLE boot_events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE boot_events ADD COLUMN last_ts REAL;
    """),
    Migration(7, "hosts registered at run time beside the config's (bootctl host, issue 16)", """
        CREATE TABLE registered_hosts (
            mac        TEXT PRIMARY KEY,
            name       TEXT NOT NULL UNIQUE,
            host_group TEXT,
            ip         TEXT UNIQUE,
            created    REAL NOT NULL,
            updated    REAL NOT NULL
        );
    """),
    Migration(8, "admin accounts for the PXE admin menu and the dashboard (bootd/admins.py, issue 17)", """
        CREATE TABLE admin_accounts (
            name          TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,           -- argon2id, PHC string; never the password
            created       REAL NOT NULL,
            created_by    TEXT NOT NULL,
            updated       REAL NOT NULL
        );
    """),
    Migration(9, "boot files a native image's snapshot carries: its kernel release (snapshots/bootfiles.py, issue 15)",
              """
        ALTER TABLE snapshots ADD COLUMN kernel_release TEXT;  -- NULL: the snapshot carries no boot files
    """),
    Migration(10, "admin roles for the dashboard: admin (everything) or viewer (read-only) (issue 18)", """
        ALTER TABLE admin_accounts ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    """),
    Migration(11, "several servers on one database: who is up, who answers DHCP, who served a boot (issue 20)", """
        CREATE TABLE servers (
            name       TEXT PRIMARY KEY,       -- state.server_name (default: the host name)
            address    TEXT,                   -- the address it serves on (next-server of its replies)
            pid        INTEGER,
            started    REAL NOT NULL,
            heartbeat  REAL NOT NULL           -- the database's clock at its last heartbeat
        );
        CREATE TABLE dhcp_active (
            id         INTEGER PRIMARY KEY CHECK (id = 1),
            server     TEXT NOT NULL,          -- the one server that answers DHCP
            since      REAL NOT NULL,
            expires    REAL NOT NULL           -- a standby takes over once the database's clock passes this
        );
        ALTER TABLE boot_events ADD COLUMN server TEXT;
    """),
]

SERVERS_SCHEMA = 11  # the schema version from which boot events name the server that wrote them


class StateStore:
    """SQLite state with WAL and forward migrations. One connection, used from the event loop thread.

    Calls are short and synchronous on purpose: a lease write is ~20 µs, cheaper than a thread hop.
    bootd/state_postgres.py is the same store on PostgreSQL; open_state picks one from a location.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, migrations: Optional[list[Migration]] = None, reserve_bytes: int = 0):
        self.path = Path(path)
        self.location = str(self.path)  # what messages name: the file here, the URL (no password) on PostgreSQL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = self._open_checked()
        self._init_common()
        # space held for this file on its filesystem (storage.state_reserve_mb): see _release_reserve
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self.reserve_retry_after = 10.0  # seconds between tries to take the reserve back
        self._hold_reserve()
        self.migrate(MIGRATIONS if migrations is None else migrations)

    def _init_common(self) -> None:
        """What the store holds besides its connection, on either engine."""
        self._lock = threading.RLock()
        # this server's name, written on its boot events (several servers on one PostgreSQL: who served a boot)
        self.server_name: Optional[str] = None
        self.reserve_releases = 0
        self._reserve_retry_at: Optional[float] = None  # set while the reserve is given away
        self.event_limits = EventLimits()
        # per MAC: its last event row, (id, kind, detail, nbytes, duration, first ts), for coalescing
        self._last_event: dict[Optional[str], tuple[Optional[int], str, Optional[str], Optional[int],
                                                    Optional[float], float]] = {}
        self._inserts_until_prune = 0  # 0: the next insert prunes first (the file may be over the cap)
        self._next_retention_prune = 0.0
        # called with the MAC of every boot event written (the dashboard's live feed, bootd/hostfeed.py);
        # they must be quick and thread-safe: a TFTP or DHCP worker thread may be the writer
        self.event_listeners: list[Callable[[Optional[str]], None]] = []
        self._server_column: Optional[bool] = None  # boot_events.server exists (schema >= SERVERS_SCHEMA)

    def _open_checked(self) -> sqlite3.Connection:
        """Open the file and check it is a sound database (PRAGMA quick_check), or raise StateError
        naming the file: bootd must not start on, or start over beside, a damaged state."""
        conn = None
        try:
            if self.path.is_dir():
                raise StateError(f"{self.path}: is a directory, not a database file")
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            found = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            if found != ["ok"]:
                raise StateError(f"{self.path}: the database is damaged (quick_check: {'; '.join(found)}); "
                                 f"restore it from a backup, or move it aside to start with an empty one")
            return conn
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            if isinstance(e, StateError):
                raise
            raise StateError(f"{self.path}: cannot open the state database: {e}"
                             + ("; restore it from a backup, or move it aside to start with an empty one"
                                if _is_damage(e) else "")) from None

    # -- schema --------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        version: int = self.conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _schema_version(self) -> int:
        """The version the database is at, read now (migrate asks again inside its write lock)."""
        return self.version

    def _migration_statement(self, stmt: str) -> str:
        """A migration's statement as this engine runs it."""
        return stmt

    def _set_schema_version(self, version: int) -> None:
        self.conn.execute(f"PRAGMA user_version={int(version)}")

    def migrate(self, migrations: list[Migration]) -> list[int]:
        """Apply every migration newer than the database; returns the versions applied. Each runs in its
        own write transaction with its version bump: a crash mid-migration leaves the old version."""
        applied = []
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version <= self._schema_version():
                continue
            with self._lock:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    if m.version <= self._schema_version():  # another process got there first
                        self.conn.execute("ROLLBACK")
                        continue
                    for stmt in _split_sql(m.sql):
                        self.conn.execute(self._migration_statement(stmt))
                    self._set_schema_version(m.version)
                    self.conn.execute("COMMIT")
                except sqlite3.Error as e:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    # the same error class (callers tell them apart), with the database and the migration
                    raise type(e)(f"{self.location}: migration {m.version} ({m.name}) failed: {e}") from e
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            applied.append(m.version)
        self._server_column = None
        return applied

    @contextmanager
    def transaction(self) -> Iterator["ReplayCursor"]:
        """BEGIN IMMEDIATE .. COMMIT; rolled back on any exception, so a change is all or nothing.
        On a full filesystem (SQLITE_FULL, which rolls the transaction back) the space reserve is
        released and the transaction's statements run again into it, once."""
        with self._lock:
            cur = ReplayCursor(self)
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException as e:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError) and _is_damage(e):  # damaged while running: which file
                    raise StateError(f"{self.path}: {e}") from e
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if not (disk_full(e) and self._release_reserve()):
                    raise
                try:
                    cur.replay()
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            self._keep_reserve()

    # -- the space reserve -------------------------------------------------------------------------
    def _hold_reserve(self) -> bool:
        """Make the reserve file (allocated blocks, not a sparse file) if there is room for it and
        as much again: the reserve must not itself be what fills the filesystem."""
        if self.reserve_bytes <= 0:
            try:
                self.reserve_path.unlink()
            except FileNotFoundError:
                pass
            return False
        try:
            if os.stat(self.reserve_path).st_blocks * 512 >= self.reserve_bytes:
                self._reserve_retry_at = None
                return True
        except FileNotFoundError:
            pass
        vfs = os.statvfs(self.path.parent)
        if vfs.f_bavail * vfs.f_frsize < 2 * self.reserve_bytes:
            if self._reserve_retry_at is None:  # at start: say so once, then try again after writes
                log.warning("state: less than %d MiB free beside %s: no space reserve for it yet",
                            2 * self.reserve_bytes >> 20, self.path)
                self._reserve_retry_at = time.monotonic() + self.reserve_retry_after
            return False
        tmp = self.reserve_path.with_name(self.reserve_path.name + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                except OSError as e:
                    if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: no fallocate here, write zeros
                        raise
                    chunk = b"\0" * (1 << 20)
                    for off in range(0, self.reserve_bytes, len(chunk)):
                        os.pwrite(fd, chunk[:self.reserve_bytes - off], off)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError as e:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            log.warning("state: cannot hold %d MiB for %s (%s)", self.reserve_bytes >> 20, self.path, e)
            if self._reserve_retry_at is None:
                self._reserve_retry_at = time.monotonic() + self.reserve_retry_after
            return False
        if self._reserve_retry_at is not None:
            log.info("state: %d MiB held for %s again", self.reserve_bytes >> 20, self.path)
        self._reserve_retry_at = None
        return True

    def _release_reserve(self) -> bool:
        """The filesystem is full: give the reserve's space to SQLite. False if there was none left."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        self.reserve_releases += 1
        self._reserve_retry_at = time.monotonic() + self.reserve_retry_after
        log.error("state: the filesystem of %s is full; released its %d MiB reserve so that leases and disk "
                  "resets still write (free space there, e.g. bootctl disk reset)", self.path, self.reserve_bytes >> 20)
        return True

    def _keep_reserve(self) -> None:
        """After a write: take the reserve back once the filesystem has room again (checked every 10 s)."""
        if self._reserve_retry_at is not None and time.monotonic() >= self._reserve_retry_at:
            self._reserve_retry_at = time.monotonic() + self.reserve_retry_after
            self._hold_reserve()

    def write(self, sql: str, params: SqlParams = ()) -> sqlite3.Cursor:
        """One statement in its own (implicit) transaction, run again into the reserve if the
        filesystem was full."""
        with self._lock:
            try:
                cur = self.conn.execute(sql, params)
            except sqlite3.Error as e:
                if not (disk_full(e) and self._release_reserve()):
                    raise
                cur = self.conn.execute(sql, params)
            self._keep_reserve()
            return cur

    def query(self, sql: str, params: SqlParams = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                if _is_damage(e):  # a file damaged while running: say which one
                    raise StateError(f"{self.path}: {e}") from e
                raise

    def db_time(self) -> float:
        """The clock heartbeats are compared against: this machine's (one file, one machine); on
        PostgreSQL the database server's, shared by every bootd."""
        return time.time()

    def close(self) -> None:
        with self._lock:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self.conn.close()

    # -- backup (bootctl backup; bootd restore reads it with describe_state_file) -----------------
    def backup_to(self, dest: str | Path, overwrite: bool = False) -> dict[str, Any]:
        """A consistent copy of the live database at `dest`, taken while bootd keeps writing.

        SQLite's online backup runs on a connection of its own, in one step: one read transaction, so
        the copy is the database as of one commit (WAL included), and in WAL mode writers are not held
        up meanwhile (safe to call from a worker thread). It goes to a temporary file beside `dest`,
        is checked and synced, then renamed onto `dest`: a crash leaves the old file or the new one.
        FileExistsError if `dest` exists and not `overwrite`."""
        dest = Path(dest)
        if dest.exists() and not overwrite:
            raise FileExistsError(f"{dest} exists")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        started = time.monotonic()
        try:
            # made here first, so that it is the owner's only: it holds leases and the hosts' export tokens
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            src = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
            try:
                src.execute("PRAGMA busy_timeout=10000")
                out = sqlite3.connect(str(tmp), isolation_level=None)
                try:
                    src.backup(out)
                    out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
                finally:
                    out.close()
            finally:
                src.close()
            info = describe_state_file(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if not overwrite and dest.exists():
                raise FileExistsError(f"{dest} exists")
            os.replace(tmp, dest)
            dir_fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException as e:
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass
            if isinstance(e, sqlite3.Error) and not isinstance(e, StateError):
                raise StateError(f"{self.path}: backup to {dest} failed: {e}") from e
            raise
        return {"path": str(dest), "bytes": dest.stat().st_size, "seconds": round(time.monotonic() - started, 3),
                **info}

    # -- hosts -----------------------------------------------------------------------------------
    def touch_host(self, mac: str, ip: Optional[str] = None, arch: Optional[str] = None,
                   name: Optional[str] = None, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self.write(
                """INSERT INTO hosts(mac, name, first_seen, last_seen, last_ip, arch)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(mac) DO UPDATE SET last_seen=excluded.last_seen,
                     last_ip=COALESCE(excluded.last_ip, hosts.last_ip),
                     arch=COALESCE(excluded.arch, hosts.arch),
                     name=COALESCE(excluded.name, hosts.name)""",
                (mac.lower(), name, now, now, ip, arch))

    def hosts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT * FROM hosts ORDER BY mac")]

    def host(self, mac: str) -> Optional[dict[str, Any]]:
        rows = self.query("SELECT * FROM hosts WHERE mac=?", (mac.lower(),))
        return dict(rows[0]) if rows else None

    def mac_for_ip(self, ip: str, now: Optional[float] = None) -> Optional[str]:
        """The MAC holding a bound, unexpired lease on `ip`, else None. Only a live binding: a released
        or expired lease, or `hosts.last_ip`, says who *was* there, not who is (bootd/peers.py)."""
        now = time.time() if now is None else now
        rows = self.query("SELECT mac FROM leases WHERE ip=? AND state='bound' AND expires>?", (ip, now))
        return rows[0]["mac"] if rows else None

    def bound_ips(self, mac: str) -> list[str]:
        """The addresses the MAC holds a bound lease on (expired or not: who may still be there)."""
        return [str(r["ip"]) for r in self.query("SELECT ip FROM leases WHERE mac=? AND state='bound'", (mac,))]

    def macs_named(self, name: str) -> list[str]:
        """The MACs whose host row carries `name` (a name a host reported, not one from the config)."""
        return [str(r["mac"]) for r in self.query("SELECT mac FROM hosts WHERE name=? ORDER BY mac", (name,))]

    # -- DHCP reservations made at run time (bootd/dhcp) -------------------------------------------
    def dhcp_reservations(self) -> list[dict[str, Any]]:
        """Every run-time reservation: mac, ip, name, created; by MAC."""
        return [dict(r) for r in self.query("SELECT mac, ip, name, created FROM dhcp_reservations ORDER BY mac")]

    def put_dhcp_reservation(self, mac: str, ip: str, name: Optional[str], now: Optional[float] = None) -> None:
        """Reserve `ip` for `mac` (replacing the MAC's earlier reservation). sqlite3.IntegrityError when
        another MAC holds `ip`."""
        now = time.time() if now is None else now
        with self.transaction() as cur:
            cur.execute("INSERT INTO dhcp_reservations(mac, ip, name, created) VALUES (?,?,?,?) "
                        "ON CONFLICT(mac) DO UPDATE SET ip=excluded.ip, name=excluded.name", (mac, ip, name, now))

    def delete_dhcp_reservation(self, mac: str) -> bool:
        """Drop the MAC's run-time reservation; False if it had none."""
        with self.transaction() as cur:
            return cur.execute("DELETE FROM dhcp_reservations WHERE mac=?", (mac,)).rowcount > 0

    # -- hosts registered at run time (bootctl host; bootd/hostregistry.py) -------------------------
    def registered_hosts(self) -> list[dict[str, Any]]:
        """Every registered host: mac, name, group, ip, created, updated; by MAC."""
        return [dict(r) for r in self.query(
            "SELECT mac, name, host_group AS \"group\", ip, created, updated FROM registered_hosts ORDER BY mac")]

    def change_registered_hosts(self, put: list[dict[str, Any]], delete: tuple[str, ...] | list[str] = (),
                                now: Optional[float] = None) -> None:
        """In one transaction: delete the rows of the MACs in `delete`, then add or replace (by MAC) each
        row of `put` (mac, name, group, ip): all of it or, on any error, none of it. sqlite3.IntegrityError
        when a name or an address ends up on two rows."""
        now = time.time() if now is None else now
        with self.transaction() as cur:
            for mac in delete:
                cur.execute("DELETE FROM registered_hosts WHERE mac=?", (mac,))
            # names and addresses move between rows: free them all first, so the order of `put` is no matter
            for row in put:
                cur.execute("UPDATE registered_hosts SET name=mac, ip=NULL WHERE mac=?", (row["mac"],))
            for row in put:
                cur.execute("INSERT INTO registered_hosts(mac, name, host_group, ip, created, updated) "
                            "VALUES (?,?,?,?,?,?) ON CONFLICT(mac) DO UPDATE SET name=excluded.name, "
                            "host_group=excluded.host_group, ip=excluded.ip, updated=excluded.updated",
                            (row["mac"], row["name"], row.get("group"), row.get("ip"), now, now))

    # -- admin accounts (bootd/admins.py) --------------------------------------------------------
    def admin_accounts(self) -> list[dict[str, Any]]:
        """Every admin account without its hash: name, role, created, created_by, updated; by name."""
        return [dict(r) for r in self.query(
            "SELECT name, role, created, created_by, updated FROM admin_accounts ORDER BY name")]

    def admin_password_hash(self, name: str) -> Optional[str]:
        rows = self.query("SELECT password_hash FROM admin_accounts WHERE name=?", (name,))
        return str(rows[0]["password_hash"]) if rows else None

    def admin_role(self, name: str) -> Optional[str]:
        """The account's role ('admin' or 'viewer'); None when there is no such account."""
        rows = self.query("SELECT role FROM admin_accounts WHERE name=?", (name,))
        return str(rows[0]["role"]) if rows else None

    def add_admin_account(self, name: str, password_hash: str, by: str, now: Optional[float] = None,
                          role: str = "admin") -> bool:
        """Add an account; False (and nothing changed) when the name is taken."""
        now = time.time() if now is None else now
        with self.transaction() as cur:
            return cur.execute("INSERT INTO admin_accounts(name, password_hash, created, created_by, updated, role) "
                               "VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO NOTHING",
                               (name, password_hash, now, by, now, role)).rowcount > 0

    def set_admin_role(self, name: str, role: str, now: Optional[float] = None) -> bool:
        """Change an account's role; False when there is no such account."""
        now = time.time() if now is None else now
        with self.transaction() as cur:
            return cur.execute("UPDATE admin_accounts SET role=?, updated=? WHERE name=?",
                               (role, now, name)).rowcount > 0

    def set_admin_password_hash(self, name: str, password_hash: str, now: Optional[float] = None) -> bool:
        """Replace an account's hash; False when there is no such account."""
        now = time.time() if now is None else now
        with self.transaction() as cur:
            return cur.execute("UPDATE admin_accounts SET password_hash=?, updated=? WHERE name=?",
                               (password_hash, now, name)).rowcount > 0

    def remove_admin_account(self, name: str) -> bool:
        with self.transaction() as cur:
            return cur.execute("DELETE FROM admin_accounts WHERE name=?", (name,)).rowcount > 0

    # -- PXE fallback export tokens (pxe/tokens.py) ------------------------------------------------
    def pxe_token(self, mac: str, new_token: str, now: Optional[float] = None) -> str:
        """The host's export token: the stored one, else `new_token`, stored now. Two callers racing for
        a new host both get the one that was stored first."""
        rows = self.query("SELECT token FROM pxe_tokens WHERE mac=?", (mac,))
        if rows:
            return str(rows[0]["token"])
        now = time.time() if now is None else now
        with self.transaction() as cur:
            cur.execute("INSERT INTO pxe_tokens(mac, token, created) VALUES (?, ?, ?) ON CONFLICT(mac) DO NOTHING",
                        (mac, new_token, now))
            row = cur.execute("SELECT token FROM pxe_tokens WHERE mac=?", (mac,)).fetchone()
            assert row is not None  # inserted just above unless it was there, in this transaction
            return str(row[0])

    # -- boot events -------------------------------------------------------------------------------
    def record_event(self, mac: Optional[str], kind: str, detail: Optional[Mapping[str, object]] = None,
                     nbytes: Optional[int] = None, duration: Optional[float] = None,
                     ts: Optional[float] = None) -> None:
        """Append an event, or count it on the MAC's last row when it repeats that row within
        `event_limits.coalesce` seconds (a PC retrying DHCP adds one row, not one per packet). Every
        `slack` inserts the log is pruned to its row cap, and once a minute to its retention."""
        ts = time.time() if ts is None else ts
        mac = mac.lower() if mac else None
        self._write_event(mac, kind, detail, nbytes, duration, ts)
        for listener in self.event_listeners:
            listener(mac)

    def _write_event(self, mac: Optional[str], kind: str, detail: Optional[Mapping[str, object]],
                     nbytes: Optional[int], duration: Optional[float], ts: float) -> None:
        text = json.dumps(detail, sort_keys=True) if detail else None
        limits = self.event_limits
        with self._lock:
            if self.version < EVENT_LOG_MANAGED:  # a store held at an older schema (tests of migrations)
                self.conn.execute("INSERT INTO boot_events(ts, mac, kind, detail, nbytes, duration) "
                                  "VALUES (?,?,?,?,?,?)", (ts, mac, kind, text, nbytes, duration))
                return
            last = self._last_event.get(mac)
            if last is not None and last[1:5] == (kind, text, nbytes, duration) and \
                    0 <= ts - last[5] <= limits.coalesce:
                if self.conn.execute("UPDATE boot_events SET count=count+1, last_ts=? WHERE id=? AND mac IS ? "
                                     "AND kind=?", (ts, last[0], mac, kind)).rowcount:  # not rolled back
                    return
            if self._has_server_column():
                cur = self.conn.execute(
                    "INSERT INTO boot_events(ts, mac, kind, detail, nbytes, duration, server) VALUES (?,?,?,?,?,?,?)",
                    (ts, mac, kind, text, nbytes, duration, self.server_name))
            else:
                cur = self.conn.execute(
                    "INSERT INTO boot_events(ts, mac, kind, detail, nbytes, duration) VALUES (?,?,?,?,?,?)",
                    (ts, mac, kind, text, nbytes, duration))
            if len(self._last_event) >= 65536:  # many MACs at once (a flood): start over, stay bounded
                self._last_event.clear()
            self._last_event[mac] = (cur.lastrowid, kind, text, nbytes, duration, ts)
            self._inserts_until_prune -= 1
            if self._inserts_until_prune <= 0 or ts >= self._next_retention_prune:
                self.enforce_event_limits(ts)

    def _has_server_column(self) -> bool:
        if self._server_column is None:
            self._server_column = self.version >= SERVERS_SCHEMA
        return self._server_column

    # -- several servers on one database (bootd/cluster.py) ----------------------------------------
    def heartbeat(self, name: str, address: Optional[str], pid: int, started: float) -> float:
        """Say this server is up (its row in `servers`); returns the database's clock."""
        with self.transaction() as cur:
            now = self.db_time()
            cur.execute("INSERT INTO servers(name, address, pid, started, heartbeat) VALUES (?,?,?,?,?) "
                        "ON CONFLICT(name) DO UPDATE SET address=excluded.address, pid=excluded.pid, "
                        "started=excluded.started, heartbeat=excluded.heartbeat", (name, address, pid, started, now))
        return now

    def servers(self) -> list[dict[str, Any]]:
        """Every server that has used this database: name, address, pid, started, heartbeat, with
        `now` (the database's clock) and `dhcp_active` (whether it is the one answering DHCP now)."""
        now = self.db_time()
        active = self.query("SELECT server, since, expires FROM dhcp_active WHERE id=1")
        out = []
        for r in self.query("SELECT name, address, pid, started, heartbeat FROM servers ORDER BY name"):
            d = dict(r)
            d["now"] = now
            d["dhcp_active"] = bool(active) and active[0]["server"] == d["name"] and active[0]["expires"] > now
            d["dhcp_active_since"] = active[0]["since"] if d["dhcp_active"] else None
            out.append(d)
        return out

    def claim_dhcp(self, name: str, hold: float) -> tuple[str, float, bool]:
        """Hold (or take over) the one DHCP-answering role for `hold` seconds of the database's clock.
        Taken only when nobody holds it or the holder's time has run out (its heartbeat stopped), in one
        write transaction: two standbys cannot both take over. Returns (the holder, its expiry, whether
        this call took the role from another server or from nobody)."""
        with self.transaction() as cur:
            now = self.db_time()
            row = cur.execute("SELECT server, since, expires FROM dhcp_active WHERE id=1").fetchone()
            if row is None:
                cur.execute("INSERT INTO dhcp_active(id, server, since, expires) VALUES (1,?,?,?)",
                            (name, now, now + hold))
                return name, now + hold, True
            if row["server"] == name and row["expires"] > now:
                cur.execute("UPDATE dhcp_active SET expires=? WHERE id=1", (now + hold,))
                return name, now + hold, False
            if row["server"] == name or row["expires"] <= now:
                cur.execute("UPDATE dhcp_active SET server=?, since=?, expires=? WHERE id=1", (name, now, now + hold))
                return name, now + hold, True
            return str(row["server"]), float(row["expires"]), False

    def shared_rows_fingerprint(self) -> str:
        """A digest of what each server keeps in memory from the database, for the others' changes: the
        registered hosts and the run-time DHCP reservations (small tables: read whole)."""
        h = hashlib.sha256()
        for sql in ("SELECT mac, name, host_group, ip, updated FROM registered_hosts ORDER BY mac",
                    "SELECT mac, ip, name FROM dhcp_reservations ORDER BY mac"):
            for r in self.query(sql):
                h.update(repr(tuple(r)).encode())
            h.update(b"|")
        return h.hexdigest()

    def release_dhcp(self, name: str) -> None:
        """Give the DHCP role up now (a clean stop): a standby takes it at its next heartbeat."""
        with self.transaction() as cur:
            cur.execute("UPDATE dhcp_active SET expires=0 WHERE id=1 AND server=?", (name,))

    def events(self, mac: Optional[str] = None, limit: int = 100,
               since: Optional[float] = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM boot_events"
        cond: list[str] = []
        params: list[object] = []
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
        out: list[dict[str, Any]] = []
        for r in reversed(rows):
            d = dict(r)
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def prune_events(self, older_than: float) -> int:
        with self._lock:
            return self._delete_events("ts < ?", older_than)

    def set_event_limits(self, retention: float, max_rows: int, coalesce: float,
                         audit_retention: float = EventLimits.audit_retention) -> None:
        with self._lock:
            self.event_limits = EventLimits(float(retention), int(max_rows), float(coalesce), float(audit_retention))
            self._inserts_until_prune = 0
            self._next_retention_prune = 0.0

    def enforce_event_limits(self, now: Optional[float] = None) -> int:
        """Prune the event log to its retention and row cap, and the snapshot audit log to its own (longer)
        retention; returns the rows deleted. Called on inserts (see record_event) and periodically, so an
        idle log also ages out."""
        now = time.time() if now is None else now
        limits = self.event_limits
        with self._lock:
            n = 0
            if now >= self._next_retention_prune:
                n += self._delete_events("ts < ?", now - limits.retention)
                n += self.conn.execute("DELETE FROM audit WHERE at < ?", (now - limits.audit_retention,)).rowcount
                self._next_retention_prune = now + 60.0
            keep = max(1, limits.max_rows - limits.slack)
            row = self.conn.execute("SELECT id FROM boot_events ORDER BY id DESC LIMIT 1 OFFSET ?",
                                    (keep - 1,)).fetchone()
            if row is not None:
                n += self._delete_events("id < ?", row[0])
            self._inserts_until_prune = limits.slack
            return n

    def _delete_events(self, where: str, param: float) -> int:
        """Delete the events matching `where`, and the host rows that had nothing else: a host row goes
        with its last event unless a lease or a reservation still names it, so MACs seen once (a flood
        of random ones in proxy mode) do not pile up in `hosts`."""
        macs = [(r[0],) for r in self.conn.execute(
            f"SELECT DISTINCT mac FROM boot_events WHERE {where} AND mac IS NOT NULL", (param,))]
        n = self.conn.execute(f"DELETE FROM boot_events WHERE {where}", (param,)).rowcount
        self.conn.executemany(
            """DELETE FROM hosts WHERE mac = ?
                 AND NOT EXISTS (SELECT 1 FROM boot_events e WHERE e.mac = hosts.mac)
                 AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.mac = hosts.mac)
                 AND NOT EXISTS (SELECT 1 FROM dhcp_reservations r WHERE r.mac = hosts.mac)""", macs)
        return n


def state_url(configured: Optional[str]) -> Optional[str]:
    """The PostgreSQL URL in force: the environment's BOOTD_STATE_URL (which overrides the config: a systemd
    EnvironmentFile or credential keeps the database password out of bootd.yaml), else `state.url`; None:
    the SQLite file."""
    return os.environ.get("BOOTD_STATE_URL") or configured


def open_state(path: str | Path, url: Optional[str] = None, reserve_bytes: int = 0,
               migrations: Optional[list[Migration]] = None) -> StateStore:
    """The state store bootd uses: PostgreSQL at state_url(url), else the SQLite file at `path`."""
    url = state_url(url)
    if url:
        from bootd.state_postgres import PostgresStateStore
        return PostgresStateStore(url, migrations=migrations)
    return StateStore(path, migrations=migrations, reserve_bytes=reserve_bytes)


STATE_TABLES = ("hosts", "leases", "boot_events")  # every bootd state database has these (migration 1)


def describe_state_file(path: str | Path) -> dict[str, Any]:
    """What a (backup) file holds, checked: a sound SQLite database with bootd's schema at a version this
    bootd knows. {"schema_version", "rows": {table: count}}; StateError naming the file and why not."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no such file")
    known = max(m.version for m in MIGRATIONS)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise StateError(f"{path}: cannot open: {e}") from None
    try:
        found = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if found != ["ok"]:
            raise StateError(f"{path}: the database is damaged (quick_check: {'; '.join(found)})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in STATE_TABLES if t not in tables]
        if version < 1 or missing:
            raise StateError(f"{path}: not a bootd state database (schema version {version}"
                             + (f", no table {', '.join(missing)}" if missing else "") + ")")
        if version > known:
            raise StateError(f"{path}: schema version {version} is newer than this bootd knows ({known}): "
                             f"restore it with the bootd that made it")
        rows = {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in sorted(tables)
                if not t.startswith("sqlite_")}
    except sqlite3.Error as e:
        raise StateError(f"{path}: not a usable database: {e}") from None
    finally:
        conn.close()
    return {"schema_version": version, "rows": rows}


# SQLite's unix VFS: every connection that has a WAL database open holds a shared lock on this byte of
# its -shm file (the "DMS" byte: UNIX_SHM_BASE 120 + SQLITE_SHM_NLOCK 8, os_unix.c) until it closes.
_SHM_DMS_OFFSET = 128


def state_in_use(db_path: str | Path) -> Optional[int]:
    """The pid of a process that has the (WAL) database open, such as a running bootd, else None.
    Asked with F_GETLK on the -shm file's DMS byte: nothing is locked, nothing is opened as a database."""
    shm = Path(f"{db_path}-shm")
    try:
        fd = os.open(shm, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS_OFFSET, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    finally:
        os.close(fd)
    kind, _, _, _, pid = struct.unpack("hhqqi4x", answer)
    return pid if kind != fcntl.F_UNLCK else None


def restore_state_file(backup: str | Path, db_path: str | Path) -> dict[str, Any]:
    """Put a backup in place of the state database (bootd stopped): the backup is checked first
    (describe_state_file), the current database and its -wal/-shm move aside under one timestamped name,
    and a copy of the backup is synced and renamed onto `db_path`. The backup file itself stays."""
    backup, db_path = Path(backup), Path(db_path)
    pid = state_in_use(db_path)
    if pid is not None:
        raise StateError(f"{db_path} is open in process {pid} (a running bootd?): stop it first")
    info = describe_state_file(backup)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved: list[str] = []
    if db_path.exists():
        aside = db_path.with_name(f"{db_path.name}.before-restore-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{db_path}{suffix}")
            if old.exists():
                os.replace(old, f"{aside}{suffix}")
                moved.append(f"{aside}{suffix}")
    tmp = db_path.with_name(f".{db_path.name}.restore.tmp")
    mode = os.stat(moved[0]).st_mode & 0o777 if moved else 0o600
    try:
        with open(backup, "rb") as src, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, db_path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(db_path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return {"restored": str(db_path), "from": str(backup), "moved_aside": moved, **info}


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
                    line.strip().startswith("--") or not line.strip() for line in stmt.rstrip(";").splitlines()):
                out.append(stmt)
            buf = ""
    rest = buf.rstrip(";").strip()
    if rest and not all(line.strip().startswith("--") or not line.strip() for line in rest.splitlines()):
        out.append(rest)
    return out


def json_default(o: Any) -> Any:
    return str(o)


SQLITE_FULL = 13


def disk_full(e: BaseException) -> bool:
    """Did SQLite fail for want of space (SQLITE_FULL, whatever the extended code)?"""
    # sqlite_errorcode is set on errors SQLite raised (Python >= 3.11), absent on ones raised by hand
    return isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) & 0xFF) == SQLITE_FULL


class ReplayCursor:
    """The cursor a transaction hands out: it keeps each statement so that the transaction can run
    again after SQLITE_FULL (which rolls it back) once the space reserve is free. Running the same
    statements again inside BEGIN IMMEDIATE, from the same starting state, gives the same rows and
    the same lastrowid values the caller has already seen."""

    def __init__(self, store: StateStore):
        self._store = store
        self._cur = store.conn.cursor()
        self._done: list[tuple[str, SqlParams]] = []

    def execute(self, sql: str, params: SqlParams = ()) -> "ReplayCursor":
        try:
            self._cur.execute(sql, params)
        except sqlite3.Error as e:
            if not self._done or not (disk_full(e) and self._store._release_reserve()):
                raise
            if not self._store.conn.in_transaction:  # rolled back: from the start again
                self.replay()
            self._cur.execute(sql, params)
        self._done.append((sql, params))
        return self

    def replay(self) -> None:
        """Run every statement so far again (the first one is the BEGIN)."""
        for sql, params in self._done:
            self._cur.execute(sql, params)

    def fetchone(self) -> Optional[sqlite3.Row]:
        row: Optional[sqlite3.Row] = self._cur.fetchone()
        return row

    def fetchall(self) -> list[sqlite3.Row]:
        return self._cur.fetchall()

    def __iter__(self) -> Iterator[sqlite3.Row]:
        return iter(self._cur)

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def lastrowid(self) -> Optional[int]:
        return self._cur.lastrowid
