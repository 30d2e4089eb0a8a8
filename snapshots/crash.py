"""Named crash points for fault-injection tests.

`crash_point("promote.in-txn")` kills the process on the spot (os._exit(137), like SIGKILL: no cleanup,
no finally blocks, no flush) when the environment variable BOOTD_CRASH_AT names that point. Tests run a
real subprocess with the variable set, then reopen the store and check it holds the old or the new state.
"""
from __future__ import annotations

import os

#: Every crash point, by operation, in the order an operation passes them. Tests iterate over these.
POINTS: dict[str, tuple[str, ...]] = {
    "seal": ("seal.before", "seal.chmod-done", "seal.in-txn", "seal.committed"),
    "promote": ("promote.before", "promote.superseded", "promote.inserted", "promote.committed"),
    "rollback": ("rollback.before", "rollback.popped", "rollback.committed"),
    "prune": ("prune.before", "prune.marked", "prune.unlinked", "prune.committed"),
    "draft": ("draft.before", "draft.file-made", "draft.renamed", "draft.committed"),
    "import": ("import.before", "import.converted", "import.renamed", "import.committed"),
    "flatten": ("flatten.before", "flatten.converted", "flatten.renamed", "flatten.committed"),
}


def crash_point(name: str) -> None:
    """Die here, without any cleanup, if BOOTD_CRASH_AT == name (fault-injection tests only)."""
    if os.environ.get("BOOTD_CRASH_AT") == name:
        os._exit(137)
