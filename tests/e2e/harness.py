"""End-to-end lab harness shared by tests/e2e and `make demo`: virtual lab PCs booting from the network.

A `LabPC` is a QEMU guest (TCG) on a tap device of a `Lab` bridge (tests/netns.py), booting with stock
firmware: SeaBIOS + QEMU's iPXE NIC ROM (`firmware="bios"`) or OVMF (`firmware="uefi"`; `BootdLab.pc`
gives it a virtio NIC without ROM, so OVMF's own PXE client fetches the UEFI loader as on a real PC), or
straight from `-kernel/-initrd` (`firmware="direct"`, for checking assets). `BootdLab` runs bootd on the
lab (the tests/conftest.py launcher), `running_peer_lab` the same lab served by dnsmasq + nginx + qemu-nbd.
`-nographic` makes SeaBIOS mirror the screen to COM1, so firmware, iPXE, the menus and the kernel/initrd
output all land in one serial log; `SerialLog` tails it and stamps each line with the time it appeared,
which gives the boot timeline. The client /init (scripts/assets/init) prints `BOOTD-MARKER:` and
`BOOTD-FRESH:` lines that `BootResult` parses.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]
ASSET_DIR = Path(os.environ.get("BOOTD_ASSETS", ROOT / ".cache" / "assets"))
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# OVMF's Secure Boot build with Microsoft's keys enrolled (PK/KEK/db: the UEFI CA that signed shim), as on
# a PC bought with Secure Boot on. Its flash is SMM-protected: it needs q35 with SMM and secure pflash.
OVMF_CODE_SECURE = Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
OVMF_VARS_SECURE = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
FIRMWARES = ("bios", "uefi", "uefi-secureboot", "direct")


# ------------------------------------------------------------------------------------------------
# Assets

@dataclass(frozen=True)
class Assets:
    """What scripts/build-assets.sh leaves in .cache/assets."""

    dir: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    image_a: Path
    image_b: Path


def ensure_assets(build: bool = True) -> Assets:
    """Build the assets if needed (idempotent, a no-op taking ~0.1 s when they are current)."""
    if build:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True,
                           env=dict(os.environ, BOOTD_ASSETS=str(ASSET_DIR)), timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/build-assets.sh failed ({r.returncode}):\n{r.stderr[-3000:]}")
    a = Assets(dir=ASSET_DIR, kernel=ASSET_DIR / "vmlinuz", initrd=ASSET_DIR / "initrd.img",
               kernel_version=(ASSET_DIR / "kernel-version").read_text().strip(),
               image_a=ASSET_DIR / "images" / "os-A.qcow2", image_b=ASSET_DIR / "images" / "os-B.qcow2")
    for p in (a.kernel, a.initrd, a.image_a, a.image_b):
        if not p.is_file():
            raise RuntimeError(f"asset missing: {p}")
    return a


# ------------------------------------------------------------------------------------------------
# Serial log

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


class SerialLog:
    """Tails a QEMU `-serial file:` log; every complete line is kept with the time it showed up."""

    def __init__(self, path: Path, t0: float):
        self.path = path
        self.t0 = t0
        self.lines: list[tuple[float, str]] = []
        self._buf = b""
        self.partial = ""
        self._pos = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._pos += len(data)
        now = time.monotonic() - self.t0
        self._buf += data
        # iPXE redraws progress with \r; SeaBIOS mirroring emits \r\n. Both end a visible line.
        parts = re.split(rb"\r\n|\n|\r", self._buf)
        self._buf = parts.pop()
        new = [(now, _ANSI.sub("", p.decode("utf-8", "replace")).strip()) for p in parts]
        new = [(t, s) for t, s in new if s]
        with self._cond:
            self.lines.extend(new)
            # a menu is drawn with cursor moves and no newline until it is left: keep the open line visible
            self.partial = _ANSI.sub(" ", self._buf[-16384:].decode("utf-8", "replace"))
            self._cond.notify_all()

    def _loop(self) -> None:
        while not self._stop:
            self._read()
            time.sleep(0.05)
        self._read()

    def wait_for(self, pattern: str, timeout: float, alive=None) -> Optional[re.Match]:
        """First line matching `pattern` (regex), waiting up to `timeout` s or until `alive()` is false."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for _, line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                m = rx.search(self.partial)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (alive is not None and not alive()):
                    return None
                self._cond.wait(min(left, 0.2))

    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        if self._buf.strip():
            now = time.monotonic() - self.t0
            self.lines.append((now, _ANSI.sub("", self._buf.decode("utf-8", "replace")).strip()))
            self._buf = b""


