#!/usr/bin/env python3
"""`make demo`: one virtual lab PC boots from bootd, and you see how.

Builds the client assets if needed (scripts/build-assets.sh), starts bootd inside a private network
namespace (bridge 10.77.0.1/24, generated config), imports the demo OS image with `bootctl image import`,
promotes it, switches on a QEMU lab PC (SeaBIOS + iPXE NIC ROM; OVMF with --uefi; OVMF with Secure
Boot on and Microsoft's keys with --secureboot, in a `secureboot: true` room: shim, signed GRUB, signed
kernel) and prints its boot timeline (DHCP, loader, menu, kernel, initrd, disk, from bootd's boot events
and the PC's serial console) and the marker the PC read from its disk. Everything is removed afterwards,
also on failure or Ctrl-C. Uses the same harness as tests/e2e.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from harness import boot_timeline, ensure_assets, format_timeline, lab_config, running_bootd_lab  # noqa: E402

MAC = "52:54:00:de:00:01"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uefi", action="store_true", help="boot the PC with OVMF (UEFI) instead of SeaBIOS")
    ap.add_argument("--secureboot", action="store_true",
                    help="OVMF with Secure Boot on (Microsoft's keys) in a secureboot: true room")
    ap.add_argument("--keep-logs", metavar="DIR", help="keep the serial log and bootd's log in DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, tap devices)", file=sys.stderr)
        return 1

    print("demo: client assets (Debian kernel, busybox initramfs, demo OS image) ...", flush=True)
    t = time.monotonic()
    assets = ensure_assets()
    print(f"demo:   ready in {time.monotonic() - t:.1f} s: kernel {assets.kernel_version}, {assets.image_a.name}")

    logs = Path(args.keep_logs) if args.keep_logs else Path(tempfile.mkdtemp(prefix="bootd-demo-"))
    try:
        def config(lab):
            groups = [{"name": "lab", "images": ["demo"], "secureboot": True}] if args.secureboot else None
            return lab_config(lab, images={"demo": None}, menu_timeout=0, groups=groups,
                              hosts=[{"mac": MAC, "name": "lab-pc-01", "group": "lab"}])

        print("demo: starting bootd in a private network namespace (bridge br0, 10.77.0.1/24) ...", flush=True)
        with running_bootd_lab(logs, config, assets) as bl:
            print(f"demo:   bootd ready in namespace {bl.lab.server.name}")
            print(f"demo: $ bootctl image import demo {assets.image_a}")
            r = bl.bootctl("image", "import", "demo", str(assets.image_a))
            print("   " + r.stdout.strip().replace("\n", "\n   "))
            print("demo: $ bootctl snapshot promote demo@v1")
            r = bl.bootctl("snapshot", "promote", "demo@v1")
            print("   " + r.stdout.strip().replace("\n", "\n   "))
            firmware = "uefi-secureboot" if args.secureboot else "uefi" if args.uefi else "bios"
            what = {"bios": "SeaBIOS + iPXE ROM", "uefi": "OVMF",
                    "uefi-secureboot": "OVMF, Secure Boot on with Microsoft's keys"}[firmware]
            print(f"demo: switching on lab-pc-01 ({MAC}, {what}, QEMU TCG) ...", flush=True)
            pc = bl.pc("lab-pc-01", mac=MAC, firmware=firmware)
            result = pc.boot(timeout=240)
            rows = boot_timeline(result, bl.events(MAC))
            print("demo: boot timeline of lab-pc-01 (seconds since power-on):")
            print(format_timeline(rows))
            if not result.ok:
                print("demo: the PC did not reach its marker:\n" + result.describe(40), file=sys.stderr)
                return 1
            if args.secureboot:
                print(f"demo: the PC's kernel says Secure Boot is {result.secureboot}")
            print(f"demo: lab-pc-01 got {result.ip}, booted demo@v1 over NBD and read its marker: "
                  f"BOOTD-MARKER: {result.marker} (fresh disk: {'yes' if result.fresh else 'no'}) "
                  f"in {result.elapsed:.1f} s")
            print("demo: $ bootctl hosts lab-pc-01")
            print("   " + bl.bootctl("hosts", "lab-pc-01", check=False).stdout.strip().replace("\n", "\n   "))
        print("demo: bootd stopped, namespaces and lab PC removed")
        return 0
    finally:
        if not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
