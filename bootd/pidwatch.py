"""Notice a child's death from the event loop (a pidfd becomes readable), without SIGCHLD handlers."""
from __future__ import annotations

import asyncio
import os
from typing import Callable, Optional


class PidWatch:
    """Calls `on_exit` once the watched process ends. One process at a time; `stop()` is idempotent."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def start(self, pid: int, on_exit: Callable[[], None]) -> None:
        """Raises ProcessLookupError if the process is already gone."""
        self.stop()
        self.fd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self.fd, on_exit)

    def stop(self) -> None:
        if self.fd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.fd)
            except Exception:  # loop already closed: the fd still has to go
                pass
            os.close(self.fd)
            self.fd = None
