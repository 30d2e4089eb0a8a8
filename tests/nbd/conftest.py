"""Fixtures for the disk tests: base qcow2 images with known content, and a DiskManager driving a real
qemu-storage-daemon on a free loopback port (killed after the test, whatever happens)."""
from __future__ import annotations

import pytest
from nbdtest import Harness, make_base


@pytest.fixture
def bases(tmp_path):
    """Two snapshots (v1 pattern 0xAB, v2 = v1 + pattern 0xCD) in a chain, like the snapshot store makes."""
    d = tmp_path / "images"
    d.mkdir()
    v1 = make_base(d / "v1.qcow2", pattern=0xAB)
    v2 = make_base(d / "v2.qcow2", pattern=0xCD, backing=v1)
    for p in (v1, v2):
        p.chmod(0o444)
    return v1, v2


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(start: bool = True, **kw) -> Harness:
        h = Harness(tmp_path, **kw)
        made.append(h)
        return h.start() if start else h

    yield make
    for h in reversed(made):
        h.stop()
