#!/usr/bin/env python3
"""Snapshot operations cost O(1) in the disk size: draft, snapshot (draft + seal) and rollback on 1 GiB
and 20 GiB sparse images, against `cp --sparse=always` of the same image (the naive way to keep a copy),
measured in the same run. Medians of N runs; prints a table with the ratios. No assertions.

    .venv/bin/python benchmarks/snapshots/run.py [--runs 5] [--data-mb 256] [--sizes 1,20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bootd.state import StateStore  # noqa: E402
from snapshots.store import SnapshotStore  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def make_image(path: Path, size: int, data_mb: int) -> None:
    """A sparse raw disk of `size` with a DOS partition table and `data_mb` MiB of data spread over it."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(446)
        f.write(struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", 2048, size // 512 - 2048))
        f.write(b"\0" * 48 + b"\x55\xaa")
        chunk = os.urandom(MiB)
        step = max(MiB, (size - 2 * MiB) // max(1, data_mb))
        for i in range(data_mb):
            f.seek(MiB + i * step)
            f.write(chunk)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(work: Path, size_gib: int, runs: int, data_mb: int) -> dict[str, list[float]]:
    d = work / f"{size_gib}g"
    d.mkdir()
    raw = d / "disk.raw"
    make_image(raw, size_gib * GiB, data_mb)
    state = StateStore(d / "state.db")
    store = SnapshotStore(state, d / "snapshots")
    out: dict[str, list[float]] = {k: [] for k in ("import", "draft", "snapshot", "promote", "rollback",
                                                   "cp_raw", "cp_qcow2")}
    out["import"].append(timed(lambda: store.import_image("img", str(raw), "bench")))
    v1 = store.resolve("img@v1")
    store.promote(v1.id, None, "bench")
    for i in range(runs):
        out["draft"].append(timed(lambda: store.draft("img@v1", "bench")))

        def snapshot(i: int = i) -> None:
            dr = store.draft("img@v1", "bench")
            store.seal(dr.id, f"run {i}", "bench")
        out["snapshot"].append(timed(snapshot))
        latest = store.resolve("img@latest")
        out["promote"].append(timed(lambda latest=latest: store.promote(latest.id, None, "bench")))
        out["rollback"].append(timed(lambda: store.rollback("img", None, "bench")))
        for src, key in ((raw, "cp_raw"), (Path(v1.path), "cp_qcow2")):
            dst = d / f"copy-{key}"
            cp = ["cp", "--sparse=always", str(src), str(dst)]
            out[key].append(timed(lambda cp=cp: subprocess.run(cp, check=True)))
            dst.unlink()
    state.close()
    shutil.rmtree(d)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data-mb", type=int, default=256, help="MiB of data in each image")
    ap.add_argument("--sizes", default="1,20", help="image sizes in GiB")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir on /var/tmp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bootd-bench-snap-", dir=args.dir or "/var/tmp"))
    try:
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            res = bench_size(work, size, args.runs, args.data_mb)
            med = {k: statistics.median(v) for k, v in res.items() if v}
            rows.append((size, med))
        print(f"snapshot store vs cp --sparse=always; sparse raw images with {args.data_mb} MiB of data; "
              f"medians of {args.runs} (import: 1 run)")
        print(f"{'size':>6} {'operation':<10} {'bootd ms':>10} {'cp raw ms':>10} {'cp qcow2 ms':>12} {'cp/bootd':>9}")
        for size, med in rows:
            for op in ("draft", "snapshot", "promote", "rollback", "import"):
                ratio = med["cp_qcow2"] / med[op]
                print(f"{size:>4}Gi {op:<10} {med[op] * 1000:>10.1f} {med['cp_raw'] * 1000:>10.1f} "
                      f"{med['cp_qcow2'] * 1000:>12.1f} {ratio:>8.1f}x")
        print("ratio = cp of the qcow2 snapshot file / bootd operation (higher = bootd faster); draft, "
              "snapshot and rollback should stay flat from 1 to 20 GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
