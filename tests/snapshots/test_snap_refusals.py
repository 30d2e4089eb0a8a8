"""Every refused operation says why, changes nothing, and leaves files and database in agreement."""
from __future__ import annotations

import os
import subprocess

import pytest
from snaputil import MiB, make_raw_disk

from snapshots.errors import NoSpace, NotFound, Refused, SnapshotError

MAC = "52:54:00:12:34:56"


def refused(exc_type, fn, *args, **kw) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    return str(info.value)


@pytest.fixture
def deb(store, raw_disk):
    """deb@v1 (current for all), deb@v2 sealed on top of it, and an open draft on v2."""
    store.import_image("deb", str(raw_disk), "t")
    store.promote("deb@v1", None, "t")
    d = store.draft("deb@v1", "t")
    store.seal(d.id, "v2", "t")
    draft = store.draft("deb@v2", "t")
    return draft


def audit_len(store):
    return len(store.audit_log(limit=10000))


def test_import_refusals(store, tmp_path, raw_disk):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a disk\n")
    assert "is not a disk image: 18 bytes is not a whole number of 512-byte sectors" in refused(
        SnapshotError, store.import_image, "a", str(text), "t")
    blank = tmp_path / "blank.raw"
    blank.write_bytes(b"\0" * MiB)
    assert "blkid finds no partition table or file system" in refused(
        SnapshotError, store.import_image, "a", str(blank), "t")
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    assert "is a vmdk image; import accepts raw or qcow2" in refused(
        SnapshotError, store.import_image, "a", str(vmdk), "t")
    assert "no such file" in refused(SnapshotError, store.import_image, "a", str(tmp_path / "nope.img"), "t")
    assert "is a directory" in refused(SnapshotError, store.import_image, "a", str(tmp_path), "t")
    assert "not a valid image name" in refused(SnapshotError, store.import_image, "../x", str(raw_disk), "t")
    assert "not a valid image name" in refused(SnapshotError, store.import_image, "lost+found", str(raw_disk), "t")
    store.import_image("a", str(raw_disk), "t")
    assert "image a already exists" in refused(Refused, store.import_image, "a", str(raw_disk), "t")
    assert "is not a size" in refused(SnapshotError, store.create_image, "b", "lots", "t")
    assert [i["name"] for i in store.images()] == ["a"]
    assert store.fsck().clean


def test_lifecycle_refusals(store, deb):
    draft = deb
    n = audit_len(store)
    assert "is a draft: seal it first" in refused(Refused, store.draft, draft.name, "t")
    assert "cannot promote deb@draft-" in refused(Refused, store.promote, draft.id, None, "t")
    assert "it is a draft; seal it first" in refused(Refused, store.test, draft.id, MAC, "t")
    assert "it is a draft; seal it first" in refused(Refused, store.pin, draft.id, MAC, "t")
    assert "cannot flatten deb@draft-" in refused(Refused, store.flatten, draft.id, "t")
    assert "deb@v1 is sealed, not a draft" in refused(Refused, store.seal, "deb@v1", "x", "t")
    assert "deb@v1 is already current for all groups" in refused(Refused, store.promote, "deb@v1", None, "t")
    assert "deb@v1 is already standalone" in refused(Refused, store.flatten, "deb@v1", "t")
    assert "nothing to roll back to: deb@v1 is the first" in refused(Refused, store.rollback, "deb", None, "t")
    assert "no current snapshot for group lab7" in refused(Refused, store.rollback, "deb", "lab7", "t")
    assert "is not a MAC address" in refused(SnapshotError, store.pin, "deb@v2", "pc-1", "t")
    assert "is not pinned to any snapshot of image deb" in refused(Refused, store.unpin, "deb", MAC, "t")
    assert "is not testing any snapshot" in refused(Refused, store.end_test, "deb", MAC, "t")
    store.pin("deb@v2", MAC, "t")
    assert "is already pinned to deb@v2" in refused(Refused, store.pin, "deb@v2", MAC, "t")
    assert "--keep must be at least 1" in refused(SnapshotError, store.prune, "deb", 0, "t")
    assert "image deb has no snapshot v9" in refused(NotFound, store.resolve, "deb@v9")
    assert "no image named 'ubuntu'" in refused(NotFound, store.resolve, "ubuntu@v1")
    assert "is not a snapshot reference" in refused(SnapshotError, store.resolve, "deb@newest")
    assert audit_len(store) == n + 1    # only the pin changed anything


