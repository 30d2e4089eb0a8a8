"""The one MAC normaliser: every spelling a firmware, a config file or an admin uses, to `aa:bb:cc:dd:ee:ff`.

Accepted: six hex pairs separated by ':' or by '-' (one separator throughout), or twelve hex digits with
none; any case; surrounding blanks ignored. Config validation, menus, client configs, the snapshot store,
the NBD manager and the peer checks all use it, so one host never has two spellings of its identity.
"""
from __future__ import annotations

import re
from typing import Optional

# Every accepted spelling, for modules that find a MAC inside a longer text (a TFTP file name, a URL path)
# and then normalise the match. No capturing groups, so it can sit inside another pattern.
MAC_PATTERN = (r"(?:[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}"
               r"|[0-9A-Fa-f]{12})")
_MAC_RE = re.compile(rf"^{MAC_PATTERN}$")


def normalize_mac(value: str) -> str:
    """`AA-BB-CC-DD-EE-FF`, `aabbccddeeff`, `aa:bb:..` -> `aa:bb:cc:dd:ee:ff`; ValueError if not a MAC."""
    text = value.strip() if isinstance(value, str) else ""
    if not _MAC_RE.match(text):
        raise ValueError("not a MAC address")
    digits = re.sub(r"[:-]", "", text).lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def parse_mac(value: str) -> Optional[str]:
    """normalize_mac, or None when `value` is not a MAC (a host name, a file name)."""
    try:
        return normalize_mac(value)
    except ValueError:
        return None
