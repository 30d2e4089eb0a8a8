"""Golden-file checks: a run either compares or rewrites, and a run that rewrites never passes.

`BOOTD_UPDATE_GOLDEN=1 pytest tests/pxe tests/clientconfig` rewrites the golden files and fails every
test that wrote one (so CI can never go green by regenerating its own expectations); run the tests again
without it and read `git diff` of the golden directory before committing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

UPDATE_ENV = "BOOTD_UPDATE_GOLDEN"


def updating() -> bool:
    return bool(os.environ.get(UPDATE_ENV))


def _rewritten(paths: list[Path]) -> None:
    pytest.fail(f"{UPDATE_ENV} is set: rewrote {', '.join(str(p) for p in paths)}; this run cannot pass: "
                f"run again without {UPDATE_ENV} and review the diff", pytrace=False)


def check_golden(path: Path, text: str) -> None:
    """`text` must equal the golden file at `path` (rewritten, and the test failed, under BOOTD_UPDATE_GOLDEN)."""
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        _rewritten([path])
    assert path.is_file(), f"no golden file {path}: write it with {UPDATE_ENV}=1 and review it"
    assert text == path.read_text(), f"{path.name} differs from its golden file {path}"


def check_golden_dir(directory: Path, files: dict[str, str]) -> None:
    """The directory holds exactly `files` (name -> text); stale golden files count as a difference."""
    if updating():
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            if old.name not in files:
                old.unlink()
        for name, text in files.items():
            (directory / name).write_text(text)
        _rewritten([directory / name for name in files])
    assert directory.is_dir(), f"no golden directory {directory}: write it with {UPDATE_ENV}=1 and review it"
    want = {p.name: p.read_text() for p in directory.iterdir()}
    assert set(want) == set(files), f"golden files {sorted(want)} but rendered {sorted(files)}"
    for name, text in files.items():
        assert text == want[name], f"{name} differs from its golden copy in {directory}"
