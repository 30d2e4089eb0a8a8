#!/usr/bin/env python3
"""HTTP boot files: a 64 MiB initrd from bootd and from nginx, fetched with curl, in the same run.

Both servers run on the loopback of a private network namespace (so no port on the host is taken),
each pinned to the same CPU, curl pinned to the same other CPU; fetches alternate between the servers
so load on the shared machine hits both alike. Prints MB/s (median of N) and the bootd/nginx ratio
(target >= 0.8). Also a keep-alive run (16 fetches of a 1 MiB loader over one connection) and a room
booting at once (PARALLEL concurrent fetches of the initrd: aggregate MB/s, and every byte must arrive).
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from netns import Netns  # noqa: E402
from support import BootdProcess  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
PARALLEL = int(os.environ.get("BENCH_PARALLEL", "16"))
SIZE = 64 * 1024 * 1024
BOOTD_PORT, NGINX_PORT = 8080, 8081
SERVER_CPU, CLIENT_CPU = "0", "1" if (os.cpu_count() or 1) > 1 else "0"

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 15;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /boot/files/ {{ alias {root}/; }}
    }}
}}
"""


def curl_speed(ns: Netns, urls: list[str]) -> list[float]:
    argv = ["taskset", "-c", CLIENT_CPU, "curl", "-sS", "-f"]
    for u in urls:
        argv += ["-o", "/dev/null", "-w", "%{speed_download}\\n", u]
    out = ns.run(argv, timeout=300).stdout
    return [float(x) / 1e6 for x in out.split()]


def parallel_speed(ns: Netns, url: str, n: int) -> tuple[float, int]:
    """n concurrent fetches: aggregate MB/s and how many arrived complete."""
    argv = ["taskset", "-c", CLIENT_CPU, "curl", "-sS", "--parallel", "--parallel-max", str(n)]
    for _ in range(n):
        argv += ["-o", "/dev/null", "-w", "%{size_download}\\n", url]
    t0 = time.monotonic()
    out = ns.run(argv, timeout=600, check=False).stdout
    wall = time.monotonic() - t0
    sizes = [int(float(x)) for x in out.split()]
    return sum(sizes) / wall / 1e6, sum(1 for x in sizes if x == SIZE)


def wait_port(ns: Netns, port: int) -> None:
    for _ in range(100):
        if ns.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"], check=False).returncode != 7:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (network namespace)", file=sys.stderr)
        return 1
    nginx = shutil.which("nginx")
    if not nginx:
        print("nginx is not installed (Debian nginx-light)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    ns = Netns()
    bootd = None
    try:
        root = tmp / "storage" / "boot"
        root.mkdir(parents=True)
        with open(root / "initrd.img", "wb") as f:
            for _ in range(SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        (root / "undionly.kpxe").write_bytes(os.urandom(1 << 20))
        (tmp / "nginx").mkdir()
        conf = tmp / "nginx" / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp / "nginx", port=NGINX_PORT, root=root))
        ns.popen(["taskset", "-c", SERVER_CPU, nginx, "-c", str(conf), "-p", str(tmp / "nginx")],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config = {"interfaces": [{"name": "lo", "address": "127.0.0.1/8"}],
                  "http": {"port": BOOTD_PORT, "max_connections_per_ip": max(16, PARALLEL)},
                  "tftp": {"enabled": False}, "dhcp": {"mode": "off"},
                  "nbd": {"enabled": False}, "storage": {"directory": str(tmp / "storage")},
                  "images": [{"name": "debian", "kernel": "undionly.kpxe", "initrd": "initrd.img"}]}
        (tmp / "bootd").mkdir()
        bootd = BootdProcess(tmp / "bootd", config, ns=ns)
        bootd.start()
        subprocess.run(["taskset", "-a", "-p", "-c", SERVER_CPU, str(bootd.proc.pid)], check=True,
                       capture_output=True)
        wait_port(ns, NGINX_PORT)
        urls = {"bootd": f"http://127.0.0.1:{BOOTD_PORT}/boot/files/initrd.img",
                "nginx": f"http://127.0.0.1:{NGINX_PORT}/boot/files/initrd.img"}
        for url in urls.values():  # warm the page cache and both servers
            curl_speed(ns, [url])
        speeds: dict[str, list[float]] = {"bootd": [], "nginx": []}
        for i in range(RUNS):
            order = ("bootd", "nginx") if i % 2 == 0 else ("nginx", "bootd")
            for name in order:
                speeds[name] += curl_speed(ns, [urls[name]])
        small = {name: curl_speed(ns, [url.replace("initrd.img", "undionly.kpxe")] * 16)
                 for name, url in urls.items()}

        par = {}
        for name in ("bootd", "nginx", "bootd", "nginx"):
            mbps, ok = parallel_speed(ns, urls[name], PARALLEL)
            prev = par.get(name)
            par[name] = max(prev, (mbps, ok)) if prev else (mbps, ok)

        med = {k: statistics.median(v) for k, v in speeds.items()}
        ratio = med["bootd"] / med["nginx"]
        print(f"64 MiB initrd over loopback, curl, median of {RUNS} (min-max):")
        for k in ("bootd", "nginx"):
            print(f"  {k:6s} {med[k]:8.0f} MB/s   ({min(speeds[k]):.0f}-{max(speeds[k]):.0f})")
        print(f"  ratio bootd/nginx: {ratio:.2f}  (target >= 0.8: {'OK' if ratio >= 0.8 else 'BELOW'})")
        smed = {k: statistics.median(v) for k, v in small.items()}
        print("1 MiB loader x16 over one keep-alive connection, median:")
        for k in ("bootd", "nginx"):
            print(f"  {k:6s} {smed[k]:8.0f} MB/s")
        print(f"  ratio bootd/nginx: {smed['bootd'] / smed['nginx']:.2f}")
        print(f"{PARALLEL} concurrent 64 MiB fetches (best of 2), aggregate:")
        for k in ("bootd", "nginx"):
            print(f"  {k:6s} {par[k][0]:8.0f} MB/s   complete {par[k][1]}/{PARALLEL}")
        print(f"  ratio bootd/nginx: {par['bootd'][0] / par['nginx'][0]:.2f}")
        return 0
    finally:
        if bootd is not None:
            bootd.close()
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
