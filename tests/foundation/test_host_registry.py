"""Hosts as data (issue 16): PCs registered at run time beside the config's, checked as a whole and
applied in one transaction, merged into the one host list every consumer reads (config hosts win), and
unknown PCs that boot listed with their vendor and firmware, then adopted into a room."""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import small_lab_files

from bootd.config import parse_config
from bootd.daemon import Context
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.policy import DhcpPolicy
from bootd.hostregistry import HostNotFound, HostRegistryError, HostRegistryService, Registry, vendor_of
from bootd.peers import configured_mac
from bootd.state import open_state

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {
    "interfaces": [{"name": "br0", "address": "10.88.0.1/16"}],
    "dhcp": {"mode": "full", "allow_unknown": False,
             "pools": [{"interface": "br0", "start": "10.88.200.1", "end": "10.88.200.100"}]},
    "images": [{"name": "deb"}, {"name": "win"}],
    "groups": [{"name": "room1", "images": ["deb"]}, {"name": "room2", "images": ["win"]}],
    "hosts": [{"mac": "52:54:00:00:00:01", "name": "teacher", "ip": "10.88.0.5", "group": "room1"}],
}


def config(**changes):
    c = json.loads(json.dumps(CONFIG))
    c.update(changes)
    return parse_config(yaml.safe_dump(c))


@pytest.fixture
def ctx(tmp_path):
    store = open_state(tmp_path / "state.db")
    yield Context(config=config(), config_path="test", store=store)
    store.close()


def mac_of(i: int) -> str:
    return f"00:50:56:00:{i // 256:02x}:{i % 256:02x}"


def good_rows(n: int = 300) -> list[list[str]]:
    return [[mac_of(i), f"pc{i:03d}", "room1" if i % 2 else "room2", f"10.88.{1 + i // 200}.{10 + i % 200}"]
            for i in range(n)]


# Ten bad rows put in place of good ones: (row index, row, what the report must say)
BAD = {
    7: (["00:50:56:zz:00:07", "pc007", "room1", "10.88.1.17"], "not a MAC address"),
    31: ([mac_of(31), "pc031", "room9", "10.88.1.41"], "unknown group 'room9'"),
    58: ([mac_of(58), "pc058", "room1", "192.168.5.5"], "in no served subnet"),
    77: ([mac_of(77), "pc005", "room1", "10.88.1.87"], "name 'pc005' is taken by line 7's host"),
    99: ([mac_of(99), "pc099", "room1", "10.88.1.10"], "10.88.1.10 is taken by line 2's host pc000"),
    120: ([mac_of(120), "teacher", "room1", "10.88.1.130"], "taken by config host"),
    150: (["52:54:00:00:00:01", "pc150", "room1", "10.88.1.160"], "already the config file (host teacher)"),
    181: ([mac_of(181), "bad name!", "room2", "10.88.1.191"], "name 'bad name!'"),
    222: ([mac_of(222), "pc222", "room1", "10.88.0.1"], "bootd's own address"),
    263: ([mac_of(263), "pc263", "room2", "10.88.2.73", "extra"], "5 fields"),
}


def csv_text(rows: list[list[str]]) -> str:
    return "mac,name,group,ip\n" + "".join(",".join(r) + "\n" for r in rows)


def bad_csv() -> str:
    rows = good_rows()
    for i, (row, _) in BAD.items():
        rows[i] = row
    return csv_text(rows)


def fixed_csv() -> str:
    return csv_text([r for i, r in enumerate(good_rows()) if i not in BAD])


def test_csv_with_bad_rows_reports_each_with_its_line_and_applies_nothing(ctx):
    reg = Registry(ctx)
    with pytest.raises(HostRegistryError) as e:
        reg.import_csv(bad_csv())
    problems = e.value.problems
    assert len(problems) == len(BAD), problems
    for (i, (_, why)), problem in zip(sorted(BAD.items()), problems, strict=True):
        assert problem.startswith(f"line {i + 2}: "), problem  # line 1 names the columns
        assert why in problem, problem
    assert "nothing imported" in e.value.summary
    assert ctx.store.registered_hosts() == []
    assert [h.name for h in ctx.config.hosts] == ["teacher"]


