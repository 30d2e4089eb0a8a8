"""Shared fixtures: private lab networks (tests/netns.py) and a real bootd daemon launcher."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from netns import Lab, Netns, leftover_namespaces  # noqa: E402
from pgserver import STATE_BACKEND  # noqa: E402
from support import BootdProcess  # noqa: E402


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


@pytest.fixture
def netns():
    _need_root()
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def lab():
    _need_root()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_namespaces():
    yield
    # A test that crashed its own cleanup must still not leave a namespace behind.
    for name in leftover_namespaces():
        ns = Netns.__new__(Netns)
        ns.name, ns.procs = name, []
        ns.close()


# The state backend the suite runs against: sqlite (default) or postgresql (`make test-postgres`, issue 20).
# With postgresql every test gets a database of its own on one PostgreSQL the session starts
# (tests/pgserver.py), named by BOOTD_STATE_URL: bootd.state.open_state and every bootd the test starts
# use it in place of the SQLite file. Tests of the SQLite file itself (backup, restore, the space reserve,
# damage) carry the `sqlite_only` mark and are skipped there.
if STATE_BACKEND not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"BOOTD_TEST_STATE={STATE_BACKEND!r}: sqlite or postgresql")


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL for the session (started on first use, stopped at the end)."""
    import pgserver
    server = pgserver.PgServer()
    pgserver.CURRENT = server
    try:
        yield server
    finally:
        pgserver.CURRENT = None
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def _state_backend_module(request):
    """A database for what a module-scoped fixture starts (a bootd shared by the module's tests)."""
    if STATE_BACKEND != "postgresql":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOOTD_STATE_URL", request.getfixturevalue("pg_server").new_database())
        yield


@pytest.fixture(autouse=True)
def _state_backend(request, monkeypatch):
    if STATE_BACKEND != "postgresql":
        monkeypatch.delenv("BOOTD_STATE_URL", raising=False)
        yield
        return
    mark = request.node.get_closest_marker("sqlite_only")
    if mark is not None:
        pytest.skip(f"SQLite only: {mark.args[0] if mark.args else 'the state file itself'}")
    monkeypatch.setenv("BOOTD_STATE_URL", request.getfixturevalue("pg_server").new_database())
    yield


@pytest.fixture
def bootd_daemon(tmp_path):
    """Factory: `bootd_daemon(config_dict, ns=lab.server, start=True)` -> a running BootdProcess."""
    made: list[BootdProcess] = []

    def make(config: Optional[dict] = None, ns: Optional[Netns] = None, start: bool = True,
             env: Optional[dict] = None, name: str = "bootd") -> BootdProcess:
        wd = tmp_path / f"{name}{len(made)}"
        wd.mkdir()
        d = BootdProcess(wd, dict(config or {}), ns=ns, env=env)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.close()
