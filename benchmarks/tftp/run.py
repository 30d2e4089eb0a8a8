#!/usr/bin/env python3
"""TFTP throughput: bootd's TFTP server against tftpd-hpa, same files, same clients, same run.

Two links, each in private namespaces: loopback (client and both servers pinned to one CPU: on this
VM a client on the other CPU is ~4x slower because of cross-CPU wake-ups, see FIELD-NOTES) and a
LAN link with 0.5 ms delay each way (also pinned). This kernel has no sch_netem, so the LAN link is two
tap devices joined by delayrelay.c (compiled at run time, on the other CPU), which holds each frame
0.5 ms: the stand-in for "a veth pair with 0.5 ms netem delay each way". Per link: 32 MiB and 1 MiB with
curl blksize 512 and 1468 and atftp blksize 1468 windowsize 16 (tftpd-hpa has no windowsize, so that
row is bootd's windowed transfer against tftpd-hpa's lock-step one). Then 200 concurrent 1 MiB fetches
over the LAN link (curl, blksize 1468, unpinned): aggregate MB/s and failures.
Prints MB/s (MiB counted as 1.048576 MB) for each and the bootd/tftpd-hpa ratio; asserts no times.

Timing on a shared 2-CPU machine: loopback cases alternate bootd and tftpd-hpa run by run (medians);
the LAN lock-step cases run the two servers' transfers at the same time ("paired": both are latency-bound
and nearly idle, and a load spike from elsewhere then hits both alike); the LAN windowed case alternates.

    python benchmarks/tftp/run.py [--quick] [--reps N] [--lan-lockstep paired|alternating|both]
                                  [--data-pump c|python]
--quick leaves out the 32 MiB files on the LAN link (lock-step 512-byte blocks over 1 ms RTT take
over a minute per server).

Paired LAN runs lock the two flows to one pace: they share the relay and the CPU, so a frame of the
faster flow is released with, or queued behind, the slower one's (benchmarks/tftp/latency.py measures
it: most DATA of the two servers reach the client within 20 us of each other). Paired ratios therefore
show a slower server but squash a faster one towards 1.0; `--lan-lockstep alternating` (or `both`)
times the lock-step cases one transfer at a time instead (needs a quiet machine: run under flock).
bootd's TFTP data path is the C pump by default (bootd/tftp/pump.c); `--data-pump python` measures the
pure-Python path.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests"))
from netns import Netns  # noqa: E402

CPU = "1"
RELAY_CPU = "0"
DELAY_US = 500
BOOTD_PORT = 1069
HPA_PORT = 2069
SERVER_IP = "10.88.0.1"
CLIENT_IP = "10.88.0.2"
TARGETS = {"loopback": 0.8, "lan": 1.0, "lan-window": 3.0}


def stop_all(procs: list) -> None:
    """Terminate the benchmark's processes (SIGKILL after 5 s)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def client_argv(kind: str, host: str, port: int, name: str, dest: str) -> list[str]:
    if kind == "curl512":
        return ["curl", "-sS", "--tftp-blksize", "512", "-o", dest, f"tftp://{host}:{port}/{name}"]
    if kind == "curl1468":
        return ["curl", "-sS", "--tftp-blksize", "1468", "-o", dest, f"tftp://{host}:{port}/{name}"]
    if kind == "atftp1468w16":
        return ["atftp", "-g", "-r", name, "-l", dest, "--option", "blksize 1468", "--option", "windowsize 16",
                host, str(port)]
    raise ValueError(kind)


# The timing runs inside the client's namespace so `ip netns exec` is not part of the time. Each round
# starts its commands together (one command: a plain timed run) and reports each one's wall time.
TIMER = r"""
import json, os, subprocess, sys, tempfile, time
cpu, rounds = sys.argv[1], json.loads(sys.argv[2])
if cpu != "-":
    os.sched_setaffinity(0, {int(cpu)})
out = []
for cmds in rounds:
    errs = [tempfile.TemporaryFile() for _ in cmds]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=e) for c, e in zip(cmds, errs)]
    ended = {}
    while len(ended) < len(procs):
        pid, status = os.wait()  # each child's own end time, whichever finishes first
        ended[pid] = (time.perf_counter() - t0, status)
    times = []
    for p, e in zip(procs, errs):
        t, status = ended[p.pid]
        if status != 0:
            e.seek(0)
            print(json.dumps({"error": e.read().decode(errors="replace")[-300:]})); sys.exit(1)
        times.append(t)
    out.append(times)
print(json.dumps({"times": out}))
"""