def test_fixed_csv_dry_run_applies_nothing_then_import_applies_all(ctx):
    reg = Registry(ctx)
    res = reg.import_csv(fixed_csv(), dry_run=True)
    assert (res["rows"], res["added"], res["dry_run"]) == (290, 290, True)
    assert ctx.store.registered_hosts() == []
    res = reg.import_csv(fixed_csv())
    assert (res["rows"], res["added"]) == (290, 290)
    assert len(ctx.store.registered_hosts()) == 290
    assert len(ctx.config.hosts) == 291
    pc1 = ctx.planner.settings_for(mac_of(1))
    assert (pc1.name, pc1.group, pc1.images) == ("pc001", "room1", ("deb",))
    # importing the same file again replaces the rows: no duplicates, nothing new
    res = reg.import_csv(fixed_csv())
    assert (res["added"], res["replaced"]) == (0, 290)
    assert len(ctx.store.registered_hosts()) == 290


def test_add_move_rename_remove(ctx):
    reg = Registry(ctx)
    dhcp = lambda: DhcpPolicy(ctx.config, LeaseTable(ctx.store))  # noqa: E731  (rebuilt after each change)
    mac = mac_of(1000)
    assert not dhcp().known(mac)
    reg.add(mac, "pc42", "room1", "10.88.3.42")
    assert ctx.planner.settings_for(mac).group == "room1"
    policy = dhcp()
    assert policy.known(mac) and policy.reservations[mac] == "10.88.3.42"  # DHCP reserves its address
    assert configured_mac(ctx, "10.88.3.42") == mac  # peers: its configured address is a live binding
    reg.change("pc42", group="room2")  # move
    assert ctx.planner.settings_for(mac).images == ("win",)
    reg.change(mac, name="pc43")  # rename
    assert ctx.planner.settings_for(mac).name == "pc43"
    # refused, with reasons, and nothing changed
    with pytest.raises(HostRegistryError, match="unknown group 'room7'"):
        reg.change("pc43", group="room7")
    with pytest.raises(HostRegistryError, match="name 'pc43' is taken"):
        reg.add(mac_of(1001), "pc43", "room1", None)
    with pytest.raises(HostRegistryError, match="10.88.3.42 is taken by registered host pc43"):
        reg.add(mac_of(1001), "pc44", "room1", "10.88.3.42")
    ctx.store.put_dhcp_reservation(mac_of(1002), "10.88.3.43", None)  # bootctl reserve
    with pytest.raises(HostRegistryError, match="10.88.3.43 is reserved for 00:50:56:00:03:ea"):
        reg.add(mac_of(1001), "pc44", "room1", "10.88.3.43")
    with pytest.raises(HostRegistryError, match="MAC 00:50:56:00:03:e8 is already registered host pc43"):
        reg.add(mac, "pc45", None, None)
    assert [(r["name"], r["group"], r["ip"]) for r in ctx.store.registered_hosts()] == [("pc43", "room2", "10.88.3.42")]
    reg.remove("pc43")
    assert ctx.config.host_by_mac(mac) is None and not dhcp().known(mac)
    with pytest.raises(HostNotFound):
        reg.remove("pc43")
    with pytest.raises(HostNotFound, match="config file host"):
        reg.remove("teacher")