# ------------------------------------------------------------------------------------------------
# Boot results and timelines

# Milestones on the serial console, in boot order: (name, regex). The first line matching each gives
# the time it was reached, counted from QEMU's start.
MILESTONES = [
    ("firmware", r"."),                                             # first output of SeaBIOS / OVMF
    ("ipxe", r"iPXE initialising devices|^iPXE \d"),               # iPXE (NIC ROM or loaded loader) runs
    ("dhcp", r"^net\d: \d+\.\d+\.\d+\.\d+/"),                  # iPXE got its address
    ("loader", r"(undionly\.kpxe|ipxe\.efi|snponly\.efi|pxelinux\.0)\b"),  # chained boot program named
    ("menu", r"\[script\]|\.ipxe\.\.\. ?ok|PXELINUX \d|^boot:"),     # menu / script loaded
    ("kernel", r"vmlinuz.*\.\.\. ?ok|^Loading .*vmlinuz"),          # kernel downloaded
    ("initrd", r"initrd[^ ]*\.\.\. ?ok|^Loading .*initrd.*ok"),     # initrd downloaded
    ("init", r"^BOOTD-STAGE: init "),                               # client /init started
    ("client-dhcp", r"^BOOTD-STAGE: dhcp "),                         # client Linux got its address
    ("disk", r"^BOOTD-STAGE: nbd "),                                 # NBD disk attached
    ("marker", r"^BOOTD-MARKER:"),                                   # disk mounted, marker read
    ("poweroff", r"^BOOTD-STAGE: poweroff|reboot: Power down"),
]


# Serial lines after which a boot cannot reach its marker any more.
FATAL = (r"Kernel panic - not syncing|No bootable device|PXE-E16: No valid offer|Boot Failed\.|"
         r"BdsDxe: No bootable option")


@dataclass
class BootResult:
    """What one boot of a lab PC showed on its serial console."""

    name: str
    mac: str
    marker: Optional[str]
    fresh: Optional[bool]
    ip: Optional[str]
    errors: list[str]
    stages: dict[str, float]          # BOOTD-STAGE name -> guest uptime (s)
    milestones: dict[str, float]      # MILESTONES name -> seconds since QEMU start (host clock)
    elapsed: float                    # QEMU start to exit (or to the timeout)
    exit_code: Optional[int]
    log: str
    config_url: Optional[str] = None
    nbd: Optional[str] = None
    secureboot: Optional[str] = None  # BOOTD-SECUREBOOT: enabled | disabled | no-uefi
    started_at: float = 0.0           # wall clock (time.time()) when QEMU was started

    @property
    def ok(self) -> bool:
        return self.marker is not None and self.fresh is not None and not self.errors

    def describe(self, tail: int = 60) -> str:
        lines = self.log.splitlines()[-tail:]
        return (f"{self.name} ({self.mac}): marker={self.marker!r} fresh={self.fresh} ip={self.ip} "
                f"errors={self.errors} exit={self.exit_code} elapsed={self.elapsed:.1f}s\n"
                f"--- last {len(lines)} serial lines ---\n" + "\n".join(lines))

    def timeline(self) -> list[tuple[str, float]]:
        return sorted(self.milestones.items(), key=lambda kv: kv[1])


CLIENT_STEPS = {  # serial milestones shown in a boot timeline, with what they mean
    "firmware": "firmware prints its first line",
    "ipxe": "iPXE runs",
    "init": "client kernel started /init",
    "client-dhcp": "client Linux got its address",
    "disk": "client attached its NBD disk",
    "marker": "disk mounted, marker read",
    "poweroff": "client powers off",
}


