"""`bootctl`: the admin CLI. Talks to the running bootd over its HTTP API (Unix socket by default).

Every command takes --json for scripts. Command groups live in their own modules (command_modules()),
each with `register(sub)` adding argparse subparsers whose `func(args, api) -> int`.

Exit status: 0 done, 1 refused (by bootd, with its reason on stderr), 2 usage error (argparse's own),
3 bootd is not running (no socket, or nobody listening on it), so scripts can tell the three apart.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import types
from typing import Any

from bootd import __version__
from bootd.cli.api_client import ApiClient, ApiError
from bootd.cli.text import escape_controls

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def command_modules() -> list[types.ModuleType]:
    """The modules with `register(sub, common)`, imported by name (not looked up from strings). One line per
    component. Imported at call time: each of them imports this module's helpers (emit, table)."""
    from bootd.cli import (
        admin_cmds,
        client_cmds,
        core_cmds,
        dhcp_cmds,
        disk_cmds,
        host_cmds,
        menu_cmds,
        snapshot_cmds,
        wake_cmds,
    )
    return [
        core_cmds,
        client_cmds,  # client helper: client render, clientroot build
        snapshot_cmds,  # snapshot helper: bootctl image ..., bootctl snapshot ...
        disk_cmds,  # NBD helper: bootctl disk list|boot|reset|commit
        dhcp_cmds,  # DHCP helper: bootctl leases, reserve, unreserve
        menu_cmds,  # menus helper: bootctl menu HOST
        wake_cmds,  # issue 16: bootctl wake HOST|--group ROOM, bootctl backup FILE
        host_cmds,  # issue 16: bootctl host list|add|adopt|set|move|rename|remove|import
        admin_cmds,  # issue 17: bootctl admin add|passwd|remove|list (admin menu accounts)
    ]


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print `data` as JSON with --json, else the human text (or a JSON dump if there is none).
    The human text's control characters are escaped (its lines stay): the strings in it came from the
    API already escaped (ApiClient.escape_text), this catches whatever else reached it."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(escape_controls(text, keep_lines=True))


def confirmed(args: argparse.Namespace, what: str, plan: list[str]) -> bool:
    """A destructive command goes ahead only with --yes, or when the admin answers y at a terminal; it
    first lists what it will remove. Without either it says so on stderr (and removes nothing)."""
    if getattr(args, "yes", False):
        return True
    lines = [f"{what} would remove:"] + [f"  {item}" for item in plan or ["nothing"]]
    print(escape_controls("\n".join(lines), keep_lines=True), file=sys.stderr)
    if not getattr(args, "json", False) and sys.stdin.isatty() and sys.stderr.isatty():
        print("go ahead? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return True
    print("nothing removed; add --yes to go ahead", file=sys.stderr)
    return False


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def fmt_number(value: float) -> str:
    """A counter or gauge as digits: 29000000, 0.25; never 2.9e+07."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("0", "-0") else f"{value:.12f}".rstrip("0")


def fmt_value(value: Any) -> str:
    """One value of a status answer, for a table cell: no Python reprs (dicts are flattened by the caller)."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int, float)):
        return fmt_number(value)
    if isinstance(value, list):
        return ", ".join(fmt_value(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt_value(v)}" for k, v in value.items()) or "-"
    return str(value)


def flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as dotted keys (`data_pump.mode`), each with its value formatted by fmt_value."""
    out: list[tuple[str, str]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            out += flatten(item, name + ".")
        else:
            out.append((name, fmt_value(item)))
    return out


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    p = argparse.ArgumentParser(prog="bootctl", description="Control a running bootd.", parents=[common],
                                epilog="exit status: 0 done, 1 refused, 2 usage error, 3 bootd is not running")
    p.add_argument("--version", action="version", version=f"bootctl {__version__}")
    p.add_argument("--socket", default=os.environ.get("BOOTD_SOCKET", "/run/bootd/api.sock"),
                   help="API socket (default %(default)s, or $BOOTD_SOCKET)")
    p.add_argument("--url", default=os.environ.get("BOOTD_URL"), help="API over TCP, e.g. http://10.0.0.1:8081")
    p.add_argument("--token-file", default=os.environ.get("BOOTD_TOKEN_FILE"), help="bearer token for --url")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    p.set_defaults(_common=common)
    for commands in command_modules():
        commands.register(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    # `bootctl --json status` and `bootctl status --json` mean the same (argparse would let the
    # subcommand's default override the top-level flag).
    args.json = bool(getattr(args, "json", False)) or "--json" in argv
    token = None
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            print(f"bootctl: cannot read token file: {e}", file=sys.stderr)
            return EXIT_USAGE
    api = ApiClient(socket_path=args.socket, url=args.url, token=token, escape_text=not args.json)
    try:
        return int(args.func(args, api) or 0)
    except ApiError as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e), "status": e.status}))
        print(escape_controls(f"bootctl: {e}", keep_lines=True), file=sys.stderr)
        return EXIT_NOT_RUNNING if e.not_running else EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
