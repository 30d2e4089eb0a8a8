"""How long stock iPXE takes to get going with and without bootd's router advertisement responder.

    sudo .venv/bin/python benchmarks/dhcp/ipxe_ra.py [--repeat 1]

A QEMU PC (TCG, the Debian iPXE e1000 ROM, BIOS) boots from the network against bootd in full mode
on a lab bridge; the time is from QEMU's start until iPXE prints the file name it is going to fetch,
i.e. until its network configuration (DHCP and IPv6 autoconfiguration) is done. Runs with
`dhcp.router_advertisements` true and false, in alternation, and prints the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from netns import Lab  # noqa: E402


def boot_once(ra: bool, work: Path, mac: str) -> float:
    lab = Lab()
    try:
        cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
               "dhcp": {"mode": "full", "router_advertisements": ra,
                        "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.199"}]},
               "tftp": {"enabled": False}, "nbd": {"enabled": False},
               "storage": {"directory": str(work / "storage")}, "api": {"socket": str(work / "api.sock")},
               "log": {"level": "warning"}}
        (work / "bootd.yaml").write_text(yaml.safe_dump(cfg))
        bootd = lab.server.popen([sys.executable, "-m", "bootd.cli.bootd_main", "--config", str(work / "bootd.yaml"),
                                  "run"], stdout=open(work / "bootd.log", "ab"), stderr=subprocess.STDOUT,
                                 cwd=str(ROOT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ":67 " not in lab.server.run(["ss", "-uln"]).stdout + " ":
            if bootd.poll() is not None:
                raise RuntimeError("bootd exited")
            time.sleep(0.2)
        time.sleep(1.0)  # the bridge's link-local address must be past DAD to send RAs
        tap = lab.add_tap()
        log = work / "serial.log"
        if log.exists():
            log.unlink()
        t0 = time.monotonic()
        qemu = lab.server.popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-monitor", "none",
                                 "-serial", f"file:{log}", "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                                 "-device", f"e1000,netdev=n0,mac={mac}", "-boot", "n"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = -1.0
        while time.monotonic() - t0 < 120:
            if log.exists() and "Filename:" in log.read_text(errors="replace"):
                took = time.monotonic() - t0
                break
            time.sleep(0.1)
        qemu.kill()
        return took
    finally:
        lab.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    times: dict[str, list[float]] = {"with_ra": [], "without_ra": []}
    for i in range(a.repeat):
        for ra in (True, False):
            with tempfile.TemporaryDirectory() as t:
                took = boot_once(ra, Path(t), "52:54:00:77:fa:%02x" % i)
            key = "with_ra" if ra else "without_ra"
            times[key].append(took)
            print(f"{key}: {took:.1f} s until iPXE has its boot file name", file=sys.stderr, flush=True)
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in times.items()} | {"runs": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