def timed(ns: Netns, cpu: str, rounds: list[list[list[str]]]) -> list[list[float]]:
    import json
    r = ns.run([sys.executable, "-c", TIMER, cpu, json.dumps(rounds)], check=False, timeout=3600)
    out = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {"error": r.stderr}
    if "error" in out:
        raise RuntimeError(f"{rounds[0]}: {out['error']}")
    return out["times"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="no 32 MiB files over the LAN link")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per case (median reported)")
    ap.add_argument("--links", default="loopback,lan", help="comma-separated subset of loopback,lan")
    ap.add_argument("--kinds", default="curl512,curl1468,atftp1468w16", help="comma-separated client cases")
    ap.add_argument("--no-concurrent", action="store_true", help="leave out the 200 concurrent fetches")
    ap.add_argument("--lan-lockstep", choices=["paired", "alternating", "both"], default="paired",
                    help="how the LAN lock-step cases are timed (see the module doc)")
    ap.add_argument("--data-pump", choices=["c", "python"], default="c", help="bootd's tftp data path")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bootd-bench-tftp-"))
    os.chmod(work, 0o755)
    root = work / "root"
    root.mkdir()
    os.chmod(root, 0o755)
    files = {"32MiB": 32 << 20, "1MiB": 1 << 20}
    for name, size in files.items():
        (root / name).write_bytes(os.urandom(size))
        os.chmod(root / name, 0o644)
    digests = {name: sha(root / name) for name in files}
    out = work / "out"
    out.mkdir()
    os.chmod(out, 0o777)

    server = Netns()
    client = Netns()
    procs = []
    results = []
    try:
        log = open(work / "servers.log", "ab")
        # The LAN link: 0.5 ms each way. This kernel has no sch_netem, so two taps joined by a C relay that
        # holds every frame 0.5 ms stand in for the veth pair with netem (relay on the other CPU).
        relay_bin = work / "delayrelay"
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(relay_bin), str(HERE / "delayrelay.c")], check=True)
        relay = server.popen(["taskset", "-c", RELAY_CPU, str(relay_bin), "bsrv0", "bcli0", str(DELAY_US)],
                             stdout=subprocess.PIPE, stderr=log, text=True)
        procs.append(relay)
        if not relay.stdout.readline().startswith("READY"):
            raise RuntimeError("delay relay did not start")
        server.run(["ip", "link", "set", "bcli0", "netns", client.name])
        server.run(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "bsrv0"])
        client.run(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "bcli0"])
        server.run(["ip", "link", "set", "bsrv0", "up"])
        client.run(["ip", "link", "set", "bcli0", "up"])
        ping = client.run(["ping", "-c", "20", "-i", "0.05", "-q", SERVER_IP], check=False).stdout.strip().splitlines()
        print(f"LAN link (tap relay, {DELAY_US} us each way): {ping[-1] if ping else 'no ping'}", flush=True)

        bootd = server.popen(["taskset", "-c", CPU, sys.executable, "-m", "bootd.tftp", "--root", str(root),
                              "--listen", f"0.0.0.0:{BOOTD_PORT}", "--data-pump", args.data_pump,
                              "--max-sessions-per-client", "200"],  # one client address plays 200 PCs
                             stdout=subprocess.PIPE, stderr=log,
                             cwd=str(REPO), text=True)
        procs.append(bootd)
        if not bootd.stdout.readline().startswith("READY"):
            raise RuntimeError("bootd tftp did not start: " + (work / "servers.log").read_text())
        hpa = server.popen(["taskset", "-c", CPU, "/usr/sbin/in.tftpd", "-L", "-s", str(root),
                            "-a", f"0.0.0.0:{HPA_PORT}"], stdout=log, stderr=log)
        procs.append(hpa)
        time.sleep(0.5)
        if hpa.poll() is not None:
            raise RuntimeError("tftpd-hpa did not start: " + (work / "servers.log").read_text())

        def case(link: str, ns: Netns, host: str, kind: str, fname: str, reps: int, paired: bool) -> None:
            """`reps` rounds. Alternating: bootd, tftpd-hpa, bootd, ... one at a time. Paired: both
            transfers at once in each round, so both see the same load from the rest of the machine."""
            dest = {label: str(out / f"{label}-{link}-{kind}-{fname}") for label in ("bootd", "tftpd-hpa")}
            cmd = {label: client_argv(kind, host, port, fname, dest[label])
                   for label, port in (("bootd", BOOTD_PORT), ("tftpd-hpa", HPA_PORT))}
            times: dict[str, list[float]] = {"bootd": [], "tftpd-hpa": []}
            for _ in range(reps):
                if paired:
                    [[tb, th]] = timed(ns, CPU, [[cmd["bootd"], cmd["tftpd-hpa"]]])
                else:
                    [[tb], [th]] = timed(ns, CPU, [[cmd["bootd"]], [cmd["tftpd-hpa"]]])
                times["bootd"].append(tb)
                times["tftpd-hpa"].append(th)
                for label in dest:
                    if sha(Path(dest[label])) != digests[fname]:
                        raise RuntimeError(f"{label} {link} {kind} {fname}: file differs")
                    os.unlink(dest[label])
            mb = files[fname] / 1e6
            rb, rh = mb / statistics.median(times["bootd"]), mb / statistics.median(times["tftpd-hpa"])
            target = TARGETS["loopback"] if link == "loopback" else (
                TARGETS["lan-window"] if kind.startswith("atftp") else TARGETS["lan"])
            ratio = rb / rh
            results.append((link, fname, kind, rb, rh, ratio, target))
            how = "paired" if paired else "alternating"
            print(f"{link:9s} {fname:6s} {kind:13s} bootd {rb:8.2f} MB/s   tftpd-hpa {rh:8.2f} MB/s   "
                  f"ratio {ratio:6.4f}  (target >= {target})  {'ok' if ratio >= target else 'BELOW'}  "
                  f"[{how}, {reps} rounds]", flush=True)

        for name in files:  # page cache warm for both servers
            (root / name).read_bytes()
        print(f"TFTP: bootd vs tftpd-hpa; medians; client and servers pinned to CPU {CPU}", flush=True)
        links = args.links.split(",")
        kinds = args.kinds.split(",")
        if "loopback" in links:
            # CPU-bound on one CPU: never two transfers at once, alternate them
            for fname in ("32MiB", "1MiB"):
                for kind in kinds:
                    case("loopback", server, "127.0.0.1", kind, fname,
                         args.reps if fname == "32MiB" else 2 * args.reps, paired=False)
        if "lan" in links:
            # lock-step over 1 ms RTT is latency-bound and nearly idle: run the two servers' transfers
            # together (paired) so a load spike from elsewhere hits both; the windowed transfer fills
            # the link, so it alternates instead
            for fname in (("1MiB",) if args.quick else ("32MiB", "1MiB")):
                for kind in kinds:
                    reps = 1 if fname == "32MiB" else args.reps
                    if kind.startswith("atftp"):
                        case("lan", client, SERVER_IP, kind, fname, reps, paired=False)
                        continue
                    if args.lan_lockstep in ("paired", "both"):
                        case("lan", client, SERVER_IP, kind, fname, reps, paired=True)
                    if args.lan_lockstep in ("alternating", "both"):
                        case("lan", client, SERVER_IP, kind, fname, reps if fname == "1MiB" else 2, paired=False)
        if args.no_concurrent:
            return 0

        print("200 concurrent 1 MiB fetches over the LAN link (curl blksize 1468, unpinned):", flush=True)
        agg = {}
        for label, port in (("bootd", BOOTD_PORT), ("tftpd-hpa", HPA_PORT)):
            many = out / f"many-{label}"
            many.mkdir()
            script = (f"for i in $(seq 1 200); do curl -sS --max-time 300 --tftp-blksize 1468 -o {many}/$i "
                      f"tftp://{SERVER_IP}:{port}/1MiB & done; fails=0; "
                      "for j in $(jobs -p); do wait $j || fails=$((fails+1)); done; echo $fails")
            t0 = time.perf_counter()
            r = client.run(["bash", "-c", script], timeout=900)
            wall = time.perf_counter() - t0
            fails = int(r.stdout.strip().splitlines()[-1])
            bad = sum(1 for i in range(1, 201) if not (many / str(i)).exists() or sha(many / str(i)) != digests["1MiB"])
            agg[label] = (200 * files["1MiB"] / 1e6 / wall, fails, bad)
            print(f"  {label:9s} {agg[label][0]:8.2f} MB/s aggregate, {fails} client failures, {bad} wrong files",
                  flush=True)
        print(f"  ratio {agg['bootd'][0] / agg['tftpd-hpa'][0]:.2f}", flush=True)
        below = [r for r in results if r[5] < r[6]]
        print(f"{len(results) - len(below)}/{len(results)} cases meet their target", flush=True)
        return 0
    finally:
        stop_all(procs)
        client.close()
        server.close()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
