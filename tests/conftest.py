"""Shared fixtures: private lab networks (tests/netns.py) and a real bootd daemon launcher."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from netns import Lab, Netns, leftover_namespaces  # noqa: E402
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
