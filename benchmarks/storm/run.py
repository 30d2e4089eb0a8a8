#!/usr/bin/env python3
"""Boot storm: N lab PCs switched on at once, served by bootd vs the stand-in, same run, same machine.

The stand-in is dnsmasq (DHCP + TFTP) + nginx (HTTP) + qemu-nbd --snapshot (NBD). By default each PC is
a simulated BIOS PC of benchmarks/storm/simpc.py: one Python process drives all N, each in its own network
namespace on one bridge, doing DHCP as a PXE ROM (AF_PACKET, 4/8/16/32 s resends), the TFTP loader, DHCP
as iPXE, the iPXE script (one chain followed), kernel and initrd over HTTP, then the NBD export named on
the kernel line: handshake and `--nbd-mib` MiB read. `--client shell` runs the older real-program PCs
(benchmarks/storm/pc.sh: udhcpc + curl, 2 processes per PC, no NBD). Every run uses MACs neither server
has seen (a room switched on for the first time), every storm starts a fresh server (no lease, no export
left from the one before), and the two servers take turns.

Per server and N it prints: PCs that got an address, PCs that finished the whole sequence, time until the
last one finished, p50/p99 of the per-PC time to its address and to the end, failures by phase, the
server's CPU seconds per program and peak memory, and the ratio bootd / stand-in of the all-done time.
Nothing is asserted. bootd runs at the Nice= of its shipped unit (systemd/bootd.service), dnsmasq, nginx
and qemu-nbd at that of Debian's units (none, 0); `--bootd-nice 0` measures bootd without it.

    python benchmarks/storm/run.py [--pcs 50,200,500] [--rounds 3] [--servers bootd,peer] [--nbd-mib 16]
                                   [--client asyncio|shell] [--json FILE] [--keep DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from harness import (  # noqa: E402
    BootdLab,
    _bootd_process_class,
    ensure_assets,
    lab_config,
    running_peer_lab,
)
from netns import Lab  # noqa: E402
from simpc import Room, SimPC, run_room  # noqa: E402

SUBNET = "10.78.0.0/20"
POOL = ("10.78.1.0", "10.78.15.254")  # 3838 addresses: every MAC of 3 rounds of 50 + 200 + 500 PCs fits
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def start_profiler(pid: int | None, work: Path, seconds: int) -> subprocess.Popen | None:
    """py-spy sampling bootd's threads (wall clock) into work/profile.raw for `seconds`; None: no --profile."""
    if pid is None:
        return None
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                            "--format", "raw", "--rate", "200", "--nonblocking", "--idle", "--threads",
                            "--output", str(work / "profile.raw"), "--duration", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return spy


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def server_usage(lab: Lab, peak: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float], int]:
    """Per program name, CPU seconds used so far and seconds its threads were runnable but waited for
    a CPU (schedstat; bootd's main thread apart), and resident memory now, over every process in the
    server's namespace (bootd and its qemu-storage-daemon and TFTP pump; dnsmasq, nginx and its workers,
    qemu-nbd). `peak`, if given, gets each program's peak resident MiB (VmHWM, summed over its processes;
    every storm starts a fresh server, so that is the storm's peak)."""
    cpu: dict[str, float] = {}
    waited: dict[str, float] = {}
    rss = 0
    for pid in lab.server.pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            cpu[name] = cpu.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            if peak is not None:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[name] = round(peak.get(name, 0.0) + int(line.split()[1]) / 1024, 1)
            for tid in os.listdir(f"/proc/{pid}/task"):
                key = f"{name} main thread" if tid == str(pid) else name
                w = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
                waited[key] = waited.get(key, 0.0) + w
        except (OSError, ValueError, IndexError):
            pass
    return cpu, waited, rss


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What grew by more than 0.05 s between two readings of server_usage."""
    return {k: round(v - before.get(k, 0.0), 2) for k, v in after.items() if v - before.get(k, 0.0) > 0.05}


def renew_macs(lab: Lab) -> None:
    """Give every PC a MAC no server has seen and no address (a fresh room)."""
    for c in lab.clients:
        c.mac = lab.next_mac()
        subprocess.run(["ip", "-n", c.ns.name, "-batch", "-"], check=True, capture_output=True, text=True,
                       input=f"addr flush dev eth0\nlink set eth0 address {c.mac}\n")


def storm(lab: Lab, n: int, work: Path, timeout: float = 240.0, profile: int | None = None) -> dict:
    """Switch on the first `n` PCs at once; wait until each has finished or given up. With `profile`
    (a pid), py-spy samples that process during the storm into work/profile.txt (functions by own time)."""
    renew_macs(lab)
    work.mkdir(parents=True, exist_ok=True)
    lock = work / "power"
    lock.touch()
    hold = open(lock)
    fcntl.flock(hold, fcntl.LOCK_EX)
    procs = []
    try:
        for i, c in enumerate(lab.clients[:n]):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", c.ns.name, "bash", str(HERE / "pc.sh"), str(work / f"pc{i}"), str(lock),
                 str(HERE / "hook.sh")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        time.sleep(1.0 + n / 500)  # every PC reaches its flock
        spy = start_profiler(profile, work, 40)
        cpu0, wait0, _ = server_usage(lab)
        t0 = time.monotonic()
        fcntl.flock(hold, fcntl.LOCK_UN)  # power on
        deadline = t0 + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        wall = time.monotonic() - t0
        cpu1, wait1, rss = server_usage(lab)
        if spy is not None:
            spy.wait(timeout=60)
            summarize_profile(work / "profile.raw", work / "profile.txt")
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait()
        hold.close()
    rows = []
    for i in range(n):
        f = work / f"pc{i}"
        text = f.read_text().strip() if f.exists() else "fail=hung"
        rows.append(dict(kv.split("=", 1) for kv in text.split()))
    got = [int(r["dhcp"]) / 1e6 for r in rows if "dhcp" in r]
    done = [int(r["files"]) / 1e6 for r in rows if r.get("ok")]
    fails: dict[str, int] = {}
    for r in rows:
        if "fail" in r:
            fails[r["fail"]] = fails.get(r["fail"], 0) + 1
    by_program, waiting = grown(cpu0, cpu1), grown(wait0, wait1)
    return {"pcs": n, "addressed": len(got), "done": len(done), "all_done_s": max(done) if done else None,
            "wall_s": wall, "dhcp_p50": pct(got, 0.5), "dhcp_p99": pct(got, 0.99), "done_p50": pct(done, 0.5),
            "done_p99": pct(done, 0.99), "failures": fails, "cpu_s": sum(by_program.values()),
            "cpu_by_program": by_program, "waiting_for_cpu": waiting, "rss_mib": rss / 2**20}


def storm_sim(lab: Lab, room: Room, n: int, work: Path, nbd_mib: float, timeout: float = 300.0,
              profile: int | None = None) -> dict:
    """Switch on the first `n` simulated PCs of `room` at once (benchmarks/storm/simpc.py) and wait until
    each has finished or given up."""
    room.renew_macs()
    # the server namespace outlives its servers: no neighbour entry of an earlier storm's MACs may tie an
    # address to a PC that is not there any more (bootd/peers.py refuses an address two MACs claim)
    subprocess.run(["ip", "-n", lab.server.name, "neigh", "flush", "dev", lab.bridge], capture_output=True)
    work.mkdir(parents=True, exist_ok=True)
    pcs = [SimPC(net, nbd_mib=nbd_mib) for net in room.nets[:n]]
    spy = start_profiler(profile, work, 60)
    cpu0, wait0, _ = server_usage(lab)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    results = asyncio.run(run_room(pcs, timeout=timeout))
    wall = time.monotonic() - t0
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    peak: dict[str, float] = {}
    cpu1, wait1, rss = server_usage(lab, peak)
    if spy is not None:
        spy.wait(timeout=90)
        summarize_profile(work / "profile.raw", work / "profile.txt")
    with open(work / "pcs.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r.as_dict()) + "\n")
    got = [r.marks["dhcp"] for r in results if "dhcp" in r.marks]
    done = [r.marks["done"] for r in results if r.ok]
    fails: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.failed_phase or "?"
            fails[key] = fails.get(key, 0) + 1
    errors: dict[str, int] = {}
    for r in results:
        for phase, why, _t in r.failures:
            k = f"{phase}: {why[:80]}"
            errors[k] = errors.get(k, 0) + 1
    by_program, waiting = grown(cpu0, cpu1), grown(wait0, wait1)
    return {"pcs": n, "addressed": len(got), "done": len(done), "all_done_s": max(done) if done else None,
            "wall_s": wall, "dhcp_p50": pct(got, 0.5), "dhcp_p99": pct(got, 0.99), "done_p50": pct(done, 0.5),
            "done_p99": pct(done, 0.99), "failures": fails, "errors": errors,
            "restarts": sum(r.attempts - 1 for r in results),
            "nbd_mib_read": round(sum(r.nbd_bytes for r in results) / 2**20, 1),
            "cpu_s": sum(by_program.values()), "cpu_by_program": by_program, "waiting_for_cpu": waiting,
            "rss_mib": rss / 2**20, "peak_rss_mib": round(sum(peak.values()), 1), "peak_rss_by_program": peak,
            "client_cpu_s": round(client_cpu, 2)}


def summarize_profile(raw: Path, out: Path, top: int = 40) -> None:
    """py-spy's raw (collapsed stacks) output of the main thread, idle or not, as two tables: functions
    by own samples, and by samples with the function anywhere on the stack (inclusive)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "MainThread" not in stack:  # the event loop's thread: DHCP, TFTP, HTTP
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [f"{total} samples"]
    for title, table in (("own", own), ("inclusive", incl)):
        lines.append(f"\n-- by {title} samples --")
        for f, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * n / max(1, total):5.1f}%  {f}")
    out.write_text("\n".join(lines) + "\n")


