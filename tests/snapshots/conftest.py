"""Fixtures for snapshot-store tests: a store on a temp dir with the real state database."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from snaputil import make_raw_disk  # noqa: E402

from bootd.state import open_state  # noqa: E402
from snapshots.store import SnapshotStore  # noqa: E402


@pytest.fixture
def state(tmp_path):
    st = open_state(tmp_path / "state.db")
    yield st
    st.close()


@pytest.fixture
def store(state, tmp_path):
    return SnapshotStore(state, tmp_path / "snapshots", min_free_bytes=0)


@pytest.fixture
def raw_disk(tmp_path):
    return make_raw_disk(tmp_path / "disk.raw")
