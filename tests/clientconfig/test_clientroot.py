"""The client root's init hook fetches exactly the host's rendered files from a running bootd, and
`bootctl clientroot build` makes a root holding QEMU, Xorg, a VNC viewer and nbd-client in which the
rendered units verify. The build downloads ~600 packages (~100 s here): it runs only with
BOOTD_TEST_CLIENTROOT=1."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bootd.clientconfig.clientroot import apt_mirror, build_client_root, install_hook
from bootd.clientconfig.model import ClientsConfig
from bootd.clientconfig.render import DiskRef, HostRef, render_host

from .helpers import TWO_INSTANCE_YAML

MAC = "52:54:00:77:00:01"


def test_apt_mirror_is_read_from_apt_config(tmp_path):
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n")
    assert apt_mirror(str(tmp_path)) == "http://mirror.example/debian"
    (tmp_path / "etc/apt/sources.list").write_text("# x\ndeb [arch=amd64] http://other.example/debian bookworm main\n")
    assert apt_mirror(str(tmp_path)) == "http://other.example/debian"
    assert apt_mirror().startswith(("http://", "https://", "file:/"))   # this machine's own apt config


def served_pc_with_hook(lab, bootd_daemon, tmp_path):
    """bootd serving two instances' units to PC MAC (10.77.0.70), and the client hook installed in a
    directory: (daemon, the PC's namespace client, the root)."""
    cfg = yaml.safe_load(TWO_INSTANCE_YAML)
    for i, inst in enumerate(cfg["groups"][0]["clients"]["instances"]):
        inst["disk_uri"] = f"nbd://10.77.0.1:10809/disk{i}"
    cfg["nbd"] = {"enabled": False}
    d = bootd_daemon(cfg, ns=lab.server)
    pc = lab.add_client(address="10.77.0.70", mac=MAC)
    root = tmp_path / "root"
    install_hook(root)
    return d, pc, root


def test_clientroot_build_refuses_what_it_would_overwrite_or_cannot_do(tmp_path):
    """Nothing is started, and nothing is touched, when the target or the image is already there or a
    tool is missing; the error says what to install."""
    full = tmp_path / "full"
    (full / "etc").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="exists and is not empty"):
        build_client_root(full, mirror="http://mirror.invalid/debian")
    image = tmp_path / "root.qcow2"
    image.write_bytes(b"keep me")
    with pytest.raises(RuntimeError, match="root.qcow2 exists"):
        build_client_root(tmp_path / "new", mirror="http://mirror.invalid/debian", image=image)
    assert image.read_bytes() == b"keep me" and not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError, match=r"no-such-debootstrap is not installed \(apt install"):
        build_client_root(tmp_path / "new", mirror="http://mirror.invalid/debian", debootstrap="no-such-debootstrap")


