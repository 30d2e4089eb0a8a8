"""The admin workflow on real qcow2 files: import, draft, write, seal, test, promote, rollback x2, pin,
flatten, prune — and what each step exposes, read back through qemu-nbd with libnbd."""
from __future__ import annotations

import hashlib
import os

from snaputil import MiB, backing_of, mode_of, pattern_at, read_bytes, write_pattern

HOST_A = "52:54:00:00:00:0a"   # the admin's test PC, in room lab1
HOST_B = "52:54:00:00:00:0b"   # an ordinary PC in lab1
HOST_C = "52:54:00:00:00:0c"   # a PC in lab2
HOST_D = "52:54:00:00:00:0d"   # a PC in lab1 pinned to a snapshot


def boots(store, mac, group):
    snap = store.resolve_for_host(mac, group, "deb")
    return snap.name if snap else None


def digest(path, size):
    return hashlib.sha256(read_bytes(path, 0, size)).hexdigest()


def test_admin_workflow(store, raw_disk):
    who = "alice"
    v1 = store.import_image("deb", str(raw_disk), who, "first import")
    assert v1.name == "deb@v1" and v1.sealed and v1.depth == 1
    assert mode_of(v1.path) == 0o444
    assert pattern_at(v1.path, 8 * MiB) == 0x11
    assert pattern_at(v1.path, 16 * MiB) == 0
    assert boots(store, HOST_B, "lab1") is None   # nothing promoted yet

    store.promote("deb@v1", None, who, "roll out to every room")
    store.promote("deb@v1", "lab1", who, "lab1 too")
    assert boots(store, HOST_B, "lab1") == "deb@v1"
    assert boots(store, HOST_C, "lab2") == "deb@v1"

    # draft -> write into it -> seal
    d = store.draft("deb@v1", who, "install updates")
    assert d.state == "draft" and d.version is None and d.depth == 2
    assert backing_of(d.path) == os.path.basename(v1.path)
    assert mode_of(d.path) == 0o644
    write_pattern(d.path, 0x22, 16 * MiB)
    assert pattern_at(d.path, 16 * MiB) == 0x22 and pattern_at(d.path, 8 * MiB) == 0x11
    assert pattern_at(v1.path, 16 * MiB) == 0           # the parent never changes
    v2 = store.seal(d.id, "security updates", who)
    assert v2.name == "deb@v2" and v2.note == "security updates" and mode_of(v2.path) == 0o444

    # test on one host only
    store.test("deb@v2", HOST_A, who, "try it")
    assert boots(store, HOST_A, "lab1") == "deb@v2"
    assert boots(store, HOST_B, "lab1") == "deb@v1"
    assert pattern_at(store.resolve_for_host(HOST_A, "lab1", "deb").path, 16 * MiB) == 0x22

    # promote for lab1; lab2 keeps the all-groups current
    r = store.promote("deb@v2", "lab1", who, "tested fine")
    assert r["previous"] == "deb@v1"
    store.end_test("deb", HOST_A, who)
    assert boots(store, HOST_A, "lab1") == "deb@v2"
    assert boots(store, HOST_B, "lab1") == "deb@v2"
    assert boots(store, HOST_C, "lab2") == "deb@v1"

    # a third snapshot on top of v2
    d3 = store.draft("deb@v2", who)
    write_pattern(d3.path, 0x33, 24 * MiB)
    v3 = store.seal(d3.id, "new compiler", who)
    assert v3.depth == 3
    store.promote("deb@v3", "lab1", who)
    b = store.resolve_for_host(HOST_B, "lab1", "deb")
    assert b.name == "deb@v3"
    assert [pattern_at(b.path, o * MiB) for o in (8, 16, 24)] == [0x11, 0x22, 0x33]
    assert store.previous_for("lab1", "deb").name == "deb@v2"

    # rollback twice walks back the history; a third has nowhere to go
    r = store.rollback("deb", "lab1", who, "compiler broken")
    assert (r["current"], r["rolled_back"]) == ("deb@v2", "deb@v3")
    b = store.resolve_for_host(HOST_B, "lab1", "deb")
    assert b.name == "deb@v2" and pattern_at(b.path, 24 * MiB) == 0
    r = store.rollback("deb", "lab1", who, "updates broken too")
    assert (r["current"], r["rolled_back"]) == ("deb@v1", "deb@v2")
    b = store.resolve_for_host(HOST_B, "lab1", "deb")
    assert b.name == "deb@v1" and pattern_at(b.path, 16 * MiB) == 0
    assert store.previous_for("lab1", "deb") is None

    # pin one host to v3 whatever lab1's current is
    store.pin("deb@v3", HOST_D, who, "needs the new compiler")
    assert boots(store, HOST_D, "lab1") == "deb@v3"
    assert boots(store, HOST_B, "lab1") == "deb@v1"

    # v2 is v3's backing file: prune keeps it until v3 is flattened
    plan = store.prune("deb", 1, who, dry_run=True)
    assert plan["deleted"] == [] and "backing file of deb@v3" in plan["kept"]["deb@v2"]
    before = digest(v3.path, 32 * MiB)
    r = store.flatten("deb@v3", who, "shorten the chain")
    assert r["old_depth"] == 3
    v3f = store.get(v3.id)
    assert v3f.depth == 1 and v3f.backing_id is None and backing_of(v3f.path) is None
    assert mode_of(v3f.path) == 0o444
    assert digest(v3f.path, 32 * MiB) == before

    r = store.prune("deb", 1, who, "make room")
    assert r["deleted"] == ["deb@v2"]
    assert "it is current for all groups" in r["kept"]["deb@v1"][0] or r["kept"]["deb@v1"]
    assert not os.path.exists(v2.path)
    assert store.get(v2.id).state == "deleted"
    # what every host boots is untouched by the prune
    assert boots(store, HOST_D, "lab1") == "deb@v3" and boots(store, HOST_B, "lab1") == "deb@v1"
    assert [pattern_at(v3f.path, o * MiB) for o in (8, 16, 24)] == [0x11, 0x22, 0x33]

    # the audit log says who did what, when and why, in order
    log = store.audit_log("deb")
    actions = [e["action"] for e in log]
    assert actions == ["image-import", "promote", "promote", "draft", "seal", "test", "promote", "end-test",
                       "draft", "seal", "promote", "rollback", "rollback", "pin", "flatten", "prune"]
    assert all(e["actor"] == who and e["at"] > 0 for e in log)
    assert log[11]["reason"] == "compiler broken"
    assert store.fsck().clean


