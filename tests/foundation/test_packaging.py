"""What an installed bootd needs beyond its Python code travels in the wheel and the sdist: the C helpers'
sources (bootd/tftp/pump.c, nbdexport/splicer.c, nbdexport/handoff.c and their headers). Without them a
`pip install` of a wheel runs the daemon with disks and the TFTP pump degraded."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C_FILES = {"bootd/tftp/pump.c", "bootd/cfds.h", "nbdexport/splicer.c", "nbdexport/handoff.c",
           "nbdexport/nbdcount.h"}


def _build(kind: str, tmp: Path) -> Path:
    """Build from a copy of the tree (setuptools writes build/ and *.egg-info next to the sources)."""
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "test-artifacts", "build",
                                                            "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    argv = ([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
            if kind == "wheel" else
            [sys.executable, "-c", "from setuptools import build_meta as b; import sys; "
             "print(b.build_sdist(sys.argv[1]))", str(out)])
    r = subprocess.run(argv, capture_output=True, text=True, cwd=src, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    made = sorted(out.glob("bootd-*.whl" if kind == "wheel" else "bootd-*.tar.gz"))
    assert len(made) == 1, made
    return made[0]


@pytest.mark.timeout(600)
def test_wheel_carries_the_c_helper_sources(tmp_path):
    wheel = _build("wheel", tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert C_FILES <= names, sorted(C_FILES - names)
    # every source in the tree is the one in the wheel (not a stale copy from an old build/ dir)
    with zipfile.ZipFile(wheel) as z:
        for name in C_FILES:
            assert z.read(name) == (ROOT / name).read_bytes(), name


@pytest.mark.timeout(600)
def test_sdist_carries_the_c_helper_sources(tmp_path):
    sdist = _build("sdist", tmp_path)
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert C_FILES <= names, sorted(C_FILES - names)


KILL_BY_NAME = re.compile(r"\b(pkill|killall|killall5)\b|\bkill\b[^\n#]*\$\((pidof|pgrep)\b")


def test_set_up_and_build_scripts_kill_nothing_by_name():
    """deps/setup.sh once ran `pkill -x dnsmasq` (and the like) after installing test peers: on a real server
    that stops the site's own dnsmasq or kea. Set-up, build and packaging scripts must never kill by name
    (they keep postinsts from starting servers with a policy-rc.d instead)."""
    scripts = [*ROOT.glob("deps/*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / "Makefile"]
    assert ROOT / "deps/setup.sh" in scripts
    offenders = []
    for path in scripts:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            if KILL_BY_NAME.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