def test_config_host_wins_a_conflict_and_it_is_reported(ctx):
    reg = Registry(ctx)
    reg.add(mac_of(5), "lab-a", "room2", "10.88.3.5")
    reg.add(mac_of(6), "lab-b", "room2", None)
    svc = HostRegistryService()
    import asyncio
    asyncio.run(svc.start(ctx))
    assert svc.warning() is None and ctx.host_conflicts == ()
    # the config file gets a host of the same name (another MAC) and one with lab-b's MAC: the config's win
    hosts = CONFIG["hosts"] + [{"mac": "52:54:00:00:00:02", "name": "lab-a", "group": "room1"},
                               {"mac": mac_of(6), "name": "front", "group": "room1"}]
    ctx.set_config(config(hosts=hosts))
    assert ctx.config.host_by_mac(mac_of(5)) is None  # left out: its name belongs to the config's host
    assert ctx.config.host_by_name("lab-a").mac == "52:54:00:00:00:02"
    assert ctx.config.host_by_mac(mac_of(6)).name == "front"
    assert ctx.planner.settings_for(mac_of(6)).group == "room1"
    assert len(ctx.host_conflicts) == 2
    assert any("lab-a" in c and "name of config host lab-a" in c for c in ctx.host_conflicts)
    assert any("lab-b" in c and "MAC of config host front" in c for c in ctx.host_conflicts)
    warning = svc.warning()
    assert warning is not None and "2 registered host conflicts" in warning
    listing = reg.listing()
    assert listing["conflicts"] == list(ctx.host_conflicts)
    left = {h["name"]: h["source"] for h in listing["hosts"] if h["source"] != "config"}
    assert left == {"lab-a": "registered (not in force)", "lab-b": "registered (not in force)"}


def test_vendor_from_the_oui_registry():
    if not Path("/usr/share/ieee-data/oui.txt").exists():
        assert vendor_of("00:50:56:00:00:01") == "unknown"
    else:
        assert "VMware" in vendor_of("00:50:56:00:00:01")
    assert vendor_of("52:54:00:12:34:56") == "random (locally administered)"


def test_bootctl_host_import_dry_run_and_api_reasons(bootd_daemon, tmp_path):
    d = bootd_daemon({"dhcp": {"mode": "off"}, "images": CONFIG["images"], "groups": CONFIG["groups"],
                      "hosts": [{"mac": "52:54:00:00:00:01", "name": "teacher", "group": "room1"}]})
    bad, fixed = tmp_path / "bad.csv", tmp_path / "fixed.csv"
    # no interfaces here: no subnet to check, so the address rows that are bad only for that are good
    bad.write_text(bad_csv())
    fixed.write_text(fixed_csv())
    r = d.bootctl("host", "import", str(bad))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if re.match(r"line \d+: ", line)]
    assert [int(line.split()[1].rstrip(":")) for line in lines] == [i + 2 for i in sorted(BAD) if i not in (58, 222)]
    assert d.api.get("/api/v1/host-registry")["hosts"] == [
        {"mac": "52:54:00:00:00:01", "name": "teacher", "group": "room1", "ip": None, "source": "config"}]
    r = d.bootctl("host", "import", "--dry-run", str(fixed), check=True)
    assert "would import 290 hosts" in r.stdout
    assert len(d.api.get("/api/v1/host-registry")["hosts"]) == 1
    r = d.bootctl("host", "import", str(fixed), check=True)
    assert "imported 290 hosts (290 new" in r.stdout
    out = d.bootctl("host", "list", check=True).stdout
    assert re.search(r"00:50:56:00:00:01\s+pc001\s+room1\s+10\.88\.1\.11\s+registered", out)
    d.bootctl("host", "move", "pc001", "room2", check=True)
    d.bootctl("host", "rename", "pc001", "pc-one", check=True)
    row = next(h for h in d.api.get("/api/v1/host-registry")["hosts"] if h["mac"] == mac_of(1))
    assert (row["name"], row["group"]) == ("pc-one", "room2")
    kept = d.bootctl("host", "remove", "pc-one")  # destructive: lists what goes, needs --yes
    assert kept.returncode == 1 and "pc-one" in kept.stderr and "add --yes" in kept.stderr, kept
    d.bootctl("host", "remove", "pc-one", "--yes", check=True)
    assert len(d.api.get("/api/v1/host-registry")["hosts"]) == 290
    r = d.bootctl("host", "add", "zz", "x", "--group", "room1")
    assert r.returncode == 1 and "not a MAC address" in r.stderr
    r = d.bootctl("--json", "host", "remove", "nobody")
    assert r.returncode == 1 and json.loads(r.stdout.splitlines()[0])["status"] == 404


# -- an unknown PC PXE-boots, is listed, adopted into room1, and boots room1's snapshot ------------------
PY = sys.executable
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew) ip addr flush dev $interface; ip addr add $ip/24 dev $interface; echo "$ip" > {out} ;;
  deconfig) ip addr flush dev $interface ;;
