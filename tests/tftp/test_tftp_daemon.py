"""TFTP inside the real bootd daemon: served on the configured interface, fetches land in the host's
boot timeline and in the metrics."""
from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.netns


def test_daemon_serves_tftp_and_records_the_boot_timeline(lab, bootd_daemon, tmp_path):
    root = tmp_path / "boot"
    (root / "debian").mkdir(parents=True)
    kernel = os.urandom(200_000)
    (root / "debian" / "vmlinuz").write_bytes(kernel)
    (root / "undionly.kpxe").write_bytes(os.urandom(70_000))
    os.chmod(tmp_path, 0o755)
    client = lab.add_client(address="10.77.0.50")
    d = bootd_daemon({
        "interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
        "dhcp": {"mode": "off"},
        "tftp": {"root": str(root), "max_windowsize": 16},
        "hosts": [{"mac": client.mac, "name": "pc1", "ip": "10.77.0.50"}],
    }, ns=lab.server)
    c = client.ns
    for path in ("undionly.kpxe", "debian/vmlinuz"):
        r = c.run(["curl", "-sS", "--tftp-blksize", "1468", "-o", str(tmp_path / "got"), f"tftp://10.77.0.1/{path}"],
                  check=False)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "got").read_bytes() == (root / path).read_bytes()
    r = c.run(["atftp", "-g", "-r", "debian/vmlinuz", "-l", str(tmp_path / "got2"), "--option", "windowsize 32",
               "10.77.0.1"], check=False)
    assert r.returncode == 0 and (tmp_path / "got2").read_bytes() == kernel
    r = c.run(["curl", "-sS", "-o", "/dev/null", "tftp://10.77.0.1/../etc/passwd", "--path-as-is"], check=False)
    assert r.returncode == 68  # not found

    deadline = time.monotonic() + 10
    while True:
        host = d.api.get("/api/v1/hosts/pc1")
        tftp_events = [e for e in host["events"] if e["detail"].get("protocol") == "tftp"]
        if len(tftp_events) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(e["kind"], e["detail"]["path"]) for e in tftp_events] == [
        ("loader", "undionly.kpxe"), ("kernel", "debian/vmlinuz"), ("kernel", "debian/vmlinuz")]
    assert tftp_events[1]["nbytes"] == len(kernel) and tftp_events[1]["detail"]["blksize"] == 1468
    assert tftp_events[2]["detail"]["windowsize"] == 16       # capped by tftp.max_windowsize
    metrics = d.api.get("/api/v1/metrics")
    tftp = metrics["tftp"] if "tftp" in metrics else metrics["metrics"]["tftp"]
    assert tftp["sessions_completed"] == 3
    assert tftp["sessions_pumped"] == 3                       # all three through the C data pump
    assert tftp["refused{reason=not-found}"] == 1
    assert tftp["active_sessions"] == 0
    status = d.api.get("/api/v1/status")
    svc = [s for s in status["services"] if s["name"] == "tftp"][0]
    assert svc["addresses"] == ["10.77.0.1:69"] and svc["completed"] == 3
    assert svc["data_pump"]["mode"] == "c" and svc["data_pump"]["up"] and svc["data_pump"]["running"] == 0
    assert d.stop() == 0
