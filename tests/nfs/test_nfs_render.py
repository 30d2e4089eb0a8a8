"""The export entries bootd renders for client roots: read-only, served subnets only, both servers."""
from __future__ import annotations

import ipaddress

import pytest

from bootd.config import ConfigError, parse_config
from bootd.nfs import (
    NfsConfig,
    choose_server,
    cmdline_for,
    kernel_nfsd_available,
    render_ganesha_exports,
    render_kernel_exports,
    served_subnets,
    write_if_changed,
)

CONFIG = """
interfaces:
  - {name: br0, address: 10.77.0.1/24}
  - {name: br1, address: 10.78.5.1/16}
nfs:
  server: ganesha
  roots:
    - {name: debian, path: /srv/bootd/clientroot}
    - {name: test, path: /srv/bootd/clientroot-test, export_id: 77}
"""


def test_kernel_exports_are_read_only_and_limited_to_served_subnets():
    cfg = parse_config(CONFIG)
    text = render_kernel_exports(cfg.nfs, served_subnets(cfg))
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    opts = "ro,no_root_squash,async,no_subtree_check,insecure"
    assert lines == [f"/srv/bootd/clientroot 10.77.0.0/24({opts}) 10.78.0.0/16({opts})",
                     f"/srv/bootd/clientroot-test 10.77.0.0/24({opts}) 10.78.0.0/16({opts})"]


def test_ganesha_blocks_default_to_no_access_and_ro_for_served_subnets():
    cfg = parse_config(CONFIG)
    text = render_ganesha_exports(cfg.nfs, served_subnets(cfg))
    blocks = text.split("EXPORT {")[1:]
    assert len(blocks) == 2
    assert "Export_Id = 1000;" in blocks[0] and "Export_Id = 77;" in blocks[1]
    assert 'Pseudo = "/bootd/debian";' in blocks[0] and 'Path = "/srv/bootd/clientroot";' in blocks[0]
    for b in blocks:
        assert "    Access_Type = None;" in b                 # nobody by default ...
        assert "Clients = 10.77.0.0/24, 10.78.0.0/16;\n        Access_Type = RO;" in b   # ... read-only here
        assert "RW" not in b


def test_explicit_subnets_win_and_no_subnet_exports_nothing():
    cfg = parse_config(CONFIG + "  subnets: [10.77.0.0/25]\n")
    assert served_subnets(cfg) == [ipaddress.IPv4Network("10.77.0.0/25")]
    cfg = parse_config("nfs: {roots: [{name: a, path: /srv/a}]}")
    assert served_subnets(cfg) == []
    assert "EXPORT" not in render_ganesha_exports(cfg.nfs, [])
    assert "/srv/a" not in render_kernel_exports(cfg.nfs, [])


@pytest.mark.parametrize("root", [
    {"name": "a b", "path": "/srv/a"}, {"name": "x", "path": "/srv/a b"}, {"name": "x", "path": '/srv/"a'},
    {"name": "x", "path": "/srv/../etc"}, {"name": "x", "path": "srv/a"}, {"name": "x;reboot", "path": "/srv/a"},
    {"name": "x", "path": "/srv/a(rw)"}, {"name": "x", "path": "/srv/a,rw"},
])
def test_unsafe_roots_are_refused(root):
    with pytest.raises(ConfigError) as e:
        parse_config(f"nfs: {{roots: [{{name: '{root['name']}', path: '{root['path']}'}}]}}")
    assert e.value.problems[0].path.startswith("nfs.roots[0]")


def test_duplicates_are_refused():
    with pytest.raises(ValueError, match="used twice"):
        NfsConfig.model_validate({"roots": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]})
    with pytest.raises(ValueError, match="exported twice"):
        NfsConfig.model_validate({"roots": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/a"}]})


def test_cmdline_for_the_menu():
    cfg = parse_config(CONFIG)
    assert cmdline_for(cfg, "52:54:00:00:00:01") == \
        "root=/dev/nfs nfsroot=10.77.0.1:/bootd/debian,vers=4.2,ro ip=dhcp"
    assert cmdline_for(parse_config("interfaces: [{name: br0, address: 10.0.0.1/24}]"), "52:54:00:00:00:01") == ""


def test_auto_picks_the_kernel_server_only_where_it_exists():
    nfs = NfsConfig(server="auto")
    assert choose_server(nfs) == ("kernel" if kernel_nfsd_available() else "ganesha")
    assert choose_server(NfsConfig(server="kernel")) == "kernel"


def test_write_if_changed_is_atomic_and_idempotent(tmp_path):
    p = tmp_path / "d" / "bootd.exports"
    assert write_if_changed(p, "a\n") is True
    assert write_if_changed(p, "a\n") is False
    assert write_if_changed(p, "b\n") is True and p.read_text() == "b\n"
    assert [x.name for x in p.parent.iterdir()] == ["bootd.exports"]


def test_apply_to_a_missing_server_says_so_and_keeps_the_file(tmp_path):
    """The kernel server is absent on this machine (no nfsd, no exportfs): applying to it writes the
    exports file and reports why it could not be loaded, instead of failing silently or crashing."""
    from bootd.nfs import NfsError, apply_exports
    cfg = parse_config(CONFIG.replace("server: ganesha", "server: kernel")
                       + f"  exports_file: {tmp_path}/exports.d/bootd.exports\n"
                       + f"  ganesha_pidfile: {tmp_path}/none.pid\n")
    if kernel_nfsd_available():
        pytest.skip("a kernel NFS server is present here")
    with pytest.raises(NfsError, match="exportfs"):
        apply_exports(cfg)
    assert "/srv/bootd/clientroot 10.77.0.0/24(ro," in (tmp_path / "exports.d/bootd.exports").read_text()
    with pytest.raises(NfsError, match="exportfs"):   # a retry reloads again though the file is unchanged
        apply_exports(cfg, force=True)
    cfg = parse_config(CONFIG + f"  ganesha_exports_file: {tmp_path}/g.conf\n  ganesha_pidfile: {tmp_path}/none.pid\n")
    with pytest.raises(NfsError, match="not running"):
        apply_exports(cfg)
