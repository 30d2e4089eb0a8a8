"""`make lint`: compile every C helper exactly as bootd does (warnings as errors, hardening flags), into
a private temporary directory, and check the hardening landed in the binaries (PIE, full RELRO, BIND_NOW).
Exits non-zero with the compiler's message on the first failure."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootd.tftp.pump import build_pump  # noqa: E402
from nbdexport.gatekeeper import build_splicer  # noqa: E402
from nbdexport.handoff import build_library  # noqa: E402


def hardened(binary: Path) -> list[str]:
    """What readelf shows missing of the hardening flags (empty when all are there)."""
    out = subprocess.run(["readelf", "-hdl", str(binary)], capture_output=True, text=True, check=True).stdout
    missing = []
    if "DYN (" not in out:
        missing.append("PIE/shared object")
    if "GNU_RELRO" not in out:
        missing.append("RELRO")
    if "BIND_NOW" not in out and "FLAGS_1" not in out:
        missing.append("BIND_NOW")
    return missing


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bootd-lint-c-") as d:
        for what, build in (("TFTP pump", build_pump), ("NBD splicer", build_splicer),
                            ("NBD hand-off library", build_library)):
            try:
                binary = build(Path(d))
            except RuntimeError as e:
                print(f"check_c_helpers: {what}: {e}", file=sys.stderr)
                return 1
            missing = hardened(binary)
            if missing:
                print(f"check_c_helpers: {what} ({binary.name}) lacks {', '.join(missing)}", file=sys.stderr)
                return 1
            print(f"check_c_helpers: {what}: built with -Wall -Wextra -Werror, hardened")
    return 0


if __name__ == "__main__":
    sys.exit(main())
