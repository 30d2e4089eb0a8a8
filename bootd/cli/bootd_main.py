"""`bootd`: run the daemon, or check a config file."""
from __future__ import annotations

import argparse
import sys

from bootd import __version__
from bootd.cli.text import escape_controls
from bootd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bootd", description="Network-boot server for computer labs.")
    p.add_argument("--version", action="version", version=f"bootd {__version__}")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, help="config file (default %(default)s)")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the daemon (the default)")
    chk = sub.add_parser("check-config", help="validate a config file and print every problem")
    chk.add_argument("file", nargs="?", help="the file (default: --config)")
    args = p.parse_args(argv)

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

    from bootd.daemon import run_daemon
    return run_daemon(args.config)


if __name__ == "__main__":
    sys.exit(main())
