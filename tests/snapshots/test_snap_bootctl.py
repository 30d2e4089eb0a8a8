"""bootctl image/snapshot against a running bootd daemon: the same workflow through the CLI and HTTP API,
every answer also as --json, refusals as exit status 1 with the reason on stderr."""
from __future__ import annotations

import json
import os

import pytest
from snaputil import MiB, make_raw_disk, mode_of, pattern_at, write_pattern

PC1 = "52:54:00:00:01:01"
PC2 = "52:54:00:00:01:02"


def config(tmp_path):
    return {
        "groups": [{"name": "lab1"}, {"name": "lab2"}],
        "hosts": [{"mac": PC1, "name": "pc1", "group": "lab1"},
                  {"mac": PC2, "name": "pc2", "group": "lab1"}],
        "storage": {"directory": str(tmp_path / "storage"), "min_free_mb": 1},
    }


def js(d, *args):
    r = d.bootctl("--json", *args)
    assert r.returncode == 0, f"bootctl {' '.join(args)}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def refused(d, *args) -> str:
    r = d.bootctl(*args)
    assert r.returncode == 1, f"bootctl {' '.join(args)} should be refused: {r.stdout}{r.stderr}"
    return r.stderr


def test_bootctl_workflow_against_daemon(bootd_daemon, tmp_path):
    disk = make_raw_disk(tmp_path / "os.raw", size_mb=64)
    d = bootd_daemon(config(tmp_path))

    r = d.bootctl("image", "import", "deb", str(disk), "--progress", "-m", "first import")
    assert r.returncode == 0, r.stderr
    assert "import deb: [" in r.stderr and "100.0%" in r.stderr and "done" in r.stderr
    assert "imported" in r.stdout and "deb@v1" in r.stdout
    images = js(d, "image", "list")["images"]
    assert [(i["name"], i["latest"], i["virtual_size"]) for i in images] == [("deb", "deb@v1", 64 * MiB)]
    assert "not a disk image" in refused(d, "image", "import", "junk", str(tmp_path / "bootd0" / "bootd.yaml"))
    assert "already exists" in refused(d, "image", "import", "deb", str(disk))

    js(d, "snapshot", "promote", "deb@v1", "-m", "everyone")
    draft = js(d, "snapshot", "draft", "deb", "-m", "updates")
    assert draft["name"] == f"deb@draft-{draft['id']}" and draft["depth"] == 2
    write_pattern(draft["path"], 0x5a, 20 * MiB)
    assert "needs a note" in refused(d, "snapshot", "seal", draft["name"], "--note", " ")
    v2 = js(d, "snapshot", "seal", str(draft["id"]), "--note", "updates 2026-11")
    assert v2["name"] == "deb@v2" and mode_of(v2["path"]) == 0o444

    js(d, "snapshot", "test", "deb@v2", "pc1", "-m", "try")
    which = js(d, "snapshot", "which", "pc1")["images"][0]
    assert (which["snapshot"], which["why"]) == ("deb@v2", "test")
    which = js(d, "snapshot", "which", "pc2")["images"][0]
    assert (which["snapshot"], which["why"]) == ("deb@v1", "all groups")
    assert "no group 'lab9'" in refused(d, "snapshot", "promote", "deb@v2", "--group", "lab9")
    r = js(d, "snapshot", "promote", "deb@v2", "--group", "lab1")
    assert r["current"] == "deb@v2" and r["group"] == "lab1"
    which = js(d, "snapshot", "which", PC2)["images"][0]
    assert (which["snapshot"], which["why"]) == ("deb@v2", "group lab1")
    assert pattern_at(d.storage / "snapshots" / v2["file"], 20 * MiB) == 0x5a

    r = js(d, "snapshot", "rollback", "deb", "--group", "lab1", "-m", "broken")
    assert (r["current"], r["rolled_back"]) == ("deb@v1", "deb@v2")  # lab1 had no earlier own promotion
    # lab1's own history is empty again: pc2 falls back to the all-groups current
    assert js(d, "snapshot", "which", "pc2")["images"][0]["snapshot"] == "deb@v1"
    js(d, "snapshot", "pin", "deb@v2", "pc2")
    assert js(d, "snapshot", "which", "pc2")["images"][0]["why"] == "pinned"
    err = refused(d, "snapshot", "delete", "deb@v2")
    assert "host 52:54:00:00:01:02 is pinned to it" in err and "in test on host 52:54:00:00:01:01" in err
    js(d, "snapshot", "unpin", "deb", "pc2")
    js(d, "snapshot", "test", "deb", "pc1", "--end")
    r = js(d, "snapshot", "delete", "deb@v2", "-m", "not needed", "--yes")
    assert r["deleted"] == ["deb@v2"] and not os.path.exists(v2["path"])

    # the HTTP API answers refusals with a status and a JSON reason
    from bootd.cli.api_client import ApiError
    for method, path, body, status, text in (
            ("get", "/api/v1/images/nosuch", None, 404, "no image named 'nosuch'"),
            ("post", "/api/v1/snapshots/deb@v1/draft", {"host": "nobody"}, 400, "neither a MAC address nor a host"),
            ("post", "/api/v1/images/deb/prune", {"keep": "x"}, 400, "must be a whole number"),
            ("post", "/api/v1/snapshots/deb@v1/promote", {}, 409, "already current for all groups"),
            ("post", "/api/v1/images", {"name": "x"}, 400, "give either file"),
            ("get", "/api/v1/snapshot-jobs/99", None, 404, "no job 99")):
        with pytest.raises(ApiError) as info:
            getattr(d.api, method)(path, body) if body is not None else getattr(d.api, method)(path)
        assert info.value.status == status and text in str(info.value), (path, info.value)

    # text output is for humans: a table with the chain depth and who uses what
    r = d.bootctl("snapshot", "list", "deb")
    assert r.returncode == 0 and "DEPTH" in r.stdout and "current:all" in r.stdout
    hist = js(d, "snapshot", "history", "deb")
    actions = [e["action"] for e in hist["audit"]]
    assert actions[:3] == ["image-import", "promote", "draft"] and actions[-1] == "delete"
    assert all("(uid 0)" in e["actor"] for e in hist["audit"])
    assert hist["audit"][-1]["reason"] == "not needed"
    assert js(d, "snapshot", "fsck")["clean"]
    stray = d.storage / "snapshots" / "deb" / "0badc0de.qcow2"
    stray.write_bytes(b"x")
    r = d.bootctl("snapshot", "fsck", "--check-only")
    assert r.returncode == 0 and "orphans moved: deb/0badc0de.qcow2" in r.stdout and stray.exists()
    assert js(d, "snapshot", "fsck")["orphans_moved"] == ["deb/0badc0de.qcow2"] and not stray.exists()
    assert js(d, "snapshot", "fsck", "--purge-lost-found")["purged"] == ["deb/0badc0de.qcow2"]

    # a restart keeps everything, and the start-up fsck finds nothing to fix
    d.stop()
    d.start()
    st = js(d, "status")
    snap_svc = [s for s in st["services"] if s["name"] == "snapshots"][0]
    assert snap_svc["fsck_clean"] is True and snap_svc["images"] == 1
    assert js(d, "snapshot", "which", "pc1")["images"][0]["snapshot"] == "deb@v1"


