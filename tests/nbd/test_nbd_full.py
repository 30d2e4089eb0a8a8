"""A full disk: one PC's overlay at nbd.overlay_max fails that PC's writes only; a filesystem filled by
overlay writes still lets DHCP answer, and `bootctl disk reset` frees the space without a restart.

The storage (state database, snapshots, overlays) lives on a small tmpfs mounted for the test and
unmounted after it, whatever happens."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbd
import pytest
from nbdtest import MiB, make_base
from support import state_rows

from bootd.state import open_state
from nbdexport.errors import NoSpace

A = "52:54:00:00:0d:0a"
B = "52:54:00:00:0d:0b"


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of `size` MiB at a fresh directory; unmounted (lazily, also on failure) after the test."""
    mounted: list[Path] = []

    def make(size_mb: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(d)], check=True)
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def write_until_error(h: nbd.NBD, start: int, limit_mb: int) -> tuple[int, str]:
    """Write 1 MiB blocks from `start` until the server refuses one; (MiB written, errno)."""
    for i in range(limit_mb):
        try:
            h.pwrite(bytes([i % 250 + 1]) * MiB, start + i * MiB)
            h.flush()
        except nbd.Error as e:
            return i, e.errno
    return limit_mb, ""


def test_overlay_max_fails_that_hosts_writes_only(harness, bases, small_fs):
    v1, _ = bases
    fs = small_fs(64)
    hs = harness(directory=fs / "disks", overlay_max=16 * MiB, persistent={B}, warn_free_bytes=0)
    ea = hs.run(hs.m.prepare_boot(A, v1))
    eb = hs.run(hs.m.prepare_boot(B, v1))
    ca = connect(ea.uri)
    ca.pwrite(b"kept" * 1024, 0)
    ca.flush()
    written, err = write_until_error(ca, 2 * MiB, 48)
    assert err == "ENOSPC" and 10 <= written < 16, (written, err)
    overlay = hs.m.overlays.ephemeral_path(A, ea.boot, 0)
    assert os.stat(overlay).st_blocks * 512 <= 16 * MiB
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    assert free > 24 * MiB  # the filesystem is far from full: the limit stopped A, not the disk
    # A reads what it wrote and may still rewrite it; the export is up, the daemon never restarted
    assert ca.pread(4096, 0) == b"kept" * 1024
    assert ca.pread(4, 2 * MiB) == b"\x01" * 4
    ca.pwrite(b"again" * 100, 0)
    ca.flush()
    ca.shutdown()
    # B (a persistent layer, same limit) writes, reads back and reboots into its data
    cb = connect(eb.uri)
    assert write_until_error(cb, 2 * MiB, 8) == (8, "")
    assert cb.pread(4, 9 * MiB) == b"\x08" * 4
    cb.shutdown()
    listing = {e["mac"]: e for e in hs.run(hs.m.list())}
    assert listing[A]["overlay_max"] == 16 * MiB and listing[B]["overlay_max"] == 16 * MiB
    assert listing[A]["overlay_full"] and not listing[B]["overlay_full"]  # qemu's write-threshold event
    assert [e["detail"]["action"] for e in hs.store.events(A) if e["kind"] == "disk"][-1] == "overlay-full"
    eb2 = hs.run(hs.m.prepare_boot(B, v1))
    cb = connect(eb2.uri)
    assert cb.pread(4, 9 * MiB) == b"\x08" * 4
    cb.shutdown()
    # a restarted storage daemon puts the limit back on A's export
    pid = hs.m.qsd.pid
    os.kill(pid, 9)
    hs.wait_restarted(1)
    ca = connect(ea.uri)
    assert write_until_error(ca, 40 * MiB, 4)[1] == "ENOSPC"
    ca.shutdown()
    # resetting A frees its overlay; its next boot has a fresh disk with the whole limit again
    assert hs.run(hs.m.reset(A))["exports_removed"] == 1
    assert not overlay.exists()
    ea2 = hs.run(hs.m.prepare_boot(A, v1))
    ca = connect(ea2.uri)
    assert ca.pread(4, 2 * MiB) == b"\0" * 4
    assert write_until_error(ca, 2 * MiB, 8) == (8, "")
    ca.shutdown()



