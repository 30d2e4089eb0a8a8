"""Sans-IO tests of the TFTP core: golden packets, negotiation, windows, rollover, timers, fuzz.

Every test drives ReadSession with an explicit clock; no sockets, no sleeping.
"""
from __future__ import annotations

import os
import random
import struct

import pytest

from bootd.tftp.session import (
    OP_ACK,
    OP_DATA,
    OP_ERROR,
    OP_OACK,
    OP_RRQ,
    ErrorCode,
    MalformedPacket,
    ReadSession,
    SessionLimits,
    State,
    encode_ack,
    encode_error,
    encode_request,
    negotiate,
    netascii_encode,
    parse_oack,
    parse_request,
)


def rrq(name="f", mode="octet", **opts) -> bytes:
    return encode_request(name, mode, {k: str(v) for k, v in opts.items()})


DEFAULT_LIMITS = SessionLimits()


def session_for(data: bytes, *, mode="octet", limits=DEFAULT_LIMITS, mtu=None, now=0.0, size="auto", **opts):
    req = parse_request(rrq("f", mode, **opts))
    s = ReadSession(req, now=now, size=len(data) if size == "auto" else size, limits=limits, path_mtu=mtu)
    return s


def op(pkt: bytes) -> int:
    return struct.unpack("!H", pkt[:2])[0]


def blk(pkt: bytes) -> int:
    return struct.unpack("!H", pkt[2:4])[0]


class LockstepClient:
    """An RFC 1350/7440 receiver: ACKs each window's last in-order block; collects the file."""

    def __init__(self, blksize=512, windowsize=1):
        self.blksize = blksize
        self.windowsize = windowsize
        self.expected = 1  # wire number wraps
        self.got = bytearray()
        self.done = False
        self.in_window = 0
        self.data_packets = 0

    def on_packets(self, pkts: list[bytes]) -> list[bytes]:
        replies = []
        for p in pkts:
            if op(p) == OP_OACK:
                o = parse_oack(p)
                self.blksize = int(o.get("blksize", self.blksize))
                self.windowsize = int(o.get("windowsize", self.windowsize))
                replies.append(encode_ack(0))
                continue
            assert op(p) == OP_DATA, p[:40]
            self.data_packets += 1
            if blk(p) != self.expected & 0xFFFF:
                continue  # out of order or duplicate: ignored, the window ACK tells the server
            payload = p[4:]
            self.got += payload
            self.in_window += 1
            last = len(payload) < self.blksize
            if last or self.in_window >= self.windowsize:
                replies.append(encode_ack(self.expected))
                self.in_window = 0
            self.expected += 1
            if last:
                self.done = True
        return replies


def drive(s: ReadSession, data: bytes, client: LockstepClient, chunk=None, clock=0.0, max_rounds=10_000_000,
          prepare=True):
    """Feed the file (in `chunk`-sized pieces when given) and play packets until the session ends."""
    fed = 0
    out = s.start(clock)

    def feed_more():
        nonlocal fed
        res = []
        while s.wanted() and fed <= len(data):
            n = chunk or len(data)
            piece = data[fed:fed + n]
            fed += n
            res += s.feed(piece, fed >= len(data), clock)
            if fed >= len(data):
                break
        return res

    out += feed_more()
    rounds = 0
    while not s.finished:
        rounds += 1
        assert rounds < max_rounds
        replies = client.on_packets(out)
        out = []
        for r in replies:
            out += s.receive(r, clock)
        out += feed_more()
        if prepare:
            s.prepare()   # what the adapter does after each send; without it every ACK takes the slow path
        if not out and not replies and not s.finished:
            raise AssertionError("transfer stalled")
    return client


# -- parsing ---------------------------------------------------------------------------------------

def test_parse_request_golden():
    pkt = b"\x00\x01pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00"
    r = parse_request(pkt)
    assert (r.opcode, r.filename, r.mode) == (OP_RRQ, "pxelinux.0", "octet")
    assert r.options == {"blksize": "1468", "tsize": "0"}
    assert r.option_order == ("blksize", "tsize")
    assert parse_request(b"\x00\x02x\x00NETASCII\x00").mode == "netascii"
    assert parse_request(b"\x00\x02x\x00octet\x00").is_write


