"""Whether an EFI program (a loader, a kernel's EFI stub) carries an Authenticode signature, and whether
a GRUB image can fetch over HTTP.

Secure Boot firmware runs only signed programs, shim runs only what its vendor key signed, and GRUB's
`linux` asks shim to verify the kernel. A kernel without any signature is refused at the PC with one
line on its screen; bootd says so earlier, in the config check, for rooms with `secureboot: true`.
The check reads the PE header's certificate table (data directory 4, "Security"): present and non-empty
means signed. It does not verify the signature (the firmware and shim do that, against keys bootd does
not hold); it catches the common mistake, a self-built or stripped kernel in a Secure Boot room.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional

_PE32, _PE32_PLUS = 0x10B, 0x20B
_SECURITY_DIR = 4


def signature_size(data: bytes) -> Optional[int]:
    """Bytes of the Authenticode certificate table of a PE image (0: unsigned); None if not a PE image."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if pe + 24 + 2 > len(data) or data[pe:pe + 4] != b"PE\0\0":
        return None
    opt = pe + 24  # after the signature and the 20-byte COFF header
    (magic,) = struct.unpack_from("<H", data, opt)
    if magic == _PE32:
        count_at, dirs_at = opt + 92, opt + 96
    elif magic == _PE32_PLUS:
        count_at, dirs_at = opt + 108, opt + 112
    else:
        return None
    if dirs_at + 8 * (_SECURITY_DIR + 1) > len(data):
        return None
    (count,) = struct.unpack_from("<I", data, count_at)
    if count <= _SECURITY_DIR:
        return 0
    offset, size = struct.unpack_from("<II", data, dirs_at + 8 * _SECURITY_DIR)
    return size if offset and size else 0


def is_signed(path: Path) -> Optional[bool]:
    """True: signed; False: a PE image without a signature; None: not a PE image (cannot boot under UEFI)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    size = signature_size(head)
    return None if size is None else size > 0


def grub_has_http(path: Path) -> bool:
    """Whether the GRUB image at `path` has GRUB's HTTP client built in. Debian 12's signed network GRUB
    has TFTP only, and a signed GRUB cannot load modules: over UEFI HTTP boot it could not read its menu."""
    try:
        return b"net/http.c" in path.read_bytes()
    except OSError:
        return False