def test_delete_refusals_name_every_reason(store, deb):
    draft = deb
    store.test("deb@v2", MAC, "t")
    store.pin("deb@v2", "52:54:00:00:00:02", "t")
    store.promote("deb@v2", "lab1", "t")
    msg = refused(Refused, store.delete, "deb@v2", "t")
    assert msg.startswith("cannot delete deb@v2: ")
    for reason in ("it is current for group lab1", "host 52:54:00:00:00:02 is pinned to it",
                   f"it is in test on host {MAC}", f"it is the parent (backing file) of {draft.name}"):
        assert reason in msg
    assert "it is current for all groups" in refused(Refused, store.delete, "deb@v1", "t")

    # open by a client: the NBD engine's hook
    open_now = {draft.id}
    store.register_open_check(lambda s: [f"export tok{s.id} for {MAC}"] if s.id in open_now else [])
    assert store.is_open(store.get(draft.id))
    msg = refused(Refused, store.delete, draft.id, "t")
    assert f"it is open by a client: export tok{draft.id} for {MAC}" in msg
    assert "cannot seal" in refused(Refused, store.seal, draft.id, "note", "t")
    open_now.clear()
    assert store.delete(draft.id, "t")["deleted"] == [draft.name]
    assert not os.path.exists(draft.path)
    assert f"{draft.name} is already deleted" in refused(Refused, store.delete, draft.id, "t")
    assert store.fsck().clean


def test_no_space_refused_before_writing(store, raw_disk):
    store.min_free_bytes = store.free_bytes() + 1024 * MiB
    msg = refused(NoSpace, store.import_image, "deb", str(raw_disk), "t")
    assert "not enough free space in" in msg and "(storage.min_free_mb)" in msg and "bootctl snapshot prune" in msg
    assert store.images() == [] and list(store.root.iterdir()) in ([], [store.root / "deb"])
    store.min_free_bytes = 0
    store.import_image("deb", str(raw_disk), "t")
    store.min_free_bytes = store.free_bytes() + 1024 * MiB
    assert "not enough free space" in refused(NoSpace, store.draft, "deb@v1", "t")
    assert len(store.snapshots("deb")) == 1 and store.fsck().clean


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs: a disk that really fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "bootd-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_never_corrupts_the_store(state, tmp_path, small_fs):
    from snaputil import write_pattern

    from snapshots.store import SnapshotStore
    store = SnapshotStore(state, small_fs / "snapshots", min_free_bytes=0)
    disk = make_raw_disk(tmp_path / "big.raw", size_mb=64, pattern=None)
    for off in range(0, 16):            # 16 MiB of data: more than the file system holds
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {off + 1} {(off + 2) * MiB} 1M", str(disk)],
                       check=True, capture_output=True)
    msg = refused(NoSpace, store.import_image, "big", str(disk), "t")
    assert "not enough free space" in msg
    # a writer that slips past the check (the space went to someone else meanwhile): ENOSPC mid-write
    store.min_free_bytes = -(1 << 40)
    msg = refused(NoSpace, store.import_image, "big", str(disk), "t")
    assert "disk full while writing" in msg
    assert store.images() == []
    assert not [p for p in (small_fs / "snapshots").rglob("*") if p.is_file()]   # no temp file left behind
    assert store.fsck().clean
    # the store still works once there is room
    store.min_free_bytes = 0
    small = make_raw_disk(tmp_path / "small.raw", size_mb=4)
    v1 = store.import_image("small", str(small), "t")
    d = store.draft(v1.name, "t")
    write_pattern(d.path, 0x42, 2 * MiB)
    assert store.seal(d.id, "ok", "t").version == 2


def test_fsck_explains_every_stray_file(store, raw_disk):
    v1 = store.import_image("deb", str(raw_disk), "t")
    d = store.draft("deb@v1", "t")
    img_dir = store.root / "deb"
    (img_dir / ".tmp-0123.qcow2").write_bytes(b"half written")
    (img_dir / "feedbeef.qcow2").write_bytes(b"committed nowhere")
    os.chmod(v1.path, 0o644)
    report = store.fsck(repair=False)                      # check only: nothing changes
    assert report.removed_temp == ["deb/.tmp-0123.qcow2"] and report.orphans_moved == ["deb/feedbeef.qcow2"]
    assert report.fixed_modes == ["deb@v1: mode 644 -> 444"] and not report.problems
    assert (img_dir / ".tmp-0123.qcow2").exists() and (os.stat(v1.path).st_mode & 0o777) == 0o644
    store.fsck(repair=True)
    assert not (img_dir / ".tmp-0123.qcow2").exists()
    assert (store.root / "lost+found" / "deb" / "feedbeef.qcow2").read_bytes() == b"committed nowhere"
    assert (os.stat(v1.path).st_mode & 0o777) == 0o444
    assert store.fsck().clean
    os.unlink(d.path)                                      # someone removed a file by hand
    report = store.fsck()
    assert report.problems == [f"{d.name}: file {d.path} is missing"]
    assert store.get(d.id).state == "draft"               # never dropped silently: the admin decides
    assert store.audit_log()[-1]["action"] == "fsck"
    assert store.purge_lost_found("t", "looked at it") == ["deb/feedbeef.qcow2"]
    assert not (store.root / "lost+found").exists() and store.purge_lost_found("t") == []