def boot_timeline(result: BootResult, events: list[dict]) -> list[tuple[float, str, str, str]]:
    """One boot's timeline: (seconds since power-on, step, who saw it, what) from bootd's boot events
    (server clock) and the PC's serial milestones (host clock). Events of earlier boots are left out."""
    rows: list[tuple[float, str, str, str]] = [(0.0, "power-on", "qemu", "PC switched on")]
    for name, what in CLIENT_STEPS.items():
        if name in result.milestones:
            rows.append((result.milestones[name], name, "serial", what))
    if "init" in result.milestones and "init" in result.stages:
        rows.append((round(result.milestones["init"] - result.stages["init"], 2), "kernel-start", "serial",
                     "client kernel starts (init time minus its uptime)"))
    if "ipxe" in result.milestones and "PXELINUX" not in result.log and not any(
            e.get("kind") == "loader" and e.get("ts", 0) >= result.started_at - 1 for e in events):
        rows.append((result.milestones["ipxe"], "loader", "serial", "iPXE from the NIC ROM (nothing to fetch)"))
    for e in events:
        t = e.get("ts", 0) - result.started_at
        if t < -1 or t > result.elapsed + 5:
            continue
        d = e.get("detail") or {}
        if e.get("kind") == "disk" and d.get("snapshot"):
            rows.append((round(t, 2), "disk", "bootd", f"NBD export ready: {d['snapshot']}"
                         f"{' persistent' if d.get('persistent') else ''} "
                         f"({d.get('action', '?')}, {d.get('ms', '?')} ms)"))
            continue
        what = " ".join(str(x) for x in (
            d.get("type"), d.get("path") or d.get("file"), d.get("proto") or d.get("protocol"),
            f"-> {d['offered']}" if d.get("offered") else (f"ip {d['ip']}" if d.get("ip") else None),
            d.get("arch"), d.get("snapshot"), d.get("message"),
            f"{e['nbytes']} B" if e.get("nbytes") else None,
            f"in {e['duration'] * 1000:.0f} ms" if e.get("duration") else None) if x)
        rows.append((round(t, 2), e.get("kind", "?"), "bootd", what))
    return sorted(rows, key=lambda r: r[0])


def format_timeline(rows: list[tuple[float, str, str, str]]) -> str:
    return "\n".join(f"  {t:7.2f} s  {step:<13} {who:<6} {what}" for t, step, who, what in rows)


def parse_serial(lines: list[tuple[float, str]]) -> dict:
    out: dict = {"marker": None, "fresh": None, "ip": None, "errors": [], "stages": {}, "milestones": {},
                 "config_url": None, "nbd": None, "secureboot": None}
    rx = [(n, re.compile(p)) for n, p in MILESTONES]
    for t, line in lines:
        for name, r in rx:
            if name not in out["milestones"] and r.search(line):
                out["milestones"][name] = round(t, 2)
        if line.startswith("BOOTD-MARKER:"):
            out["marker"] = line.split(":", 1)[1].strip()
        elif line.startswith("BOOTD-FRESH:"):
            out["fresh"] = line.split(":", 1)[1].strip() == "yes"
        elif line.startswith("BOOTD-IP:"):
            parts = line.split()
            out["ip"] = parts[2].split("/")[0] if len(parts) > 2 else None
        elif line.startswith("BOOTD-ERROR:"):
            out["errors"].append(line.split(":", 1)[1].strip())
        elif line.startswith("BOOTD-CONFIG:"):
            out["config_url"] = line.split(":", 1)[1].strip()
        elif line.startswith("BOOTD-SECUREBOOT:"):
            out["secureboot"] = line.split(":", 1)[1].strip()
        elif line.startswith("BOOTD-NBD:"):
            out["nbd"] = line.split(":", 1)[1].strip()
        elif line.startswith("BOOTD-STAGE:"):
            parts = line.split()
            if len(parts) >= 3:
                try:
                    out["stages"].setdefault(parts[1], float(parts[2]))
                except ValueError:
                    pass
    return out


# ------------------------------------------------------------------------------------------------
# Lab PCs

def qemu_accel() -> str:
    """"kvm" only where it really works: /dev/kvm opens AND the CPU shows vmx/svm (a PVM /dev/kvm without
    them boots nothing, see FIELD-NOTES); else "tcg". BOOTD_E2E_ACCEL=tcg|kvm overrides."""
    forced = os.environ.get("BOOTD_E2E_ACCEL")
    if forced in ("tcg", "kvm"):
        return forced
    from snapshots.bootfiles import kvm_usable  # the rule the server's own libguestfs appliance follows

    return "kvm" if kvm_usable() else "tcg"


