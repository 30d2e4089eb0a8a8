"""Secure Boot and UEFI HTTP boot on real firmware: OVMF in QEMU (TCG), bootd serving everything.

- A PC with Secure Boot on (OVMF's Secure Boot build, Microsoft's keys enrolled: what a PC bought since
  2020 has) in a `secureboot: true` room PXE-boots Debian's Microsoft-signed shim, which loads Debian's
  signed GRUB, which reads bootd's per-host menu and boots the signed Debian kernel; the kernel says
  Secure Boot is enabled, the client attaches its NBD disk and reads the marker.
- The negative: the same firmware handed bootd's unsigned GRUB refuses it ("Access Denied"), which
  shows Secure Boot really is on.
- UEFI HTTP boot (PXE switched off in the firmware): a GRUB room's PC gets bootd's GRUB, menu, kernel
  and initrd over HTTP, an iPXE room's PC ipxe.efi, its script, kernel and initrd, and not one TFTP
  packet crosses the bridge. A Secure Boot PC trying UEFI HTTP boot gets an address, no boot file and a
  failed step saying why: Debian 12's signed GRUB has no HTTP client (README, Secure Boot).
- The HTTP boot and the Secure Boot PXE boot again with bootd in proxy mode beside the site's DHCP
  server (dnsmasq).
- The OVMF PXE path (ipxe.efi over TFTP) is booted in the same run as the reference for the times.

The PCs boot one after another (2 CPUs: one TCG PC at a time keeps the phase times comparable); the
times per phase of each path are written to test-artifacts/e2e/secureboot/phases.md (the README's table).
Opt-in, ~3 min: BOOTD_SECUREBOOT_TEST=1 or `make test-secureboot`.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import artifacts_for
from harness import (
    OVMF_CODE_SECURE,
    OVMF_VARS_SECURE,
    BootResult,
    boot_timeline,
    format_timeline,
    lab_config,
    running_bootd_lab,
    start_dnsmasq,
)
from support import have

from pxe.loaders import SIGNED_GRUB, SIGNED_SHIM

pytestmark = [
    pytest.mark.qemu, pytest.mark.netns,
    pytest.mark.skipif(os.environ.get("BOOTD_SECUREBOOT_TEST") != "1",
                       reason="QEMU boots under TCG (~3 min): BOOTD_SECUREBOOT_TEST=1 or make test-secureboot"),
]

SB_PXE = "52:54:00:5b:01:01"
SB_HTTP = "52:54:00:5b:01:02"
SB_REFUSED = "52:54:00:5b:01:03"
GRUB_HTTP = "52:54:00:5b:01:06"
PROXY_HTTP = "52:54:00:5b:01:07"
PROXY_SB = "52:54:00:5b:01:08"
HTTP_IPXE = "52:54:00:5b:01:04"
PXE_IPXE = "52:54:00:5b:01:05"
# OVMF's boot manager tries PXEv4, PXEv6, then HTTPv4: these fw_cfg knobs (OvmfPkg) leave only HTTP boot
HTTP_ONLY = ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
             "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]
PHASES = {}  # path name -> {step: seconds since power-on}, written at the end of the module


@pytest.fixture(scope="module")
def lab(assets):
    for f in (OVMF_CODE_SECURE, OVMF_VARS_SECURE, Path(SIGNED_SHIM), Path(SIGNED_GRUB)):
        if not f.exists():
            pytest.skip(f"{f} missing (ovmf, shim-signed, grub-efi-amd64-signed)")
    if not have("tcpdump"):
        pytest.skip("tcpdump not installed")
    hosts = [{"mac": SB_PXE, "name": "pc-sb-pxe", "group": "secure"},
             {"mac": SB_HTTP, "name": "pc-sb-http", "group": "secure"},
             {"mac": SB_REFUSED, "name": "pc-sb-unsigned", "group": "grub"},
             {"mac": HTTP_IPXE, "name": "pc-http", "group": "lab"},
             {"mac": GRUB_HTTP, "name": "pc-grub-http", "group": "grub"},
             {"mac": PXE_IPXE, "name": "pc-pxe", "group": "lab"}]
    groups = [{"name": "secure", "images": ["demo"], "secureboot": True},
              {"name": "grub", "images": ["demo"], "boot": "grub"},
              {"name": "lab", "images": ["demo"]}]
    logs = artifacts_for("secureboot")
    with running_bootd_lab(logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, hosts=hosts,
                                                        groups=groups, menu_timeout=0), assets) as bl:
        bl.logs = logs
        yield bl
    write_phases(logs)


class Capture:
    """tcpdump on the lab bridge (in the server namespace) for TFTP: UDP port 69 and the transfers' ports."""

    def __init__(self, bl, path: Path):
        self.path = path
        self.proc = bl.lab.server.popen(["tcpdump", "-i", bl.lab.bridge, "-n", "-U", "-w", str(path),
                                         "udp port 69 or (udp and portrange 1024-65535 and not port 10809 "
                                         "and not port 67 and not port 68)"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # tcpdump listening before the PC starts

    def packets(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        r = subprocess.run(["tcpdump", "-r", str(self.path), "-n"], capture_output=True, text=True)
        return [ln for ln in r.stdout.splitlines() if ln.strip()]


def boot(bl, name: str, mac: str, firmware: str, extra=()) -> tuple[BootResult, list[dict]]:
    pc = bl.pc(name, mac=mac, firmware=firmware, memory=512, extra_args=list(extra))
    r = pc.boot(timeout=300)
    events = [e for e in bl.events(mac) if e.get("ts", 0) >= r.started_at - 1]
    (bl.logs / f"{name}.timeline.txt").write_text(format_timeline(boot_timeline(r, events)) + "\n")
    return r, events


def boot_over_http(bl, name: str, mac: str) -> tuple[BootResult, list[dict]]:
    """A PC without Secure Boot whose firmware can only UEFI-HTTP-boot: it reaches its marker, on a fresh
    disk, without one TFTP packet on the bridge and without a failed step."""
    cap = Capture(bl, bl.logs / f"{name}.pcap")
    r, events = boot(bl, name, mac, "uefi", HTTP_ONLY)
    tftp = cap.packets()
    assert r.ok and r.marker == "A" and r.fresh is True, r.describe()
    assert r.secureboot == "disabled", r.describe()
    assert "Start HTTP Boot over IPv4" in r.log and "Start PXE over IPv4" not in r.log, r.describe()
    assert tftp == [], tftp
    assert not [e for e in events if e["kind"] == "failed"], events
    return r, events


def phases(r: BootResult, events: list[dict]) -> dict[str, float]:
    """Seconds since power-on when each step was done: bootd's events (recorded when a fetch ends) and the
    PC's serial console."""
    def at(e):
        return round(e["ts"] - r.started_at, 2)
    out: dict[str, float] = {}
    dhcp = [e for e in events if e["kind"] == "dhcp"]
    if dhcp:
        out["firmware DHCP"] = at(dhcp[0])
    whole = [e for e in events if (e.get("detail") or {}).get("outcome", "complete") == "complete"
             and (e.get("detail") or {}).get("status", 200) == 200]
    menu = next((e for e in whole if e["kind"] in ("menu", "script")), None)
    loaders = [e for e in whole if e["kind"] == "loader" and (menu is None or e["ts"] <= menu["ts"])]
    for e in loaders:
        out[f"{Path(e['detail']['path']).name} loaded"] = at(e)
    if menu is not None:
        out["menu"] = at(menu)
    for kind in ("kernel", "initrd"):
        e = next((e for e in whole if e["kind"] == kind), None)
        if e is not None:
            out[f"{kind} loaded"] = at(e)
    for name, label in (("init", "client /init"), ("disk", "NBD disk attached"), ("marker", "marker on screen")):
        if name in r.milestones:
            out[label] = r.milestones[name]
    return out


def chain(bl, name: str) -> list[tuple[str, str]]:
    return [(c["step"], c["proto"]) for c in bl.daemon.api.get(f"/api/v1/hosts/{name}")["chain"]]


def test_secure_boot_pxe_shim_grub_signed_kernel(lab):
    bl = lab
    r, events = boot(bl, "pc-sb-pxe", SB_PXE, "uefi-secureboot")
    assert r.ok and r.marker == "A" and r.fresh is True, r.describe()
    assert r.secureboot == "enabled", r.describe()  # the kernel's own "secureboot: Secure boot enabled"
    assert "NBP filename is secureboot/shimx64.efi" in r.log, r.describe()
    assert "Welcome to GRUB!" in r.log, r.describe()
    assert chain(bl, "pc-sb-pxe") == [("shim", "tftp"), ("grub", "tftp"), ("menu", "tftp"), ("kernel", "tftp"),
                                      ("initrd", "tftp")]
    # shim's and GRUB's optional probes (revocation lists, module lists) are no failed steps
    assert not [e for e in events if e["kind"] == "failed"], events
    out = bl.bootctl("hosts", "pc-sb-pxe").stdout
    assert "loader chain: shim secureboot/shimx64.efi (tftp) -> grub secureboot/grubx64.efi (tftp) -> " \
           "menu grub/grub.cfg (tftp) -> kernel vmlinuz (tftp) -> initrd initrd.img (tftp)" in out, out
    PHASES["Secure Boot, PXE: shim -> GRUB (TFTP)"] = phases(r, events)


def test_secure_boot_pc_trying_http_boot_is_told_why(lab):
    bl = lab
    pc = bl.pc("pc-sb-http", mac=SB_HTTP, firmware="uefi-secureboot", memory=512, extra_args=HTTP_ONLY)
    pc.start()
    try:
        deadline = time.monotonic() + 120
        failed = []
        while not failed and time.monotonic() < deadline and pc.running():
            failed = [e for e in bl.events(SB_HTTP) if e["kind"] == "failed"]
            time.sleep(1)
        time.sleep(3)
    finally:
        pc.kill()
    log = pc.log_path.read_text(errors="replace")  # the whole console, also a line still being written
    assert failed, log[-3000:]
    assert failed[0]["detail"]["step"] == "dhcp"
    assert "the signed GRUB beside shim has no HTTP client" in failed[0]["detail"]["reason"]
    assert "Start HTTP Boot over IPv4" in log and "Welcome to GRUB!" not in log, log[-3000:]
    host = bl.daemon.api.get("/api/v1/hosts/pc-sb-http")
    assert host["state"] == "failed" and "no HTTP client" in host["last_error"], host
    assert not [e for e in bl.events(SB_HTTP) if e["kind"] == "loader"]


def test_uefi_http_boot_of_a_grub_room_sends_no_tftp(lab):
    bl = lab
    r, events = boot_over_http(bl, "pc-grub-http", GRUB_HTTP)
    assert chain(bl, "pc-grub-http") == [("grub", "http"), ("menu", "http"), ("kernel", "http"), ("initrd", "http")]
    dhcp = [e["detail"] for e in events if e["kind"] == "dhcp"]
    assert dhcp[0]["arch"] == "uefi-x64-http" and \
        dhcp[0]["file"] == f"http://{bl.lab.server_ip}:8080/boot/files/grubx64.efi"  # bootd's GRUB, any port
    PHASES["UEFI HTTP boot: GRUB (HTTP)"] = phases(r, events)


def test_secure_boot_firmware_refuses_an_unsigned_loader(lab):
    bl = lab
    pc = bl.pc("pc-sb-unsigned", mac=SB_REFUSED, firmware="uefi-secureboot", memory=512)
    pc.start()
    try:
        denied = pc.serial.wait_for(r"Access Denied", timeout=180, alive=pc.running)
    finally:
        pc.kill()
    log = pc.serial.text()
    (bl.logs / "pc-sb-unsigned.serial.txt").write_text(log)
    assert "NBP filename is grubx64.efi" in log, log[-3000:]  # bootd's own GRUB: not signed
    assert denied is not None, log[-3000:]
    assert "Welcome to GRUB!" not in log
    kinds = [e["kind"] for e in bl.events(SB_REFUSED)]
    assert "loader" in kinds and "menu" not in kinds and "kernel" not in kinds, kinds


def test_uefi_http_boot_of_an_ipxe_room_sends_no_tftp(lab):
    bl = lab
    r, events = boot_over_http(bl, "pc-http", HTTP_IPXE)
    assert chain(bl, "pc-http") == [("ipxe", "http"), ("script", "http"), ("kernel", "http"), ("initrd", "http")]
    PHASES["UEFI HTTP boot: iPXE (HTTP)"] = phases(r, events)


def test_proxy_mode_beside_the_sites_dhcp_http_boot_and_secure_boot(assets, lab):
    """The site's DHCP server (dnsmasq on another host) gives the addresses, bootd in proxy mode the boot
    information: OVMF's HTTP boot takes the URL (option 60 HTTPClient) and GRUB and its menu come over
    HTTP; a Secure Boot PC takes the proxy offer's shim over TFTP and boots the signed chain. GRUB takes
    its TFTP server from the site server's ACK, so that server names bootd as next-server (the warning
    `bootctl status` gives in proxy mode with GRUB rooms, README).
    (Its own lab: this one's bootd is in proxy mode; `lab` only orders it after the other boots.)"""
    logs = lab.logs / "proxy"
    with running_bootd_lab(logs, lambda lab: lab_config(
            lab, images={"demo": assets.image_a}, dhcp_mode="proxy", menu_timeout=0,
            groups=[{"name": "grub", "images": ["demo"], "boot": "grub"},
                    {"name": "secure", "images": ["demo"], "secureboot": True}],
            hosts=[{"mac": PROXY_HTTP, "name": "pc-proxy-http", "group": "grub"},
                   {"mac": PROXY_SB, "name": "pc-proxy-sb", "group": "secure"}]), assets) as bl:
        bl.logs = logs
        site = bl.lab.add_client(address="10.77.0.2")
        start_dnsmasq(bl.lab, logs / "dnsmasq", ns=site.ns, interface="eth0",
                      range_start="10.77.0.200", range_end="10.77.0.220",
                      extra=[f"--dhcp-boot=,,{bl.lab.server_ip}"])  # next-server: bootd, no boot file
        warning = bl.daemon.api.get("/api/v1/status")
        assert "PCs booting GRUB in proxy mode" in json.dumps(warning), warning
        r, events = boot_over_http(bl, "pc-proxy-http", PROXY_HTTP)
        assert r.ip and 200 <= int(r.ip.rsplit(".", 1)[1]) <= 220, r.describe()  # dnsmasq's address
        proxy = [e["detail"] for e in events if e["kind"] == "proxydhcp"]
        assert proxy and proxy[0]["arch"] == "uefi-x64-http" and proxy[0]["file"].endswith("/boot/files/grubx64.efi")
        assert chain(bl, "pc-proxy-http") == [("grub", "http"), ("menu", "http"), ("kernel", "http"),
                                              ("initrd", "http")]
        r, events = boot(bl, "pc-proxy-sb", PROXY_SB, "uefi-secureboot")
        assert r.ok and r.marker == "A" and r.secureboot == "enabled", r.describe()
        assert r.ip and 200 <= int(r.ip.rsplit(".", 1)[1]) <= 220, r.describe()
        assert chain(bl, "pc-proxy-sb") == [("shim", "tftp"), ("grub", "tftp"), ("menu", "tftp"), ("kernel", "tftp"),
                                            ("initrd", "tftp")]
        leases = (logs / "dnsmasq" / "dnsmasq.leases").read_text()
        assert PROXY_HTTP in leases and PROXY_SB in leases, leases


def test_ovmf_pxe_reference_in_the_same_run(lab):
    bl = lab
    r, events = boot(bl, "pc-pxe", PXE_IPXE, "uefi")
    assert r.ok and r.marker == "A", r.describe()
    assert chain(bl, "pc-pxe")[0] == ("ipxe", "tftp")
    PHASES["OVMF PXE: iPXE (TFTP), reference"] = phases(r, events)


def write_phases(logs: Path) -> None:
    if not PHASES:
        return
    (logs / "phases.json").write_text(json.dumps(PHASES, indent=1) + "\n")
    lines = ["| path | " + " | ".join(["firmware DHCP", "loaders", "menu", "kernel + initrd", "marker"]) + " |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, p in PHASES.items():
        loaders = [v for k, v in p.items() if k.endswith(" loaded") and k not in ("kernel loaded", "initrd loaded")]
        cells = [p.get("firmware DHCP"), loaders[-1] if loaders else None, p.get("menu"), p.get("initrd loaded"),
                 p.get("marker on screen")]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f} s" for c in cells) + " |")
    text = ("Seconds since power-on when each step was done (QEMU TCG, one PC at a time, same bootd):\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(f"{n}: {json.dumps(p)}" for n, p in PHASES.items()) + "\n")
    (logs / "phases.md").write_text(text)
