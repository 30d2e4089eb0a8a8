"""The rendered jobs run for real: the qemuinstance command boots the host's disk served over NBD
(qemu-nbd behind the same `export_for` seam the NBD manager provides) under TCG, a second start after
the guest shut down is clean, and the rendered X server + viewer show the guest's screen."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import secrets
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import artifact_dir

from bootd.clientconfig.resolve import render_for
from bootd.config import parse_config
from bootd.daemon import Context
from bootd.state import open_state
from nbdexport.model import Export

from .guestdisk import ROOT, assets_ready, make_guest_disk

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

MAC = "52:54:00:77:00:21"


@pytest.fixture(scope="module")
def assets():
    if not assets_ready():
        subprocess.run([str(ROOT / "scripts" / "build-assets.sh")], check=True, timeout=900)
    assert assets_ready()


class QemuNbdExports:
    """Per-host exports with a random token, served by qemu-nbd in a namespace (the NBD seam)."""

    def __init__(self, ns, images: dict[str, Path]):
        self.ns, self.images, self.port = ns, images, 10809
        self.served: dict[tuple, Export] = {}

    def export_for(self, mac: str, snapshot=None) -> Export:
        image = snapshot or "guest"
        key = (mac, image)
        if key not in self.served:
            token = secrets.token_urlsafe(9).replace("-", "x").replace("_", "y")
            port = self.port
            self.port += 1
            self.ns.popen(["qemu-nbd", "-f", "raw", "-x", token, "-b", "127.0.0.1", "-p", str(port), "-t",
                           str(self.images[image])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(self.ns, port)
            self.served[key] = Export(mac=mac, name=token, host="127.0.0.1", port=port, snapshot_id=None,
                                      snapshot_name=image, size=self.images[image].stat().st_size,
                                      persistent=False, tls=False, boot=1, format="raw")
        return self.served[key]


def wait_port(ns, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
    while ns.run(["python3", "-c", probe], check=False).returncode != 0:
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.2)


def render(tmp_path: Path, ns, clients: dict, disk: Path) -> tuple[dict, QemuNbdExports]:
    cfg = parse_config(json.dumps({
        "images": [{"name": "guest"}],
        "groups": [{"name": "lab", "images": ["guest"], "clients": clients}],
        "hosts": [{"mac": MAC, "name": "vm-pc", "group": "lab"}],
    }))
    store = open_state(tmp_path / "state.db")
    disks = QemuNbdExports(ns, {"guest": disk})
    ctx = Context(config=cfg, config_path="test", store=store, disks=disks)
    try:
        rendered = asyncio.run(render_for(ctx, MAC))
    finally:
        store.close()
    return rendered.files, disks


def upstart_job(text: str) -> dict:
    """What Upstart would run for a job: env, pre-start command, exec command."""
    job = {"env": {}, "pre": None, "exec": None}
    for line in text.splitlines():
        if line.startswith("env "):
            k, _, v = line[4:].partition("=")
            job["env"][k] = shlex.split(v)[0]
        elif line.startswith("pre-start exec "):
            job["pre"] = line[len("pre-start exec "):]
        elif line.startswith("exec "):
            job["exec"] = line[5:]
    return job


def run_job(ns, text: str, **kw):
    """Start a rendered Upstart job's main process the way Upstart does (/bin/sh -e -c 'exec ...')."""
    job = upstart_job(text)
    env = [f"{k}={v}" for k, v in job["env"].items()]
    if job["pre"]:
        ns.run(["env", *env, "/bin/sh", "-e", "-c", job["pre"]])
    return ns.popen(["env", *env, "/bin/sh", "-e", "-c", "exec " + job["exec"]], **kw)


def instance_config(tmp_path: Path, **extra) -> dict:
    return {"instances": [{
        "name": "guest", "image": "guest", "accel": "tcg", "memory": 256, "cpus": 1, "network": "none",
        "overlay_dir": str(tmp_path / "overlay"),
        "extra_args": [f"-serial file:{tmp_path}/serial.log", *extra.pop("extra_args", [])],
        **extra}]}


