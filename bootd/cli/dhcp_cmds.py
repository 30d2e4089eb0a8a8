"""bootctl leases, reserve, unreserve: the DHCP lease table and run-time reservations."""
from __future__ import annotations

import argparse
import time

from bootd.cli.api_client import ApiClient, q
from bootd.cli.bootctl import EXIT_REFUSED, confirmed, emit, fmt_age, table
from bootd.macaddr import normalize_mac


def cmd_leases(args: argparse.Namespace, api: ApiClient) -> int:
    data = api.get("/api/v1/dhcp/leases" + ("?all=1" if args.all else ""))
    now = data.get("now", time.time())
    rows = [[lease["ip"], lease["mac"], lease["state"], lease["hostname"],
             ("in " + fmt_age(lease["expires"] - now)) if lease["expires"] > now else "expired"]
            for lease in data["leases"]]
    emit(args, data, table(rows, ["IP", "MAC", "STATE", "HOSTNAME", "EXPIRES"]) if rows else "no leases")
    return 0


def cmd_reserve(args: argparse.Namespace, api: ApiClient) -> int:
    if args.ip is None:
        data = api.get("/api/v1/dhcp/reservations")
        rows = [[r["mac"], r["ip"], r["name"], r["source"]] for r in data["reservations"]]
        emit(args, data, table(rows, ["MAC", "IP", "NAME", "SOURCE"]) if rows else "no reservations")
        return 0
    res = api.post("/api/v1/dhcp/reservations", {"mac": args.mac, "ip": args.ip, "name": args.name})
    emit(args, res, f"{res['mac']} will always get {res['ip']}")
    return 0


def cmd_unreserve(args: argparse.Namespace, api: ApiClient) -> int:
    try:
        mac = normalize_mac(args.mac)
    except ValueError:
        mac = args.mac
    rows = [r for r in api.get("/api/v1/dhcp/reservations")["reservations"] if r["mac"] == mac]
    plan = [f"reservation {r['mac']} -> {r['ip']} ({r['source']})" for r in rows]
    if plan and not confirmed(args, f"unreserve {args.mac}", plan):  # none: the API says why
        return EXIT_REFUSED
    res = api.delete(f"/api/v1/dhcp/reservations/{q(args.mac)}")
    emit(args, res, f"reservation of {args.mac} removed")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("leases", parents=[common], help="DHCP leases (active ones; --all for every row)")
    p.add_argument("--all", action="store_true", help="include released, expired and declined rows")
    p.set_defaults(func=cmd_leases)
    p = sub.add_parser("reserve", parents=[common], help="give a MAC a fixed address (no IP: list reservations)")
    p.add_argument("mac", nargs="?", help="the PC's MAC address")
    p.add_argument("ip", nargs="?", help="the address it always gets")
    p.add_argument("--name", help="a note: the PC's name")
    p.set_defaults(func=cmd_reserve)
    p = sub.add_parser("unreserve", parents=[common], help="remove a run-time reservation")
    p.add_argument("mac")
    p.add_argument("--yes", action="store_true", help="go ahead without asking")
    p.set_defaults(func=cmd_unreserve)
