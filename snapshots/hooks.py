"""What other components plug into the snapshot store: who has a layer open (NBD exports, so deletes and
seals refuse) and who wants to hear about changes (metrics, logs)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from .model import Snapshot

log = logging.getLogger("bootd.snapshots")

OpenCheck = Callable[[Snapshot], Iterable[str]]
Listener = Callable[[str, dict[str, Any]], None]


class StoreHooks:
    def __init__(self) -> None:
        self._open_checks: list[OpenCheck] = []
        self._listeners: list[Listener] = []

    def register_open_check(self, fn: OpenCheck) -> None:
        """fn(snapshot) -> descriptions of whoever has the snapshot's file open (NBD exports)."""
        self._open_checks.append(fn)

    def open_by(self, snap: Snapshot) -> list[str]:
        holders: list[str] = []
        for fn in list(self._open_checks):
            try:
                holders.extend(str(h) for h in (fn(snap) or ()))
            except Exception as exc:  # a broken hook must not make a delete succeed silently
                holders.append(f"open check failed ({exc})")
        return holders

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def notify(self, event: str, detail: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, detail)
            except Exception:
                log.exception("snapshot listener failed on %s", event)
