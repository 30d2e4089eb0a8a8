"""bootctl host list|add|set|move|rename|remove|import|adopt: hosts as data beside the config's (issue 16).

`bootctl hosts` (plural) is the boot timeline; `host` is the admin noun for the host list itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import wraps
from typing import Any, Callable

from bootd.cli.api_client import ApiClient, ApiError, q
from bootd.cli.bootctl import EXIT_REFUSED, confirmed, emit, fmt_age, table
from bootd.cli.text import escape_controls
from bootd.macaddr import normalize_mac

BASE = "/api/v1/host-registry"


Command = Callable[[argparse.Namespace, ApiClient], int]


def _problems_by_line(func: Command) -> Command:
    """A refusal that lists problems (a CSV's bad rows) is printed one problem a line, not as one line."""
    @wraps(func)
    def run(args: argparse.Namespace, api: ApiClient) -> int:
        try:
            return func(args, api)
        except ApiError as e:
            if not (isinstance(e.data, dict) and isinstance(e.data.get("problems"), list)):
                raise
            if getattr(args, "json", False):
                print(json.dumps({"error": str(e), "status": e.status, **e.data}))
            lines = [str(e.data.get("summary", ""))] + [str(p) for p in e.data["problems"]]
            print("bootctl: " + "\n".join(escape_controls(line) for line in lines), file=sys.stderr)
            return EXIT_REFUSED
    return run


def cmd_list(args: argparse.Namespace, api: ApiClient) -> int:
    if args.unknown:
        data = api.get(f"{BASE}/unknown")
        now = time.time()
        rows = [[h["mac"], h["vendor"], h["arch"], h["last_ip"], fmt_age(now - h["first_seen"]) + " ago",
                 fmt_age(now - h["last_seen"]) + " ago"] for h in data["unknown"]]
        emit(args, data, table(rows, ["MAC", "VENDOR", "ARCH", "LAST IP", "FIRST SEEN", "LAST SEEN"])
             if rows else "no unknown PCs have booted")
        return 0
    data = api.get(BASE)
    rows = [[h["mac"], h["name"], h["group"], h["ip"], h["source"]] for h in data["hosts"]]
    text = table(rows, ["MAC", "NAME", "GROUP", "IP", "SOURCE"]) if rows else "no hosts"
    if data["conflicts"]:
        text += "\n\nconflicts (the config file wins):\n" + "\n".join(f"  {c}" for c in data["conflicts"])
    emit(args, data, text)
    return 0


def _show(row: dict[str, Any]) -> str:
    return f"{row['name']} ({row['mac']})" + (f" in {row['group']}" if row.get("group") else "") + \
        (f" at {row['ip']}" if row.get("ip") else "")


@_problems_by_line
def cmd_add(args: argparse.Namespace, api: ApiClient) -> int:
    row = api.post(BASE, {"mac": args.mac, "name": args.name, "group": args.group, "ip": args.ip})
    emit(args, row, f"added {_show(row)}")
    return 0


@_problems_by_line
def cmd_adopt(args: argparse.Namespace, api: ApiClient) -> int:
    row = api.post(f"{BASE}/adopt", {"mac": args.mac, "group": args.group, "name": args.name, "ip": args.ip})
    emit(args, row, f"adopted {_show(row)}: its next boot is its group's")
    return 0


@_problems_by_line
def cmd_set(args: argparse.Namespace, api: ApiClient) -> int:
    body = {k: v for k, v in (("name", args.name), ("group", args.group), ("ip", args.ip)) if v is not None}
    if not body:
        print("bootctl: host set: give --name, --group or --ip", file=sys.stderr)
        return 2
    row = api.request("PATCH", f"{BASE}/{q(args.host)}", body)
    emit(args, row, f"now {_show(row)}")
    return 0


@_problems_by_line
def cmd_move(args: argparse.Namespace, api: ApiClient) -> int:
    row = api.request("PATCH", f"{BASE}/{q(args.host)}", {"group": args.group})
    emit(args, row, f"moved: {_show(row)}")
    return 0


@_problems_by_line
def cmd_rename(args: argparse.Namespace, api: ApiClient) -> int:
    row = api.request("PATCH", f"{BASE}/{q(args.host)}", {"name": args.name})
    emit(args, row, f"renamed: {_show(row)}")
    return 0


def cmd_remove(args: argparse.Namespace, api: ApiClient) -> int:
    try:
        key = normalize_mac(args.host)
    except ValueError:
        key = args.host
    rows = [r for r in api.get(BASE)["hosts"] if key in (r["mac"], r["name"]) and r["source"] != "config"]
    plan = [f"registered host {_show(r)} (its group and fixed address; disks and snapshots stay)" for r in rows]
    if plan and not confirmed(args, f"host remove {args.host}", plan):  # none: the API says why
        return EXIT_REFUSED
    res = api.delete(f"{BASE}/{q(args.host)}")
    emit(args, res, f"removed {_show(res['removed'])}")
    return 0


@_problems_by_line
def cmd_import(args: argparse.Namespace, api: ApiClient) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"bootctl: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    res = api.post(f"{BASE}/import", {"csv": text, "dry_run": args.dry_run})
    verb = "would import" if res["dry_run"] else "imported"
    emit(args, res, f"{verb} {res['rows']} hosts ({res['added']} new, {res['replaced']} replaced)")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("host", parents=[common], help="the host list: registered hosts beside the config's, "
                                                      "unknown PCs (bootctl hosts: boot timelines)")
    hs = p.add_subparsers(dest="host_cmd", metavar="ACTION", required=True)
    x = hs.add_parser("list", parents=[common], help="hosts in force and conflicts; --unknown: PCs seen booting")
    x.add_argument("--unknown", action="store_true", help="PCs that booted and no host entry names")
    x.set_defaults(func=cmd_list)
    x = hs.add_parser("add", parents=[common], help="register a PC")
    x.add_argument("mac")
    x.add_argument("name")
    x.add_argument("--group", help="its room (a group of the config)")
    x.add_argument("--ip", help="a fixed address in a served subnet")
    x.set_defaults(func=cmd_add)
    x = hs.add_parser("adopt", parents=[common], help="register an unknown PC that booted (host list --unknown)")
    x.add_argument("mac")
    x.add_argument("--group", help="its room (a group of the config)")
    x.add_argument("--name", help="its name (default pc-<MAC digits>)")
    x.add_argument("--ip", help="a fixed address in a served subnet")
    x.set_defaults(func=cmd_adopt)
    x = hs.add_parser("set", parents=[common], help="change a registered host ('' clears group or ip)")
    x.add_argument("host", help="MAC or name")
    x.add_argument("--name")
    x.add_argument("--group")
    x.add_argument("--ip")
    x.set_defaults(func=cmd_set)
    x = hs.add_parser("move", parents=[common], help="move a registered host to another group")
    x.add_argument("host", help="MAC or name")
    x.add_argument("group")
    x.set_defaults(func=cmd_move)
    x = hs.add_parser("rename", parents=[common], help="rename a registered host")
    x.add_argument("host", help="MAC or name")
    x.add_argument("name")
    x.set_defaults(func=cmd_rename)
    x = hs.add_parser("remove", parents=[common], help="forget a registered host")
    x.add_argument("host", help="MAC or name")
    x.add_argument("--yes", action="store_true", help="go ahead without asking")
    x.set_defaults(func=cmd_remove)
    x = hs.add_parser("import", parents=[common], help="register hosts from a CSV (mac,name,group,ip): "
                                                       "all rows or, if one is bad, none")
    x.add_argument("file")
    x.add_argument("--dry-run", action="store_true", help="check every row, change nothing")
    x.set_defaults(func=cmd_import)
