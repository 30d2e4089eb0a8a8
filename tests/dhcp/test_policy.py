"""DHCP policy decisions with an explicit clock and a real (temporary) state store."""
from __future__ import annotations

import pytest
import yaml

from bootd.config import parse_config
from bootd.dhcp.codec import ACK, DECLINE, DISCOVER, INFORM, NAK, OFFER, RELEASE, REQUEST, DhcpMessage, decode, encode
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.policy import IPXE_NO_PXEDHCP, DhcpPolicy
from bootd.state import open_state

T0 = 1_800_000_000.0


def make_config(**dhcp):
    base = {
        "interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
        "dhcp": {"mode": "full", "lease_time": 600, "decline_quarantine": 300,
                 "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.109",
                            "router": "10.77.0.1", "dns": ["10.77.0.1"], "domain": "lab.test"}]},
        "images": [{"name": "deb"}],
        "groups": [{"name": "room1", "images": ["deb"]}, {"name": "old", "images": ["deb"], "boot": "pxelinux"}],
        "hosts": [{"mac": "52:54:00:00:00:aa", "name": "pc-aa", "ip": "10.77.0.20", "group": "room1"},
                  {"mac": "52:54:00:00:00:bb", "name": "pc-bb", "group": "old"}],
    }
    extra_top = dhcp.pop("_top", {})
    base["dhcp"].update(dhcp)
    base.update(extra_top)
    return parse_config(yaml.safe_dump(base))


@pytest.fixture
def store(tmp_path):
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


class Env:
    def __init__(self, store, **dhcp):
        self.store = store
        self.config = make_config(**dhcp)
        self.leases = LeaseTable(store)
        rows = store.query("SELECT mac, ip FROM dhcp_reservations")
        self.policy = DhcpPolicy(self.config, self.leases, {r["mac"]: r["ip"] for r in rows})
        self.iface = self.policy.interfaces["br0"]
        self.now = T0

    def send(self, mtype, mac="52:54:00:12:34:56", port=67, src=None, **kw):
        opts = {53: bytes([mtype])}
        opts.update(kw.pop("options", {}))
        msg = DhcpMessage(xid=kw.pop("xid", 0x1000), chaddr=bytes.fromhex(mac.replace(":", "")), options=opts, **kw)
        msg = decode(encode(msg))  # through the codec, like the server
        out = self.policy.handle(msg, self.iface, port, self.now, src)
        if out.reply is not None:
            out.reply = decode(encode(out.reply, 300))
        return out

    def dora(self, mac="52:54:00:12:34:56", opts=None):
        opts = opts or {}
        off = self.send(DISCOVER, mac, options=dict(opts))
        assert off.reply is not None, off.ignored
        ip = off.reply.yiaddr
        ack = self.send(REQUEST, mac, options={50: ip_b(ip), 54: ip_b("10.77.0.1"), **opts})
        return off, ack


def ip_b(ip):
    return bytes(int(x) for x in ip.split("."))


def test_dora_gives_pool_address_with_options_and_persists_before_ack(store):
    env = Env(store)
    off, ack = env.dora()
    o = off.reply
    assert o.message_type == OFFER and o.yiaddr == "10.77.0.100"
    assert o.options[1] == ip_b("255.255.255.0") and o.options[3] == ip_b("10.77.0.1")
    assert o.options[15] == b"lab.test" and o.lease_time == 600 and o.server_id == "10.77.0.1"
    assert off.dest == ("10.77.0.100", 68) and off.link_unicast  # no broadcast flag: unicast to the new address
    # no offer is persisted
    a = ack.reply
    assert a.message_type == ACK and a.yiaddr == "10.77.0.100"
    rows = store.query("SELECT * FROM leases")
    assert [(r["ip"], r["mac"], r["state"], r["expires"]) for r in rows] == \
        [("10.77.0.100", "52:54:00:12:34:56", "bound", T0 + 600)]
    # a non-PXE unknown client is no boot event
    assert off.event is None and ack.event is None


def test_unicast_offer_to_client_without_broadcast_flag(store):
    env = Env(store)
    off = env.send(DISCOVER, flags=0)
    assert off.link_unicast and off.dest == ("10.77.0.100", 68)
    off2 = env.send(DISCOVER, mac="52:54:00:00:00:01", flags=0x8000)
    assert off2.broadcast and off2.dest[0] == "255.255.255.255"


