"""Text that reaches the admin's terminal: what PCs send (DHCP host name, vendor and user class,
requested file names) is shown escaped, never interpreted.

A DHCP client chooses its option 12 freely; printed raw, "\\x1b]0;...\\x07" retitles the admin's terminal,
"\\x1b[2J" clears it, "\\r" or "\\n" forges a line of `bootctl leases`. Every string bootctl got from the
API goes through `escape_controls` before it is formatted (human output; --json is escaped by JSON)."""
from __future__ import annotations

from typing import Any

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI on some terminals), and the Unicode bidi
# overrides/isolates that reorder what follows them on screen.
_CONTROL = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPE = {c: _NAMED.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROL}
_ESCAPE_KEEP_LINES = {c: e for c, e in _ESCAPE.items() if c not in (0x09, 0x0A)}


def escape_controls(text: str, keep_lines: bool = False) -> str:
    """`text` with every control character shown as an escape (\\x1b, \\r, \\u202e). keep_lines: for
    multi-line documents bootd renders (menus, client files), newlines and tabs stay."""
    return text.translate(_ESCAPE_KEEP_LINES if keep_lines else _ESCAPE)


def escape_strings(value: Any) -> Any:
    """A JSON value with escape_controls applied to every string in it, keys too."""
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, list):
        return [escape_strings(v) for v in value]
    if isinstance(value, dict):
        return {escape_strings(k) if isinstance(k, str) else k: escape_strings(v) for k, v in value.items()}
    return value
