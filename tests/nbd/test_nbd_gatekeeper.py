"""The NBD gatekeeper (nbdexport/gatekeeper.py) in front of qemu-storage-daemon, with the real daemon in a
lab network and clients in their own namespaces: a host lists and opens only its own export, its own
export works at full correctness on both data paths (handed into the daemon, nbdexport/handoff.c, the
default; or through the C splicer, nbd.handoff: false), malformed handshakes close only their own
connection, and a killed splicer is restarted. Without any C helper (noexec run directory) the gatekeeper
relays in Python and never exposes the daemon; under nbd.tls it terminates TLS and keeps the same policy;
one address cannot take every handshake slot."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from nbdtest import make_base, sha256

pytestmark = pytest.mark.netns

SERVER = "10.77.0.1"

OPEN = textwrap.dedent("""
    import sys, nbd
    mode, uri = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    if mode == "oldstyle":  # no fixed-newstyle: libnbd sends NBD_OPT_EXPORT_NAME straight away
        h.set_handshake_flags(0)  # ... and the reply carries the 124 zero bytes
    if mode == "oldstyle-nz":
        h.set_handshake_flags(nbd.HANDSHAKE_FLAG_NO_ZEROES)
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        print("REFUSED", e); sys.exit(0)
    print("OPEN", h.get_size())
    if mode == "write":
        h.pwrite(sys.argv[3].encode(), 1 << 20); h.flush()
    print("READ", h.pread(32, 1 << 20).decode(errors="replace").rstrip("\\x00"))
""")

RAW = textwrap.dedent("""
    import socket, struct, sys
    IHAVEOPT = 0x49484156454F5054
    def session(host, port, header, payload=b""):
        s = socket.create_connection((host, port), timeout=10)
        g = b""
        while len(g) < 18:
            g += s.recv(18 - len(g))
        assert g[:8] == b"NBDMAGIC", g
        s.sendall(struct.pack(">I", 3) + header + payload)
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    return "CLOSED"
        except socket.timeout:
            return "OPEN"
        except ConnectionResetError:
            return "CLOSED"
    host, port = sys.argv[1], int(sys.argv[2])
    # option data far over the cap: closed without reading it all
    print(session(host, port, struct.pack(">QII", IHAVEOPT, 7, 1 << 24), b"x" * 65536))
    # wrong option magic
    print(session(host, port, struct.pack(">QII", 0x1234, 7, 0)))
    # a GO whose name length points past its data: NBD_REP_ERR_INVALID, then the client hangs up
    s = socket.create_connection((host, port), timeout=10)
    s.recv(18)
    data = struct.pack(">I", 4000) + b"abc"
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    r = b""
    while len(r) < 20:
        r += s.recv(20 - len(r))
    print("REPLY", hex(struct.unpack(">QIII", r)[2]))
    s.close()
""")


def bootctl_json(d, *args):
    r = d.bootctl("--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def py(client, script, *args, **kw):
    return client.ns.run([sys.executable, "-c", script, *map(str, args)], **kw)


def two_hosts(a, b, handoff: bool = True):
    """A lab config with clients `a` and `b` as hosts pc-a and pc-b; NBD only."""
    return {"interfaces": [{"name": "br0", "address": f"{SERVER}/24"}],
            "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "nbd": {"handoff": handoff},
            "hosts": [{"mac": a.mac, "name": "pc-a", "ip": "10.77.0.10"},
                      {"mac": b.mac, "name": "pc-b", "ip": "10.77.0.11"}]}


PATHS = pytest.mark.parametrize("handoff", [True, False], ids=["handoff", "splicer"])


def assert_data_path(lab, d, handoff: bool, client_ip: str) -> None:
    """Who carries the client's live TCP connection on the server: the storage daemon itself (hand-off)
    or the splicer; and the gatekeeper's counts agree."""
    ss = lab.server.run(["ss", "-Htnp", "state", "established", "sport = :10809"]).stdout
    mine = [line for line in ss.splitlines() if client_ip in line]
    assert mine, ss
    owner = "qemu-storage" if handoff else "nbd-splicer"
    assert all(owner in line for line in mine), ss
    g = disk_status(d)["gatekeeper"]
    assert (g["handed_off"] > 0, g["spliced"] > 0) == (handoff, not handoff), g


