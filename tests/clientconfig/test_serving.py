"""The running daemon serves a host's rendered files over HTTP (/clients/<mac>/ and an index) and
TFTP, `bootctl client render` prints them, and a config reload changes what is served."""
from __future__ import annotations

import json

import pytest
import yaml

from .helpers import TWO_INSTANCE_YAML

pytestmark = pytest.mark.netns

MAC = "52:54:00:77:00:01"


def lab_config(tmp_path) -> dict:
    cfg = yaml.safe_load(TWO_INSTANCE_YAML)
    insts = cfg["groups"][0]["clients"]["instances"]
    insts[0]["disk_uri"] = "nbd://10.77.0.1:10809/fixedWin10"
    insts[1]["disk_uri"] = "nbd://10.77.0.1:10809/fixedDebian"
    insts[1]["format"] = "qcow2"
    # a host whose instances need the NBD manager's export, with NBD switched off: a clear 409
    cfg["groups"].append({"name": "nodisk", "clients": {"instances": [{"name": "x"}]}})
    cfg["hosts"].append({"mac": "52:54:00:77:00:03", "name": "lab-pc-03", "group": "nodisk"})
    cfg["nbd"] = {"enabled": False}
    cfg["dhcp"] = {"mode": "off"}
    return cfg


def curl(client, url: str) -> tuple[int, str]:
    r = client.ns.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", url], check=False, timeout=30)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def test_http_tftp_and_bootctl_serve_the_rendered_files(lab, bootd_daemon, tmp_path):
    d = bootd_daemon(lab_config(tmp_path), ns=lab.server)
    client = lab.add_client(address="10.77.0.50")
    base = f"http://{lab.server_ip}:8080/clients"

    code, body = curl(client, f"{base}/")
    assert code == 200 and body.split() == [f"{MAC}/", "52:54:00:77:00:02/", "52:54:00:77:00:03/"]

    code, body = curl(client, f"{base}/{MAC}/")
    assert code == 200
    names = body.split()
    assert len(names) == 12 and names[:3] == ["qemuinstance1.conf", "xserver1.conf", "viewer1.conf"]

    rendered = json.loads(d.bootctl("--json", "client", "render", "lab-pc-01", check=True).stdout)
    assert rendered["names"] == names and sorted(rendered["files"]) == sorted(names)
    for name in names:
        code, text = curl(client, f"{base}/{MAC}/{name}")
        assert code == 200 and text == rendered["files"][name], name
    assert "file=nbd://10.77.0.1:10809/fixedDebian,format=qcow2,cache=none" in \
        rendered["files"]["qemuinstance2.service"]

    code, body = curl(client, f"{base}/{MAC}/index.json")
    index = json.loads(body)
    assert [i["disk"] for i in index["instances"]] == ["nbd://10.77.0.1:10809/fixedWin10",
                                                        "nbd://10.77.0.1:10809/fixedDebian"]
    assert [i["vt"] for i in index["instances"]] == [7, 9]

    # TFTP: the same bytes under clients/<mac>/ (tftp-hpa takes ':' for host:file, so '-' there; curl ':')
    out = tmp_path / "tftp.out"
    r = client.ns.run(["tftp", lab.server_ip, "-c", "get", f"clients/{MAC.replace(':', '-')}/viewer2.service",
                       str(out)], check=False, timeout=30)
    assert out.read_text() == rendered["files"]["viewer2.service"], (r.stdout, r.stderr)
    r = client.ns.run(["curl", "-s", f"tftp://{lab.server_ip}/clients/{MAC}/index"], check=False, timeout=30)
    assert r.stdout == "".join(f"{n}\n" for n in names)

    # human output
    text = d.bootctl("client", "render", MAC, check=True).stdout
    assert "==> qemuinstance1.conf <==" in text and "vt9 display :2 vnc:5902" in text
    one = d.bootctl("client", "render", "lab-pc-01", "--file", "xserver2.conf", check=True).stdout
    assert one.rstrip("\n") == rendered["files"]["xserver2.conf"].rstrip("\n")

    # errors: another host's files (403: they carry its export token), an unknown file (404); the
    # admin side says why a host cannot be rendered (unknown host, no disk export)
    assert curl(client, f"{base}/52:54:00:99:99:99/")[0] == 403
    code, body = curl(client, f"{base}/52:54:00:77:00:03/")
    assert code == 403 and "nbd://" not in body
    assert curl(client, f"{base}/{MAC}/passwd")[0] == 404
    r = d.bootctl("client", "render", "52:54:00:77:00:03")
    assert r.returncode == 1 and "no disk export" in r.stderr
    assert json.loads(d.bootctl("--json", "client", "render", "52:54:00:77:00:03").stdout)["status"] == 409
    r = d.bootctl("client", "render", "nosuchhost")
    assert r.returncode == 1 and "unknown host" in r.stderr

    # the fetches are on the host's boot timeline
    host = d.api.get(f"/api/v1/hosts/{MAC}")
    assert any(e["kind"] == "config" and e["detail"].get("file") == "viewer1.conf" for e in host["events"])

    # a reload changes what is rendered, without a restart
    cfg = lab_config(tmp_path)
    cfg["groups"][0]["clients"]["instances"][1]["memory"] = "3G"
    cfg["storage"] = d.config_dict["storage"]
    cfg["api"] = d.config_dict["api"]
    d.write_config(cfg)
    d.bootctl("reload", check=True)
    code, text = curl(client, f"{base}/{MAC}/qemuinstance2.conf")
    assert code == 200 and " -m 3072 " in text


def test_hostile_config_is_refused_at_reload_and_the_old_files_stay(lab, bootd_daemon, tmp_path):
    d = bootd_daemon(lab_config(tmp_path), ns=lab.server)
    before = d.bootctl("--json", "client", "render", MAC, check=True).stdout
    cfg = lab_config(tmp_path)
    cfg["groups"][0]["clients"]["instances"][0]["extra_args"] = ["-drive file=/etc/shadow"]
    cfg["storage"] = d.config_dict["storage"]
    cfg["api"] = d.config_dict["api"]
    d.write_config(cfg)
    r = d.bootctl("reload")
    assert r.returncode == 1 and "not in the vetted list" in r.stdout + r.stderr
    assert d.bootctl("--json", "client", "render", MAC, check=True).stdout == before
