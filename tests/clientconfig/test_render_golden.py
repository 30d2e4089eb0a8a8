"""The rendered files of a host with two instances, byte for byte, and systemd's own verdict on the
units. Regenerate the golden files with BOOTD_UPDATE_GOLDEN=1 after an intended change (that run fails:
see tests/golden.py), then run again without it."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from golden import check_golden_dir

from bootd.clientconfig.render import DiskRef, render_host
from bootd.clientconfig.resolve import clients_for, find_host

from .helpers import two_instance_config, upstart_exec

GOLDEN = Path(__file__).parent / "golden" / "lab-pc-01"
DISKS = [DiskRef("nbd://10.77.0.1:10809/h7Qx2kfa9Lw0", "raw", "disks"),
         DiskRef("nbd://10.77.0.1:10809/Zr4mB8cVt1pe", "qcow2", "disks")]


def rendered() -> dict[str, str]:
    cfg = two_instance_config()
    host, hc = find_host(cfg, "lab-pc-01")
    return render_host(host, clients_for(cfg, hc), DISKS)


def test_golden_files_for_two_instances():
    files = rendered()
    assert list(files) == [f"{k}{n}{ext}" for n in (1, 2) for ext in (".conf", ".service")
                           for k in ("qemuinstance", "xserver", "viewer")]
    check_golden_dir(GOLDEN, files)


def test_rendered_values_come_from_config_and_export():
    files = rendered()
    env, cmd = upstart_exec(files["qemuinstance1.conf"])
    argv = shlex.split(cmd)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[argv.index("-m") + 1] == "4096"
    assert argv[argv.index("-drive") + 1] == \
        "file=nbd://10.77.0.1:10809/h7Qx2kfa9Lw0,format=raw,cache=writeback,snapshot=on,if=virtio,media=disk"
    assert ["-device", "usb-tablet"] == argv[argv.index("-device"):argv.index("-device") + 2]
    assert env["TMPDIR"] == "/var/tmp"
    _, cmd2 = upstart_exec(files["qemuinstance2.conf"])
    argv2 = shlex.split(cmd2)
    assert "format=qcow2,cache=none" in argv2[argv2.index("-drive") + 1]
    assert argv2[argv2.index("-display") + 1] == "vnc=127.0.0.1:2"
    assert argv2[argv2.index("-nic") + 1] == "none"
    # chain: instance -> X server (on its VT) -> viewer on that X display, pointed at the instance
    assert "start on started qemuinstance2" in files["xserver2.conf"]
    assert "/usr/bin/Xorg :2 vt9 " in files["xserver2.conf"]
    assert "start on started xserver2" in files["viewer2.conf"]
    assert "env DISPLAY=:2" in files["viewer2.conf"]
    assert "127.0.0.1::5902" in files["viewer2.conf"]
    assert "respawn" in files["qemuinstance1.conf"].split("\n")
    assert "Restart=always" in files["qemuinstance1.service"]
    assert "Wants=qemuinstance1.service" in files["xserver1.service"]
    assert "Requires=xserver1.service" in files["viewer1.service"]


def test_host_override_merges_field_by_field():
    cfg = two_instance_config()
    _, hc1 = find_host(cfg, "52:54:00:77:00:01")
    _, hc2 = find_host(cfg, "lab-pc-02")
    c1, c2 = clients_for(cfg, hc1), clients_for(cfg, hc2)
    assert c1.xserver.depth == 24 and c2.xserver.depth is None
    assert c1.instances == c2.instances and len(c1.instances) == 2
    assert c1.viewer.fullscreen is True


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path):
    files = rendered()
    units = []
    for name, text in files.items():
        if name.endswith(".service"):
            (tmp_path / name).write_text(text)
            units.append(str(tmp_path / name))
    assert len(units) == 6
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "qemuinstance" not in res.stderr, res.stderr  # no warnings about our units either


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """The verify step above can fail: a unit whose ExecStart lost its quoting is refused."""
    text = rendered()["viewer1.service"].replace("ExecStart=/usr/bin/xtigervncviewer", "ExecStart=xtigervncviewer\"")
    (tmp_path / "viewer1.service").write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "viewer1.service")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Unbalanced quoting" in res.stderr
