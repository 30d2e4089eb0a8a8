"""A refused NBD export is a failed boot step an admin can see (issue 16): a PC asking the gatekeeper
for another PC's export gets a "failed" boot event with the reason on `bootctl hosts PC` and a warning
naming it in the log. Real daemon, real storage daemon, libnbd client in a lab namespace."""
from __future__ import annotations

import pytest
from nbdtest import make_base
from test_nbd_gatekeeper import OPEN, bootctl_json, py, two_hosts

pytestmark = pytest.mark.netns


def test_refused_export_is_a_failed_step_of_the_asking_pc(lab, bootd_daemon, tmp_path):
    base = make_base(tmp_path / "base.qcow2", size_mb=8, pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    d = bootd_daemon(two_hosts(a, b), ns=lab.server)
    bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    eb = bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))
    assert py(a, OPEN, "read", eb["uri"]).stdout.startswith("REFUSED")
    reason = f"disk: NBD export {eb['name'][:6]}… refused (not this PC's own)"
    host = bootctl_json(d, "hosts", "pc-a")
    failed = [e for e in host["events"] if e["kind"] == "failed"]
    assert failed and failed[-1]["detail"]["reason"] == reason, host["events"]
    assert host["state"] == "failed" and host["last_error"] == reason
    assert reason in d.bootctl("hosts", "pc-a").stdout
    assert bootctl_json(d, "hosts", "pc-b")["last_error"] is None  # the owner did nothing wrong
    lines = [line for line in d.log().splitlines() if " WARNING " in line and reason in line]
    assert lines and "pc-a" in lines[0], d.log()[-3000:]
