"""Open files shared between TFTP transfers, and reading them without stalling the event loop.

Transfers of the same file version share one descriptor (200 PCs fetching one kernel hold one fd); a
version is (device, inode, mtime, size), so a file replaced under the root is a new entry while the
transfers of the old one finish on theirs. Opening takes the kernel's non-blocking openat2 path on the
loop when the name resolves from cached metadata (bootd/tftp/paths.py `open_confined_cached`), and runs
`open_confined` in the default executor otherwise. Bytes are read with preadv2(RWF_NOWAIT) straight
from the page cache when they are there, and in the executor when they are not, so a cold disk never
stalls the loop.
"""
from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass
from typing import Optional, Union

from bootd.tftp.paths import FileVersion, OpenedFile, open_confined, open_confined_cached


class CacheFull(Exception):
    """`max_open` distinct files are open already: the request is refused as busy."""


@dataclass(eq=False)
class SharedFile:
    """One open file version and the transfers reading it."""

    opened: OpenedFile
    refs: int = 0
    nowait: bool = True  # preadv2(RWF_NOWAIT) works on this file system

    @property
    def size(self) -> int:
        return self.opened.size

    def read_cached(self, offset: int, n: int) -> Union[bytearray, memoryview, None]:
        """Up to `n` bytes at `offset` if the page cache holds them; None when reading would block (read
        them with `read`). Empty at or past the end of the file. Raises OSError on a read error."""
        if not self.nowait:
            return None
        buf = bytearray(n)
        try:
            got = os.preadv(self.opened.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait = False
                return None
            raise
        return memoryview(buf)[:got] if got < n else buf

    async def read(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset`, read in the default executor (may wait for the disk)."""
        return await asyncio.get_running_loop().run_in_executor(None, os.pread, self.opened.fd, n, offset)


class FileCache:
    """The open file versions, each with the count of transfers holding it."""

    def __init__(self) -> None:
        self._files: dict[FileVersion, SharedFile] = {}

    def __len__(self) -> int:
        return len(self._files)

    async def open(self, root: str, path: str, max_open: int) -> SharedFile:
        """`path` (normalised) under `root`, shared with other transfers of the same version; the caller
        `release`s it. Raises PathRefused (not served) or CacheFull."""
        # the common case (cached metadata, no symlink) without a thread hop; the rest off the loop
        opened: Optional[OpenedFile] = open_confined_cached(root, path)
        if opened is None:
            opened = await asyncio.get_running_loop().run_in_executor(None, open_confined, root, path)
        shared = self._files.get(opened.inode)
        if shared is not None:
            os.close(opened.fd)
        else:
            if len(self._files) >= max_open:
                os.close(opened.fd)
                raise CacheFull("too many open files")
            shared = self._files[opened.inode] = SharedFile(opened)
        shared.refs += 1
        return shared

    def release(self, shared: SharedFile) -> None:
        """One transfer is done with `shared`: the last one closes the file."""
        shared.refs -= 1
        if shared.refs <= 0:
            self._files.pop(shared.opened.inode, None)
            os.close(shared.opened.fd)
