"""systemd notification (READY, STATUS, WATCHDOG, STOPPING) through systemd-python.

Without NOTIFY_SOCKET every call is a no-op, so bootd runs the same outside systemd.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Optional

log = logging.getLogger("bootd.notify")

try:
    import systemd.daemon as _sd_daemon  # systemd-python ships no type information
except ImportError:  # systemd-python missing: still runs, only cannot notify
    _sd_daemon = None


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET")) and _sd_daemon is not None
        if os.environ.get("NOTIFY_SOCKET") and _sd_daemon is None:
            log.warning("NOTIFY_SOCKET is set but systemd-python is not importable; not notifying")
        self._watchdog_task: Optional[asyncio.Task[None]] = None

    def send(self, *fields: str) -> None:
        if self.enabled:
            _sd_daemon.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        """RELOADING=1 with the time (Type=notify-reload wants MONOTONIC_USEC); the reload must end with
        ready(), whatever happens in between, or systemd waits for it until its timeout."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  "STATUS=reloading configuration")

    @staticmethod
    def watchdog_interval() -> Optional[float]:
        """Half of WATCHDOG_USEC (as systemd recommends), if the watchdog is meant for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def start_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        interval = self.watchdog_interval()
        if not self.enabled or interval is None:
            return

        async def ping() -> None:
            while True:
                # Pinging from the event loop proves the loop is alive; `healthy` adds service checks.
                if healthy():
                    self.send("WATCHDOG=1")
                await asyncio.sleep(interval)

        self._watchdog_task = asyncio.get_running_loop().create_task(ping())

    def stop_watchdog(self) -> None:
        if self._watchdog_task:
            self._watchdog_task.cancel()
            self._watchdog_task = None