def disk_status(d):
    status = bootctl_json(d, "status")
    return [s for s in status["services"] if s["name"] == "disks"][0]


@PATHS
def test_hosts_list_and_open_only_their_own_export(lab, bootd_daemon, tmp_path, handoff):
    base = make_base(tmp_path / "base.qcow2", size_mb=32, pattern=0xAB)
    base.chmod(0o444)
    before = sha256(base)
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True)
    want = sha256(raw)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    stranger = lab.add_client("10.77.0.12")  # no host entry, no export
    d = bootd_daemon(two_hosts(a, b, handoff), ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    eb = bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))

    # the TCP port is bootd's; the storage daemon listens on a private unix socket only
    ss = lab.server.run(["ss", "-Hltnp", "sport = :10809"]).stdout
    assert f"{SERVER}:10809" in ss and "qemu-storage" not in ss and "0.0.0.0:10809" not in ss
    disks = disk_status(d)
    sock = disks["qsd"]["listen"]
    assert sock.endswith("/nbd.sock") and oct(os.stat(sock).st_mode & 0o777) == "0o600"
    assert disks["gatekeeper"]["splicer"]["up"]

    # NBD_OPT_LIST: A sees its own export only, the stranger sees none
    listing = a.ns.run(["nbdinfo", "--list", "--json", f"nbd://{SERVER}:10809"]).stdout
    names = [e["export-name"] for e in json.loads(listing)["exports"]]
    assert names == [ea["name"]]
    assert eb["name"] not in listing
    r = stranger.ns.run(["nbdinfo", "--list", "--json", f"nbd://{SERVER}:10809"], check=False)
    assert ea["name"] not in r.stdout and eb["name"] not in r.stdout
    if r.returncode == 0:
        assert json.loads(r.stdout)["exports"] == []

    # A with B's exact export name (taken from the API): refused, by NBD_OPT_GO and by NBD_OPT_EXPORT_NAME
    for mode in ("read", "oldstyle", "oldstyle-nz"):
        assert py(a, OPEN, mode, eb["uri"]).stdout.startswith("REFUSED")
    r = a.ns.run(["qemu-img", "info", "--output=json", eb["uri"]], check=False)
    assert r.returncode != 0
    assert py(stranger, OPEN, "read", ea["uri"]).stdout.startswith("REFUSED")
    metrics = bootctl_json(d, "metrics")
    assert metrics["nbd"]["refused{reason=not-the-host}"] >= 5

    # A's own export at full correctness on this data path: whole content, write, reconnect, read back
    out = tmp_path / "a-copy.raw"
    a.ns.run(["nbdcopy", ea["uri"], str(out)])
    assert sha256(out) == want
    r = py(a, OPEN, "write", ea["uri"], "written-by-pc-a")
    assert r.stdout.splitlines() == [f"OPEN {32 << 20}", "READ written-by-pc-a"]
    for mode in ("read", "oldstyle", "oldstyle-nz"):  # reconnects, by GO and by EXPORT_NAME (with/without zeroes)
        assert py(a, OPEN, mode, ea["uri"]).stdout.splitlines()[-1] == "READ written-by-pc-a"
    assert a.ns.run(["qemu-img", "info", "--output=json", ea["uri"]]).returncode == 0
    # B's disk is untouched by A's write
    r = b.ns.run([sys.executable, "-c", "import sys,nbd; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
                  "print(bytes(h.pread(16, 1 << 20)).hex())", eb["uri"]])
    assert r.stdout.strip() == "00" * 16  # the snapshot has zeros past its first MiB

    # malformed / oversized option data close only that connection; the daemon and A go on
    r = py(a, RAW, SERVER, 10809)
    assert r.stdout.splitlines() == ["CLOSED", "CLOSED", f"REPLY {hex((1 << 31) | 3)}"]
    assert py(a, OPEN, "read", ea["uri"]).stdout.splitlines()[-1] == "READ written-by-pc-a"
    assert bootctl_json(d, "disk", "list")["disks"]
    metrics = bootctl_json(d, "metrics")["nbd"]
    assert metrics.get("gatekeeper_bad{reason=oversized}") == 1 and metrics.get("gatekeeper_bad{reason=magic}") == 1

    # a killed splicer is restarted; new connections work again
    pid = disk_status(d)["gatekeeper"]["splicer"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        g = disk_status(d)["gatekeeper"]["splicer"]
        if g["up"] and g["pid"] != pid:
            break
        assert time.monotonic() < deadline, g
        time.sleep(0.1)
    assert g["restarts"] == 1
    assert py(a, OPEN, "read", ea["uri"]).stdout.splitlines()[-1] == "READ written-by-pc-a"

    assert d.stop() == 0
    left = [p for p in lab.server.pids()
            if any(x in open(f"/proc/{p}/cmdline").read() for x in ("qemu-storage", "nbd-splicer"))]
    assert not left
    assert sha256(base) == before


def test_gatekeeper_off_keeps_the_direct_path(lab, bootd_daemon, tmp_path):
    """`nbd.gatekeeper: false` keeps the storage daemon on TCP itself (and says so: no access control)."""
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    cfg = {"interfaces": [{"name": "br0", "address": f"{SERVER}/24"}],
           "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "nbd": {"gatekeeper": False},
           "hosts": [{"mac": a.mac, "name": "pc-a", "ip": "10.77.0.10"}]}
    d = bootd_daemon(cfg, ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    ss = lab.server.run(["ss", "-Hltnp", "sport = :10809"]).stdout
    assert "qemu-storage" in ss
    assert disk_status(d)["gatekeeper"] is None
    assert py(a, OPEN, "read", ea["uri"]).stdout.startswith("OPEN")


NOEXEC = 'mount -t tmpfs -o noexec,nosuid,nodev,mode=0700 bootd-noexec "$0" && exec "$@"'


def test_without_c_helpers_the_gatekeeper_relays_and_stays_closed(lab, bootd_daemon, tmp_path):
    """The C helpers cannot run (run directory on a noexec tmpfs in bootd's own mount namespace, as
    hardened hosts have): the storage daemon must still never listen on TCP; the gatekeeper relays the
    data in Python, strangers still list and open nothing, the owner reads and writes its disk correctly,
    and `bootctl status` and the unit's STATUS= say so."""
    base = make_base(tmp_path / "base.qcow2", size_mb=32, pattern=0xAB)
    base.chmod(0o444)
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    stranger = lab.add_client("10.77.0.12")
    run_dir = tmp_path / "noexec-run"
    run_dir.mkdir()
    cfg = two_hosts(a, b)
    cfg["nbd"]["run_dir"] = str(run_dir)
    d = bootd_daemon(cfg, ns=lab.server, start=False)
    d.wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", NOEXEC, str(run_dir)]
    d.start()
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    eb = bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))

    ss = lab.server.run(["ss", "-Hltnp", "sport = :10809"]).stdout
    assert f"{SERVER}:10809" in ss and "qemu-storage" not in ss, ss
    disks = disk_status(d)
    assert disks["data_path"] == "python-relay", disks
    assert "no NBD splicer" in disks["data_path_reason"] and "hand-off" in disks["data_path_reason"], disks
    assert "noexec" in disks["data_path_reason"], disks
    assert disks["qsd"]["listen"].endswith("/nbd.sock")
    status = bootctl_json(d, "status")
    assert any("python-relay" in w for w in status["warnings"]), status["warnings"]
    assert "WARNING disks: NBD data path python-relay" in d.bootctl("status").stdout
    assert any("WARNING" in f and "python-relay" in f for f in d.notify.fields("STATUS=")), d.notify.fields("STATUS=")

    # strangers and the other host: nothing listed, nothing opened
    r = stranger.ns.run(["nbdinfo", "--list", "--json", f"nbd://{SERVER}:10809"], check=False)
    assert ea["name"] not in r.stdout and eb["name"] not in r.stdout
    listing = a.ns.run(["nbdinfo", "--list", "--json", f"nbd://{SERVER}:10809"]).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == [ea["name"]]
    assert py(stranger, OPEN, "read", ea["uri"]).stdout.startswith("REFUSED")
    for mode in ("read", "oldstyle"):
        assert py(a, OPEN, mode, eb["uri"]).stdout.startswith("REFUSED")

    # the owner through the relay: whole content, a write read back after reconnects (GO and EXPORT_NAME)
    out = tmp_path / "a-copy.raw"
    a.ns.run(["nbdcopy", ea["uri"], str(out)])
    assert sha256(out) == sha256(raw)
    r = py(a, OPEN, "write", ea["uri"], "relayed-by-python")
    assert r.stdout.splitlines() == [f"OPEN {32 << 20}", "READ relayed-by-python"]
    for mode in ("read", "oldstyle", "oldstyle-nz"):
        assert py(a, OPEN, mode, ea["uri"]).stdout.splitlines()[-1] == "READ relayed-by-python"
    g = disk_status(d)["gatekeeper"]
    assert g["relayed"] >= 5 and g["handed_off"] == 0 and g["spliced"] == 0, g
    row = [x for x in bootctl_json(d, "disk", "list")["disks"] if x["host"] == "pc-a"][0]
    # counted from the request headers: nbdcopy reads only the allocated first MiB (block status)
    assert row["read_bytes"] >= 1 << 20 and row["written_bytes"] == len("relayed-by-python"), row
    assert d.stop() == 0
    left = [p for p in lab.server.pids() if "qemu-storage" in open(f"/proc/{p}/cmdline").read()]
    assert not left