class LabPC:
    """One virtual lab PC: QEMU (TCG) on a tap of the lab bridge, run inside the lab's server namespace."""

    def __init__(self, lab, name: str, workdir: Path, mac: Optional[str] = None, firmware: str = "bios",
                 nic: str = "virtio-net-pci", memory: int = 256, kernel: Optional[Path] = None,
                 initrd: Optional[Path] = None, append: str = "", extra_args: Iterable[str] = (),
                 rom: Optional[str] = None, reboot: bool = False):
        if firmware not in FIRMWARES:
            raise ValueError(f"firmware must be one of {', '.join(FIRMWARES)}, not {firmware!r}")
        self.lab = lab
        self.name = name
        self.mac = (mac or lab.next_mac()).lower()
        self.firmware = firmware
        # QEMU NIC: virtio-net-pci by default (with QEMU's iPXE ROM for SeaBIOS): its link is up at once in
        # Linux, where e1000 (QEMU's default) needs ~2 s of link negotiation per boot. e1000/e1000e work too.
        self.nic = nic
        self.rom = rom  # None: QEMU's default NIC ROM (iPXE); "": none (OVMF then PXE-boots natively)
        self.memory = memory
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.extra_args = list(extra_args)
        # a real PC's firmware starts over after a failed network boot: SeaBIOS reboots 1 s after "No
        # bootable device" (reboot-timeout), and QEMU does reboot (no -no-reboot). Default: a failed boot
        # ends the test's QEMU at once.
        self.reboot = reboot
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tap = lab.add_tap()
        # The QMP socket lives in a short private directory: AF_UNIX paths are limited to 107 bytes, and the
        # log directory (checkout path + test name) is often longer than that.
        self._sockdir = Path(tempfile.mkdtemp(prefix="bootd-pc-"))
        weakref.finalize(self, shutil.rmtree, str(self._sockdir), True)
        self.proc: Optional[subprocess.Popen] = None
        self.serial: Optional[SerialLog] = None
        self.boots = 0
        self.t0 = 0.0
        self.results: list[BootResult] = []

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.boot{self.boots}.serial.log"

    def argv(self) -> list[str]:
        machine = "q35,smm=on" if self.firmware == "uefi-secureboot" else "pc"
        a = ["qemu-system-x86_64", "-name", self.name, "-machine", machine, "-accel", qemu_accel(),
             "-m", str(self.memory), "-smp", "1", "-nographic", "-monitor", "none",
             "-serial", f"file:{self.log_path}", *([] if self.reboot else ["-no-reboot"]),
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-netdev", f"tap,id=lan,ifname={self.tap},script=no,downscript=no",
             "-device", f"{self.nic},netdev=lan,mac={self.mac}" + ("" if self.rom is None else f",romfile={self.rom}")]
        if self.firmware in ("uefi", "uefi-secureboot"):
            secure = self.firmware == "uefi-secureboot"
            vars_copy = self.workdir / f"{self.name}.OVMF_VARS{'.secure' if secure else ''}.fd"
            if not vars_copy.exists():
                shutil.copy(OVMF_VARS_SECURE if secure else OVMF_VARS, vars_copy)
            if secure:
                a += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
            a += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECURE if secure else OVMF_CODE}",
                  "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}", "-boot", "n"]
        elif self.firmware == "bios":
            a += ["-boot", "order=n,reboot-timeout=1000" if self.reboot else "n"]
        else:
            if not (self.kernel and self.initrd):
                raise ValueError("firmware='direct' needs kernel and initrd")
            a += ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.append]
        return a + self.extra_args

    def start(self) -> "LabPC":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        self.boots += 1
        self.qmp_path.unlink(missing_ok=True)  # the last run's socket: QMP calls wait for the new one
        self.log_path.write_bytes(b"")
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.serial = SerialLog(self.log_path, self.t0)
        self.proc = self.lab.server.popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=open(self.workdir / f"{self.name}.qemu.err", "ab"))
        return self

    @property
    def qmp_path(self) -> Path:
        return self._sockdir / "qmp"

    def qmp(self, *commands: dict, gap: float = 0.0) -> list[dict]:
        """Run QMP commands ({"execute": ..., "arguments": ...}) on this PC's QEMU, in order, `gap`
        seconds apart; their returns (an error raises)."""
        import json
        import socket

        out = []
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            while True:
                try:
                    sock.connect(str(self.qmp_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    # QEMU makes its socket a moment after it starts
                    if not self.running() or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            f = sock.makefile("rwb")

            def call(cmd: dict) -> dict:
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "return" in msg or "error" in msg:
                        if "error" in msg:
                            raise RuntimeError(f"QMP {cmd['execute']}: {msg['error']}")
                        return msg

            json.loads(f.readline())  # greeting
            call({"execute": "qmp_capabilities"})
            for cmd in commands:
                out.append(call(cmd)["return"])
                if gap:
                    time.sleep(gap)
        return out

    def send_keys(self, *keys: str, gap: float = 0.3) -> None:
        """Press keys on the PC's keyboard (QMP send-key, QEMU qcodes: "down", "ret", "1", "tab" ...), as
        a person at the lab PC would in a boot menu."""
        self.qmp(*({"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": k}]}} for k in keys),
                 gap=gap)

    def press_together(self, *keys: str) -> None:
        """Press keys at once, as a chord: press_together("ctrl", "alt", "f8")."""
        self.qmp({"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": k} for k in keys]}})

    def screendump(self, path: Path, fmt: str = "ppm") -> Path:
        """The PC's own display (its VGA), as QEMU draws it: ppm or png."""
        self.qmp({"execute": "screendump", "arguments": {"filename": str(path), "format": fmt}})
        return path

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 120.0) -> BootResult:
        """Wait for the guest to power off (or the timeout), then parse its serial log."""
        assert self.proc is not None and self.serial is not None
        deadline = self.t0 + timeout
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                self.kill()
                break
            # A boot that can no longer succeed ends now rather than at the timeout.
            if self.serial.wait_for(FATAL, timeout=0.3, alive=self.running) is not None:
                time.sleep(1.0)  # let the rest of the message reach the log
                self.kill()
                break
        elapsed = time.monotonic() - self.t0
        self.serial.stop()
        parsed = parse_serial(self.serial.lines)
        r = BootResult(name=self.name, mac=self.mac, elapsed=round(elapsed, 2), exit_code=self.proc.returncode,
                       log=self.serial.text(), started_at=self.t0_wall, **parsed)
        self.results.append(r)
        return r

    def boot(self, timeout: float = 120.0) -> BootResult:
        return self.start().wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def boot_all(pcs: list[LabPC], timeout: float = 180.0, stagger: float = 0.0) -> list[BootResult]:
    """Boot several PCs at once (all started, then all awaited); results in the order of `pcs`."""
    try:
        for pc in pcs:
            pc.start()
            if stagger:
                time.sleep(stagger)
        return [pc.wait(timeout) for pc in pcs]  # each PC's timeout counts from its own start
    finally:
        for pc in pcs:
            pc.kill()


