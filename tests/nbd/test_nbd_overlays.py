"""A host's disk within a boot and across boots, with real NBD clients (libnbd, nbdcopy, qemu-img)."""
from __future__ import annotations

import asyncio
import subprocess
from typing import Any, Optional

import nbd
import pytest
from nbdtest import MiB, sha256

from nbdexport.errors import DiskError
from nbdexport.qsd import StorageDaemon

A = "52:54:00:00:00:0a"
B = "52:54:00:00:00:0b"


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_write_survives_reconnect_within_boot_and_goes_at_next_boot(harness, bases):
    v1, v2 = bases
    before = sha256(v1), sha256(v2)
    hs = harness()
    exp = hs.run(hs.m.prepare_boot(A, v2))
    assert exp.size == 64 * MiB and exp.port == hs.port and exp.format == "raw"
    assert A.replace(":", "") not in exp.name and exp.name not in A
    c = connect(exp.uri)
    assert c.pread(4, 0) == b"\xcd" * 4
    c.pwrite(b"written-by-A" + b"\0" * 500, 2 * MiB)
    c.flush()
    c.shutdown()  # disconnect ...
    c = connect(exp.uri)  # ... and reconnect within the same boot: the write is there
    assert c.pread(12, 2 * MiB) == b"written-by-A"
    c.shutdown()
    # qemu-img reads the export too
    out = subprocess.run(["qemu-img", "info", "--output=json", exp.uri], capture_output=True, text=True)
    assert out.returncode == 0 and '"virtual-size": 67108864' in out.stdout
    assert hs.m.export_for(A).name == exp.name

    exp2 = hs.run(hs.m.prepare_boot(A, v2))  # next boot
    assert exp2.name != exp.name
    c = connect(exp2.uri)
    assert c.pread(12, 2 * MiB) == b"\0" * 12  # the write is gone
    assert c.pread(4, 0) == b"\xcd" * 4  # the snapshot content is there
    c.shutdown()
    with pytest.raises(nbd.Error):
        connect(exp.uri)  # the old boot's name leads nowhere
    hs.wait(lambda: len(hs.m.overlays.ephemeral_files()) == 1)
    assert (sha256(v1), sha256(v2)) == before


def test_hosts_are_isolated_and_names_are_tokens(harness, bases):
    v1, _ = bases
    hs = harness()
    ea = hs.run(hs.m.prepare_boot(A, v1))
    eb = hs.run(hs.m.prepare_boot(B, v1))
    assert ea.name != eb.name and len(ea.name) >= 20
    ca, cb = connect(ea.uri), connect(eb.uri)
    ca.pwrite(b"A" * 512, 0)
    ca.flush()
    assert cb.pread(512, 0) == b"\xab" * 512  # B does not see A's write
    ca.shutdown(), cb.shutdown()
    # names an attacker could derive from B's MAC or host data do not open anything
    for guess in (B, B.replace(":", ""), B.replace(":", "-"), "52540000000b", "b", "", "default"):
        with pytest.raises(nbd.Error):
            connect(hs.uri(guess))
    # the base snapshot is not exported under any name
    out = subprocess.run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{hs.port}"], capture_output=True, text=True)
    assert out.returncode == 0
    assert str(v1) not in out.stdout and v1.name not in out.stdout
    import json
    names = {e["export-name"] for e in json.loads(out.stdout)["exports"]}
    assert names == {ea.name, eb.name}


def test_nbdcopy_reads_whole_disk_and_content_matches_snapshot(harness, bases, tmp_path):
    v1, v2 = bases
    hs = harness()
    exp = hs.run(hs.m.prepare_boot(A, v2))
    raw = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", exp.uri, str(raw)], check=True)
    ref = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(v2), str(ref)], check=True)
    assert sha256(raw) == sha256(ref)


def test_persistent_host_keeps_its_write_and_reset_discards_it(harness, bases):
    v1, v2 = bases
    before = sha256(v1)
    hs = harness(persistent={A})
    exp = hs.run(hs.m.prepare_boot(A, v1))
    assert exp.persistent
    c = connect(exp.uri)
    c.pwrite(b"keep-me", 3 * MiB)
    c.flush()
    c.shutdown()
    exp2 = hs.run(hs.m.prepare_boot(A, v1))  # next boot: still there
    c = connect(exp2.uri)
    assert c.pread(7, 3 * MiB) == b"keep-me"
    c.shutdown()
    # a newer snapshot for the group does not reach a persistent layer until it is reset
    exp3 = hs.run(hs.m.prepare_boot(A, v2))
    assert exp3.snapshot_name == "v1.qcow2"
    listing = hs.run(hs.m.list())
    assert [e["persistent"] for e in listing] == [True]
    res = hs.run(hs.m.reset(A))
    assert res["layer_removed"]
    exp4 = hs.run(hs.m.prepare_boot(A, v2))
    c = connect(exp4.uri)
    assert c.pread(7, 3 * MiB) == b"\0" * 7 and c.pread(1, 0) == b"\xcd"
    c.shutdown()
    assert sha256(v1) == before