def wait_for_line(path: Path, needle: str, proc=None, timeout: float = 150) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"{needle!r} not on the serial console; got:\n"
                         + (path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rendered_instance_boots_host_disk_served_by_qemu_nbd(tmp_path, netns, assets):
    """One start against a writable qemu-nbd export: the guest boots, its write lands in QEMU's throw-away
    overlay, and the served disk is untouched. (The clean second start after a guest shutdown is in
    test_bootd_nbd_instance.py, against bootd's per-host export whose server-side overlay persists.)"""
    disk = make_guest_disk(tmp_path / "disk.img", "poweroff")
    before = sha256(disk)
    files, disks = render(tmp_path, netns, instance_config(tmp_path), disk)
    token = disks.served[(MAC, "guest")].name
    assert f"file=nbd://127.0.0.1:10809/{token},format=raw" in files["qemuinstance1.conf"]
    log = tmp_path / "serial.log"
    proc = run_job(netns, files["qemuinstance1.conf"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"QEMU did not end; serial:\n{log.read_text(errors='replace')[-2000:]}") from None
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"QEMU exited {proc.returncode}: {out!r}"
    assert "BOOTD-CLIENT-MARKER: guest booted from its NBD disk" in text, text[-2000:]
    assert "BOOTD-DISK: clean" in text and "BOOTD-WRITE: ok" in text and "BOOTD-POWEROFF" in text
    assert (tmp_path / "overlay").is_dir()        # the job's pre-start made the overlay directory
    assert sha256(disk) == before                 # the guest's write never reached the served disk


def free_display() -> int:
    while True:
        n = random.randint(300, 900)
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n


def read_ppm(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P6" and parts[3] == b"255", parts[:4]
    w, h = int(parts[1]), int(parts[2])
    return w, h, parts[4][: w * h * 3] if len(parts[4]) >= w * h * 3 else data[-w * h * 3:]


def bbox(w: int, h: int, px: bytes, background: bytes = b"\0\0\0") -> tuple[int, int, int, int]:
    """Bounding box of the pixels that differ from `background`."""
    xs, ys = [], []
    blank = background * w
    for y in range(h):
        row = px[y * w * 3:(y + 1) * w * 3]
        if row != blank:
            ys.append(y)
            nz = [i for i in range(w) if row[i * 3:i * 3 + 3] != background]
            xs += [nz[0], nz[-1]]
    assert ys, "the image is all background"
    return min(xs), min(ys), max(xs), max(ys)


def qmp_screendump(sock_path: Path, out: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    f = s.makefile("rwb")
    json.loads(f.readline())
    for cmd in ({"execute": "qmp_capabilities"}, {"execute": "screendump", "arguments": {"filename": str(out)}}):
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                assert "error" not in msg, msg
                break
    s.close()


def test_rendered_viewer_shows_the_guest_screen(tmp_path, netns, assets):
    disk = make_guest_disk(tmp_path / "disk.img", "hold")
    n = free_display()
    qmp = tmp_path / "qmp.sock"
    clients = instance_config(tmp_path, extra_args=[f"-qmp unix:{qmp},server=on,wait=off"])
    clients["xserver"] = {"program": "/usr/bin/Xvfb", "display_base": n - 1}
    files, _ = render(tmp_path, netns, clients, disk)
    assert f"env DISPLAY=:{n}" in files["viewer1.conf"]
    log = tmp_path / "serial.log"
    qemu = run_job(netns, files["qemuinstance1.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_line(log, "BOOTD-HOLD: screen ready", qemu)
    xserver = run_job(netns, files["xserver1.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    x_socket = Path(f"/tmp/.X11-unix/X{n}")
    deadline = time.monotonic() + 20
    while not x_socket.exists():
        assert xserver.poll() is None and time.monotonic() < deadline, "the rendered X server did not start"
        time.sleep(0.1)
    viewer_log = tmp_path / "viewer.log"
    with open(viewer_log, "wb") as vl:
        viewer = run_job(netns, files["viewer1.conf"], stdout=vl, stderr=subprocess.STDOUT)
    art = artifact_dir("clientconfig")
    shot_png, dump_ppm, shot_ppm = art / "viewer-screenshot.png", tmp_path / "screendump.ppm", tmp_path / "shot.ppm"
    try:
        # the viewer needs a moment to connect and draw; retry the comparison until it matches
        deadline = time.monotonic() + 40
        while True:
            assert viewer.poll() is None, f"the viewer exited: {viewer_log.read_text(errors='replace')}"
            qmp_screendump(qmp, dump_ppm)
            netns.run(["env", f"DISPLAY=:{n}", "import", "-window", "root", str(shot_png)], timeout=30)
            subprocess.run(["convert", str(shot_png), "-depth", "8", f"ppm:{shot_ppm}"], check=True, timeout=30)
            gw, gh, guest = read_ppm(dump_ppm)
            sw, sh, shot = read_ppm(shot_ppm)
            gx0, gy0, gx1, gy1 = bbox(gw, gh, guest)
            # the viewer centres the guest's screen on its full-screen window (a grey background)
            try:
                sx0, sy0, sx1, sy1 = bbox(sw, sh, shot, background=shot[:3])
            except AssertionError:
                sx0 = None
            if sx0 is not None and (sx1 - sx0 + 1, sy1 - sy0 + 1) == (gw, gh):
                same = 0
                for y in range(gh):
                    g = guest[y * gw * 3:(y + 1) * gw * 3]
                    s = shot[((y + sy0) * sw + sx0) * 3:((y + sy0) * sw + sx0 + gw) * 3]
                    same += gw if g == s else sum(1 for i in range(0, len(g), 3) if g[i:i + 3] == s[i:i + 3])
                if same == gw * gh:
                    break
            assert time.monotonic() < deadline, (
                f"the viewer's screen never matched the guest's (guest bbox {(gx0, gy0, gx1, gy1)}, "
                f"screenshot bbox {None if sx0 is None else (sx0, sy0, sx1, sy1)}); see {shot_png}")
            time.sleep(1)
        lit = sum(1 for i in range(0, len(guest), 3) if guest[i:i + 3] != b"\0\0\0")
        assert lit > 2000, "the guest screen has (almost) no text on it"
        assert gy1 - gy0 >= 5 * 16 - 4  # six lines of text (16 px each in VGA text mode)
        subprocess.run(["convert", str(dump_ppm), str(art / "guest-screendump.png")], check=True, timeout=30)
    finally:
        for p in (viewer, xserver, qemu):
            if p.poll() is None:
                os.killpg(p.pid, 15)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait(timeout=5)
        x_socket.unlink(missing_ok=True)                 # Xvfb killed hard leaves these behind
        Path(f"/tmp/.X{n}-lock").unlink(missing_ok=True)
