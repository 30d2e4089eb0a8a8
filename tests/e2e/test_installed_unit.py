"""The package as an admin installs it, under a real systemd as PID 1 (opt-in: BOOTD_SYSTEMD_TEST=1, or
`make test-systemd`; README "Install on a server" has the times).

A Debian 12 root (debootstrap, cached under .cache/systemd-test) gets the .deb `make deb` builds, installed
with `apt-get install ./bootd_*.deb` from the Debian mirror apt uses here; then `systemd-nspawn -b` boots it
in the server namespace of a test lab (a bridge, nothing else: tests/netns.py), and the test drives
systemd in it through nsenter: start (READY, watchdog), reload of a good and of a broken config, start
with a broken config (FILE:LINE in the journal), a clean stop, `systemd-analyze security` no worse than
the unit's score before the package existed, and finally what the admin installed it for: with
/etc/bootd/bootd.yaml edited to serve the lab, a lab PC (QEMU, iPXE) boots from the installed bootd, a
client root is exported by NFS-Ganesha under the unit's sandbox, and the same boot works with the state in
Debian's PostgreSQL (the URL in /etc/bootd/state.env, as the README tells the admin)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml
from harness import LabPC, ensure_assets, lab_config
from netns import Lab

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "systemd-test"
BASE = CACHE / "bookworm-base"
ARCHIVES = CACHE / "apt-archives"  # downloaded .debs, kept between runs
CONFIG = "/etc/bootd/bootd.yaml"
# `systemd-analyze security` of systemd/bootd.service as it was before the package (commit 02c3570): 4.9
EXPOSURE_BEFORE = 4.9

pytestmark = [
    pytest.mark.skipif(os.environ.get("BOOTD_SYSTEMD_TEST") != "1",
                       reason="long (debootstrap, apt, a booted container): BOOTD_SYSTEMD_TEST=1 or make test-systemd"),
    pytest.mark.timeout(1800),
]


GANESHA_CONF = """NFS_CORE_PARAM {
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}
NFSv4 {
    Graceless = true;
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}
%include "/etc/ganesha/bootd-exports.conf"
"""


def debian_mirror() -> tuple[str, str]:
    """(mirror URI, deb822 sources text) from apt's own config on this machine."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        text = sources.read_text()
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M)
        if m:
            return m.group(1), text
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
            uri = parts[1] if not parts[1].startswith("[") else parts[2]
            return uri, ""
    raise RuntimeError("no Debian bookworm mirror in apt's config")