@pytest.mark.parametrize("pkt", [
    b"", b"\x00", b"\x00\x01", b"\x00\x01abc", b"\x00\x03\x00\x01hello", b"\x00\x04\x00\x00",
    b"\x00\x01\x00octet\x00", b"\x00\x01file\x00\x00", b"\x00\x01file\x00octet\x00blksize\x00",
    b"\x00\x01file\x00oc\xfftet\x00", b"\x00\x09file\x00octet\x00",
])
def test_parse_request_rejects_malformed(pkt):
    with pytest.raises(MalformedPacket):
        parse_request(pkt)


def test_error_packet_golden():
    assert encode_error(ErrorCode.FILE_NOT_FOUND, "File not found") == b"\x00\x05\x00\x01File not found\x00"


# -- negotiation -----------------------------------------------------------------------------------

def test_no_options_means_no_oack_and_data_first():
    s = session_for(b"abc")
    out = s.start(0.0) + s.feed(b"abc", True, 0.0)
    assert out == [b"\x00\x03\x00\x01abc"]


def test_oack_carries_only_asked_options_in_client_spelling():
    s = session_for(b"x" * 1000, BlkSize=1024)
    out = s.start(0.0)
    assert out == [b"\x00\x06BlkSize\x001024\x00"]
    s2 = session_for(b"x" * 1000, tsize=0, foo=1)
    assert s2.start(0.0) == [b"\x00\x06tsize\x001000\x00"]


def test_unknown_options_only_means_plain_rfc1350():
    s = session_for(b"hello", multicast="", rollover=1)
    out = s.start(0.0) + s.feed(b"hello", True, 0.0)
    assert [op(p) for p in out] == [OP_DATA]


@pytest.mark.parametrize("asked, mtu, cap, granted", [
    (8, None, 65464, 8),
    (7, None, 65464, None),        # below the minimum: option ignored
    (65464, None, 65464, 65464),
    (70000, None, 65464, 65464),   # above: capped
    (8192, 1500, 65464, 1468),     # capped by the path MTU
    (1468, 1500, 65464, 1468),
    (8192, 9000, 65464, 8192),
    (8192, None, 4096, 4096),      # capped by the config
    (0, None, 65464, None),
])
def test_blksize_bounds(asked, mtu, cap, granted):
    req = parse_request(rrq(blksize=asked))
    neg = negotiate(req, 100, SessionLimits(max_blksize=cap), path_mtu=mtu)
    if granted is None:
        assert neg.oack is None and neg.blksize == 512
    else:
        assert neg.oack == [("blksize", str(granted))] and neg.blksize == granted


@pytest.mark.parametrize("asked, granted", [(1, 1), (16, 16), (64, 64), (65, 64), (65535, 64), (0, None)])
def test_windowsize_capped(asked, granted):
    neg = negotiate(parse_request(rrq(windowsize=asked)), 1, SessionLimits(max_windowsize=64))
    assert neg.oack == ([("windowsize", str(granted))] if granted else None)


@pytest.mark.parametrize("asked, ok", [(1, True), (255, True), (0, False), (256, False), ("abc", False)])
def test_timeout_option_range(asked, ok):
    neg = negotiate(parse_request(rrq(timeout=asked)), 1, SessionLimits())
    assert (neg.oack is not None) == ok
    if ok:
        assert neg.timeout == float(asked)


def test_tsize_not_answered_for_netascii():
    s = session_for(b"a\nb", mode="netascii", tsize=0)
    assert s.start(0.0) + s.feed(b"a\nb", True, 0.0) == [b"\x00\x03\x00\x01a\r\nb"]


# -- transfers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prepare", [True, False])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000])
@pytest.mark.parametrize("opts", [{}, {"blksize": 1468}, {"blksize": 8, "windowsize": 4}, {"windowsize": 16}])
def test_transfer_is_byte_identical(size, opts, prepare):
    data = os.urandom(size)
    s = session_for(data, tsize=0, **opts)
    c = drive(s, data, LockstepClient(), chunk=777, prepare=prepare)
    assert bytes(c.got) == data
    assert s.state == State.COMPLETE and s.outcome == "complete"
    assert s.bytes_acked == size


