"""The shipped unit is valid for systemd (systemd-analyze verify runs without systemd as PID 1)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    unit = (ROOT / "systemd/bootd.service").read_text()
    # verify checks that ExecStart binaries exist: point them at the venv's entry point.
    bootd = shutil.which("bootd") or str(Path(os.sys.executable).parent / "bootd")
    unit = unit.replace("/usr/local/bin/bootd", bootd)
    path = tmp_path / "bootd.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    problems = [line for line in (r.stderr + r.stdout).splitlines() if "bootd.service" in line]
    assert r.returncode == 0 and not problems, r.stderr + r.stdout


def test_unit_has_the_required_settings():
    unit = (ROOT / "systemd/bootd.service").read_text()
    for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ProtectSystem=strict",
                   "StateDirectory=bootd", "CAP_NET_BIND_SERVICE", "ReadWritePaths=/var/lib/bootd"):
        assert needle in unit