# ------------------------------------------------------------------------------------------------
# Peers run in the lab: dnsmasq (DHCP stand-in / proxyDHCP site server), qemu-nbd, a static HTTP server

def start_dnsmasq(lab, workdir: Path, *, range_start: str = "10.77.0.150", range_end: str = "10.77.0.249",
                  extra: Iterable[str] = (), tftp_root: Optional[Path] = None, ns=None,
                  interface: Optional[str] = None) -> subprocess.Popen:
    """dnsmasq on the lab bridge (or on `interface` in namespace `ns`: a separate site DHCP server);
    DHCP only unless `tftp_root`. Returns once it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    ns = ns or lab.server
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-hosts",
            f"--interface={interface or lab.bridge}", "--bind-interfaces",
            f"--dhcp-range={range_start},{range_end},1h",
            f"--dhcp-leasefile={workdir}/dnsmasq.leases", "--no-ping", "--log-dhcp",
            f"--log-facility={workdir}/dnsmasq.log", f"--pid-file={workdir}/dnsmasq.pid", *extra]
    if tftp_root is not None:
        argv += ["--enable-tftp", f"--tftp-root={tftp_root}"]
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=open(workdir / "dnsmasq.err", "ab"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {(workdir / 'dnsmasq.err').read_text()}")
        if "67" in ns.run(["ss", "-lunH", "sport = :67"], check=False).stdout:
            return p
        time.sleep(0.05)
    raise RuntimeError("dnsmasq did not start listening on :67")


def start_qemu_nbd(lab, image: Path, export: str, port: int = 10809, fmt: str = "qcow2",
                   snapshot: bool = False, shared: int = 16) -> subprocess.Popen:
    """qemu-nbd serving `image` as `export` on the lab's server address (one export per process), to at
    most `shared` clients at once."""
    argv = ["qemu-nbd", "-f", fmt, "-x", export, "-b", lab.server_ip, "-p", str(port), "-t", f"--shared={shared}"]
    if snapshot:
        argv.append("--snapshot")
    p = lab.server.popen(argv + [str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_tcp(lab, port)
    return p


def wait_tcp(lab, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port}" in lab.server.run(["ss", "-ltnH", f"sport = :{port}"], check=False).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on TCP {port} in {lab.server.name}")


# ------------------------------------------------------------------------------------------------
# bootd in the lab

def asset_script(script: str, *keys: str) -> dict[str, str]:
    """Run scripts/<script> (a cached asset builder) and return its key=value lines; fails the test with
    the script's stderr, or when one of `keys` is missing."""
    import pytest

    r = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"scripts/{script} failed:\n{r.stderr[-3000:]}")
    out = dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)
    missing = [k for k in keys if not out.get(k)]
    if missing:
        pytest.fail(f"scripts/{script} printed no {', '.join(missing)}:\n{r.stdout}")
    return out