@pytest.mark.netns
def test_init_hook_fetches_the_hosts_files(lab, bootd_daemon, tmp_path):
    d, pc, root = served_pc_with_hook(lab, bootd_daemon, tmp_path)
    run = tmp_path / "run"
    env = ["env", f"BOOTD_CMDLINE=quiet bootd.config=http://{lab.server_ip}:8080/clients/{MAC}/",
           f"BOOTD_RUN_DIR={run}", "BOOTD_NO_START=1"]
    r = pc.ns.run([*env, "/bin/sh", str(root / "usr/local/sbin/bootd-client-start")], check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    served = d.api.get(f"/api/v1/clients/{MAC}/render")["files"]
    got = {p.name: p.read_text() for p in (run / "systemd/system").iterdir()}
    got.update({p.name: p.read_text() for p in (run / "bootd/init").iterdir()})
    assert got == served and len(got) == 12
    # no server answer: the hook fails loudly instead of starting nothing silently
    env[1] = "BOOTD_CMDLINE=bootd.config=http://10.77.0.1:8080/clients/52:54:00:99:99:99/"
    r = pc.ns.run([*env, "/bin/sh", str(root / "usr/local/sbin/bootd-client-start")], check=False, timeout=60)
    assert r.returncode != 0


@pytest.mark.netns
def test_the_client_reports_its_screen_and_bootctl_hosts_says_why_it_failed(lab, bootd_daemon, tmp_path):
    """issue 19: the client root tells bootd whether its screen's units started (bootd-client-report,
    POST /clients/<mac>/status): a failure makes the PC "failed" with the reason, for that PC only."""
    d, pc, root = served_pc_with_hook(lab, bootd_daemon, tmp_path)
    url = f"http://{lab.server_ip}:8080/clients/{MAC}/"
    env = ["env", f"BOOTD_CMDLINE=bootd.config={url}", f"BOOTD_RUN_DIR={tmp_path / 'run'}"]
    report = str(root / "usr/local/sbin/bootd-client-report")

    def host() -> dict:
        return d.api.get(f"/api/v1/hosts/{MAC}")

    r = pc.ns.run([*env, "/bin/sh", report, "failed", 'bootd-client.service failed "quoted"\\'], timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    h = host()
    assert h["state"] == "failed", h
    assert h["last_error"] == ("the PC's screen did not come up: bootd-client.service failed \"quoted\"\\"), h
    assert (tmp_path / "run/bootd/reported-failure").exists()  # the OnFailure unit then stays quiet
    r = pc.ns.run([*env, "/bin/sh", report, "started", "qemuinstance1.service", "xserver1.service"], timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    client = [e for e in host()["events"] if e["kind"] == "client"]
    assert client and client[-1]["detail"]["units"] == ["qemuinstance1.service", "xserver1.service"]

    # bad reports are refused with the reason and change nothing; another PC cannot report for this one
    def post(ns, body: str) -> subprocess.CompletedProcess:
        return ns.run(["curl", "-sS", "-o", "/dev/stderr", "-w", "%{http_code}", "-H", "Content-Type: application/json",
                       "--data-binary", body, f"{url}status"], check=False, timeout=30)
    events = len(host()["events"])
    for body, why in (("not json", "not JSON"), ('{"state": "burning"}', '"state" must be'),
                      ('{"state": "failed"}', 'needs a "reason"'), ('{"state": "started", "units": ["a b"]}', "units"),
                      ('{"state": "failed", "reason": "' + "x" * 5000 + '"}', "at most 4096 bytes")):
        r = post(pc.ns, body)
        assert r.stdout in ("400", "413") and why in r.stderr, (body[:40], r.stdout, r.stderr)
    other = lab.add_client(address="10.77.0.71", mac="52:54:00:77:00:02")
    r = post(other.ns, '{"state": "failed", "reason": "spoofed"}')
    assert r.stdout == "403", r.stdout + r.stderr
    assert len(host()["events"]) == events and host()["last_error"] != "spoofed"


@pytest.mark.skipif(os.environ.get("BOOTD_TEST_CLIENTROOT") != "1", reason="set BOOTD_TEST_CLIENTROOT=1 (~2 min)")
def test_clientroot_build_makes_a_root_for_the_rendered_units(tmp_path):
    target = tmp_path / "clientroot"
    bootctl = str(Path(sys.executable).parent / "bootctl")
    r = subprocess.run([bootctl, "clientroot", "build", str(target)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[1/4] debootstrap" in r.stdout and "unpack" in r.stdout and "client root ready" in r.stdout
    assert "[3/4] update-initramfs" in r.stdout
    for prog in ("usr/bin/qemu-system-x86_64", "usr/bin/Xorg", "usr/bin/xtigervncviewer", "usr/sbin/nbd-client",
                 "usr/local/sbin/bootd-client-start", "usr/share/seabios/bios-256k.bin",
                 "etc/initramfs-tools/hooks/bootd-nfsmount", "etc/dpkg/dpkg.cfg.d/bootd-excludes"):
        assert (target / prog).exists(), prog
    files = render_host(HostRef(MAC), ClientsConfig.model_validate({"instances": [{}]}),
                        [DiskRef("nbd://10.77.0.1/x")])
    units = target / "tmp/units"
    units.mkdir()
    for name, text in files.items():
        if name.endswith(".service"):
            (units / name).write_text(text)
    v = subprocess.run(["chroot", str(target), "systemd-analyze", "verify", "--man=no",
                        *[f"/tmp/units/{n}" for n in files if n.endswith(".service")],
                        "/etc/systemd/system/bootd-client.service"], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stderr
    shutil.rmtree(target)
