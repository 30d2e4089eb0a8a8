"""bootctl disk list | boot | reset | commit: hosts' NBD disks (NBD helper)."""
from __future__ import annotations

import argparse
import json
import time

from bootd.cli.api_client import ApiClient, q
from bootd.cli.bootctl import EXIT_REFUSED, confirmed, emit, fmt_age, fmt_time, table
from bootd.units import human


def cmd_list(args: argparse.Namespace, api: ApiClient) -> int:
    data = api.get("/api/v1/disks")
    now = data.get("now") or time.time()
    rows = []
    for d in data["disks"]:
        io = "-" if d.get("read_bytes") is None else f"{human(d['read_bytes'])} / {human(d['written_bytes'])}"
        rows.append([d["host"], d["mac"], d["snapshot"], human(d["overlay_bytes"]),
                     "yes" if d["connected"] else "no", io,
                     f"{fmt_time(d['since'])} ({fmt_age(now - d['since'])} ago)" if d["since"] else "-",
                     "persistent" if d["persistent"] else "ephemeral",
                     (d["export"][:8] + "…") if d["export"] else "(idle layer)"])
    sp = data["space"]
    lines = [table(rows, ["HOST", "MAC", "SNAPSHOT", "OVERLAY", "CONNECTED", "READ / WRITTEN", "SINCE", "KIND",
                          "EXPORT"])
             if rows else "no disks"]
    lines.append(f"disk directory {sp['path']}: {human(sp['free'])} free of {human(sp['total'])}"
                 + ("  WARNING: nearly full" if sp["low"] else ""))
    qsd = data["storage_daemon"]
    lines.append(f"qemu-storage-daemon pid {qsd['pid']} on {qsd['listen']}"
                 f"{' TLS ' + qsd['tls'] if qsd['tls'] else ''}, restarts {qsd['restarts']}"
                 + ("" if qsd["up"] else "  DOWN (restarting)"))
    emit(args, data, "\n".join(lines))
    return 0


def cmd_boot(args: argparse.Namespace, api: ApiClient) -> int:
    body = {"snapshot": args.snapshot} if args.snapshot else {}
    res = api.post(f"/api/v1/disks/{q(args.host)}/boot", body)
    emit(args, res, f"{res['mac']}: {res['uri']} over {res['snapshot']} "
                    f"({'persistent' if res['persistent'] else 'fresh'} disk, "
                    f"ready in {res['ms']} ms)\nkernel command line: {res['cmdline']}")
    return 0


def cmd_reset(args: argparse.Namespace, api: ApiClient) -> int:
    """Lists what goes (bootd's plan) and needs --yes or a y at a terminal; a maintenance draft is refused."""
    plan = api.post(f"/api/v1/disks/{q(args.host)}/reset", {"dry_run": True})
    if not confirmed(args, f"disk reset {args.host}", plan["would_remove"]):
        if args.json:
            print(json.dumps(plan, indent=2, sort_keys=True))
        return EXIT_REFUSED
    res = api.post(f"/api/v1/disks/{q(args.host)}/reset", {})
    emit(args, res, f"{res['mac']}: disk discarded (removed: {'; '.join(res['removed']) or 'nothing'}); "
                    f"the next boot starts clean")
    return 0


def cmd_commit(args: argparse.Namespace, api: ApiClient) -> int:
    res = api.post(f"/api/v1/disks/{q(args.host)}/commit", {"note": args.note or "", "force": args.force})
    emit(args, res, f"{res['mac']}: layer committed as draft {res['draft']} (seal it to make a snapshot)")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("disk", parents=[common], help="hosts' NBD disks: list, boot, reset, commit")
    dsub = p.add_subparsers(dest="disk_cmd", metavar="ACTION")
    dsub.required = True
    x = dsub.add_parser("list", parents=[common],
                        help="each export: host, snapshot, overlay size, connected, bytes read/written, since")
    x.set_defaults(func=cmd_list)
    x = dsub.add_parser("boot", parents=[common], help="prepare a fresh disk for HOST now (what its menu fetch does)")
    x.add_argument("host", help="host name or MAC")
    x.add_argument("--snapshot", help="snapshot (IMAGE@vN, id); default: what the host boots")
    x.set_defaults(func=cmd_boot)
    x = dsub.add_parser("reset", parents=[common], help="discard HOST's disk changes (its persistent layer)")
    x.add_argument("host", help="host name or MAC")
    x.add_argument("--yes", action="store_true", help="go ahead without asking (else: list what goes, ask at a TTY)")
    x.set_defaults(func=cmd_reset)
    x = dsub.add_parser("commit", parents=[common], help="turn HOST's persistent layer into a draft of its image")
    x.add_argument("host", help="host name or MAC")
    x.add_argument("--note", help="reason recorded with the draft")
    x.add_argument("--force", action="store_true", help="even while the host is connected (cuts it off)")
    x.set_defaults(func=cmd_commit)
