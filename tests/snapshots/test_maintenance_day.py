"""A maintenance day as a new admin lives it (issue 16), against the real daemon and a real NBD client in
a lab namespace: draft for the teacher PC, it boots, writes and shuts down, and `seal` works within
seconds (also after end-maintenance and after a bootd restart); `disk reset` cannot lose a draft and
lists what it removes before it does; promote and rollback name the hosts a test or pin keeps behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from snaputil import MiB, make_raw_disk, pattern_at

TEACHER_IP = "10.77.0.10"

# the teacher PC's NBD client: opens its export, writes a pattern, flushes and disconnects (a shutdown)
WRITE_AND_LEAVE = textwrap.dedent("""
    import sys, nbd
    h = nbd.NBD(); h.connect_uri(sys.argv[1])
    h.pwrite(bytes([int(sys.argv[2])]) * (1 << 20), int(sys.argv[3])); h.flush(); h.shutdown()
    print("done", flush=True)
""")


def js(d, *args):
    r = d.bootctl("--json", *args)
    assert r.returncode == 0, f"bootctl {' '.join(args)}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def lab_config(teacher, release_after: float) -> dict:
    return {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
            "dhcp": {"mode": "off"}, "tftp": {"enabled": False},
            "groups": [{"name": "room1"}],
            "hosts": [{"mac": teacher.mac, "name": "teacher", "ip": TEACHER_IP, "group": "room1"}],
            "nbd": {"maintenance_release_after": release_after},
            "storage": {"min_free_mb": 1}}


def imported(d, tmp_path) -> None:
    disk = make_raw_disk(tmp_path / "os.raw", size_mb=32)
    js(d, "image", "import", "deb", str(disk))
    js(d, "snapshot", "promote", "deb@v1")


def teacher_writes(d, teacher, draft: str, pattern: int, at: int) -> None:
    """Boot the teacher on its draft, and its NBD client writes `pattern` at `at` and disconnects."""
    exp = js(d, "disk", "boot", "teacher", "--snapshot", draft)
    assert exp["snapshot"] == draft and exp["persistent"]
    out = teacher.ns.run([sys.executable, "-c", WRITE_AND_LEAVE, exp["uri"], str(pattern), str(at)]).stdout
    assert out.strip() == "done"


def seal_within(d, draft: str, seconds: float) -> dict:
    """`bootctl snapshot seal` until it works (bounded): it may be refused only as "open by a client"."""
    deadline = time.monotonic() + seconds
    while True:
        r = d.bootctl("--json", "snapshot", "seal", draft, "--note", "maintenance day")
        if r.returncode == 0:
            return json.loads(r.stdout)
        assert "open by a client" in r.stderr, r.stderr
        assert time.monotonic() < deadline, f"{draft} still cannot be sealed after {seconds} s: {r.stderr}"
        time.sleep(0.5)


@pytest.mark.netns
def test_teacher_shut_down_then_seal_works_within_seconds(lab, bootd_daemon, tmp_path):
    teacher = lab.add_client(TEACHER_IP)
    d = bootd_daemon(lab_config(teacher, release_after=1), ns=lab.server)
    imported(d, tmp_path)
    draft = js(d, "snapshot", "draft", "deb", "--host", "teacher")["name"]
    which = js(d, "snapshot", "which", "teacher")["images"][0]
    assert (which["snapshot"], which["why"]) == (draft, "maintenance")
    teacher_writes(d, teacher, draft, 0x5A, 4 * MiB)
    sealed = seal_within(d, draft, 30)  # nbd.reap_after (4 h) is not what it waits for
    assert sealed["name"] == "deb@v2"
    assert pattern_at(d.storage / "snapshots" / sealed["file"], 4 * MiB) == 0x5A
    assert pattern_at(d.storage / "snapshots" / sealed["file"], 8 * MiB) == 0x11  # v1's block under it
    assert not js(d, "disk", "list")["disks"]  # the draft's export went; no overlay is left behind


@pytest.mark.netns
def test_end_maintenance_and_restart_release_the_draft_at_once(lab, bootd_daemon, tmp_path):
    teacher = lab.add_client(TEACHER_IP)
    d = bootd_daemon(lab_config(teacher, release_after=3600), ns=lab.server)  # the grace never ends here
    imported(d, tmp_path)
    draft = js(d, "snapshot", "draft", "deb", "--host", "teacher")["name"]
    teacher_writes(d, teacher, draft, 0x5B, 4 * MiB)
    r = d.bootctl("snapshot", "seal", draft, "--note", "too early")
    assert r.returncode == 1 and "open by a client" in r.stderr
    ended = js(d, "snapshot", "end-maintenance", "deb", "teacher")
    v2 = seal_within(d, draft, 0)  # at once
    assert ended["ended"] == draft and ended["released"] == [draft]
    assert pattern_at(d.storage / "snapshots" / v2["file"], 4 * MiB) == 0x5B

    # the next maintenance: the teacher writes and is shut down, then bootd restarts
    draft = js(d, "snapshot", "draft", "deb@v2", "--host", "teacher")["name"]
    teacher_writes(d, teacher, draft, 0x5C, 6 * MiB)
    d.stop()
    d.start()
    v3 = seal_within(d, draft, 0)
    assert v3["name"] == "deb@v3"
    assert [pattern_at(d.storage / "snapshots" / v3["file"], at) for at in (4 * MiB, 6 * MiB)] == [0x5B, 0x5C]


@pytest.mark.netns
def test_disk_reset_cannot_lose_a_draft_and_lists_what_it_removes(lab, bootd_daemon, tmp_path):
    teacher = lab.add_client(TEACHER_IP)
    pc07 = lab.add_client("10.77.0.17")
    cfg = lab_config(teacher, release_after=1)
    cfg["hosts"].append({"mac": pc07.mac, "name": "pc07", "ip": "10.77.0.17", "group": "room1"})
    d = bootd_daemon(cfg, ns=lab.server)
    imported(d, tmp_path)
    draft = js(d, "snapshot", "draft", "deb", "--host", "teacher")
    exp = js(d, "disk", "boot", "teacher", "--snapshot", draft["name"])
    client = teacher.ns.popen([sys.executable, "-c", "import sys, nbd; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
                               "h.pwrite(b'\\x5d' * (1 << 20), 4 << 20); h.flush(); print('w', flush=True); "
                               "sys.stdin.readline(); h.shutdown()", exp["uri"]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "w"
        for args in (("--yes",), ()):  # refused either way, and nothing is touched
            r = d.bootctl("disk", "reset", "teacher", *args)
            assert r.returncode == 1, r.stdout + r.stderr
            assert "teacher is in maintenance" in r.stderr and f"draft {draft['name']}" in r.stderr
            assert f"bootctl snapshot seal {draft['name']}" in r.stderr
            assert f"bootctl snapshot delete {draft['name']}" in r.stderr
            assert "bootctl snapshot end-maintenance deb teacher" in r.stderr
            assert os.path.exists(draft["path"])
        assert [e["export"] for e in js(d, "disk", "list")["disks"]] == [exp["name"]]  # still served
    finally:
        client.stdin.close()
        client.wait(timeout=30)
    v2 = seal_within(d, draft["name"], 30)
    assert pattern_at(d.storage / "snapshots" / v2["file"], 4 * MiB) == 0x5D

    # an ordinary PC's disk: without --yes the reset lists what it would remove and removes nothing
    ordinary = js(d, "disk", "boot", "pc07", "--snapshot", "deb@v1")
    overlay = next(p for p in (d.storage / "disks" / "ephemeral").iterdir())
    r = d.bootctl("disk", "reset", "pc07")
    assert r.returncode == 1
    assert "disk reset pc07 would remove:" in r.stderr and f"export of boot {ordinary['boot']} over deb@v1" in r.stderr
    assert overlay.name in r.stderr and "nothing removed; add --yes" in r.stderr
    assert overlay.exists() and [e["export"] for e in js(d, "disk", "list")["disks"]] == [ordinary["name"]]
    r = d.bootctl("disk", "reset", "pc07", "--yes")
    assert r.returncode == 0 and overlay.name in r.stdout, r.stdout + r.stderr
    assert not overlay.exists() and not js(d, "disk", "list")["disks"]


def test_promote_and_rollback_name_the_hosts_a_test_or_pin_keeps_behind(bootd_daemon, tmp_path):
    cfg = {"groups": [{"name": "room1"}, {"name": "room2"}],
           "hosts": [{"mac": "52:54:00:00:07:07", "name": "pc07", "group": "room1"},
                     {"mac": "52:54:00:00:07:08", "name": "pc08", "group": "room1"},
                     {"mac": "52:54:00:00:07:09", "name": "pc09", "group": "room1"},
                     {"mac": "52:54:00:00:07:20", "name": "pc20", "group": "room2"}],
           "nbd": {"enabled": False}, "storage": {"min_free_mb": 1}}
    d = bootd_daemon(cfg)
    disk = make_raw_disk(tmp_path / "os.raw", size_mb=32)
    js(d, "image", "import", "deb", str(disk))
    draft = js(d, "snapshot", "draft", "deb")
    js(d, "snapshot", "seal", draft["name"], "--note", "v2")
    js(d, "snapshot", "promote", "deb@v1", "--group", "room1")
    js(d, "snapshot", "test", "deb@v2", "pc07")
    js(d, "snapshot", "pin", "deb@v1", "pc08")
    js(d, "snapshot", "pin", "deb@v2", "pc20")  # another room: not named for room1

    r = d.bootctl("snapshot", "promote", "deb@v2", "--group", "room1")
    assert r.returncode == 0, r.stderr
    assert "note: host pc08 still is pinned to deb@v1 and keeps booting it" in r.stdout
    assert "bootctl snapshot unpin deb pc08" in r.stdout and "pc20" not in r.stdout
    r = d.bootctl("snapshot", "rollback", "deb", "--group", "room1")
    assert r.returncode == 0, r.stderr
    assert "rolled back group room1 from deb@v2 to deb@v1" in r.stdout
    assert "note: host pc07 still tests deb@v2 and keeps booting it" in r.stdout
    assert "bootctl snapshot test deb pc07 --end" in r.stdout and "pc09" not in r.stdout
    which = js(d, "snapshot", "which", "pc07")["images"][0]
    assert (which["snapshot"], which["why"], which["group_boots"]) == ("deb@v2", "test", "deb@v1")
    r = d.bootctl("snapshot", "which", "pc07")
    assert "test: not its group's deb@v1" in r.stdout
    # all groups: every host on its own test or pin is named
    r = js(d, "snapshot", "promote", "deb@v2")
    assert {(h["name"], h["kind"], h["snapshot"]) for h in r["hosts_not_following"]} == {
        ("pc07", "test", "deb@v2"), ("pc08", "pin", "deb@v1"), ("pc20", "pin", "deb@v2")}


def test_audit_rows_are_pruned_after_their_own_longer_retention(tmp_path):
    from bootd.state import open_state
    st = open_state(tmp_path / "state.db")
    try:
        now = time.time()
        st.set_event_limits(retention=86400, max_rows=1000, coalesce=0, audit_retention=10 * 86400)
        with st.transaction() as cur:
            for age_days in (20, 5, 0):
                cur.execute("INSERT INTO audit(at, actor, action) VALUES (?, 'test', ?)",
                            (now - age_days * 86400, f"age-{age_days}"))
        st.record_event("52:54:00:00:00:01", "dhcp", {"n": 1}, ts=now - 2 * 86400)  # past the event retention
        st.enforce_event_limits(now)
        assert [r["action"] for r in st.query("SELECT action FROM audit ORDER BY id")] == ["age-5", "age-0"]
        assert not st.events()
    finally:
        st.close()


def test_snapshot_delete_and_prune_list_what_goes_and_need_yes(bootd_daemon, tmp_path):
    d = bootd_daemon({"nbd": {"enabled": False}, "storage": {"min_free_mb": 1}})
    js(d, "image", "import", "deb", str(make_raw_disk(tmp_path / "os.raw", size_mb=32)))
    v2 = js(d, "snapshot", "seal", js(d, "snapshot", "draft", "deb@v1")["name"], "--note", "v2")
    v3 = js(d, "snapshot", "seal", js(d, "snapshot", "draft", "deb@v1")["name"], "--note", "v3")
    js(d, "snapshot", "promote", "deb@v3")
    r = d.bootctl("snapshot", "delete", "deb@v3")  # in use: refused before any question
    assert r.returncode == 1 and "cannot delete deb@v3" in r.stderr and "would remove" not in r.stderr
    r = d.bootctl("snapshot", "prune", "deb", "--keep", "1")
    assert r.returncode == 1 and "snapshot prune deb would remove:\n  deb@v2" in r.stderr, r.stderr
    assert "nothing removed; add --yes" in r.stderr and os.path.exists(v2["path"])
    r = d.bootctl("snapshot", "delete", "deb@v2")
    assert r.returncode == 1 and f"snapshot deb@v2 and its file {v2['path']}" in r.stderr, r.stderr
    assert os.path.exists(v2["path"]) and [s["name"] for s in js(d, "snapshot", "list", "deb")["snapshots"]] == [
        "deb@v1", "deb@v2", "deb@v3"]
    assert js(d, "snapshot", "delete", "deb@v2", "--yes")["deleted"] == ["deb@v2"]
    assert not os.path.exists(v2["path"]) and os.path.exists(v3["path"])
