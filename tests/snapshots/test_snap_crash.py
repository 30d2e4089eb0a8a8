"""Fault injection: a real subprocess runs promote/seal/prune/rollback/draft/import/flatten and is killed
(os._exit(137), no cleanup) at every named step. After a "restart" (open the store, run the start-up
fsck) the store holds either the old or the new state, files and database agree, no content changed,
and the operation can be run again to completion."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pgserver import STATE_BACKEND
from snaputil import MiB, make_raw_disk, pattern_at, patterns_at, write_pattern

from bootd.state import StateStore, open_state
from snapshots.crash import POINTS
from snapshots.files import read_qcow2_header
from snapshots.store import SnapshotStore

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

# points after which the change counts as made (committed, or rolled forward by fsck)
NEW_AT = {"seal.committed", "promote.committed", "rollback.committed", "prune.marked", "prune.unlinked",
          "prune.committed", "draft.committed", "import.committed", "flatten.renamed", "flatten.committed"}

# what each op does (argv after DB ROOT), and which points it passes
OPS = {
    "seal": ["seal", "{draft}"],
    "promote": ["promote", "deb@v5", ""],
    "rollback": ["rollback", "deb", ""],
    "prune": ["prune", "deb", "1"],
    "draft": ["draft", "deb@v5"],
    "import": ["import", "other", "{raw}"],
    "flatten": ["flatten", "deb@v4"],
}
CASES = [(op, point) for op in OPS for point in POINTS[op]]

# content every sealed snapshot exposes: {version: {offset MiB: byte}}
CONTENT = {1: {8: 0x11, 16: 0}, 2: {8: 0x11, 16: 0x22}, 3: {32: 0x44, 40: 0}, 4: {32: 0x44, 40: 0x55, 16: 0},
           5: {48: 0x66, 32: 0}}


def build_baseline(tmp: Path) -> dict:
    """v1 imported; v2 on v1 (current for all, v1 before it); v3 on v1, v4 on v3, v5 on v1 (unused);
    an open draft on v2 with 0x33 at 24 MiB."""
    raw = make_raw_disk(tmp / "os.raw", size_mb=64)
    state = open_state(tmp / "state.db")
    store = SnapshotStore(state, tmp / "snapshots")
    store.import_image("deb", str(raw), "setup")
    store.promote("deb@v1", None, "setup")

    def layer(parent, pattern, at):
        d = store.draft(parent, "setup")
        write_pattern(d.path, pattern, at * MiB)
        return store.seal(d.id, f"{pattern:#x}", "setup")

    layer("deb@v1", 0x22, 16)
    store.promote("deb@v2", None, "setup")
    layer("deb@v1", 0x44, 32)
    layer("deb@v3", 0x55, 40)
    layer("deb@v1", 0x66, 48)
    draft = store.draft("deb@v2", "setup")
    write_pattern(draft.path, 0x33, 24 * MiB)
    state.close()
    return {"raw": str(raw), "draft": str(draft.id)}


def _copy_sparse(src, dst):
    subprocess.run(["cp", "-p", "--sparse=always", src, dst], check=True)


def open_store(tmp: Path) -> tuple[StateStore, SnapshotStore]:
    state = open_state(tmp / "state.db")
    return state, SnapshotStore(state, tmp / "snapshots")


def check_consistent(store: SnapshotStore) -> None:
    """Files and rows agree: modes, backing files, no stray files; every snapshot's content unchanged."""
    again = store.fsck(repair=False)
    assert again.clean, again.to_dict()
    by_id = {s.id: s for s in store.snapshots(include_deleted=True)}
    named = set()
    for s in by_id.values():
        if s.state == "deleted":
            assert not os.path.exists(s.path), s.name
            continue
        assert s.state in ("draft", "sealed"), s
        named.add(s.file)
        assert (os.stat(s.path).st_mode & 0o777) == (0o444 if s.sealed else 0o644), s.name
        _, backing = read_qcow2_header(s.path)
        assert backing == (os.path.basename(by_id[s.backing_id].path) if s.backing_id else None), s.name
        if s.sealed and s.image == "deb" and s.version in CONTENT:
            want = CONTENT[s.version]
            assert patterns_at(s.path, [o * MiB for o in want]) == list(want.values()), s.name
    files = {f"{p.parent.name}/{p.name}" for p in store.root.glob("*/*") if p.parent.name != "lost+found"}
    assert files == named
    # exactly one active assignment per (image, kind, target): the unique index guarantees it; and each
    # points at a live snapshot
    for a in store.assignments():
        assert by_id[a.snapshot_id].state in ("sealed", "draft")


