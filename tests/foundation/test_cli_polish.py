"""bootctl for admins and scripts (issue 16): --version, `hosts list` like the other lists, status and
metrics as tables of plain numbers, exit status 1 refused / 2 usage / 3 bootd not running, reasons
without an HTTP status (it stays in --json), a warning when pinning a MAC nobody knows."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from bootd import __version__

BOOTCTL = str(Path(sys.executable).parent / "bootctl")
PC1 = "52:54:00:00:01:01"
NOBODY = "52:54:00:99:99:99"


def bootctl(sock: Path | str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BOOTCTL, "--socket", str(sock), *args], capture_output=True, text=True, timeout=60)


def config(tmp_path: Path) -> dict:
    return {"groups": [{"name": "lab1"}],
            "hosts": [{"mac": PC1, "name": "pc1", "group": "lab1"}],
            "storage": {"directory": str(tmp_path / "storage"), "min_free_mb": 1}}


def test_version():
    r = subprocess.run([BOOTCTL, "--version"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"bootctl {__version__}\n")


def test_exit_status_usage_and_not_running(tmp_path):
    missing = tmp_path / "none.sock"
    r = bootctl(missing, "status")
    assert r.returncode == 3 and "bootd is not running" in r.stderr, r
    r = bootctl(missing, "--json", "disk", "list")
    assert r.returncode == 3 and json.loads(r.stdout) == {"error": r.stderr.strip()[len("bootctl: "):],
                                                         "status": None}
    # a socket left behind by a bootd that died: nobody listens on it
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    r = bootctl(stale, "metrics")
    assert r.returncode == 3 and "bootd is not running" in r.stderr, r
    # usage errors are 2, whether bootd runs or not
    assert bootctl(missing).returncode == 2
    assert bootctl(missing, "snapshot", "frobnicate").returncode == 2
    assert bootctl(missing, "snapshot", "pin", "deb@v1").returncode == 2  # HOST missing
    assert bootctl(missing, "wake").returncode == 2


def test_metrics_is_a_table_of_plain_numbers(bootd_daemon, tmp_path):
    d = bootd_daemon(config(tmp_path))
    boot = d.storage / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    with open(boot / "big.img", "wb") as f:
        f.truncate(29_000_000)  # its byte count printed with {:g} was "2.9e+07"
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", d.socket,
                        "http://bootd/boot/files/big.img"], capture_output=True, text=True, timeout=60)
    assert r.stdout == "200", r

    text = d.bootctl("metrics", check=True).stdout
    lines = text.splitlines()
    assert re.match(r"^COMPONENT +COUNTER +VALUE$", lines[0]), text
    assert any(re.match(r"^http +bytes +29000000$", line) for line in lines), text
    assert any(re.match(r"^http +responses\{status=200\} +1$", line) for line in lines), text
    assert "e+" not in text
    assert json.loads(d.bootctl("--json", "metrics", check=True).stdout)["http"]["bytes"] == 29_000_000


def test_status_is_a_table_without_python_dicts(bootd_daemon, tmp_path):
    d = bootd_daemon(config(tmp_path))
    st = json.loads(d.bootctl("--json", "status", check=True).stdout)
    text = d.bootctl("status", check=True).stdout
    assert "{'" not in text and "': " not in text, text  # no Python dict reprs
    assert re.search(r"^SERVICE +SETTING +VALUE$", text, re.M), text
    tftp = next(s for s in st["services"] if s["name"] == "tftp")
    # the TFTP data pump's nested status as dotted settings, one row each
    assert re.search(rf"^ +data_pump\.mode +{tftp['data_pump']['mode']}$", text, re.M), text
    assert re.search(r"^tftp +addresses +-$", text, re.M), text
    for service in st["services"]:
        assert re.search(rf"^{service['name']} ", text, re.M), (service["name"], text)


def test_hosts_list_like_the_other_lists(bootd_daemon, tmp_path):
    d = bootd_daemon(config(tmp_path))
    listed = d.bootctl("hosts", "list", check=True)
    assert "pc1" in listed.stdout and PC1 in listed.stdout
    assert listed.stdout == d.bootctl("hosts", check=True).stdout
    as_json = json.loads(d.bootctl("--json", "hosts", "list", check=True).stdout)
    assert [h["mac"] for h in as_json["hosts"]] == [PC1]
    assert "pc1" in d.bootctl("hosts", "pc1", check=True).stdout  # one host's timeline as before


def test_refusals_exit_1_with_the_reason_alone(bootd_daemon, tmp_path):
    d = bootd_daemon(config(tmp_path))
    d.bootctl("image", "create", "deb", "--size", "16M", check=True)
    r = d.bootctl("image", "create", "deb", "--size", "16M")
    assert r.returncode == 1 and "already exists" in r.stderr, r
    assert not re.search(r"HTTP \d+", r.stderr), r.stderr
    r = d.bootctl("--json", "image", "create", "deb", "--size", "16M")
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == 409, r  # the status stays in --json
    r = d.bootctl("snapshot", "promote", "nosuch@v1")
    assert r.returncode == 1 and r.stderr.startswith("bootctl: no image named 'nosuch'"), r
    assert not re.search(r"HTTP \d+", r.stderr), r.stderr


def test_pin_to_a_mac_nobody_knows_warns(bootd_daemon, tmp_path):
    d = bootd_daemon(config(tmp_path))
    d.bootctl("image", "create", "deb", "--size", "16M", check=True)
    # done (the PC may boot later), with a warning: a typo in the MAC pins nothing useful
    r = d.bootctl("snapshot", "pin", "deb@v1", NOBODY)
    assert r.returncode == 0, r
    assert f"warning: no configured or seen host has MAC {NOBODY}" in r.stdout, r.stdout
    pinned = json.loads(d.bootctl("--json", "snapshot", "pin", "deb@v1", "52-54-00-99-99-98", check=True).stdout)
    assert pinned["host"] == "52:54:00:99:99:98" and "no configured or seen host" in pinned["warnings"][0]
    # a known host: no warning
    r = d.bootctl("snapshot", "pin", "deb@v1", "pc1", check=True)
    assert "warning" not in r.stdout + r.stderr, r
