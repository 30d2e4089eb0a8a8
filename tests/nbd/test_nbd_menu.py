"""The boot event is the menu fetch: a PC fetching its iPXE script over HTTP gets a fresh disk whose
export name is on its kernel command line; its next fetch (next boot) gets a new one."""
from __future__ import annotations

import re
import sys
import textwrap
import time

import pytest
from nbdtest import make_base

pytestmark = pytest.mark.netns

READ = textwrap.dedent("""
    import sys, nbd
    h = nbd.NBD(); h.connect_uri(sys.argv[1])
    print(h.get_size(), h.pread(4, 0).hex())
""")


def test_menu_fetch_starts_a_boot_with_a_fresh_disk(lab, bootd_daemon, tmp_path):
    src = make_base(tmp_path / "deb.qcow2", pattern=0xAB)
    a = lab.add_client("10.77.0.10")
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
           "dhcp": {"mode": "off"}, "tftp": {"enabled": False},
           "images": [{"name": "deb", "disk": str(src)}],
           "groups": [{"name": "room1", "images": ["deb"]}],
           "hosts": [{"mac": a.mac, "name": "pc-a", "ip": "10.77.0.10", "group": "room1"}]}
    d = bootd_daemon(cfg, ns=lab.server)
    deadline = time.monotonic() + 60
    while True:  # the configured disk is imported as deb@v1 in the background
        images = d.api.get("/api/v1/images")
        imgs = images.get("images", images) if isinstance(images, dict) else images
        if any(i.get("current") for i in imgs):
            break
        assert time.monotonic() < deadline, f"image not imported: {images}"
        time.sleep(0.2)
    url = f"http://10.77.0.1:8080/boot/{a.mac}.ipxe"
    names = []
    for _ in range(2):
        script = a.ns.run(["curl", "-sS", "--max-time", "20", url]).stdout
        m = re.search(r"bootd\.nbd=10\.77\.0\.1:10809/([A-Za-z0-9_-]+)", script)
        assert m, script
        names.append(m.group(1))
        out = a.ns.run([sys.executable, "-c", READ, f"nbd://10.77.0.1:10809/{m.group(1)}"]).stdout.split()
        assert out == [str(64 << 20), "abababab"]
    assert names[0] != names[1]
    listing = d.api.get("/api/v1/disks")["disks"]
    assert [e["export"] for e in listing] == [names[1]]
    assert listing[0]["host"] == "pc-a" and listing[0]["snapshot"].startswith("deb@")
    r = a.ns.run([sys.executable, "-c", READ, f"nbd://10.77.0.1:10809/{names[0]}"], check=False)
    assert r.returncode != 0  # the previous boot's disk is gone
    events = [e for e in d.api.get(f"/api/v1/hosts/{a.mac}")["events"] if e["kind"] == "disk"]
    assert any(e["detail"].get("action") == "boot" for e in events)
