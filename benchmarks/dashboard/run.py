#!/usr/bin/env python3
"""The Rooms page while 300 PCs boot at once (issue 18): what the live view costs bootd, and whether the
page and bootd's event loop stay responsive.

bootd's HTTP server and live feed (bootd/hostfeed.py) run here as in the daemon, on loopback, with 300
configured PCs in 10 rooms. A simulated storm writes each PC's boot events into the state store (as DHCP,
TFTP and HTTP do): firmware DHCP, loader, iPXE DHCP, script, kernel, initrd, the OS's DHCP, each PC
starting within 5 s, ~2,100 events in ~13 s. W browsers (benchmarks/dashboard/watchers.py, another
process) watch it:
  sse:  the Rooms page's live stream (what the dashboard does);
  poll: GET /api/v1/hosts once a second (the same picture for a dashboard without server push, the
        peer the numbers compare with).
Measured in the same run, for W = 1, 10, 50: bootd's CPU seconds over the storm (minus the storm with no
watcher), when each watcher saw each PC's change after the event that caused it (p50/p99), how many of
the PCs' steps (dhcp, loader, script, kernel, up) each watcher saw at all, whether every
watcher saw all 300 PCs up, the Rooms page's load time (p50/p99), and the event loop's lag (how late a
20 ms timer fires: what the DHCP and TFTP servers on that loop would feel). No assertions.

    .venv/bin/python benchmarks/dashboard/run.py [--pcs 300] [--watchers 1,10,50] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from argon2 import PasswordHasher  # noqa: E402

from bootd.config import parse_config  # noqa: E402
from bootd.daemon import Context  # noqa: E402
from bootd.hostfeed import HostFeed  # noqa: E402
from bootd.http.admin_menu import side_for  # noqa: E402
from bootd.http.app import HttpService  # noqa: E402
from bootd.state import StateStore  # noqa: E402

PASSWORD = "bench-password-1"
# (seconds after the PC's start, kind, detail, the tile it leads to: "state step")
STEPS = [(0.0, "dhcp", {"file": "undionly.kpxe"}, "booting dhcp"),
         (0.8, "loader", {"path": "undionly.kpxe", "proto": "tftp", "outcome": "complete"}, "booting loader ipxe"),
         (2.5, "dhcp", {"file": "http://10.0.0.1/boot/x.ipxe"}, "booting dhcp"),
         (3.3, "script", {"path": "/boot/x.ipxe", "proto": "http"}, "booting script"),
         (4.8, "kernel", {"path": "vmlinuz", "proto": "http", "status": 200}, "booting kernel"),
         (6.5, "initrd", {"path": "initrd.img", "proto": "http", "status": 200}, "up None"),
         (8.0, "dhcp", {}, "up None")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def config(tmp: Path, pcs: int, port: int) -> str:
    rooms = [{"name": f"room{r:02d}"} for r in range(10)]
    hosts = [{"mac": f"52:54:00:ba:{i >> 8:02x}:{i & 0xff:02x}", "name": f"pc{i:03d}",
              "group": f"room{i % 10:02d}"} for i in range(pcs)]
    return json.dumps({"api": {"socket": str(tmp / "api.sock")}, "http": {"enabled": False},
                       "tftp": {"enabled": False}, "dhcp": {"mode": "off"}, "ui": {"listen": f"127.0.0.1:{port}"},
                       "storage": {"directory": str(tmp / "storage")}, "groups": rooms, "hosts": hosts})


async def one_run(mode: str, watchers: int, pcs: int, seed: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bootd-bench-ui-"))
    port = free_port()
    store = StateStore(tmp / "state.db")
    ctx = Context(config=parse_config(config(tmp, pcs, port)), config_path=str(tmp / "bootd.yaml"), store=store)
    side = side_for(ctx)
    side.accounts.hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    side.accounts.add("bench", PASSWORD, by="bench")
    feed, http = HostFeed(), HttpService()
    ctx.services = [feed, http]
    await feed.start(ctx)
    await http.start(ctx)
    storm_s = 5.0 + max(t for t, *_ in STEPS) + 0.3 + 1.0  # the last PC's start, its steps, jitter, a margin
    proc = None
    try:
        if watchers:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).parent / "watchers.py"), "--base", f"http://127.0.0.1:{port}",
                "--user", "bench", "--password", PASSWORD, "--watchers", str(watchers), "--mode", mode,
                "--seconds", str(storm_s + 6), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stderr is not None
            line = await asyncio.wait_for(proc.stderr.readline(), 120)
            if b"ready" not in line:
                raise RuntimeError("the watchers did not start:\n" + (line + await proc.stderr.read()).decode())
            await asyncio.sleep(1.5)  # the streams are open and have their first picture
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        caused: dict[str, list[float]] = {}  # "mac state step" -> when each event leading there was written
        handles: list[asyncio.TimerHandle] = []
        t0 = loop.time()
        for i in range(pcs):
            mac = f"52:54:00:ba:{i >> 8:02x}:{i & 0xff:02x}"
            start = rng.uniform(0, 5)
            for offset, kind, detail, tile in STEPS:
                def write(mac=mac, kind=kind, detail=detail, tile=tile) -> None:
                    store.record_event(mac, kind, detail, nbytes=1000 if kind in ("kernel", "initrd") else None)
                    caused.setdefault(f"{mac} {tile}", []).append(time.time())
                handles.append(loop.call_at(t0 + start + offset + rng.uniform(0, 0.3), write))
        lags: list[float] = []
        cpu0 = time.process_time()
        end = t0 + storm_s
        while loop.time() < end:
            before = loop.time()
            await asyncio.sleep(0.02)
            lags.append(loop.time() - before - 0.02)
        cpu = time.process_time() - cpu0
        assert all(h.cancelled() or h.when() <= loop.time() for h in handles)  # every event was written
        result = {"mode": mode if watchers else "none", "watchers": watchers, "cpu_s": round(cpu, 3),
                  "events": pcs * len(STEPS), "loop_lag_p99_ms": round(pct(lags, 99) * 1000, 1),
                  "loop_lag_max_ms": round(max(lags) * 1000, 1), "feed": dict(feed.counts)}
        if proc is not None:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            data = json.loads(out)
            delays, all_up, shown = [], 0, 0
            for seen in data["seen"]:
                for key, times in caused.items():
                    if key in seen and any(t <= seen[key] for t in times):  # since the latest cause before it
                        delays.append(seen[key] - max(t for t in times if t <= seen[key]))
                        shown += 1
                all_up += sum(1 for i in range(pcs) if f"52:54:00:ba:{i >> 8:02x}:{i & 0xff:02x} up None" in seen)
            result.update({"seen_p50_s": round(pct(delays, 50), 3), "seen_p99_s": round(pct(delays, 99), 3),
                           "saw_all_up": f"{all_up}/{pcs * watchers}",
                           "steps_shown": f"{100 * shown / (len(caused) * watchers):.0f}%",
                           "page_p50_ms": round(pct(data["page_times"], 50) * 1000, 1),
                           "page_p99_ms": round(pct(data["page_times"], 99) * 1000, 1)})
        return result
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await http.stop()
        await feed.stop()
        store.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcs", type=int, default=300)
    ap.add_argument("--watchers", default="1,10,50")
    ap.add_argument("--json", help="write every figure here")
    a = ap.parse_args()
    counts = [int(x) for x in a.watchers.split(",")]
    runs = [("none", 0)] + [(mode, w) for w in counts for mode in ("sse", "poll")]
    await one_run("sse", 1, a.pcs, seed=99)  # a warm-up, not counted: the first run pays imports and caches
    results = []
    for n, (mode, w) in enumerate(runs):
        r = await one_run(mode, w, a.pcs, seed=n)
        results.append(r)
        print(json.dumps(r), flush=True)
    base = results[0]["cpu_s"]
    print(f"\n{a.pcs} PCs booting at once ({results[0]['events']} events in ~13 s); bootd's CPU over the storm "
          f"without any watcher: {base:.2f} s; loop lag p99 {results[0]['loop_lag_p99_ms']} ms\n")
    print("| watchers | how | bootd CPU for the watchers | saw a change after (p50 / p99) | steps shown | saw all up | "
          "Rooms page (p50 / p99) | loop lag p99 / max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    by = {(r["mode"], r["watchers"]): r for r in results}
    for w in counts:
        for mode in ("sse", "poll"):
            r = by[(mode, w)]
            print(f"| {w} | {'live stream (SSE)' if mode == 'sse' else 'polling 1/s'} | {r['cpu_s'] - base:+.2f} s | "
                  f"{r['seen_p50_s']:.2f} / {r['seen_p99_s']:.2f} s | {r['steps_shown']} | {r['saw_all_up']} | "
                  f"{r['page_p50_ms']:.0f} / {r['page_p99_ms']:.0f} ms | "
                  f"{r['loop_lag_p99_ms']:.0f} / {r['loop_lag_max_ms']:.0f} ms |")
        sse, poll = by[("sse", w)], by[("poll", w)]
        extra_sse, extra_poll = sse["cpu_s"] - base, poll["cpu_s"] - base
        if extra_sse > 0:
            print(f"|  | ratio | polling costs {extra_poll / extra_sse:.1f}x the live stream's CPU |  |  |  |  |  |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
