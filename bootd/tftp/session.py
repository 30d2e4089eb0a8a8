"""Sans-IO read-only TFTP: request parsing, option negotiation and the per-transfer state machine.

Nothing here touches a socket, a file or a clock. A `ReadSession` is handed datagrams, file bytes
and the current time, and answers with the datagrams to send and the time its timer should fire
(`deadline`). That keeps every protocol rule testable with an explicit clock, and lets the asyncio
adapter (bootd/tftp/server.py) stay a thin loop around it.

Protocol points covered: RFC 1350 (octet and netascii), RFC 2347 option negotiation (an OACK is
sent only when an option the client asked for was accepted, and then it carries only those),
RFC 2348 blksize (8..65464, capped by the path MTU and the config), RFC 2349 tsize and timeout,
RFC 7440 windowsize (capped, default cap 64), block numbers that roll over from 65535 to 0 for
files above 32 MiB at 512-byte blocks, retransmission with exponential backoff, a session timeout
when the client stops answering (the timer never fires later than `session_timeout` after the last
progress, whatever `timeout` the client negotiated), and no Sorcerer's Apprentice: a duplicate ACK never triggers a
retransmission by itself in lock-step mode (only the timer does).
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Mapping, Optional, Union

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512
IP_UDP_TFTP_OVERHEAD = 20 + 8 + 4  # IPv4 header + UDP header + TFTP DATA header

_HDR = struct.Struct("!HH")
_pack_hdr = _HDR.pack
_unpack_hdr = _HDR.unpack_from

Buffer = Union[bytes, bytearray, memoryview]  # file bytes as the adapter read them (no copy)


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class MalformedPacket(ValueError):
    """A datagram that is not a well-formed TFTP request; dropped and counted by the adapter."""


@dataclass(frozen=True)
class Request:
    """A parsed RRQ or WRQ. Option names are lower-cased; `option_order` keeps the client's spelling
    and order so an OACK can echo them the way the client wrote them."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)
    option_order: tuple[str, ...] = ()

    @property
    def is_write(self) -> bool:
        return self.opcode == OP_WRQ


def parse_request(datagram: bytes) -> Request:
    """Parse an RRQ/WRQ. Raises MalformedPacket for anything else or anything malformed.

    Filenames are decoded as UTF-8 with surrogateescape so any byte string maps to a str that maps
    back to the same bytes on the file system; a NUL cannot occur inside a name (it ends the field).
    """
    if len(datagram) < 4:
        raise MalformedPacket("too short")
    opcode = datagram[0] << 8 | datagram[1]
    if opcode not in (OP_RRQ, OP_WRQ):
        raise MalformedPacket(f"opcode {opcode} is not a request")
    if datagram[-1] != 0:
        raise MalformedPacket("request does not end with NUL")
    fields = datagram[2:-1].split(b"\0")
    if len(fields) < 2 or not fields[0] or not fields[1]:
        raise MalformedPacket("missing filename or mode")
    if len(fields) % 2:
        # a trailing option name without value: RFC 2347 says both are NUL-terminated
        raise MalformedPacket("option without a value")
    filename = fields[0].decode("utf-8", "surrogateescape")
    try:
        mode = fields[1].decode("ascii").lower()
    except UnicodeDecodeError:
        raise MalformedPacket("mode is not ASCII") from None
    options: dict[str, str] = {}
    order: list[str] = []
    for i in range(2, len(fields), 2):
        try:
            name = fields[i].decode("ascii")
            value = fields[i + 1].decode("ascii")
        except UnicodeDecodeError:
            continue  # an option we cannot read is an option we do not know: ignored
        key = name.lower()
        if not key or key in options:
            continue  # duplicates: the first one counts
        options[key] = value
        order.append(name)
    return Request(opcode, filename, mode, options, tuple(order))


