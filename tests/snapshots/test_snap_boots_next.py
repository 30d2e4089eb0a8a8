"""A promote or rollback changes what a PC boots next, with nothing restarted: the PC (its own network
namespace) fetches its iPXE script over HTTP from the running daemon, and reads the disk named in it over
NBD. Runs the real snapshot store, menus and NBD engine (qemu-storage-daemon)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from snaputil import MiB, write_pattern  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / ".cache" / "assets"
pytestmark = [pytest.mark.netns]


def _need():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for prog in ("curl", "nbdcopy", "qemu-storage-daemon"):
        if shutil.which(prog) is None:
            pytest.skip(f"{prog} not installed")
    if not (ASSETS / "images" / "os-A.qcow2").exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"client assets missing and not buildable: {r.stderr[-500:]}")


def test_promote_and_rollback_change_the_next_boot(lab, bootd_daemon, tmp_path):
    _need()
    pc = lab.add_client(address="10.77.0.41")
    boot = tmp_path / "storage" / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k" * 1000)
    (boot / "initrd.img").write_bytes(b"i" * 1000)
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "off"},
        "storage": {"directory": str(tmp_path / "storage"), "min_free_mb": 1},
        "images": [{"name": "deb", "title": "Debian", "disk": str(ASSETS / "images" / "os-A.qcow2")}],
        "groups": [{"name": "room1", "images": ["deb"], "default_image": "deb"}],
        "hosts": [{"mac": pc.mac, "name": "pc01", "group": "room1"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    pid = d.proc.pid
    deadline = time.monotonic() + 60
    while not d.api.get("/api/v1/images")["images"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.bootctl("snapshot", "promote", "deb@v1", "--group", "room1").returncode == 0

    def next_boot() -> tuple[str, int]:
        """(title of the default entry, byte at 60 MiB of the disk that entry attaches)."""
        text = pc.ns.run(["curl", "-sSf", f"http://{lab.server_ip}:8080/boot/{pc.mac}.ipxe"]).stdout
        default = re.search(r"choose --default (\S+)", text).group(1)
        title = re.search(rf"^item {re.escape(default)} (.*)$", text, re.M).group(1).strip()
        body = re.search(rf"^:{re.escape(default)}\n(.*?)(?=^:|\Z)", text, re.M | re.S).group(1)
        host_port, export = re.search(r"bootd\.nbd=(\S+)", body).group(1).split("/", 1)
        out = tmp_path / "disk.img"
        pc.ns.run(["nbdcopy", f"nbd://{host_port}/{export}", str(out)], timeout=60)
        with open(out, "rb") as f:
            f.seek(60 * MiB)
            byte = f.read(1)[0]
        out.unlink()
        return title, byte

    assert next_boot() == ("Debian (v1)", 0)
    # the admin's update: a draft edited offline, sealed, promoted for the room
    dr = d.api.post("/api/v1/snapshots/deb@v1/draft", {"actor": "t"})
    write_pattern(dr["path"], 0x5B, 60 * MiB)
    d.api.post(f"/api/v1/snapshots/{dr['id']}/seal", {"actor": "t", "note": "update"})
    assert d.bootctl("snapshot", "promote", "deb@v2", "--group", "room1").returncode == 0
    assert next_boot() == ("Debian (v2)", 0x5B)
    assert d.bootctl("snapshot", "rollback", "deb", "--group", "room1").returncode == 0
    assert next_boot() == ("Debian (v1)", 0)
    assert d.proc.pid == pid and d.proc.poll() is None     # nothing was restarted
