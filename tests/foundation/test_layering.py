"""The dependency direction of the tree, checked on its source (issue 14).

Bottom to top: config models -> state -> protocol cores -> Service -> services -> daemon and CLI. A lower
layer never imports a higher one, `bootd check-config` loads no service code, shared helpers live in
bootd/ (not in a component), SQL is written only by the state layer and the store modules the README
names, with no SQLite-only statements, and a MAC has one normaliser.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("bootd", "nbdexport", "pxe", "snapshots")

# The modules allowed to hold SQL text: the state layer and the per-component store modules the README names.
SQL_MODULES = {"bootd.state", "snapshots.store", "bootd.dhcp.leases", "nbdexport.store"}

CONFIG_LAYER = {"bootd", "bootd.config", "bootd.macaddr", "bootd.nfsconfig", "bootd.clientconfig",
                "bootd.clientconfig.model"}
# Sans-IO protocol cores: bytes and explicit time in, bytes and timers out.
PROTOCOL_CORES = {"bootd.dhcp.codec", "bootd.dhcp.policy", "bootd.tftp.session"}
# Shared helpers: used by several components, so they import none of them.
SHARED_HELPERS = {"bootd.chelper", "bootd.pidwatch", "bootd.macaddr", "bootd.metrics", "bootd.notify",
                  "bootd.logsetup", "bootd.neighbours"}
SERVICE_CODE = ("bootd.nfs", "bootd.daemon", "bootd.service", "bootd.state", "bootd.dhcp.server",
                "bootd.tftp.server", "bootd.tftp.service", "bootd.http", "nbdexport", "pxe", "snapshots",
                "aiohttp", "asyncio", "socket", "sqlite3")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def _modules() -> dict[str, Module]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    return out


MODULES = _modules()


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(mod: Module, top_level_only: bool = False) -> set[str]:
    """Modules `mod` imports at run time (imports under `if TYPE_CHECKING:` are types, not dependencies)."""
    parents = {child: node for node in ast.walk(mod.tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(mod.tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
            continue
        if top_level_only and any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
                                  for p in _ancestors(node, parents)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:
            pkg = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        found.add(base)
        found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]):
    while node in parents:
        node = parents[node]
        yield node


def _is_under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _closure(start: str) -> set[str]:
    """Every project module `start` loads when imported (module-level imports, transitively)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += [m for m in _imports(MODULES[name], top_level_only=True) if m in MODULES]
    return seen


def test_check_config_loads_no_service_code():
    """`bootd check-config` validates a file in a fresh interpreter without loading any service."""
    code = ("import json, sys\n"
            "from bootd.cli.bootd_main import main\n"
            "rc = main(['check-config', sys.argv[1]])\n"
            "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))\n")
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "example.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    loaded = [m for m in result["modules"] if _is_under(m, SERVICE_CODE)]
    assert loaded == [], f"check-config loaded service code: {loaded}"


def test_config_layer_imports_only_config_models():
    loaded = _closure("bootd.config")
    assert loaded <= CONFIG_LAYER, f"bootd.config pulls in {sorted(loaded - CONFIG_LAYER)}"


def test_state_layer_imports_no_project_code_above_it():
    above = {m for m in _imports(MODULES["bootd.state"]) if m.split(".")[0] in PACKAGES} - CONFIG_LAYER
    assert above == set()


@pytest.mark.parametrize("core", sorted(PROTOCOL_CORES))
def test_protocol_core_does_no_io(core):
    """A core and everything it loads does no I/O of its own: no asyncio, sockets, services or SQL."""
    banned = ("asyncio", "socket", "selectors", "aiohttp", "sqlite3", "bootd.service", "bootd.daemon",
              "bootd.state", "bootd.http", "bootd.dhcp.server", "bootd.tftp.server", "bootd.tftp.service")
    bad = {(m, i) for m in _closure(core) for i in _imports(MODULES[m], top_level_only=True)
           if _is_under(i, banned)}
    assert bad == set(), f"{core} loads I/O code: {sorted(bad)}"


