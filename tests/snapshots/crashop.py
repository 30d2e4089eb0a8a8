"""Run one snapshot-store operation in its own process (for the fault-injection tests).

    python crashop.py DB ROOT OP ARG...

With BOOTD_CRASH_AT=<point> the process dies at that point with os._exit(137), like a kill -9:
no finally blocks, no cleanup, no database close.
"""
import sys

from bootd.state import open_state
from snapshots.store import SnapshotStore


def main() -> int:
    db, root, op, *args = sys.argv[1:]
    store = SnapshotStore(open_state(db), root)
    if op == "seal":
        store.seal(args[0], "sealed by the crash test", "crash")
    elif op == "promote":
        store.promote(args[0], args[1] or None, "crash")
    elif op == "rollback":
        store.rollback(args[0], args[1] or None, "crash")
    elif op == "prune":
        store.prune(args[0], int(args[1]), "crash")
    elif op == "draft":
        store.draft(args[0], "crash")
    elif op == "import":
        store.import_image(args[0], args[1], "crash")
    elif op == "flatten":
        store.flatten(args[0], "crash")
    else:
        raise SystemExit(f"unknown op {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
