"""Triage of a batch of received DHCP packets (bootd/dhcp/triage.py, issue 22): newest first, stale and
superseded requests skipped, everything else kept."""
from __future__ import annotations

import socket

from bootd.dhcp.codec import DhcpMessage, encode
from bootd.dhcp.triage import Received, message_type, triage

T = 1_800_000_000.0


def packet(mac: int, mtype: int, xid: int = 1, opts: dict[int, bytes] | None = None) -> bytes:
    return encode(DhcpMessage(xid=xid, chaddr=mac.to_bytes(6, "big"), options={53: bytes([mtype]), **(opts or {})}))


def test_message_type_walks_the_options_without_decoding():
    assert message_type(packet(1, 1)) == 1
    assert message_type(packet(1, 3, opts={50: socket.inet_aton("10.0.0.5")})) == 3
    # option 53 after others and after pad bytes
    raw = bytearray(packet(1, 7))
    i = raw.index(b"\x35\x01\x07", 240)
    raw[i:i] = b"\x00\x00\x0c\x03abc"
    assert message_type(bytes(raw)) == 7
    assert message_type(encode(DhcpMessage(xid=1, chaddr=b"\x01" * 6, options={12: b"x"}))) is None
    assert message_type(b"\x01" * 100) is None  # too short
    bad = bytearray(packet(1, 1))
    bad[236:240] = b"\x00\x00\x00\x00"  # no magic cookie
    assert message_type(bytes(bad)) is None
    truncated = bytes(packet(1, 1))[:241]  # the option's length byte is missing
    assert message_type(truncated) is None


def test_newest_first_and_nothing_dropped_when_all_are_fresh_and_distinct():
    got = [Received(packet(m, 1), ("0.0.0.0", 68), T - 0.1 * (5 - m)) for m in range(5)]
    keep, stale, superseded = triage(got, T, 3.0)
    assert [p.data[28:34] for p in keep] == [m.to_bytes(6, "big") for m in (4, 3, 2, 1, 0)]
    assert (stale, superseded) == (0, 0)


def test_a_repeated_discover_or_request_is_answered_once_the_newest():
    old_d = Received(packet(7, 1, xid=1), ("0.0.0.0", 68), T - 2.0)
    other = Received(packet(8, 1, xid=5), ("0.0.0.0", 68), T - 1.9)
    new_d = Received(packet(7, 1, xid=2), ("0.0.0.0", 68), T - 0.5)
    req = Received(packet(9, 3, xid=3), ("0.0.0.0", 68), T - 0.4)
    req_again = Received(packet(9, 3, xid=3), ("0.0.0.0", 68), T - 0.1)
    keep, stale, superseded = triage([old_d, other, new_d, req, req_again], T, 3.0)
    assert keep == [req_again, new_d, other]
    assert (stale, superseded) == (0, 2)


def test_a_discover_followed_by_its_request_leaves_only_the_request():
    d = Received(packet(7, 1, xid=4), ("0.0.0.0", 68), T - 0.3)
    r = Received(packet(7, 3, xid=4), ("0.0.0.0", 68), T - 0.2)
    assert triage([d, r], T, 3.0) == ([r], 0, 1)


def test_release_decline_and_inform_are_never_superseded():
    msgs = [Received(packet(7, t), ("10.0.0.5", 68), T - 0.5 + 0.1 * i) for i, t in enumerate((4, 7, 8))]
    newest = Received(packet(7, 1, xid=9), ("0.0.0.0", 68), T)
    keep, stale, superseded = triage([*msgs, newest], T, 3.0)
    assert keep == [newest, *reversed(msgs)] and superseded == 0


def test_packets_older_than_stale_after_are_skipped():
    old = [Received(packet(m, 1), ("0.0.0.0", 68), T - 5.0) for m in range(3)]
    fresh = Received(packet(9, 1), ("0.0.0.0", 68), T - 2.9)
    keep, stale, superseded = triage([*old, fresh], T, 3.0)
    assert keep == [fresh] and (stale, superseded) == (3, 0)
    assert triage([*old, fresh], T, 6.0)[0] == [fresh, *reversed(old)]


def test_a_stale_repeat_does_not_count_as_the_newest():
    """The stale copy is skipped as stale; the client's newer copy is still answered."""
    stale_copy = Received(packet(7, 1, xid=1), ("0.0.0.0", 68), T - 4.0)
    keep, stale, superseded = triage([stale_copy], T, 3.0)
    assert keep == [] and stale == 1
    newer = Received(packet(7, 1, xid=1), ("0.0.0.0", 68), T - 1.0)
    assert triage([stale_copy, newer], T, 3.0) == ([newer], 1, 0)


def test_a_late_release_or_decline_is_still_handled():
    """They ask for no answer but say an address is free or in use: never skipped as stale."""
    late = [Received(packet(7, t), ("10.0.0.5", 68), T - 30.0) for t in (4, 7)]
    late_inform = Received(packet(8, 8), ("10.0.0.6", 68), T - 30.0)
    keep, stale, superseded = triage([*late, late_inform], T, 3.0)
    assert keep == list(reversed(late)) and (stale, superseded) == (1, 0)