def test_adopt_a_host_layer_as_draft(store, raw_disk, tmp_path):
    """The NBD engine's `bootctl disk commit`: a per-host overlay (backing = the snapshot's absolute path,
    elsewhere on disk) becomes a draft of the image, then a sealed snapshot with the host's writes."""
    import subprocess

    from snapshots.errors import Refused
    v1 = store.import_image("deb", str(raw_disk), "t")
    layer = tmp_path / "host-overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", v1.path, "-F", "qcow2", str(layer)], check=True)
    write_pattern(layer, 0x77, 4 * MiB)
    other = tmp_path / "unrelated.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "64M"], check=True)
    try:
        store.draft_from_layer(v1.id, str(other))
    except Refused as exc:
        assert "has no backing file" in str(exc)
    else:
        raise AssertionError("a layer without backing was adopted")
    d = store.draft_from_layer(v1.id, str(layer), note="from pc1", actor="nbd")
    assert d.state == "draft" and d.parent_id == v1.id and not layer.exists()
    assert backing_of(d.path) == os.path.basename(v1.path)
    assert pattern_at(d.path, 4 * MiB) == 0x77 and pattern_at(d.path, 8 * MiB) == 0x11
    v2 = store.seal(d.id, "changes made on pc1", "t")
    assert pattern_at(v2.path, 4 * MiB) == 0x77
    assert store.fsck().clean


def test_clients_reading_through_a_chain_survive_flatten_and_prune(store, raw_disk):
    """A client that opened v3 (through v2 and v1) keeps reading the same bytes while v3 is flattened and
    v2 is pruned underneath it: files are replaced by rename and removed by unlink, never rewritten."""
    import nbd
    store.import_image("deb", str(raw_disk), "t")
    for parent, pat, off in (("deb@v1", 0x22, 16), ("deb@v2", 0x33, 24)):
        d = store.draft(parent, "t")
        write_pattern(d.path, pat, off * MiB)
        store.seal(d.id, hex(pat), "t")
    v3 = store.resolve("deb@v3")
    store.promote("deb@v3", None, "t")
    h = nbd.NBD()
    h.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", "qcow2", v3.path])
    try:
        before = bytes(h.pread(32 * MiB, 0))
        store.flatten("deb@v3", "t")
        r = store.prune("deb", 1, "t")
        assert r["deleted"] == ["deb@v2", "deb@v1"]    # the whole old chain goes, the client reads on
        assert bytes(h.pread(32 * MiB, 0)) == before
    finally:
        h.shutdown()
    assert digest(v3.path, 32 * MiB) == hashlib.sha256(before).hexdigest()


def test_import_of_a_qcow2_chain_makes_a_standalone_v1(store, raw_disk, tmp_path):
    import subprocess
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw_disk), str(base)], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    write_pattern(top, 0x44, 12 * MiB)
    v1 = store.import_image("other", str(top), "t")
    assert v1.depth == 1 and backing_of(v1.path) is None
    assert [pattern_at(v1.path, o * MiB) for o in (8, 12)] == [0x11, 0x44]


def test_concurrent_changes_stay_atomic(store, raw_disk):
    """Eight threads promote eight snapshots for one group at once, others pin and roll back: the database
    keeps exactly one current per group and a history that rollbacks can walk."""
    import threading
    store.import_image("deb", str(raw_disk), "t")
    for _ in range(8):
        d = store.draft("deb@v1", "t")
        store.seal(d.id, "x", "t")
    errors = []

    def promote(v):
        try:
            store.promote(f"deb@v{v}", "lab1", f"admin{v}")
        except Exception as exc:  # collected: none expected
            errors.append(exc)
    threads = [threading.Thread(target=promote, args=(v,)) for v in range(2, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    active = [a for a in store.assignments("deb") if a.kind == "current"]
    assert len(active) == 1
    history = [a for a in store.assignments("deb", active_only=False) if a.kind == "current"]
    assert sorted(a.snapshot for a in history) == sorted(f"deb@v{v}" for v in range(2, 10))
    walked = [store.current("deb", "lab1").name]
    for _ in range(7):
        walked.append(store.rollback("deb", "lab1", "t")["current"])
    assert sorted(walked) == sorted(f"deb@v{v}" for v in range(2, 10))
    assert walked == [a.snapshot for a in reversed(history)]