def test_deep_chain_warned_then_flattened_in_background(bootd_daemon, tmp_path):
    disk = make_raw_disk(tmp_path / "os.raw", size_mb=64)
    d = bootd_daemon(config(tmp_path))
    js(d, "image", "import", "deb", str(disk))
    body = {"actor": "test"}
    for i in range(2, 11):                      # v2..v10, each a layer on the previous: depth 10
        dr = d.api.post(f"/api/v1/snapshots/deb@v{i - 1}/draft", body)
        write_pattern(dr["path"], i, i * MiB)
        d.api.post(f"/api/v1/snapshots/{dr['id']}/seal", dict(body, note=f"layer {i}"))
    r = d.bootctl("snapshot", "list", "deb")
    assert "10!" in r.stdout and "warning: chain of 10 layers" in r.stdout and "flatten deb@v10" in r.stdout
    r = d.bootctl("snapshot", "promote", "deb@v10")
    assert r.returncode == 0 and "warning: deb@v10 has a chain of 10 layers" in r.stdout

    r = d.bootctl("snapshot", "flatten", "deb@v10", "--progress", "-m", "too deep")
    assert r.returncode == 0, r.stderr
    assert "flatten deb@v10: [" in r.stderr and "done" in r.stderr
    assert "chain depth 10 -> 1" in r.stdout
    v10 = js(d, "snapshot", "list", "deb")["snapshots"][-1]
    assert v10["name"] == "deb@v10" and v10["depth"] == 1 and "warnings" not in v10
    path = d.storage / "snapshots" / v10["file"]
    assert [pattern_at(path, i * MiB) for i in range(2, 11)] == list(range(2, 11))
    jobs = js(d, "snapshot", "jobs")["jobs"]
    assert [(j["kind"], j["state"], j["progress"]) for j in jobs] == [("import", "done", 1.0), ("flatten", "done", 1.0)]
    assert "already standalone" in refused(d, "snapshot", "flatten", "deb@v10")
    # v1..v9 are no longer needed by v10: prune can now delete all but the rollback target and the newest
    r = js(d, "snapshot", "prune", "deb", "--keep", "1", "--yes")
    assert r["deleted"] == [f"deb@v{i}" for i in range(9, 0, -1)]


