"""Faults: the storage daemon killed mid-write, bootd killed, a full disk directory, hosts that go away."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import nbd
import pytest
from nbdtest import MiB, sha256

A = "52:54:00:00:01:0a"
B = "52:54:00:00:01:0b"


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_storage_daemon_killed_mid_write_is_restarted_with_its_exports(harness, bases):
    v1, _ = bases
    before = sha256(v1)
    hs = harness()
    ea = hs.run(hs.m.prepare_boot(A, v1))
    eb = hs.run(hs.m.prepare_boot(B, v1))
    c = connect(ea.uri)
    c.pwrite(b"flushed-before-crash", 5 * MiB)
    c.flush()
    errors: list[Exception] = []
    started = threading.Event()

    def writer():
        buf = b"\x5a" * (1 * MiB)
        try:
            for i in range(10_000):
                c.pwrite(buf, (8 + i % 32) * MiB)
                started.set()
        except nbd.Error as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    assert started.wait(10)
    old_pid = hs.m.qsd.pid
    os.kill(old_pid, signal.SIGKILL)  # mid-write
    t.join(20)
    assert not t.is_alive() and errors, "the writer should see its connection die"
    hs.wait_restarted(1)
    assert hs.m.qsd.pid != old_pid
    # both exports are back under the same names; A's flushed write is there, B is intact
    c2 = connect(ea.uri)
    assert c2.pread(20, 5 * MiB) == b"flushed-before-crash"
    c2.pwrite(b"after", 0)
    c2.flush()
    c2.shutdown()
    cb = connect(eb.uri)
    assert cb.pread(4, 0) == b"\xab" * 4
    cb.shutdown()
    assert sha256(v1) == before
    assert hs.run(hs.m.prepare_boot(A, v1)).name != ea.name  # and the manager goes on


def test_bootd_killed_hard_adopts_the_daemon_and_running_boots_keep_their_disks(harness, bases, tmp_path):
    v1, _ = bases
    deep = tmp_path / ("d" * 60) / "run"  # a QMP socket path longer than a unix socket address holds
    hs = harness(run_dir=deep)
    assert len(str(deep / "qmp.sock")) > 108
    ea = hs.run(hs.m.prepare_boot(A, v1))
    eb = hs.run(hs.m.prepare_boot(B, v1))
    qsd_pid = hs.m.qsd.pid
    c = connect(ea.uri)
    c.pwrite(b"before-bootd-died", 0)
    c.flush()
    hs.abandon()  # bootd gone without a word; the storage daemon keeps serving
    assert c.pread(17, 0) == b"before-bootd-died"
    # a stale overlay left by some earlier crash is found at start-up and removed
    stale = hs.directory / "ephemeral" / "525400000999.7.0.qcow2"
    stale.write_bytes(b"x" * 4096)
    hs2 = harness(port=hs.port, run_dir=deep)
    assert hs2.m.qsd.adopted and hs2.m.qsd.pid == qsd_pid
    assert not stale.exists()
    assert hs2.m.export_for(A).name == ea.name and hs2.m.export_for(B).name == eb.name
    assert c.pread(17, 0) == b"before-bootd-died"  # the open connection never noticed
    c.pwrite(b"still-writing", MiB)
    c.flush()
    c.shutdown()
    c = connect(eb.uri)
    assert c.pread(1, 0) == b"\xab"
    c.shutdown()
    hs2.run(hs2.m.prepare_boot(A, v1))  # next boot of A is a fresh disk again
    c = connect(hs2.m.export_for(A).uri)
    assert c.pread(17, 0) == b"\xab" * 17
    c.shutdown()


def test_daemon_gone_with_bootd_comes_back_from_the_state_file(harness, bases):
    """bootd and the daemon both died (power cut of the services): the next start re-creates the exports."""
    v1, _ = bases
    hs = harness()
    ea = hs.run(hs.m.prepare_boot(A, v1))
    c = connect(ea.uri)
    c.pwrite(b"on-disk", 0)
    c.flush()
    c.shutdown()
    pid = hs.m.qsd.pid
    hs.abandon()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    hs2 = harness(port=hs.port)
    assert not hs2.m.qsd.adopted
    c = connect(ea.uri)
    assert c.pread(7, 0) == b"on-disk"
    c.shutdown()


@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_disk_directory_fails_that_clients_writes_only(harness, bases, small_tmpfs):
    v1, _ = bases
    before = sha256(v1)
    hs = harness(directory=small_tmpfs / "disks", warn_free_percent=50, warn_free_bytes=0)
    ea = hs.run(hs.m.prepare_boot(A, v1))
    eb = hs.run(hs.m.prepare_boot(B, v1))
    assert not hs.m.space().low
    ca = connect(ea.uri)
    with pytest.raises(nbd.Error) as err:
        for i in range(32):
            ca.pwrite(bytes([i + 1]) * MiB, (2 + i) * MiB)
        ca.flush()
    assert err.value.errno in ("ENOSPC", "EIO")
    # the space warning is up, bootd answers, other clients read, A's connection itself still reads
    assert hs.m.space().low
    listing = hs.run(hs.m.list())
    assert {e["mac"] for e in listing} == {A, B}
    cb = connect(eb.uri)
    assert cb.pread(MiB, 0) == b"\xab" * MiB
    cb.shutdown()
    assert ca.pread(4, 0) == b"\xab" * 4
    ca.shutdown()
    assert hs.m.qsd.restarts == 0 and hs.m.qsd.up.is_set()
    # after A's next boot its overlay is gone and the space is back
    hs.run(hs.m.prepare_boot(A, v1))
    hs.wait(lambda: not hs.m.space().low)
    assert sha256(v1) == before


def test_reaper_drops_disks_of_hosts_that_went_away_but_not_connected_ones(harness, bases):
    v1, _ = bases
    hs = harness(persistent={B}, reap_after=600)
    ea = hs.run(hs.m.prepare_boot(A, v1))
    eb = hs.run(hs.m.prepare_boot(B, v1))
    hs.store.touch_host(A, ip="127.0.0.1")  # A is connected from this address
    ca = connect(ea.uri)
    now = time.time()
    assert hs.run(hs.m.reap_once(now + 60)) == []  # too early for anyone
    assert hs.run(hs.m.reap_once(now + 700)) == [B]  # B never connected: reaped
    assert hs.m.export_for(B) is None and hs.m.export_for(A) is not None
    with pytest.raises(nbd.Error):
        connect(eb.uri)
    # B is persistent: its layer file stays for its next boot
    assert hs.m.overlays.persistent_path(B).exists()
    ca.shutdown()
    time.sleep(0.1)
    assert hs.run(hs.m.reap_once(now + 700 + 700)) == [A]  # A disconnected and stayed away
    hs.wait(lambda: hs.m.overlays.ephemeral_files() == [])
