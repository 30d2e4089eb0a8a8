"""The state store on a full filesystem: its space reserve is given to SQLite, and taken back later.

The filesystem is a small tmpfs mounted for the test (needs root) and unmounted after it."""
from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from bootd.state import StateStore

MiB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "fs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def fill(path: Path) -> None:
    """Write zeros into `path` until the filesystem refuses."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


def free_bytes(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def add_hosts(store: StateStore, first: int, n: int) -> None:
    with store.transaction() as cur:
        for i in range(first, first + n):
            cur.execute("INSERT INTO hosts(mac, name, first_seen, last_seen) VALUES (?,?,?,?)",
                        (f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}", "x" * 200, 1.0, 1.0))


def test_full_filesystem_writes_go_into_the_reserve_and_it_comes_back(tiny_fs):
    store = StateStore(tiny_fs / "state.db", reserve_bytes=2 * MiB)
    reserve = tiny_fs / "state.db.reserve"
    assert reserve.stat().st_blocks * 512 >= 2 * MiB  # real blocks, not a sparse file
    store.reserve_retry_after = 0.0
    fill(tiny_fs / "filler")
    assert free_bytes(tiny_fs) < 64 << 10
    # a transaction and a single statement both land, in the space the reserve held
    add_hosts(store, 0, 200)
    store.touch_host("52:54:00:ff:00:01", ip="10.0.0.1")
    assert store.query("SELECT count(*) FROM hosts")[0][0] == 201
    assert store.reserve_releases == 1 and not reserve.exists()
    # no room to take it back while the filesystem is still full
    add_hosts(store, 300, 1)
    assert not reserve.exists()
    # once there is room again (someone freed files), the next write takes the reserve back
    os.unlink(tiny_fs / "filler")
    add_hosts(store, 400, 1)
    assert reserve.stat().st_blocks * 512 >= 2 * MiB
    store.close()
    # and everything written is in the file
    check = sqlite3.connect(tiny_fs / "state.db")
    assert check.execute("SELECT count(*) FROM hosts").fetchone()[0] == 203
    check.close()


def test_without_a_reserve_a_full_filesystem_is_an_error_and_nothing_half_written(tiny_fs):
    store = StateStore(tiny_fs / "state.db")
    assert not (tiny_fs / "state.db.reserve").exists()
    fill(tiny_fs / "filler")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        add_hosts(store, 0, 200)
    assert store.query("SELECT count(*) FROM hosts")[0][0] == 0
    os.unlink(tiny_fs / "filler")
    add_hosts(store, 0, 200)  # the store is usable again once there is room
    assert store.query("SELECT count(*) FROM hosts")[0][0] == 200
    store.close()