def test_netascii_transfer():
    raw = b"line1\nline2\r\nbare\rcr\n" * 100
    s = session_for(raw, mode="netascii")
    c = drive(s, raw, LockstepClient(), chunk=33)
    assert bytes(c.got) == netascii_encode(raw)
    assert bytes(c.got).replace(b"\r\n", b"\n").replace(b"\r\0", b"\r") == raw


@pytest.mark.parametrize("buffer", [bytearray, memoryview])
def test_netascii_takes_the_buffers_the_adapter_reads_into(buffer):
    """The adapter feeds what preadv filled: a bytearray, or a memoryview slice of one on a short read."""
    raw = b"line1\nline2\r\n" * 100
    s = session_for(raw, mode="netascii")
    c = drive(s, buffer(bytearray(raw)), LockstepClient(), chunk=33)
    assert bytes(c.got) == netascii_encode(raw)


def test_block_numbers_roll_over_to_zero():
    # 70 000 blocks of 8 bytes: numbers pass 65535 and continue at 0
    data = os.urandom(8 * 70_000 + 3)
    s = session_for(data, blksize=8, windowsize=16)
    seen = []

    class Recorder(LockstepClient):
        def on_packets(self, pkts):
            seen.extend(blk(p) for p in pkts if op(p) == OP_DATA)
            return super().on_packets(pkts)

    c = drive(s, data, Recorder(), chunk=65536)
    assert bytes(c.got) == data
    i = seen.index(65535)
    assert seen[i + 1] == 0 and seen[i + 2] == 1
    assert s.outcome == "complete"


def test_rollover_at_512_bytes_over_32_mib_lockstep():
    data = (b"0123456789abcdef" * 32) * (65536 + 300)  # 32 MiB + 300 blocks of 512
    s = session_for(data)
    c = drive(s, data, LockstepClient(), chunk=1 << 20)
    assert len(c.got) == len(data) and bytes(c.got) == data


def test_stalls_until_fed_and_wanted_is_bounded():
    data = os.urandom(10_000)
    s = session_for(data, blksize=1000, windowsize=4)
    assert s.start(0.0)[0][:2] == b"\x00\x06"
    assert 0 < s.wanted() <= 4000 + 65536
    assert s.receive(encode_ack(0), 0.1) == []        # no data yet: nothing to send
    assert s.deadline is None                          # nothing in flight: no retransmission timer
    out = s.feed(data[:2500], False, 0.2)
    assert [blk(p) for p in out] == [1, 2]             # only whole blocks go out
    out = s.feed(data[2500:], True, 0.3)
    assert [blk(p) for p in out] == [3, 4]
    assert s.deadline == pytest.approx(1.3)


# -- duplicate ACKs and windows --------------------------------------------------------------------

def test_duplicate_ack_is_not_answered_in_lockstep():
    data = os.urandom(3000)
    s = session_for(data)
    s.start(0.0)
    out = s.feed(data, True, 0.0)
    assert [blk(p) for p in out] == [1]
    assert [blk(p) for p in s.receive(encode_ack(1), 0.1)] == [2]
    # the ACK of 1 again (delayed duplicate): no second copy of block 2 (Sorcerer's Apprentice)
    assert s.receive(encode_ack(1), 0.2) == []
    assert s.duplicate_acks == 1
    assert [blk(p) for p in s.receive(encode_ack(2), 0.3)] == [3]


def test_acks_for_unsent_or_ancient_blocks_are_ignored():
    data = os.urandom(3000)
    s = session_for(data)
    s.start(0.0)
    s.feed(data, True, 0.0)
    for n in (2, 3, 100, 65535, 40000):
        assert s.receive(encode_ack(n), 0.1) == []
    assert s.state == State.TRANSFER
    assert [blk(p) for p in s.receive(encode_ack(1), 0.2)] == [2]


def test_window_ack_inside_window_resends_from_there():
    data = os.urandom(512 * 20)
    s = session_for(data, windowsize=4)
    s.start(0.0)
    s.feed(data, True, 0.0)
    assert [blk(p) for p in s.receive(encode_ack(0), 0.0)] == [1, 2, 3, 4]
    # client got 1 and 2, lost 3: it ACKs 2; the server continues at 3 with a full window
    assert [blk(p) for p in s.receive(encode_ack(2), 0.1)] == [3, 4, 5, 6]


