"""End to end through bootd's own disk path: the config's disk becomes a snapshot, the host's menu
fetch makes its per-host NBD export (qemu-storage-daemon), /clients/<mac>/qemuinstance1.conf names
that same export, and the rendered command, run in the lab PC's namespace, boots it under TCG; a
second start after the guest powered off is clean."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from .guestdisk import make_guest_disk
from .test_qemu_instance import assets, run_job  # noqa: F401  (fixture)

pytestmark = [pytest.mark.qemu, pytest.mark.netns]


def test_rendered_instance_boots_bootds_per_host_export(lab, bootd_daemon, tmp_path, assets):  # noqa: F811
    disk = make_guest_disk(tmp_path / "guest.img", "poweroff")
    pc = lab.add_client(address="10.77.0.41")
    boot = tmp_path / "storage" / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k" * 1000)
    (boot / "initrd.img").write_bytes(b"i" * 1000)
    log = tmp_path / "serial.log"
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "off"},
        "storage": {"directory": str(tmp_path / "storage")},
        "images": [{"name": "guest", "disk": str(disk)}],
        "groups": [{"name": "room1", "images": ["guest"], "default_image": "guest", "clients": {
            "instances": [{"name": "guest", "image": "guest", "accel": "tcg", "memory": 256, "cpus": 1,
                           "network": "none", "overlay_dir": str(tmp_path / "overlay"),
                           "extra_args": [f"-serial file:{log}"]}]}}],
        "hosts": [{"mac": pc.mac, "name": "pc01", "group": "room1"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    deadline = time.monotonic() + 60
    while True:
        snaps = d.api.get("/api/v1/snapshots")["snapshots"]
        if any(s.get("state") == "sealed" for s in snaps):
            break
        assert time.monotonic() < deadline, f"the disk was not imported: {snaps}\n{d.log()[-3000:]}"
        time.sleep(0.3)
    d.api.post("/api/v1/snapshots/guest@v1/promote", {"group": "room1"})

    base = f"http://{lab.server_ip}:8080"
    script = pc.ns.run(["curl", "-sSf", f"{base}/boot/{pc.mac}.ipxe"]).stdout   # the PC boots: export made
    nbd = re.search(r"bootd\.nbd=(\S+)", script).group(1)
    job = pc.ns.run(["curl", "-sSf", f"{base}/clients/{pc.mac}/qemuinstance1.conf"]).stdout
    assert f"file=nbd://{nbd},format=raw," in job, (nbd, job)
    index = pc.ns.run(["curl", "-sSf", f"{base}/clients/{pc.mac}/index.json"]).stdout
    assert '"disk_source": "disks"' in index

    # bootd's overlay for this boot lives on the server across reconnects: without QEMU's snapshot=on
    # the second start would see the first one's write ("dirty").
    results = []
    for attempt in (1, 2):  # the guest powers off; Upstart's respawn starts the same command again
        log.unlink(missing_ok=True)
        proc = run_job(pc.ns, job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            serial = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"run {attempt}: QEMU did not end:\n{serial}") from None
        text = log.read_text(errors="replace") if log.exists() else ""
        assert proc.returncode == 0 and "BOOTD-CLIENT-MARKER" in text, (out, text[-2000:], d.log()[-2000:])
        assert "BOOTD-WRITE: ok" in text and "BOOTD-POWEROFF" in text
        results.append("BOOTD-DISK: clean" in text)
    assert results == [True, True]