def unit_nice() -> int:
    """The Nice= of the shipped unit (systemd/bootd.service): bootd is measured as it is installed."""
    for line in (ROOT / "systemd" / "bootd.service").read_text().splitlines():
        if line.startswith("Nice="):
            return int(line.split("=", 1)[1])
    return 0


def renice(lab: Lab, nice: int) -> None:
    """Every thread of every process in the server's namespace to `nice`, as systemd's Nice= does for
    a unit's processes (threads started later inherit it); and their scheduling group too, as the
    unit's CPUWeight= does for its cgroup: without systemd, the kernel groups tasks by session
    (sched_autogroup), each PC's programs are a session of their own here, and a nice value only
    counts inside its group."""
    for pid in lab.server.pids():
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        except OSError:
            pass  # no autogroup scheduling on this kernel: the threads' nice is all there is
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            except OSError:
                pass


def bootd_storm(lab: Lab, assets, run: Path, n: int, scratch: Path, nice: int, profile: bool, storm_fn,
                overrides: dict | None = None) -> dict:
    """A fresh bootd (new storage: no PC known, no lease, no export) serves one storm of `n` PCs.
    `storm_fn(n, run, profile=pid)` runs the PCs; `overrides` replace top-level config sections."""
    BootdProcess = _bootd_process_class()
    wd = scratch / f"bootd-{run.name}"
    wd.mkdir()
    config = lab_config(lab, images={"demo": assets.image_a}, pool=POOL, log={"level": "warning"},
                        **(overrides or {}))
    d = BootdProcess(wd, config, ns=lab.server)
    try:
        BootdLab.start(lab, lambda cfg, ns=None, start=False: d, assets, run, config)
        renice(lab, nice)
        res = storm_fn(n, run, profile=d.proc.pid if profile else None)
        (run / "bootd-metrics.json").write_text(json.dumps(d.api.get("/api/v1/metrics"), indent=1))
    finally:
        try:
            d.stop(timeout=10)
        finally:
            d.close()
            run.mkdir(parents=True, exist_ok=True)
            (run / "bootd.log").write_text(d.log())
            shutil.rmtree(wd, ignore_errors=True)
    if profile:
        print((run / "profile.txt").read_text()[:4000], flush=True)
    return res