def test_daemon_killed_mid_seal_recovers_at_start(bootd_daemon, tmp_path):
    """kill -9 of the daemon itself between chmod and commit of a seal: the restart's fsck puts the draft
    back (writable, unsealed) and says so; sealing again works."""
    disk = make_raw_disk(tmp_path / "os.raw", size_mb=64)
    d = bootd_daemon(config(tmp_path), env={"BOOTD_CRASH_AT": "seal.chmod-done"})
    js(d, "image", "import", "deb", str(disk))
    dr = js(d, "snapshot", "draft", "deb@v1")
    write_pattern(dr["path"], 0x66, 4 * MiB)
    r = d.bootctl("snapshot", "seal", dr["name"], "--note", "x")
    assert r.returncode == 1
    assert d.proc.wait(timeout=10) == 137
    assert mode_of(dr["path"]) == 0o444          # the crash left the file read-only, the row a draft
    d.extra_env = {}
    d.start()
    assert "snapshot fsck: fixed file mode deb@draft-" in d.log()
    snap_svc = [s for s in js(d, "status")["services"] if s["name"] == "snapshots"][0]
    assert snap_svc["fsck_clean"] is False
    assert mode_of(dr["path"]) == 0o644
    listed = js(d, "snapshot", "list", "deb")["snapshots"]
    assert [(s["name"], s["state"]) for s in listed] == [("deb@v1", "sealed"), (dr["name"], "draft")]
    v2 = js(d, "snapshot", "seal", dr["name"], "--note", "again")
    assert v2["name"] == "deb@v2" and pattern_at(v2["path"], 4 * MiB) == 0x66
    assert js(d, "snapshot", "fsck")["clean"]


def test_config_disk_imported_at_start_and_maintenance_draft(bootd_daemon, tmp_path):
    import time
    disk = make_raw_disk(tmp_path / "os.raw", size_mb=64)
    cfg = config(tmp_path)
    cfg["images"] = [{"name": "deb", "disk": str(disk)}]
    d = bootd_daemon(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        images = js(d, "image", "list")["images"]
        if images:
            break
        time.sleep(0.2)
    assert [(i["name"], i["latest"]) for i in images] == [("deb", "deb@v1")]
    # the first snapshot of a config image becomes current for all groups: the room boots at once
    while time.monotonic() < deadline and js(d, "snapshot", "which", "pc1")["images"][0]["snapshot"] is None:
        time.sleep(0.2)
    assert js(d, "snapshot", "which", "pc1")["images"][0]["snapshot"] == "deb@v1"
    hist = js(d, "snapshot", "history", "deb")["audit"]
    assert (hist[0]["action"], hist[0]["actor"], hist[0]["reason"]) == (
        "image-import", "bootd (config)", "image listed in the config")
    assert hist[1]["action"] == "promote" and hist[1]["actor"] == "bootd (config)"

    # a maintenance host boots a draft writable until it is sealed (or released)
    dr = js(d, "snapshot", "draft", "deb@v1", "--host", "pc1", "-m", "install packages on pc1")
    which = js(d, "snapshot", "which", "pc1")["images"][0]
    assert (which["snapshot"], which["why"]) == (dr["name"], "maintenance")
    assert f"host {PC1} boots it for maintenance" in refused(d, "snapshot", "delete", dr["name"])
    js(d, "snapshot", "end-maintenance", "deb", "pc1")
    assert js(d, "snapshot", "which", "pc1")["images"][0]["snapshot"] == "deb@v1"   # back to the room's current
    assert js(d, "snapshot", "delete", dr["name"], "--yes")["deleted"] == [dr["name"]]
    # a restart does not import it again
    d.stop()
    d.start()
    assert [i["snapshots"] for i in js(d, "image", "list")["images"]] == [1]