def test_second_client_gets_another_address_and_first_keeps_its_own(store):
    env = Env(store)
    _, a1 = env.dora("52:54:00:00:00:01")
    _, a2 = env.dora("52:54:00:00:00:02")
    assert a1.reply.yiaddr != a2.reply.yiaddr
    env.now += 100
    _, again = env.dora("52:54:00:00:00:01")
    assert again.reply.yiaddr == a1.reply.yiaddr
    # even after a restart (new lease table from the store)
    env2 = Env(store)
    env2.now = env.now + 10
    off = env2.send(DISCOVER, "52:54:00:00:00:02")
    assert off.reply.yiaddr == a2.reply.yiaddr


def test_renew_rebind_and_release(store):
    env = Env(store)
    _, ack = env.dora()
    ip = ack.reply.yiaddr
    env.now += 300
    renew = env.send(REQUEST, ciaddr=ip)
    assert renew.reply.message_type == ACK and renew.dest == (ip, 68) and renew.reply.ciaddr == ip
    assert store.query("SELECT expires FROM leases WHERE ip=?", (ip,))[0][0] == env.now + 600
    # a renewal for an address that someone else holds is NAKed
    other = env.send(REQUEST, mac="52:54:00:00:00:09", ciaddr=ip)
    assert other.reply.message_type == NAK and other.broadcast
    rel = env.send(RELEASE, ciaddr=ip, options={54: ip_b("10.77.0.1")})
    assert rel.reply is None and rel.ignored == "release"
    assert store.query("SELECT state FROM leases WHERE ip=?", (ip,))[0][0] == "released"
    # released: another client may now have it once the never-used ones are gone
    off = env.send(DISCOVER, "52:54:00:00:00:09", options={50: ip_b(ip)})
    assert off.reply.yiaddr == ip


def test_request_for_other_server_drops_our_offer(store):
    env = Env(store)
    off = env.send(DISCOVER)
    out = env.send(REQUEST, options={50: ip_b(off.reply.yiaddr), 54: ip_b("10.77.0.254")})
    assert out.reply is None and out.ignored == "other-server"
    assert env.leases.offers == {}


def test_init_reboot_wrong_network_is_naked(store):
    env = Env(store)
    out = env.send(REQUEST, options={50: ip_b("192.168.1.50")})
    assert out.reply.message_type == NAK and out.dest == ("255.255.255.255", 68)


def test_reservations_from_config_and_store(store):
    with store.transaction() as cur:
        cur.execute("INSERT INTO dhcp_reservations(mac, ip, name, created) VALUES (?,?,?,?)",
                    ("52:54:00:00:00:cc", "10.77.0.30", "pc-cc", T0))
    env = Env(store)
    for mac, ip in (("52:54:00:00:00:aa", "10.77.0.20"), ("52:54:00:00:00:cc", "10.77.0.30")):
        for _ in range(2):
            off, ack = env.dora(mac)
            assert off.reply.yiaddr == ip and ack.reply.yiaddr == ip
    # a reserved address is never given to someone else, even if asked for
    off = env.send(DISCOVER, "52:54:00:00:00:01", options={50: ip_b("10.77.0.20")})
    assert off.reply.yiaddr != "10.77.0.20"
    nak = env.send(REQUEST, "52:54:00:00:00:01", options={50: ip_b("10.77.0.20")})
    assert nak.reply.message_type == NAK
    # known host: its name goes out as option 12 and its requests are boot events
    off, _ = env.dora("52:54:00:00:00:aa")
    assert off.reply.options[12] == b"pc-aa" and off.event["offered"] == "10.77.0.20"


def test_unknown_hosts_refused_when_not_allowed(store):
    env = Env(store, allow_unknown=False)
    out = env.send(DISCOVER)
    assert out.reply is None and out.ignored == "unknown-host"
    off, ack = env.dora("52:54:00:00:00:bb")  # known, no fixed ip: pool address
    assert ack.reply.yiaddr == "10.77.0.100"


def test_decline_quarantines_the_address(store):
    env = Env(store)
    _, ack = env.dora("52:54:00:00:00:01")
    bad = ack.reply.yiaddr
    out = env.send(DECLINE, "52:54:00:00:00:01", options={50: ip_b(bad), 54: ip_b("10.77.0.1")})
    assert out.ignored == "decline"
    assert store.query("SELECT state, expires FROM leases WHERE ip=?", (bad,))[0][:] == ("declined", T0 + 300)
    for i in range(2, 11):  # the rest of the pool (10 addresses, 1 declined)
        off = env.send(DISCOVER, f"52:54:00:00:01:{i:02x}")
        assert off.reply is not None and off.reply.yiaddr != bad
        env.send(REQUEST, f"52:54:00:00:01:{i:02x}", options={50: ip_b(off.reply.yiaddr), 54: ip_b("10.77.0.1")})
    assert env.send(DISCOVER, "52:54:00:00:02:01").ignored == "pool-exhausted"
    env.now += 301  # quarantine over
    assert env.send(DISCOVER, "52:54:00:00:02:01").reply.yiaddr == bad


