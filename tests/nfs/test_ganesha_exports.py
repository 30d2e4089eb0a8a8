"""bootd exports a client root through NFS-Ganesha running in a private namespace: an NFS client in
the served subnet reads it, cannot write it, a client outside the served subnets cannot read it, and
the export disappears when the config drops it (reload)."""
from __future__ import annotations

import subprocess
import time

import pytest
from support import Ganesha

pytestmark = pytest.mark.netns

@pytest.fixture
def ganesha(lab, tmp_path):
    g = Ganesha(lab.server, tmp_path / "ganesha")
    try:
        yield {"exports": g.exports, "pidfile": g.pidfile, "log": g.log, "proc": g.proc}
    finally:
        g.stop()


def nfs_cat(ns, url: str) -> subprocess.CompletedProcess:
    return ns.run(["nfs-cat", url], check=False, timeout=30)


def test_client_root_exported_read_only_to_served_subnet_and_removed(lab, ganesha, bootd_daemon, tmp_path):
    root = tmp_path / "clientroot"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text('NAME="bootd client root"\n')
    (root / "hello.txt").write_text("hello from the client root\n")
    nfs = {"server": "ganesha", "roots": [{"name": "debian", "path": str(root)}],
           "ganesha_exports_file": str(ganesha["exports"]), "ganesha_pidfile": str(ganesha["pidfile"])}
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}], "dhcp": {"mode": "off"},
           "nbd": {"enabled": False}, "nfs": nfs, "images": [{"name": "debian"}],
           "groups": [{"name": "room1", "images": ["debian"]}],
           "hosts": [{"mac": "52:54:00:77:00:60", "name": "pc60", "group": "room1"}]}
    outsider = lab.add_interface("out0", "10.88.0.1/24")       # reaches the server, not a served subnet
    outsider.run(["ip", "addr", "add", "10.88.0.2/24", "dev", "eth0"])
    d = bootd_daemon(cfg, ns=lab.server)
    client = lab.add_client(address="10.77.0.60", mac="52:54:00:77:00:60")

    # the menu puts the client root on the kernel command line
    script = client.ns.run(["curl", "-sSf", "http://10.77.0.1:8080/boot/52:54:00:77:00:60.ipxe"]).stdout
    assert "root=/dev/nfs nfsroot=10.77.0.1:/bootd/debian,vers=4.2,ro ip=dhcp" in script, script

    st = d.bootctl("--json", "clientroot", "exports")
    assert st.returncode == 0, st.stdout + st.stderr
    assert '"10.77.0.1:/bootd/debian": "ok"' in st.stdout

    url = "nfs://10.77.0.1/bootd/debian/hello.txt?version=4"
    r = nfs_cat(client.ns, url)
    assert r.returncode == 0 and r.stdout == "hello from the client root\n", r.stderr
    ls = client.ns.run(["nfs-ls", "nfs://10.77.0.1/bootd/debian/etc?version=4"], check=False, timeout=30)
    assert "os-release" in ls.stdout, ls.stderr

    # read-only: a write through NFS is refused and changes nothing
    src = tmp_path / "evil.txt"
    src.write_text("x")
    w = client.ns.run(["nfs-cp", str(src), "nfs://10.77.0.1/bootd/debian/evil.txt?version=4"], check=False,
                      timeout=30)
    assert w.returncode != 0 and not (root / "evil.txt").exists()

    # not for addresses outside the served subnets (which do reach the NFS server itself)
    probe = "import socket; socket.create_connection(('10.88.0.1', 2049), timeout=5).close()"
    assert outsider.run(["python3", "-c", probe], check=False).returncode == 0
    r = nfs_cat(outsider, "nfs://10.88.0.1/bootd/debian/hello.txt?version=4")
    assert r.returncode != 0 and "hello" not in r.stdout

    # the config drops the root: after a reload the export is gone
    cfg2 = dict(cfg, nfs={**nfs, "roots": []}, storage=d.config_dict["storage"], api=d.config_dict["api"])
    d.write_config(cfg2)
    d.bootctl("reload", check=True)
    assert "EXPORT" not in ganesha["exports"].read_text()
    deadline = time.monotonic() + 10
    while nfs_cat(client.ns, url).returncode == 0:
        assert time.monotonic() < deadline, "the export is still served after the config dropped it"
        time.sleep(0.3)
    st = d.bootctl("--json", "clientroot", "exports")
    assert '"exports": []' in st.stdout
    script = client.ns.run(["curl", "-sSf", "http://10.77.0.1:8080/boot/52:54:00:77:00:60.ipxe"]).stdout
    assert "nfsroot=" not in script
    assert ganesha["proc"].poll() is None  # Ganesha reloaded, not killed
