"""Sans-IO DHCPv4/BOOTP codec: bytes in, a `DhcpMessage` out, and back.

Every option is kept as raw bytes in wire order (repeated options concatenated as RFC 3396 says,
option-overload areas folded in), so a message re-encodes to the same bytes and unknown options pass
through untouched. Typed accessors cover the options a boot server decides on. Anything malformed
(short, truncated, overlong, bad lengths) raises the single `DhcpDecodeError`; decoding never
allocates more than the input's size, and nothing recurses, so a crafted packet cannot loop.
"""
from __future__ import annotations

import socket
import struct
from typing import Optional

__all__ = [
    "DhcpDecodeError", "DhcpMessage", "decode", "encode", "MAGIC", "MAX_PACKET",
    "BOOTREQUEST", "BOOTREPLY", "DISCOVER", "OFFER", "REQUEST", "DECLINE", "ACK", "NAK", "RELEASE",
    "INFORM", "MESSAGE_TYPE_NAMES", "parse_tlv", "build_tlv", "ip_bytes",
]

BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
MESSAGE_TYPE_NAMES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
                      7: "RELEASE", 8: "INFORM"}

MAGIC = b"\x63\x82\x53\x63"
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes
MIN_PACKET = HEADER.size + len(MAGIC)  # 240
MAX_PACKET = 65507  # largest UDP payload over IPv4: the most any decode will look at
BOOTP_MIN = 300  # BOOTP's minimum message size; replies are padded up to it (old PXE ROMs need it)

PAD, END, OVERLOAD = 0, 255, 52
ZERO_IP = b"\x00\x00\x00\x00"

# Options whose length is fixed or constrained: checked during decode so accessors cannot fail.
_FIXED_LEN = {1: 4, 50: 4, 51: 4, 53: 1, 54: 4, 57: 2, 58: 4, 59: 4, 94: 3}


class DhcpDecodeError(ValueError):
    """The bytes are not a well-formed DHCP/BOOTP message (short, truncated, malformed options)."""


def ip_bytes(addr: str) -> bytes:
    try:
        return socket.inet_aton(addr)
    except OSError:
        raise ValueError(f"not an IPv4 address: {addr!r}") from None


def parse_tlv(data: bytes, what: str = "encapsulated options") -> dict[int, bytes]:
    """Decode code/length/value sub-options (option 43, 82, 175); pad 0 and end 255 honoured.

    Repeated codes are concatenated, like top-level options."""
    out: dict[int, bytes] = {}
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == PAD:
            i += 1
            continue
        if code == END:
            break
        if i + 1 >= n:
            raise DhcpDecodeError(f"{what}: sub-option {code} has no length byte")
        ln = data[i + 1]
        j = i + 2 + ln
        if j > n:
            raise DhcpDecodeError(f"{what}: sub-option {code} runs past the end ({ln} bytes)")
        val = data[i + 2:j]
        out[code] = out[code] + val if code in out else val
        i = j
    return out


def build_tlv(options: dict[int, bytes], end: bool = False) -> bytes:
    parts = []
    for code, val in options.items():
        for k in range(0, max(len(val), 1), 255):
            chunk = val[k:k + 255]
            parts.append(bytes((code, len(chunk))) + chunk)
    if end:
        parts.append(b"\xff")
    return b"".join(parts)


def _parse_options(buf: bytes, start: int, stop: int, out: dict[int, bytes], where: str) -> int:
    """Parse options from buf[start:stop] into `out` (concatenating repeats); returns the offset just
    past END, or -1 when the area ends without END."""
    i = start
    while i < stop:
        code = buf[i]
        if code == PAD:
            i += 1
            continue
        if code == END:
            return i + 1
        if i + 1 >= stop:
            raise DhcpDecodeError(f"option {code} in the {where} has no length byte")
        ln = buf[i + 1]
        j = i + 2 + ln
        if j > stop:
            raise DhcpDecodeError(f"option {code} in the {where} is truncated ({ln} bytes declared, "
                                  f"{stop - i - 2} left)")
        val = buf[i + 2:j]
        prev = out.get(code)
        out[code] = val if prev is None else prev + val
        i = j
    return -1