def test_window_duplicate_ack_resends_once():
    data = os.urandom(512 * 20)
    s = session_for(data, windowsize=4)
    s.start(0.0)
    s.feed(data, True, 0.0)
    s.receive(encode_ack(0), 0.0)
    assert [blk(p) for p in s.receive(encode_ack(4), 0.1)] == [5, 6, 7, 8]
    assert [blk(p) for p in s.receive(encode_ack(4), 0.2)] == [5, 6, 7, 8]  # block 5 was lost
    assert s.receive(encode_ack(4), 0.3) == []                             # further repeats: timer's job


# -- timers ----------------------------------------------------------------------------------------

def test_retransmission_backoff_then_drop():
    limits = SessionLimits(timeout=1.0, max_timeout=4.0, retries=3, session_timeout=100)
    data = os.urandom(2000)
    s = session_for(data, limits=limits)
    s.start(0.0)
    assert [blk(p) for p in s.feed(data, True, 0.0)] == [1]
    assert s.deadline == 1.0
    assert s.on_timer(0.5) == []                       # early: nothing
    times = []
    t = s.deadline
    while not s.finished:
        out = s.on_timer(t)
        times.append((t, [op(p) for p in out]))
        t = s.deadline if s.deadline is not None else t
    assert times == [(1.0, [OP_DATA]), (3.0, [OP_DATA]), (7.0, [OP_DATA]), (11.0, [OP_ERROR])]
    assert s.outcome == "timeout" and s.retransmits == 3


def test_progress_resets_backoff():
    s = session_for(os.urandom(5000), limits=SessionLimits(timeout=1.0, retries=5))
    s.start(0.0)
    s.feed(os.urandom(5000), True, 0.0)
    s.on_timer(1.0)
    assert s.deadline == 3.0
    s.receive(encode_ack(1), 3.5)
    assert s.deadline == 4.5


def test_session_timeout_caps_total_silence():
    limits = SessionLimits(timeout=2.0, max_timeout=2.0, retries=50, session_timeout=5.0)
    s = session_for(os.urandom(100), limits=limits, windowsize=2)
    assert op(s.start(0.0)[0]) == OP_OACK
    s.feed(os.urandom(100), True, 0.0)
    assert op(s.on_timer(2.0)[0]) == OP_OACK          # OACK retransmitted while ACK 0 is missing
    assert op(s.on_timer(4.0)[0]) == OP_OACK
    assert op(s.on_timer(6.0)[0]) == OP_ERROR
    assert s.outcome == "timeout" and s.deadline is None


def _silence(s: ReadSession) -> list[tuple[float, list[int]]]:
    """Let the timer run with a client that never answers: (time, opcodes sent) per expiry."""
    fired = []
    while not s.finished:
        t = s.deadline
        fired.append((t, [op(p) for p in s.on_timer(t)]))
    return fired


def test_client_timeout_option_cannot_outlast_session_timeout_waiting_for_ack0():
    """timeout=255 negotiated, then silence after the OACK: dropped at session_timeout, not after minutes."""
    limits = SessionLimits(timeout=1.0, retries=6, session_timeout=5.0)
    data = os.urandom(3000)
    s = session_for(data, limits=limits, timeout=255, now=10.0)
    assert s.negotiated.oack == [("timeout", "255")] and s.rto == 255.0
    assert op(s.start(10.0)[0]) == OP_OACK
    s.feed(data, True, 10.0)
    assert s.deadline == 15.0
    assert _silence(s) == [(15.0, [OP_ERROR])]
    assert s.outcome == "timeout" and s.finished_at == 15.0


def test_client_timeout_option_cannot_outlast_session_timeout_mid_transfer():
    """Progress moves the limit; silence after it ends the session session_timeout later."""
    limits = SessionLimits(timeout=1.0, retries=6, session_timeout=5.0)
    data = os.urandom(3000)
    s = session_for(data, limits=limits, timeout=255, blksize=512)
    s.start(0.0)
    s.feed(data, True, 0.0)
    assert [blk(p) for p in s.receive(encode_ack(0), 1.0)] == [1]
    assert s.deadline == 6.0
    s.prepare()                                        # the fast path arms the timer too
    assert [blk(p) for p in s.receive(encode_ack(1), 2.0)] == [2]
    assert s.deadline == 7.0
    assert _silence(s) == [(7.0, [OP_ERROR])]
    assert s.outcome == "timeout" and s.bytes_acked == 512


