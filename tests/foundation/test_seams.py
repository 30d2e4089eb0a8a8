"""Typed seams and test hygiene (issue 14), checked on the source.

The daemon's Context carries each service's seam typed by a Protocol (bootd/seams.py), the concrete
components implement those Protocols (mypy says so), nothing probes a project object for what it might
offer, a broken project import fails instead of skipping, and golden files are never rewritten by a run
that passes.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from golden import UPDATE_ENV, check_golden, check_golden_dir

from bootd.daemon import Context

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("bootd", "nbdexport", "pxe", "snapshots")
TESTS = REPO / "tests"
# Awaitable-or-not probing still allowed, with the reason: the TFTP server's documented provider type is a
# sync or async callable (tests register plain lambdas).
ISAWAITABLE_ALLOWED = {"bootd/tftp/server.py", "bootd/tftp/providers.py"}


def _sources(root: Path, *dirs: str):
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _project_modules() -> set[str]:
    names = set(PACKAGES)
    for path, _ in _sources(REPO, *PACKAGES):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    names |= {p.stem for p in TESTS.glob("*.py")}  # the tests' own helpers (support, netns, golden)
    return names


PROJECT = _project_modules()


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES or module in PROJECT


def test_no_test_importorskips_a_project_module():
    """A broken import of our own code is a failure, never a skip."""
    bad = []
    for path, tree in _sources(REPO, "tests"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "importorskip":
                arg = node.args[0] if node.args else None
                name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                if name is None or _is_project(name):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == [], "\n".join(bad)


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return ["." * node.level + (node.module or "")]
    return []


def test_no_import_of_project_code_is_guarded():
    """`try: import bootd.x / except ImportError` hides a broken module behind a fallback."""
    bad = []
    for path, tree in _sources(REPO, *PACKAGES):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
            if "ImportError" not in caught and "ModuleNotFoundError" not in caught:
                continue
            for inner in node.body:
                for mod in (m for n in ast.walk(inner) for m in _imported(n)):
                    if mod.startswith(".") or _is_project(mod):
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}: guarded import of {mod}")
    assert bad == [], "\n".join(bad)


def test_no_probing_of_seams():
    """Consumers call what the seam declares: no getattr/hasattr on the context or a seam, no extras bag,
    no awaitable-or-not probing."""
    seams = {"ctx", "context", "disks", "booter", "snapshots", "export"}
    bad = []
    for path, tree in _sources(REPO, *PACKAGES):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr") and node.args:
                target = ast.unparse(node.args[0])
                if target.split(".")[-1] in seams or target.startswith(("ctx.", "self.ctx")):
                    bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr == "extras":
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)} (a string-keyed grab bag)")
            if isinstance(node, ast.Attribute) and node.attr == "isawaitable" and rel not in ISAWAITABLE_ALLOWED:
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert bad == [], "\n".join(bad)


def test_context_fields_are_typed():
    """No `Any` and no bare dict on the Context: every seam names its Protocol."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(Context)}
    assert not [n for n, t in fields.items() if "Any" in t or t in ("dict", "object")], fields
    for name, protocol in (("booter", "Booter"), ("disks", "Disks"), ("snapshots", "Snapshots"),
                           ("snapshot_jobs", "SnapshotJobs"), ("tftp", "TftpFiles"),
                           ("request_reload", "ReloadRequest")):
        assert fields[name] == f"Optional[{protocol}]", (name, fields[name])


def test_components_implement_their_seams(tmp_path):
    """mypy: each concrete component is assignable to the Protocol its consumers are checked against."""
    check = tmp_path / "seam_conformance.py"
    check.write_text(textwrap.dedent("""\
        from bootd import seams
        from bootd.clientconfig import resolve
        from bootd.daemon import Daemon
        from bootd.tftp.server import TftpServer
        from nbdexport.manager import DiskManager
        from nbdexport.model import Export
        from pxe.booter import Booter
        from snapshots.jobs import JobManager
        from snapshots.store import SnapshotStore


        def disks(x: DiskManager) -> seams.Disks:
            return x


        def export(x: Export) -> seams.DiskExport:
            return x


        def snapshots(x: SnapshotStore) -> seams.Snapshots:
            return x


        def jobs(x: JobManager) -> seams.SnapshotJobs:
            return x


        def tftp(x: TftpServer) -> seams.TftpFiles:
            return x


        def booter(x: Booter) -> seams.Booter:
            return x


        def reload(x: Daemon) -> seams.ReloadRequest:
            return x.request_reload


        render_for = resolve.render_for
        """))
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                          "--cache-dir", str(tmp_path / "mypy-cache"), str(check)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    # the snippet, and the seam modules themselves (mypy checks what the snippet imports, so they are in)
    typed = (str(check), "bootd/seams.py", "bootd/daemon.py", "bootd/clientconfig/resolve.py")
    errors = [line for line in run.stdout.splitlines() if line.startswith(typed)]
    assert errors == [], "\n".join(errors)
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 1: errors elsewhere, someone else's files


def test_seams_load_no_service_code():
    """bootd.seams sits under Service and Context: importing it loads no service, server or store."""
    code = "import json, sys\nimport bootd.seams\nprint(json.dumps(sorted(sys.modules)))\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    services = ("bootd.daemon", "bootd.service", "bootd.http", "bootd.dhcp.server", "bootd.tftp.server",
                "bootd.nfs", "nbdexport", "pxe", "snapshots.store", "snapshots.service", "aiohttp")
    bad = [m for m in loaded if any(m == s or m.startswith(s + ".") for s in services)]
    assert bad == []


# -- golden files ------------------------------------------------------------------------------------
def test_golden_rewrite_fails_the_run(tmp_path, monkeypatch):
    """With BOOTD_UPDATE_GOLDEN the file is rewritten and the test fails; without it, a difference fails."""
    path = tmp_path / "menu.ipxe"
    path.write_text("old\n")
    with pytest.raises(AssertionError, match="differs"):
        check_golden(path, "new\n")
    monkeypatch.setenv(UPDATE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="cannot pass"):
        check_golden(path, "new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(pytest.fail.Exception, match="cannot pass"):  # even when nothing changed
        check_golden(path, "new\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "stale.conf").write_text("x")
    with pytest.raises(pytest.fail.Exception):
        check_golden_dir(tmp_path / "dir", {"a.conf": "a\n"})
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["a.conf"]
    monkeypatch.delenv(UPDATE_ENV)
    check_golden(path, "new\n")
    check_golden_dir(tmp_path / "dir", {"a.conf": "a\n"})


def test_golden_files_are_written_only_by_tests_golden():
    """No test reads an update variable and writes its golden file itself (and then passes)."""
    bad = []
    for path, tree in _sources(REPO, "tests"):
        if path == TESTS / "golden.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and re.search(r"(environ\.get|getenv)$", ast.unparse(node.func)):
                key = node.args[0] if node.args else None
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
                key = node.slice
            else:
                continue
            if isinstance(key, ast.Constant) and "GOLDEN" in str(key.value):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == [], "\n".join(bad)
