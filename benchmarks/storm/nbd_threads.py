#!/usr/bin/env python3
"""Can the disks of a storm be served on more than one CPU? Two probes behind the README's storm section.

1. `iothread`: does this qemu-storage-daemon serve an NBD export from an iothread? qemu 7.2 (Debian 12)
   aborts the whole daemon when a client of such an export disconnects (blockdev-nbd.c
   nbd_blockdev_client_closed: Assertion `qemu_in_main_thread() && nbd_server'). Run it again when
   Debian's qemu changes: "usable" means bootd could serve its exports from one iothread per CPU.
2. `processes`: N clients each reading M MiB at once (256 KiB reads, 4 in flight, as the storm's PCs do)
   from K qemu-nbd processes (K = 1 and 2), on loopback: what a second serving process buys here.

    python benchmarks/storm/nbd_threads.py [--clients 200] [--mib 16] [--rounds 2] [IMAGE]

IMAGE defaults to the test assets' os-A.qcow2 (scripts/build-assets.sh). Every process it starts is its
own, in a temporary directory, and is stopped before it exits.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IHAVEOPT, REQUEST, SIMPLE = 0x49484156454F5054, 0x25609513, 0x67446698
DISCARD = bytearray(1 << 20)


def qmp(sock_path: Path, commands: list[tuple[str, dict]]) -> list[dict]:
    """Runs `commands` over a fresh QMP connection; returns the replies (each {"return": ...} or {"error": ...})."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    out = []
    for cmd, args in [("qmp_capabilities", {})] + commands:
        f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                out.append(msg)
                break
    s.close()
    return out[1:]


def probe_iothread(image: Path, work: Path) -> tuple[bool, str]:
    """Export an overlay of `image` from an iothread, open and close it once with nbdinfo."""
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay)],
                   check=True)
    log = open(work / "qsd.log", "wb")
    qsd = subprocess.Popen(["qemu-storage-daemon", "--chardev", "socket,id=m,path=qmp.sock,server=on,wait=off",
                            "--monitor", "chardev=m", "--object", "iothread,id=iot0",
                            "--nbd-server", "addr.type=unix,addr.path=nbd.sock"],
                           cwd=work, stdout=log, stderr=log)
    try:
        for _ in range(100):
            if (work / "qmp.sock").exists() and (work / "nbd.sock").exists():
                break
            time.sleep(0.05)
        replies = qmp(work / "qmp.sock", [
            ("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                              "file": {"driver": "file", "filename": str(overlay)}}),
            ("block-export-add", {"type": "nbd", "id": "ov", "node-name": "ov", "name": "disk", "writable": True,
                                  "iothread": "iot0", "fixed-iothread": True})])
        if any("error" in r for r in replies):
            return False, f"refused: {replies}"
        info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///disk?socket={work / 'nbd.sock'}"],
                              capture_output=True, text=True)
        time.sleep(0.5)
        if qsd.poll() is not None:
            msg = (work / "qsd.log").read_text(errors="replace").strip().splitlines()
            return False, f"the daemon died (status {qsd.returncode}): {msg[-1] if msg else ''}"
        if info.returncode != 0:
            return False, f"nbdinfo failed: {info.stderr.strip()}"
        return True, f"size {info.stdout.strip()}, daemon still up"
    finally:
        if qsd.poll() is None:
            qsd.terminate()
            qsd.wait(timeout=10)
        log.close()


async def read_export(port: int, mib: int) -> None:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(s, ("127.0.0.1", port))

    async def exact(n: int) -> bytes:
        b = b""
        while len(b) < n:
            d = await loop.sock_recv(s, n - len(b))
            if not d:
                raise EOFError(f"closed after {len(b)} of {n} bytes")
            b += d
        return b

    async def drop(n: int) -> None:
        got = 0
        while got < n:
            try:
                k = s.recv_into(DISCARD, min(len(DISCARD), n - got), socket.MSG_TRUNC)
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_reader(s.fileno(), fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_reader(s.fileno())
                continue
            if not k:
                raise EOFError("closed in a read reply")
            got += k

    try:
        await exact(18)
        await loop.sock_sendall(s, struct.pack(">I", 3))
        name = b"disk"
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        await loop.sock_sendall(s, struct.pack(">QII", IHAVEOPT, 7, len(go)) + go)
        while True:
            _, _, rtype, rlen = struct.unpack(">QIII", await exact(20))
            if rlen:
                await exact(rlen)
            if rtype == 1:
                break
            if rtype & (1 << 31):
                raise RuntimeError(f"NBD_OPT_GO refused: {rtype:#x}")
        size, chunk = mib << 20, 256 << 10
        offsets, handle, pending = list(range(0, size, chunk)), 0, 0
        while offsets or pending:
            while offsets and pending < 4:
                handle += 1
                pending += 1
                await loop.sock_sendall(s, struct.pack(">IHHQQI", REQUEST, 0, 0, handle, offsets.pop(0), chunk))
            magic, err, _ = struct.unpack(">IIQ", await exact(16))
            if magic != SIMPLE or err:
                raise RuntimeError(f"bad read reply {magic:#x} error {err}")
            pending -= 1
            await drop(chunk)
    finally:
        s.close()


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe_processes(image: Path, k: int, clients: int, mib: int) -> dict:
    ports = [free_port() for _ in range(k)]
    procs = [subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-x", "disk", "-b", "127.0.0.1", "-p", str(p), "-t",
                               f"--shared={clients}", "--snapshot", str(image)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    try:
        for p in ports:
            for _ in range(100):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", p)) == 0:
                        break
                time.sleep(0.05)
        cpu0 = [cpu_of(p.pid) for p in procs]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()

        async def all_clients() -> None:
            await asyncio.gather(*(read_export(ports[i % k], mib) for i in range(clients)))

        asyncio.run(all_clients())
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {"processes": k, "clients": clients, "mib": mib, "wall_s": round(wall, 2),
                "server_cpu_s": round(sum(cpu_of(p.pid) - c for p, c in zip(procs, cpu0, strict=True)), 2),
                "client_cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image", nargs="?", default=str(ROOT / ".cache" / "assets" / "images" / "os-A.qcow2"))
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    image = Path(args.image).resolve()
    if not image.is_file():
        print(f"no image {image} (make assets)", file=sys.stderr)
        return 2
    version = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout
    work = Path(tempfile.mkdtemp(prefix="nbd-threads-"))
    try:
        ok, why = probe_iothread(image, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{version.splitlines()[0] if version else 'qemu-storage-daemon'}: NBD export in an iothread: "
          f"{'usable' if ok else 'NOT usable'} ({why})", flush=True)
    for r in range(args.rounds):
        for k in (1, 2):
            print(json.dumps({"round": r + 1, **probe_processes(image, k, args.clients, args.mib)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