def prepare_boot_root(boot_root: Path, assets: Assets) -> None:
    """What an admin puts in the boot root: the client kernel and initrd. (bootd itself copies the stock
    loaders, undionly.kpxe, ipxe.efi, pxelinux.0 and its modules, from Debian's packages at start.)"""
    boot_root.mkdir(parents=True, exist_ok=True)
    for src, name in ((assets.kernel, "vmlinuz"), (assets.initrd, "initrd.img")):
        shutil.copy(src, boot_root / name)


def lab_config(lab, *, images: Optional[dict[str, Optional[Path]]] = None, dhcp_mode: str = "full",
               menu_timeout: int = 0, hosts: Iterable[dict] = (), groups: Optional[list[dict]] = None,
               pool: Optional[tuple[str, str]] = None, **sections) -> dict:
    """A bootd config for the lab. `images` maps image name -> disk imported as its v1 (kernel/initrd are
    the assets'); one group `lab` boots them all (first one default) unless `groups` is given.
    `sections` replace or add whole top-level sections."""
    images = images if images is not None else {}
    names = list(images)
    net = lab.subnet.network_address
    pool = pool or (str(net + 100), str(net + 149))
    cfg: dict = {
        "interfaces": [{"name": lab.bridge, "address": f"{lab.server_ip}/{lab.subnet.prefixlen}"}],
        "dhcp": {"mode": dhcp_mode, "lease_time": 600,
                 "pools": [] if dhcp_mode != "full" else
                 [{"interface": lab.bridge, "start": pool[0], "end": pool[1]}]},
        "http": {"port": 8080},
        # every entry for students (issue 17's default is the current snapshot only): the e2e PCs pick others
        "menu": {"timeout": menu_timeout, "title": "bootd lab", "student_entries": ["current", "previous", "images"]},
        "log": {"level": "info"},
        "images": [{"name": n, "title": f"{n} test OS", "kernel": "vmlinuz", "initrd": "initrd.img",
                    "cmdline": "quiet", **({"disk": str(d)} if d else {})} for n, d in images.items()],
        "groups": groups if groups is not None else
        [{"name": "lab", "images": names, **({"default_image": names[0]} if names else {})}],
        "hosts": list(hosts),
    }
    cfg.update(sections)
    return cfg


class BootdLab:
    """bootd serving a Lab: the daemon (a tests/conftest.py BootdProcess), its boot root, lab PCs."""

    def __init__(self, lab, daemon, assets: Assets, workdir: Path):
        self.lab = lab
        self.daemon = daemon
        self.assets = assets
        self.workdir = Path(workdir)
        self.pcs: list[LabPC] = []

    @classmethod
    def start(cls, lab, make_daemon, assets: Assets, workdir: Path, config: dict,
              wait_images: bool = True) -> "BootdLab":
        """`make_daemon(config, ns=..., start=False)` is the bootd_daemon fixture (or a BootdProcess maker)."""
        d = make_daemon(config, ns=lab.server, start=False)
        boot_root = Path(config.get("tftp", {}).get("root") or Path(d.storage) / "boot")
        prepare_boot_root(boot_root, assets)
        d.start()
        bl = cls(lab, d, assets, workdir)
        if wait_images:
            names = [i["name"] for i in config.get("images", []) if i.get("disk")]
            bl.wait_images(names)
            for name in names:  # an imported v1 boots once promoted (all groups), as an admin would do
                if not bl.daemon.api.get(f"/api/v1/images/{name}").get("assignments"):
                    bl.bootctl("snapshot", "promote", f"{name}@v1", check=False)
        return bl

    # -- admin side -------------------------------------------------------------------------------
    def bootctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.daemon.bootctl(*args, check=check)

    def bootctl_json(self, *args: str):
        import json
        return json.loads(self.daemon.bootctl(*args, "--json", check=True).stdout)

    def new_snapshot_from(self, image: str, parent: str, disk: Path, note: str) -> dict:
        """An admin's image update: draft on top of `parent`, make its content that of `disk`, seal.
        (The draft is written offline with qemu-img, as an admin with a prepared disk would.)"""
        draft = self.bootctl_json("snapshot", "draft", parent)
        subprocess.run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "qcow2", str(disk), draft["path"]],
                       check=True, capture_output=True)
        return self.bootctl_json("snapshot", "seal", draft["name"], "-n", note)

    def wait_images(self, names: list[str], timeout: float = 120.0) -> None:
        """Wait until each image imported from the config has a current snapshot (background import)."""
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in list(pending):
                try:
                    info = self.daemon.api.get(f"/api/v1/images/{name}")
                except Exception:
                    continue
                if _has_current(info):
                    pending.discard(name)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"images not imported after {timeout}s: {sorted(pending)}\n"
                                   f"{self.daemon.log()[-3000:]}")
            if self.daemon.proc.poll() is not None:
                raise RuntimeError(f"bootd exited ({self.daemon.proc.returncode}):\n{self.daemon.log()[-3000:]}")
            time.sleep(0.3)

    def events(self, mac: str) -> list[dict]:
        info = self.daemon.api.get(f"/api/v1/hosts/{mac}")
        return info.get("events", []) if isinstance(info, dict) else []

    # -- lab PCs ----------------------------------------------------------------------------------
    def pc(self, name: str, mac: Optional[str] = None, firmware: str = "bios", **kw) -> LabPC:
        if firmware == "uefi-secureboot":
            # 256 MiB is too little after OVMF's SMM reservations: the kernel's EFI stub fails to decompress
            kw.setdefault("memory", 512)
        if firmware in ("uefi", "uefi-secureboot"):
            # OVMF's own PXE client (VirtioNetDxe, no NIC ROM) asks DHCP for the UEFI loader, as a real
            # UEFI PC does; with QEMU's EFI iPXE ROM the loader step would be skipped.
            kw.setdefault("nic", "virtio-net-pci")
            kw.setdefault("rom", "")
        pc = LabPC(self.lab, name, self.workdir / "pcs", mac=mac, firmware=firmware, **kw)
        self.pcs.append(pc)
        return pc

    def close(self) -> None:
        for pc in self.pcs:
            pc.kill()


