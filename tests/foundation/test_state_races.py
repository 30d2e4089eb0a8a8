"""Two writers in two processes on one state database, on both engines (issue 20): lease allocation,
promotes, host registration and the DHCP role stay race-free. Each worker (state_race_worker.py) opens the
store as bootd does and waits for a GO file, so both really write at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootd.state import open_state
from snapshots.store import SnapshotStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "snapshots"))
from snaputil import make_raw_disk  # noqa: E402

ROUNDS = 150


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path, monkeypatch):
    """(environment for the workers, the store location): the SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        monkeypatch.delenv("BOOTD_STATE_URL", raising=False)
    else:
        monkeypatch.setenv("BOOTD_STATE_URL", request.getfixturevalue("pg_server").new_database())
    return tmp_path / "state.db"


def race(kind: str, db: Path, tmp_path: Path, rounds: int = ROUNDS, env: dict | None = None) -> list[dict]:
    go = tmp_path / f"go-{kind}"
    procs = [subprocess.Popen([sys.executable, str(HERE / "state_race_worker.py"), kind, str(who), str(db), str(go),
                               str(rounds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **(env or {})))
             for who in (0, 1)]
    try:
        time.sleep(1.5)  # both have opened the store and wait
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_lease_writers_never_give_one_address_to_two_macs(location, tmp_path):
    open_state(location).close()  # migrated once before the race
    a, b = race("leases", location, tmp_path)
    for w in (a, b):
        assert len(w["won"]) + len(w["lost"]) == ROUNDS
    # every address went to exactly one writer, and the loser was told (LeaseTaken), not silently overwritten
    assert sorted(a["won"] + b["won"]) == sorted(set(a["won"]) | set(b["won"]))
    assert set(a["won"]) | set(b["won"]) == {f"10.9.{k // 250}.{k % 250 + 1}" for k in range(ROUNDS)}
    store = open_state(location)
    try:
        rows = {r["ip"]: r["mac"] for r in store.query("SELECT ip, mac FROM leases WHERE state='bound'")}
    finally:
        store.close()
    assert len(rows) == ROUNDS
    for w in (a, b):  # what each writer believes it gave is what the database holds
        assert all(rows[ip].startswith(f"52:54:0{w['who']}:") for ip in w["won"])
    assert a["won"] and b["won"], "the writers did not overlap: no race was tested"


def test_two_admins_promoting_at_once_leave_one_current_snapshot(location, tmp_path):
    state = open_state(location)
    snaps = SnapshotStore(state, tmp_path / "snapshots", min_free_bytes=0)
    snaps.import_image("deb", str(make_raw_disk(tmp_path / "os.raw", size_mb=16)), "setup")
    draft = snaps.draft("deb@v1", "setup")
    snaps.seal(draft.id, "v2", "setup")
    state.close()
    a, b = race("promote", location, tmp_path, rounds=60, env={"RACE_SNAPSHOTS": str(tmp_path / "snapshots")})
    assert a["errors"] == [] and b["errors"] == []
    assert a["done"] + a["refused"] == 60 and b["done"] + b["refused"] == 60
    state = open_state(location)
    try:
        rows = state.query("SELECT snapshot_id, status FROM assignments WHERE kind='current' AND target='room1' "
                           "ORDER BY id")
    finally:
        state.close()
    assert len(rows) == a["done"] + b["done"]  # every promote that said done is in the history
    assert [r["status"] for r in rows].count("active") == 1
    assert all(r["status"] == "superseded" for r in rows[:-1])
    # a promote never follows one of the same snapshot: each read the one before it (no lost update)
    assert all(x["snapshot_id"] != y["snapshot_id"] for x, y in zip(rows, rows[1:], strict=False))


def test_two_admins_registering_the_same_names_get_one_host_each(location, tmp_path):
    open_state(location).close()
    a, b = race("register", location, tmp_path, rounds=80)
    assert a["errors"] == [] and b["errors"] == []
    assert sorted(a["won"] + b["won"]) == list(range(80))  # each name registered exactly once
    store = open_state(location)
    try:
        hosts = store.registered_hosts()
    finally:
        store.close()
    assert sorted(h["name"] for h in hosts) == sorted(f"pc{k}" for k in range(80))


def test_two_servers_never_hold_the_dhcp_role_at_once(location, tmp_path):
    open_state(location).close()
    a, b = race("claim", location, tmp_path, rounds=300)
    spans = sorted([(s, e, "a") for s, e in a["held"]] + [(s, e, "b") for s, e in b["held"]])
    assert {w for *_, w in spans} == {"a", "b"}, "one server held the role throughout: no hand-over was tested"
    # a server's renewal extends its own hold; a claim by the other starts only after that hold ran out
    for (_s1, e1, w1), (s2, _e2, w2) in zip(spans, spans[1:], strict=False):
        if w1 != w2:
            assert s2 >= e1, f"{w2} took the role at {s2} while {w1} held it until {e1}"
