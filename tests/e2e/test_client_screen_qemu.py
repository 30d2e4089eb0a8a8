"""The lab PC's screen, end to end (issue 19): a QEMU lab PC (TCG) PXE-boots bootd's menu, then the
client root's own kernel and initramfs; the client root comes up (over NBD as a snapshot of a `kind:
native` image, or read-only over NFS with a tmpfs overlay), its bootd-client unit fetches the host's
rendered units and starts them: two QEMU instances (each booting this PC's NBD export of a marker
guest, tests/e2e/markeros.py), two Xorg servers on VT7 and VT8, two VNC viewers full screen.

The checks look at the lab PC's own display (QMP screendump of the outer QEMU):
- the first guest's colour (or the second's) fills the screen;
- Ctrl+Alt+F8 shows the second guest, Ctrl+Alt+F7 the first again;
- a key typed at the PC reaches the first guest through Xorg, the viewer and VNC: it writes a mark on
  its disk, reads it back (magenta) and powers off; its unit restarts it with a fresh overlay, and it
  comes back clean (its colour again, never red: the mark it wrote is gone).

Times per phase, the server's bytes sent to the PC and the screenshots go to test-artifacts/client-screen/.
Minutes of TCG: opt-in (BOOTD_CLIENT_TEST=1, `make test-client`, or `make demo-client`); times in the README.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from harness import ROOT, LabPC, asset_script, lab_config, running_bootd_lab
from markeros import build_marker_disk, screen_state
from support import Ganesha

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(os.environ.get("BOOTD_CLIENT_TEST") != "1",
                       reason="long (a client root built and a PC booted to its screen under TCG): "
                              "BOOTD_CLIENT_TEST=1 or make test-client"),
]

ART = ROOT / "test-artifacts" / "client-screen"
MAC = "52:54:00:19:00:01"

# Serial-console lines that mark a phase (first match wins); the marker phase is the screenshot's.
PHASES = [
    ("ipxe", r"iPXE initialising devices|^iPXE \d"),
    ("dhcp", r"^net\d: \d+\.\d+\.\d+\.\d+/"),
    ("kernel loaded", r"vmlinuz.*\.\.\. ?ok"),
    ("initrd loaded", r"initrd[^ ]*\.\.\. ?ok"),
    ("linux", r"Linux version \d"),
    ("root mounted", r"Welcome to .*Debian"),
    ("instance 1 started", r"Started qemuinstance1"),
    ("X server 1 started", r"Started xserver1"),
    ("units fetched and started", r"bootd-client: started"),
    ("viewer 1 started", r"Started viewer1"),
]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def client_root() -> dict[str, str]:
    """The client root (tree, qcow2 image, kernel, initrd) built by `bootctl clientroot build`, cached."""
    out = asset_script("build-client-root.sh", "root", "image", "vmlinuz", "initrd")
    out["build"] = str(Path(out["image"]).parent / "build.json")
    return out


def clients_section() -> dict:
    def instance(name: str, image: str, vt: int) -> dict:
        return {"name": name, "image": image, "vt": vt, "memory": "32", "cpus": 1, "machine": "pc",
                "accel": "tcg", "disk_interface": "ide", "network": "none", "display": "vnc",
                "discard_writes": True, "overlay_dir": "/var/tmp"}
    return {"init": "systemd", "instances": [instance("guesta", "markera", 7), instance("guestb", "markerb", 8)],
            "xserver": {"program": "/usr/bin/Xorg", "blanking": False},
            "viewer": {"fullscreen": True}}


def tap_tx_bytes(lab, tap: str) -> int:
    """Bytes the server side sent to the PC (its tap's transmit counter, in the lab's namespace)."""
    return int(lab.server.run(["cat", f"/sys/class/net/{tap}/statistics/tx_bytes"]).stdout)


def server_cpu_seconds(lab, pc: LabPC) -> float:
    """CPU seconds used so far by every server process in the lab's namespace (bootd, its storage
    daemon and TFTP pump, Ganesha), the lab PC's own QEMU left out."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in lab.server.pids():
        if pc.proc is not None and pid == pc.proc.pid:
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


