"""A host's rendered client configs (/clients/<key>/) go only to that host, whatever the key: its configured
name or its MAC in any spelling. Real bootd in a lab namespace, real curl from the owner's namespace and
from a stranger's; and the state store's ip -> MAC answer counts only a live lease."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clientconfig.helpers import TWO_INSTANCE_YAML  # noqa: E402
from support import have  # noqa: E402

from bootd.dhcp.leases import LeaseTable  # noqa: E402
from bootd.state import open_state  # noqa: E402

OWNER_MAC = "52:54:00:77:00:01"  # lab-pc-01 in TWO_INSTANCE_YAML
STRANGER_MAC = "52:54:00:77:99:01"  # no host entry
SECRET = "fixedWin10"  # the export name in lab-pc-01's rendered configs


def spellings(mac: str) -> list[str]:
    return ["lab-pc-01", mac, mac.upper(), mac.replace(":", "-"), mac.replace(":", "-").upper(),
            mac.replace(":", ""), mac.replace(":", "").upper()]


def curl(client, url: str) -> tuple[int, str]:
    r = client.ns.run(["curl", "-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", url],
                      check=False, timeout=60)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not have("curl"), reason="needs root and curl")
def test_client_configs_by_name_or_any_mac_spelling_only_for_the_owner(lab, bootd_daemon):
    cfg = yaml.safe_load(TWO_INSTANCE_YAML)
    insts = cfg["groups"][0]["clients"]["instances"]
    insts[0]["disk_uri"] = f"nbd://10.77.0.1:10809/{SECRET}"
    insts[1]["disk_uri"] = "nbd://10.77.0.1:10809/fixedDebian"
    cfg.update(nbd={"enabled": False}, dhcp={"mode": "off"}, tftp={"enabled": False})
    d = bootd_daemon(cfg, ns=lab.server)
    owner = lab.add_client(address="10.77.0.50", mac=OWNER_MAC)  # known by its neighbour entry only
    stranger = lab.add_client(address="10.77.0.60", mac=STRANGER_MAC)
    base = f"http://{lab.server_ip}:8080/clients"

    for key in spellings(OWNER_MAC):
        for path in (f"{key}/index.json", f"{key}/", f"{key}/qemuinstance1.conf"):
            code, body = curl(stranger, f"{base}/{path}")
            assert code == 403 and SECRET not in body and "nbd://" not in body, (path, code, body)
    for key in spellings(OWNER_MAC):
        code, body = curl(owner, f"{base}/{key}/index.json")
        assert code == 200 and SECRET in body, (key, code, body)
    # a name that is no host: 404, and nothing about anyone
    code, body = curl(stranger, f"{base}/no-such-pc/index.json")
    assert code == 404 and "nbd://" not in body
    refused = d.api.get("/api/v1/metrics")["clients"]["refused{reason=not-the-host}"]
    assert refused == 3 * len(spellings(OWNER_MAC))
    assert "lab-pc-01" not in curl(stranger, f"{base}/lab-pc-01/")[1]
    # the admin API reads the same spellings through the same normaliser
    for key in spellings(OWNER_MAC):
        assert d.api.get(f"/api/v1/hosts/{key}")["mac"] == OWNER_MAC, key


def test_the_store_names_only_the_holder_of_a_live_lease(tmp_path):
    """mac_for_ip: a bound unexpired lease; never a released or expired one, never hosts.last_ip."""
    store = open_state(tmp_path / "state.db")
    leases = LeaseTable(store)
    a, b, ip = "52:54:00:77:00:01", "52:54:00:77:00:02", "10.77.0.100"
    now = time.time()
    store.touch_host(a, ip=ip)  # A was seen there
    assert store.mac_for_ip(ip) is None
    leases.bind(ip, a, expires=now + 600, now=now)
    assert store.mac_for_ip(ip) == a
    leases.release(ip, a, now=now)
    assert store.mac_for_ip(ip) is None  # released
    leases.bind(ip, a, expires=now - 1, now=now - 601)
    assert store.mac_for_ip(ip) is None  # expired
    leases.bind(ip, b, expires=now + 600, now=now)
    assert store.mac_for_ip(ip) == b
    store.close()
