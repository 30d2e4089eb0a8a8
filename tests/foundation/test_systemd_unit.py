"""The shipped unit is valid for systemd (systemd-analyze verify runs without systemd as PID 1)."""
from __future__ import annotations

import os
import re
import shlex
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
    unit = unit.replace("/usr/bin/bootd", bootd)
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


def _bootd_commands(unit: str) -> dict[str, list[list[str]]]:
    """ExecStartPre/ExecStart/ExecReload lines that run bootd, as argv lists."""
    out: dict[str, list[list[str]]] = {}
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStartPre", "ExecStart", "ExecReload") and "bootd" in value.split()[0]:
            out.setdefault(key, []).append(shlex.split(value))
    return out


def test_the_units_bootd_command_lines_work_as_shipped(tmp_path):
    """The unit runs /usr/bin/bootd (what the package installs) with flags the CLI takes: check-config
    passes on a good config and fails on a broken one, naming FILE:LINE."""
    commands = _bootd_commands((ROOT / "systemd/bootd.service").read_text())
    assert set(commands) == {"ExecStartPre", "ExecStart", "ExecReload"}, commands
    bootd = str(Path(os.sys.executable).parent / "bootd")
    for argv in [*commands["ExecStartPre"], *commands["ExecStart"], *commands["ExecReload"]]:
        assert argv[0] == "/usr/bin/bootd", argv
    config = tmp_path / "bootd.yaml"
    config.write_text((ROOT / "configs/bootd.yaml").read_text())
    for argv in [*commands["ExecStartPre"], *commands["ExecReload"]]:
        real = [bootd, *(str(config) if a == "/etc/bootd/bootd.yaml" else a for a in argv[1:])]
        r = subprocess.run(real, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (argv, r.stderr)
    config.write_text("storage:\n  directory: /var/lib/bootd\nlog:\n  level: loud\n")
    r = subprocess.run([bootd, *(str(config) if a == "/etc/bootd/bootd.yaml" else a
                                 for a in commands["ExecStartPre"][0][1:])], capture_output=True, text=True)
    assert r.returncode != 0 and "bootd.yaml:4 log.level" in r.stderr, r.stderr
    run = commands["ExecStart"][0]
    assert run[-1] == "run" and run[1:3] == ["--config", "/etc/bootd/bootd.yaml"], run


# `systemd-analyze security` of the unit before the package existed (commit 02c3570): 4.9. The booted check
# is tests/e2e/test_installed_unit.py; this one runs offline on the unit file.
EXPOSURE_BEFORE = 4.9


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_security_exposure_no_worse_than_before(tmp_path):
    path = tmp_path / "bootd.service"
    path.write_text((ROOT / "systemd/bootd.service").read_text())
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
                       capture_output=True, text=True, env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    m = re.search(r"Overall exposure level for bootd.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= EXPOSURE_BEFORE, r.stdout[-3000:]
