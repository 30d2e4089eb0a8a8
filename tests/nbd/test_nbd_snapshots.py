"""Disks over snapshots of the real snapshot store: promote/rollback reach the next boot only, a
persistent host's layer can become a draft, snapshots under a running export cannot be deleted."""
from __future__ import annotations

import subprocess

import nbd
import pytest
from nbdtest import MiB, make_base, sha256

import snapshots.store as snapstore
from snapshots.errors import Refused

A = "52:54:00:00:02:0a"
P = "52:54:00:00:02:0f"


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def first_byte(uri: str) -> bytes:
    c = connect(uri)
    try:
        return c.pread(1, 0)
    finally:
        c.shutdown()


@pytest.fixture
def lab_images(tmp_path, harness):
    """A snapshot store with image `deb`: v1 (0xAB) promoted, v2 (0xCD) sealed; a manager resolving
    hosts through it like the daemon does."""
    src = make_base(tmp_path / "src.qcow2", pattern=0xAB)
    hs = harness(start=False, persistent={P})
    from bootd.state import open_state
    hs.store = open_state(tmp_path / "state.db")
    store = snapstore.SnapshotStore(hs.store, tmp_path / "snapshots")
    v1 = store.import_image("deb", str(src), actor="test")
    d = store.draft(v1.id, actor="test")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 1M", d.path], check=True, capture_output=True)
    v2 = store.seal(d.id, note="v2", actor="test")
    store.promote(v1.id, None, actor="test")
    hs.snapshots = store
    hs.resolve = lambda mac: store.resolve_for_host(mac, None, "deb")
    hs.start()
    store.register_open_check(hs.m.open_check)
    return hs, store, v1, v2


def test_promote_and_rollback_change_the_next_boot_not_the_running_one(lab_images):
    hs, store, v1, v2 = lab_images
    sums = {s: sha256(s.path) for s in (v1, v2)}
    running = hs.run(hs.m.prepare_boot(A))
    assert running.snapshot_id == v1.id and first_byte(running.uri) == b"\xab"
    store.promote(v2.id, None, actor="test")
    assert first_byte(running.uri) == b"\xab"  # the running boot is untouched
    nxt = hs.run(hs.m.prepare_boot(A))
    assert nxt.snapshot_id == v2.id and first_byte(nxt.uri) == b"\xcd"
    store.rollback("deb", None, actor="test")
    assert first_byte(nxt.uri) == b"\xcd"  # untouched again
    again = hs.run(hs.m.prepare_boot(A))
    assert again.snapshot_id == v1.id and first_byte(again.uri) == b"\xab"
    assert {s: sha256(s.path) for s in (v1, v2)} == sums


def test_a_snapshot_under_a_running_export_cannot_be_deleted(lab_images):
    hs, store, v1, v2 = lab_images
    store.promote(v2.id, None, actor="test")
    hs.run(hs.m.prepare_boot(A))
    assert store.open_by(store.get(v2.id))
    with pytest.raises(Refused, match="open by a client"):
        store.delete(v2.id, actor="test")
    assert store.get(v2.id).state == "sealed"


def test_commit_turns_a_persistent_layer_into_a_draft(lab_images, tmp_path):
    hs, store, v1, v2 = lab_images
    exp = hs.run(hs.m.prepare_boot(P))
    assert exp.persistent
    c = connect(exp.uri)
    c.pwrite(b"teacher-change", 7 * MiB)
    c.flush()
    c.shutdown()
    res = hs.run(hs.m.commit(P, note="from the teacher PC"))
    draft = store.get(res["draft_id"])
    assert draft.state == "draft" and draft.parent_id == v1.id
    raw = draft.path + ".raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", draft.path, raw], check=True)
    with open(raw, "rb") as f:
        data = f.read(8 * MiB)
    assert data[7 * MiB:7 * MiB + 14] == b"teacher-change" and data[:4] == b"\xab" * 4
    # the host's next boot starts from a fresh layer
    nxt = hs.run(hs.m.prepare_boot(P))
    c = connect(nxt.uri)
    assert c.pread(14, 7 * MiB) == b"\0" * 14
    c.shutdown()
