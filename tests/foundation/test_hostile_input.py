"""Issue 13 points 11 and 12 against the real daemon: a reload that replaces the HTTP server answers and
keeps the API and the boot port up; hostile or broken config files are refused quickly and cheaply with
READY=1 after the failed reload; a damaged or new state database is named and refused (no layer is set
aside); what a DHCP client sends reaches `bootctl` escaped; the API on a wildcard TCP address works."""
from __future__ import annotations

import copy
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootd.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES
from bootd.state import StateError, StateStore

ROOT = Path(__file__).resolve().parents[2]
BOOTCTL = str(Path(sys.executable).parent / "bootctl")

PROBE = ("import sys, urllib.request as u\n"
         "req = u.Request(sys.argv[1],"
         " headers={'Authorization': 'Bearer ' + sys.argv[2]} if len(sys.argv) > 2 else {})\n"
         "try:\n print(u.urlopen(req, timeout=10).status)\n"
         "except Exception as e:\n print(getattr(e, 'code', type(e).__name__))\n")


def probe(ns, url: str, token: str | None = None) -> str:
    """HTTP status of GET url from inside `ns` (or the exception's name: URLError = refused)."""
    return ns.run([sys.executable, "-c", PROBE, url] + ([token] if token else [])).stdout.strip()


def wait_until(pred, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    return pred()


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# -- point 11: a reload that replaces the HTTP server ----------------------------------------------

def test_bootctl_reload_of_http_and_api_settings_answers_and_keeps_serving(lab, bootd_daemon, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}], "tftp": {"enabled": False},
           "http": {"port": 18080}, "api": {"tcp": "127.0.0.1:18081", "token_file": str(token)}}
    d = bootd_daemon(cfg, ns=lab.server)
    pc = lab.add_client(address="10.77.0.50")
    assert probe(pc.ns, "http://10.77.0.1:18080/boot/boot.ipxe") == "200"
    assert probe(lab.server, "http://127.0.0.1:18081/api/v1/status", "s3cret") == "200"

    # 1. over the unix socket: the boot port and the API's TCP address both move
    new = copy.deepcopy(d.config_dict)
    new["http"]["port"] = 18090
    new["api"]["tcp"] = "127.0.0.1:18091"
    d.write_config(new)
    n = len(d.notify.messages)
    r = d.bootctl("reload", timeout=60)
    assert r.returncode == 0 and "configuration reloaded" in r.stdout, (r.stdout, r.stderr, d.log())
    assert d.notify.wait_for("READY=1", after=n, timeout=20)
    st = d.api.get("/api/v1/status")
    assert st["reload_errors"] == [] and st["last_reload"]
    http = next(s for s in st["services"] if s["name"] == "http")
    assert "boot:10.77.0.1:18090" in http["listening"] and "api:127.0.0.1:18091" in http["listening"]
    assert probe(pc.ns, "http://10.77.0.1:18090/boot/boot.ipxe") == "200"
    assert probe(lab.server, "http://127.0.0.1:18091/api/v1/status", "s3cret") == "200"
    assert wait_until(lambda: probe(pc.ns, "http://10.77.0.1:18080/boot/boot.ipxe") == "URLError")
    assert wait_until(lambda: probe(lab.server, "http://127.0.0.1:18081/api/v1/status", "s3cret") == "URLError")
    # the services after http were reloaded too, and the log says so
    line = [x for x in d.log().splitlines() if "configuration reloaded from" in x][-1]
    assert "dhcp" in line.split("services reloaded:")[1] and "http" in line, line
    assert "http: now listening on" in d.log()

    # 2. asked over the API's own TCP address, which the reload moves: the call still gets its answer
    new["http"]["port"] = 18080
    new["api"]["tcp"] = "127.0.0.1:18081"
    d.write_config(new)
    n = len(d.notify.messages)
    r = lab.server.run([BOOTCTL, "--url", "http://127.0.0.1:18091", "--token-file", str(token), "reload"],
                       check=False, timeout=60)
    assert r.returncode == 0 and "configuration reloaded" in r.stdout, (r.stdout, r.stderr, d.log())
    assert d.notify.wait_for("READY=1", after=n, timeout=20)
    assert probe(pc.ns, "http://10.77.0.1:18080/boot/boot.ipxe") == "200"
    assert probe(lab.server, "http://127.0.0.1:18081/api/v1/status", "s3cret") == "200"
    assert d.api.get("/api/v1/status")["reload_errors"] == []

    # 3. only the idle timeout changes: a new server on the same sockets, nothing refused meanwhile
    new["http"]["idle_timeout"] = 5.0
    d.write_config(new)
    assert d.bootctl("reload", timeout=60).returncode == 0
    assert probe(pc.ns, "http://10.77.0.1:18080/boot/boot.ipxe") == "200"
    assert d.bootctl("status").returncode == 0
    # and it stops cleanly right after, while the replaced server may still be retiring
    assert d.stop(timeout=10) == 0
    assert not Path(d.socket).exists() and not list(Path(d.socket).parent.glob(".*.new"))