def test_inform_answers_options_without_address(store):
    env = Env(store)
    out = env.send(INFORM, ciaddr="10.77.0.5")
    r = out.reply
    assert r.message_type == ACK and r.yiaddr == "0.0.0.0" and r.ciaddr == "10.77.0.5"
    assert 51 not in r.options and r.options[3] == ip_b("10.77.0.1")
    assert out.dest == ("10.77.0.5", 68)
    assert store.query("SELECT count(*) FROM leases")[0][0] == 0


def test_relayed_request_goes_back_to_relay_with_option_82_last(store):
    env = Env(store, relay_subnets=[{"subnet": "10.88.0.0/24", "interface": "br0", "start": "10.88.0.10",
                                     "end": "10.88.0.20", "router": "10.88.0.1"}])
    o82 = b"\x01\x05port7\x02\x03abc"
    off = env.send(DISCOVER, giaddr="10.88.0.1", options={82: o82})
    r = off.reply
    assert r.yiaddr == "10.88.0.10" and r.giaddr == "10.88.0.1" and off.dest == ("10.88.0.1", 67)
    assert list(r.options)[-1] == 82 and r.options[82] == o82
    assert r.options[3] == ip_b("10.88.0.1")
    ack = env.send(REQUEST, giaddr="10.88.0.1", options={50: ip_b("10.88.0.10"), 54: ip_b("10.77.0.1"), 82: o82})
    assert ack.reply.message_type == ACK and ack.dest == ("10.88.0.1", 67)
    # an unknown relayed subnet gets nothing
    assert env.send(DISCOVER, "52:54:00:00:00:02", giaddr="10.99.0.1").ignored == "no-pool"


def pxe_opts(arch, ipxe=False, vendor=None):
    o = {60: (vendor or f"PXEClient:Arch:{arch:05d}:UNDI:002001").encode(), 93: arch.to_bytes(2, "big"),
         97: b"\x00" + bytes(range(16)), 55: bytes([1, 3, 66, 67])}
    if ipxe:
        o[77] = b"iPXE"
        o[175] = b"\xb1\x05\x01\x80\x86\x10\x0e"
    return o


@pytest.mark.parametrize("arch,expected", [(0, "undionly.kpxe"), (6, "ipxe-ia32.efi"), (7, "ipxe.efi"),
                                           (9, "ipxe.efi"), (11, "snponly-arm64.efi")])
def test_loader_by_architecture(store, arch, expected):
    env = Env(store)
    off = env.send(DISCOVER, options=pxe_opts(arch))
    r = off.reply
    assert r.file == expected.encode() and r.siaddr == "10.77.0.1" and r.options[67] == expected.encode()
    assert r.options[66] == b"10.77.0.1"
    # no option 60 in a full-mode offer: with it (and no 43) EDK2 asks port 4011 instead of loading the file
    assert 60 not in r.options and 43 not in r.options and r.options[97] == b"\x00" + bytes(range(16))
    assert 175 not in r.options
    assert off.event["arch"] in ("bios", "uefi-ia32", "uefi-x64", "uefi-arm64") and off.event["file"] == expected


def test_http_boot_client_gets_url(store):
    env = Env(store)
    off = env.send(DISCOVER, options=pxe_opts(16, vendor="HTTPClient:Arch:00016:UNDI:003001"))
    r = off.reply
    assert r.options[60] == b"HTTPClient"
    assert r.file == b"http://10.77.0.1:8080/boot/files/ipxe.efi"


def test_ipxe_gets_its_script_not_ipxe_again_and_no_pxedhcp(store):
    env = Env(store)
    mac = "52:54:00:00:00:aa"
    off, ack = env.dora(mac, pxe_opts(0, ipxe=True))
    for out in (off, ack):
        assert out.reply.file == f"http://10.77.0.1:8080/boot/{mac}.ipxe".encode()
        assert out.reply.options[175] == IPXE_NO_PXEDHCP
        assert out.event["ipxe"] is True
    assert ack.event["ip"] == "10.77.0.20"


def test_group_boot_choice_pxelinux(store):
    env = Env(store)
    off = env.send(DISCOVER, "52:54:00:00:00:bb", options=pxe_opts(0))
    assert off.reply.file == b"pxelinux.0"
    # also from an iPXE ROM (QEMU's NICs, many real ones): pxelinux runs on iPXE's PXE API
    off = env.send(DISCOVER, "52:54:00:00:00:bb", options=pxe_opts(0, ipxe=True))
    assert off.reply.file == b"pxelinux.0"


