"""The real bootd daemon with its disk service, in a lab network: clients in their own namespaces,
`bootctl disk ...`, NBD only on the served address, and a kill -9 of bootd under a running client."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from nbdtest import make_base, sha256

pytestmark = pytest.mark.netns

CLIENT = textwrap.dedent("""
    import sys, nbd
    h = nbd.NBD(); h.connect_uri(sys.argv[1])
    h.pwrite(b"client-wrote-this", 1 << 20); h.flush()
    print("written", flush=True)
    for line in sys.stdin:
        print(h.pread(17, 1 << 20).decode(errors="replace"), flush=True)
""")

TRY_OPEN = textwrap.dedent("""
    import sys, nbd
    for uri in sys.argv[1:]:
        h = nbd.NBD()
        try:
            h.connect_uri(uri); print("OPEN", uri)
        except nbd.Error:
            print("REFUSED", uri)
""")


def bootctl_json(d, *args):
    r = d.bootctl("--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_daemon_serves_disks_and_keeps_running_boots_across_a_kill_9(lab, bootd_daemon, tmp_path):
    base = make_base(tmp_path / "base.qcow2", pattern=0xAB)
    base.chmod(0o444)
    before = sha256(base)
    a = lab.add_client("10.77.0.10")
    b = lab.add_client("10.77.0.11")
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
           "dhcp": {"mode": "off"}, "tftp": {"enabled": False},
           "hosts": [{"mac": a.mac, "name": "pc-a", "ip": "10.77.0.10"},
                     {"mac": b.mac, "name": "pc-b", "ip": "10.77.0.11", "persistent": True}]}
    d = bootd_daemon(cfg, ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    eb = bootctl_json(d, "disk", "boot", "pc-b", "--snapshot", str(base))
    assert ea["host"] == "10.77.0.1" and ea["port"] == 10809 and eb["persistent"]
    assert ea["cmdline"] == f"bootd.nbd=10.77.0.1:10809/{ea['name']}"
    # NBD listens on the served address only
    ss = lab.server.run(["ss", "-Hltn", "sport = :10809"]).stdout
    assert "10.77.0.1:10809" in ss and "0.0.0.0:10809" not in ss and "*:10809" not in ss

    client = a.ns.popen([sys.executable, "-c", CLIENT, ea["uri"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True)
    assert client.stdout.readline().strip() == "written"
    listing = {e["host"]: e for e in bootctl_json(d, "disk", "list")["disks"]}
    assert listing["pc-a"]["connected"] and not listing["pc-b"]["connected"]
    assert listing["pc-a"]["overlay_bytes"] > 0 and listing["pc-a"]["export"] == ea["name"]
    text = d.bootctl("disk", "list").stdout
    assert "pc-a" in text and "pc-b" in text and "base.qcow2" in text

    # host A cannot reach B's disk under any name derived from B; its own opens
    guesses = [f"nbd://10.77.0.1:10809/{x}" for x in (b.mac, b.mac.replace(":", ""), "pc-b", "10.77.0.11", "")]
    out = a.ns.run([sys.executable, "-c", TRY_OPEN, eb["uri"].replace(eb["name"], eb["name"][:-1]), *guesses,
                    ea["uri"]]).stdout.splitlines()
    assert out[-1].startswith("OPEN") and all(line.startswith("REFUSED") for line in out[:-1])

    d.kill()  # kill -9 of bootd, with a client in the middle of its boot
    client.stdin.write("read\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "client-wrote-this"  # still served meanwhile
    d.start()
    listing = {e["host"]: e for e in bootctl_json(d, "disk", "list")["disks"]}
    assert listing["pc-a"]["export"] == ea["name"] and listing["pc-a"]["connected"]
    assert listing["pc-b"]["export"] == eb["name"]
    client.stdin.write("read\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "client-wrote-this"
    client.stdin.close()
    client.wait(10)
    # the restarted bootd hands new connections into the adopted daemon as well
    out = a.ns.run([sys.executable, "-c", TRY_OPEN, ea["uri"]]).stdout
    assert out.startswith("OPEN")
    status = bootctl_json(d, "status")
    disks = [s for s in status["services"] if s["name"] == "disks"][0]
    assert disks["exports"] == 2 and disks["qsd"]["adopted"]
    assert disks["gatekeeper"]["handed_off"] == 1 and disks["gatekeeper"]["spliced"] == 0
    metrics = bootctl_json(d, "metrics")
    assert metrics["nbd"]["exports"] == 2
    assert d.stop() == 0
    assert not [p for p in lab.server.pids() if "qemu-storage" in open(f"/proc/{p}/cmdline").read()]
    assert sha256(base) == before


def test_daemon_without_served_interface_runs_without_disks(bootd_daemon):
    d = bootd_daemon({"dhcp": {"mode": "off"}, "tftp": {"enabled": False}})
    r = d.bootctl("disk", "list")
    assert r.returncode == 1 and "disks over NBD are off" in r.stderr
    status = json.loads(d.bootctl("--json", "status").stdout)
    disks = [s for s in status["services"] if s["name"] == "disks"][0]
    assert disks["enabled"] is False and "no served interface" in disks["reason"]


def test_reload_to_a_new_port_keeps_the_running_boots_disks(lab, bootd_daemon, tmp_path):
    base = make_base(tmp_path / "base.qcow2", pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
           "dhcp": {"mode": "off"}, "tftp": {"enabled": False},
           "hosts": [{"mac": a.mac, "name": "pc-a", "ip": "10.77.0.10"}]}
    d = bootd_daemon(cfg, ns=lab.server)
    ea = bootctl_json(d, "disk", "boot", "pc-a", "--snapshot", str(base))
    write = textwrap.dedent("""
        import sys, nbd
        h = nbd.NBD(); h.connect_uri(sys.argv[1])
        if sys.argv[2] == "w":
            h.pwrite(b"before-reload", 0); h.flush()
        print(h.pread(13, 0).decode(errors="replace"))
    """)
    assert a.ns.run([sys.executable, "-c", write, ea["uri"], "w"]).stdout.strip() == "before-reload"
    cfg = d.config_dict  # the fixture's copy: it holds the temporary storage and API socket
    cfg["nbd"] = {"reap_after": 7200}
    d.write_config(cfg)
    bootctl_json(d, "reload")
    assert bootctl_json(d, "disk", "list")["storage_daemon"]["restarts"] == 0
    cfg["nbd"] = {"port": 10810}
    d.write_config(cfg)
    bootctl_json(d, "reload")
    new_uri = ea["uri"].replace(":10809/", ":10810/")
    assert a.ns.run([sys.executable, "-c", write, new_uri, "r"]).stdout.strip() == "before-reload"
    assert a.ns.run([sys.executable, "-c", write, ea["uri"], "r"], check=False).returncode != 0