def test_backoff_is_cut_short_by_session_timeout():
    """A retransmission whose doubled interval would end after session_timeout fires at it instead."""
    limits = SessionLimits(timeout=2.0, max_timeout=8.0, retries=50, session_timeout=5.0)
    data = os.urandom(100)
    s = session_for(data, limits=limits)
    s.start(0.0)
    s.feed(data, True, 0.0)
    assert _silence(s) == [(2.0, [OP_DATA]), (5.0, [OP_ERROR])]


def test_client_error_after_oack_ends_session():
    s = session_for(b"abc", blksize=1024)
    s.start(0.0)
    assert s.receive(encode_error(ErrorCode.OPTION_REFUSED, "no"), 0.1) == []
    assert s.outcome == "client-error" and s.error_message == "no"
    assert s.receive(encode_ack(0), 0.2) == [] and s.on_timer(99) == []


def test_final_ack_completes_and_late_packets_are_ignored():
    s = session_for(b"x" * 600)
    s.start(0.0)
    s.feed(b"x" * 600, True, 0.0)
    s.receive(encode_ack(1), 0.1)
    assert s.receive(encode_ack(2), 0.2) == [] and s.state == State.COMPLETE
    assert s.finished_at == 0.2
    assert s.receive(encode_ack(2), 0.3) == [] and s.on_timer(100.0) == []


def test_abort_sends_error_once():
    s = session_for(b"x" * 600)
    s.start(0.0)
    assert s.abort("read error", 0.1) == [encode_error(0, "read error")]
    assert s.abort("again", 0.2) == []


def test_write_request_is_not_a_read_session():
    with pytest.raises(ValueError):
        ReadSession(parse_request(rrq().replace(b"\x00\x01", b"\x00\x02", 1)), now=0, size=1)


# -- fuzz ------------------------------------------------------------------------------------------

def _mutations(rng: random.Random, valid: list[bytes]):
    """Random datagrams plus bit-flipped/truncated/extended copies of real TFTP packets, minus
    the two kinds a peer on the client's own TID may legitimately use to end or advance a transfer
    (ERROR, and an ACK of a block in flight)."""
    kinds = 0
    while True:
        kinds += 1
        r = rng.random()
        if r < 0.3:
            pkt = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        else:
            pkt = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                m = rng.random()
                if m < 0.5 and pkt:
                    i = rng.randrange(len(pkt))
                    pkt[i] ^= 1 << rng.randrange(8)
                elif m < 0.75:
                    pkt = pkt[:rng.randrange(len(pkt) + 1)]
                else:
                    pkt += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 16)))
            pkt = bytes(pkt)
        yield pkt


@pytest.mark.parametrize("windowsize", [1, 8])
def test_fuzzed_packets_do_not_break_a_transfer(windowsize):
    rng = random.Random(4242 + windowsize)
    data = os.urandom(512 * 300 + 17)
    s = session_for(data, windowsize=windowsize, tsize=0)
    client = LockstepClient()
    valid = [rrq("f", blksize=1468), rrq("x", "netascii"), encode_ack(5), encode_ack(0),
             b"\x00\x03\x00\x01" + b"d" * 512, b"\x00\x06blksize\x00512\x00", encode_error(1, "nope"),
             rrq().replace(b"\x00\x01", b"\x00\x02", 1)]
    fuzz = _mutations(rng, valid)
    sent = 0
    clock = 0.0
    out = s.start(clock) + s.feed(data, True, clock)
    while not s.finished:
        for _ in range(40 * windowsize):
            pkt = next(fuzz)
            if len(pkt) >= 4:
                opcode, number = struct.unpack("!HH", pkt[:4])
                if opcode == OP_ERROR:
                    continue
                if opcode == OP_ACK:
                    # only ACKs the client could not have sent: stale ones, repeats, or beyond the window
                    base = (client.expected - 1) & 0xFFFF
                    if 0 < ((number - base) & 0xFFFF) <= windowsize:
                        continue
            out += s.receive(pkt, clock)
            sent += 1
        replies = client.on_packets(out)
        out = []
        for r in replies:
            out += s.receive(r, clock)
        s.prepare()
        clock += 0.001
    assert sent >= 10_000
    assert s.outcome == "complete"
    assert bytes(client.got) == data
