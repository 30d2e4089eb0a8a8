"""The menu and the disks together: every entry of a host's iPXE menu names an NBD export that a real
NBD client (nbdinfo/nbdcopy, from the lab PC's namespace) can open, and each entry's export holds its own
image (os-A for debian, os-B for windows: the /marker file inside the ext4 image says which).
Runs the real snapshot store (imports the config's disks as v1) and the NBD engine (qemu-storage-daemon).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import ROOT, have  # noqa: E402

ASSETS = ROOT / ".cache" / "assets"

pytestmark = [pytest.mark.netns]


def _need():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for prog in ("curl", "nbdcopy", "debugfs", "qemu-storage-daemon"):
        if not have(prog):
            pytest.skip(f"{prog} not installed")
    if not (ASSETS / "images" / "os-B.qcow2").exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "build-assets.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"client assets missing and not buildable: {r.stderr[-500:]}")


def marker_of(client, nbd_arg: str, tmp: Path) -> str:
    host_port, export = nbd_arg.split("=", 1)[1].split("/", 1)
    out = tmp / f"{export}.img"
    client.ns.run(["nbdcopy", f"nbd://{host_port}/{export}", str(out)], timeout=60)
    r = subprocess.run(["debugfs", "-R", "cat /marker", str(out)], capture_output=True, text=True)
    out.unlink()
    return r.stdout.strip()


def test_each_entry_boots_its_own_snapshot(lab, bootd_daemon, tmp_path):
    _need()
    pc = lab.add_client(address="10.77.0.31")
    boot = tmp_path / "storage" / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k" * 1000)
    (boot / "initrd.img").write_bytes(b"i" * 1000)
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "off"},
        "storage": {"directory": str(tmp_path / "storage")},
        "images": [{"name": "debian", "disk": str(ASSETS / "images" / "os-A.qcow2")},
                   {"name": "windows", "disk": str(ASSETS / "images" / "os-B.qcow2")}],
        "groups": [{"name": "room1", "images": ["debian", "windows"], "default_image": "debian",
                    "student_entries": ["current", "previous", "images"]}],
        "hosts": [{"mac": pc.mac, "name": "pc01", "group": "room1", "default_image": "windows"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snaps = d.api.get("/api/v1/snapshots")["snapshots"]
        if len([s for s in snaps if s.get("state") == "sealed"]) == 2:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"the config's disks were not imported: {snaps}\n{d.log()[-3000:]}")

    for image in ("debian", "windows"):  # imported v1 becomes what room1 boots
        d.api.post(f"/api/v1/snapshots/{image}@v1/promote", {"group": "room1"})

    def menu() -> tuple[dict[str, str], str]:
        """image -> its (first, i.e. current) entry's bootd.nbd argument; and the script."""
        text = pc.ns.run(["curl", "-sSf", f"http://{lab.server_ip}:8080/boot/{pc.mac}.ipxe"]).stdout
        args: dict[str, str] = {}
        default = re.search(r"choose --default (\S+)", text).group(1)
        for label, body in re.findall(r"^:([\w-]+)\n(.*?)(?=^:|\Z)", text, re.M | re.S):
            m, img = re.search(r"bootd\.nbd=(\S+)", body), re.search(r"bootd\.image=(\S+)", body)
            if m and img:
                args.setdefault(img.group(1), "bootd.nbd=" + m.group(1))
                if label == default:
                    args["default"] = img.group(1)
        return args, text

    args, text = menu()
    assert set(args) == {"debian", "windows", "default"}, text
    assert args["default"] == "windows"  # pc01's own default image
    assert args["debian"] != args["windows"]
    assert all(args[i].startswith(f"bootd.nbd={lab.server_ip}:10809/") for i in ("debian", "windows"))
    assert marker_of(pc, args["debian"], tmp_path) == "A"
    assert marker_of(pc, args["windows"], tmp_path) == "B"
    # the next fetch of the menu is a new boot: new export names
    again, _ = menu()
    assert again["windows"] != args["windows"]
    assert marker_of(pc, again["windows"], tmp_path) == "B"