def encode_request(filename: str, mode: str = "octet", options: Optional[Mapping[str, object]] = None,
                   opcode: int = OP_RRQ) -> bytes:
    parts = [filename.encode("utf-8", "surrogateescape"), mode.encode()]
    for k, v in (options or {}).items():
        parts += [str(k).encode(), str(v).encode()]
    return _pack_hdr(opcode, 0)[:2] + b"\0".join(parts) + b"\0"


def encode_error(code: int, message: str) -> bytes:
    return _pack_hdr(OP_ERROR, int(code)) + message.encode("ascii", "replace") + b"\0"


def encode_ack(block: int) -> bytes:
    return _pack_hdr(OP_ACK, block & 0xFFFF)


def encode_data(block: int, payload: bytes) -> bytes:
    return _pack_hdr(OP_DATA, block & 0xFFFF) + payload


def encode_oack(options: list[tuple[str, str]]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options)
    return _pack_hdr(OP_OACK, 0)[:2] + body


def parse_oack(datagram: bytes) -> dict[str, str]:
    fields = datagram[2:-1].split(b"\0")
    return {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}


def netascii_encode(data: bytes) -> bytes:
    """RFC 764 netascii: CR -> CR NUL, LF -> CR LF. Byte-local, so chunks can be encoded separately."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class SessionLimits:
    """Server-side caps and timers for a session (the config's `tftp` section maps onto this)."""

    max_blksize: int = MAX_BLKSIZE
    max_windowsize: int = 64
    timeout: float = 1.0          # first retransmission interval unless the client asks via `timeout`
    max_timeout: float = 8.0      # backoff stops doubling here
    retries: int = 6              # retransmissions of one window before the session is dropped
    session_timeout: float = 60.0  # no progress at all for this long: dropped whatever the retries
    readahead: int = 65536        # file bytes the session wants buffered beyond the current window


@dataclass(frozen=True)
class Negotiated:
    blksize: int
    windowsize: int
    timeout: float
    tsize: Optional[int]
    oack: Optional[list[tuple[str, str]]]  # [(name as the client spelled it, value)] or None when nothing was accepted


def _int_option(value: str) -> Optional[int]:
    value = value.strip()
    if not value.isdigit() or len(value) > 10:
        return None
    return int(value)


def negotiate(request: Request, size: Optional[int], limits: SessionLimits,
              path_mtu: Optional[int] = None) -> Negotiated:
    """Accept, cap or ignore each option the client sent; only accepted ones go in the OACK.

    `size` is the transfer size in octets when known (None: tsize is not answered, e.g. netascii).
    """
    cap = min(MAX_BLKSIZE, limits.max_blksize)
    if path_mtu:
        cap = min(cap, max(MIN_BLKSIZE, path_mtu - IP_UDP_TFTP_OVERHEAD))
    blksize, windowsize, timeout, tsize = DEFAULT_BLKSIZE, 1, limits.timeout, None
    accepted: list[tuple[str, str]] = []
    for name in request.option_order:
        key = name.lower()
        value = _int_option(request.options[key])
        if value is None:
            continue
        if key == "blksize":
            if value < MIN_BLKSIZE:
                continue
            blksize = min(value, cap)
            accepted.append((name, str(blksize)))
        elif key == "tsize":
            if size is None:
                continue
            tsize = size
            accepted.append((name, str(size)))
        elif key == "timeout":
            if not 1 <= value <= 255:
                continue
            timeout = float(value)
            accepted.append((name, str(value)))
        elif key == "windowsize":
            if not 1 <= value <= 65535:
                continue
            windowsize = min(value, limits.max_windowsize)
            accepted.append((name, str(windowsize)))
    return Negotiated(blksize, windowsize, timeout, tsize, accepted or None)


class State(IntEnum):
    WAIT_OACK_ACK = 1  # OACK sent, waiting for ACK 0
    TRANSFER = 2
    COMPLETE = 3
    FAILED = 4


class ReadSession:
    """One read transfer. The adapter feeds file bytes in order (`feed`), delivers datagrams from the
    client (`receive`) and calls `on_timer` at `deadline`; each returns the datagrams to send.

    The session keeps only the bytes from the oldest unacknowledged block on; `wanted()` tells the
    adapter how many more bytes it would like (0 when it has enough or the file is at its end).
    """

    def __init__(self, request: Request, *, now: float, size: Optional[int],
                 limits: SessionLimits = SessionLimits(), path_mtu: Optional[int] = None):
        if request.is_write:
            raise ValueError("ReadSession serves read requests only")
        self.request = request
        self.limits = limits
        self.netascii = request.mode == "netascii"
        neg = negotiate(request, None if self.netascii else size, limits, path_mtu)
        self.negotiated = neg
        self.blksize = neg.blksize
        self.windowsize = neg.windowsize
        self.rto_base = neg.timeout
        self.rto = neg.timeout
        # the wait after progress: a client's `timeout` (up to 255 s) never outlasts session_timeout
        self._progress_wait = min(neg.timeout, limits.session_timeout)
        self.raw_size = size
        self.started_at = now
        self.finished_at: Optional[float] = None
        self.finished = False  # COMPLETE or FAILED: a plain attribute, read on every packet
        self.state = State.WAIT_OACK_ACK if neg.oack else State.TRANSFER
        self.outcome: Optional[str] = None  # complete | timeout | client-error | aborted
        self.error_message: Optional[str] = None
        self._oack = encode_oack(neg.oack) if neg.oack else None
        # Stream buffer: chunks of (encoded) file bytes, the first starting at stream offset _buf_start.
        self._chunks: deque[memoryview] = deque()
        self._buf_start = 0
        self._fed_end = 0        # encoded stream bytes received so far
        self._raw_fed = 0        # raw file bytes received so far (differs from _fed_end for netascii)
        self._eof = False
        self._last_block: Optional[int] = None
        self._base = 1           # oldest unacknowledged block (absolute, never wraps)
        self._next = 1           # next block to send (absolute)
        self._dup_resent = False
        self._retries = 0
        self._last_send = now
        self._last_progress = now
        self.deadline: Optional[float] = None
        # counters the adapter reports
        self.blocks_sent = 0
        self.retransmits = 0
        self.duplicate_acks = 0
        self.ignored = 0
        self.bytes_acked = 0
        window = self.blksize * self.windowsize
        self._want_ahead = window + max(limits.readahead, window)
        # prepare(): the next window built ahead of its ACK, so answering that ACK is just a compare
        self._prepared: Optional[list[bytes]] = None
        self._prepared_from = 0
        self._fast_ack = b""

    # -- inputs ------------------------------------------------------------------------------------
    def start(self, now: float) -> list[bytes]:
        """The first datagrams: the OACK, or the first window of data when no option was accepted."""
        if self._oack is not None:
            self._last_send = now
            self._arm(now)
            return [self._oack]
        return self._send(now)

    def feed(self, data: Buffer, eof: bool, now: float) -> list[bytes]:
        """Append the next raw file bytes; `eof` marks the end of the file. Returns datagrams that
        became sendable."""
        if self._eof or self.state >= State.COMPLETE:
            return []
        self._raw_fed += len(data)
        if self.netascii:
            data = netascii_encode(bytes(data))
        if data:
            self._chunks.append(memoryview(data))
            self._fed_end += len(data)
        if eof:
            self._eof = True
            self._last_block = self._fed_end // self.blksize + 1
        if self.state == State.TRANSFER:
            return self._send(now)
        return []

    def wanted(self) -> int:
        """How many more raw bytes the session would like fed now (0: none)."""
        if self._eof or self.state >= State.COMPLETE:
            return 0
        short = (self._base - 1) * self.blksize + self._want_ahead - self._fed_end
        return short if short > 0 else 0

    @property
    def raw_offset(self) -> int:
        """File offset of the next raw byte to feed."""
        return self._raw_fed

    def receive(self, datagram: bytes, now: float) -> list[bytes]:
        """A datagram from the client's transfer ID."""
        if datagram == self._fast_ack and self._prepared_from == self._next and self._prepared:
            # the expected ACK of the whole window in flight, next window prepared: send it
            out = self._prepared
            self._prepared = None
            self._base = self._next
            self.bytes_acked = (self._next - 1) * self.blksize
            self._dup_resent = False
            self._retries = 0
            self.rto = self.rto_base
            self._last_progress = self._last_send = now
            self._next += len(out)
            self.blocks_sent += len(out)
            self.deadline = now + self._progress_wait  # _arm(now) with progress at `now`
            return out
        if self.state >= State.COMPLETE or len(datagram) < 4:
            self.ignored += 1
            return []
        opcode, number = _unpack_hdr(datagram)
        if opcode == OP_ACK:
            return self._on_ack(number, now)
        if opcode == OP_ERROR:
            self._finish(State.FAILED, "client-error", now)
            self.error_message = datagram[4:].split(b"\0", 1)[0].decode("ascii", "replace")
            return []
        self.ignored += 1
        return []

    def on_timer(self, now: float) -> list[bytes]:
        """Retransmit on expiry with backoff; give up after `retries` or `session_timeout`."""
        if self.deadline is None or now < self.deadline or self.state >= State.COMPLETE:
            return []
        if (self._retries >= self.limits.retries
                or now >= self._last_progress + self.limits.session_timeout):
            self._finish(State.FAILED, "timeout", now)
            return [encode_error(ErrorCode.NOT_DEFINED, "timeout: no acknowledgement from client")]
        self._retries += 1
        self.rto = min(self.rto * 2, max(self.limits.max_timeout, self.rto_base))
        oack = self._oack  # set exactly when the session starts in WAIT_OACK_ACK
        if oack is not None and self.state == State.WAIT_OACK_ACK:
            self.retransmits += 1
            self._last_send = now
            self._arm(now)
            return [oack]
        self._next = self._base
        return self._send(now, retransmit=True)

    def abort(self, message: str, now: float, code: int = ErrorCode.NOT_DEFINED) -> list[bytes]:
        """End the transfer from the server side (e.g. the file could not be read)."""
        if self.state >= State.COMPLETE:
            return []
        self._finish(State.FAILED, "aborted", now)
        self.error_message = message
        return [encode_error(code, message)]

    def finished_elsewhere(self, outcome: str, now: float, *, bytes_acked: int = 0, retransmits: int = 0,
                           duplicate_acks: int = 0, blocks_sent: int = 0, ignored: int = 0) -> None:
        """The data phase ran outside this object (the C pump, bootd/tftp/pump.c, which mirrors these
        rules): take over its outcome and counters so the adapter accounts for it like any session."""
        if self.state >= State.COMPLETE:
            return
        self._finish(State.COMPLETE if outcome == "complete" else State.FAILED, outcome, now)
        self.bytes_acked = bytes_acked
        self.retransmits = retransmits
        self.duplicate_acks = duplicate_acks
        self.blocks_sent = blocks_sent
        self.ignored = ignored

    @property
    def oack(self) -> Optional[bytes]:
        """The OACK datagram this session starts with (None: it starts with DATA 1)."""
        return self._oack

    def prepare(self) -> None:
        """Optional, for the adapter to call after sending: build the window that the ACK now awaited
        will release and drop acknowledged bytes, so the ACK itself is answered without this work."""
        if self.state != State.TRANSFER or self._next <= self._base:
            return
        if self._prepared is not None and self._prepared_from == self._next:
            return
        self._trim()
        first = self._next
        last = self._last_block
        end = first + self.windowsize
        if last is not None:
            end = min(end, last + 1)
        out: list[bytes] = []
        for block in range(first, end):
            payload = self._payload(block)
            if payload is None:
                self._prepared = None  # not fed yet: the slow path will handle this ACK
                return
            out.append(_pack_hdr(OP_DATA, block & 0xFFFF) + payload)
        self._prepared = out
        self._prepared_from = first
        self._fast_ack = _pack_hdr(OP_ACK, (first - 1) & 0xFFFF)

    # -- state -------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> Optional[int]:
        """Octets on the wire once the end is known (netascii: after encoding)."""
        return self._fed_end if self._eof else None

    def _finish(self, state: State, outcome: str, now: float) -> None:
        self._prepared = None
        self._fast_ack = b""
        self.finished = True
        self.state = state
        self.outcome = outcome
        self.finished_at = now
        self.deadline = None
        self._chunks.clear()

    def _on_ack(self, number: int, now: float) -> list[bytes]:
        if self.state == State.WAIT_OACK_ACK:
            if number != 0:
                self.ignored += 1
                return []
            self.state = State.TRANSFER
            self._progress(now)
            return self._send(now)
        acked_before = self._base - 1
        # the one absolute block in [base-1, next-1] with this 16-bit number
        block = acked_before + ((number - acked_before) & 0xFFFF)
        if block > self._next - 1:
            self.ignored += 1  # not sent yet (or a stale number from 64 Ki blocks ago)
            return []
        if block == acked_before:
            self.duplicate_acks += 1
            # Lock-step: never answer a duplicate ACK (Sorcerer's Apprentice). With a window, a
            # repeated ACK of the block before the window means its first packet was lost: resend
            # the window once, then leave further repeats to the timer.
            if self.windowsize > 1 and not self._dup_resent and self._next > self._base:
                self._dup_resent = True
                self._next = self._base
                return self._send(now, retransmit=True)
            return []
        self.bytes_acked = min(block * self.blksize, self._fed_end)
        self._base = block + 1
        self._dup_resent = False
        self._progress(now)
        if self._last_block is not None and block >= self._last_block:
            self._finish(State.COMPLETE, "complete", now)
            return []
        self._trim()
        # an ACK inside the window (RFC 7440): the client lost what followed, continue from there
        self._next = self._base
        return self._send(now)

    def _arm(self, now: float) -> None:
        """The timer for what was just sent: the retransmission interval, but never past the session
        timeout counted from the last progress (a silent client is dropped by then)."""
        retransmit_at = now + self.rto
        give_up_at = self._last_progress + self.limits.session_timeout
        self.deadline = retransmit_at if retransmit_at < give_up_at else give_up_at

    def _progress(self, now: float) -> None:
        self._retries = 0
        self.rto = self.rto_base
        self._last_progress = now

    def _trim(self) -> None:
        keep_from = (self._base - 1) * self.blksize
        chunks = self._chunks
        while chunks and self._buf_start + len(chunks[0]) <= keep_from:
            self._buf_start += len(chunks.popleft())

    def _payload(self, block: int) -> Union[bytes, memoryview, None]:
        """The bytes of `block` (a memoryview slice when it lies in one chunk), None if not fed yet."""
        start = (block - 1) * self.blksize
        end = start + self.blksize
        if end > self._fed_end:
            if not self._eof:
                return None
            end = self._fed_end
        if start >= end:
            return b""
        pos = self._buf_start
        parts: list[memoryview] = []
        for chunk in self._chunks:
            cend = pos + len(chunk)
            if cend > start:
                lo = start - pos if start > pos else 0
                if end <= cend:
                    if not parts:
                        return chunk[lo:end - pos]
                    parts.append(chunk[lo:end - pos])
                    return b"".join(parts)
                parts.append(chunk[lo:])
            pos = cend
        return None  # pragma: no cover - trimmed data is never asked for

    def _send(self, now: float, retransmit: bool = False) -> list[bytes]:
        out: list[bytes] = []
        limit = self._base + self.windowsize
        last = self._last_block
        while self._next < limit and (last is None or self._next <= last):
            payload = self._payload(self._next)
            if payload is None:
                break
            out.append(_pack_hdr(OP_DATA, self._next & 0xFFFF) + payload)
            self._next += 1
        if out:
            self.blocks_sent += len(out)
            if retransmit:
                self.retransmits += len(out)
            self._last_send = now
            self._arm(now)
        elif self._next == self._base:
            self.deadline = None  # nothing in flight: waiting for file data, not for the client
        return out
