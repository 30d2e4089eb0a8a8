"""bootctl wake (Wake-on-LAN, paced by the daemon) and bootctl backup (online copy of the state database)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from bootd.cli.api_client import ApiClient
from bootd.cli.bootctl import emit, table


def _wake_text(job: dict[str, Any]) -> str:
    rows = [[t["name"], t["mac"], t["interface"], t["broadcast"]] for t in job["targets"]]
    hosts = len(job["hosts"])
    head = (f"wake job {job['id']}: {job['packets']} magic packet(s) for {hosts} host(s) at {job['rate']:g}/s: "
            f"{job['sent']} sent, {job['failed']} failed, {job['left']} queued")
    lines = [head, table(rows, ["NAME", "MAC", "INTERFACE", "BROADCAST"])]
    lines += [f"  error: {e}" for e in job["errors"]]
    return "\n".join(lines)


def cmd_wake(args: argparse.Namespace, api: ApiClient) -> int:
    if not args.hosts and not args.group:
        print("bootctl wake: name a host (name or MAC) or --group ROOM", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"hosts": args.hosts}
    if args.group:
        body["group"] = args.group
    job = api.post("/api/v1/wake", body)
    if args.wait:
        # the daemon paces the sends; this only follows the job until its last packet is out
        deadline = time.monotonic() + job["packets"] / job["rate"] + 30
        while job["state"] != "done" and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.1, job["left"] / job["rate"])))
            job = api.get(f"/api/v1/wake/{job['id']}")
    emit(args, job, _wake_text(job))
    return 1 if job["failed"] else 0


def cmd_backup(args: argparse.Namespace, api: ApiClient) -> int:
    path = os.path.abspath(args.file)  # the admin's relative path, made absolute here: the daemon refuses one
    res = api.post("/api/v1/backup", {"path": path, "force": args.force})
    rows = ", ".join(f"{n} {t}" for t, n in sorted(res["rows"].items()) if n)
    emit(args, res, f"state backed up to {res['path']} ({res['bytes']} bytes, schema {res['schema_version']}, "
                    f"{res['seconds']:g} s): {rows or 'no rows'}\n"
                    f"also back up the sealed snapshot layers (<storage.directory>/snapshots); "
                    f"restore with: bootd restore {res['path']}")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("wake", parents=[common], help="send Wake-on-LAN magic packets to hosts or a room")
    p.add_argument("hosts", nargs="*", metavar="HOST", help="host name or MAC")
    p.add_argument("--group", metavar="ROOM", help="every configured host of this group")
    p.add_argument("--wait", action="store_true", help="follow the job until every packet is sent")
    p.set_defaults(func=cmd_wake)
    p = sub.add_parser("backup", parents=[common],
                       help="consistent online copy of the state database (restore: bootd restore FILE)")
    p.add_argument("file", help="the backup file (written by the daemon)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=cmd_backup)
