"""The one MAC normaliser: every spelling a firmware, a config file or an admin uses, to `aa:bb:cc:dd:ee:ff`.

Accepted: six hex pairs separated by ':' or by '-' (one separator throughout), twelve hex digits with
none, or three groups of four hex digits separated by '.' (`aabb.ccdd.eeff`, as switches print them); any
case; surrounding blanks ignored. Config validation, menus, client configs, the snapshot store,
the NBD manager and the peer checks all use it, so one host never has two spellings of its identity.
"""
from __future__ import annotations

import re
from typing import Optional

# Every accepted spelling, for modules that find a MAC inside a longer text (a TFTP file name, a URL path)
# and then normalise the match. No capturing groups, so it can sit inside another pattern.
MAC_PATTERN = (r"(?:[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}"
               r"|[0-9A-Fa-f]{12})")
# what an admin may also type (config, bootctl), not looked for inside file names or URLs
_DOTTED_PATTERN = r"[0-9A-Fa-f]{4}(?:\.[0-9A-Fa-f]{4}){2}"
_MAC_RE = re.compile(rf"^(?:{MAC_PATTERN}|{_DOTTED_PATTERN})$")


def normalize_mac(value: str) -> str:
    """`AA-BB-CC-DD-EE-FF`, `aabb.ccdd.eeff`, `aabbccddeeff`, `aa:bb:..` -> `aa:bb:cc:dd:ee:ff`;
    ValueError naming the value if it is not a MAC."""
    text = value.strip() if isinstance(value, str) else ""
    if not _MAC_RE.match(text):
        raise ValueError(f"not a MAC address: {value!r} (write it as aa:bb:cc:dd:ee:ff)")
    digits = re.sub(r"[:.-]", "", text).lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def parse_mac(value: str) -> Optional[str]:
    """normalize_mac, or None when `value` is not a MAC (a host name, a file name)."""
    try:
        return normalize_mac(value)
    except ValueError:
        return None
