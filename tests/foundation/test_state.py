"""The state store: WAL, migrations forward without losing rows, events."""
from __future__ import annotations

import sqlite3

from bootd.state import MIGRATIONS, Migration, StateStore


def test_wal_and_latest_version(tmp_path):
    s = StateStore(tmp_path / "state.db")
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.version == max(m.version for m in MIGRATIONS)


def test_migrates_an_older_schema_forward_without_losing_rows(tmp_path):
    path = tmp_path / "state.db"
    old = StateStore(path, migrations=MIGRATIONS[:1])
    assert old.version == 1
    old.touch_host("52:54:00:00:00:01", ip="10.0.0.5", arch="bios", name="pc01", now=1000.0)
    old.record_event("52:54:00:00:00:01", "dhcp", {"offered": "10.0.0.5"}, ts=1001.0)
    with old.transaction() as cur:
        cur.execute("INSERT INTO leases(ip, mac, state, expires, updated)"
                    " VALUES ('10.0.0.5','52:54:00:00:00:01','bound',9e9,1)")
    old.close()

    extra = Migration(max(m.version for m in MIGRATIONS) + 1, "test: add a column",
                      "ALTER TABLE hosts ADD COLUMN note TEXT DEFAULT 'migrated';")
    new = StateStore(path, migrations=MIGRATIONS + [extra])
    assert new.version == extra.version
    h = new.host("52:54:00:00:00:01")
    assert h["name"] == "pc01" and h["last_ip"] == "10.0.0.5" and h["note"] == "migrated"
    ev = new.events("52:54:00:00:00:01")
    assert ev[0]["kind"] == "dhcp" and ev[0]["detail"] == {"offered": "10.0.0.5"}
    assert new.query("SELECT mac FROM leases WHERE ip='10.0.0.5'")[0]["mac"] == "52:54:00:00:00:01"
    assert new.mac_for_ip("10.0.0.5") == "52:54:00:00:00:01"


def test_failed_migration_leaves_old_version(tmp_path):
    path = tmp_path / "state.db"
    StateStore(path).close()
    top = max(m.version for m in MIGRATIONS)
    bad = Migration(top + 1, "broken", "CREATE TABLE t1(x); INSERT INTO no_such_table VALUES (1);")
    try:
        StateStore(path, migrations=MIGRATIONS + [bad])
    except sqlite3.OperationalError:
        pass
    else:
        raise AssertionError("broken migration applied")
    s = StateStore(path)
    assert s.version == top
    assert not s.query("SELECT name FROM sqlite_master WHERE name='t1'")


def test_transaction_is_all_or_nothing(tmp_path):
    s = StateStore(tmp_path / "state.db")
    try:
        with s.transaction() as cur:
            cur.execute("INSERT INTO leases(ip, mac, state, expires, updated) VALUES ('10.0.0.9','m','bound',1,1)")
            raise RuntimeError("crash in the middle")
    except RuntimeError:
        pass
    assert s.query("SELECT * FROM leases") == []
