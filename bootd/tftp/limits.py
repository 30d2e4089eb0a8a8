"""The TFTP server's caps (the per-session ones, SessionLimits, live with the sans-IO session).

`max_sessions` transfers at once, `max_sessions_per_client` of them from one client address (so one
host cannot take every slot) and `max_open_files` distinct files; a client above any of them gets an
ERROR packet at once ("server busy"), never silence, counted as refused{reason=busy|per-client}.
`leading_slash` says how a name starting with '/' is read (bootd/tftp/paths.py `normalize`).
A reload swaps the whole object: new limits apply to new transfers.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 500
    max_sessions_per_client: int = 16
    max_open_files: int = 400
    leading_slash: str = "root"
