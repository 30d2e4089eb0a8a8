"""One of two writers racing on one state database (tests/foundation/test_state_races.py): run as its own
process, it opens the store the way bootd does, waits for the GO file, then does its part and prints
what happened to it as one JSON line."""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd.dhcp.leases import LeaseTable, LeaseTaken  # noqa: E402
from bootd.state import open_state  # noqa: E402


def wait_for(go: Path) -> None:
    while not go.exists():
        time.sleep(0.001)


def main() -> int:
    kind, who, db, go, rounds = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
    store = open_state(db)
    out: dict[str, object] = {"who": who}
    if kind == "leases":  # both bind the same addresses, each to its own MACs
        table = LeaseTable(store)
        wait_for(go)
        won, lost = [], []
        for k in (range(rounds) if who == 0 else reversed(range(rounds))):  # they meet in the middle
            ip, mac = f"10.9.{k // 250}.{k % 250 + 1}", f"52:54:0{who}:00:{k // 256:02x}:{k % 256:02x}"
            now = time.time()
            try:
                table.bind(ip, mac, now + 600, now)
                won.append(ip)
            except LeaseTaken:
                lost.append(ip)
            time.sleep(0.002)  # a DHCP server's pace, not a loop's: the two writers' runs overlap
        out.update(won=won, lost=lost)
    elif kind == "promote":  # worker 0 promotes v1, worker 1 promotes v2, to one group, over and over
        from snapshots.errors import SnapshotError
        from snapshots.store import SnapshotStore
        snaps = SnapshotStore(store, Path(os.environ["RACE_SNAPSHOTS"]), min_free_bytes=0)
        wait_for(go)
        done, refused, errors = 0, 0, []
        for _ in range(rounds):
            try:
                snaps.promote(f"deb@v{who + 1}", "room1", actor=f"admin{who}")
                done += 1
            except SnapshotError as e:
                if "already current" in str(e):
                    refused += 1
                else:
                    errors.append(str(e))
            except sqlite3.Error as e:
                errors.append(f"{type(e).__name__}: {e}")
        out.update(done=done, refused=refused, errors=errors)
    elif kind == "register":  # both register pc0..pcN under the same names, each with its own MACs
        wait_for(go)
        won, lost, errors = [], [], []
        for k in range(rounds):
            mac = f"52:54:0{who}:01:{k // 256:02x}:{k % 256:02x}"
            if any(r["name"] == f"pc{k}" for r in store.registered_hosts()):
                lost.append(k)  # what `bootctl host add` checks first: the name is taken
                continue
            try:
                store.change_registered_hosts([{"mac": mac, "name": f"pc{k}", "group": "room1", "ip": None}])
                won.append(k)
            except sqlite3.IntegrityError:
                lost.append(k)
            except sqlite3.Error as e:
                errors.append(f"{type(e).__name__}: {e}")
        out.update(won=won, lost=lost, errors=errors)
    elif kind == "claim":  # both try to hold the DHCP role with a short hold, over and over
        wait_for(go)
        held = []
        for _ in range(rounds):
            holder, expires, _took = store.claim_dhcp(f"server{who}", 0.05)
            if holder == f"server{who}":
                held.append((store.db_time(), expires))
                if len(held) % 20 == 0:
                    time.sleep(0.1)  # stalls past its hold: the other may take over
            time.sleep(0.002)
        out.update(held=held)
    store.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