def state_of(op: str, store: SnapshotStore, base: dict) -> str:
    """'old' or 'new' for the op's own effect (asserting it is cleanly one of them)."""
    if op == "seal":
        d = store.get(int(base["draft"]))
        assert pattern_at(d.path, 24 * MiB) == 0x33
        return "new" if (d.state, d.version) == ("sealed", 6) else ("old" if d.state == "draft" else "?")
    if op == "promote":
        return {"deb@v2": "old", "deb@v5": "new"}[store.current("deb").name]
    if op == "rollback":
        return {"deb@v2": "old", "deb@v1": "new"}[store.current("deb").name]
    if op == "prune":
        alive = {s.version for s in store.snapshots("deb") if s.sealed}
        return {frozenset({1, 2, 3, 4, 5}): "old", frozenset({1, 2, 3, 5}): "new"}[frozenset(alive)]
    if op == "draft":
        v5 = store.resolve("deb@v5").id
        drafts = [s for s in store.snapshots("deb") if s.state == "draft" and s.backing_id == v5]
        return {0: "old", 1: "new"}[len(drafts)]
    if op == "import":
        return "new" if [i for i in store.images() if i["name"] == "other"] else "old"
    if op == "flatten":
        return {3: "old", 1: "new"}[store.resolve("deb@v4").depth]
    raise AssertionError(op)


def finish(op: str, store: SnapshotStore, base: dict) -> None:
    """Run the operation again after the crash: it completes (or, done already, is refused as such)."""
    if op == "seal":
        store.seal(base["draft"], "again", "retry")
    elif op == "promote":
        store.promote("deb@v5", None, "retry")
    elif op == "rollback":
        store.rollback("deb", None, "retry")
    elif op == "prune":
        store.prune("deb", 1, "retry")
    elif op == "draft":
        store.draft("deb@v5", "retry")
    elif op == "import":
        store.import_image("other", base["raw"], "retry")
    elif op == "flatten":
        store.flatten("deb@v4", "retry")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, request):
    """Built once; every case works on its own copy (modes kept: sealed files stay read-only). With
    BOOTD_TEST_STATE=postgresql the state is a database of its own, copied per case as a template."""
    tmp = tmp_path_factory.mktemp("baseline")
    if STATE_BACKEND != "postgresql":
        return tmp, build_baseline(tmp), None
    url = request.getfixturevalue("pg_server").new_database()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOOTD_STATE_URL", url)
        return tmp, build_baseline(tmp), url


@pytest.mark.parametrize("op,point", CASES, ids=[p for _, p in CASES])
def test_kill_at_every_step(tmp_path, baseline, op, point, request, monkeypatch):
    src, base, url = baseline
    if url is not None:
        monkeypatch.setenv("BOOTD_STATE_URL", request.getfixturevalue("pg_server").copy_database(url))
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (src / name).exists():
            shutil.copy2(src / name, tmp_path / name)
    shutil.copytree(src / "snapshots", tmp_path / "snapshots", copy_function=_copy_sparse)
    argv = [a.format(**base) for a in OPS[op]]
    env = dict(os.environ, BOOTD_CRASH_AT=point, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(HERE / "crashop.py"), str(tmp_path / "state.db"),
                           str(tmp_path / "snapshots"), *argv], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 137, f"{point} was not reached: rc {proc.returncode}\n{proc.stderr}"

    state, store = open_store(tmp_path)          # the restart: the daemon runs fsck before serving
    try:
        store.fsck(repair=True)
        check_consistent(store)
        got = state_of(op, store, base)
        assert got == ("new" if point in NEW_AT else "old"), f"after a kill at {point}: {got} state"
        if got == "old" or op == "prune":
            finish(op, store, base)
            check_consistent(store)
            assert state_of(op, store, base) == "new" if op != "prune" else True
        if op == "prune":
            assert {s.version for s in store.snapshots("deb") if s.sealed} == {1, 2, 5}
    finally:
        state.close()