def test_no_module_below_the_daemon_imports_it():
    """The daemon and the CLI are the top: nothing else imports them (type-only imports aside)."""
    bad = sorted((m.name, i) for m in MODULES.values() if not _is_under(m.name, ("bootd.daemon", "bootd.cli"))
                 for i in _imports(m) if _is_under(i, ("bootd.daemon", "bootd.cli")))
    assert bad == []


def test_shared_helpers_import_no_component():
    bad = sorted((name, i) for name in SHARED_HELPERS if name in MODULES for i in _imports(MODULES[name])
                 if i.split(".")[0] in PACKAGES and i not in SHARED_HELPERS and i != "bootd")
    assert bad == []
    assert "nbdexport.pidwatch" not in MODULES, "pidwatch is shared: bootd/pidwatch.py"


def test_http_routes_registered_by_explicit_imports():
    """No route module found by a string name (importlib): a missing one fails at import, not at start."""
    calls = [ast.unparse(n) for m in MODULES.values() if _is_under(m.name, ("bootd.http",))
             for n in ast.walk(m.tree) if isinstance(n, ast.Call)
             and re.search(r"\b(import_module|__import__)$", ast.unparse(n.func))]
    assert calls == []


_SQL = re.compile(r"^\s*(SELECT\b.*\bFROM\b|INSERT\b.*\bINTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b|"
                  r"REPLACE\s+INTO\b|CREATE\s+(TABLE|INDEX|UNIQUE)\b|ALTER\s+TABLE\b|PRAGMA\b)", re.S)
_SQLITE_ONLY = re.compile(r"\bINSERT\s+OR\s+(IGNORE|REPLACE|ABORT|FAIL|ROLLBACK)\b|^\s*REPLACE\s+INTO\b", re.S)


def _strings(mod: Module):
    """(line, text) of each string literal; an f-string gives its literal parts joined."""
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))


def test_sql_only_in_the_state_layer_and_named_store_modules():
    bad = sorted(f"{m.name}:{line}: {text.strip()[:60]}" for m in MODULES.values() if m.name not in SQL_MODULES
                 for line, text in _strings(m) if _SQL.match(text))
    assert bad == []


def test_store_modules_are_named_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for name in SQL_MODULES - {"bootd.state"}:
        assert f"`{name.replace('.', '/')}.py`" in readme, f"README does not name the store module {name}"


def test_no_sqlite_only_statements_outside_the_state_module():
    """INSERT OR IGNORE / OR REPLACE are SQLite's: outside bootd/state.py SQL is portable (ON CONFLICT)."""
    bad = sorted(f"{m.name}:{line}: {text.strip()[:60]}" for m in MODULES.values() if m.name != "bootd.state"
                 for line, text in _strings(m) if _SQLITE_ONLY.search(text))
    assert bad == []


_MAC_PATTERN = re.compile(r"\[0-9a-f(A-F)?\]\{2\}.*\{[45]\}", re.I)


def test_one_mac_normaliser():
    """bootd/macaddr.py is the only place a MAC spelling is parsed; nothing re-exports it under another name."""
    own = {"normalize_mac", "parse_mac"}
    bad = []
    for m in MODULES.values():
        if m.name == "bootd.macaddr":
            continue
        bad += [f"{m.name}:{line}: MAC pattern" for line, text in _strings(m) if _MAC_PATTERN.search(text)]
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in own:
                bad.append(f"{m.name}:{node.lineno}: defines {node.name}")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in own for t in node.targets):
                bad.append(f"{m.name}:{node.lineno}: re-exports {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module not in ("bootd.macaddr", None) and \
                    any(a.name in own for a in node.names) and m.name not in ("bootd.config",):
                bad.append(f"{m.name}:{node.lineno}: imports the normaliser from {node.module}")
    assert bad == []


def test_one_size_formatter_and_one_path_confinement():
    defs: dict[str, list[str]] = {}
    for m in MODULES.values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.setdefault(node.name, []).append(m.name)
    assert len(defs.get("human", [])) == 1, defs.get("human")
