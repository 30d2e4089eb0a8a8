"""Path confinement: names that leave the TFTP root are refused, names inside are served."""
from __future__ import annotations

import os
import time

import pytest

from bootd.tftp.paths import PathRefused, normalize, open_confined, open_confined_cached, resolve


@pytest.mark.parametrize("name, expected", [
    ("pxelinux.0", "pxelinux.0"),
    ("pxelinux.cfg/01-52-54-00-12-34-56", "pxelinux.cfg/01-52-54-00-12-34-56"),
    ("/grub/grub.cfg", "grub/grub.cfg"),
    ("./a//b/./c", "a/b/c"),
    ("a/b/", "a/b"),
])
def test_normalize_accepts(name, expected):
    assert normalize(name) == expected


@pytest.mark.parametrize("name", [
    "", "/", ".", "..", "../etc/passwd", "a/../../etc/passwd", "a/..", "/../x",
    "boot\\x64\\wdsnbp.com", "..\\..\\etc\\passwd", "a\0b", "kernel\x00../../etc/passwd",
])
def test_normalize_refuses(name):
    with pytest.raises(PathRefused):
        normalize(name)


def test_leading_slash_refused_when_configured():
    with pytest.raises(PathRefused):
        normalize("/etc/passwd", leading_slash="refuse")
    assert normalize("etc/passwd", leading_slash="refuse") == "etc/passwd"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "kernel").write_bytes(b"K" * 100)
    (root / "sub" / "inner").write_bytes(b"inner")
    (outside / "secret").write_bytes(b"secret")
    os.symlink(outside / "secret", root / "escape")            # absolute link out
    os.symlink("../outside/secret", root / "escape-rel")        # relative link out
    os.symlink(str(outside), root / "dirlink")                  # directory link out
    os.symlink("kernel", root / "alias")                        # link inside: fine
    os.symlink("../kernel", root / "sub" / "up")                # link inside via '..' in its target: fine
    os.symlink("/etc/passwd", root / "passwd")
    os.mkfifo(root / "fifo")
    return root


@pytest.mark.parametrize("name", ["kernel", "/kernel", "sub/inner", "alias", "sub/up"])
def test_served_inside_root(tree, name):
    real = resolve(str(tree), name)
    assert real is not None and real.startswith(os.path.realpath(tree))


@pytest.mark.parametrize("name", ["escape", "escape-rel", "dirlink/secret", "passwd", "/etc/passwd",
                                  "../outside/secret", "sub", "fifo", "missing", "kernel/x",
                                  "sub/../../outside/secret"])
def test_refused(tree, name):
    assert resolve(str(tree), name) is None


def test_open_confined_reports_size_and_identity(tree):
    f = open_confined(str(tree), "alias")
    try:
        assert f.size == 100 and os.pread(f.fd, 4, 0) == b"KKKK"
        assert f.inode[1] == os.stat(tree / "kernel").st_ino
    finally:
        os.close(f.fd)
    with pytest.raises(PathRefused):
        open_confined(str(tree), "escape")


ALL_NAMES = ["kernel", "sub/inner", "alias", "sub/up", "escape", "escape-rel", "dirlink/secret", "passwd",
             "../outside/secret", "sub", "fifo", "missing", "kernel/x", "sub/../../outside/secret", "/etc/passwd",
             "dirlink/../root/kernel"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_cached_open_serves_only_what_open_confined_serves(tree, name):
    """The event loop's non-blocking open: None (ask open_confined) or the very file open_confined opens."""
    fast = open_confined_cached(str(tree), name)
    try:
        slow = open_confined(str(tree), name)
    except PathRefused:
        assert fast is None
        return
    try:
        if fast is not None:
            assert fast.inode == slow.inode and fast.size == slow.size
    finally:
        os.close(slow.fd)
        if fast is not None:
            os.close(fast.fd)


def test_cached_open_takes_plain_names_and_leaves_symlinks_to_the_slow_path(tree):
    f = open_confined_cached(str(tree), "sub/inner")
    assert f is not None and os.pread(f.fd, 5, 0) == b"inner" and f.size == 5
    os.close(f.fd)
    assert open_confined_cached(str(tree), "alias") is None      # a symlink: open_confined decides


def test_cached_open_follows_a_root_symlink_once_the_slow_path_has_read_it(tree):
    """The root itself may be a symlink. A link whose atime is due an update (relatime: not read since
    it was made) cannot be followed without blocking, so the first open takes the slow path, whose
    readlink updates the atime; from then on the fast path follows it."""
    link = tree.parent / "rootlink"
    os.symlink(tree, link)
    time.sleep(0.05)  # past the clock tick the link was made in, like any link made before the server ran
    os.close(open_confined(str(link), "kernel").fd)
    f = open_confined_cached(str(link), "kernel")
    assert f is not None and f.size == 100 and os.pread(f.fd, 4, 0) == b"KKKK"
    os.close(f.fd)