def test_full_filesystem_next_boot_and_reset_free_the_overlay_before_writing_state(harness, bases, small_fs):
    """No reserve and no limit: the state database shares a filesystem an overlay has filled. A's next
    boot and `disk reset` must free the overlay before they write the state database."""
    v1, _ = bases
    fs = small_fs(24)
    hs = harness(start=False, directory=fs / "disks", warn_free_bytes=0)
    hs.store = open_state(fs / "state.db")  # reserve_bytes=0: nothing to fall back on
    hs.start()
    for boot in range(2):  # first a reset of A, then the next boot of A
        ea = hs.run(hs.m.prepare_boot(A, v1))
        ca = connect(ea.uri)
        written, err = write_until_error(ca, 2 * MiB, 40)
        ca.shutdown()
        assert err in ("ENOSPC", "EIO") and written < 24
        assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize < MiB
        with pytest.raises(NoSpace):
            hs.run(hs.m.prepare_boot(B, v1))  # no room for another overlay: a clear error, nothing else
        if boot == 0:
            assert hs.run(hs.m.reset(A))["exports_removed"] == 1
            assert hs.m.export_for(A) is None
            assert hs.store.query("SELECT count(*) FROM disk_exports WHERE mac=?", (A,))[0][0] == 0
        else:
            ea2 = hs.run(hs.m.prepare_boot(A, v1))  # the next boot of A: a fresh disk
            c = connect(ea2.uri)
            assert c.pread(4, 2 * MiB) == b"\0" * 4
            c.shutdown()
    eb = hs.run(hs.m.prepare_boot(B, v1))  # the space is back for everyone
    c = connect(eb.uri)
    assert write_until_error(c, 2 * MiB, 4) == (4, "")
    c.shutdown()



def test_full_filesystem_reaper_frees_a_gone_hosts_overlay(harness, bases, small_fs):
    """The reaper drops the disk of a host that went away even when the state database cannot write."""
    v1, _ = bases
    fs = small_fs(24)
    hs = harness(start=False, directory=fs / "disks", warn_free_bytes=0, reap_after=600)
    hs.store = open_state(fs / "state.db")  # no reserve
    hs.start()
    ea = hs.run(hs.m.prepare_boot(A, v1))
    ca = connect(ea.uri)
    assert write_until_error(ca, 2 * MiB, 40)[1] in ("ENOSPC", "EIO")
    ca.shutdown()
    assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize < MiB
    assert hs.run(hs.m.reap_once(time.time() + 700)) == [A]
    assert hs.m.export_for(A) is None and hs.m.overlays.ephemeral_files() == []
    assert hs.store.query("SELECT count(*) FROM disk_exports")[0][0] == 0
    eb = hs.run(hs.m.prepare_boot(B, v1))
    c = connect(eb.uri)
    assert write_until_error(c, 2 * MiB, 4) == (4, "")
    c.shutdown()



def test_overlay_max_and_state_reserve_config():
    from bootd.config import ConfigError, parse_config
    from nbdexport.service import settings_from
    cfg = parse_config("nbd:\n  overlay_max: 20GiB\nstorage:\n  state_reserve_mb: 8\n")
    assert cfg.nbd.overlay_max == 20 << 30 and cfg.storage.state_reserve_mb == 8
    assert settings_from(cfg)[0].overlay_max == 20 << 30
    assert parse_config("{}").nbd.overlay_max == 0 and parse_config("{}").storage.state_reserve_mb == 16
    for bad, why in (("1MiB", "at least 16MiB"), ("lots", "could not parse"), ("-5", "could not parse")):
        with pytest.raises(ConfigError) as e:
            parse_config(f"nbd:\n  port: 10809\n  overlay_max: {bad}\n", "bootd.yaml")
        assert "bootd.yaml:3 nbd.overlay_max: " in str(e.value) and why in str(e.value)