class DhcpMessage:
    """One BOOTP/DHCP message. Addresses are dotted strings, `options` maps code -> raw bytes."""

    __slots__ = ("op", "htype", "hlen", "hops", "xid", "secs", "flags", "ciaddr", "yiaddr", "siaddr",
                 "giaddr", "chaddr", "sname", "file", "options", "padding", "has_end")

    def __init__(self, op: int = BOOTREQUEST, htype: int = 1, hlen: int = 6, hops: int = 0, xid: int = 0,
                 secs: int = 0, flags: int = 0, ciaddr: str = "0.0.0.0", yiaddr: str = "0.0.0.0",
                 siaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0", chaddr: bytes = b"",
                 sname: bytes = b"", file: bytes = b"", options: Optional[dict[int, bytes]] = None,
                 padding: int = 0, has_end: bool = True):
        self.op, self.htype, self.hlen, self.hops = op, htype, hlen, hops
        self.xid, self.secs, self.flags = xid, secs, flags
        self.ciaddr, self.yiaddr, self.siaddr, self.giaddr = ciaddr, yiaddr, siaddr, giaddr
        self.chaddr = chaddr
        self.sname = sname
        self.file = file
        self.options = {} if options is None else options
        self.padding = padding  # zero bytes after END in the original (re-emitted by encode)
        self.has_end = has_end

    def __repr__(self) -> str:
        t = MESSAGE_TYPE_NAMES.get(self.message_type or 0, "BOOTP")
        return f"<DhcpMessage {t} xid={self.xid:#010x} mac={self.mac} opts={sorted(self.options)}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DhcpMessage):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__ if s not in ("padding", "has_end"))

    # -- header helpers ---------------------------------------------------------------------------
    @property
    def mac(self) -> str:
        """The client hardware address as aa:bb:cc:dd:ee:ff (lower case)."""
        return self.chaddr[:min(self.hlen, 16)].hex(":")

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def boot_file(self) -> str:
        """Boot file name: option 67 if present, else the `file` header field."""
        v = self.options.get(67)
        if v is None:
            v = self.file
        return v.split(b"\0", 1)[0].decode("latin-1")

    # -- typed option access ----------------------------------------------------------------------
    def _ip_opt(self, code: int) -> Optional[str]:
        v = self.options.get(code)
        return socket.inet_ntoa(v) if v is not None else None

    def _u32(self, code: int) -> Optional[int]:
        v = self.options.get(code)
        return int.from_bytes(v, "big") if v is not None else None

    @property
    def message_type(self) -> Optional[int]:
        v = self.options.get(53)
        return v[0] if v is not None else None

    @property
    def requested_ip(self) -> Optional[str]:
        return self._ip_opt(50)

    @property
    def lease_time(self) -> Optional[int]:
        return self._u32(51)

    @property
    def server_id(self) -> Optional[str]:
        return self._ip_opt(54)

    @property
    def parameter_request_list(self) -> bytes:
        return self.options.get(55, b"")

    @property
    def max_message_size(self) -> Optional[int]:
        v = self.options.get(57)
        return int.from_bytes(v, "big") if v is not None else None

    @property
    def vendor_class(self) -> Optional[str]:
        v = self.options.get(60)
        return v.decode("latin-1") if v is not None else None

    @property
    def client_id(self) -> Optional[bytes]:
        return self.options.get(61)

    @property
    def hostname(self) -> Optional[str]:
        v = self.options.get(12)
        return v.decode("utf-8", "replace") if v is not None else None

    @property
    def tftp_server(self) -> Optional[str]:
        v = self.options.get(66)
        return v.split(b"\0", 1)[0].decode("latin-1") if v is not None else None

    @property
    def bootfile_option(self) -> Optional[str]:
        v = self.options.get(67)
        return v.split(b"\0", 1)[0].decode("latin-1") if v is not None else None

    @property
    def user_classes(self) -> list[bytes]:
        """Option 77 as a list: RFC 3004 length-prefixed entries, or the whole value when it is a
        plain string (iPXE sends b"iPXE" without a length prefix)."""
        v = self.options.get(77)
        if not v:
            return []
        out, i, n = [], 0, len(v)
        while i < n:
            ln = v[i]
            if ln == 0 or i + 1 + ln > n:
                return [v]
            out.append(v[i + 1:i + 1 + ln])
            i += 1 + ln
        return out

    @property
    def relay_agent(self) -> Optional[dict[int, bytes]]:
        """Option 82 sub-options (1 circuit id, 2 remote id, ...), or None."""
        v = self.options.get(82)
        return parse_tlv(v, "option 82") if v is not None else None

    @property
    def client_arch(self) -> list[int]:
        """Option 93: the architectures the client can boot (RFC 4578), first is preferred."""
        v = self.options.get(93)
        if not v:
            return []
        return [int.from_bytes(v[i:i + 2], "big") for i in range(0, len(v) - 1, 2)]

    @property
    def client_ndi(self) -> Optional[tuple[int, int, int]]:
        v = self.options.get(94)
        return (v[0], v[1], v[2]) if v is not None else None

    @property
    def client_uuid(self) -> Optional[str]:
        """Option 97 (type 0 + 16-byte GUID) as a UUID string; None when missing or not that shape."""
        v = self.options.get(97)
        if v is None or len(v) != 17 or v[0] != 0:
            return None
        h = v[1:].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    @property
    def pxe_options(self) -> Optional[dict[int, bytes]]:
        """Option 43 sub-options as PXE encapsulates them, or None."""
        v = self.options.get(43)
        return parse_tlv(v, "option 43") if v is not None else None

    @property
    def ipxe_options(self) -> Optional[dict[int, bytes]]:
        """Option 175 (iPXE's encapsulated settings and feature flags), or None."""
        v = self.options.get(175)
        return parse_tlv(v, "option 175") if v is not None else None

    @property
    def is_pxe(self) -> bool:
        v = self.options.get(60)
        return v is not None and v.startswith(b"PXEClient")

    @property
    def is_http_client(self) -> bool:
        v = self.options.get(60)
        return v is not None and v.startswith(b"HTTPClient")

    @property
    def is_ipxe(self) -> bool:
        """iPXE announces itself with option 175 and user class "iPXE"."""
        if 175 in self.options:
            return True
        return b"iPXE" in self.user_classes


