"""Stock boot programs land in the boot root at start-up; an admin's own file is left alone."""
from __future__ import annotations

import filecmp

from bootd.config import LoaderConfig
from pxe.loaders import install_loaders


def test_missing_loaders_are_copied_from_debian_packages(tmp_path):
    root = tmp_path / "boot"
    root.mkdir()
    (root / "ipxe.efi").write_bytes(b"admin's own build")
    got = install_loaders(root, LoaderConfig())
    assert "undionly.kpxe" in got and "pxelinux.0" in got and "ldlinux.c32" in got
    assert filecmp.cmp(root / "undionly.kpxe", "/usr/lib/ipxe/undionly.kpxe", shallow=False)
    assert (root / "ipxe.efi").read_bytes() == b"admin's own build"
    assert not (root / "undionly.kpxe").is_symlink()
    assert install_loaders(root, LoaderConfig()) == []  # idempotent


def test_daemon_prepares_the_boot_root(bootd_daemon):
    d = bootd_daemon({})
    assert (d.storage / "boot" / "undionly.kpxe").is_file()
    assert (d.storage / "boot" / "pxelinux.0").is_file()
