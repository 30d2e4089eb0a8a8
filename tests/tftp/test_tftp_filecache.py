"""The shared open-file cache (bootd/tftp/filecache.py): one descriptor per file version, a cap on distinct
files, and reads that never block the event loop (page cache first, the executor for cold pages)."""
from __future__ import annotations

import asyncio
import os

import pytest

from bootd.tftp.filecache import CacheFull, FileCache
from bootd.tftp.server import TftpServer

KERNEL = os.urandom(300_000)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "kernel").write_bytes(KERNEL)
    (r / "initrd").write_bytes(b"I" * 1000)
    return r


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _drop_from_page_cache(path) -> None:
    """Write the file back and evict its pages, as if nobody had read it since boot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_transfers_of_one_file_share_one_descriptor_until_the_last_lets_go(root):
    async def main():
        cache = FileCache()
        a = await cache.open(str(root), "kernel", max_open=4)
        b = await cache.open(str(root), "kernel", max_open=4)
        assert a is b and a.refs == 2 and len(cache) == 1 and a.size == len(KERNEL)
        fd = a.opened.fd
        cache.release(a)
        assert os.pread(fd, 8, 0) == KERNEL[:8] and len(cache) == 1   # still open for the other transfer
        cache.release(b)
        assert len(cache) == 0
        with pytest.raises(OSError):
            os.fstat(fd)                                                # the last one closed it
    run(main())


def test_a_replaced_file_is_a_new_version_while_the_old_one_finishes(root):
    async def main():
        cache = FileCache()
        old = await cache.open(str(root), "kernel", max_open=4)
        (root / "kernel.new").write_bytes(b"new kernel")
        os.replace(root / "kernel.new", root / "kernel")
        new = await cache.open(str(root), "kernel", max_open=4)
        assert new is not old and len(cache) == 2 and new.size == 10
        assert os.pread(old.opened.fd, 16, 0) == KERNEL[:16]          # the old transfer reads the old bytes
        cache.release(old)
        cache.release(new)
        assert len(cache) == 0
    run(main())


def test_max_open_caps_distinct_files_not_transfers(root):
    async def main():
        cache = FileCache()
        kernel = await cache.open(str(root), "kernel", max_open=1)
        before = _open_fds()
        with pytest.raises(CacheFull):
            await cache.open(str(root), "initrd", max_open=1)
        assert _open_fds() == before                                    # the refused file's fd is closed
        assert await cache.open(str(root), "kernel", max_open=1) is kernel  # an open file is still shared
        assert kernel.refs == 2
    run(main())


def test_cold_pages_are_not_read_on_the_loop(root):
    async def main():
        cache = FileCache()
        f = await cache.open(str(root), "kernel", max_open=4)
        _drop_from_page_cache(root / "kernel")
        assert f.read_cached(0, 4096) is None                           # would wait for the disk
        assert await f.read(0, 65536) == KERNEL[:65536]                 # so it is read in the executor
        cached = f.read_cached(0, 4096)
        assert cached is not None and bytes(cached) == KERNEL[:4096]    # and is in the page cache now
        assert f.read_cached(len(KERNEL), 4096) == b""                  # at the end: nothing
        cache.release(f)
    run(main())


@pytest.mark.parametrize("blksize", [None, "1468"])
def test_a_cold_file_is_served_whole_by_the_python_data_path(root, blksize):
    async def main():
        server = TftpServer(str(root), data_pump="python")
        await server.start([("127.0.0.1", 0)])
        try:
            _drop_from_page_cache(root / "kernel")
            opts = ["--tftp-blksize", blksize] if blksize else []
            p = await asyncio.create_subprocess_exec(
                "curl", "-s", "--max-time", "20", *opts, f"tftp://127.0.0.1:{server.addresses[0][1]}/kernel",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out, _ = await p.communicate()
            assert p.returncode == 0 and out == KERNEL
            for _ in range(500):  # curl may exit before the server has read its last ACK
                if server.status()["active_sessions"] == 0:
                    break
                await asyncio.sleep(0.01)
            st = server.status()
            assert st["completed"] == 1 and st["open_files"] == 0, st
        finally:
            await server.stop()
    run(main())
