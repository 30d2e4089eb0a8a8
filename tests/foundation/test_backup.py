"""State backup and restore (issue 16): `bootctl backup FILE` copies state.db online and consistently while
the real daemon keeps writing leases and boot events (DHCP traffic from a client namespace), and
`bootd restore FILE` puts it back, refusing while a bootd has the state open or for a file that is not a
bootd state database."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bootd.cli.api_client import ApiError
from bootd.state import MIGRATIONS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable
SCHEMA = max(m.version for m in MIGRATIONS)

pytestmark = [pytest.mark.netns,
              pytest.mark.sqlite_only("bootctl backup / bootd restore copy the SQLite file; PostgreSQL: pg_dump")]


def dhcp_config() -> dict:
    return {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
            "dhcp": {"mode": "full", "lease_time": 600,
                     "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.199"}],
                     "rate_limit": {"per_mac": 1000, "per_mac_burst": 1000}},
            "events": {"coalesce": 0},  # every packet a row: the backup races real event writes
            "tftp": {"enabled": False}, "nbd": {"enabled": False}}


def get_lease(client, mac: str) -> None:
    r = client.ns.run([PY, str(ROOT / "tests" / "dhcp" / "udpclient.py"), "--mac", mac, "--rounds", "2",
                       "--pxe-arch", "7"], timeout=60)
    acks = [json.loads(line)["ack"] for line in r.stdout.splitlines() if line.startswith("{")]
    assert acks and all(acks), r.stdout


def read_backup(path: Path) -> dict:
    """What the test itself finds in a backup file: a sound database, by its own reading."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return {"integrity": conn.execute("PRAGMA integrity_check").fetchone()[0],
                "version": conn.execute("PRAGMA user_version").fetchone()[0],
                "journal": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "lease_macs": {r[0] for r in conn.execute("SELECT mac FROM leases")},
                "leases": conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0],
                "events": conn.execute("SELECT COUNT(*) FROM boot_events").fetchone()[0]}
    finally:
        conn.close()


def backups_grew(backups: list) -> bool:
    """The daemon wrote while the backups were taken: the last one holds more leases than the first."""
    return read_backup(backups[-1][0])["leases"] > read_backup(backups[0][0])["leases"]


def bootd_restore(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bootd.cli.bootd_main", "--config", str(d.config_path), "restore", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))


def test_backup_while_writing_then_restore_round_trip(lab, bootd_daemon, tmp_path):
    d = bootd_daemon(dhcp_config(), ns=lab.server)
    client = lab.add_client(address="10.77.0.50")
    get_lease(client, "52:54:00:77:10:00")

    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        n = 1
        while not stop.is_set() and n < 90:
            try:
                get_lease(client, f"52:54:00:77:10:{n:02x}")
            except BaseException as e:  # reported by the test thread
                errors.append(e)
                return
            n += 1

    writer = threading.Thread(target=traffic)
    writer.start()
    backups = []
    try:
        for i in range(6):
            dest = tmp_path / f"state-{i}.db"
            r = d.bootctl("backup", str(dest), "--json")
            assert r.returncode == 0, r.stderr
            backups.append((dest, json.loads(r.stdout)))
    finally:
        stop.set()
        writer.join(timeout=120)
    assert not errors, errors

    previous = {"leases": 0, "events": 0}
    for dest, answer in backups:
        found = read_backup(dest)
        assert found["integrity"] == "ok" and found["version"] == SCHEMA == answer["schema_version"]
        assert found["journal"] == "delete"  # one file, nothing beside it to lose
        assert not Path(f"{dest}-wal").exists()
        assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600  # it holds leases and export tokens
        assert answer["rows"]["leases"] == found["leases"] and answer["rows"]["boot_events"] == found["events"]
        assert found["leases"] >= max(1, previous["leases"]) and found["events"] >= max(1, previous["events"])
        previous = found
    assert backups_grew(backups), "no lease was written between the first and the last backup"
    assert not list(tmp_path.glob(".state-*")), "temporary file left behind"

    # a restore point, then a lease after it that the restore must take away again
    point = tmp_path / "point.db"
    assert d.bootctl("backup", str(point), check=True).returncode == 0
    kept = read_backup(point)["lease_macs"]
    get_lease(client, "52:54:00:77:20:01")
    assert "52:54:00:77:20:01" in {lease["mac"] for lease in d.api.get("/api/v1/dhcp/leases?all=1")["leases"]}

    r = bootd_restore(d, str(point))  # bootd still runs on that state
    assert r.returncode == 1 and f"is open in process {d.proc.pid}" in r.stderr, r.stderr
    assert d.stop() == 0
    r = bootd_restore(d, str(point))
    assert r.returncode == 0, r.stderr
    assert "restored" in r.stdout and "before-restore-" in r.stdout
    aside = list(d.storage.glob("state.db.before-restore-*"))
    assert aside and "52:54:00:77:20:01" in read_backup(aside[0])["lease_macs"]  # the old state is kept

    d.start()
    macs = {lease["mac"] for lease in d.api.get("/api/v1/dhcp/leases?all=1")["leases"]}
    assert macs == kept and "52:54:00:77:20:01" not in macs


def test_backup_api_refuses_bad_paths(bootd_daemon, tmp_path):
    d = bootd_daemon({})
    dest = tmp_path / "b.db"
    for body, status, reason in [
        ({"path": "relative/b.db"}, 400, "must be absolute"),
        ({}, 400, "path must name"),
        ({"path": str(tmp_path / "no-such-dir" / "b.db")}, 400, "does not exist"),
        ({"path": str(tmp_path)}, 400, "is a directory"),
        ({"path": str(d.storage / "state.db"), "force": True}, 400, "live state database"),
        ({"path": str(dest), "force": "yes"}, 400, "force must be"),
    ]:
        with pytest.raises(ApiError) as e:
            d.api.post("/api/v1/backup", body)
        assert e.value.status == status and reason in str(e.value), (body, e.value)
    assert d.api.post("/api/v1/backup", {"path": str(dest)})["schema_version"] == SCHEMA
    with pytest.raises(ApiError) as e:
        d.api.post("/api/v1/backup", {"path": str(dest)})
    assert e.value.status == 409 and "exists" in str(e.value)
    r = d.bootctl("backup", str(dest))
    assert r.returncode == 1 and "exists" in r.stderr
    r = d.bootctl("backup", str(dest), "--force")
    assert r.returncode == 0 and "bootd restore" in r.stdout, r.stderr
    assert d.api.get("/api/v1/metrics")["state"]["backups"] == 2


def test_restore_refuses_what_is_not_a_bootd_state(bootd_daemon, tmp_path):
    d = bootd_daemon({}, start=False)
    d.storage.mkdir(parents=True, exist_ok=True)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.executescript(f"CREATE TABLE hosts (mac); CREATE TABLE leases (ip); CREATE TABLE boot_events (id);"
                       f"PRAGMA user_version={SCHEMA + 1};")
    conn.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, just text " * 200)
    for path, reason in [(other, "not a bootd state database"), (newer, "newer than this bootd knows"),
                         (text, "not a usable database"), (tmp_path / "missing.db", "no such file")]:
        r = bootd_restore(d, str(path))
        assert r.returncode == 1 and reason in r.stderr, (path, r.stderr)
    assert not (d.storage / "state.db").exists()  # nothing was moved or written
