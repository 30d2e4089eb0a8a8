"""`bootd`: run the daemon, check a config file, or restore the state database from a backup."""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path
from typing import Optional

from bootd import __version__
from bootd.cli.text import escape_controls
from bootd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def _restore(args: argparse.Namespace) -> int:
    """bootd restore FILE: the way back from `bootctl backup FILE` (see README, Backup and restore)."""
    from bootd.state import StateError, restore_state_file
    if args.storage:
        storage = Path(args.storage)
    else:
        try:
            storage = load_config(args.config).storage_dir
        except ConfigError as e:
            for problem in e.problems:
                print(escape_controls(str(problem)), file=sys.stderr)
            print(f"bootd restore: cannot read {args.config} for storage.directory (or give --storage DIR)",
                  file=sys.stderr)
            return 1
    if not storage.is_dir():
        print(f"bootd restore: storage directory {storage} does not exist", file=sys.stderr)
        return 1
    try:
        done = restore_state_file(args.file, storage / "state.db")
    except (StateError, OSError) as e:
        print(escape_controls(f"bootd restore: {e}"), file=sys.stderr)
        return 1
    rows = ", ".join(f"{n} {t}" for t, n in sorted(done["rows"].items()) if n)
    print(f"restored {done['restored']} from {done['from']} (schema {done['schema_version']}: {rows or 'no rows'})")
    for old in done["moved_aside"]:
        print(f"  the previous file is kept as {old}")
    print(f"if the sealed snapshot layers were lost too, put back {storage / 'snapshots'} from the same backup "
          f"before starting bootd")
    return 0


INSTANCE_LOCK = "bootd.lock"
_instance_lock: Optional[int] = None  # held (open, flock'ed) for the life of `bootd run`


def _take_instance_lock(config_path: str) -> Optional[str]:
    """One bootd per storage directory: flock `<storage>/bootd.lock` before the daemon touches anything
    (a second one would replace the first's qemu-storage-daemon and share its state database).
    Returns why it cannot run (naming the running pid), or None with the lock held until exit. A config
    that does not load is left to the daemon, which reports every problem with its FILE:LINE."""
    global _instance_lock
    try:
        storage = load_config(config_path).storage_dir
    except ConfigError:
        return None
    try:
        storage.mkdir(parents=True, exist_ok=True)
        fd = os.open(storage / INSTANCE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        return f"cannot open the instance lock {storage / INSTANCE_LOCK}: {e}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return (f"another bootd (pid {holder}) is running on storage directory {storage} "
                f"(lock {storage / INSTANCE_LOCK}); stop it first (systemctl stop bootd) or use another "
                "storage.directory")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _instance_lock = fd
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bootd", description="Network-boot server for computer labs.")
    p.add_argument("--version", action="version", version=f"bootd {__version__}")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, help="config file (default %(default)s)")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the daemon (the default)")
    chk = sub.add_parser("check-config", help="validate a config file and print every problem")
    chk.add_argument("file", nargs="?", help="the file (default: --config)")
    rst = sub.add_parser("restore", help="put a `bootctl backup` file in place of the state database (bootd stopped)",
                         description="Checks FILE is a bootd state database this bootd can read, refuses while a "
                                     "bootd (or anything) has the state database open, moves the old state.db "
                                     "aside as state.db.before-restore-TIME and copies FILE in its place.")
    rst.add_argument("file", help="the backup, from `bootctl backup FILE`")
    rst.add_argument("--storage", help="the storage directory holding state.db (default: the config's "
                                       "storage.directory)")
    args = p.parse_args(argv)

    if args.cmd == "restore":
        return _restore(args)

    if args.cmd == "check-config":
        path = args.file or args.config
        try:
            cfg = load_config(path)
        except ConfigError as e:
            for problem in e.problems:
                print(escape_controls(str(problem)), file=sys.stderr)  # values quoted from the file
            print(f"{path}: {len(e.problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"{path}: OK ({len(cfg.interfaces)} interfaces, {len(cfg.groups)} groups, "
              f"{len(cfg.hosts)} hosts, {len(cfg.images)} images, dhcp {cfg.dhcp.mode})")
        return 0

    refused = _take_instance_lock(args.config)
    if refused is not None:
        print(escape_controls(f"bootd run: {refused}"), file=sys.stderr)
        return 1
    from bootd.daemon import run_daemon
    return run_daemon(args.config)


if __name__ == "__main__":
    sys.exit(main())