# -- the real daemon in a lab namespace, its whole storage on a small tmpfs ----------------------------

WRITE = textwrap.dedent("""
    import json, sys, nbd
    h = nbd.NBD(); h.connect_uri(sys.argv[1])
    start, limit = int(sys.argv[2]) << 20, int(sys.argv[3])
    done, err = 0, ""
    for i in range(limit):
        try:
            h.pwrite(bytes([i % 250 + 1]) * (1 << 20), start + (i << 20))
            h.flush()
        except nbd.Error as e:
            err = e.errno
            break
        done += 1
    print(json.dumps({"written": done, "errno": err, "first": h.pread(4, start).hex()}))
""")


def lab_config(tmp_path, storage: Path, a, b, reserve_mb: int = 4, **nbd_cfg) -> dict:
    src = make_base(tmp_path / "deb.qcow2", pattern=0xAB)
    return {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
            "dhcp": {"mode": "full", "lease_time": 600, "router_advertisements": False,
                     "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.199"}]},
            "tftp": {"enabled": False},
            "storage": {"directory": str(storage), "min_free_mb": 0, "state_reserve_mb": reserve_mb},
            "nbd": nbd_cfg,
            "images": [{"name": "deb", "disk": str(src)}],
            "groups": [{"name": "room1", "images": ["deb"]}],
            "hosts": [{"mac": a.mac, "name": "pc-a", "ip": "10.77.0.10", "group": "room1"},
                      {"mac": b.mac, "name": "pc-b", "ip": "10.77.0.20", "group": "room1"}]}


def wait_for_image(d) -> None:
    deadline = time.monotonic() + 60
    while True:  # the configured disk is imported as deb@v1 in the background
        images = d.api.get("/api/v1/images")
        imgs = images.get("images", images) if isinstance(images, dict) else images
        if any(i.get("current") for i in imgs):
            return
        assert time.monotonic() < deadline, f"image not imported: {images}"
        time.sleep(0.2)


def boot_disk(client, ip: str) -> str:
    """The client fetches its menu (a new boot): the NBD URI on its kernel command line."""
    r = client.ns.run(["curl", "-sS", "--max-time", "30", f"http://10.77.0.1:8080/boot/{client.mac}.ipxe"],
                      check=False)
    m = re.search(r"bootd\.nbd=10\.77\.0\.1:10809/([A-Za-z0-9_-]+)", r.stdout)
    assert m, r.stdout + r.stderr
    return f"nbd://10.77.0.1:10809/{m.group(1)}"


def nbd_write(client, uri: str, start_mb: int, limit_mb: int) -> dict:
    import json
    out = client.ns.run([sys.executable, "-c", WRITE, uri, str(start_mb), str(limit_mb)], timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def dhcp_address(client, tmp_path) -> str:
    """udhcpc in the client's namespace: the address it was given ('' if none)."""
    log = tmp_path / f"udhcpc-{client.mac.replace(':', '')}.log"
    script = tmp_path / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\nif [ "$1" = bound ]; then echo "$ip" >> {log}; ip addr flush dev $interface; '
                      f'ip addr add $ip/24 dev $interface; fi\nexit 0\n')
    script.chmod(0o755)
    client.ns.run(["udhcpc", "-n", "-q", "-f", "-i", "eth0", "-s", str(script), "-t", "5", "-T", "2"],
                  check=False, timeout=60)
    return log.read_text().split()[-1] if log.exists() else ""


