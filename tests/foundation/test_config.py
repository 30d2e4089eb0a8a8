"""The config checker: every problem with file, line and field path; the example passes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bootd.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
interfaces:
  - name: br0
    address: 10.90.0.1/24
dhcp:
  mode: full
  pools:
    - interface: br0
      start: 10.90.0.100
      end: 10.90.0.199
images:
  - name: debian
groups:
  - name: room1
    images: [debian]
hosts:
  - mac: "52:54:00:00:00:01"
    name: pc01
    ip: 10.90.0.11
    group: room1
  - mac: "52:54:00:00:00:02"
    name: pc02
    ip: 10.90.0.12
    group: room1
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "bootd.yaml")
    return [str(p) for p in ei.value.problems]


def test_base_is_valid():
    cfg = parse_config(BASE, "bootd.yaml")
    assert cfg.host_by_mac("52:54:00:00:00:01").name == "pc01"


def test_example_config_passes_the_checker():
    r = subprocess.run([sys.executable, "-m", "bootd.cli.bootd_main", "check-config",
                        str(ROOT / "configs/example.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize("old,new,expected", [
    # bad MAC, on the line of the mac key of hosts[1]
    ('mac: "52:54:00:00:00:02"', 'mac: "52:54:00:00:00:zz"', "bootd.yaml:20 hosts[1].mac: not a MAC address"),
    # duplicate MAC
    ('mac: "52:54:00:00:00:02"', 'mac: "52-54-00-00-00-01"',
     "bootd.yaml:20 hosts[1].mac: duplicate MAC 52:54:00:00:00:01"),
    # duplicate IP
    ("ip: 10.90.0.12", "ip: 10.90.0.11", "bootd.yaml:22 hosts[1].ip: duplicate IP 10.90.0.11"),
    # wrong type
    ("  mode: full\n", "  mode: full\n  lease_time: forever\n",
     "bootd.yaml:6 dhcp.lease_time: Input should be a valid integer"),
    # unknown key
    ("    name: pc02\n", "    name: pc02\n    colour: blue\n", "bootd.yaml:22 hosts[1].colour: unknown key"),
    # pool outside the interface's subnet
    ("end: 10.90.0.199", "end: 10.91.0.199",
     "bootd.yaml:9 dhcp.pools[0].end: 10.91.0.199 is outside br0's subnet 10.90.0.0/24"),
    # bad enum value
    ("mode: full", "mode: sometimes", "bootd.yaml:5 dhcp.mode: Input should be 'full', 'proxy' or 'off'"),
    # reference to an unknown group
    ("    group: room1\n  - mac: \"52:54:00:00:00:02\"", "    group: room2\n  - mac: \"52:54:00:00:00:02\"",
     "bootd.yaml:19 hosts[0].group: unknown group 'room2'"),
    # bad IP address
    ("address: 10.90.0.1/24", "address: 10.90.0.300/24", "bootd.yaml:3 interfaces[0].address: "),
    # host IP outside every served subnet
    ("ip: 10.90.0.12", "ip: 192.168.1.12",
     "bootd.yaml:22 hosts[1].ip: 192.168.1.12 is in no served interface's subnet"),
    # missing required field
    ("    name: pc02\n", "", "bootd.yaml:20 hosts[1].name: required field is missing"),
    # a file that must exist
    ("  - name: debian\n", "  - name: debian\n    disk: /nonexistent/disk.qcow2\n",
     "bootd.yaml:12 images[0].disk: file not found: /nonexistent/disk.qcow2"),
    # duplicate key in a mapping
    ("  mode: full\n", "  mode: full\n  mode: proxy\n",
     "bootd.yaml:6: YAML syntax error: duplicate key 'mode' (first on line 5)"),
    # a kernel path the pxelinux/GRUB menus could not quote
    ("  - name: debian\n", "  - name: debian\n    kernel: my kernel\n",
     "bootd.yaml:12 images[0].kernel: a path in the boot root without spaces"),
    # pool start after end
    ("start: 10.90.0.100", "start: 10.90.0.250", "bootd.yaml:7 dhcp.pools[0]: pool end is before its start"),
])
def test_bad_input_reported_with_line_and_path(old, new, expected):
    assert old in BASE
    found = problems(BASE.replace(old, new, 1))
    assert any(p.startswith(expected) for p in found), found


def test_yaml_syntax_error_has_line():
    found = problems(BASE.replace("    name: pc02", "    name: [pc02"))
    assert len(found) == 1 and found[0].startswith("bootd.yaml:") and "YAML syntax error" in found[0]
    line = int(found[0].split(":")[1].split()[0])
    assert 20 <= line <= 23


def test_every_problem_reported_at_once():
    text = BASE.replace('"52:54:00:00:00:02"', '"nope"').replace("lease", "x").replace("mode: full", "mode: maybe")
    found = problems(text)
    assert any("hosts[1].mac" in p for p in found) and any("dhcp.mode" in p for p in found)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert str(ei.value.problems[0]).endswith("nope.yaml: file not found")


def test_check_config_cli_exit_code_and_output(tmp_path):
    bad = tmp_path / "bootd.yaml"
    bad.write_text(BASE.replace('mac: "52:54:00:00:00:02"', 'mac: "52:54:00:00:00:zz"'))
    r = subprocess.run([sys.executable, "-m", "bootd.cli.bootd_main", "check-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "bootd.yaml:20 hosts[1].mac: not a MAC address" in r.stderr


def test_top_level_must_be_mapping():
    assert problems("- a\n- b\n") == ["bootd.yaml:1: the top level must be a mapping of sections"]


@pytest.mark.parametrize("section,expected", [
    ("state:\n  url: mysql://bootd@db/bootd\n", "bootd.yaml:25 state.url: must be a postgresql:// URL"),
    ("state:\n  heartbeat: 3\n  dhcp_takeover: 5\n",
     "bootd.yaml:24 state: heartbeat (3.0 s) must be at most half of dhcp_takeover (5.0 s)"),
    ("state:\n  dhcp_takeover: 1\n", "bootd.yaml:25 state.dhcp_takeover: Input should be greater than or equal to 2"),
])
def test_state_section_refused_with_line_and_reason(section, expected):
    found = problems(BASE + section)
    assert any(p.startswith(expected) for p in found), found


def test_state_section_accepted():
    cfg = parse_config(BASE + "state:\n  url: postgresql://bootd@db.example.org/bootd\n  server_name: bootd-a\n"
                              "storage:\n  snapshots: /srv/layers\n", "bootd.yaml")
    assert cfg.state.url == "postgresql://bootd@db.example.org/bootd" and cfg.state.server_name == "bootd-a"
    assert str(cfg.snapshots_dir) == "/srv/layers"