def peer_storm(lab: Lab, assets, run: Path, n: int, nice: int, storm_fn) -> dict:
    """A fresh dnsmasq (no lease) + nginx + qemu-nbd serves one storm of `n` PCs. The peer at its best for
    a storm: no lease cap or TFTP transfer cap below the room, nginx on every CPU, qemu-nbd taking every
    PC at once (--shared)."""
    extra = ["--dhcp-lease-max=10000", "--tftp-max=2000"]
    with running_peer_lab(run.with_name(run.name + "-server"), assets, lab=lab, pool=POOL, extra=extra,
                          nginx_workers="auto", nbd_shared=max(16, n)):
        renice(lab, nice)
        return storm_fn(n, run)


def show(r: dict) -> None:
    fails = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "none"
    end = f"{r['all_done_s']:.1f}" if r["all_done_s"] is not None else "-"
    peak = r.get("peak_rss_by_program")
    mem = (f"peak RSS {r['peak_rss_mib']:.0f} MiB ({', '.join(f'{k} {v:.0f}' for k, v in peak.items())})"
           if peak else f"RSS {r['rss_mib']:.0f} MiB")
    print(f"  {r['server']:5} nice {r['nice']:>3} N={r['pcs']:<3} round {r['round']}: "
          f"address {r['addressed']:>3}/{r['pcs']}, "
          f"done {r['done']:>3}, all done {end} s, address p50/p99 {r['dhcp_p50']:.2f}/{r['dhcp_p99']:.2f} s, "
          f"done p50/p99 {r['done_p50']:.2f}/{r['done_p99']:.2f} s, failures: {fails}, "
          f"server CPU {r['cpu_s']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in r['cpu_by_program'].items())}), "
          f"waited for a CPU ({', '.join(f'{k} {v:.1f}' for k, v in r['waiting_for_cpu'].items())}), "
          f"{mem}" + (f", client CPU {r['client_cpu_s']:.1f} s" if "client_cpu_s" in r else ""), flush=True)
    for k, v in sorted(r.get("errors", {}).items(), key=lambda kv: -kv[1])[:8]:
        print(f"      {v:>4} x {k}", flush=True)


