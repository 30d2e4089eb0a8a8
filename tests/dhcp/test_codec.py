"""The sans-IO codec against golden captures of real clients, and against hostile input."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pcap import read_udp

from bootd.dhcp.codec import BOOTP_MIN, MAGIC, DhcpDecodeError, DhcpMessage, build_tlv, decode, encode, parse_tlv

DATA = Path(__file__).resolve().parent.parent / "data" / "dhcp"
GOLDEN = sorted(DATA.glob("*.pcap"))


def dhcp_payloads(name: str):
    return [p for p in read_udp(DATA / name) if {p.src[1], p.dst[1]} & {67, 68, 4011}]


def test_golden_captures_are_present():
    """An empty tests/data/dhcp would make the parametrized round trip a silent skip and the fuzz seeds empty."""
    assert {p.stem for p in GOLDEN} >= {"dhclient", "udhcpc", "perfdhcp", "ipxe-bios", "ipxe-uefi"}, GOLDEN


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_roundtrip_is_byte_exact(path):
    pkts = [p for p in read_udp(path) if {p.src[1], p.dst[1]} & {67, 68, 4011}]
    assert pkts, f"{path.name} holds no DHCP packets"
    for p in pkts:
        msg = decode(p.payload)
        assert encode(msg) == p.payload, f"{path.name}: {msg!r} re-encodes differently"
        assert decode(encode(msg)) == msg


def test_dhclient_capture_fields():
    pkts = dhcp_payloads("dhclient.pcap")
    msgs = [decode(p.payload) for p in pkts]
    types = [m.message_type for m in msgs]
    assert types[:4] == [1, 2, 3, 5]
    disc, offer, req, ack = msgs[:4]
    assert disc.mac == pkts[0].src_mac == "52:54:00:77:00:01"
    assert 1 in disc.parameter_request_list and 3 in disc.parameter_request_list
    assert offer.op == 2 and offer.yiaddr.startswith("10.77.0.")
    assert offer.server_id == "10.77.0.1" and offer.lease_time == 3600
    assert offer.file == b"undionly.kpxe" and offer.boot_file == "undionly.kpxe"
    assert req.requested_ip == offer.yiaddr and req.server_id == "10.77.0.1"
    assert ack.yiaddr == offer.yiaddr and ack.xid == req.xid
    # the last REQUEST is an INIT-REBOOT from the lease file: no server id, the remembered address
    reboot = [m for m in msgs if m.message_type == 3][-1]
    assert reboot.server_id is None and reboot.requested_ip == offer.yiaddr


def test_udhcpc_capture_fields():
    msgs = [decode(p.payload) for p in dhcp_payloads("udhcpc.pcap")]
    disc = msgs[0]
    assert disc.message_type == 1
    assert disc.hostname == "labpc7"
    assert disc.vendor_class == "bootd-test"
    assert disc.client_id == b"\x01" + bytes.fromhex("525400770001")
    assert disc.max_message_size == 576


def test_perfdhcp_capture_is_relayed():
    msgs = [decode(p.payload) for p in dhcp_payloads("perfdhcp.pcap")]
    assert len({m.mac for m in msgs}) == len(msgs) >= 5
    for m in msgs:
        assert m.giaddr == "10.77.0.50" and m.message_type == 1


@pytest.mark.parametrize("name,arch", [("ipxe-bios.pcap", 0), ("ipxe-uefi.pcap", 7)])
def test_ipxe_capture_fields(name, arch):
    if not (DATA / name).exists():
        pytest.skip(f"{name} not captured")
    msgs = [decode(p.payload) for p in dhcp_payloads(name)]
    disc = next(m for m in msgs if m.message_type == 1)
    assert disc.is_pxe and disc.vendor_class.startswith("PXEClient:Arch:%05d" % arch)
    assert disc.client_arch == [arch]
    assert disc.is_ipxe and b"iPXE" in disc.user_classes
    assert disc.ipxe_options is not None and 177 in disc.ipxe_options  # iPXE version info
    assert disc.client_ndi is not None and disc.client_ndi[0] == 1
    assert disc.client_uuid is not None and len(disc.client_uuid) == 36


def test_option_overload_and_repeats():
    # options in `file` (overload 1) and a split option 43 (RFC 3396) are folded into one dict
    file_opts = bytes([12, 4]) + b"host" + b"\xff"
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 7, 0, 0, bytes(4), bytes(4), bytes(4), bytes(4),
                       bytes.fromhex("525400000002"), b"", file_opts)
    opts = bytes([53, 1, 1, 52, 1, 1, 43, 2]) + b"ab" + bytes([43, 1]) + b"c" + b"\xff"
    msg = decode(head + MAGIC + opts)
    assert msg.hostname == "host"
    assert msg.options[43] == b"abc"
    assert 52 not in msg.options and msg.file == b""
    again = decode(encode(msg))
    assert again == msg


def test_long_option_is_split_and_rejoined():
    msg = DhcpMessage(chaddr=bytes(6), options={53: b"\x01", 43: bytes(range(256)) * 2})
    raw = encode(msg)
    assert raw.count(bytes([43, 255])) == 2
    assert decode(raw).options[43] == bytes(range(256)) * 2


def test_user_class_both_forms():
    plain = DhcpMessage(chaddr=bytes(6), options={53: b"\x01", 77: b"iPXE"})
    assert plain.user_classes == [b"iPXE"] and plain.is_ipxe
    tlv = DhcpMessage(chaddr=bytes(6), options={53: b"\x01", 77: b"\x04iPXE\x03lab"})
    assert tlv.user_classes == [b"iPXE", b"lab"] and tlv.is_ipxe
    other = DhcpMessage(chaddr=bytes(6), options={53: b"\x01", 77: b"\x05gPXE2"})
    assert not other.is_ipxe


def test_relay_agent_and_encapsulated():
    o82 = build_tlv({1: b"port7", 2: b"\x00\x11\x22"})
    m = decode(encode(DhcpMessage(chaddr=bytes(6), giaddr="10.1.2.3", options={53: b"\x01", 82: o82})))
    assert m.relay_agent == {1: b"port7", 2: b"\x00\x11\x22"}
    assert parse_tlv(b"\x06\x01\x08\xff") == {6: b"\x08"}
    with pytest.raises(DhcpDecodeError):
        parse_tlv(b"\x06\x05\x08")
    bad = DhcpMessage(chaddr=bytes(6), options={53: b"\x01", 82: b"\x01\x09abc"})
    with pytest.raises(DhcpDecodeError):
        _ = bad.relay_agent


def test_uuid_missing_or_odd_shapes():
    assert DhcpMessage(options={}).client_uuid is None
    assert DhcpMessage(options={97: b"\x00"}).client_uuid is None
    assert DhcpMessage(options={97: b"\x00" + bytes(16)}).client_uuid == "00000000-0000-0000-0000-000000000000"


def test_reply_padded_to_bootp_minimum():
    raw = encode(DhcpMessage(op=2, chaddr=bytes(6), options={53: b"\x02"}), BOOTP_MIN)
    assert len(raw) == BOOTP_MIN and decode(raw).message_type == 2


@pytest.mark.parametrize("raw,why", [
    (b"", "too short"),
    (b"\x01" * 239, "too short"),
    (bytes(236) + MAGIC, "bad op"),
    (b"\x01\x01\x11" + bytes(233) + MAGIC, "hardware address length"),
    (b"\x01\x01\x06" + bytes(233) + b"\x00\x00\x00\x00", "magic cookie"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + b"\x35\x05\x01", "truncated"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + b"\x35", "no length"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + b"\x35\x02\x01\x01\xff", "option 53 must be 1"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + b"\x32\x03\x01\x01\x01\xff", "option 50 must be 4"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + b"\x5d\x03\x00\x00\x07\xff", "option 93"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + b"\x34\x01\x07\xff", "overload"),
    (b"\x01\x01\x06" + bytes(233) + MAGIC + bytes(65600), "too long"),
])
def test_malformed_raises_one_typed_error(raw, why):
    with pytest.raises(DhcpDecodeError, match=why):
        decode(raw)


def _golden_seeds() -> list[bytes]:
    seeds = []
    for path in GOLDEN:
        seeds += [p.payload for p in read_udp(path) if {p.src[1], p.dst[1]} & {67, 68, 4011}]
    return seeds


def test_every_truncation_of_every_golden_packet():
    seeds = _golden_seeds()
    assert len(seeds) >= len(GOLDEN) > 0, "no seed packets: the fuzz would pass without running"
    cases = 0
    for raw in seeds:
        for n in range(0, len(raw) + 1, 3):
            cases += 1
            try:
                decode(raw[:n])
            except DhcpDecodeError:
                pass
    assert cases >= 100 * len(seeds)


def test_mutated_golden_packets_only_raise_the_typed_error():
    rnd = random.Random(1234)
    seeds = _golden_seeds()
    assert len(seeds) >= len(GOLDEN) > 0, "no seed packets: the fuzz would pass without running"
    decoded = rejected = 0
    for _ in range(5000):
        raw = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 8)):
            raw[rnd.randrange(240, len(raw)) if rnd.random() < 0.8 else rnd.randrange(len(raw))] = rnd.randrange(256)
        try:
            msg = decode(bytes(raw))
        except DhcpDecodeError:
            rejected += 1
            continue
        decoded += 1
        # typed accessors on whatever survived either work or raise the same typed error
        for attr in ("message_type", "requested_ip", "server_id", "client_arch", "user_classes", "client_uuid",
                     "vendor_class", "hostname", "mac", "is_ipxe", "boot_file", "client_ndi"):
            getattr(msg, attr)
        for attr in ("relay_agent", "pxe_options", "ipxe_options"):
            try:
                getattr(msg, attr)
            except DhcpDecodeError:
                pass
        encode(msg)
    # both paths ran: survivors had their accessors and re-encoding exercised, the rest were refused
    assert decoded + rejected == 5000 and decoded > 0 and rejected > 0, (decoded, rejected)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=700))
def test_random_bytes_with_cookie(tail):
    raw = b"\x01\x01\x06\x00" + bytes(232) + MAGIC + tail
    try:
        msg = decode(raw)
    except DhcpDecodeError:
        return
    assert decode(encode(msg)) == msg
