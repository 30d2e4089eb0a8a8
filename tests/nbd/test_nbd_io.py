"""How the storage daemon does file I/O (nbd.aio: io_uring, threads, and the fall-back when io_uring is
refused) and the format of new overlays (nbd.subclusters), with the real qemu-storage-daemon and libnbd."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import nbd
import pytest
from nbdtest import MiB

A = "52:54:00:00:00:1a"
HERE = Path(__file__).resolve().parent


def io_uring_fds(pid: int) -> int:
    d = f"/proc/{pid}/fd"
    n = 0
    for fd in os.listdir(d):
        try:
            n += os.readlink(f"{d}/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return n


def read_and_write(uri: str) -> None:
    c = nbd.NBD()
    c.connect_uri(uri)
    assert c.pread(4, 0) == b"\xcd" * 4
    c.pwrite(b"w" * 4096, 8 * MiB)
    assert c.pread(4096, 8 * MiB) == b"w" * 4096
    c.shutdown()


def test_storage_daemon_uses_io_uring_by_default(harness, bases):
    hs = harness()
    assert hs.m.status()["aio"] == "io_uring" and hs.m.status()["aio_error"] is None
    assert io_uring_fds(hs.m.qsd.pid) == 1  # the daemon's ring, made for the probe's node
    exp = hs.run(hs.m.prepare_boot(A, bases[1]))
    read_and_write(exp.uri)
    assert io_uring_fds(hs.m.qsd.pid) == 1  # one ring, shared by every io_uring node


def test_threads_when_configured(harness, bases):
    hs = harness(aio="threads")
    exp = hs.run(hs.m.prepare_boot(A, bases[1]))
    read_and_write(exp.uri)
    assert hs.m.status()["aio"] == "threads" and io_uring_fds(hs.m.qsd.pid) == 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter knows x86_64's syscall number")
def test_refused_io_uring_falls_back_to_threads_and_disks_still_work(harness, bases, tmp_path):
    """A kernel or container that refuses io_uring (here: a seccomp filter on the daemon alone) costs
    speed, not disks: bootd probes, says why in its status, and serves with threads."""
    wrapper = tmp_path / "qsd-no-io_uring"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'no_io_uring.py'} qemu-storage-daemon \"$@\"\n")
    wrapper.chmod(0o755)
    hs = harness(qsd_binary=str(wrapper))
    st = hs.m.status()
    assert st["aio"] == "threads"
    assert "io_uring refused" in st["aio_error"]
    exp = hs.run(hs.m.prepare_boot(A, bases[1]))
    read_and_write(exp.uri)
    assert io_uring_fds(hs.m.qsd.pid) == 0
    # and the daemon really runs under the filter (so the probe's failure was the kernel's answer)
    with open(f"/proc/{hs.m.qsd.pid}/status") as f:
        assert "Seccomp:\t2" in f.read()


def overlay_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def grow_after_small_writes(hs, bases) -> tuple[dict, int]:
    """Write 4 KiB into each of 32 clusters of a fresh overlay; what the overlay grew on disk."""
    exp = hs.run(hs.m.prepare_boot(A, bases[1]))
    row = next(r for r in hs.m.exports.rows.values() if r.name == exp.name)
    before = os.stat(row.overlay).st_blocks * 512
    c = nbd.NBD()
    c.connect_uri(exp.uri)
    for i in range(32):
        c.pwrite(b"s" * 4096, 4 * MiB + i * 128 * 1024)
    c.flush()
    # the rest of each written cluster still reads as the snapshot (v2 = 0xCD for the first MiB, v1 elsewhere)
    assert c.pread(4096, 4 * MiB + 4096) == b"\0" * 4096
    assert c.pread(4096, 0) == b"\xcd" * 4096
    c.shutdown()
    return overlay_info(row.overlay), os.stat(row.overlay).st_blocks * 512 - before


def test_new_overlays_have_subclusters_and_small_writes_do_not_copy_the_cluster(harness, bases):
    info, grew = grow_after_small_writes(harness(), bases)
    assert info["format-specific"]["data"]["extended-l2"] is True
    assert info["cluster-size"] == 64 * 1024
    # 32 x 4 KiB written plus metadata: far below the 32 x 64 KiB a copy of each cluster would take
    assert grew < 32 * 64 * 1024 // 2, grew


def test_subclusters_off_gives_plain_overlays(harness, bases):
    info, grew = grow_after_small_writes(harness(subclusters=False), bases)
    assert info["format-specific"]["data"].get("extended-l2", False) is False
    assert grew >= 32 * 64 * 1024, grew  # each first write copied its whole cluster
