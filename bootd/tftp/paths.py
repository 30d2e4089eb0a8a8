"""Confinement of requested names to the TFTP root.

A client names a file; it gets that file only if the name, taken relative to the root, stays inside
the root after every symlink is followed. `..` components, backslashes, NUL, empty names and
symlinks that lead out of the root are all answered "file not found" — never the file, and never
a different error that would tell an attacker what exists outside.

A leading '/' is read relative to the root (what tftpd-hpa --secure does; GRUB asks for
"/grub/grub.cfg-..."), so "/etc/passwd" means "<root>/etc/passwd", never the host's file. With
`leading_slash="refuse"` such names are refused instead.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union


class PathRefused(Exception):
    """The name is not served. `reason` is for logs and counters, never for the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def normalize(requested: str, leading_slash: str = "root") -> str:
    """Validate a requested name and return it root-relative ('a/b/c'). Raises PathRefused.

    Pure string work: no file system access, so providers can be matched on the result.
    """
    if not requested:
        raise PathRefused("empty name")
    if "\0" in requested:
        raise PathRefused("NUL in name")
    if "\\" in requested:
        raise PathRefused("backslash in name")
    if requested.startswith("/"):
        if leading_slash != "root":
            raise PathRefused("absolute name")
    parts = []
    for part in requested.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathRefused("'..' in name")
        parts.append(part)
    if not parts:
        raise PathRefused("names no file")
    return "/".join(parts)


FileVersion = tuple[int, int, int, int]  # (st_dev, st_ino, st_mtime_ns, st_size)


@dataclass
class OpenedFile:
    fd: int
    path: str      # real path inside the root
    size: int
    inode: FileVersion  # identifies this version of the file


def open_confined(root: str, relative: str) -> OpenedFile:
    """Open `relative` (already normalised) under `root` for reading. Raises PathRefused.

    Blocking (realpath, stat, open): the adapter runs it off the event loop.
    """
    root_real = os.path.realpath(root)
    candidate = os.path.join(root_real, relative)
    real = os.path.realpath(candidate)
    if real != root_real and not real.startswith(root_real + os.sep):
        raise PathRefused("symlink leaves the root")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PathRefused("no such file") from None
    except PermissionError:
        raise PathRefused("permission denied") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
            raise PathRefused(os.strerror(e.errno)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PathRefused("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, real, st.st_size, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))


# openat2(2) without blocking (RESOLVE_CACHED, Linux >= 5.12) for the event loop's fast path
_SYS_OPENAT2 = 437  # the same number on every architecture (allocated after the syscall table unification)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH, _RESOLVE_CACHED = 0x02, 0x08, 0x20
_AT_FDCWD = -100

Syscall = Callable[..., int]  # libc's syscall(2), restype c_long
_openat2: Union[Syscall, Literal[False], None] = None  # None: not looked up yet; False: found unusable


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2_call() -> Union[Syscall, Literal[False]]:
    """libc's syscall(2) to call openat2 through, or False when it is not usable here."""
    global _openat2
    if _openat2 is None:
        try:
            libc_syscall = ctypes.CDLL(None, use_errno=True).syscall
            libc_syscall.restype = ctypes.c_long
            _openat2 = libc_syscall
        except (OSError, AttributeError):
            _openat2 = False
    return _openat2


def _cached_open(syscall: Syscall, dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(dirfd, path, flags, resolve | RESOLVE_CACHED): an fd, or -errno."""
    global _openat2
    how = _OpenHow(flags, 0, resolve | _RESOLVE_CACHED)
    fd = syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path), ctypes.byref(how),
                 ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.E2BIG, errno.EPERM):  # no openat2 here (or a seccomp filter)
            _openat2 = False
        return -err
    return fd


def open_confined_cached(root: str, relative: str) -> Optional[OpenedFile]:
    """The common case of `open_confined` without blocking, for the event loop: a regular file that the
    kernel resolves beneath the root from cached metadata alone, without following any symlink out of
    it (RESOLVE_BENEATH: no absolute symlinks, no '..' above the root) and with no symlink as the last
    component. None whenever that does not settle it (not cached, a symlink, missing, an error, no
    openat2): the caller then runs `open_confined` off the loop, which has the last word. So this path
    only ever serves what `open_confined` would serve.

    A symlink on the way (the root itself may be one) is followed here only when the kernel need not
    update its atime: with relatime, a link not read since it was last changed, or not for a day, takes
    the slow path once (whose readlink updates the atime)."""
    syscall = _openat2_call()
    if syscall is False:
        return None
    rootfd = _cached_open(syscall, _AT_FDCWD, os.fsencode(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0)
    if rootfd < 0:
        return None
    try:
        fd = _cached_open(syscall, rootfd, os.fsencode(relative),
                          os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                          _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(rootfd)
    if fd < 0:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        real = os.path.join(root, relative)  # for logs only; the slow path's is the resolved one
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, real, st.st_size, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))


def resolve(root: str, requested: str, leading_slash: str = "root") -> Optional[str]:
    """The real path a request would be served from, or None if it is refused (for tools/tests)."""
    try:
        f = open_confined(root, normalize(requested, leading_slash))
    except PathRefused:
        return None
    os.close(f.fd)
    return f.path
