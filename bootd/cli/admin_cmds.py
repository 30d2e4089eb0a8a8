"""bootctl admin add|passwd|set|remove|list: the accounts of the admin menu at a PC (issue 17) and of the
web dashboard (issue 18). Role `admin` does everything; `viewer` only reads the dashboard.

The password is read at the terminal (asked twice) or, for scripts, as one line from stdin with
--password-stdin; never from the command line, where `ps` and shell history would show it.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import Callable

from bootd.cli.api_client import ApiClient, q
from bootd.cli.bootctl import EXIT_REFUSED, EXIT_USAGE, confirmed, emit, fmt_time, table
from bootd.cli.snapshot_cmds import _actor

BASE = "/api/v1/admins"


class PasswordInputError(Exception):
    pass


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise PasswordInputError("--password-stdin: no line on stdin")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise PasswordInputError("no terminal to ask the password at: use --password-stdin")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise PasswordInputError("the two passwords differ")
    return first


PasswordCommand = Callable[[argparse.Namespace, ApiClient, str], int]


def _with_password(func: PasswordCommand) -> Callable[[argparse.Namespace, ApiClient], int]:
    """The command with the password read first (a usage error, status 2, when there is none)."""
    def run(args: argparse.Namespace, api: ApiClient) -> int:
        try:
            password = _read_password(args)
        except PasswordInputError as e:
            print(f"bootctl: {e}", file=sys.stderr)
            return EXIT_USAGE
        return int(func(args, api, password))
    return run


@_with_password
def cmd_add(args: argparse.Namespace, api: ApiClient, password: str) -> int:
    data = api.post(BASE, {"name": args.name, "password": password, "role": args.role, "actor": _actor()})
    emit(args, data, f"admin {args.name} added ({args.role})")
    return 0


@_with_password
def cmd_passwd(args: argparse.Namespace, api: ApiClient, password: str) -> int:
    data = api.put(f"{BASE}/{q(args.name)}/password", {"password": password, "actor": _actor()})
    emit(args, data, f"admin {args.name}: password changed")
    return 0


def cmd_set(args: argparse.Namespace, api: ApiClient) -> int:
    data = api.patch(f"{BASE}/{q(args.name)}", {"role": args.role, "actor": _actor()})
    emit(args, data, f"admin {args.name}: role {args.role}")
    return 0


def cmd_remove(args: argparse.Namespace, api: ApiClient) -> int:
    plan = [f"admin account {a['name']} (it can no longer open the admin menu)"
            for a in api.get(BASE)["admins"] if a["name"] == args.name]
    if plan and not confirmed(args, f"admin remove {args.name}", plan):  # none: the API says why
        return EXIT_REFUSED
    data = api.delete(f"{BASE}/{q(args.name)}?actor={q(_actor())}")
    emit(args, data, f"admin {args.name} removed")
    return 0


@_with_password
def cmd_loader_hashes(args: argparse.Namespace, api: ApiClient, password: str) -> int:
    """Computed here (no bootd needed): the lines to put under `menu:` for pxelinux and GRUB rooms."""
    from bootd.admins import grub_pbkdf2, sha512_crypt
    data = {"admin_pxelinux_passwd": sha512_crypt(password), "admin_grub_pbkdf2": grub_pbkdf2(password)}
    emit(args, data, "\n".join(f'  {k}: "{v}"' for k, v in data.items()))
    return 0


def cmd_list(args: argparse.Namespace, api: ApiClient) -> int:
    data = api.get(BASE)
    rows = [[a["name"], a.get("role", "admin"), fmt_time(a["created"]), a["created_by"], fmt_time(a["updated"])]
            for a in data["admins"]]
    emit(args, data, table(rows, ["NAME", "ROLE", "CREATED", "BY", "CHANGED"]) if rows else "no admin accounts")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("admin", parents=[common], help="accounts for the admin menu at the PCs")
    s = p.add_subparsers(dest="admin_cmd", metavar="ACTION")
    s.required = True
    for name, func, what in (("add", cmd_add, "add an account"), ("passwd", cmd_passwd, "change a password")):
        a = s.add_parser(name, parents=[common], help=what)
        a.add_argument("name")
        a.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
        if name == "add":
            a.add_argument("--role", choices=("admin", "viewer"), default="admin",
                           help="admin: every action (default); viewer: reads the dashboard, changes nothing")
        a.set_defaults(func=func)
    t = s.add_parser("set", parents=[common], help="change an account's role")
    t.add_argument("name")
    t.add_argument("--role", choices=("admin", "viewer"), required=True)
    t.set_defaults(func=cmd_set)
    h = s.add_parser("loader-hashes", parents=[common],
                     help="hashes of a password for pxelinux (MENU PASSWD) and GRUB (password_pbkdf2) rooms")
    h.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    h.set_defaults(func=cmd_loader_hashes, name="the bootloaders")
    r = s.add_parser("remove", parents=[common], help="remove an account")
    r.add_argument("name")
    r.add_argument("--yes", action="store_true", help="go ahead without asking")
    r.set_defaults(func=cmd_remove)
    s.add_parser("list", parents=[common], help="list the accounts").set_defaults(func=cmd_list)
