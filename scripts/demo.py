#!/usr/bin/env python3
"""`make demo`: a bootd in a private network namespace.

Stage 1 (foundation): start bootd with configs/example.yaml inside a namespace whose bridge carries the
example's interface, show `bootctl status`, stop it and remove everything. The end-to-end harness
replaces this with a virtual lab PC booting (tests/e2e/harness.py).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import BootdProcess  # noqa: E402
from netns import Netns  # noqa: E402


def main() -> int:
    cfg = yaml.safe_load((ROOT / "configs/example.yaml").read_text())
    iface = cfg["interfaces"][0]
    ns = Netns()
    try:
        ns.run(["ip", "link", "add", iface["name"], "type", "bridge"])
        ns.run(["ip", "addr", "add", iface["address"], "dev", iface["name"]])
        ns.run(["ip", "link", "set", iface["name"], "up"])
        with tempfile.TemporaryDirectory(prefix="bootd-demo-") as tmp:
            cfg["storage"]["directory"] = f"{tmp}/storage"
            cfg["api"]["socket"] = f"{tmp}/api.sock"
            d = BootdProcess(Path(tmp), cfg, ns=ns)
            print(f"demo: starting bootd with configs/example.yaml in namespace {ns.name} ...", flush=True)
            d.start()
            try:
                r = d.bootctl("status")
                print(r.stdout, end="")
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    return 1
            finally:
                rc = d.stop()
                d.close()
            print(f"demo: bootd stopped (exit {rc}); namespace removed")
    finally:
        ns.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
