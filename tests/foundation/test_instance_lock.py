"""One bootd per storage directory: a second `bootd run` on the same storage refuses at once, names the
running pid, and changes nothing of the running one (its qemu-storage-daemon keeps its pid and serves)."""
from __future__ import annotations

import json
import os
import sys

import pytest
from support import BootdProcess

pytestmark = pytest.mark.netns

NBD_GREETING = ("import socket, sys; s = socket.create_connection(('127.0.0.1', 10809), timeout=10); "
                "sys.stdout.write(s.recv(8).decode())")


def disks(d: BootdProcess) -> dict:
    r = d.bootctl("--json", "status")
    assert r.returncode == 0, r.stderr
    return [s for s in json.loads(r.stdout)["services"] if s["name"] == "disks"][0]


def test_second_bootd_on_the_same_storage_refuses_and_leaves_the_first_alone(netns, bootd_daemon, tmp_path):
    netns.run(["ip", "link", "set", "lo", "up"])
    config = {"dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "nbd": {"listen": "127.0.0.1"}}
    first = bootd_daemon(dict(config), ns=netns)
    before = disks(first)["qsd"]
    assert before["up"], before
    qsd_pid = before["pid"]

    second = bootd_daemon({**config, "storage": {"directory": str(first.storage)}}, ns=netns, start=False)
    second.start(wait=False)
    assert second.proc is not None
    rc = second.proc.wait(timeout=60)
    log = second.log()
    assert rc != 0, log
    assert f"pid {first.proc.pid}" in log and str(first.storage) in log, log
    assert "ready" not in log.lower(), log

    after = disks(first)["qsd"]
    assert after["up"] and after["pid"] == qsd_pid and not after["adopted"], after
    os.kill(qsd_pid, 0)  # still there
    assert first.proc.poll() is None
    greeting = netns.run([sys.executable, "-c", NBD_GREETING]).stdout
    assert greeting == "NBDMAGIC"  # the gatekeeper in front of the first one's daemon still answers
    assert (first.storage / "bootd.lock").read_text().strip() == str(first.proc.pid)