def test_prepare_export_adds_a_second_snapshot_in_the_same_boot(harness, bases):
    v1, v2 = bases
    hs = harness()
    e1 = hs.run(hs.m.prepare_boot(A, v1))
    e2 = hs.run(hs.m.prepare_export(A, v2))
    assert e2.name != e1.name and e2.boot == e1.boot
    assert hs.run(hs.m.prepare_export(A, v2)).name == e2.name  # idempotent
    assert hs.m.export_for(A).name == e1.name
    assert hs.m.export_for(A, str(v2)).name == e2.name
    with pytest.raises(DiskError):
        hs.run(hs.m.prepare_export(B, v2))  # no boot of B yet


class SlowBaseRemoval(StorageDaemon):
    """The real daemon, whose answer to removing a shared base node reaches bootd late (as on a loaded
    machine): the node is gone in the daemon while bootd still waits for the answer."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.base_removed = asyncio.Event()  # the daemon has removed a base node; its answer is held
        self.answer = asyncio.Event()  # the held answer may go now

    async def execute(self, cmd: str, args: Optional[dict[str, Any]] = None, timeout: float = 10) -> Any:
        result = await super().execute(cmd, args, timeout)
        if cmd == "blockdev-del" and args is not None and str(args["node-name"]).startswith("b"):
            self.base_removed.set()
            try:
                await asyncio.wait_for(self.answer.wait(), 5)
            except asyncio.TimeoutError:
                pass
        return result


def test_an_extra_export_of_a_new_boot_survives_the_last_boots_teardown(harness, bases):
    """A menu fetched twice in a row: the second boot's extra export over v2 is made while the first
    boot's teardown removes v2's base node; it must get a base node of its own, not the one going away."""
    v1, v2 = bases
    hs = harness(daemon=SlowBaseRemoval)
    qsd = hs.m.qsd
    assert isinstance(qsd, SlowBaseRemoval)
    hs.run(hs.m.prepare_boot(A, v1))
    hs.run(hs.m.prepare_export(A, v2))

    async def second_menu():
        main = await hs.m.prepare_boot(A, v1)  # the first boot's exports are torn down in the background
        await qsd.base_removed.wait()  # v2's base node is gone in the daemon, its answer not yet in
        extra = asyncio.ensure_future(hs.m.prepare_export(A, v2))
        await asyncio.wait({extra}, timeout=1)
        qsd.answer.set()
        return main, await extra

    main, extra = hs.run(second_menu())
    assert extra.boot == main.boot and extra.name != main.name
    c = connect(extra.uri)
    assert c.pread(4, 0) == b"\xcd" * 4
    c.shutdown()
    assert hs.m.export_for(A, str(v2)).name == extra.name


def test_bad_input_is_refused_clearly(harness, bases, tmp_path):
    hs = harness()
    with pytest.raises(DiskError, match="not a MAC"):
        hs.run(hs.m.prepare_boot("nonsense", bases[0]))
    with pytest.raises(DiskError, match="no such snapshot"):
        hs.run(hs.m.prepare_boot(A, tmp_path / "missing.qcow2"))
    with pytest.raises(DiskError, match="no snapshot to boot"):
        hs.run(hs.m.prepare_boot(A))
    assert hs.m.export_for(A) is None
    # and the manager still works
    assert hs.run(hs.m.prepare_boot(A, bases[0])).size == 64 * MiB


def test_nbd_listens_on_the_served_addresses_only(harness, bases):
    """Two served addresses (qemu has one listener: bound to all, with a filter on the destination)."""
    hs = harness(listen=["127.0.0.2", "127.0.0.3"])
    exp = hs.run(hs.m.prepare_boot(A, bases[0], server_ip="127.0.0.3"))
    assert exp.host == "127.0.0.3"
    for host in ("127.0.0.2", "127.0.0.3"):
        c = connect(f"nbd://{host}:{hs.port}/{exp.name}")
        assert c.pread(1, 0) == b"\xab"
        c.shutdown()
    r = subprocess.run(["timeout", "2", "nbdinfo", "--size", f"nbd://127.0.0.1:{hs.port}/{exp.name}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and not r.stdout.strip()
    # a host whose menu came over an address NBD does not serve gets the first served one
    assert hs.run(hs.m.prepare_boot(B, bases[0], server_ip="10.9.9.9")).host == "127.0.0.2"


def test_fifty_hosts_booting_at_once_all_get_their_own_disk(harness, bases):
    import asyncio
    v1, v2 = bases
    hs = harness()
    macs = [f"52:54:00:10:00:{i:02x}" for i in range(50)]

    async def boot_all():
        return await asyncio.gather(*(hs.m.prepare_boot(m, v1 if i % 2 else v2) for i, m in enumerate(macs)))

    exps = hs.run(boot_all())
    assert len({e.name for e in exps}) == 50
    for i in (0, 1, 48, 49):
        c = connect(exps[i].uri)
        assert c.pread(1, 0) == (b"\xab" if i % 2 else b"\xcd")
        c.shutdown()
    again = hs.run(boot_all())  # and all of them reboot at once
    assert not {e.name for e in again} & {e.name for e in exps}
    hs.wait(lambda: len(hs.m.overlays.ephemeral_files()) == 50)
