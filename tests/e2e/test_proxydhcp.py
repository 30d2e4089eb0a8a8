"""proxyDHCP: the site's DHCP server (dnsmasq on another host of the lab network) hands out addresses
only; bootd in `proxy` mode adds the boot information; the PC boots to its marker."""
from __future__ import annotations

import pytest
from harness import lab_config, running_bootd_lab, start_dnsmasq

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

MAC = "52:54:00:77:03:01"


def test_pc_boots_with_bootd_in_proxy_mode_beside_dnsmasq(assets, pc_logs):
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, dhcp_mode="proxy",
                                                           hosts=[{"mac": MAC, "name": "pc-proxy", "group": "lab"}]),
                           assets) as bl:
        site = bl.lab.add_client(address="10.77.0.2")  # the site's DHCP server: another host on the network
        start_dnsmasq(bl.lab, pc_logs / "dnsmasq", ns=site.ns, interface="eth0",
                      range_start="10.77.0.200", range_end="10.77.0.220")
        r = bl.pc("pc-proxy", mac=MAC).boot(timeout=180)
        assert r.ok and r.marker == "A" and r.fresh is True, r.describe()
        # The address came from dnsmasq's range, the boot information from bootd.
        assert r.ip and 200 <= int(r.ip.rsplit(".", 1)[1]) <= 220, r.describe()
        leases = (pc_logs / "dnsmasq" / "dnsmasq.leases").read_text()
        assert MAC in leases, leases
        dhcp = [e for e in bl.events(MAC) if e["kind"] in ("dhcp", "proxydhcp")]
        assert dhcp and {e["kind"] for e in dhcp} == {"proxydhcp"}, dhcp
        assert not any("offered" in e["detail"] for e in dhcp), dhcp  # bootd never offered an address