# -- point 12: hostile or broken config files ------------------------------------------------------

def alias_bomb() -> str:
    """Nine levels of nine aliases: 9^9 (387 million) strings once expanded, 400 bytes of text."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nhosts: *i\n"


def deep_nesting() -> str:
    return "hosts: " + "[" * 20000 + "]" * 20000 + "\n"


def write_big(path: Path) -> None:
    """60 MB of comments (valid YAML)."""
    with open(path, "w") as f:
        chunk = "# " + "x" * 1021 + "\n"
        for _ in range(60 * 1024):
            f.write(chunk)


HOSTILE = {
    "alias-bomb": (alias_bomb, f"more than {MAX_CONFIG_NODES} nodes"),
    "deep-nesting": (deep_nesting, f"nested deeper than {MAX_CONFIG_DEPTH} levels"),
    "60MB": (None, f"larger than {MAX_CONFIG_BYTES // 1024} KiB"),
}


def write_hostile(path: Path, kind: str, base: str = "") -> None:
    make, _ = HOSTILE[kind]
    if make is None:
        write_big(path)
    else:
        path.write_text(base + make())


def _limit_memory() -> None:  # the checker must not need more than this; without limits it took GBs
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_check_config_refuses_hostile_files_with_the_reason(kind, tmp_path):
    path = tmp_path / "bootd.yaml"
    write_hostile(path, kind)
    r = subprocess.run([sys.executable, "-m", "bootd.cli.bootd_main", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60, preexec_fn=_limit_memory, cwd=str(ROOT))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    first = r.stderr.splitlines()[0]
    assert first.startswith("bootd.yaml") or first.startswith(str(path)), first
    assert HOSTILE[kind][1] in first, r.stderr[-2000:]


def test_recursive_alias_and_merge_bomb_are_refused(tmp_path):
    from bootd.config import ConfigError, parse_config
    with pytest.raises(ConfigError) as ei:
        parse_config("menu: &m\n  title: x\n  sub: *m\n", "bootd.yaml")
    assert "refers to a node that contains it" in str(ei.value)
    merges = ["m0: &m0 {k0: 1, k1: 2, k2: 3, k3: 4, k4: 5, k5: 6, k6: 7, k7: 8, k8: 9, k9: 10}"]
    for i in range(1, 8):
        merges.append(f"m{i}: &m{i} {{" + ", ".join(f"x{j}: *m{i - 1}" for j in range(10)) + "}")
    with pytest.raises(ConfigError) as ei:
        parse_config("\n".join(merges) + "\n", "bootd.yaml")
    assert f"more than {MAX_CONFIG_NODES} nodes" in str(ei.value)
    # aliases and merges within the limits still work
    cfg = parse_config("images: [{name: deb}]\ngroups:\n  - &room1 {name: room1, images: [deb], boot: grub}\n"
                       "  - {<<: *room1, name: room2}\n", "bootd.yaml")
    assert [(g.name, g.images, g.boot) for g in cfg.groups] == [("room1", ["deb"], "grub"), ("room2", ["deb"], "grub")]


def test_failed_reloads_end_with_ready_and_the_daemon_keeps_serving(bootd_daemon):
    d = bootd_daemon({"menu": {"timeout": 7}})
    good = d.config_path.read_text()
    pid = d.proc.pid
    # a safety net for this machine should the limits be missing: the daemon gets 1.5 GiB more than now
    limit = (vm_kib(pid, "VmSize") << 10) + (1536 << 20)
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    rss_before = vm_kib(pid, "VmRSS")
    for kind, how in (("alias-bomb", "bootctl"), ("deep-nesting", "SIGHUP"), ("60MB", "bootctl")):
        write_hostile(d.config_path, kind, base=good if kind != "60MB" else "")
        n = len(d.notify.messages)
        if how == "bootctl":
            r = d.bootctl("reload", timeout=60)
            assert r.returncode == 1 and "reload refused" in r.stdout, (kind, r.stdout, r.stderr)
            assert HOSTILE[kind][1] in r.stdout and "bootd.yaml" in r.stdout, (kind, r.stdout)
        else:
            d.signal(signal.SIGHUP)
        assert d.notify.wait_for("RELOADING=1", after=n, timeout=30), kind
        assert d.notify.wait_for("READY=1", after=n, timeout=30), (kind, d.log()[-3000:])
        st = d.api.get("/api/v1/status")
        assert any(HOSTILE[kind][1] in e for e in st["reload_errors"]), (kind, st["reload_errors"])
        assert d.proc.poll() is None
    assert "Traceback" not in d.log() and "RecursionError" not in d.log()
    assert vm_kib(pid, "VmRSS") - rss_before < 200 * 1024, "the daemon grew by more than 200 MB"
    # the running config was kept, and a good file applies again
    d.write_config(good.replace("timeout: 7", "timeout: 9"))
    assert d.bootctl("reload", timeout=60).returncode == 0
    assert d.api.get("/api/v1/status")["reload_errors"] == []


# -- point 12: the state database ------------------------------------------------------------------

def test_state_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database " * 400)
    with pytest.raises(StateError) as ei:
        StateStore(garbage)
    assert str(garbage) in str(ei.value) and "not a database" in str(ei.value)
    # a database whose pages were damaged after it was written
    damaged = tmp_path / "damaged.db"
    s = StateStore(damaged)
    for i in range(3000):
        s.touch_host(f"52:54:00:00:{i >> 8:02x}:{i & 0xff:02x}", ip=f"10.0.{i >> 8}.{i & 0xff}", name=f"pc{i}")
    s.close()
    with open(damaged, "r+b") as f:
        f.seek(3 * 4096)
        f.write(b"\xde\xad" * 4096)
    with pytest.raises(StateError) as ei:
        StateStore(damaged)
    assert str(damaged) in str(ei.value) and "damaged" in str(ei.value)


def test_state_damaged_while_running_names_the_file(tmp_path):
    path = tmp_path / "state.db"
    s = StateStore(path)
    try:
        for i in range(3000):
            s.touch_host(f"52:54:00:00:{i >> 8:02x}:{i & 0xff:02x}", ip=f"10.0.{i >> 8}.{i & 0xff}", name=f"pc{i}")
        s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(path, "r+b") as f:  # every page but the first (the schema) overwritten
            f.seek(4096)
            f.write(b"\xde\xad" * ((path.stat().st_size - 4096) // 2))
        s.conn.execute("PRAGMA shrink_memory")  # no cached pages: the next read is from the file
        with pytest.raises(StateError) as ei:
            s.query("SELECT count(*) FROM hosts WHERE name LIKE 'pc%'")
        assert str(ei.value).startswith(f"{path}: ") and "malformed" in str(ei.value)
        with pytest.raises(StateError) as ei:
            with s.transaction() as cur:
                cur.execute("UPDATE hosts SET arch = 'bios'")
        assert str(ei.value).startswith(f"{path}: ")
    finally:
        s.conn.close()


@pytest.mark.sqlite_only("a damaged SQLite file")
def test_corrupt_state_db_stops_start_with_its_path_and_no_traceback(bootd_daemon):
    d = bootd_daemon({}, start=False)
    d.storage.mkdir(parents=True)
    db = d.storage / "state.db"
    db.write_bytes(b"this is not a database " * 400)
    d.start(wait=False)
    assert d.proc.wait(timeout=60) == 1
    log = d.log()
    assert f"cannot open the state database: {db}" in log and "not a database" in log, log
    assert "Traceback" not in log
    assert db.read_bytes() == b"this is not a database " * 400  # left as it was for the admin


def make_layers(storage: Path) -> list[Path]:
    layers = []
    for name in ("0123456789abcdef0123456789abcdef.qcow2", "fedcba9876543210fedcba9876543210.qcow2"):
        p = storage / "snapshots" / "win11" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M"], check=True)
        os.chmod(p, 0o444)
        layers.append(p)
    return layers


@pytest.mark.parametrize("db_state", ["empty-file", "missing"])
def test_new_state_db_beside_snapshot_layers_refuses_to_start(bootd_daemon, db_state):
    d = bootd_daemon({}, start=False)
    layers = make_layers(d.storage)
    db: object = d.storage / "state.db"
    if os.environ.get("BOOTD_STATE_URL"):  # an empty PostgreSQL database: named by its URL
        if db_state == "empty-file":
            pytest.skip("an empty SQLite file")
        from bootd.state_postgres import redact
        db = redact(os.environ["BOOTD_STATE_URL"])
    elif db_state == "empty-file":
        db.write_bytes(b"")
    for attempt in (1, 2):  # and again: the first attempt's new database must not make it pass
        d.start(wait=False)
        assert d.proc.wait(timeout=60) == 1, attempt
        log = d.log()
        assert f"{db} holds no snapshot" in log and str(layers[0]) in log and "lost+found" in log, log
        assert "Traceback" not in log
        assert all(p.is_file() for p in layers)
        assert not (d.storage / "snapshots" / "lost+found").exists()
        assert d.notify.fields("READY=1") == []


# -- point 12: what a DHCP client sends, printed by bootctl ----------------------------------------

HOSTILE_HOSTNAME = b"pc\x1b]0;owned\x07\x1b[2J\r\n10.77.0.99  52:54:00:00:00:99  bound  fake\xc2\x9b\xe2\x80\xae"
DORA = r"""
import socket, sys, time
sys.path.insert(0, sys.argv[1])
from bootd.dhcp.codec import DhcpMessage, decode, encode
mac = bytes.fromhex("5254007713aa")
extra = {12: bytes.fromhex(sys.argv[2])}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, 25, b"eth0")
s.bind(("0.0.0.0", 68))
s.settimeout(2)
def wait(xid, types):
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            m = decode(s.recvfrom(4096)[0])
        except Exception:
            continue
        if m.op == 2 and m.xid == xid and m.message_type in types:
            return m
