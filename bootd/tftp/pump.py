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

import asyncio
import hashlib
import logging
import os
import signal
import socket
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

from nbdexport.pidwatch import PidWatch

log = logging.getLogger("bootd.tftp.pump")

PUMP_SOURCE = Path(__file__).with_name("pump.c")
CC = "gcc"
PUMP_NICE = -10  # a relay: every wake-up it waits for adds to each block's latency (like the NBD splicer)
#                  the pump sets it itself, with a short EEVDF time slice (see latency_hints in pump.c)

START = struct.Struct("<QQIIIIddd")   # id, size, blksize, windowsize, retries, len(oack), rto, max rto, session timeout
END = struct.Struct("<QIQdQQQQ")      # id, outcome, bytes acked, end (CLOCK_MONOTONIC), retransmits, dup ACKs, blocks, ignored
OUTCOMES = {0: "complete", 1: "timeout", 2: "client-error", 3: "aborted", 4: "unreachable"}


def default_run_dir() -> Path:
    """Where `python -m bootd.tftp` and a TftpServer without a run dir keep the pump binary."""
    return Path(tempfile.gettempdir()) / f"bootd-tftp-{os.geteuid()}"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path} is not a private directory of this user: the pump is not built there")


def build_pump(run_dir: Path, cc: Optional[str] = None) -> Path:
    """The pump binary for the current source (its hash in the name), compiled if missing."""
    run_dir = Path(run_dir)
    _private_dir(run_dir)
    src = PUMP_SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:12]
    binary = run_dir / f"tftp-pump-{digest}"
    if binary.exists() and os.access(binary, os.X_OK):
        return binary
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    try:
        r = subprocess.run([cc or CC, "-O2", "-Wall", "-o", str(tmp), "-x", "c", "-"], input=src,
                           capture_output=True)
    except OSError as e:
        raise RuntimeError(f"cannot run the C compiler: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"cannot compile the TFTP pump: {r.stderr.decode(errors='replace').strip()[-400:]}")
    os.replace(tmp, binary)
    for old in run_dir.glob("tftp-pump-*"):
        if old != binary:
            try:
                old.unlink()
            except OSError:
                pass
    return binary


class DataPump:
    """The supervised pump process. `on_end(id, outcome, nbytes, end, retransmits, dup_acks, blocks, ignored)`
    is called for each finished session; `on_lost()` when the process died with sessions in it."""

    BACKOFF = (0.05, 0.2, 1.0, 2.0, 5.0)

    def __init__(self, run_dir: str | Path, on_end: Callable[..., None], on_lost: Callable[[], None],
                 cc: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.on_end = on_end
        self.on_lost = on_lost
        self.cc = cc
        self.binary: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self.ctl: Optional[socket.socket] = None
        self.restarts = 0
        self.deaths = 0
        self.handed = 0
        self._pidwatch = PidWatch()
        self._stopping = False
        self._restart_task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def up(self) -> bool:
        return self.ctl is not None and self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        """Build (if needed) and start. Raises RuntimeError/OSError when the pump cannot run."""
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self.binary = await asyncio.to_thread(build_pump, self.run_dir, self.cc)
        self._spawn()

    def _spawn(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([str(self.binary), str(theirs.fileno()), str(PUMP_NICE)],
                                         pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        self.ctl = mine
        self._loop.add_reader(mine.fileno(), self._on_ctl)
        self._pidwatch.start(self.proc.pid, self._died)
        log.debug("TFTP pump pid %d started", self.proc.pid)

    def _close_ctl(self) -> None:
        if self.ctl is not None:
            try:
                self._loop.remove_reader(self.ctl.fileno())
            except Exception:
                pass
            self.ctl.close()
            self.ctl = None

    def _on_ctl(self) -> None:
        for _ in range(256):
            try:
                msg = self.ctl.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg:  # the pump is gone; the pidfd tells when it has really exited
                self._close_ctl()
                return
            if msg[:1] == b"E" and len(msg) == 1 + END.size:
                ident, outcome, *rest = END.unpack_from(msg, 1)
                try:
                    self.on_end(ident, OUTCOMES.get(outcome, "aborted"), *rest)
                except Exception:
                    log.exception("tftp: handling the end of pumped session %d failed", ident)
            else:
                log.error("tftp: unexpected message from the pump: %r", msg[:40])

    def _died(self) -> None:
        self._pidwatch.stop()
        if self.ctl is not None:
            self._on_ctl()  # reports it sent before it died
        status = self.proc.poll() if self.proc is not None else None
        self._close_ctl()
        if self._stopping:
            return
        self.deaths += 1
        log.error("TFTP pump died (status %s): its transfers are lost (clients retry); restarting it", status)
        self.on_lost()
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        attempt = 0
        while not self._stopping:
            await asyncio.sleep(self.BACKOFF[min(attempt, len(self.BACKOFF) - 1)])
            attempt += 1
            try:
                if self.binary is None or not self.binary.exists():
                    self.binary = await asyncio.to_thread(build_pump, self.run_dir, self.cc)
                self._spawn()
                self.restarts += 1
                log.warning("TFTP pump restarted (pid %d)", self.proc.pid)
                return
            except Exception as e:
                log.error("restarting the TFTP pump failed: %s", e)

    def hand(self, ident: int, sock: socket.socket, file_fd: int, *, size: int, blksize: int, windowsize: int,
             retries: int, rto: float, max_timeout: float, session_timeout: float, oack: Optional[bytes]) -> None:
        """Give one session to the pump (it sends the OACK or the first window). Raises OSError when the
        pump cannot take it now (restarting, or its queue full): the caller serves it from Python."""
        if not self.up:
            raise OSError("the TFTP pump is not running")
        oack = oack or b""
        msg = b"S" + START.pack(ident, size, blksize, windowsize, retries, len(oack), rto, max_timeout,
                                session_timeout) + oack
        socket.send_fds(self.ctl, [msg], [sock.fileno(), file_fd])
        self.handed += 1

    async def stop(self) -> None:
        """Close the control socket: the pump ends every transfer with an ERROR and exits."""
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        self._pidwatch.stop()
        self._close_ctl()
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            for _ in range(100):
                if p.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            else:
                p.kill()
                p.wait()

    def status(self) -> dict:
        return {"pid": self.proc.pid if self.proc is not None else None, "up": self.up,
                "restarts": self.restarts, "deaths": self.deaths, "handed": self.handed}