def stored_lease(storage: Path, mac: str) -> str:
    """The bound address the state database holds for `mac` ('' if none), read as another process."""
    rows = state_rows(storage / "state.db", "SELECT ip FROM leases WHERE mac=? AND state='bound'", (mac,))
    return rows[0][0] if rows else ""


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.netns
def test_overlay_max_in_the_daemon_other_hosts_keep_dhcp_and_disks(lab, bootd_daemon, tmp_path, small_fs):
    storage = small_fs(96)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client()
    d = bootd_daemon(lab_config(tmp_path, storage, a, b, overlay_max="16MiB"), ns=lab.server)
    wait_for_image(d)
    ua = boot_disk(a, "10.77.0.10")
    res = nbd_write(a, ua, 2, 64)
    assert res["errno"] == "ENOSPC" and 10 <= res["written"] < 16, res
    assert res["first"] == "01010101"  # A still reads what it wrote
    assert free_bytes(storage) > 32 << 20  # the limit stopped A, long before the filesystem
    # another PC: DHCP answers (its lease is stored), its disk reads and writes
    assert dhcp_address(b, tmp_path) == "10.77.0.20"
    assert stored_lease(storage, b.mac) == "10.77.0.20"
    ub = boot_disk(b, "10.77.0.20")
    assert nbd_write(b, ub, 2, 8) == {"written": 8, "errno": "", "first": "01010101"}
    disks = {e["mac"]: e for e in d.api.get("/api/v1/disks")["disks"]}
    assert disks[a.mac]["overlay_max"] == 16 << 20
    assert disks[a.mac]["overlay_full"] and not disks[b.mac]["overlay_full"]
    # `bootctl disk reset` of A works without a restart; A's next boot writes again
    d.bootctl("disk", "reset", a.mac, "--yes", check=True)
    ua2 = boot_disk(a, "10.77.0.10")
    assert ua2 != ua
    assert nbd_write(a, ua2, 2, 8)["written"] == 8
    assert d.proc.poll() is None


@pytest.mark.sqlite_only("the space reserve beside state.db on the filled filesystem")
@pytest.mark.netns
@pytest.mark.parametrize("reserve_mb", [4, 0], ids=["reserve", "no-reserve"])
def test_filesystem_filled_by_an_overlay_dhcp_answers_and_disk_reset_frees_it(lab, bootd_daemon, tmp_path,
                                                                              small_fs, reserve_mb):
    """With a reserve the state store writes B's lease into it; without one (or once it is used up)
    DHCP keeps B's lease in memory, answers, and stores the lease once there is room again."""
    storage = small_fs(40)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client()
    d = bootd_daemon(lab_config(tmp_path, storage, a, b, reserve_mb), ns=lab.server)  # no overlay_max
    wait_for_image(d)
    reserve = storage / "state.db.reserve"
    assert (reserve.stat().st_blocks * 512 >= 4 << 20) if reserve_mb else not reserve.exists()
    ua = boot_disk(a, "10.77.0.10")
    res = nbd_write(a, ua, 2, 60)
    assert res["errno"] in ("ENOSPC", "EIO") and res["written"] < 40, res
    assert free_bytes(storage) < 1 << 20  # the filesystem is full
    # DHCP still answers another PC (the state store writes into its reserve, or keeps it in memory)
    assert dhcp_address(b, tmp_path) == "10.77.0.20"
    # `bootctl disk reset` frees A's overlay first, then writes the state store: it succeeds
    r = d.bootctl("disk", "reset", a.mac, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert free_bytes(storage) > 16 << 20
    # and the lab goes on without a restart: B boots a disk, A boots a fresh one
    ub = boot_disk(b, "10.77.0.20")
    assert nbd_write(b, ub, 2, 4)["written"] == 4
    ua2 = boot_disk(a, "10.77.0.10")
    assert nbd_write(a, ua2, 2, 4)["written"] == 4
    # B's lease reaches the state database once it can write (at once, or within DHCP's 10 s retry)
    deadline = time.monotonic() + 30
    while stored_lease(storage, b.mac) != "10.77.0.20":
        assert time.monotonic() < deadline, "B's lease never reached the state database"
        time.sleep(0.5)
    assert d.proc.poll() is None