class Screen:
    """Screenshots of one lab PC, and waiting for a state of its screen (markeros.screen_state)."""

    def __init__(self, pc: LabPC, out: Path):
        self.pc, self.out = pc, out
        self.seen: list[tuple[float, str]] = []
        self._n = 0

    def state(self) -> str:
        self._n += 1
        shot = self.out / f".shot{self._n % 2}.ppm"
        self.pc.screendump(shot)
        s = screen_state(shot)
        if not self.seen or self.seen[-1][1] != s:
            self.seen.append((round(time.monotonic() - self.pc.t0, 1), s))
        return s

    def wait(self, want: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pc.running():
                pytest.fail(f"the lab PC stopped (exit {self.pc.proc.returncode}); screen states {self.seen}")
            s = self.state()
            if s in want:
                return s
            time.sleep(1.0)
        tail = "\n".join(line for _, line in self.pc.serial.lines[-40:])
        pytest.fail(f"screen never showed {sorted(want)} in {timeout:.0f} s; states {self.seen}; serial:\n{tail}")

    def keep(self, name: str) -> Path:
        return self.pc.screendump(self.out / f"{name}.png", fmt="png")


def wait_host(bl, ok, what: str, timeout: float = 60) -> dict:
    """The PC as `bootctl hosts` shows it, once `ok(host)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        host = bl.daemon.api.get(f"/api/v1/hosts/{MAC}")
        if ok(host):
            return host
        if time.monotonic() > deadline:
            pytest.fail(f"bootctl hosts never showed the PC {what}: {host.get('state')} {host.get('last_error')}")
        time.sleep(1)


def broken_update_rolled_back(bl, pc: LabPC, screen: Screen, cr: dict[str, str]) -> list[str]:
    """A client-root update is a snapshot like any OS update: v2 (its client hook lost, as a bad package
    would do) sealed and promoted -> the PC comes up without its screen and says why on its console;
    `bootctl snapshot rollback clientroot` -> the next boot shows the guest again."""
    scratch = Path(tempfile.mkdtemp(prefix="bootd-clientroot-v2-", dir="/var/tmp"))
    try:
        raw = scratch / "v2.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", cr["image"], str(raw)], check=True)
        r = subprocess.run(["debugfs", "-w", "-R", "rm /usr/local/sbin/bootd-client-start", str(raw)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "not found" not in r.stderr.lower(), r.stderr
        draft = bl.bootctl_json("snapshot", "draft", "clientroot@v1")
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), draft["path"]], check=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    v2 = bl.bootctl_json("snapshot", "seal", draft["name"], "-n", "client update that lost its hook")
    bl.bootctl("snapshot", "promote", v2["name"])
    pc.start()
    failed = pc.serial.wait_for(r"Failed to start .*bootd-client|bootd-client\.service: Failed", timeout=600,
                                alive=pc.running)
    assert failed is not None, "v2 should have failed to start the client hook"
    assert screen.state() == "none"
    screen.keep("v2-broken")
    # the admin is told: the PC is up on v2 (its disk is connected), but its screen failed, and why
    host = wait_host(bl, lambda h: h["state"] == "failed", "failed (its screen)")
    assert "bootd-client.service failed" in (host["last_error"] or ""), host
    pc.kill()
    say(f"v2 ({v2['name']}) promoted: the PC booted it and said: {failed.group(0)}; bootctl hosts: "
        f"{host['state']}: {host['last_error']}")
    bl.bootctl("snapshot", "rollback", "clientroot")
    pc.start()
    back = screen.wait({"A", "B"}, timeout=600)
    screen.keep(f"rolled-back-{back}")
    wait_host(bl, lambda h: h["state"] == "up", "up again")
    pc.kill()
    say(f"rolled back to v1: marker {back} on the screen again")
    return ["v1 marker", f"{v2['name']} no screen (hook failed)", f"rollback marker {back}"]


def run_client_screen(mode: str, assets, workdir: Path) -> dict:
    cr = client_root()
    out = ART / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    disks = {name: build_marker_disk(letter, workdir / f"{name}.raw") for name, letter in
             (("markera", "A"), ("markerb", "B"))}
    servers: list[Ganesha] = []

    def config(lab) -> dict:
        default = "clientroot" if mode == "nbd" else "markera"
        cfg = lab_config(lab, images=disks, hosts=[{"mac": MAC, "name": "labpc", "group": "lab"}],
                         groups=[{"name": "lab", "images": [default] + ([] if mode == "nfs" else ["markera"])
                                  + ["markerb"], "default_image": default, "student_entries": ["current"],
                                  "clients": clients_section()}])
        if mode == "nbd":
            # the client root is an image like any other: its snapshots are versions of the client
            cfg["images"].append({"name": "clientroot", "title": "bootd client root", "kind": "native"})
        else:
            # the client root's kernel and initramfs; the root itself read-only over NFS (Ganesha)
            for image in cfg["images"]:
                image.update(kernel="clientroot/vmlinuz", initrd="clientroot/initrd.img", cmdline="")
            g = Ganesha(lab.server, workdir / "ganesha")
            servers.append(g)
            cfg["nfs"] = g.nfs_config([{"name": "client", "path": cr["root"]}])
        return cfg

    try:
        with running_bootd_lab(workdir, config, assets) as bl:
            boot_root = Path(bl.daemon.storage) / "boot"
            if mode == "nbd":
                t = time.monotonic()
                r = bl.bootctl("image", "import", "clientroot", cr["image"])
                say(f"bootctl image import clientroot: {r.stdout.strip()} ({time.monotonic() - t:.0f} s)")
                bl.bootctl("snapshot", "promote", "clientroot@v1")
            else:
                (boot_root / "clientroot").mkdir(exist_ok=True)
                shutil.copy(cr["vmlinuz"], boot_root / "clientroot" / "vmlinuz")
                shutil.copy(cr["initrd"], boot_root / "clientroot" / "initrd.img")
                exports = bl.bootctl("clientroot", "exports", check=False)
                assert exports.returncode == 0, exports.stdout + exports.stderr

            pc = bl.pc("labpc", mac=MAC, memory=1536)
            screen = Screen(pc, out)
            tx0 = tap_tx_bytes(bl.lab, pc.tap)
            cpu0 = server_cpu_seconds(bl.lab, pc)
            pc.start()
            first = screen.wait({"A", "B"}, timeout=900)
            t_marker = time.monotonic() - pc.t0
            sent = tap_tx_bytes(bl.lab, pc.tap) - tx0
            cpu = server_cpu_seconds(bl.lab, pc) - cpu0
            nbd_reads = {str(d["snapshot"]): d.get("read_bytes") for d in bl.daemon.api.get("/api/v1/disks")["disks"]
                         if d["mac"] == MAC}
            screen.keep(f"first-{first}")
            # the client root told bootd its units started: bootctl hosts says so
            host = wait_host(bl, lambda h: any(e["kind"] == "client" for e in h["events"]), "report its screen")
            assert host["state"] == "up", host
            say(f"{mode}: marker {first} on the lab PC's screen {t_marker:.0f} s after power-on; "
                f"server sent {sent / 1e6:.1f} MB and used {cpu:.1f} s of CPU")

            # the second instance on VT8, the first on VT7: a person's Ctrl+Alt+Fn at the PC
            pc.press_together("ctrl", "alt", "f8")
            screen.wait({"B"}, timeout=120)
            screen.keep("vt8")
            pc.press_together("ctrl", "alt", "f7")
            screen.wait({"A"}, timeout=120)
            screen.keep("vt7")

            # a key at the PC reaches the guest: it writes its disk and powers off; it comes back clean
            pc.send_keys("w")
            screen.wait({"wrote"}, timeout=120)
            screen.keep("wrote")
            t_off = time.monotonic()
            screen.wait({"A", "dirty"}, timeout=300)
            restart = time.monotonic() - t_off
            screen.keep("after-restart")
            states = [s for _, s in screen.seen]
            assert "dirty" not in states, f"the guest's disk kept its write across the restart: {screen.seen}"
            serial = pc.serial.lines
            phases: dict[str, float] = {}
            for name, rx in PHASES:
                hit = next((t for t, line in serial if re.search(rx, line)), None)
                if hit is not None:
                    phases[name] = round(hit, 1)
            phases["marker on screen"] = round(t_marker, 1)
            order = [phases.get(k) for k in ("instance 1 started", "X server 1 started", "viewer 1 started")]
            assert None not in order and order == sorted(order), f"units out of order: {phases}"
            restarts = sum(1 for _, line in serial if re.search(r"qemuinstance1\.service: Scheduled restart", line))
            assert restarts >= 1, "systemd did not restart the powered-off instance"
            pc.kill()
            if mode == "nbd":
                versions = broken_update_rolled_back(bl, pc, screen, cr)
        build = json.loads(Path(cr["build"]).read_text())
        result = {"mode": mode, "phases": phases, "bytes_sent_to_pc": sent,
                  "nbd_read_bytes": nbd_reads, "server_cpu_seconds": round(cpu, 2),
                  "restart_seconds": round(restart, 1),
                  "screen_states": screen.seen, "client_root_bytes": build["bytes"],
                  "client_root_image_bytes": build["image_bytes"], "kernel": build["kernel"]}
        if mode == "nbd":
            result["client_root_versions"] = versions
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        say(f"{mode}: phases {phases}; restart {restart:.0f} s")
        return result
    finally:
        for g in servers:
            g.stop()


def test_client_screen_over_nbd(assets, pc_logs):
    run_client_screen("nbd", assets, pc_logs)


def test_client_screen_over_nfs(assets, pc_logs):
    run_client_screen("nfs", assets, pc_logs)
