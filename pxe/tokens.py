"""Per-host NBD export names while no NBD engine runs (ctx.disks is None).

A random token, made once per host and kept in the state store, so a PC's command line names the same
export across reboots and restarts and no PC can guess another's export from its MAC.
"""
from __future__ import annotations

import secrets
import time


def fallback_token(store, mac: str) -> str:
    mac = mac.lower()
    rows = store.query("SELECT token FROM pxe_tokens WHERE mac=?", (mac,))
    if rows:
        return rows[0]["token"]
    with store.transaction() as cur:
        cur.execute("INSERT OR IGNORE INTO pxe_tokens(mac, token, created) VALUES (?, ?, ?)",
                    (mac, secrets.token_hex(12), time.time()))
        return cur.execute("SELECT token FROM pxe_tokens WHERE mac=?", (mac,)).fetchone()[0]
