#!/usr/bin/env python3
"""NBD disks: a bootd export (DiskManager + qemu-storage-daemon, an overlay over the snapshot) against
plain qemu-nbd on the same 1 GiB qcow2 snapshot, in the same run.

Three servers, measured back to back (who goes first rotating), medians of --reps, plus the median of
the per-rep ratios (runs seconds apart, so load drift cancels):
  * bootd: the export exactly as a lab PC gets it (gatekeeper and hand-off into the daemon unless
    --no-gatekeeper or --splicer, the
    daemon's aio mode and overlay format from bootd's defaults: io_uring, qcow2 extended L2);
  * qemu-nbd: plain qemu-nbd (its defaults: aio=threads) on an overlay made by plain `qemu-img create -b`
    over the snapshot, i.e. what `qemu-nbd --snapshot SNAPSHOT` serves. This is the target's comparison;
  * same: qemu-nbd given bootd's aio mode and overlay format, so the bootd/same ratio is the cost of
    bootd's gatekeeper and splicer alone (reported, no target).
Measures:
  * sequential read of the whole disk with nbdcopy (to null:), the median of 3 copies per rep;
  * 4 KiB random read and random write, queue depth 16, fio's nbd engine (libnbd), --seconds each
    (each write run on a fresh overlay: bootd's next boot, a new overlay file for qemu-nbd; the previous
    writer's overlay is deleted and `sync`ed first, and a throw-away write run goes before the three,
    else whoever writes first after the reads is ~2x slower);
  * 50 clients at once, each its own disk (bootd: 50 hosts' exports in one daemon; peer: 50 plain
    qemu-nbd processes), each reading 64 MiB sequentially: aggregate MB/s and the slowest client;
  * boot event to export ready: `prepare_boot` (new overlay, node, export, libnbd check), 50 hosts.
Prints numbers and bootd/qemu-nbd ratios (targets: >= 0.95 each; boot-to-ready < 50 ms); asserts no
times. Everything is killed at the end.

Two links (--link), both sides always on the same one:
  * loopback: servers and clients on 127.0.0.1 (the CPU-bound worst case for bootd's extra relay hop);
  * lan: the servers in a server namespace and the clients in a client namespace, joined by a veth pair
    (10.98.0.1 / 10.98.0.2, no added delay): the path a lab PC's NBD traffic takes through the kernel.
    The namespaces are created for the run and deleted after it.

    python benchmarks/nbd/run.py [--link loopback|lan] [--reps N] [--seconds S] [--quick] [--splicer]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
from bootd.state import StateStore  # noqa: E402
from nbdexport.manager import DiskManager  # noqa: E402
from nbdexport.model import DiskSettings  # noqa: E402
from nbdexport.qsd import StorageDaemon  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
CACHE = REPO / ".cache" / "bench-nbd"

# where the servers listen, where clients connect from, and how client programs are run (set by --link)
SERVER = "127.0.0.1"
CLIENT = "127.0.0.1"
CLIENT_CMD: list[str] = []


class LanLink:
    """A server namespace and a client namespace joined by a veth pair; this thread (and the threads and
    processes it starts afterwards) moves into the server namespace."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.server_ns, self.client_ns = f"bnbds{tag}", f"bnbdc{tag}"
        self.orig = os.open("/proc/self/ns/net", os.O_RDONLY)

    def up(self) -> None:
        global SERVER, CLIENT, CLIENT_CMD
        run = lambda *a: subprocess.run(["ip", *a], check=True)  # noqa: E731
        run("netns", "add", self.server_ns)
        run("netns", "add", self.client_ns)
        run("-n", self.server_ns, "link", "add", "vs0", "type", "veth", "peer", "name", "vc0", "netns",
            self.client_ns)
        for ns, dev, addr in ((self.server_ns, "vs0", "10.98.0.1/24"), (self.client_ns, "vc0", "10.98.0.2/24")):
            run("-n", ns, "addr", "add", addr, "dev", dev)
            run("-n", ns, "link", "set", dev, "up")
            run("-n", ns, "link", "set", "lo", "up")
        from pyroute2 import netns
        netns.setns(self.server_ns)
        SERVER, CLIENT, CLIENT_CMD = "10.98.0.1", "10.98.0.2", ["ip", "netns", "exec", self.client_ns]

    def down(self) -> None:
        try:
            from pyroute2 import netns
            netns.setns(self.orig)
        except Exception:
            pass
        for ns in (self.client_ns, self.server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def free_port() -> int:
    s = socket.socket()
    s.bind((SERVER, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def base_image() -> Path:
    """1 GiB qcow2, every cluster allocated (8 patterns of 128 MiB), made once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "base-1g.qcow2"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "1G"], check=True)
        cmds = []
        for i in range(8):
            cmds += ["-c", f"write -P {0x11 * (i + 1)} {i * 128}M 128M"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(tmp)], check=True, capture_output=True)
        tmp.chmod(0o444)
        tmp.rename(path)
    return path


class QemuNbdPeer:
    """qemu-nbd on its own overlay over the same base (same chain depth as a bootd export).

    Plain (the default): the overlay `qemu-img create -b` makes and qemu-nbd's defaults (aio=threads), i.e.
    what `qemu-nbd --snapshot` on the snapshot does. With aio/subclusters: the same file I/O mode and
    overlay format as bootd's exports, so that the pair differs only in bootd's gatekeeper and splicer."""

    def __init__(self, work: Path, base: Path, name: str = "peer", aio: str | None = None,
                 subclusters: bool = False):
        self.work, self.base, self.name = work, base, name
        self.aio, self.subclusters = aio, subclusters
        self.port = free_port()
        self.proc = None
        self.overlay = work / f"{name}.qcow2"

    def start(self) -> "QemuNbdPeer":
        self.stop()
        if self.overlay.exists():
            self.overlay.unlink()
        opts = ["-o", "extended_l2=on"] if self.subclusters else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, "-b", str(self.base), "-F", "qcow2",
                        str(self.overlay)], check=True)
        aio = [f"--aio={self.aio}"] if self.aio else []
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-b", SERVER, "-p", str(self.port),
                                      "-x", self.name, "--persistent", "--shared=0", *aio, str(self.overlay)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((SERVER, self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("qemu-nbd did not start")

    @property
    def uri(self) -> str:
        return f"nbd://{SERVER}:{self.port}/{self.name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Bootd:
    """The DiskManager exactly as the daemon runs it (with the NBD gatekeeper, connections handed into
    the storage daemon, unless --no-gatekeeper / --splicer), its loop running in a thread as in the
    daemon: the gatekeeper accepts while the clients run. Every host is configured at the clients' address,
    so the gatekeeper's policy runs for real."""

    def __init__(self, work: Path, base: Path, gatekeeper: bool = True, handoff: bool = True):
        self.base = base
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.run_dir = Path(tempfile.mkdtemp(prefix="bnbd", dir="/tmp"))
        self.store = StateStore(work / "state.db")  # its connection may be used from any thread
        settings = DiskSettings(directory=str(work / "disks"), run_dir=str(self.run_dir), listen=SERVER,
                                port=self.port, reap_interval=3600, gatekeeper=gatekeeper, handoff=handoff)
        qsd = StorageDaemon(settings.run_dir, SERVER, self.port)
        self.m = DiskManager(settings, self.store, qsd, resolve_snapshot=lambda mac: None,
                             is_persistent=lambda mac: False, extra_ips=lambda mac: [CLIENT])
        self.run(self.m.start())
        self.n = 0

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def boot(self, mac: str = "52:54:00:aa:00:01"):
        t0 = time.perf_counter()
        exp = self.run(self.m.prepare_boot(mac, str(self.base)))
        return exp, (time.perf_counter() - t0) * 1000

    def settle(self) -> None:
        """Wait for the background teardowns of earlier boots (export, node, overlay file) to end."""
        async def idle():
            while self.m.exports.teardowns:
                await asyncio.gather(*list(self.m.exports.teardowns), return_exceptions=True)
            await asyncio.sleep(0.05)
        self.run(idle())

    def stop(self) -> None:
        try:
            self.run(self.m.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
            self.store.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)



def nbdcopy_mbs(uri: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([*CLIENT_CMD, "nbdcopy", uri, "null:"], check=True)
    return GiB / (time.perf_counter() - t0) / 1e6


def fio_iops(uri: str, rw: str, seconds: int) -> float:
    out = subprocess.run([*CLIENT_CMD, "fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
                          "--iodepth=16", f"--runtime={seconds}", "--time_based", "--size=1G",
                          "--output-format=json", "--randrepeat=0"],
                         check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def fio_many(uris: list[str], size_mb: int = 64) -> tuple[float, float, int]:
    """Every uri read by its own fio job at the same time: (aggregate MB/s, slowest job s, failures)."""
    args = [*CLIENT_CMD, "fio", "--output-format=json", "--ioengine=nbd", "--rw=read", "--bs=256k", "--iodepth=4",
            f"--size={size_mb}M"]
    for i, u in enumerate(uris):
        args += [f"--name=c{i}", f"--uri={u}"]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or "{" not in r.stdout:
        return 0.0, wall, len(uris)
    jobs = json.loads(r.stdout[r.stdout.index("{"):])["jobs"]
    fails = sum(1 for j in jobs if j.get("error"))
    slowest = max(j["read"]["runtime"] for j in jobs) / 1000
    total = sum(j["read"]["io_bytes"] for j in jobs)
    return total / wall / 1e6, slowest, fails


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="1 rep, 3 s fio runs")
    ap.add_argument("--link", choices=("loopback", "lan"), default="loopback",
                    help="loopback: all on 127.0.0.1; lan: clients in their own namespace over a veth pair")
    ap.add_argument("--no-gatekeeper", action="store_true",
                    help="clients straight to qemu-storage-daemon's TCP port (nbd.gatekeeper: false)")
    ap.add_argument("--splicer", action="store_true",
                    help="gatekept connections through the C splicer, not handed into the daemon (nbd.handoff: false)")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.seconds = 1, 3
    for prog in ("qemu-storage-daemon", "qemu-nbd", "nbdcopy", "fio"):
        if shutil.which(prog) is None:
            print(f"missing {prog}: run deps/setup.sh", file=sys.stderr)
            return 2
    base = base_image()
    work = Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    link = LanLink() if a.link == "lan" else None
    bootd = None
    gk_status = None
    peer: dict[str, QemuNbdPeer] = {}
    peers: list[QemuNbdPeer] = []
    servers = ("bootd", "qemu-nbd", "qemu-nbd-same")
    res: dict[str, dict[str, list[float]]] = {k: {who: [] for who in servers}
                                              for k in ("seq_read_MBps", "randread_iops", "randwrite_iops")}
    try:
        if link is not None:
            link.up()
        bootd = Bootd(work, base, gatekeeper=not a.no_gatekeeper, handoff=not a.splicer)
        peer = {"qemu-nbd": QemuNbdPeer(work, base, "peer"),
                "qemu-nbd-same": QemuNbdPeer(work, base, "same", aio=bootd.m.aio, subclusters=bootd.m.s.subclusters)}
        for rep in range(a.reps):
            # rotate who goes first: the machine's load drifts, a fixed order would bias the comparison
            order = servers[rep % 3:] + servers[:rep % 3]
            exp, _ = bootd.boot()
            bootd.settle()  # the previous boot's teardown is not part of what is measured
            uri = {"bootd": exp.uri, **{who: p.start().uri for who, p in peer.items()}}
            for who in order:  # a whole-disk copy takes ~1 s: the median of 3 per rep
                res["seq_read_MBps"][who].append(statistics.median(nbdcopy_mbs(uri[who]) for _ in range(3)))
            for who in order:
                res["randread_iops"][who].append(fio_iops(uri[who], "randread", a.seconds))
            for p in peer.values():
                p.stop()
            # a throw-away write run first: the first writer after the reads is ~2x slower whoever it
            # is (its dirty pages push out the page cache the reads filled; the next writer finds the pages
            # the deleted overlay freed), so without it the measured pair is decided by its order
            warm = QemuNbdPeer(work, base, "warm").start()
            fio_iops(warm.uri, "randwrite", max(1, a.seconds // 2))
            warm.stop()
            warm.overlay.unlink()
            os.sync()
            for who in order:
                # each on a fresh overlay, and the previous writer's overlay deleted first: its ~1 GiB
                # of page cache (dirty, then clean) would otherwise slow down whoever writes next
                if who == "bootd":
                    exp, _ = bootd.boot()
                    bootd.settle()
                    w_uri = exp.uri
                else:
                    w_uri = peer[who].start().uri
                os.sync()
                res["randwrite_iops"][who].append(fio_iops(w_uri, "randwrite", a.seconds))
                if who == "bootd":
                    bootd.boot()  # the next boot discards the written overlay
                    bootd.settle()
                else:
                    peer[who].stop()
                    peer[who].overlay.unlink()
                os.sync()
            print(f"rep {rep + 1} (bootd/qemu-nbd/same): " + ", ".join(
                f"{k} " + "/".join(f"{v[who][-1]:.0f}" for who in servers) for k, v in res.items()), flush=True)

        # boot event -> export ready, for N hosts (the first boot of each)
        bootd.settle()
        times = []
        exports = []
        for i in range(a.clients):
            exp, ms = bootd.boot(f"52:54:00:bb:{i >> 8:02x}:{i & 0xff:02x}")
            times.append(ms)
            exports.append(exp)
        # and a reboot of each (old overlay torn down in the background)
        re_times = []
        for i in range(a.clients):
            exp, ms = bootd.boot(f"52:54:00:bb:{i >> 8:02x}:{i & 0xff:02x}")
            re_times.append(ms)
            exports[i] = exp
        bootd.settle()

        many_b = fio_many([e.uri for e in exports])
        gk_status = bootd.m.status()["gatekeeper"]
        peers = [QemuNbdPeer(work, base, f"p{i}").start() for i in range(a.clients)]
        many_p = fio_many([p.uri for p in peers])
    finally:
        for p in [*peers, *peer.values()]:
            p.stop()
        if bootd:
            bootd.stop()
        if link is not None:
            link.down()
        shutil.rmtree(work, ignore_errors=True)

    g = gk_status or {}
    path = ("connections handed into the daemon" if g.get("handed_off") and not g.get("spliced")
            else "connections through the C splicer" if g.get("spliced") and not g.get("handed_off")
            else f"handed off {g.get('handed_off')}, spliced {g.get('spliced')}")
    print(f"\nNBD benchmark (1 GiB qcow2 snapshot, {a.link} link; bootd = overlay in qemu-storage-daemon"
          f"{', direct' if a.no_gatekeeper else ' behind the gatekeeper, ' + path}"
          f" (aio={bootd.m.aio if bootd else '?'}, subclusters={bootd.m.s.subclusters if bootd else '?'});"
          " qemu-nbd = plain qemu-nbd on an overlay of the same snapshot, as `qemu-nbd --snapshot` makes it;"
          " same = qemu-nbd with bootd's aio and overlay format)")
    print(f"{'measure (medians)':<22}{'bootd':>9}{'qemu-nbd':>10}{'ratio':>7}{'paired':>8}  target (paired)"
          f"{'same':>10}{'paired':>8}")
    report = {"gatekeeper": not a.no_gatekeeper, "data_path": path if not a.no_gatekeeper else "direct",
              "link": a.link, "aio": bootd.m.aio if bootd else None,
              "subclusters": bootd.m.s.subclusters if bootd else None}
    for k, v in res.items():
        b, p, q = med(v["bootd"]), med(v["qemu-nbd"]), med(v["qemu-nbd-same"])
        paired = med([x / y for x, y in zip(v["bootd"], v["qemu-nbd"], strict=True) if y])
        paired_same = med([x / y for x, y in zip(v["bootd"], v["qemu-nbd-same"], strict=True) if y])
        report[k] = {"bootd": b, "qemu-nbd": p, "ratio": b / p, "paired_ratio": paired,
                     "qemu-nbd-same": q, "paired_ratio_same": paired_same, "runs": v}
        verdict = "ok    " if paired >= 0.95 else "MISSED"
        print(f"{k:<22}{b:>9.0f}{p:>10.0f}{b / p:>7.2f}{paired:>8.2f}  >= 0.95 {verdict}"
              f"{q:>10.0f}{paired_same:>8.2f}")
    print(f"{str(a.clients) + ' clients aggregate MB/s':<28}{many_b[0]:>12.0f}{many_p[0]:>12.0f}"
          f"{many_b[0] / many_p[0] if many_p[0] else float('nan'):>8.2f}")
    print(f"{'  slowest client s':<28}{many_b[1]:>12.2f}{many_p[1]:>12.2f}")
    print(f"{'  failed clients':<28}{many_b[2]:>12}{many_p[2]:>12}")
    q = statistics.quantiles(times, n=20)
    rq = statistics.quantiles(re_times, n=20)
    print(f"boot event -> export ready (ms, {a.clients} hosts): first boot median {med(times):.1f} p95 {q[-1]:.1f}"
          f" max {max(times):.1f}; reboot median {med(re_times):.1f} p95 {rq[-1]:.1f} max {max(re_times):.1f}"
          f"  target < 50 {'ok' if q[-1] < 50 else 'MISSED'}")
    report["many"] = {"bootd": many_b, "qemu-nbd": many_p}
    report["boot_to_ready_ms"] = {"median": med(times), "p95": q[-1], "max": max(times),
                                  "reboot_median": med(re_times), "reboot_p95": rq[-1]}
    (CACHE / f"last-report-{a.link}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
