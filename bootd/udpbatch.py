"""Send many UDP datagrams in one system call: sendmmsg(2), through ctypes (Linux, glibc >= 2.14).

Why (issue 22): on a loaded server every return from a system call is a point where the scheduler may
give the CPU to another task, and a reply that wakes a waiting process makes that likely. A batch of
500 DHCP replies sent with 500 sendto() calls lost the CPU after nearly every one (measured in the
boot storm benchmark: 7 ms of waiting per reply, 14 s of the server's 15 s of DHCP time); one
sendmmsg() call sends them all before the process can be preempted. The payloads are copied into
ctypes buffers; nothing else is shared with C.
"""
from __future__ import annotations

import ctypes
import errno
import socket
from typing import Callable, Optional, Sequence


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


class _SockAddrIn(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_ushort), ("sin_port", ctypes.c_uint16),
                ("sin_addr", ctypes.c_uint8 * 4), ("sin_zero", ctypes.c_uint8 * 8)]


def _load() -> Optional[Callable[..., int]]:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sendmmsg
    except (OSError, AttributeError):  # not glibc/Linux: send_many falls back to one sendto each
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_sendmmsg = _load()


Datagrams = Sequence[tuple[bytes, tuple[str, int]]]
"""(payload, (IPv4 address, port)) to send, in order."""


def send_each(sock: socket.socket, datagrams: Datagrams) -> list[Optional[int]]:
    """One sendto() per datagram; the same results as send_many."""
    results: list[Optional[int]] = [None] * len(datagrams)
    for i, (payload, dest) in enumerate(datagrams):
        try:
            sock.sendto(payload, dest)
        except OSError as e:
            results[i] = e.errno or errno.EIO
    return results


def send_many(sock: socket.socket, datagrams: Datagrams) -> list[Optional[int]]:
    """Send each datagram on `sock`, in order, in one sendmmsg() call (more only if the kernel stops
    part way). Returns, per datagram, None if the kernel took it or the errno it was refused with
    (EAGAIN when the send buffer is full, ...)."""
    n = len(datagrams)
    if _sendmmsg is None or n <= 1:
        return send_each(sock, datagrams)
    results: list[Optional[int]] = [None] * n
    msgs = (_MMsgHdr * n)()
    iovs = (_IoVec * n)()
    addrs = (_SockAddrIn * n)()
    bufs = []
    for i, (payload, (ip, port)) in enumerate(datagrams):
        buf = ctypes.create_string_buffer(payload, len(payload))
        bufs.append(buf)  # alive until the call returns
        a = addrs[i]
        a.sin_family = socket.AF_INET
        a.sin_port = socket.htons(port)
        a.sin_addr[:] = socket.inet_aton(ip)
        iovs[i].iov_base = ctypes.addressof(buf)
        iovs[i].iov_len = len(payload)
        h = msgs[i].msg_hdr
        h.msg_name = ctypes.addressof(a)
        h.msg_namelen = ctypes.sizeof(_SockAddrIn)
        h.msg_iov = ctypes.pointer(iovs[i])
        h.msg_iovlen = 1
    fd = sock.fileno()
    size = ctypes.sizeof(_MMsgHdr)
    i = 0
    while i < n:
        sent = _sendmmsg(fd, ctypes.cast(ctypes.addressof(msgs) + i * size, ctypes.POINTER(_MMsgHdr)), n - i, 0)
        if sent < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            results[i] = err  # the kernel refused datagram i: count it, go on with the next
            i += 1
        else:
            i += sent
    return results
