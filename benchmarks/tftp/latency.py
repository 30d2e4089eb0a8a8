#!/usr/bin/env python3
"""Server turnaround per ACK on the LAN link: how long after an ACK arrives does the next DATA leave?

Same set-up as run.py (tap relay with 0.5 ms each way, everything pinned to one CPU), one lock-step
curl transfer per server (alone, then both at once), captured with tcpdump on the server's tap:
prints the median and percentiles of ACK -> DATA for bootd and for tftpd-hpa. A profiling aid for the
lock-step ratio; asserts nothing.

    python benchmarks/tftp/latency.py [--blksize 512] [--size-mib 1] [--data-pump c|python]
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))
from netns import Netns  # noqa: E402
from run import BOOTD_PORT, CLIENT_IP, CPU, DELAY_US, HPA_PORT, RELAY_CPU, SERVER_IP, stop_all  # noqa: E402

PORTS = {"bootd": BOOTD_PORT, "tftpd-hpa": HPA_PORT}


def turnarounds(pcap: Path, ports: dict) -> dict:
    """Per server: ACK-in -> next DATA-out gaps in microseconds (from the server side of the link)."""
    r = subprocess.run(["tcpdump", "-nn", "-tt", "-r", str(pcap), "udp"], capture_output=True, text=True)
    last_ack: dict[tuple, float] = {}
    server_of: dict[str, str] = {}
    gaps: dict[str, list[float]] = {k: [] for k in ports}
    span: dict[str, list[float]] = {}
    rrq_at: dict[str, float] = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[1] != "IP":
            continue
        t = float(parts[0])
        src, dst = parts[2], parts[4].rstrip(":")
        size = int(parts[-1]) if parts[-1].isdigit() else 0
        if src.startswith(CLIENT_IP):
            dport = int(dst.rsplit(".", 1)[1])
            for label, p in ports.items():
                if dport == p:
                    server_of[src] = label  # the client's TID belongs to this server's transfer
                    rrq_at[src] = t
            if size == 4:
                last_ack[src] = t
        elif src.startswith(SERVER_IP):
            peer = dst
            if peer in rrq_at:
                print(f"  {server_of[peer]:9s} RRQ to first answer: {(t - rrq_at.pop(peer)) * 1e6:.0f} us")
            if peer in server_of:
                sp = span.setdefault(server_of[peer], [t, t])
                sp[1] = t
            if peer in last_ack and peer in server_of and size > 4:
                gaps[server_of[peer]].append((t - last_ack.pop(peer)) * 1e6)
    for k, (t0, t1) in span.items():
        print(f"  {k:9s} first to last DATA on the wire: {t1 - t0:.4f} s")
    return gaps


def coupling(pcap: Path) -> None:
    """Paired runs: how close in time DATA of the two servers reach the client (a shared relay releases
    frames due within its own wake-up latency together, which locks two lock-step flows to one pace)."""
    r = subprocess.run(["tcpdump", "-nn", "-tt", "-r", str(pcap), "udp"], capture_output=True, text=True)
    arrivals: dict[str, list[float]] = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[1] == "IP" and parts[2].startswith(SERVER_IP) and parts[-1].isdigit() \
                and int(parts[-1]) > 4:
            arrivals.setdefault(parts[2], []).append(float(parts[0]))
    if len(arrivals) != 2:
        return
    a, b = arrivals.values()
    import bisect
    gaps = []
    for t in a:
        i = bisect.bisect_left(b, t)
        near = [abs(t - b[j]) for j in (i - 1, i) if 0 <= j < len(b)]
        gaps.append(min(near) * 1e6)
    gaps.sort()
    within = sum(g < 20 for g in gaps) / len(gaps)
    print(f"paired: DATA of the two servers reach the client within 20 us of each other for {within:.0%} "
          f"of blocks (median gap {statistics.median(gaps):.1f} us)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blksize", type=int, default=512)
    ap.add_argument("--size-mib", type=int, default=1)
    ap.add_argument("--data-pump", default="c")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bootd-lat-"))
    os.chmod(work, 0o755)
    root = work / "root"
    root.mkdir()
    os.chmod(root, 0o755)
    (root / "f").write_bytes(os.urandom(args.size_mib << 20))
    os.chmod(root / "f", 0o644)
    server, client, procs = Netns(), Netns(), []
    try:
        log = open(work / "log", "ab")
        relay_bin = work / "delayrelay"
        subprocess.run(["gcc", "-O2", "-o", str(relay_bin), str(HERE / "delayrelay.c")], check=True)
        relay = server.popen(["taskset", "-c", RELAY_CPU, str(relay_bin), "bsrv0", "bcli0", str(DELAY_US)],
                             stdout=subprocess.PIPE, stderr=log, text=True)
        procs.append(relay)
        assert relay.stdout.readline().startswith("READY")
        server.run(["ip", "link", "set", "bcli0", "netns", client.name])
        server.run(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "bsrv0"])
        client.run(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "bcli0"])
        server.run(["ip", "link", "set", "bsrv0", "up"])
        client.run(["ip", "link", "set", "bcli0", "up"])
        client.run(["ping", "-c", "5", "-i", "0.05", "-q", SERVER_IP], check=False)
        bootd = server.popen(["taskset", "-c", CPU, sys.executable, "-m", "bootd.tftp", "--root", str(root),
                              "--listen", f"0.0.0.0:{PORTS['bootd']}", "--data-pump", args.data_pump],
                             stdout=subprocess.PIPE, stderr=log, cwd=str(REPO), text=True)
        procs.append(bootd)
        assert bootd.stdout.readline().startswith("READY")
        hpa = server.popen(["taskset", "-c", CPU, "/usr/sbin/in.tftpd", "-L", "-s", str(root),
                            "-a", f"0.0.0.0:{PORTS['tftpd-hpa']}"], stdout=log, stderr=log)
        procs.append(hpa)
        time.sleep(0.5)
        for mode in ("alone", "paired"):
            pcap = work / f"{mode}.pcap"
            dump = server.popen(["tcpdump", "-i", "bsrv0", "-s", "64", "-w", str(pcap), "-U", "udp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpcap = work / f"{mode}-client.pcap"
            cdump = client.popen(["tcpdump", "-i", "bcli0", "-s", "64", "-w", str(cpcap), "-U", "udp"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            cmds = {k: ["taskset", "-c", CPU, "curl", "-sS", "--tftp-blksize", str(args.blksize), "-o", "/dev/null",
                        f"tftp://{SERVER_IP}:{p}/f"] for k, p in PORTS.items()}
            t = {}
            if mode == "alone":
                for k, c in cmds.items():
                    t0 = time.perf_counter()
                    client.run(c)
                    t[k] = time.perf_counter() - t0
            else:
                ps = {k: client.popen(c) for k, c in cmds.items()}
                for p in ps.values():
                    p.wait()
            time.sleep(0.5)
            dump.terminate()
            dump.wait()
            cdump.terminate()
            cdump.wait()
            if mode == "paired":
                coupling(cpcap)
            gaps = turnarounds(pcap, PORTS)
            for k, g in gaps.items():
                if not g:
                    print(f"{mode:6s} {k:9s} no samples")
                    continue
                g.sort()
                q = lambda f, g=g: g[min(len(g) - 1, int(f * len(g)))]  # noqa: E731
                print(f"{mode:6s} {k:9s} n={len(g):5d} ACK->DATA us: median {statistics.median(g):6.1f}  "
                      f"p10 {q(0.1):6.1f}  p90 {q(0.9):6.1f}  p99 {q(0.99):7.1f}"
                      + (f"   transfer {t[k]:.3f} s" if k in t else ""), flush=True)
        return 0
    finally:
        stop_all(procs)
        client.close()
        server.close()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
