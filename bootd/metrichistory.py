"""The last hour of bytes served per protocol (TFTP, HTTP, NBD), sampled from the counters every `every`
seconds: what the dashboard's Server page plots and GET /api/v1/metrics/history returns.

Rates are differences of cumulative counters; a counter that went backwards (NBD's per-export counters
end with their export) counts as 0 for that interval, never as a negative rate.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Optional

from bootd.service import Service, cancel_and_wait

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.history")

SERIES = ("tftp", "http", "nbd")


class MetricHistory(Service):
    name = "history"

    def __init__(self, every: float = 10.0, keep: float = 3600.0):
        self.every = every
        self.samples: collections.deque[dict[str, float]] = collections.deque(maxlen=int(keep / every) + 1)
        self.ctx: Optional[Context] = None
        self._last: Optional[dict[str, float]] = None
        self._task: Optional[asyncio.Task[None]] = None

    async def start(self, ctx: Context) -> None:
        self.ctx = ctx
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bootd-metric-history")

    async def reload(self, ctx: Context) -> None:
        self.ctx = ctx

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def totals(self) -> dict[str, float]:
        """Bytes served so far per protocol (NBD: read + written by the disks open now)."""
        assert self.ctx is not None
        m = self.ctx.metrics
        out = {"tftp": m.get("tftp", "bytes_sent"), "http": m.get("http", "bytes"), "nbd": 0.0}
        if self.ctx.disks is not None:
            try:
                for d in await self.ctx.disks.list():
                    out["nbd"] += float(d.get("read_bytes") or 0) + float(d.get("written_bytes") or 0)
            except Exception as e:
                log.debug("history: no disk counters: %s", e)
        return out

    async def sample(self, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        totals = await self.totals()
        last, self._last = self._last, {**totals, "at": now}
        if last is None:
            return
        span = max(now - last["at"], 1e-6)
        self.samples.append({"at": now, **{k: max(0.0, totals[k] - last[k]) / span for k in SERIES}})

    def history(self) -> dict[str, object]:
        return {"every": self.every, "series": list(SERIES), "unit": "bytes/s", "samples": list(self.samples)}

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as e:
                log.warning("history: cannot sample the counters: %s", e)
            await asyncio.sleep(self.every)
