"""Boot files and iPXE scripts over HTTP, fetched by real curl from a client namespace of a lab.

One daemon for the module (starting one costs ~1 s): files in its boot root, a lab PC (pc01) with
an address, and a second PC namespace for the per-address cap.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netns import Lab  # noqa: E402
from support import BootdProcess, have  # noqa: E402

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0 or not have("curl"), reason="needs root and curl")]

PC01_IP = "10.77.0.21"
PC02_IP = "10.77.0.22"
CAP = 3
IDLE = 1.0


class Env:
    lab: Lab
    bootd: BootdProcess
    pc01: object
    pc02: object
    files: dict[str, bytes]

    @property
    def base(self) -> str:
        return f"http://{self.lab.server_ip}:8080"

    def curl(self, *args: str, client=None, check: bool = True):
        c = client or self.pc01
        return c.ns.run(["curl", "-sS", "--max-time", "20", *args], check=check, text=False)

    def py(self, code: str, client=None):
        c = client or self.pc01
        r = c.ns.run([sys.executable, "-c", textwrap.dedent(code)], check=False, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    e = Env()
    e.lab = Lab()
    try:
        e.pc01 = e.lab.add_client(address=PC01_IP)
        e.pc02 = e.lab.add_client(address=PC02_IP)
        wd = tmp_path_factory.mktemp("bootd-http")
        boot = wd / "storage" / "boot"
        (boot / "debian").mkdir(parents=True)
        e.files = {"debian/vmlinuz": os.urandom(3 * 1024 * 1024 + 17),
                   "debian/initrd.img": os.urandom(5 * 1024 * 1024 + 3),
                   "undionly.kpxe": os.urandom(70_000)}
        for rel, data in e.files.items():
            (boot / rel).write_bytes(data)
        (wd / "secret").write_text("outside the boot root\n")
        (boot / "escape").symlink_to(wd / "secret")
        config = {
            "interfaces": [{"name": "br0", "address": f"{e.lab.server_ip}/24"}],
            "http": {"port": 8080, "idle_timeout": IDLE, "max_connections_per_ip": CAP},
            "tftp": {"enabled": True},
            "dhcp": {"mode": "off"},
            "storage": {"directory": str(wd / "storage")},
            "menu": {"title": "Lab", "timeout": 5, "student_entries": ["current", "previous", "images"]},
            "images": [{"name": "debian", "title": "Debian 12", "kernel": "debian/vmlinuz",
                        "initrd": "debian/initrd.img", "cmdline": "quiet"},
                       {"name": "windows", "title": "Windows 11", "kernel": "debian/vmlinuz",
                        "initrd": "debian/initrd.img"}],
            "groups": [{"name": "room1", "images": ["debian", "windows"], "default_image": "debian"}],
            "hosts": [{"mac": e.pc01.mac, "name": "pc01", "group": "room1", "default_image": "windows"},
                      {"mac": e.pc02.mac, "name": "pc02", "group": "room1"}],
        }
        e.bootd = BootdProcess(wd, config, ns=e.lab.server)
        e.bootd.start()
        yield e
    finally:
        if getattr(e, "bootd", None) is not None:
            e.bootd.close()
        e.lab.close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_whole_file_byte_identical(env):
    for rel, data in env.files.items():
        r = env.curl("-f", f"{env.base}/boot/files/{rel}")
        assert sha(r.stdout) == sha(data), rel


def test_head(env):
    r = env.curl("-I", "-f", f"{env.base}/boot/files/debian/initrd.img")
    head = r.stdout.decode().lower()
    assert head.startswith("http/1.1 200")
    assert f"content-length: {len(env.files['debian/initrd.img'])}" in head
    assert "accept-ranges: bytes" in head


def test_range(env):
    data = env.files["debian/vmlinuz"]
    r = env.curl("-f", "-r", "1000-1999", "-D", "/dev/stderr", f"{env.base}/boot/files/debian/vmlinuz")
    assert r.stdout == data[1000:2000]
    assert b"206" in r.stderr.splitlines()[0]
    assert f"content-range: bytes 1000-1999/{len(data)}".encode() in r.stderr.lower()
    r = env.curl("-f", "-r", "-100", f"{env.base}/boot/files/debian/vmlinuz")
    assert r.stdout == data[-100:]
    r = env.curl("-o", "/dev/null", "-w", "%{http_code}", "-r", f"{len(data) + 10}-",
                 f"{env.base}/boot/files/debian/vmlinuz")
    assert r.stdout == b"416"


@pytest.mark.parametrize("path", ["/boot/files/../state.db", "/boot/files/%2e%2e/state.db",
                                  "/boot/files/escape", "/boot/files/debian/../../state.db",
                                  "/boot/files/nothing-here", "/boot/files/debian",
                                  "/boot/files/debian%00/vmlinuz", "/boot/files/debian%5Cvmlinuz",
                                  "/boot/files//etc/passwd", "/boot/files/%2Fetc%2Fpasswd"])
def test_confinement(env, path):
    r = env.curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", f"{env.base}{path}")
    assert r.stdout == b"404", path


def test_keepalive_reuse_and_idle_timeout(env):
    # curl reuses one connection for two URLs on the same server
    r = env.curl("-v", "-o", "/dev/null", "-o", "/dev/null", f"{env.base}/boot/files/undionly.kpxe",
                 f"{env.base}/boot/files/undionly.kpxe")
    assert b"Re-using existing connection" in r.stderr or b"Reusing existing" in r.stderr, r.stderr
    out = env.py(f"""
        import socket, time, json
        s = socket.create_connection(("{env.lab.server_ip}", 8080))
        def get():
            s.sendall(b"GET /boot/files/undionly.kpxe HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            buf = b""
            while b"\\r\\n\\r\\n" not in buf:
                buf += s.recv(65536)
            head, body = buf.split(b"\\r\\n\\r\\n", 1)
            n = int([l for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(body) < n:
                body += s.recv(65536)
            return head.split(b"\\r\\n")[0].decode()
        first = get()
        time.sleep({IDLE} * 0.3)
        second = get()          # still open: the idle timer was not reached
        t0 = time.monotonic()
        s.settimeout(10)
        closed = s.recv(1) == b""
        print(json.dumps([first, second, closed, time.monotonic() - t0]))
    """)
    first, second, closed, waited = out
    assert first.endswith("200 OK") and second.endswith("200 OK")
    assert closed
    assert waited < 8  # closed by the idle timeout, not by the client's 10 s


def test_connection_cap_per_client_address(env):
    out = env.py(f"""
        import socket, json, subprocess
        def conn():
            s = socket.create_connection(("{env.lab.server_ip}", 8080)); s.settimeout(10); return s
        def get(s):
            s.sendall(b"GET /boot/files/undionly.kpxe HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            buf = b""
            while b"\\r\\n\\r\\n" not in buf:
                chunk = s.recv(65536)
                if not chunk: return "closed"
                buf += chunk
            head, body = buf.split(b"\\r\\n\\r\\n", 1)
            n = int([l for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(body) < n:
                body += s.recv(65536)
            return head.split(b" ")[1].decode()
        held = [conn() for _ in range({CAP})]
        codes = [get(s) for s in held]
        extra = conn()
        refused = get(extra)
        curl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{{http_code}}",
                               "http://{env.lab.server_ip}:8080/boot/files/undionly.kpxe"],
                              capture_output=True, text=True).stdout
        held_again = [get(s) for s in held]   # the held connections still work
        held.pop().close()
        import time
        deadline = time.monotonic() + 10   # the server sees the close at its next loop turn
        while True:
            time.sleep(0.2)
            after = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{{http_code}}",
                                    "http://{env.lab.server_ip}:8080/boot/files/undionly.kpxe"],
                                   capture_output=True, text=True).stdout
            if after == "200" or time.monotonic() > deadline:
                break
        print(json.dumps([codes, refused, curl, held_again, after]))
    """)
    codes, refused, curl, held_again, after = out
    assert codes == ["200"] * CAP
    assert refused == "503"
    assert curl == "503"
    assert held_again == ["200"] * CAP
    assert after == "200"
    # another address is not affected while pc01 holds its connections
    r = env.curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"{env.base}/boot/files/undionly.kpxe",
                 client=env.pc02)
    assert r.stdout == b"200"
    m = env.bootd.api.get("/api/v1/metrics")
    assert "per-ip-cap" in json.dumps(m)


def test_ipxe_script_per_mac(env):
    r = env.curl("-f", f"{env.base}/boot/{env.pc01.mac}.ipxe")
    text = r.stdout.decode()
    assert text.startswith("#!ipxe\n")
    assert "choose --default windows --timeout 5000" in text  # pc01's own default
    assert f"bootd.server={env.lab.server_ip}" in text
    assert f"bootd.config=http://{env.lab.server_ip}:8080/clients/{env.pc01.mac}/" in text
    assert f"kernel http://{env.lab.server_ip}:8080/boot/files/debian/vmlinuz" in text
    r2 = env.curl("-f", f"{env.base}/boot/{env.pc02.mac.replace(':', '-').upper()}.ipxe", client=env.pc02)
    assert "choose --default debian" in r2.stdout.decode()
    # Another PC asking for pc02's menu (its NBD token, a new boot of its disk) is refused.
    r4 = env.curl("-o", "/dev/null", "-w", "%{http_code}", f"{env.base}/boot/{env.pc02.mac}.ipxe")
    assert r4.stdout == b"403"
    r3 = env.curl("-o", "/dev/null", "-w", "%{http_code}", f"{env.base}/boot/not-a-mac.ipxe")
    assert r3.stdout == b"404"
    chain = env.curl("-f", f"{env.base}/boot/boot.ipxe").stdout.decode()
    assert "chain /boot/${net0/mac}.ipxe" in chain


def test_pxelinux_and_grub_menus_over_tftp(env):
    mac = env.pc01.mac
    r = env.curl("-f", f"tftp://{env.lab.server_ip}/pxelinux.cfg/01-{mac.replace(':', '-')}")
    text = r.stdout.decode()
    assert "DEFAULT windows" in text and "MENU TITLE Lab: pc01" in text
    assert f"bootd.config=http://{env.lab.server_ip}:8080/clients/{mac}/" in text
    r = env.curl("-f", f"tftp://{env.lab.server_ip}/grub/grub.cfg-01-{mac.replace(':', '-')}")
    assert "set default=windows" in r.stdout.decode()
    r = env.curl("-f", f"tftp://{env.lab.server_ip}/{mac.replace(':', '-')}.ipxe")
    assert r.stdout.decode().startswith("#!ipxe\n") and "choose --default windows" in r.stdout.decode()
    # pc02 asking for pc01's per-MAC menu over TFTP gets "file not found", never the menu
    r = env.curl(f"tftp://{env.lab.server_ip}/pxelinux.cfg/01-{mac.replace(':', '-')}", client=env.pc02, check=False)
    assert r.returncode != 0 and b"Lab: pc01" not in r.stdout
    # pxelinux.cfg/default: the asking PC's menu (MAC from its lease or the neighbour table)
    r = env.curl("-f", f"tftp://{env.lab.server_ip}/pxelinux.cfg/default", client=env.pc02)
    assert "DEFAULT debian" in r.stdout.decode() and "Lab: pc02" in r.stdout.decode()


def test_grub_menu_over_http_boot(env):
    """A GRUB loaded by UEFI HTTP boot reads $prefix/grub.cfg = /grub/grub.cfg on bootd's HTTP port: the
    asking PC's menu, whose kernel and initrd are URLs paths under /boot/files on the same server."""
    since = time.time()
    text = env.curl("-f", f"{env.base}/grub/grub.cfg", client=env.pc02).stdout.decode()
    assert "set default=debian" in text and "pc02" in text
    assert "linux /boot/files/debian/vmlinuz" in text and "initrd /boot/files/debian/initrd.img" in text
    mac = env.pc01.mac
    text = env.curl("-f", f"{env.base}/grub/grub.cfg-01-{mac.replace(':', '-')}").stdout.decode()
    assert "set default=windows" in text  # pc01's own default
    # another PC's per-MAC menu: refused; GRUB's probes: a 404 that is no failed boot step
    code = env.curl("-o", "/dev/null", "-w", "%{http_code}", f"{env.base}/grub/grub.cfg-01-{mac.replace(':', '-')}",
                    client=env.pc02).stdout
    assert code == b"403"
    for probe in ("grub/x86_64-efi/grub.cfg", "grub/x86_64-efi/command.lst", "boot/files/sb/revocations_sbat.efi"):
        code = env.curl("-o", "/dev/null", "-w", "%{http_code}", f"{env.base}/{probe}", client=env.pc02).stdout
        assert code == b"404", probe
    # shim asks for DIR//grubx64.efi: the same file, recorded under its plain name
    body = env.curl("-f", "--path-as-is", f"{env.base}/boot/files/debian//vmlinuz", client=env.pc02).stdout
    assert body == env.files["debian/vmlinuz"]
    events = [ev for ev in env.bootd.api.get("/api/v1/hosts/pc02")["events"] if ev["ts"] >= since]
    events = [ev for ev in events if ev["kind"] != "disk"]
    assert [ev["kind"] for ev in events] == ["menu", "kernel"], events
    assert events[0]["detail"]["path"] == "grub/grub.cfg" and events[0]["detail"]["proto"] == "http"
    assert events[-1]["detail"]["path"] == "debian/vmlinuz"
    assert not any(ev["kind"] == "failed" for ev in events)


def test_boot_timeline(env):
    mac = env.pc02.mac
    since = time.time()
    env.curl("-f", "-o", "/dev/null", f"{env.base}/boot/files/undionly.kpxe", client=env.pc02)
    env.curl("-f", "-o", "/dev/null", f"{env.base}/boot/{mac}.ipxe", client=env.pc02)
    env.curl("-f", "-o", "/dev/null", f"{env.base}/boot/files/debian/vmlinuz", client=env.pc02)
    env.curl("-f", "-o", "/dev/null", f"{env.base}/boot/files/debian/initrd.img", client=env.pc02)
    host = env.bootd.api.get("/api/v1/hosts/pc02")
    events = [ev for ev in host["events"] if ev["ts"] >= since]
    # the NBD engine adds its own "disk" step (here: no snapshot of these images, which it says)
    disk = [ev for ev in events if ev["kind"] == "disk"]
    assert all(ev["detail"] for ev in disk)
    events = [ev for ev in events if ev["kind"] != "disk"]
    kinds = [ev["kind"] for ev in events]
    assert kinds == ["loader", "script", "kernel", "initrd"], events
    sizes = {ev["kind"]: ev["nbytes"] for ev in events}
    assert sizes["kernel"] == len(env.files["debian/vmlinuz"])
    assert sizes["initrd"] == len(env.files["debian/initrd.img"])
    assert all(ev["duration"] is not None and ev["duration"] >= 0 for ev in events)
    assert events[2]["detail"]["path"] == "debian/vmlinuz"
    out = env.bootd.bootctl("hosts", "pc02", check=True).stdout
    for word in ("script", "kernel", "initrd", "debian/initrd.img"):
        assert word in out, out
    # a partial fetch records the bytes actually asked for
    env.curl("-f", "-o", "/dev/null", "-r", "0-4095", f"{env.base}/boot/files/debian/initrd.img", client=env.pc02)
    last = env.bootd.api.get("/api/v1/hosts/pc02")["events"][-1]
    assert last["kind"] == "initrd" and last["nbytes"] == 4096 and last["detail"]["status"] == 206
    if os.environ.get("SHOW"):
        print(out)
        print(env.bootd.log())


def test_bootctl_menu_preview_starts_no_boot(env):
    before = len(env.bootd.api.get("/api/v1/hosts/pc01")["events"])
    r = env.bootd.bootctl("menu", "pc01", check=True)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("pc01 (") and "default windows" in lines[0]
    assert any(line.startswith(" * windows") for line in lines), r.stdout
    assert any(line.startswith("   debian") for line in lines), r.stdout
    raw = env.bootd.bootctl("menu", env.pc01.mac, "--flavour", "pxelinux", "--raw", check=True).stdout
    assert "DEFAULT windows" in raw and "MENU TITLE Lab: pc01" in raw
    data = env.bootd.api.get("/api/v1/hosts/pc02/menu?flavour=grub")
    assert data["default"] == "debian" and data["text"].count("menuentry") == 3
    assert len(env.bootd.api.get("/api/v1/hosts/pc01")["events"]) == before  # nothing fetched, no boot
    if os.environ.get("SHOW"):
        print(r.stdout)
    missing = env.bootd.bootctl("menu", "nobody")
    assert missing.returncode == 1 and "nobody" in (missing.stderr + missing.stdout)


def test_config_reload_changes_the_next_menu(env):
    """Menus are rendered per request: a reloaded config shows in the very next fetch, over TFTP and HTTP."""
    import copy
    original = copy.deepcopy(env.bootd.config_dict)
    changed = copy.deepcopy(original)
    changed["hosts"][1]["default_image"] = "windows"
    changed["menu"]["timeout"] = 9
    mac = env.pc02.mac
    try:
        env.bootd.write_config(changed)
        env.bootd.bootctl("reload", check=True)
        text = env.curl("-f", f"tftp://{env.lab.server_ip}/pxelinux.cfg/01-{mac.replace(':', '-')}",
                        client=env.pc02).stdout.decode()
        assert "DEFAULT windows" in text and "TIMEOUT 90" in text
        script = env.curl("-f", f"{env.base}/boot/{mac}.ipxe", client=env.pc02).stdout.decode()
        assert "choose --default windows --timeout 9000" in script
    finally:
        env.bootd.write_config(original)
        env.bootd.bootctl("reload", check=True)
    text = env.curl("-f", f"tftp://{env.lab.server_ip}/pxelinux.cfg/01-{mac.replace(':', '-')}",
                    client=env.pc02).stdout.decode()
    assert "DEFAULT debian" in text
