"""Compile bootd's C helpers ahead of time into a directory (the Debian package's /usr/lib/bootd/helpers):
`python3 scripts/build-helpers.py OUT_DIR`. Same flags as the run-time build (bootd/chelper.py), and the
names bootd looks for (chelper.prebuilt_name: the hash of the source), so the installed daemon needs no
compiler. Also checks the hardening landed (scripts/check_c_helpers.py). Prints each file it made."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootd.chelper import CFDS_HEADER, prebuild_c_program  # noqa: E402
from bootd.tftp.pump import PUMP_SOURCE  # noqa: E402
from nbdexport.gatekeeper import SPLICER_SOURCE  # noqa: E402
from nbdexport.handoff import NBDCOUNT_HEADER  # noqa: E402
from nbdexport.handoff import SOURCE as HANDOFF_SOURCE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_c_helpers import hardened  # noqa: E402

# (what, source, prefix, suffix, headers, library): as build_pump, build_splicer and build_library call
# build_c_program (tests/foundation/test_prebuilt_helpers.py checks that those find what this makes).
HELPERS = (
    ("TFTP pump", PUMP_SOURCE, "tftp-pump-", "", (CFDS_HEADER,), False),
    ("NBD splicer", SPLICER_SOURCE, "nbd-splicer-", "", (CFDS_HEADER, NBDCOUNT_HEADER), False),
    ("NBD hand-off library", HANDOFF_SOURCE, "nbd-handoff-", ".so", (CFDS_HEADER, NBDCOUNT_HEADER), True),
)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: build-helpers.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    for what, source, prefix, suffix, headers, library in HELPERS:
        try:
            binary = prebuild_c_program(source, out, prefix, what, suffix=suffix, headers=headers, library=library)
        except RuntimeError as e:
            print(f"build-helpers: {what}: {e}", file=sys.stderr)
            return 1
        missing = hardened(binary)
        if missing:
            print(f"build-helpers: {what} ({binary.name}) lacks {', '.join(missing)}", file=sys.stderr)
            return 1
        print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
