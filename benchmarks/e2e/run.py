#!/usr/bin/env python3
"""Boot benchmark: a QEMU lab PC (TCG) from power-on to its disk marker, served by bootd vs the classic
peer set-up (dnsmasq for DHCP/RA/TFTP + nginx for the iPXE script, kernel and initrd + qemu-nbd for the
disk), in the same run, boots alternating between the two so both see the same machine load.

Prints the median time at which each phase was reached (seconds since power-on) and the bootd/peer ratio
(< 1: bootd faster). Nothing is asserted. `python benchmarks/e2e/run.py [--rounds N] [--uefi]`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from harness import ensure_assets, lab_config, running_bootd_lab, running_peer_lab  # noqa: E402

PHASES = [("dhcp", "firmware has an address"), ("menu", "menu/script loaded"), ("initrd", "kernel+initrd loaded"),
          ("init", "client /init runs"), ("client-dhcp", "client Linux has an address"),
          ("disk", "NBD disk attached"), ("marker", "marker read")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--uefi", action="store_true", help="also boot with OVMF (UEFI loader path)")
    args = ap.parse_args()
    assets = ensure_assets()
    firmwares = ["bios"] + (["uefi"] if args.uefi else [])
    mac = "52:54:00:be:00:01"
    with tempfile.TemporaryDirectory(prefix="bootd-bench-e2e-") as tmp:
        tmp = Path(tmp)
        cfg = lambda lab: lab_config(lab, images={"demo": assets.image_a},  # noqa: E731
                                     hosts=[{"mac": mac, "name": "bench", "group": "lab"}])
        with running_bootd_lab(tmp / "bootd", cfg, assets) as bl, running_peer_lab(tmp / "peer", assets) as peer:
            for fw in firmwares:
                results: dict[str, list] = {"bootd": [], "peer": []}
                pcs = {"bootd": bl.pc(f"bootd-{fw}", mac=mac, firmware=fw),
                       "peer": peer.pc(f"peer-{fw}", mac=mac, firmware=fw)}
                for i in range(args.rounds):
                    for side in ("bootd", "peer"):
                        if side == "peer":
                            peer.fresh_disk()
                        r = pcs[side].boot(timeout=240)
                        results[side].append(r)
                        print(f"  {fw} round {i + 1} {side:5}: {'marker ' + str(r.marker) if r.ok else 'FAILED'} "
                              f"in {r.elapsed:.1f} s", flush=True)
                report(fw, results)
    return 0


def report(fw: str, results: dict) -> None:
    print(f"\nboot to marker, {fw.upper()}, medians of {len(results['bootd'])} (s since power-on)")
    print(f"  {'phase':<30} {'bootd':>8} {'peer':>8} {'ratio':>7}")
    for name, label in PHASES + [("elapsed", "QEMU exit (powered off)")]:
        vals = {}
        for side, rs in results.items():
            xs = [r.elapsed if name == "elapsed" else r.milestones.get(name) for r in rs if r.ok]
            xs = [x for x in xs if x is not None]
            vals[side] = statistics.median(xs) if xs else None
        b, p = vals["bootd"], vals["peer"]
        ratio = f"{b / p:7.2f}" if b and p else "      -"
        fmt = lambda v: f"{v:8.2f}" if v is not None else "       -"  # noqa: E731
        print(f"  {label:<30} {fmt(b)} {fmt(p)} {ratio}")
    fails = {s: sum(not r.ok for r in rs) for s, rs in results.items()}
    if any(fails.values()):
        print(f"  failed boots: {fails}")


if __name__ == "__main__":
    sys.exit(main())