def _has_current(info) -> bool:
    """Whether an image detail from the API shows a current (or any sealed) snapshot."""
    if not isinstance(info, dict):
        return False
    for key in ("current", "current_snapshot"):
        v = info.get(key)
        if v:
            return True
    snaps = info.get("snapshots") or []
    return any(isinstance(s, dict) and s.get("state") == "sealed" for s in snaps)


def _bootd_process_class():
    """tests/conftest.py's BootdProcess (the one daemon launcher), loaded under its own module name so
    it works outside pytest (the demo) and never clashes with the other conftest.py modules."""
    name = "bootd_tests_launcher"
    mod = sys.modules.get(name)
    if mod is None:
        tests = str(ROOT / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod.BootdProcess


@contextmanager
def running_bootd_lab(workdir: Path, make_config: Callable[[object], dict], assets: Assets,
                      subnet: str = "10.77.0.0/24") -> Iterator[BootdLab]:
    """A fresh Lab with bootd serving it (config from `make_config(lab)`); everything removed afterwards,
    also on failure: PCs, bootd, the namespaces. bootd's log is left in `workdir/bootd.log`."""
    import ipaddress

    from netns import Lab

    BootdProcess = _bootd_process_class()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(subnet=ipaddress.IPv4Network(subnet))
    scratch = Path(tempfile.mkdtemp(prefix="bootd-e2e-"))  # bootd's storage: not kept with the logs
    daemons: list = []
    bl: Optional[BootdLab] = None

    def make_daemon(config: dict, ns=None, start: bool = False):
        wd = scratch / f"bootd{len(daemons)}"
        wd.mkdir()
        d = BootdProcess(wd, config, ns=ns)
        daemons.append(d)
        if start:
            d.start()
        return d

    try:
        bl = BootdLab.start(lab, make_daemon, assets, workdir, make_config(lab))
        yield bl
    finally:
        if bl is not None:
            bl.close()
        for d in daemons:
            try:
                d.stop(timeout=10)
            except Exception:
                pass
            d.close()
            try:
                (workdir / f"bootd{daemons.index(d) or ''}.log").write_text(d.log())
            except OSError:
                pass
        lab.close()
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The peer set-up the boot benchmark compares bootd with: dnsmasq + nginx + qemu-nbd

@contextmanager
def running_peer_lab(workdir: Path, assets: Assets, image: Optional[Path] = None,
                     subnet: str = "10.77.0.0/24", lab=None, pool: Optional[tuple[str, str]] = None,
                     extra: Iterable[str] = (), nginx_workers: str = "1", nbd_shared: int = 16) -> Iterator[object]:
    """The same lab served the classic way: dnsmasq (DHCP, RA, iPXE options 175/176, TFTP with
    undionly.kpxe/ipxe.efi), nginx (the iPXE script, kernel, initrd) and qemu-nbd --snapshot (a fresh
    copy-on-write view per process: restart it per boot with `lab.fresh_disk()`). Yields the Lab with
    `.pc(name, mac, firmware)` and `.fresh_disk()` attached. Given a `lab`, it serves that one (and
    leaves it standing), from `pool` (first, last address), with `extra` dnsmasq options; qemu-nbd takes
    `nbd_shared` clients at once (the boot storm: one per PC)."""
    import ipaddress

    from netns import Lab

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bootd-peer-"))
    os.chmod(scratch, 0o755)  # dnsmasq (TFTP) and nginx workers run as nobody
    own_lab = lab is None
    lab = lab if lab is not None else Lab(subnet=ipaddress.IPv4Network(subnet))
    pool = pool or (str(lab.subnet.network_address + 100), str(lab.subnet.network_address + 149))
    started: list[subprocess.Popen] = []
    nbd: list[subprocess.Popen] = []
    pcs: list[LabPC] = []
    try:
        ip = lab.server_ip
        root = scratch / "www"
        root.mkdir()
        shutil.copy(assets.kernel, root / "vmlinuz")
        shutil.copy(assets.initrd, root / "initrd.img")
        for loader in ("undionly.kpxe", "ipxe.efi"):
            shutil.copy(Path("/usr/lib/ipxe") / loader, root / loader)
        (root / "boot.ipxe").write_text(
            "#!ipxe\n"
            f"kernel http://{ip}:8080/vmlinuz initrd=initrd console=ttyS0 quiet bootd.server={ip} "
            f"bootd.nbd={ip}:10809/disk || goto failed\n"
            f"initrd --name initrd http://{ip}:8080/initrd.img || goto failed\n"
            "boot\n:failed\nshell\n")
        for p in root.iterdir():
            os.chmod(p, 0o644)
        os.chmod(root, 0o755)
        lab.server.run(["ip", "-6", "addr", "replace", "fd77::1/64", "dev", lab.bridge, "nodad"])
        started.append(start_dnsmasq(lab, scratch / "dnsmasq", tftp_root=root, range_start=pool[0],
                                     range_end=pool[1], extra=[*extra,
                          "--dhcp-match=set:ipxe,175", "--dhcp-match=set:efi64,option:client-arch,7",
                          f"--dhcp-boot=tag:ipxe,http://{ip}:8080/boot.ipxe",
                          "--dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi", "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
                          "--dhcp-option-force=tag:ipxe,encap:175,176,1",
                          "--enable-ra", "--dhcp-range=fd77::,ra-only"]))
        conf = scratch / "nginx.conf"
        conf.write_text(
            f"daemon off; worker_processes {nginx_workers}; pid {scratch}/nginx.pid; error_log {scratch}/nginx.err;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; sendfile on; default_type application/octet-stream;\n"
            f"  client_body_temp_path {scratch}/ngx_body; proxy_temp_path {scratch}/ngx_proxy;\n"
            f"  fastcgi_temp_path {scratch}/ngx_fcgi; uwsgi_temp_path {scratch}/ngx_uwsgi;\n"
            f"  scgi_temp_path {scratch}/ngx_scgi;\n"
            f"  server {{ listen {ip}:8080; root {root}; }} }}\n")
        started.append(lab.server.popen(["nginx", "-c", str(conf), "-e", str(scratch / "nginx.err")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_tcp(lab, 8080)
        disk = image or assets.image_a

        def fresh_disk() -> None:
            for p in nbd:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
            nbd.clear()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and ":10809" in lab.server.run(
                    ["ss", "-ltnH", "sport = :10809"], check=False).stdout:
                time.sleep(0.05)
            nbd.append(start_qemu_nbd(lab, disk, export="disk", snapshot=True, shared=nbd_shared))

        def pc(name: str, mac: Optional[str] = None, firmware: str = "bios", **kw) -> LabPC:
            if firmware == "uefi":
                kw.setdefault("nic", "virtio-net-pci")
                kw.setdefault("rom", "")
            p = LabPC(lab, name, workdir / "pcs", mac=mac, firmware=firmware, **kw)
            pcs.append(p)
            return p

        fresh_disk()
        lab.pc = pc
        lab.fresh_disk = fresh_disk
        yield lab
    finally:
        for p in pcs:
            p.kill()
        if own_lab:
            lab.close()
        else:  # the lab stays: stop what was started on it (nginx's workers go with their master)
            for p in started + nbd:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(p.pid, sig)
                        p.wait(timeout=10)
                        break
                    except ProcessLookupError:
                        break
                    except subprocess.TimeoutExpired:
                        continue
        shutil.rmtree(scratch, ignore_errors=True)
