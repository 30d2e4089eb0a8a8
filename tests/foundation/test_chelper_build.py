"""The C helper build: warnings are errors, binaries are hardened, and a cached build is trusted only
when bootd made it (private directory, its own file, same source, flags and compiler)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bootd.chelper import build_c_program

HELLO = "#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n"


def _src(tmp_path: Path, text: str = HELLO) -> Path:
    p = tmp_path / "prog.c"
    p.write_text(text)
    return p


def _private(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def test_builds_a_hardened_program(tmp_path):
    binary = build_c_program(_src(tmp_path), _private(tmp_path), "t-", "test program")
    assert subprocess.run([str(binary)], capture_output=True, text=True).stdout == "ok\n"
    elf = subprocess.run(["readelf", "-hdl", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "DYN (" in elf and "GNU_RELRO" in elf and "BIND_NOW" in elf


def test_a_warning_is_an_error(tmp_path):
    src = _src(tmp_path, "int main(int argc, char **argv) { int unused; return 0; }\n")
    with pytest.raises(RuntimeError, match="unused"):
        build_c_program(src, _private(tmp_path), "t-", "test program")


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(RuntimeError, match="writable by group or others"):
        build_c_program(_src(tmp_path), d, "t-", "test program")


def test_a_directory_of_another_user_is_refused(tmp_path):
    d = _private(tmp_path)
    os.chown(d, 65534, 65534)
    with pytest.raises(RuntimeError, match="belongs to uid 65534"):
        build_c_program(_src(tmp_path), d, "t-", "test program")


def test_a_planted_or_loosened_binary_is_rebuilt(tmp_path):
    d = _private(tmp_path)
    src = _src(tmp_path)
    binary = build_c_program(src, d, "t-", "test program")
    binary.write_text("#!/bin/sh\necho planted\n")
    os.chmod(binary, 0o777)  # a file bootd would never have left writable by others
    again = build_c_program(src, d, "t-", "test program")
    assert again == binary
    assert subprocess.run([str(again)], capture_output=True, text=True).stdout == "ok\n"


def test_flags_and_compiler_are_part_of_the_build_name(tmp_path):
    d = _private(tmp_path)
    src = _src(tmp_path)
    plain = build_c_program(src, d, "t-", "test program")
    other = build_c_program(src, d, "t-", "test program", flags=["-DVARIANT=1"])
    assert plain.name != other.name
    with pytest.raises(RuntimeError, match="cannot run the C compiler"):
        build_c_program(src, d, "t-", "test program", cc="/nonexistent/cc")