for attempt in range(5):
    xid = 0x13000 + attempt
    s.sendto(encode(DhcpMessage(xid=xid, flags=0x8000, chaddr=mac, options={53: b"\x01", **extra})),
             ("255.255.255.255", 67))
    off = wait(xid, {2})
    if off is None:
        continue
    s.sendto(encode(DhcpMessage(xid=xid, flags=0x8000, chaddr=mac,
                                options={53: b"\x03", 50: socket.inet_aton(off.yiaddr), 54: off.options[54], **extra})),
             ("255.255.255.255", 67))
    ack = wait(xid, {5})
    if ack is not None:
        print(ack.yiaddr)
        break
"""


def test_client_supplied_strings_reach_bootctl_escaped(lab, bootd_daemon):
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}], "tftp": {"enabled": False},
           "dhcp": {"mode": "full", "lease_time": 600,
                    "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.199"}]}}
    d = bootd_daemon(cfg, ns=lab.server)
    pc = lab.add_client(address="10.77.0.50")
    r = pc.ns.run([sys.executable, "-c", DORA, str(ROOT), HOSTILE_HOSTNAME.hex()], timeout=60)
    assert r.stdout.strip() == "10.77.0.100", (r.stdout, r.stderr)
    hostname = HOSTILE_HOSTNAME.decode("utf-8", "replace")

    out = d.bootctl("leases", check=True).stdout
    for raw in ("\x1b", "\x07", "\r", "\x9b", "\u202e"):
        assert raw not in out, (raw, out)
    assert "pc\\x1b]0;owned\\x07\\x1b[2J\\r\\n10.77.0.99" in out, out
    assert "fake\\x9b\\u202e" in out, out
    assert len(out.splitlines()) == 2, out  # the header and the one lease: no forged line
    # --json keeps the exact value (JSON escapes it)
    leases = json.loads(d.bootctl("leases", "--json", check=True).stdout)["leases"]
    assert [lease["hostname"] for lease in leases] == [hostname]


def test_escape_controls_keeps_text_and_escapes_every_control():
    from bootd.cli.text import escape_controls, escape_strings
    assert escape_controls("pc07 Zürich ü-€") == "pc07 Zürich ü-€"
    assert escape_controls("a\x1b[2Jb\x00\x7f\x85\u202e\u2066") == "a\\x1b[2Jb\\x00\\x7f\\x85\\u202e\\u2066"
    assert escape_controls("l1\nl2\tx\r", keep_lines=True) == "l1\nl2\tx\\r"
    assert escape_strings({"k\x1b": ["\x07", 3, None]}) == {"k\\x1b": ["\\x07", 3, None]}


# -- point 12: the API on a wildcard address -------------------------------------------------------

def test_api_on_a_wildcard_tcp_address_answers(bootd_daemon, tmp_path, netns):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = bootd_daemon({"api": {"tcp": "0.0.0.0:18082", "token_file": str(token)}}, ns=netns)
    assert probe(netns, "http://127.0.0.1:18082/api/v1/status", "s3cret") == "200"
    assert probe(netns, "http://127.0.0.1:18082/api/v1/status", "wrong") == "401"
    assert d.api.get("/api/v1/status")["pid"]


def test_check_config_refuses_api_on_the_boot_port(tmp_path):
    token = tmp_path / "token"
    token.write_text("t\n")
    path = tmp_path / "bootd.yaml"
    path.write_text(f"interfaces: [{{name: br0, address: 10.9.0.1/24}}]\nhttp: {{port: 8080}}\n"
                    f"api: {{tcp: '0.0.0.0:8080', token_file: {token}}}\n")
    r = subprocess.run([sys.executable, "-m", "bootd.cli.bootd_main", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == 1, r.stderr
    assert "bootd.yaml:3 api.tcp: 0.0.0.0:8080 takes the boot port 10.9.0.1:8080" in r.stderr, r.stderr
