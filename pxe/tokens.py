"""Per-host NBD export names while no NBD engine runs (ctx.disks is None).

A random token, made once per host and kept in the state store, so a PC's command line names the same
export across reboots and restarts and no PC can guess another's export from its MAC.
"""
from __future__ import annotations

import secrets

from bootd.macaddr import normalize_mac
from bootd.state import StateStore


def fallback_token(store: StateStore, mac: str) -> str:
    """The host's token (bootd.state.StateStore.pxe_token), made on its first boot."""
    return store.pxe_token(normalize_mac(mac), secrets.token_hex(12))