def test_ipxe_never_gets_an_ipxe_binary_even_for_grub_hosts(store):
    env = Env(store, _top={"groups": [{"name": "room1", "images": ["deb"]}, {"name": "old", "images": ["deb"],
                                                                           "boot": "grub"}]})
    mac = "52:54:00:00:00:bb"
    uefi = env.send(DISCOVER, mac, options=pxe_opts(7, ipxe=True))
    assert uefi.reply.file == b"grubx64.efi"
    bios = env.send(DISCOVER, mac, options=pxe_opts(0, ipxe=True))  # grub has no BIOS loader here
    assert bios.reply.file == f"http://10.77.0.1:8080/boot/{mac}.ipxe".encode()


def test_proxy_mode_boot_info_only(store):
    env = Env(store, mode="proxy")
    off = env.send(DISCOVER, options=pxe_opts(7))
    r = off.reply
    assert r.message_type == OFFER and r.yiaddr == "0.0.0.0" and r.file == b"ipxe.efi"
    assert r.options[60] == b"PXEClient" and r.options[43] == b"\x06\x01\x08\xff" and r.server_id == "10.77.0.1"
    assert 51 not in r.options and 1 not in r.options and off.broadcast
    assert off.event_kind == "proxydhcp"
    # not a PXE client: nothing
    assert env.send(DISCOVER, "52:54:00:00:00:02").ignored == "not-pxe"
    # the REQUEST for the site server's offer is not ours
    assert env.send(REQUEST, options={50: ip_b("10.77.0.150"), **pxe_opts(7)}).ignored == "proxy-not-discover"
    # port 4011: answered unicast to where it came from
    ack = env.send(REQUEST, port=4011, src=("10.77.0.150", 68), ciaddr="10.77.0.150", options=pxe_opts(7))
    assert ack.reply.message_type == ACK and ack.dest == ("10.77.0.150", 68) and ack.reply.file == b"ipxe.efi"
    assert store.query("SELECT count(*) FROM leases")[0][0] == 0
    # iPXE in proxy mode gets its script URL and no no-pxedhcp flag (it must take our proxy offer)
    ip = env.send(DISCOVER, options=pxe_opts(0, ipxe=True))
    assert ip.reply.file.startswith(b"http://10.77.0.1:8080/boot/") and 175 not in ip.reply.options


def test_off_mode_and_full_mode_ignores_4011(store):
    assert Env(store, mode="off").send(DISCOVER).ignored == "dhcp-off"
    assert Env(store).send(REQUEST, port=4011, options=pxe_opts(0)).ignored == "port-4011-in-full-mode"


def test_decline_from_anyone_but_the_lease_holder_quarantines_nothing(store):
    """Issue 13.5: DECLINEs from a stranger (its own MAC, allow_unknown false) for a reserved host's
    address and for every pool address are ignored; the holder's own DECLINE still works."""
    env = Env(store, allow_unknown=False)
    _, ack = env.dora("52:54:00:00:00:aa")  # the reserved host holds 10.77.0.20
    assert ack.reply.yiaddr == "10.77.0.20"
    stranger = "52:54:00:66:66:66"
    outs = [env.send(DECLINE, stranger, options={50: ip_b(ip), 54: ip_b("10.77.0.1")})
            for ip in ["10.77.0.20"] + [f"10.77.0.{n}" for n in range(100, 110)]]
    assert [o.ignored for o in outs] == ["decline-lease-mismatch"] + ["decline-lease-not-found"] * 10
    assert store.query("SELECT count(*) FROM leases WHERE state='declined'")[0][0] == 0
    # a forged DECLINE with the holder's MAC but not its client id is refused too
    out = env.send(DECLINE, "52:54:00:00:00:aa", options={50: ip_b("10.77.0.20"), 54: ip_b("10.77.0.1"),
                                                          61: b"\x01forged"})
    assert out.ignored == "decline-lease-mismatch"
    _, ack = env.dora("52:54:00:00:00:bb")  # known host, pool address: nothing was quarantined
    assert ack.reply.yiaddr == "10.77.0.100"
    out = env.send(DECLINE, "52:54:00:00:00:bb", options={50: ip_b("10.77.0.100"), 54: ip_b("10.77.0.1")})
    assert out.ignored == "decline"
    assert store.query("SELECT state FROM leases WHERE ip='10.77.0.100'")[0][0] == "declined"