def decode(data: bytes) -> DhcpMessage:
    """Parse one UDP payload. Raises DhcpDecodeError for anything that is not a sane DHCP message."""
    n = len(data)
    if n < MIN_PACKET:
        raise DhcpDecodeError(f"too short for DHCP: {n} bytes (need {MIN_PACKET})")
    if n > MAX_PACKET:
        raise DhcpDecodeError(f"too long: {n} bytes")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file) = HEADER.unpack_from(data)
    if op != BOOTREQUEST and op != BOOTREPLY:
        raise DhcpDecodeError(f"bad op {op}")
    if hlen > 16:
        raise DhcpDecodeError(f"hardware address length {hlen} > 16")
    if data[236:240] != MAGIC:
        raise DhcpDecodeError("no DHCP magic cookie (plain BOOTP is not served)")
    options: dict[int, bytes] = {}
    end = _parse_options(data, MIN_PACKET, n, options, "options field")
    has_end = end >= 0
    padding = n - end if has_end else 0
    ov = options.get(OVERLOAD)
    if ov is not None:
        # RFC 2131: 1 = `file` holds options, 2 = `sname`, 3 = both; file first, then sname.
        if len(ov) != 1 or ov[0] not in (1, 2, 3):
            raise DhcpDecodeError(f"bad option-overload value {ov.hex()}")
        del options[OVERLOAD]
        if ov[0] & 1:
            _parse_options(file, 0, len(file), options, "file field")
            file = b""
        if ov[0] & 2:
            _parse_options(sname, 0, len(sname), options, "sname field")
            sname = b""
    fixed = _FIXED_LEN
    for code, v in options.items():
        ln = fixed.get(code)
        if ln is not None and len(v) != ln:
            raise DhcpDecodeError(f"option {code} must be {ln} bytes, got {len(v)}")
        if code == 93 and (not v or len(v) % 2):
            raise DhcpDecodeError(f"option 93 (client architecture) has odd length {len(v)}")
    inet_ntoa = socket.inet_ntoa
    return DhcpMessage(op, htype, hlen, hops, xid, secs, flags, inet_ntoa(ci), inet_ntoa(yi), inet_ntoa(si),
                       inet_ntoa(gi), chaddr, sname.rstrip(b"\0"), file.rstrip(b"\0"), options, padding, has_end)


def encode(msg: DhcpMessage, min_size: int = 0) -> bytes:
    """Serialize `msg`. Options longer than 255 bytes are split into consecutive instances (RFC 3396).

    The result is padded with zeros to `min_size` and to the message's own `padding` after END."""
    inet_aton = socket.inet_aton
    out = bytearray(HEADER.pack(msg.op, msg.htype, msg.hlen, msg.hops, msg.xid & 0xFFFFFFFF, msg.secs & 0xFFFF,
                                msg.flags & 0xFFFF, inet_aton(msg.ciaddr), inet_aton(msg.yiaddr),
                                inet_aton(msg.siaddr), inet_aton(msg.giaddr), msg.chaddr, msg.sname, msg.file))
    out += MAGIC
    append = out.append
    for code, val in msg.options.items():
        ln = len(val)
        if ln <= 255:
            append(code)
            append(ln)
            out += val
        else:
            for k in range(0, ln, 255):
                chunk = val[k:k + 255]
                append(code)
                append(len(chunk))
                out += chunk
    if msg.has_end:
        append(END)
    pad = max(msg.padding, min_size - len(out))
    if pad > 0:
        out += bytes(pad)
    return bytes(out)
