"""Real TFTP clients (curl, atftp, tftp-hpa's tftp, tftpy) against bootd's TFTP server in a private lab.

The server (`python -m bootd.tftp`, the same TftpServer the daemon runs) listens on 10.77.0.1 in the
lab's server namespace; clients run in a client namespace behind a veth pair and a bridge. Port 69
runs the default data path (the C pump, bootd/tftp/pump.c), port 1069 a second server with
`--data-pump python`: the key transfers run against both, and each test checks which path served it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import Lab
from support import state_rows

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
UDP_TOOL = str(Path(__file__).with_name("udp_tool.py"))
S = "10.77.0.1"
PY = sys.executable
SIZES = {"empty": 0, "one": 1, "b511": 511, "b512": 512, "b513": 513, "f1m": (1 << 20) + 123}
PORTS = {"c": 69, "python": 1069}
PUMPS = list(PORTS)


class TftpRunner:
    """`python -m bootd.tftp` in a namespace, with its state DB and status file."""

    def __init__(self, ns, root: Path, work: Path, *extra: str, pump: str = "c"):
        self.ns = ns
        self.pump = pump
        work = work / f"server-{pump}"
        work.mkdir(exist_ok=True)
        self.state = work / "state.db"
        self.status_path = work / "status.json"
        argv = [PY, "-m", "bootd.tftp", "--root", str(root), "--listen", f"{S}:{PORTS[pump]}", "--state",
                str(self.state), "--status", str(self.status_path), "--data-pump", pump, *extra]
        # its own SQLite file whatever the suite's backend: the server outlives the tests' databases
        env = {k: v for k, v in os.environ.items() if k != "BOOTD_STATE_URL"}
        self.proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=open(work / "tftp.log", "ab"), cwd=str(ROOT),
                             text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"tftp server did not start: {line!r} {(work / 'tftp.log').read_text()}")

    def status(self) -> dict:
        before = self.status_path.stat().st_mtime_ns if self.status_path.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR1)
        for _ in range(200):
            if self.status_path.exists() and self.status_path.stat().st_mtime_ns != before:
                return json.loads(self.status_path.read_text())
            time.sleep(0.01)
        raise AssertionError("no status from the tftp server")

    def pumped(self) -> int:
        """Transfers the C pump has served so far (checks this server runs the path it should)."""
        st = self.status()["status"]["data_pump"]
        assert st["mode"] == self.pump and st["active"] == self.pump, st
        return st["sessions"]

    def mark(self) -> int:
        """The newest event id now: pass it to last_event to wait for an event of a later fetch."""
        return state_rows(self.state, "SELECT COALESCE(MAX(id), 0) FROM boot_events", sqlite_file=True)[0][0]

    def last_event(self, path: str, after: int = 0, timeout: float = 5.0) -> dict:
        """The newest boot event for `path` newer than `after` (an event is recorded when the final
        ACK arrives, which can be after the client exits: poll a little)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = state_rows(self.state, "SELECT mac, kind, detail, nbytes, duration, id FROM boot_events "
                                          "WHERE id > ? ORDER BY id DESC LIMIT 50", (after,), sqlite_file=True)
            for mac, kind, detail, nbytes, duration, ident in rows:
                d = json.loads(detail)
                if d["path"] == path:
                    return {"mac": mac, "kind": kind, "nbytes": nbytes, "duration": duration, "id": ident, **d}
            if time.monotonic() > deadline:
                raise AssertionError(f"no boot event for {path}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def make_root(base: Path) -> Path:
    root = base / "root"
    outside = base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for name, size in SIZES.items():
        (root / name).write_bytes(os.urandom(size))
    (root / "f256k").write_bytes(os.urandom(256 * 1024 + 7))
    (root / "sub" / "kernel").write_bytes(os.urandom(4096))
    (outside / "secret").write_bytes(b"SECRET\n")
    os.symlink("/etc/passwd", root / "escape")
    os.symlink("../outside/secret", root / "escape-rel")
    os.symlink("/etc", root / "dirlink")
    os.symlink("sub/kernel", root / "alias")
    os.chmod(base, 0o755)
    return root


def set_mtu(lab: Lab, client, mtu: int) -> None:
    out = lab.server.run(["ip", "-o", "link", "show", "master", lab.bridge]).stdout
    for line in out.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        lab.server.run(["ip", "link", "set", dev, "mtu", str(mtu)])
    lab.server.run(["ip", "link", "set", lab.bridge, "mtu", str(mtu)])
    client.ns.run(["ip", "link", "set", "eth0", "mtu", str(mtu)])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    base = tmp_path_factory.mktemp("tftp")
    root = make_root(base)
    out = base / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    lab = Lab()
    runners = {}
    try:
        client = lab.add_client(address="10.77.0.10")
        set_mtu(lab, client, 9000)
        for pump in PUMPS:
            # one client namespace stands in for a room of PCs (200 at once): lift the per-address cap well
            # above 200, so sessions of earlier tests still waiting out a lost final ACK do not count against it
            runners[pump] = TftpRunner(lab.server, root, base, "--max-sessions-per-client", "1000", pump=pump)
        yield {"lab": lab, "client": client, "root": root, "out": out, "runner": runners["c"], "runners": runners,
               "base": base}
    finally:
        for runner in runners.values():
            runner.stop()
        lab.close()


def on(env, pump: str) -> dict:
    """The env with `pump`'s server as the one fetched from."""
    return {**env, "runner": env["runners"][pump], "port": PORTS[pump]}


def fetch_cmd(client: str, name: str, dest: str, blksize=None, windowsize=None, port=69) -> list[str]:
    if client == "curl":
        argv = ["curl", "-sS", "--max-time", "60", "-o", dest]
        if blksize:
            argv += ["--tftp-blksize", str(blksize)]
        return argv + [f"tftp://{S}:{port}/{name}"]
    if client == "atftp":
        argv = ["atftp", "-g", "-r", name, "-l", dest]
        if blksize:
            argv += ["--option", f"blksize {blksize}"]
        if windowsize:
            argv += ["--option", f"windowsize {windowsize}"]
        return argv + [S, str(port)]
    if client == "tftp-hpa":
        assert not blksize and not windowsize
        return ["tftp", S, str(port), "-c", "get", name, dest]
    if client == "tftpy":
        opts = {"blksize": blksize} if blksize else {}
        code = ("import sys, tftpy, json; tftpy.TftpClient(sys.argv[1], int(sys.argv[5]), json.loads(sys.argv[4]))"
                ".download(sys.argv[2], sys.argv[3], timeout=5)")
        return [PY, "-c", code, S, name, dest, json.dumps(opts), str(port)]
    raise ValueError(client)


def fetch(env, client: str, name: str, **kw) -> bytes:
    dest = env["out"] / f"{client}-{name.replace('/', '_')}-{kw.get('blksize')}-{kw.get('windowsize')}"
    if dest.exists():
        dest.unlink()
    r = env["client"].ns.run(fetch_cmd(client, name, str(dest), port=env.get("port", 69), **kw), check=False,
                             timeout=120)
    assert r.returncode == 0, f"{client} {name} {kw}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return dest.read_bytes()


@pytest.mark.parametrize("client", ["curl", "atftp", "tftp-hpa", "tftpy"])
def test_default_options_byte_identical(env, client):
    pumped = env["runner"].pumped()
    fetched = 0
    for name in SIZES:
        if client == "curl" and name == "empty":
            continue  # curl 7.88 fails any empty TFTP file ("getpeername() failed"), tftpd-hpa's too
        mark = env["runner"].mark()
        assert fetch(env, client, name) == (env["root"] / name).read_bytes(), (client, name)
        fetched += 1
    ev = env["runner"].last_event("f1m", after=mark)
    # the C pump served every octet transfer; tftp-hpa's netascii ones are Python's
    assert env["runner"].pumped() - pumped == (0 if client == "tftp-hpa" else fetched)
    assert ev["outcome"] == "complete" and ev["blksize"] == 512
    if client == "tftp-hpa":   # its default mode is netascii: more octets on the wire, same file after
        assert ev["mode"] == "netascii" and ev["nbytes"] > SIZES["f1m"]
    else:
        assert ev["mode"] == "octet" and ev["nbytes"] == SIZES["f1m"]
    assert ev["mac"] == env["client"].mac  # resolved from the server's neighbour table
    assert ev["kind"] == "file" and ev["duration"] > 0


@pytest.mark.parametrize("pump", PUMPS)
@pytest.mark.parametrize("client", ["curl", "atftp", "tftpy"])
@pytest.mark.parametrize("blksize", [512, 1468, 8192])
def test_blksize_byte_identical(env, client, blksize, pump):
    env = on(env, pump)
    mark, pumped = env["runner"].mark(), env["runner"].pumped()
    assert fetch(env, client, "f1m", blksize=blksize) == (env["root"] / "f1m").read_bytes()
    ev = env["runner"].last_event("f1m", after=mark)
    assert ev["blksize"] == blksize and ev["outcome"] == "complete"  # the 9000-byte MTU allows 8192
    assert ev["nbytes"] == SIZES["f1m"] and ev["mac"] == env["client"].mac
    assert env["runner"].pumped() - pumped == (1 if pump == "c" else 0)


@pytest.mark.parametrize("pump", PUMPS)
@pytest.mark.parametrize("windowsize", [1, 4, 16])
@pytest.mark.parametrize("blksize", [None, 1468])
def test_atftp_windowsize_byte_identical(env, windowsize, blksize, pump):
    env = on(env, pump)
    mark, pumped = env["runner"].mark(), env["runner"].pumped()
    assert fetch(env, "atftp", "f1m", blksize=blksize, windowsize=windowsize) == (env["root"] / "f1m").read_bytes()
    ev = env["runner"].last_event("f1m", after=mark)
    assert ev["windowsize"] == windowsize and ev["blksize"] == (blksize or 512)
    assert env["runner"].pumped() - pumped == (1 if pump == "c" else 0)


@pytest.mark.parametrize("pump", PUMPS)
def test_40_mib_file_rolls_block_numbers_over(env, pump):
    env = on(env, pump)
    big = os.urandom(40 << 20)
    (env["root"] / "big40").write_bytes(big)
    try:
        # 81 920 blocks of 512 bytes: the 16-bit block number wraps once
        mark, pumped = env["runner"].mark(), env["runner"].pumped()
        assert fetch(env, "curl", "big40") == big
        ev = env["runner"].last_event("big40", after=mark)
        assert ev["nbytes"] == 40 << 20 and ev["blksize"] == 512 and ev["outcome"] == "complete"
        assert fetch(env, "atftp", "big40", blksize=1468, windowsize=16) == big
        assert env["runner"].pumped() - pumped == (2 if pump == "c" else 0)
    finally:
        (env["root"] / "big40").unlink()
        for p in env["out"].glob("*big40*"):
            p.unlink()


def _raw(env, *payloads: bytes) -> list[dict]:
    r = env["client"].ns.run([PY, UDP_TOOL, "rrq", S, "69", *[p.hex() for p in payloads]], timeout=60)
    return [json.loads(line) for line in r.stdout.splitlines()]


def _rrq(name: bytes) -> bytes:
    return b"\x00\x01" + name + b"\x00octet\x00"


def test_confinement_refuses_with_file_not_found(env):
    refused = [b"../outside/secret", b"..", b"sub/../../outside/secret", b"/../outside/secret", b"/etc/passwd",
               b"escape", b"escape-rel", b"dirlink/passwd", b"sub\\..\\..\\outside\\secret", b"..\\outside\\secret",
               b"sub", b"missing"]
    replies = _raw(env, *[_rrq(n) for n in refused])
    for name, r in zip(refused, replies, strict=True):
        assert r["reply"] == 5 and r["code"] == 1 and r["message"] == "File not found", (name, r)
    # NUL cannot be inside a name on the wire: it ends the field, and what follows makes the request
    # malformed or its mode unknown. Either way an error, never data.
    nul = [b"\x00\x01sub/kernel\x00../outside/secret\x00octet\x00",
           b"\x00\x01escape\x00\x00octet\x00", b"\x00\x01sub\x00kernel\x00octet\x00x\x00"]
    for p, r in zip(nul, _raw(env, *nul), strict=True):
        assert r["reply"] == 5 and r["code"] in (1, 4), (p, r)
    # names inside the root, also through an internal symlink and a leading '/', are served
    ok = _raw(env, _rrq(b"alias"), _rrq(b"/sub/kernel"), _rrq(b"./sub//kernel"))
    kernel = (env["root"] / "sub" / "kernel").read_bytes()
    for r in ok:
        assert r["reply"] == 3 and r["block"] == 1 and bytes.fromhex(r["payload"]) == kernel[:60]


def test_confinement_with_real_clients(env):
    c = env["client"].ns
    r = c.run(["curl", "-sS", "--path-as-is", "-o", "/dev/null", f"tftp://{S}/../outside/secret"], check=False)
    assert r.returncode == 68  # CURLE_TFTP_NOTFOUND (curl 7.88 words every TFTP error as "getpeername() failed")
    r = c.run(["tftp", S, "-c", "get", "../outside/secret", str(env["out"] / "nope")], check=False)
    assert "File not found" in r.stdout + r.stderr
    r = c.run(["atftp", "-g", "-r", "escape", "-l", str(env["out"] / "nope2"), S], check=False)
    assert r.returncode != 0
    assert not (env["out"] / "nope2").exists() or b"root:" not in (env["out"] / "nope2").read_bytes()


def test_write_request_refused_with_error(env):
    (env["out"] / "up.txt").write_text("upload")
    r = env["client"].ns.run(["tftp", S, "-c", "put", str(env["out"] / "up.txt"), "up.txt"], check=False)
    assert "Error code 2" in r.stdout + r.stderr or "read-only" in r.stdout + r.stderr
    assert not (env["root"] / "up.txt").exists()
    [reply] = _raw(env, b"\x00\x02up.txt\x00octet\x00")
    assert reply["reply"] == 5 and reply["code"] == 2


def test_200_clients_at_once(env):
    """200 real clients started together (150 curl, 50 atftp) all get the whole file."""
    for _ in range(300):  # start from an idle server: earlier tests' sessions have ended
        if env["runner"].status()["status"]["active_sessions"] == 0:
            break
        time.sleep(0.1)
    out = env["out"] / "many"
    out.mkdir(exist_ok=True)
    logs = env["out"] / "many-logs"
    logs.mkdir(exist_ok=True)
    script = (
        f"for i in $(seq 1 150); do curl -sS --max-time 120 -o {out}/c$i tftp://{S}/f256k & done; "
        f"for i in $(seq 1 50); do atftp --verbose -g -r f256k -l {out}/a$i {S} >{logs}/a$i.log 2>&1 & done; "
        "fails=0; for j in $(jobs -p); do wait $j || fails=$((fails+1)); done; echo fails=$fails")
    r = env["client"].ns.run(["bash", "-c", script], timeout=300)
    if "fails=0" not in r.stdout:  # say which atftp failed and why (curl says it on stderr)
        failed = [f"{p.name}: {p.read_text()[-600:]}" for p in sorted(logs.iterdir())
                  if not (out / p.stem).exists() or (out / p.stem).stat().st_size != 256 * 1024 + 7]
        pytest.fail(r.stdout + r.stderr + "\n".join(failed))
    want = (env["root"] / "f256k").read_bytes()
    files = sorted(out.iterdir())
    assert len(files) == 200
    bad = [f.name for f in files if f.read_bytes() != want]
    assert not bad, bad
    st = env["runner"].status()
    assert st["status"]["active_sessions"] == 0 and st["status"]["open_files"] == 0
    assert st["status"]["data_pump"]["running"] == 0 and st["status"]["data_pump"]["restarts"] == 0


def test_fuzzed_packets_do_not_stop_valid_transfers(env):
    """12 000 mutated/random datagrams at the listener and at random ports while real clients fetch."""
    before = env["runner"].status()["metrics"].get("tftp", {})
    fuzzer = env["client"].ns.popen([PY, UDP_TOOL, "fuzz", S, "69", "12000", "7"], stdout=subprocess.PIPE, text=True)
    want = (env["root"] / "f1m").read_bytes()
    fetches = 0
    try:
        while fuzzer.poll() is None or fetches < 2:
            assert fetch(env, "curl", "f1m", blksize=1468) == want
            assert fetch(env, "atftp", "f1m", blksize=1468, windowsize=8) == want
            fetches += 2
        out, _ = fuzzer.communicate(timeout=60)
    finally:
        if fuzzer.poll() is None:
            fuzzer.kill()
    assert json.loads(out)["sent"] >= 10_000
    assert fetch(env, "tftp-hpa", "f1m") == want   # and it still serves afterwards
    after = env["runner"].status()["metrics"]["tftp"]
    assert after.get("malformed", 0) - before.get("malformed", 0) > 1000
    assert after["sessions_pumped"] - before.get("sessions_pumped", 0) >= fetches
    assert env["runner"].proc.poll() is None


# -- limits and timeouts: a server with short timers and few sessions, on a 1500-byte MTU -------------

@pytest.fixture(params=["c"])
def strict(request, tmp_path, lab):
    root = make_root(tmp_path)
    client = lab.add_client(address="10.77.0.20")
    runner = TftpRunner(lab.server, root, tmp_path, "--timeout", "0.2", "--retries", "2", "--max-sessions", "4",
                        pump=request.param)
    try:
        yield {"lab": lab, "client": client, "root": root, "runner": runner, "out": tmp_path,
               "port": PORTS[request.param]}
    finally:
        runner.stop()


def _udp_sockets(ns) -> list[str]:
    out = ns.run(["ss", "-uanH"]).stdout
    return [line for line in out.splitlines() if S in line]


@pytest.mark.parametrize("strict", PUMPS, indirect=True)
def test_silent_client_dropped_and_session_freed(strict):
    c = strict["client"].ns
    pumped = strict["runner"].pumped()
    r = c.run([PY, UDP_TOOL, "silent", S, str(strict["port"]), "f1m", "10"], timeout=30)
    replies = json.loads(r.stdout)
    kinds = [k for _, k in replies]
    assert kinds == [3, 3, 3, 5], replies               # DATA 1, two retransmissions, then ERROR
    gaps = [round(b[0] - a[0], 1) for a, b in zip(replies, replies[1:], strict=False)]
    assert gaps[1] >= gaps[0]                            # backoff: the interval does not shrink
    time.sleep(0.2)
    st = strict["runner"].status()
    assert st["status"]["active_sessions"] == 0 and st["status"]["open_files"] == 0
    assert st["metrics"]["tftp"]["sessions_failed{reason=timeout}"] == 1
    assert st["status"]["data_pump"]["sessions"] - pumped == (1 if strict["runner"].pump == "c" else 0)
    assert st["status"]["data_pump"]["running"] == 0
    assert len(_udp_sockets(strict["lab"].server)) == 1   # only the listener is left


@pytest.mark.parametrize("pump", PUMPS)
def test_client_timeout_255_ends_at_session_timeout(pump, tmp_path, lab):
    """A client negotiates timeout=255 and goes silent after the OACK: the server gives up at its
    session timeout (1 s here), not after 255 s retransmission intervals, and frees the session."""
    root = make_root(tmp_path)
    client = lab.add_client(address="10.77.0.30")
    runner = TftpRunner(lab.server, root, tmp_path, "--retries", "6", "--session-timeout", "1", pump=pump)
    try:
        pumped = runner.pumped()
        r = client.ns.run([PY, UDP_TOOL, "silent", S, str(PORTS[pump]), "f1m", "20", "timeout=255"], timeout=60)
        assert [kind for _, kind in json.loads(r.stdout)] == [6, 5], r.stdout   # OACK, then ERROR
        time.sleep(0.2)
        st = runner.status()
        assert st["status"]["active_sessions"] == 0 and st["status"]["open_files"] == 0
        assert st["metrics"]["tftp"]["sessions_failed{reason=timeout}"] == 1
        assert st["status"]["data_pump"]["sessions"] - pumped == (1 if pump == "c" else 0)
    finally:
        runner.stop()


def test_excess_clients_get_an_error_not_a_hang(strict):
    c = strict["client"].ns
    holders = [c.popen([PY, UDP_TOOL, "silent", S, "69", "f1m", "5"], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    try:
        for _ in range(100):
            if strict["runner"].status()["status"]["active_sessions"] == 4:
                break
            time.sleep(0.05)
        r = c.run(["curl", "-sS", "-o", "/dev/null", f"tftp://{S}/one"], check=False, timeout=30)
        assert r.returncode != 0 and "timed out" not in r.stderr.lower()
        [reply] = _raw(strict, _rrq(b"one"))
        assert reply["reply"] == 5 and "busy" in reply["message"]
        for h in holders:
            h.wait(timeout=30)
    finally:
        for h in holders:
            if h.poll() is None:
                h.kill()
    # the silent ones timed out and freed their slots
    assert fetch(strict, "curl", "one") == (strict["root"] / "one").read_bytes()


def test_blksize_capped_by_interface_mtu(strict):
    mark = strict["runner"].mark()
    assert fetch(strict, "curl", "f1m", blksize=8192) == (strict["root"] / "f1m").read_bytes()
    assert strict["runner"].last_event("f1m", after=mark)["blksize"] == 1468
