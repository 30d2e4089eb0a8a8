"""Make the golden DHCP captures in tests/data/dhcp/ from real clients on this machine.

    sudo .venv/bin/python tests/dhcp/make_golden.py [dhclient udhcpc perfdhcp ipxe-bios ipxe-uefi]

A lab namespace runs dnsmasq as the server (full DHCP with a boot file, so the captures also hold a
real server's OFFER/ACK), tshark records br0 into a pcap per client. The captures are test data, made
once and committed; the tests never need these tools to run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from netns import Lab  # noqa: E402

OUT = HERE.parent / "data" / "dhcp"


def start_dnsmasq(lab: Lab, tmp: Path) -> None:
    lab.server.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-resolv",
                      "--no-hosts", f"--interface={lab.bridge}", "--bind-interfaces",
                      "--dhcp-range=10.77.0.100,10.77.0.199,1h", "--dhcp-boot=undionly.kpxe",
                      f"--dhcp-leasefile={tmp}/dnsmasq.leases", "--dhcp-authoritative", f"--pid-file={tmp}/d.pid",
                      "--log-dhcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)


def capture(lab: Lab, name: str):
    path = OUT / f"{name}.pcap"
    p = lab.server.popen(["tshark", "-q", "-i", lab.bridge, "-F", "pcap", "-w", str(path),
                          "-f", "udp port 67 or udp port 68 or udp port 4011"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # tshark needs a moment before it captures
    return p, path


def stop_capture(p) -> None:
    time.sleep(1.0)
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()


def run_dhclient(lab: Lab, tmp: Path) -> None:
    c = lab.add_client()
    lf, pf = str(tmp / "dhclient.leases"), str(tmp / "dhclient.pid")
    c.ns.run(["dhclient", "-1", "-v", "-lf", lf, "-pf", pf, "-sf", "/bin/true", "eth0"], timeout=60)
    c.ns.run(["dhclient", "-r", "-v", "-lf", lf, "-pf", pf, "-sf", "/bin/true", "eth0"], timeout=60)
    # again from the lease file: INIT-REBOOT request for the remembered address
    c.ns.run(["dhclient", "-1", "-v", "-lf", lf, "-pf", pf, "-sf", "/bin/true", "eth0"], timeout=60)
    c.ns.run(["dhclient", "-x", "-lf", lf, "-pf", pf, "-sf", "/bin/true", "eth0"], check=False, timeout=60)


def run_udhcpc(lab: Lab, tmp: Path) -> None:
    c = lab.add_client()
    c.ns.run(["udhcpc", "-i", "eth0", "-n", "-q", "-f", "-R", "-s", "/bin/true", "-x", "hostname:labpc7",
              "-V", "bootd-test"], timeout=60)


def run_perfdhcp(lab: Lab, tmp: Path) -> None:
    c = lab.add_client(address="10.77.0.50")
    c.ns.run(["perfdhcp", "-4", "-l", "eth0", "-r", "5", "-n", "5", "-R", "5", "-t", "1", "10.77.0.1"],
             check=False, timeout=60)


def run_qemu(lab: Lab, tmp: Path, uefi: bool) -> None:
    tap = lab.add_tap()
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-monitor", "none",
            "-serial", f"file:{tmp}/serial.log", "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", "e1000,netdev=n0,mac=52:54:00:77:ee:01", "-boot", "n"]
    if uefi:
        argv += ["-bios", "/usr/share/ovmf/OVMF.fd"]
    p = lab.server.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + (120 if uefi else 60)
    leases = tmp / "dnsmasq.leases"
    while time.time() < deadline:
        if leases.exists() and "52:54:00:77:ee:01" in leases.read_text():
            time.sleep(8)  # let it go on to the next steps (TFTP attempt, proxy wait)
            break
        time.sleep(1)
    p.kill()


CLIENTS = {
    "dhclient": run_dhclient,
    "udhcpc": run_udhcpc,
    "perfdhcp": run_perfdhcp,
    "ipxe-bios": lambda lab, tmp: run_qemu(lab, tmp, uefi=False),
    "ipxe-uefi": lambda lab, tmp: run_qemu(lab, tmp, uefi=True),
}


def main(names: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or list(CLIENTS):
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            os.chmod(tmp, 0o777)
            lab = Lab()
            try:
                start_dnsmasq(lab, tmp)
                p, path = capture(lab, name)
                CLIENTS[name](lab, tmp)
                stop_capture(p)
                print(f"{name}: {path} ({path.stat().st_size} bytes)")
            finally:
                lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
