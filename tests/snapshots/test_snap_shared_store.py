"""Several servers on one snapshot store (PostgreSQL state, a shared storage.snapshots): a server's
start-up fsck must not take another server's operation under way for debris (issue 20)."""
from __future__ import annotations

import os
import time

from snapshots.files import TEMP_PREFIX


def test_fsck_leaves_recent_unknown_files_to_the_server_writing_them(store, raw_disk):
    store.import_image("deb", str(raw_disk), "setup")
    image_dir = store.root / "deb"
    temp = image_dir / f"{TEMP_PREFIX}import-by-bootd-a.qcow2"  # another server's import, still copying
    unknown = image_dir / "draft-by-bootd-a.qcow2"  # another server's new layer, its row not committed yet
    temp.write_bytes(b"x" * 4096)
    unknown.write_bytes(b"y" * 4096)
    store.check.recent_grace = 3600.0  # what SnapshotService sets with a shared (PostgreSQL) state
    rep = store.fsck(repair=True)
    assert sorted(rep.left_recent) == ["deb/.tmp-import-by-bootd-a.qcow2", "deb/draft-by-bootd-a.qcow2"]
    assert temp.exists() and unknown.exists() and rep.clean
    # an hour later nobody is writing them: the debris of a crash, handled as with one server
    old = time.time() - 7200
    for f in (temp, unknown):
        os.utime(f, (old, old))
    rep = store.fsck(repair=True)
    assert rep.removed_temp == ["deb/.tmp-import-by-bootd-a.qcow2"] and not temp.exists()
    assert rep.orphans_moved == ["deb/draft-by-bootd-a.qcow2"] and not unknown.exists()
    assert (store.root / "lost+found" / "deb" / "draft-by-bootd-a.qcow2").exists()


def test_one_server_repairs_at_once(store, raw_disk):
    store.import_image("deb", str(raw_disk), "setup")
    temp = store.root / "deb" / f"{TEMP_PREFIX}crashed.qcow2"
    temp.write_bytes(b"x")
    rep = store.fsck(repair=True)
    assert rep.removed_temp == ["deb/.tmp-crashed.qcow2"] and rep.left_recent == []