HOLD = textwrap.dedent("""
    import resource, socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    held, closed = [], 0
    for s in socks:  # the admitted ones get the greeting, the others are closed at once
        try:
            g = s.recv(18)
        except (ConnectionResetError, socket.timeout):
            g = b""
        if g.startswith(b"NBDMAGIC"):
            held.append(s)
        else:
            closed += 1
    print("HOLDING", len(held), closed, flush=True)
    sys.stdin.readline()  # hold the handshakes open until told
    for s in held:  # the server ends idle handshakes by itself (nbd.handshake_timeout)
        s.settimeout(60)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    print("ENDED", len(held), flush=True)
""")


def test_one_address_cannot_take_every_handshake_slot(lab, bootd_daemon, tmp_path):
    """A stranger opening more connections than the global handshake cap and leaving them idle gets
    nbd.handshakes_per_address of them; the rest are closed and counted, and a real host still gets its
    disk meanwhile. The idle ones end after nbd.handshake_timeout."""
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    stranger = lab.add_client("10.77.0.12")
    d = bootd_daemon(two_hosts(a, b), ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    p = stranger.ns.popen([sys.executable, "-c", HOLD, SERVER, "10809", "600"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().split() == ["HOLDING", "8", "592"]
        g = disk_status(d)["gatekeeper"]
        assert (g["handshakes"], g["handshakes_per_address"], g["handshake_timeout"]) == (8, 8, 10), g
        r = py(a, OPEN, "read", ea["uri"])  # while the stranger holds its handshakes
        assert r.stdout.splitlines()[0] == f"OPEN {16 << 20}", r.stdout
        assert a.ns.run(["nbdinfo", "--size", ea["uri"]]).stdout.strip() == str(16 << 20)
        metrics = bootctl_json(d, "metrics")["nbd"]
        assert metrics["gatekeeper_bad{reason=handshakes-per-address}"] == 592, metrics
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["ENDED", "8"]
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
    metrics = bootctl_json(d, "metrics")["nbd"]
    assert metrics["gatekeeper_bad{reason=timeout}"] == 8, metrics
    assert disk_status(d)["gatekeeper"]["handshakes"] == 0
    assert d.stop() == 0


IO = textwrap.dedent("""
    import sys, nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    for i in range(3):
        h.pread(65536, i << 20)
    h.pwrite(b"w" * 4096, 0); h.pwrite(b"x" * 4096, 8192); h.pwrite(b"y" * (1 << 20), 4 << 20)
    h.flush()
    print("DONE", flush=True)
    if len(sys.argv) > 2:  # hold the connection open: a read per empty line, until "q"
        for line in sys.stdin:
            if line.strip() == "q":
                break
            h.pread(512, 0)
            print("AGAIN", flush=True)
""")


@PATHS
def test_per_export_io_counts(lab, bootd_daemon, tmp_path, handoff):
    """Bytes and requests read and written are counted per export (by the hand-off library in the
    daemon or by the splicer, since qemu 7.2's query-blockstats counts nothing for NBD exports): exact,
    kept when the connection ends and when the splicer dies, shown by `disk list` and /metrics, and a
    new boot starts from zero. A handed-off connection does not go through the splicer at all: it lives
    on when the splicer is killed."""
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    d = bootd_daemon(two_hosts(a, b, handoff), ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))  # B has a disk and does nothing with it

    def row(host):
        return [x for x in bootctl_json(d, "disk", "list")["disks"] if x["host"] == host][0]

    assert py(a, IO, ea["uri"]).stdout.strip() == "DONE"
    want = {"read_bytes": 3 * 65536, "written_bytes": 2 * 4096 + (1 << 20), "read_requests": 3,
            "write_requests": 3, "connections": 0}
    deadline = time.monotonic() + 10
    while {k: row("pc-a")[k] for k in want} != want:  # the end of the connection reaches bootd just after
        assert time.monotonic() < deadline, row("pc-a")
        time.sleep(0.05)
    assert row("pc-a")["connected"] is False
    assert "192.0 KiB / 1.0 MiB" in d.bootctl("disk", "list").stdout
    assert {k: row("pc-b")[k] for k in want} == dict.fromkeys(want, 0)  # B did nothing

    # a live connection counts as it goes and shows as connected; a killed splicer loses no count
    p = a.ns.popen([sys.executable, "-c", IO, ea["uri"], "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   text=True)
    try:
        assert p.stdout.readline().strip() == "DONE"
        r = row("pc-a")
        assert r["connected"] is True and r["connections"] == 1
        assert r["read_bytes"] == 2 * want["read_bytes"] and r["written_bytes"] == 2 * want["written_bytes"]
        assert_data_path(lab, d, handoff, "10.77.0.10")
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "AGAIN"
        prom = d.api.get("/metrics", raw=True).decode()
        line = f'bootd_nbd_export_read_bytes{{host="pc-a",mac="{a.mac}",disk="main"}} {2 * 3 * 65536 + 512}'
        assert line in prom, [x for x in prom.splitlines() if "export_read" in x]
        os.kill(disk_status(d)["gatekeeper"]["splicer"]["pid"], signal.SIGKILL)
        if handoff:  # the connection is the daemon's own: the splicer's death does not touch it
            time.sleep(0.2)
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "AGAIN"
            assert row("pc-a")["read_bytes"] == 2 * 3 * 65536 + 2 * 512
        p.stdin.write("q\n")
        p.stdin.flush()
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while not disk_status(d)["gatekeeper"]["splicer"]["up"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = row("pc-a")
    assert (r["read_bytes"], r["read_requests"], r["connections"]) == (
        (2 * 3 * 65536 + 2 * 512, 8, 0) if handoff else (2 * 3 * 65536 + 512, 7, 0))

    # the next boot is a new disk: its counts start from zero
    ea2 = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    assert ea2["name"] != ea["name"]
    assert {k: row("pc-a")[k] for k in want} == dict.fromkeys(want, 0)
    assert d.stop() == 0


def test_handoff_follows_the_daemon_bootd_adopts(tmp_path):
    """A bootd restarted against a running storage daemon hands connections into it only if that daemon
    has the library loaded; a daemon started without it (nbd.handoff: false, an older bootd) gets the
    splicer. Connections handed off before the restart live on in the daemon."""
    import asyncio

    import nbd

    base = make_base(tmp_path / "b.qcow2", size_mb=16)
    mac = "52:54:00:00:00:0a"

    def open_and_read(h, uri):
        def client():
            c = nbd.NBD()
            c.connect_uri(uri)
            assert c.pread(4, 0) == b"\xab" * 4
            return c
        return h.run(asyncio.to_thread(client))

    def everyone_may_open(h):  # the policy is not what this test is about: loopback client, no host table
        h.m.access.may_open = lambda ip, name: True

    daemons: list[int] = []  # every storage daemon this test starts: killed at the end whatever fails
    try:
        _adoption_rounds(tmp_path, base, mac, open_and_read, everyone_may_open, daemons)
    finally:
        for pid in daemons:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _adoption_rounds(tmp_path, base, mac, open_and_read, everyone_may_open, daemons) -> None:
    import asyncio

    from nbdtest import Harness

    plain = Harness(tmp_path, gatekeeper=True, handoff=False).start()
    daemons.append(plain.m.qsd.pid)
    everyone_may_open(plain)
    e = plain.run(plain.m.prepare_boot(mac, base))
    c1 = open_and_read(plain, plain.uri(e.name))
    assert plain.m.status()["gatekeeper"]["spliced"] == 1
    plain.run(asyncio.to_thread(c1.shutdown))
    pid = plain.m.qsd.pid
    daemons.append(pid)
    plain.abandon()
    h = Harness(tmp_path, gatekeeper=True, port=plain.port).start()  # handoff on, daemon without the library
    try:
        everyone_may_open(h)
        assert h.m.qsd.adopted and h.m.qsd.pid == pid
        assert not h.m.handoff.ready(pid)
        c2 = open_and_read(h, h.uri(e.name))
        g = h.m.status()["gatekeeper"]
        assert (g["spliced"], g["handed_off"]) == (1, 0)
        h.run(asyncio.to_thread(c2.shutdown))
    finally:
        h.stop()
        plain.stop()

    # a daemon started with the library: connections handed off, and one survives a bootd restart
    first = Harness(tmp_path / "2", gatekeeper=True).start()
    everyone_may_open(first)
    daemons.append(first.m.qsd.pid)
    e = first.run(first.m.prepare_boot(mac, base))
    c3 = open_and_read(first, first.uri(e.name))
    assert first.m.status()["gatekeeper"]["handed_off"] == 1
    first.abandon()
    again = Harness(tmp_path / "2", gatekeeper=True, port=first.port).start()
    try:
        everyone_may_open(again)
        assert again.m.qsd.adopted and again.m.handoff.ready(again.m.qsd.pid)
        assert again.run(asyncio.to_thread(c3.pread, 4, 0)) == b"\xab" * 4  # the old connection goes on
        assert again.m.export_io(e.name)["connections"] == 1  # found by its slot's name after the restart
        c4 = open_and_read(again, again.uri(e.name))
        assert again.m.status()["gatekeeper"]["handed_off"] == 1
        for c in (c3, c4):
            again.run(asyncio.to_thread(c.shutdown))
    finally:
        again.stop()
        first.stop()



def test_handoff_reads_a_control_message_that_comes_after_its_connection(tmp_path):
    """bootd connects to the daemon's handoff.sock, then sends. If the daemon accepts the connection in
    between (another hand-off's generation, any read), the connection must wait for its message, not be
    closed (that hand-off would fail: seen as EPIPE under load in the benchmark)."""
    import asyncio
    import socket

    import nbd
    from nbdtest import Harness

    base = make_base(tmp_path / "b.qcow2", size_mb=16)
    h = Harness(tmp_path, gatekeeper=True).start()
    try:
        h.m.access.may_open = lambda ip, name: True
        e = h.run(h.m.prepare_boot("52:54:00:00:00:0a", base))

        def client():
            c = nbd.NBD()
            c.connect_uri(h.uri(e.name))
            return c
        c = h.run(asyncio.to_thread(client))
        assert h.m.status()["gatekeeper"]["handed_off"] == 1
        early = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        early.connect(str(h.run_dir / "handoff.sock"))
        gen = h.m.handoff._gen
        struct.pack_into("=Q", gen, 0, struct.unpack_from("=Q", gen, 0)[0] + 1)
        assert h.run(asyncio.to_thread(c.pread, 4, 0)) == b"\xab" * 4  # the daemon reads: takes handoff.sock
        time.sleep(0.1)
        a, b = socket.socketpair()
        # the daemon has accepted `early`; it must still be open for the message that follows
        socket.send_fds(early, [struct.pack("=QII", 12345, 0xFFFFFFFF, 0)], [a.fileno()])
        for s in (early, a, b):
            s.close()
        # and the next real hand-off still works
        c2 = h.run(asyncio.to_thread(client))
        assert h.run(asyncio.to_thread(c2.pread, 4, 0)) == b"\xab" * 4
        assert h.m.status()["gatekeeper"]["handed_off"] == 2
        for x in (c, c2):
            h.run(asyncio.to_thread(x.shutdown))
    finally:
        h.stop()


TLS_OPEN = textwrap.dedent("""
    import json, sys, nbd
    action, uri, psk = sys.argv[1], sys.argv[2], sys.argv[3]
    h = nbd.NBD()
    if psk != "-":
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(psk)
        h.set_tls_username("lab")
    try:
        if action == "list":
            h.set_opt_mode(True)
            h.connect_uri(uri)
            names = []
            h.opt_list(lambda name, desc: names.append(name) or 0)
            print(json.dumps(names)); sys.exit(0)
        h.connect_uri(uri)
    except nbd.Error as e:
        print("REFUSED", e); sys.exit(0)
    if action == "write":
        h.pwrite(sys.argv[4].encode(), 1 << 20); h.flush()
    print("READ", h.pread(4, 0).hex(), h.pread(32, 1 << 20).decode(errors="replace").rstrip("\\x00"))
""")


def test_tls_keeps_per_host_isolation(lab, bootd_daemon, tmp_path):
    """nbd.tls with one lab PSK: the gatekeeper terminates TLS itself, so a client holding the lab key
    still lists only its own exports and cannot open another host's; without the key (or with a wrong
    one) nothing; the storage daemon is not on TCP."""
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    stranger = lab.add_client("10.77.0.12")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    keys = tls_dir / "keys.psk"
    keys.write_text(f"lab:{os.urandom(32).hex()}\n")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"lab:{os.urandom(32).hex()}\n")
    cfg = two_hosts(a, b)
    cfg["nbd"]["tls"] = {"mode": "psk", "dir": str(tls_dir)}
    d = bootd_daemon(cfg, ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    eb = bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))
    assert ea["uri"].startswith("nbds://")
    ss = lab.server.run(["ss", "-Hltnp", "sport = :10809"]).stdout
    assert f"{SERVER}:10809" in ss and "qemu-storage" not in ss, ss
    disks = disk_status(d)
    assert disks["data_path"] == "python-relay" and disks["gatekeeper"]["tls"], disks

    root = f"nbds://{SERVER}:10809/"
    assert json.loads(py(a, TLS_OPEN, "list", root, keys).stdout) == [ea["name"]]
    assert json.loads(py(b, TLS_OPEN, "list", root, keys).stdout) == [eb["name"]]
    assert json.loads(py(stranger, TLS_OPEN, "list", root, keys).stdout) == []
    assert py(stranger, TLS_OPEN, "read", ea["uri"], keys).stdout.startswith("REFUSED")
    assert py(a, TLS_OPEN, "read", eb["uri"], keys).stdout.startswith("REFUSED")
    assert py(a, TLS_OPEN, "read", ea["uri"], wrong).stdout.startswith("REFUSED")
    assert py(a, TLS_OPEN, "read", f"nbd://{SERVER}:10809/{ea['name']}", "-").stdout.startswith("REFUSED")
    assert bootctl_json(d, "metrics")["nbd"]["refused{reason=not-the-host}"] >= 2

    r = py(a, TLS_OPEN, "write", ea["uri"], keys, "over-tls")
    assert r.stdout.split() == ["READ", "abababab", "over-tls"], r.stdout + r.stderr
    assert py(a, TLS_OPEN, "read", ea["uri"], keys).stdout.split() == ["READ", "abababab", "over-tls"]
    out = tmp_path / "copy.raw"
    r = a.ns.run(["nbdcopy", f"nbds://lab@{SERVER}:10809/{ea['name']}?tls-psk-file={keys}", str(out)], check=False)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == 16 << 20 and out.read_bytes()[:4] == b"\xab" * 4
    assert d.stop() == 0


def test_x509_tls_through_the_gatekeeper(lab, bootd_daemon, tmp_path):
    """nbd.tls x509: the gatekeeper verifies client certificates itself (CA from the same directory as
    qemu's) and keeps per-host isolation: a client with a valid certificate still lists and opens only its
    own export; without a certificate nothing."""
    def openssl(*args, cwd):
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)

    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    srv, cli, ca = tmp_path / "srv", tmp_path / "cli", tmp_path / "ca"
    for x in (srv, cli, ca):
        x.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lab-ca",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=ca)
    for x, kind, ext in ((srv, "server", f"subjectAltName=IP:{SERVER}\nextendedKeyUsage=serverAuth"),
                         (cli, "client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={kind}", "-keyout", f"{kind}-key.pem",
                "-out", "req.csr", cwd=x)
        (x / "ext.cnf").write_text(ext + "\n")
        openssl("x509", "-req", "-in", "req.csr", "-CA", str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
                "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", f"{kind}-cert.pem", cwd=x)
        (x / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    cfg = two_hosts(a, b)
    cfg["nbd"]["tls"] = {"mode": "x509", "dir": str(srv)}
    d = bootd_daemon(cfg, ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    eb = bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))
    script = textwrap.dedent("""
        import json, sys, nbd
        uri, certs = sys.argv[1], sys.argv[2]
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        if certs != "-":
            h.set_tls_certificates(certs)
        else:
            h.set_tls_verify_peer(False)
        h.set_opt_mode(True)
        try:
            h.connect_uri(uri)
            names = []
            h.opt_list(lambda name, desc: names.append(name) or 0)
            print("LIST", json.dumps(names))
            h.set_export_name(uri.rsplit("/", 1)[1])
            h.opt_go()
        except nbd.Error as e:
            print("REFUSED", e); sys.exit(0)
        print("READ", h.pread(4, 0).hex())
    """)
    out = py(a, script, ea["uri"], cli).stdout.splitlines()
    assert out == [f'LIST {json.dumps([ea["name"]])}', "READ abababab"], out
    out = py(a, script, eb["uri"], cli).stdout.splitlines()
    assert out[0] == f'LIST {json.dumps([ea["name"]])}' and out[1].startswith("REFUSED"), out
    assert py(a, script, ea["uri"], "-").stdout.startswith("REFUSED")  # no client certificate
    assert d.stop() == 0


def test_handoff_only_with_a_tested_storage_daemon(lab, bootd_daemon, tmp_path):
    """A qemu-storage-daemon of a version the hand-off library was not tested with gets the splicer, and
    `bootctl status` says which data path is in use and why; the host's disk works through it."""
    real = subprocess.run(["sh", "-c", "command -v qemu-storage-daemon"], capture_output=True,
                          text=True, check=True).stdout.strip()
    wrapper = tmp_path / "qemu-storage-daemon"  # the real daemon, claiming to be a release bootd never saw
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "qemu-storage-daemon version 99.1.0"; '
                       f'exit 0; }}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    base = make_base(tmp_path / "base.qcow2", size_mb=16, pattern=0xAB)
    a, b = lab.add_client("10.77.0.10"), lab.add_client("10.77.0.11")
    cfg = two_hosts(a, b)
    cfg["nbd"]["qsd_binary"] = str(wrapper)
    d = bootd_daemon(cfg, ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    g = disk_status(d)["gatekeeper"]
    assert g["data_path"] == "splicer", g
    assert "tested with qemu-storage-daemon 7.2 only" in g["data_path_reason"], g
    assert "99.1.0" in g["data_path_reason"], g
    text = d.bootctl("status").stdout
    assert "splicer" in text and "99.1.0" in text, text
    assert py(a, OPEN, "read", ea["uri"]).stdout.startswith("OPEN")
    g = disk_status(d)["gatekeeper"]
    assert (g["handed_off"], g["spliced"]) == (0, 1), g
