"""Run the TFTP server alone: `python -m bootd.tftp --root DIR --listen 10.0.0.1:69`.

For tests and benchmarks (the daemon runs the same TftpServer as a service). Prints "READY host:port"
on stdout once listening; SIGUSR1 writes the status as JSON to --status; SIGTERM stops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from bootd.tftp.limits import ServerLimits
from bootd.tftp.server import TftpServer
from bootd.tftp.session import SessionLimits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bootd.tftp", description=__doc__)
    ap.add_argument("--root", required=True)
    ap.add_argument("--listen", action="append", default=[], help="HOST:PORT (repeatable)")
    ap.add_argument("--max-sessions", type=int, default=500)
    ap.add_argument("--max-sessions-per-client", type=int, default=16)
    ap.add_argument("--max-open-files", type=int, default=400)
    ap.add_argument("--max-blksize", type=int, default=65464)
    ap.add_argument("--max-windowsize", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--retries", type=int, default=6)
    ap.add_argument("--session-timeout", type=float, default=60.0)
    ap.add_argument("--leading-slash", choices=["root", "refuse"], default="root")
    ap.add_argument("--data-pump", choices=["c", "python"], default="c",
                    help="c: the data phase of file transfers in the C pump (default); python: all in Python")
    ap.add_argument("--run-dir", help="where the C pump is built (default: a private directory in $TMPDIR)")
    ap.add_argument("--state", help="a bootd state database to record boot events in")
    ap.add_argument("--status", help="file SIGUSR1 writes the status JSON to")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    store = None
    if args.state:
        from bootd.state import open_state
        store = open_state(args.state)  # BOOTD_STATE_URL: the PostgreSQL state instead
    from bootd.metrics import Metrics
    metrics = Metrics()
    server = TftpServer(
        args.root,
        limits=SessionLimits(max_blksize=args.max_blksize, max_windowsize=args.max_windowsize,
                             timeout=args.timeout, max_timeout=max(args.timeout, 8.0), retries=args.retries,
                             session_timeout=args.session_timeout),
        server_limits=ServerLimits(max_sessions=args.max_sessions, max_sessions_per_client=args.max_sessions_per_client,
                                   max_open_files=args.max_open_files,
                                   leading_slash=args.leading_slash),
        store=store, metrics=metrics, data_pump=args.data_pump, run_dir=args.run_dir)
    addresses = []
    for item in args.listen or ["127.0.0.1:69"]:
        host, _, port = item.rpartition(":")
        addresses.append((host or "0.0.0.0", int(port)))
    await server.start(addresses)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def dump_status() -> None:
        if args.status:
            with open(args.status + ".tmp", "w") as f:
                json.dump({"status": server.status(), "metrics": metrics.snapshot()}, f)
            import os
            os.replace(args.status + ".tmp", args.status)

    loop.add_signal_handler(signal.SIGUSR1, dump_status)
    print("READY " + " ".join(f"{h}:{p}" for h, p in server.addresses), flush=True)
    await stop.wait()
    await server.stop()
    dump_status()
    if store is not None:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
