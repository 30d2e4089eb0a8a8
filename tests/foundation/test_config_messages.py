"""`bootd check-config` messages for the mistakes lab admins make (issue 16): each says what is wrong on the
line of the field at fault, once, and how to fix it (quote it, add the prefix, which MAC was meant)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bootd.config import parse_config
from bootd.macaddr import normalize_mac, parse_mac

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
  - name: windows
groups:
  - name: room1
    images: [debian, windows]
    default_image: debian
hosts:
  - mac: "52:54:00:00:00:01"
    name: pc01
    group: room1
  - mac: "52:54:00:00:00:02"
    name: pc02
    group: room1
"""


def check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    """check-config on `text` as bootd.yaml: its exit status and its problem lines."""
    path = tmp_path / "bootd.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "bootd.cli.bootd_main", "check-config", str(path)],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.startswith("bootd.yaml:")]
    return r.returncode, lines


def edited(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


def test_base_passes(tmp_path):
    assert check(tmp_path, BASE) == (0, [])


def test_mac_that_yaml_read_as_a_number_says_quote_it(tmp_path):
    # all pairs below 60: YAML 1.1 reads it as a base-60 number; twelve digits are a plain number
    rc, lines = check(tmp_path, edited('mac: "52:54:00:00:00:01"', "mac: 52:54:00:12:34:56")
                      .replace('mac: "52:54:00:00:00:02"', "mac: 525400123457"))
    assert rc == 1
    assert lines == [
        'bootd.yaml:18 hosts[0].mac: YAML reads 52:54:00:12:34:56 as the number 41135085296: '
        'quote it ("52:54:00:12:34:56")',
        'bootd.yaml:21 hosts[1].mac: YAML reads 525400123457 as the number 525400123457: '
        'quote it ("525400123457")',
    ]


def test_off_read_as_false_says_quote_it(tmp_path):
    rc, lines = check(tmp_path, edited("  mode: full\n", "  mode: off\n"))
    assert rc == 1
    assert lines == ['bootd.yaml:5 dhcp.mode: YAML reads off as false: quote it ("off")']
    assert check(tmp_path, edited("  mode: full\n", '  mode: "off"\n'))[0] == 0


def test_bare_address_is_reported_on_the_address_itself(tmp_path):
    # a bare address would be a /32: before, every pool bound was reported "outside" it instead
    rc, lines = check(tmp_path, edited("address: 10.90.0.1/24", "address: 10.90.0.1"))
    assert rc == 1
    assert lines == ["bootd.yaml:3 interfaces[0].address: 10.90.0.1 has no prefix length: write bootd's "
                     "address with its subnet, e.g. 10.90.0.1/24"]


def test_bad_mac_repeats_the_value(tmp_path):
    rc, lines = check(tmp_path, edited('mac: "52:54:00:00:00:02"', 'mac: "52:54:00:00:00:zz"'))
    assert rc == 1
    assert lines == ["bootd.yaml:21 hosts[1].mac: not a MAC address: '52:54:00:00:00:zz' "
                     "(write it as aa:bb:cc:dd:ee:ff)"]


def test_dashed_and_dotted_macs_are_normalised(tmp_path):
    text = edited('mac: "52:54:00:00:00:01"', "mac: 52-54-00-AA-00-01").replace(
        'mac: "52:54:00:00:00:02"', "mac: 5254.00aa.0002")
    assert check(tmp_path, text) == (0, [])
    cfg = parse_config(text, "bootd.yaml")
    assert [h.mac for h in cfg.hosts] == ["52:54:00:aa:00:01", "52:54:00:aa:00:02"]
    # one identity whatever the spelling: the dotted form of pc01's MAC is a duplicate of it
    rc, lines = check(tmp_path, edited('mac: "52:54:00:00:00:02"', "mac: 5254.0000.0001"))
    assert (rc, lines) == (1, ["bootd.yaml:21 hosts[1].mac: duplicate MAC 52:54:00:00:00:01 (also hosts[0])"])
    assert normalize_mac(" AABB.CCDD.EEFF ") == "aa:bb:cc:dd:ee:ff"
    assert parse_mac("aabb.ccdd") is None and parse_mac("aabb.ccdd.eeff.0011") is None


def test_typo_in_group_images_is_one_message(tmp_path):
    # default_image is right, the list has the typo: before, a second message said the default was missing
    rc, lines = check(tmp_path, edited("images: [debian, windows]", "images: [debain, windows]"))
    assert (rc, lines) == (1, ["bootd.yaml:15 groups[0].images[0]: unknown image 'debain'"])
    # the same typo in a host's images and its default_image: said once, on the list
    text = edited("    name: pc02\n", "    name: pc02\n    images: [debain]\n    default_image: debain\n")
    assert check(tmp_path, text) == (1, ["bootd.yaml:23 hosts[1].images[0]: unknown image 'debain'"])
    # a default that is a real image but not in the group's list is still reported
    rc, lines = check(tmp_path, edited("images: [debian, windows]", "images: [windows]"))
    assert (rc, lines) == (1, ["bootd.yaml:16 groups[0].default_image: 'debian' is not in this group's images"])


def test_http_off_while_dhcp_hands_ipxe_an_http_url_is_refused(tmp_path):
    text = BASE + "http:\n  enabled: false\n"
    rc, lines = check(tmp_path, text)
    assert rc == 1
    assert lines == ["bootd.yaml:25 http.enabled: false, but dhcp.mode 'full' hands iPXE clients "
                     "http://{server}:{http_port}/boot/{mac}.ipxe on bootd's own HTTP server: enable http, "
                     "or point dhcp.ipxe_script_url at another server"]
    # the same in proxy mode
    rc, lines = check(tmp_path, text.replace("  mode: full\n", "  mode: proxy\n"))
    assert rc == 1 and lines[0].startswith("bootd.yaml:25 http.enabled: false, but dhcp.mode 'proxy'")
    # no contradiction: DHCP off, or the script on another server
    assert check(tmp_path, text.replace("  mode: full\n", '  mode: "off"\n')) == (0, [])
    other = text.replace("  mode: full\n", "  mode: full\n  ipxe_script_url: http://10.90.0.5/boot/{mac}.ipxe\n")
    assert check(tmp_path, other) == (0, [])
