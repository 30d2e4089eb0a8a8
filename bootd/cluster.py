"""Several bootd servers on one PostgreSQL state: who is up, and which one answers DHCP.

DHCP runs active/standby, decided in the shared database: the active server renews its hold on the one
`dhcp_active` row every heartbeat; a standby takes the row only when the holder's time has run out
(`state.dhcp_takeover` seconds of the database's clock without a renewal: it was killed, hung, or cut off
from the database). Chosen over load sharing by MAC hash (RFC 3074) because a lab's DHCP load is a
burst at 8:00 that one server already answers at the peer's speed (benchmarks/storm), while sharing
would split every room across servers and need the failover protocol's lease hand-over; with one
active server and every lease in the shared database, no address can be given to two PCs:

- the active server stops answering on its own clock before its hold runs out (it counts from when it
  *sent* the renewal, which is before the database stamped it), so two servers never answer at once;
- a server that takes over reloads the lease table from the database before it answers;
- a lease is written only if the address is free or already that PC's (bootd/dhcp/leases.py), in a
  write transaction serialised across servers: even two servers answering at once could not bind one
  address to two MACs.

TFTP, HTTP and NBD are served by every server: a PC fetches from the server whose DHCP answer it got, and
a PC whose server dies retries from DHCP and gets the standby. With the SQLite state there is one server:
it always answers DHCP, and its row in `servers` is all this adds.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Callable, Optional

from bootd.service import Service, cancel_and_wait

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.cluster")

SINGLE_SERVER_HEARTBEAT = 30.0  # seconds between `servers` rows' updates with SQLite (nobody takes over)


class Cluster(Service):
    """This server's heartbeat and its DHCP role (see the module docstring)."""

    name = "cluster"

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.ctx: Optional["Context"] = None
        self.server_name = socket.gethostname()
        self.shared = False  # the state is a database other servers may use
        self.started = time.time()
        self._active_until = 0.0  # this server's own clock: it answers DHCP until then
        self._holder: Optional[str] = None
        self._task: Optional[asyncio.Task[None]] = None
        self.takeover_listeners: list[Callable[[], None]] = []  # run on the loop when this server takes DHCP
        # run on the loop when another server changed registered hosts or DHCP reservations (after
        # Context.refresh_hosts): what each server holds in memory follows the shared database
        self.refresh_listeners: list[Callable[[], None]] = []
        self._fingerprint: Optional[str] = None
        self.takeovers = 0
        self.errors = 0

    async def start(self, ctx: "Context") -> None:
        self.ctx = ctx
        ctx.cluster = self
        cfg = ctx.config.state
        self.server_name = cfg.server_name or socket.gethostname()
        ctx.store.server_name = self.server_name
        self.shared = ctx.store.dialect != "sqlite"
        ctx.metrics.add_gauges("cluster", lambda: {"dhcp_active": 1.0 if self.dhcp_active() else 0.0,
                                                   "takeovers": float(self.takeovers),
                                                   "heartbeat_errors": float(self.errors)})
        await self._beat()  # the first heartbeat (and DHCP claim) before DHCP starts
        self._task = asyncio.create_task(self._run(), name="cluster-heartbeat")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self.ctx is not None and self.shared and self.dhcp_active():
            self._active_until = 0.0
            try:  # hand DHCP over now rather than after dhcp_takeover seconds
                await asyncio.to_thread(self.ctx.store.release_dhcp, self.server_name)
            except Exception as e:
                log.warning("cluster: could not hand the DHCP role over (%s); a standby takes it in %.0f s",
                            e, self.ctx.config.state.dhcp_takeover)

    async def reload(self, ctx: "Context") -> None:
        self.ctx = ctx  # heartbeat and takeover times are read at every beat; the name stays until restart
        ctx.cluster = self

    def dhcp_active(self) -> bool:
        """Whether this server answers DHCP now: always with SQLite; on a shared database while its hold
        on the DHCP role lasts, by its own clock."""
        return not self.shared or self.clock() < self._active_until

    def confirm_dhcp(self) -> bool:
        """dhcp_active, asking the database at once when this server's own hold has lapsed while it still
        believed it held the role (the process was stopped or starved past its renewal): if nobody took
        over meanwhile it renews and answers the packets waiting, rather than dropping them until the
        next heartbeat. A standby (another server holds the role) does not ask: it just does not answer."""
        if self.dhcp_active():
            return True
        if self.ctx is None or self._holder != self.server_name:
            return False
        sent = self.clock()
        try:
            holder, _expires, took = self.ctx.store.claim_dhcp(self.server_name, self.ctx.config.state.dhcp_takeover)
        except Exception as e:
            self.errors += 1
            self._holder = None
            log.error("cluster: cannot renew the DHCP role in the state database: %s", e)
            return False
        self._apply_claim(sent, holder, took)
        return self.dhcp_active()

    def status(self) -> dict[str, object]:
        return {"server": self.server_name, "shared_state": self.shared, "dhcp_active": self.dhcp_active(),
                "dhcp_holder": self._holder if self.shared else self.server_name, "takeovers": self.takeovers}

    def warning(self) -> Optional[str]:
        if self.shared and self.errors and not self.dhcp_active() and self._holder is None:
            return "cannot reach the state database: not answering DHCP"
        return None

    async def _run(self) -> None:
        while True:
            assert self.ctx is not None
            cfg = self.ctx.config.state
            await asyncio.sleep(cfg.heartbeat if self.shared else SINGLE_SERVER_HEARTBEAT)
            await self._beat()

    def _address(self) -> Optional[str]:
        assert self.ctx is not None
        return self.ctx.config.server_ip

    async def _beat(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        cfg = ctx.config.state
        sent = self.clock()
        try:
            await asyncio.to_thread(ctx.store.heartbeat, self.server_name, self._address(), os.getpid(), self.started)
            if not self.shared:
                return
            holder, _expires, took = await asyncio.to_thread(ctx.store.claim_dhcp, self.server_name, cfg.dhcp_takeover)
            fingerprint = await asyncio.to_thread(ctx.store.shared_rows_fingerprint)
        except Exception as e:  # the database is unreachable: stop answering DHCP when the hold runs out
            self.errors += 1
            log.error("cluster: heartbeat to the state database failed: %s", e)
            self._holder = None
            return
        self._apply_claim(sent, holder, took)
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            log.info("cluster: registered hosts or DHCP reservations changed in the database: reading them again")
            ctx.refresh_hosts()
            for listener in self.refresh_listeners:
                listener()
        self._fingerprint = fingerprint

    def _apply_claim(self, sent: float, holder: str, took: bool) -> None:
        assert self.ctx is not None
        cfg = self.ctx.config.state
        if holder != self.server_name:
            if self._active_until:
                log.warning("cluster: %s answers DHCP now", holder)
            self._active_until = 0.0
            self._holder = holder
            return
        if took:
            self.ctx.refresh_hosts()  # hosts another server registered, before DHCP reads its policy again
            self.takeovers += 1
            log.warning("cluster: this server (%s) answers DHCP now%s", self.server_name,
                        f" in place of {self._holder}" if self._holder and self._holder != self.server_name else "")
            for listener in self.takeover_listeners:
                listener()  # DHCP reloads its leases from the database before it answers again
        # counted from before the database stamped the renewal, with a margin for the clocks' rates
        self._active_until = sent + cfg.dhcp_takeover - min(1.0, cfg.dhcp_takeover / 4)
        self._holder = holder
