"""Logging: to the journal under systemd, to stderr otherwise; one line per event, MAC first."""
from __future__ import annotations

import logging
import os
import sys


class MacFilter(logging.Filter):
    """Adds `mac` (or '-') to every record so formats can show it; pass extra={"mac": ...}."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "mac") or record.mac is None:
            record.mac = "-"
        return True


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    if under_systemd:
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="bootd")
            handler.setFormatter(logging.Formatter("[%(mac)s] %(name)s: %(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s [%(mac)s] %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(mac)s] %(name)s: %(message)s"))
    handler.addFilter(MacFilter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
