"""The unit the daemon starts and stops: one protocol server or manager per Service."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from bootd.daemon import Context


class Service:
    """Started in order, stopped in reverse; `reload` gets the context holding the new config."""

    name = "service"

    async def start(self, ctx: "Context") -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def reload(self, ctx: "Context") -> None:
        """Apply ctx.config (already validated). Default: restart the service."""
        await self.stop()
        await self.start(ctx)

    def status(self) -> dict[str, object]:
        return {}

    def warning(self) -> "str | None":
        """A degraded or unsafe state worth the unit's STATUS= line (systemctl status), or None."""
        return None


async def cancel_and_wait(task: Optional["asyncio.Task[Any]"]) -> None:
    """Cancel a service's background task and wait until it has ended (None: nothing to do)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