def base_root() -> Path:
    """A minimal Debian 12 with systemd as init, made once (debootstrap ~35 s) and reused."""
    stamp = BASE / ".bootd-base-ready"
    if stamp.exists():
        return BASE
    mirror, sources = debian_mirror()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"base.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus",
                            "bookworm", str(tmp), mirror], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        if sources:  # the host's sources (security updates too): apt resolves the same versions as here
            (tmp / "etc/apt/sources.list").unlink(missing_ok=True)
            (tmp / "etc/apt/sources.list.d/debian.sources").write_text(sources)
        (tmp / ".bootd-base-ready").write_text(mirror + "\n")
        shutil.rmtree(BASE, ignore_errors=True)
        tmp.rename(BASE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BASE


def nspawn(root: Path, *argv: str, binds: tuple[str, ...] = (), chdir: str = "/",
           timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in `root` (no boot; the host's network, for apt)."""
    cmd = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit", "--resolv-conf=copy-host",
           f"--chdir={chdir}", *(f"--bind={b}" for b in binds), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def installed_packages(root: Path) -> set[str]:
    r = nspawn(root, "dpkg-query", "-W", "-f=${Package} ${Status}\\n")
    assert r.returncode == 0, r.stderr
    return {line.split()[0] for line in r.stdout.splitlines() if line.endswith("install ok installed")}


class Container:
    """A booted container (systemd-nspawn -b) and commands in it through nsenter on its PID 1."""

    def __init__(self, root: Path, log: Path, lab: Lab):
        self.root = root
        self.lab = lab
        self.log_path = log
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.leader = 0
        self.pulled: set[str] = set()  # the packages `apt install ./bootd.deb` added

    def boot(self, timeout: float = 120) -> None:
        with open(self.log_path, "wb") as log:
            # the container's network is the lab server's namespace: its bridge and nothing of the host
            self.proc = subprocess.Popen(["systemd-nspawn", "-q", "-b", "-D", str(self.root), "--register=no",
                                          "--keep-unit",
                                          f"--network-namespace-path=/run/netns/{self.lab.server.name}",
                                          # NFS-Ganesha's VFS back end opens files by handle, which a
                                          # container forbids by default (a real server allows it)
                                          "--system-call-filter=open_by_handle_at name_to_handle_at",
                                          "--capability=CAP_DAC_READ_SEARCH"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.leader:
            assert self.proc.poll() is None, self.log_path.read_text(errors="replace")
            self.leader = self._init_pid()
            time.sleep(0.2)
        assert self.leader, "the container's init did not start"
        r = self.run("systemctl", "is-system-running", "--wait", timeout=timeout)
        failed = self.run("systemctl", "--failed").stdout
        assert r.stdout.strip() in ("running", "degraded"), r.stdout + r.stderr + failed

    def _init_pid(self) -> int:
        """The container's PID 1: the child of nspawn that runs systemd."""
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                try:
                    if Path(f"/proc/{c}/comm").read_text().strip() == "systemd":
                        return c
                except OSError:
                    continue
                todo.append(c)
        return 0

    def run(self, *argv: str, timeout: float = 120, input: Optional[str] = None) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", *argv], capture_output=True,
                              text=True, timeout=timeout, input=input)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.run("systemctl", "show", unit, *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def write(self, path: str, text: str) -> None:
        r = self.run("sh", "-c", f"cat > {path}", input=text)
        assert r.returncode == 0, r.stderr

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout

    def poweroff(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to nspawn powers the container off
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    t: dict[str, float] = {}
    yield t
    print("\ntest_installed_unit times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))


@pytest.fixture(scope="module")
def container(tmp_path_factory, timings):
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (deps/test-packages.txt)")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("installed-unit")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "scripts/build-deb.sh"), str(work)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    deb = Path(r.stdout.strip().splitlines()[-1])
    timings["make deb"] = time.monotonic() - t0

    t0 = time.monotonic()
    base = base_root()
    timings["debootstrap (cached after the first run)"] = time.monotonic() - t0
    t0 = time.monotonic()
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    before = installed_packages(root)
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    # What the README tells the admin, literally (recommends included).
    binds = (f"{deb}:/root/{deb.name}", f"{ARCHIVES}:/var/cache/apt/archives")
    r = nspawn(root, "sh", "-c", f"apt-get update -q && apt-get install -y -q ./{deb.name}", binds=binds,
               chdir="/root")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pulled = installed_packages(root) - before
    # The NFS server an admin runs beside bootd for client roots (the kernel's is not available here):
    # NFS-Ganesha from Debian, its ganesha.conf including the exports file bootd renders.
    r = nspawn(root, "sh", "-c", "apt-get install -y -q nfs-ganesha nfs-ganesha-vfs", binds=binds[1:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # PostgreSQL for the state of several servers (README "Several servers"): Debian's server and the
    # driver the package suggests. Not started by apt here (policy-rc.d); the container's systemd starts it.
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    r = nspawn(root, "sh", "-c", "apt-get install -y -q postgresql python3-psycopg", binds=binds[1:])
    (root / "usr/sbin/policy-rc.d").unlink()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (root / "etc/ganesha/ganesha.conf").write_text(GANESHA_CONF)
    (root / "etc/ganesha/bootd-exports.conf").write_text("# rendered by bootd (nfs.roots)\n")  # before the first start
    (root / "srv/clientroot").mkdir(parents=True, exist_ok=True)
    (root / "srv/clientroot/hello.txt").write_text("hello from the client root\n")
    lab = Lab()
    c = Container(root, work / "console.log", lab)
    c.pulled = pulled
    timings["apt install ./bootd.deb"] = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        c.boot()
        timings["boot to multi-user"] = time.monotonic() - t0
        yield c
    finally:
        c.poweroff()
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


def test_apt_install_pulls_runtime_dependencies_only(container):
    pulled = container.pulled
    assert "bootd" in pulled
    for need in ("qemu-utils", "qemu-system-common", "ipxe", "pxelinux", "grub-efi-amd64-bin", "python3-libnbd",
                 "shim-signed", "grub-efi-amd64-signed"):
        assert need in pulled, sorted(pulled)
    compilers = {p for p in pulled if re.fullmatch(r"(gcc|cpp|g\+\+|clang|binutils)(-\d+)?", p)}
    assert not compilers, sorted(compilers)
    for path in ("/usr/bin/bootd", "/usr/bin/bootctl", CONFIG, "/var/lib/bootd", "/lib/systemd/system/bootd.service"):
        assert container.run("test", "-e", path).returncode == 0, path
    helpers = container.run("ls", "/usr/lib/bootd/helpers").stdout.split()
    assert len(helpers) == 3 and any(h.endswith(".so") for h in helpers), helpers


def test_enabled_unit_starts_ready_with_watchdog_and_prebuilt_helpers(container):
    c = container
    assert c.run("systemctl", "is-enabled", "bootd").stdout.strip() == "enabled"
    r = c.run("systemctl", "restart", "bootd")
    assert r.returncode == 0, r.stderr + c.journal("bootd")
    s = c.show("bootd", "ActiveState", "SubState", "Type", "WatchdogUSec", "StatusText", "MainPID")
    assert s["ActiveState"] == "active" and s["SubState"] == "running", s  # Type=notify: READY=1 arrived
    assert s["WatchdogUSec"] == "30s", s
    assert s["StatusText"], s  # the daemon's STATUS= line
    stat = c.run("cat", f"/proc/{s['MainPID']}/stat").stdout
    assert int(stat[stat.rindex(")") + 2:].split()[16]) == -10, stat  # Nice= of the unit (issue 22)
    # the watchdog is fed: the time of the last WATCHDOG=1 moves on (pings at half WatchdogSec)
    first = int(c.show("bootd", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    wait_for(lambda: int(c.show("bootd", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > first,
             40, "a watchdog ping")
    status = c.run("bootctl", "status")
    assert status.returncode == 0, status.stderr
    # the C helpers come from the package: the pump runs from /usr/lib/bootd/helpers, nothing compiled
    exes = c.run("sh", "-c", "ls -l /proc/[0-9]*/exe 2>/dev/null").stdout
    assert "/usr/lib/bootd/helpers/tftp-pump-" in exes, exes + c.journal("bootd")
    assert "data_pump.mode      c" in status.stdout and "data_pump.up        yes" in status.stdout, status.stdout
    assert c.run("test", "-e", "/usr/bin/gcc").returncode != 0
    # the Secure Boot chain from Debian's signed packages, stocked into the boot root at start (issue 21)
    for f in ("secureboot/shimx64.efi", "secureboot/grubx64.efi", "secureboot/mmx64.efi", "grubx64.efi", "ipxe.efi"):
        assert c.run("test", "-s", f"/var/lib/bootd/boot/{f}").returncode == 0, f + c.journal("bootd")


HOST_YAML = """
hosts:
  - mac: "52:54:00:aa:bb:01"
    name: pc-systemd-test
"""


def test_reload_applies_a_change_and_keeps_the_old_config_when_broken(container):
    c = container
    good = c.run("cat", CONFIG).stdout
    c.write(CONFIG, good + HOST_YAML)
    r = c.run("systemctl", "reload", "bootd")
    assert r.returncode == 0, r.stderr + c.journal("bootd")
    wait_for(lambda: "pc-systemd-test" in c.run("bootctl", "hosts").stdout, 30, "the reloaded host list")
    pid = c.show("bootd", "MainPID")["MainPID"]

    broken = (good + HOST_YAML).replace("  level: info ", "  level: loud ", 1)
    line = [n for n, text in enumerate(broken.splitlines(), 1) if text.startswith("  level: loud")][0]
    c.write(CONFIG, broken)
    r = c.run("systemctl", "reload", "bootd")
    assert r.returncode != 0  # the admin sees the reload refused
    assert f"bootd.yaml:{line} log.level" in c.journal("bootd"), c.journal("bootd")[-2000:]
    s = c.show("bootd", "ActiveState", "MainPID")
    assert s["ActiveState"] == "active" and s["MainPID"] == pid, s
    assert "pc-systemd-test" in c.run("bootctl", "hosts").stdout  # still the old (good) config
    c.write(CONFIG, good)


def test_start_with_a_broken_config_fails_with_file_and_line_and_stop_is_clean(container):
    c = container
    good = c.run("cat", CONFIG).stdout
    stops_before = c.journal("bootd").count("stopping")
    r = c.run("systemctl", "stop", "bootd")
    assert r.returncode == 0, r.stderr
    s = c.show("bootd", "ActiveState", "Result", "ExecMainStatus")
    assert s == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, s
    assert c.journal("bootd").count("stopping") > stops_before  # SIGTERM handled by bootd, not a kill
    assert "tftp-pump" not in c.run("sh", "-c", "ls -l /proc/[0-9]*/exe 2>/dev/null").stdout

    broken = good.replace('  mode: "off"', "  mode: sometimes", 1)
    line = [n for n, text in enumerate(broken.splitlines(), 1) if text == "  mode: sometimes"][0]
    c.write(CONFIG, broken)
    r = c.run("systemctl", "start", "bootd")
    assert r.returncode != 0
    assert c.show("bootd", "ActiveState")["ActiveState"] in ("failed", "inactive", "activating")
    assert f"bootd.yaml:{line} dhcp.mode" in c.journal("bootd"), c.journal("bootd")[-2000:]
    c.run("systemctl", "stop", "bootd")
    c.run("systemctl", "reset-failed", "bootd")
    c.write(CONFIG, good)
    r = c.run("systemctl", "start", "bootd")
    assert r.returncode == 0, r.stderr + c.journal("bootd")[-2000:]


DASHBOARD_PROBE = r"""
import http.client, re, sys
def req(method, path, body=None, headers={}):
    c = http.client.HTTPConnection("127.0.0.1", 8081, timeout=30)
    c.request(method, path, body, headers)
    r = c.getresponse()
    headers = {}
    for k, v in r.getheaders():  # several Set-Cookie lines: keep them all
        headers[k.lower()] = headers[k.lower()] + "\n" + v if k.lower() in headers else v
    return r.status, headers, r.read().decode()
status, headers, page = req("GET", "/ui/login")
assert status == 200 and "<h1>Log in</h1>" in page, (status, page[:500])
token = re.search(r'name="login_token" value="([^"]+)"', page).group(1)
login_cookie = headers["set-cookie"].split(";")[0]
assert req("GET", "/ui/static/ui.css")[0] == 200
form = f"name=alice&password={sys.argv[1]}&login_token={token}&next=/ui/rooms"
status, headers, _ = req("POST", "/ui/login", form, {"Content-Type": "application/x-www-form-urlencoded",
                                                     "Cookie": login_cookie})
assert status == 303 and "bootd_session=" in headers["set-cookie"], (status, headers)
session = re.search(r"bootd_session=[^;]+", headers["set-cookie"]).group(0)
status, _, page = req("GET", "/ui/rooms", headers={"Cookie": session})
assert status == 200 and "<h1>Rooms</h1>" in page and "pc-systemd-test" in page, (status, page[:500])
print("dashboard ok")
"""


def test_the_dashboard_runs_from_the_installed_package(container):
    """issue 18: templates and static files ship in the package; `ui.listen` on loopback (behind a proxy)
    after a reload; an admin logs in and sees the Rooms page."""
    c = container
    good = c.run("cat", CONFIG).stdout
    c.write(CONFIG, good + HOST_YAML + "ui:\n  listen: 127.0.0.1:8081\n  behind_proxy: true\n")
    r = c.run("systemctl", "reload", "bootd")
    assert r.returncode == 0, r.stderr + c.journal("bootd")
    r = c.run("bootctl", "admin", "add", "alice", "--password-stdin", input="installed-pw-1\n")
    assert r.returncode == 0, r.stderr
    r = c.run("python3", "-c", DASHBOARD_PROBE, "installed-pw-1")
    assert r.returncode == 0 and "dashboard ok" in r.stdout, r.stdout + r.stderr + c.journal("bootd")[-2000:]
    c.write(CONFIG, good)
    assert c.run("systemctl", "reload", "bootd").returncode == 0


def test_systemd_analyze_security_no_worse_than_before(container):
    r = container.run("systemd-analyze", "security", "--no-pager", "bootd.service")
    m = re.search(r"Overall exposure level for bootd.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= EXPOSURE_BEFORE, r.stdout[-3000:]


def serve_the_lab(c: Container, storage: str, **extra: object) -> None:
    """What the admin does to serve the lab: boot files and an image under `storage`, /etc/bootd/bootd.yaml
    edited to serve the lab's interface (plus `extra` top-level sections), restart, and the image
    imported. The caller keeps the config that was there before, to put it back."""
    assets = ensure_assets()
    boot = c.root / storage.lstrip("/") / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets.kernel, boot / "vmlinuz")
    shutil.copy(assets.initrd, boot / "initrd.img")
    shutil.copy(assets.image_a, c.root / storage.lstrip("/") / "os-A.qcow2")
    cfg = lab_config(c.lab, images={"demo": Path(storage) / "os-A.qcow2"})
    cfg.update({"storage": {"directory": storage}, "api": {"socket": "/run/bootd/api.sock"}, **extra})
    c.write(CONFIG, yaml.safe_dump(cfg, sort_keys=False))
    r = c.run("systemctl", "restart", "bootd")
    assert r.returncode == 0, r.stderr + c.journal("bootd")[-3000:]
    wait_for(lambda: "demo@v1" in c.run("bootctl", "snapshot", "list").stdout, 120, "the image's import")


def boot_a_lab_pc(c: Container, name: str, tmp_path: Path) -> LabPC:
    """A PC switched on in the lab (QEMU, iPXE) boots the image's snapshot, fresh, from the installed bootd."""
    pc = LabPC(c.lab, name, tmp_path)
    try:
        result = pc.boot(timeout=240)
    finally:
        pc.kill()
    assert result.ok, result.describe() + c.journal("bootd")[-3000:]
    assert result.marker == "A" and result.fresh is True, result.describe()
    hosts = c.run("bootctl", "hosts").stdout
    assert pc.mac in hosts and "demo@v1" in hosts, hosts
    return pc


def test_a_lab_pc_boots_from_the_installed_bootd(container, tmp_path, timings):
    """The admin's last step: edit /etc/bootd/bootd.yaml to serve the lab (interface, DHCP pool, an
    image), restart, and a PC switched on in the lab boots the image's snapshot from the packaged bootd."""
    c = container
    t0 = time.monotonic()
    good = c.run("cat", CONFIG).stdout
    try:
        serve_the_lab(c, "/var/lib/bootd")
        boot_a_lab_pc(c, "pc-installed", tmp_path)
        timings["a lab PC boots from the package"] = time.monotonic() - t0
    finally:
        c.write(CONFIG, good)
        c.run("systemctl", "restart", "bootd")


def test_nfs_exports_apply_under_the_sandbox(container):
    """A client root in the config: the sandboxed bootd writes NFS-Ganesha's exports file and reloads
    the server (the packaged nfs-ganesha.service), and a lab client reads the root over NFSv4."""
    c = container
    if c.run("systemctl", "is-active", "nfs-ganesha").stdout.strip() != "active":
        r = c.run("systemctl", "start", "nfs-ganesha")
        assert r.returncode == 0, r.stderr + c.journal("nfs-ganesha")[-2000:]
    cfg = {"interfaces": [{"name": c.lab.bridge, "address": f"{c.lab.server_ip}/{c.lab.subnet.prefixlen}"}],
           "dhcp": {"mode": "off"}, "nbd": {"enabled": False},
           "nfs": {"server": "ganesha", "roots": [{"name": "debian", "path": "/srv/clientroot"}]},
           "storage": {"directory": "/var/lib/bootd"}, "api": {"socket": "/run/bootd/api.sock"}}
    good = c.run("cat", CONFIG).stdout
    c.write(CONFIG, yaml.safe_dump(cfg, sort_keys=False))
    try:
        r = c.run("systemctl", "restart", "bootd")
        assert r.returncode == 0, r.stderr + c.journal("bootd")[-3000:]
        try:
            wait_for(lambda: '"ok"' in c.run("bootctl", "--json", "clientroot", "exports").stdout, 30,
                     "bootd's NFS export check")
        except AssertionError:
            raise AssertionError(c.run("bootctl", "--json", "clientroot", "exports").stdout
                                 + c.run("systemctl", "status", "nfs-ganesha", "--no-pager").stdout
                                 + c.journal("nfs-ganesha")[-2000:]
                                 + c.run("tail", "-40", "/var/log/ganesha/ganesha.log").stdout) from None
        assert "/srv/clientroot" in c.run("cat", "/etc/ganesha/bootd-exports.conf").stdout
        client = c.lab.add_client(address="10.77.0.70")
        r = client.ns.run(["nfs-cat", f"nfs://{c.lab.server_ip}/bootd/debian/hello.txt?version=4"], check=False,
                          timeout=30)
        assert r.returncode == 0 and r.stdout == "hello from the client root\n", (
            r.stderr + c.run("cat", "/etc/ganesha/bootd-exports.conf").stdout
            + c.run("tail", "-30", "/var/log/ganesha/ganesha.log").stdout
            + c.run("ls", "-la", "/srv/clientroot", "/srv").stdout)
        assert "Permission denied" not in c.journal("bootd") and "Read-only file system" not in c.journal("bootd")
    finally:
        c.write(CONFIG, good)
        c.run("systemctl", "restart", "bootd")


def test_the_installed_bootd_keeps_its_state_in_postgresql(container, tmp_path, timings):
    """An admin moves the state to PostgreSQL as the README says: a role and a database on Debian's
    postgresql, the URL with its password in /etc/bootd/state.env (mode 0600, read by the unit), restart.
    The sandboxed unit reaches the database, imports the image, a lab PC boots, and what bootd knows
    (the lease, the boot events with the server that wrote them, the server's heartbeat) is in the
    database; `bootctl backup` points to pg_dump. Then back to the SQLite default."""
    c = container
    t0 = time.monotonic()
    if c.run("systemctl", "is-active", "postgresql").stdout.strip() != "active":
        r = c.run("systemctl", "start", "postgresql")
        assert r.returncode == 0, r.stderr + c.journal("postgresql@15-main")[-2000:]
    wait_for(lambda: c.run("pg_isready", "-q", "-h", "127.0.0.1").returncode == 0, 60, "PostgreSQL")

    def sql(query: str, user: str = "postgres", db: str = "postgres") -> str:
        r = c.run("runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db,
                  "-c", query) if user == "postgres" else c.run(
            "env", "PGPASSWORD=lab-secret", "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-U", user, "-d", db, "-c", query)
        assert r.returncode == 0, query + ": " + r.stderr
        return r.stdout

    sql("DROP DATABASE IF EXISTS bootd")
    sql("DROP ROLE IF EXISTS bootd")
    sql("CREATE ROLE bootd LOGIN PASSWORD 'lab-secret'")
    sql("CREATE DATABASE bootd OWNER bootd")
    c.write("/etc/bootd/state.env", "BOOTD_STATE_URL=postgresql://bootd:lab-secret@127.0.0.1/bootd\n")
    assert c.run("chmod", "0600", "/etc/bootd/state.env").returncode == 0

    good = c.run("cat", CONFIG).stdout
    try:
        # a storage directory of its own: the snapshot files of the SQLite runs before are not this state's
        serve_the_lab(c, "/var/lib/bootd/pg", state={"server_name": "bootd-pg"})
        servers = c.run("bootctl", "servers").stdout
        assert "bootd-pg" in servers, servers
        assert sql("SELECT name FROM servers", "bootd", "bootd").split() == ["bootd-pg"]
        assert "demo" in sql("SELECT name FROM images", "bootd", "bootd").split()
        pc = boot_a_lab_pc(c, "pc-installed-pg", tmp_path)
        leases = sql(f"SELECT state FROM leases WHERE mac = '{pc.mac}'", "bootd", "bootd").split()
        assert "bound" in leases, leases
        writers = set(sql(f"SELECT DISTINCT server FROM boot_events WHERE mac = '{pc.mac}'", "bootd", "bootd").split())
        assert writers == {"bootd-pg"}, writers
        r = c.run("bootctl", "backup", "/var/lib/bootd/pg/state-backup.db")
        assert r.returncode != 0 and "pg_dump" in (r.stdout + r.stderr), r.stdout + r.stderr
        assert "Permission denied" not in c.journal("bootd")
        assert c.run("test", "-e", "/var/lib/bootd/pg/state.db").returncode != 0  # no SQLite file beside it
        timings["a lab PC boots with the state in PostgreSQL"] = time.monotonic() - t0
    finally:
        c.run("rm", "-f", "/etc/bootd/state.env")
        c.write(CONFIG, good)
        c.run("systemctl", "restart", "bootd")
