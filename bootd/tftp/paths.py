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

import errno
import os
import stat
from dataclasses import dataclass
from typing import Optional


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


@dataclass
class OpenedFile:
    fd: int
    path: str      # real path inside the root
    size: int
    inode: tuple   # (st_dev, st_ino, st_mtime_ns, st_size): identifies this version of the file


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


def resolve(root: str, requested: str, leading_slash: str = "root") -> Optional[str]:
    """The real path a request would be served from, or None if it is refused (for tools/tests)."""
    try:
        f = open_confined(root, normalize(requested, leading_slash))
    except PathRefused:
        return None
    os.close(f.fd)
    return f.path