esac
exit 0
"""


@pytest.mark.netns
def test_unknown_pc_netboots_is_adopted_and_boots_its_rooms_snapshot(lab, bootd_daemon, tmp_path):
    for prog in ("udhcpc", "curl", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(prog) is None:
            pytest.skip(f"{prog} not installed")
    disk = small_lab_files(tmp_path)
    cfg = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "full", "allow_unknown": True, "lease_time": 600,
                 "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.199"}]},
        "tftp": {"enabled": False},
        "storage": {"directory": str(tmp_path / "storage"), "min_free_mb": 1},
        "images": [{"name": "deb", "title": "Debian", "disk": str(disk)}],
        "groups": [{"name": "room1", "images": ["deb"], "default_image": "deb"}],
    }
    d = bootd_daemon(cfg, ns=lab.server)
    deadline = time.monotonic() + 60
    while not d.api.get("/api/v1/images")["images"] and time.monotonic() < deadline:
        time.sleep(0.2)
    # the import made v1 current for all groups; room1 gets its own v2
    draft = d.api.post("/api/v1/snapshots/deb@v1/draft", {"actor": "t"})
    d.api.post(f"/api/v1/snapshots/{draft['id']}/seal", {"actor": "t", "note": "room1 update"})
    assert d.bootctl("snapshot", "promote", "deb@v2", "--group", "room1").returncode == 0
    mac = "00:50:56:3a:00:99"
    pc = lab.add_client(mac=mac)
    got = tmp_path / "ip"
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(out=got))
    script.chmod(0o755)

    def pxe_boot() -> str:
        """A PXE DISCOVER/REQUEST (option 60 PXEClient, 93 = 7: UEFI x86-64), then its menu over HTTP."""
        pc.ns.run(["udhcpc", "-n", "-q", "-f", "-i", "eth0", "-s", str(script), "-t", "5", "-T", "1",
                   "-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"], timeout=60)
        return pc.ns.run(["curl", "-sSf", f"http://{lab.server_ip}:8080/boot/{mac}.ipxe"]).stdout

    menu = pxe_boot()
    assert re.search(r"^item deb Debian \(v1\)$", menu, re.M)  # unknown: no group, all groups' current
    unknown = json.loads(d.bootctl("--json", "host", "list", "--unknown", check=True).stdout)["unknown"]
    row = next(u for u in unknown if u["mac"] == mac)
    assert row["arch"] == "uefi-x64" and row["last_ip"] == got.read_text().strip()
    assert row["vendor"] == (vendor_of(mac))  # VMware where ieee-data is installed
    text = d.bootctl("host", "list", "--unknown", check=True).stdout
    assert mac in text and "uefi-x64" in text
    r = d.bootctl("host", "adopt", mac, "--group", "room1", "--name", "pc99", "--ip", "10.77.0.99", check=True)
    assert "adopted pc99" in r.stdout
    assert mac not in d.bootctl("host", "list", "--unknown", check=True).stdout
    menu = pxe_boot()
    assert got.read_text().strip() == "10.77.0.99"  # DHCP reserves its registered address
    default = re.search(r"choose --default (\S+)", menu).group(1)
    assert re.search(rf"^item {re.escape(default)} Debian \(v2\)$", menu, re.M)  # room1's snapshot
    body = re.search(rf"^:{re.escape(default)}\n(.*?)(?=^:|\Z)", menu, re.M | re.S).group(1)
    export = re.search(r"bootd\.nbd=\S+/(\S+)", body).group(1)
    disk = next(x for x in d.api.get(f"/api/v1/disks/{mac}")["disks"] if x["export"] == export)
    assert (disk["snapshot"], disk["host"]) == ("deb@v2", "pc99")  # its disk: an overlay over room1's snapshot
    leases = d.api.get("/api/v1/dhcp/leases")["leases"]
    assert any(x["mac"] == mac and x["ip"] == "10.77.0.99" and x["state"] == "bound" for x in leases)
    res = d.api.get("/api/v1/dhcp/reservations")["reservations"]
    assert any(r["mac"] == mac and r["ip"] == "10.77.0.99" and r["name"] == "pc99" for r in res)
