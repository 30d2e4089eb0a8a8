"""The C data pump for TFTP: bootd/tftp/pump.c, built at run time, supervised from the event loop.

Policy stays in Python (bootd/tftp/server.py): parsing, path confinement, providers, option
negotiation, limits and boot events. Once a transfer of a disk file is set up (session socket
connected to the client, file open, options negotiated) the server hands the socket, the file and
the negotiated parameters to the pump (`DataPump.hand`), which then sends the OACK or the first
window and does the whole data phase exactly like the sans-IO ReadSession (bootd/tftp/session.py,
still the reference, and still the data path of dynamic files, netascii and `tftp.data_pump: python`).
The pump answers each ACK from C with the next block already read, so a lock-step transfer waits on
one epoll wake-up, a recv and a send per block instead of the Python event loop.

When a session ends the pump reports (id, outcome, bytes, end time, counters) and the server frees
its bookkeeping and records the boot event as for a Python session. If the pump dies, its sessions
are lost (the clients retry), the server counts it and this module restarts it with a backoff; new
transfers are served from Python meanwhile. If it cannot be built (no gcc) the server serves every
transfer from Python and logs that once.

Control protocol (SOCK_SEQPACKET, one message each):
  to the pump:  b"S" + START + OACK datagram, SCM_RIGHTS [session socket, file]
  from it:      b"E" + END
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
from pathlib import Path
from typing import Callable, Optional

from bootd.chelper import CFDS_HEADER, SupervisedHelper, build_c_program

log = logging.getLogger("bootd.tftp.pump")

PUMP_SOURCE = Path(__file__).with_name("pump.c")
CC = "gcc"
PUMP_NICE = -10  # a relay: every wake-up it waits for adds to each block's latency (like the NBD splicer)
#                  the pump sets it itself, with a short EEVDF time slice (see latency_hints in pump.c)

START = struct.Struct("<QQIIIIddd")   # id, size, blksize, windowsize, retries, len(oack), rto, max rto, session timeout
# id, outcome, bytes acked, end (CLOCK_MONOTONIC), retransmits, dup ACKs, blocks, ignored
END = struct.Struct("<QIQdQQQQ")
OUTCOMES = {0: "complete", 1: "timeout", 2: "client-error", 3: "aborted", 4: "unreachable"}


def default_run_dir() -> Path:
    """Where `python -m bootd.tftp` and a TftpServer without a run dir keep the pump binary."""
    return Path(tempfile.gettempdir()) / f"bootd-tftp-{os.geteuid()}"


def build_pump(run_dir: Path, cc: Optional[str] = None) -> Path:
    """The pump binary for the current source (its hash in the name), compiled if missing."""
    Path(run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # build_c_program checks it is private
    return build_c_program(PUMP_SOURCE, run_dir, "tftp-pump-", "TFTP pump", cc or CC, headers=[CFDS_HEADER])


class DataPump(SupervisedHelper):
    """The supervised pump process. `on_end(id, outcome, nbytes, end, retransmits, dup_acks, blocks, ignored)`
    is called for each finished session; `on_lost()` when the process died with sessions in it.
    Closing its control socket (stop) makes it end every transfer with an ERROR and exit."""

    what = "TFTP pump"

    def __init__(self, run_dir: str | Path, on_end: Callable[..., None], on_lost: Callable[[], None],
                 cc: Optional[str] = None):
        super().__init__(run_dir)
        self.on_end = on_end
        self.on_lost = on_lost
        self.cc = cc
        self.deaths = 0
        self.handed = 0

    def _build(self) -> Path:
        return build_pump(self.run_dir, self.cc)

    def _command(self, ctl_fd: int) -> tuple[list[str], list[int]]:
        return [str(self.binary), str(ctl_fd), str(PUMP_NICE)], []

    def _on_ctl(self) -> None:
        for _ in range(256):
            msg = self._recv()
            if not msg:
                return
            if msg[:1] == b"E" and len(msg) == 1 + END.size:
                ident, outcome, *rest = END.unpack_from(msg, 1)
                try:
                    self.on_end(ident, OUTCOMES.get(outcome, "aborted"), *rest)
                except Exception:
                    log.exception("tftp: handling the end of pumped session %d failed", ident)
            else:
                log.error("tftp: unexpected message from the pump: %r", msg[:40])

    def _gone(self, status: Optional[int]) -> None:
        if self._stopping:
            return
        self.deaths += 1
        log.error("TFTP pump died (status %s): its transfers are lost (clients retry); restarting it", status)
        self.on_lost()

    def _restarted(self) -> None:
        log.warning("TFTP pump restarted (pid %s)", self.proc.pid if self.proc is not None else "?")

    def hand(self, ident: int, sock: socket.socket, file_fd: int, *, size: int, blksize: int, windowsize: int,
             retries: int, rto: float, max_timeout: float, session_timeout: float, oack: Optional[bytes]) -> None:
        """Give one session to the pump (it sends the OACK or the first window). Raises OSError when the
        pump cannot take it now (restarting, or its queue full): the caller serves it from Python."""
        ctl = self.ctl
        if ctl is None or not self.up:
            raise OSError("the TFTP pump is not running")
        oack = oack or b""
        msg = b"S" + START.pack(ident, size, blksize, windowsize, retries, len(oack), rto, max_timeout,
                                session_timeout) + oack
        socket.send_fds(ctl, [msg], [sock.fileno(), file_fd])
        self.handed += 1

    def status(self) -> dict[str, object]:
        return {"pid": self.proc.pid if self.proc is not None else None, "up": self.up,
                "restarts": self.restarts, "deaths": self.deaths, "handed": self.handed}
