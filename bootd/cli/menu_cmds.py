"""`bootctl menu HOST`: the boot menu a PC gets now (what it boots by default, what else it may pick)."""
from __future__ import annotations

import argparse
from urllib.parse import quote, urlencode

from bootd.cli.api_client import ApiClient
from bootd.cli.bootctl import emit
from bootd.cli.text import escape_controls


def cmd_menu(args: argparse.Namespace, api: ApiClient) -> int:
    query = {"flavour": args.flavour} if args.flavour else {}
    path = f"/api/v1/hosts/{quote(args.host, safe='')}/menu"
    data = api.get(path + ("?" + urlencode(query) if query else ""), document=args.raw)
    if args.raw:
        print(escape_controls(data["text"], keep_lines=True), end="")
        return 0
    lines = [f"{data['host']} ({data['mac']}): {data['flavour']} menu \"{data['title']}\", "
             f"default {data['default']} after {data['timeout']} s"]
    for it in data["items"]:
        mark = "*" if it["default"] else " "
        what = it["version"] or it["image"] or it["kind"]
        lines.append(f" {mark} {it['key']:<16} {it['title']:<40} {what}")
    for n in data["notes"]:
        lines.append(f"   note: {n}")
    emit(args, data, "\n".join(lines))
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("menu", parents=[common], help="a host's boot menu now (default marked *)")
    p.add_argument("host", help="host name or MAC")
    p.add_argument("--flavour", choices=["ipxe", "pxelinux", "grub"], help="default: the host's own")
    p.add_argument("--raw", action="store_true", help="print the rendered menu file")
    p.set_defaults(func=cmd_menu)
