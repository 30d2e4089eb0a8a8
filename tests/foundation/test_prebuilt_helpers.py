"""The C helpers compiled at package build time (scripts/build-helpers.py, into the .deb's
/usr/lib/bootd/helpers) are what an installed bootd runs: found by the same calls the daemon makes, with no
compiler on PATH; a helper built from another source, or a directory others can write, is not used."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bootd import chelper
from bootd.tftp.pump import build_pump
from nbdexport.gatekeeper import build_splicer
from nbdexport.handoff import build_library

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prebuilt(tmp_path, monkeypatch):
    out = tmp_path / "helpers"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/build-helpers.py"), str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 3, r.stdout
    monkeypatch.setattr(chelper, "HELPERS_DIR", out)
    empty = tmp_path / "no-compiler"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no gcc: anything not prebuilt fails to build
    return out


def test_the_daemon_finds_every_prebuilt_helper_without_a_compiler(prebuilt, tmp_path):
    run_dir = tmp_path / "run"
    made = {build_pump(run_dir), build_splicer(run_dir), build_library(run_dir)}
    assert made == set(prebuilt.iterdir())
    assert not list(run_dir.iterdir())  # nothing compiled at run time


def test_without_prebuilt_helpers_or_a_compiler_the_build_fails_closed(prebuilt, tmp_path):
    for f in prebuilt.iterdir():
        f.unlink()
    with pytest.raises(RuntimeError, match="C compiler"):
        build_splicer(tmp_path / "run")


def test_a_helper_from_another_source_is_not_used(prebuilt, tmp_path, monkeypatch):
    src = tmp_path / "prog.c"
    src.write_text("int main(void) { return 0; }\n")
    with monkeypatch.context() as m:
        m.setenv("PATH", "/usr/bin:/bin")
        chelper.prebuild_c_program(src, prebuilt, "t-", "test program")
    assert chelper.build_c_program(src, tmp_path / "run", "t-", "test program").parent == prebuilt
    src.write_text("int main(void) { return 1; }\n")
    (tmp_path / "run").mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="C compiler"):
        chelper.build_c_program(src, tmp_path / "run", "t-", "test program")


def test_a_writable_helpers_dir_is_not_trusted(prebuilt, tmp_path):
    prebuilt.chmod(0o777)
    with pytest.raises(RuntimeError, match="C compiler"):
        build_pump(tmp_path / "run")