def report(results: list[dict], ns: list[int]) -> None:
    print("\nboot storm summary (medians over rounds; ratio = bootd / stand-in all-done time, < 1: bootd faster)")
    print(f"  {'N':>4} {'server':6} {'addressed':>14} {'done':>14} {'all done s':>10} {'p50 s':>6} {'p99 s':>6} "
          f"{'CPU s':>6} {'peak MiB':>8}  failures")
    for n in ns:
        med: dict[str, dict] = {}
        for side in ("bootd", "peer"):
            rs = [r for r in results if r["server"] == side and r["pcs"] == n]
            if not rs:
                continue
            ends = [r["all_done_s"] for r in rs if r["all_done_s"] is not None]
            fails: dict[str, int] = {}
            for r in rs:
                for k, v in r["failures"].items():
                    fails[k] = fails.get(k, 0) + v
            med[side] = {"addressed": [r["addressed"] for r in rs], "done": [r["done"] for r in rs],
                         "end": statistics.median(ends) if ends else float("nan"),
                         "p50": statistics.median(r["done_p50"] for r in rs),
                         "p99": statistics.median(r["done_p99"] for r in rs),
                         "cpu": statistics.median(r["cpu_s"] for r in rs),
                         "peak": statistics.median(r.get("peak_rss_mib", r["rss_mib"]) for r in rs),
                         "fails": ", ".join(f"{k} {v}" for k, v in sorted(fails.items())) or "-"}
            m = med[side]
            print(f"  {n:>4} {side:6} {'/'.join(map(str, m['addressed'])):>14} {'/'.join(map(str, m['done'])):>14} "
                  f"{m['end']:>10.1f} {m['p50']:>6.1f} {m['p99']:>6.1f} {m['cpu']:>6.1f} {m['peak']:>8.0f}  "
                  f"{m['fails']}")
        if len(med) == 2:
            ratio = med["bootd"]["end"] / med["peer"]["end"]
            if all(d == n for m in med.values() for d in m["done"]):
                print(f"  {n:>4} ratio  all done {ratio:.2f}x")
            else:  # a time to "all done" means little while one of them left PCs unbooted: say so
                print(f"  {n:>4} ratio  all done {ratio:.2f}x of the PCs that finished (booted: bootd "
                      f"{sum(med['bootd']['done'])}, stand-in {sum(med['peer']['done'])} of "
                      f"{n * len(med['bootd']['done'])})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pcs", default="50,200,500", help="room sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default="bootd,peer")
    ap.add_argument("--json", help="write every run's figures here")
    ap.add_argument("--keep", help="keep the PCs' results and the servers' logs in this directory")
    ap.add_argument("--bootd-nice", type=int, default=unit_nice(),
                    help="bootd's nice value (default: Nice= of systemd/bootd.service, as installed)")
    ap.add_argument("--peer-nice", type=int, default=0,
                    help="dnsmasq's and nginx's (default 0: Debian's units set none)")
    ap.add_argument("--client", choices=("asyncio", "shell"), default="asyncio",
                    help="asyncio: simulated PCs of simpc.py, all in this process, with NBD (default); "
                         "shell: udhcpc + curl per PC (pc.sh), no NBD")
    ap.add_argument("--nbd-mib", type=float, default=16.0, help="MiB each PC reads from its disk (asyncio client)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a storm may take")
    ap.add_argument("--bootd-set", action="append", default=[], metavar="SECTION=JSON",
                    help="replace a top-level section of bootd's config, e.g. 'dhcp={...}' (repeatable)")
    ap.add_argument("--profile", action="store_true",
                    help="sample bootd with py-spy during its last storm of the largest room and print where "
                         "its main thread's time went")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still removes its lab
    ns = [int(x) for x in args.pcs.split(",")]
    servers = args.servers.split(",")
    assets = ensure_assets()
    scratch = Path(tempfile.mkdtemp(prefix="bootd-storm-"))
    work = Path(args.keep) if args.keep else scratch / "runs"
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    t = time.monotonic()
    if set(servers) - {"bootd", "peer"}:
        raise SystemExit(f"unknown server in {args.servers!r} (bootd, peer)")
    overrides = {}
    for item in args.bootd_set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    lab = Lab(subnet=__import__("ipaddress").IPv4Network(SUBNET))
    room: Room | None = None
    try:
        if args.client == "asyncio":
            room = Room(lab.server.name, lab.bridge, max(ns))
            room.__enter__()

            def storm_fn(n: int, run: Path, profile: int | None = None) -> dict:
                assert room is not None
                return storm_sim(lab, room, n, run, args.nbd_mib, timeout=args.timeout, profile=profile)
        else:
            lab.add_clients(max(ns))

            def storm_fn(n: int, run: Path, profile: int | None = None) -> dict:
                return storm(lab, n, run, profile=profile)
        print(f"{max(ns)} PCs ({args.client}) on one bridge in {time.monotonic() - t:.1f} s", flush=True)
        for n in ns:
            for r in range(args.rounds):
                for side in servers:  # alternating, so both see the machine in the same state
                    run = work / f"{side}-{n}-{r + 1}"
                    if side == "bootd":
                        res = bootd_storm(lab, assets, run, n, scratch, args.bootd_nice,
                                          args.profile and n == max(ns) and r == args.rounds - 1, storm_fn,
                                          overrides)
                    else:
                        res = peer_storm(lab, assets, run, n, args.peer_nice, storm_fn)
                    res.update(server=side, round=r + 1, client=args.client, nbd_mib=args.nbd_mib,
                               nice=args.bootd_nice if side == "bootd" else args.peer_nice)
                    results.append(res)
                    show(res)
                    if args.json:  # every figure so far, also when a later storm fails
                        Path(args.json).write_text(json.dumps(results, indent=1))
    finally:  # the servers' storage goes; results and logs stay in --keep
        if room is not None:
            room.close()
        lab.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, ns)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
