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
SQL_MODULES = {"bootd.state", "bootd.state_postgres", "bootd.dhcp.leases", "nbdexport.store",
               "snapshots.queries", "snapshots.lifecycle", "snapshots.prune", "snapshots.fsck"}

CONFIG_LAYER = {"bootd", "bootd.config", "bootd.macaddr", "bootd.nfsconfig", "bootd.clientconfig",
                "bootd.clientconfig.model",
                "bootd.authenticode"}  # stdlib only: the config check reads a kernel's PE header
# Sans-IO protocol cores: bytes and explicit time in, bytes and timers out.
PROTOCOL_CORES = {"bootd.dhcp.codec", "bootd.dhcp.policy", "bootd.tftp.session"}
# Shared helpers: used by several components, so they import none of them.
SHARED_HELPERS = {"bootd.chelper", "bootd.pidwatch", "bootd.macaddr", "bootd.units", "bootd.metrics",
                  "bootd.notify", "bootd.logsetup", "bootd.neighbours", "bootd.tftp.paths"}
# (not `socket`: pydantic's own imports load it)
SERVICE_CODE = ("bootd.nfs", "bootd.daemon", "bootd.service", "bootd.state", "bootd.dhcp.server",
                "bootd.tftp.server", "bootd.tftp.service", "bootd.http", "nbdexport", "pxe", "snapshots",
                "aiohttp", "asyncio", "sqlite3")
# What a protocol core may take from `socket`: address and byte-order conversions, no sockets.
SOCKET_CONVERSIONS = {"inet_aton", "inet_ntoa", "inet_pton", "inet_ntop", "AF_INET", "AF_INET6",
                      "htons", "ntohs", "htonl", "ntohl"}


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


STATE_LAYER = {"bootd.state", "bootd.state_postgres"}  # one store, two engines (issue 20)


def test_state_layer_imports_no_project_code_above_it():
    for name in STATE_LAYER:
        above = {m for m in _imports(MODULES[name]) if m.split(".")[0] in PACKAGES} - CONFIG_LAYER - STATE_LAYER
        assert above == set(), name


def _socket_uses(mod: Module) -> set[str]:
    """The names `mod` takes from the socket module (`socket.X`, `from socket import X`)."""
    used = {n.attr for n in ast.walk(mod.tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "socket"}
    used |= {a.name for n in ast.walk(mod.tree) if isinstance(n, ast.ImportFrom) and n.module == "socket"
             for a in n.names}
    return used


@pytest.mark.parametrize("core", sorted(PROTOCOL_CORES))
def test_protocol_core_does_no_io(core):
    """A core and everything it loads does no I/O of its own: no event loop, no socket, no service (the
    state layer below it is allowed: the DHCP policy reads the lease table)."""
    banned = ("asyncio", "selectors", "aiohttp", "bootd.service", "bootd.daemon", "bootd.http", "bootd.nfs",
              "bootd.dhcp.server", "bootd.tftp.server", "bootd.tftp.service", "nbdexport")
    loaded = _closure(core)
    bad = {(m, i) for m in loaded for i in _imports(MODULES[m], top_level_only=True) if _is_under(i, banned)}
    bad |= {(m, f"socket.{name}") for m in loaded for name in _socket_uses(MODULES[m]) - SOCKET_CONVERSIONS}
    assert bad == set(), f"{core} loads I/O code: {sorted(bad)}"


def test_no_module_below_the_daemon_imports_it():
    """The daemon and the CLI are the top: nothing else imports them (type-only imports aside)."""
    bad = sorted((m.name, i) for m in MODULES.values() if not _is_under(m.name, ("bootd.daemon", "bootd.cli"))
                 for i in _imports(m) if _is_under(i, ("bootd.daemon", "bootd.cli")))
    assert bad == []


# What the protocol cores build on (pure: no I/O of their own), between the state layer and `Service`.
CORE_SUPPORT = {"bootd.dhcp.firmware", "bootd.bootplan", "snapshots.model"}
STORE_MODULES = {"bootd.state", "bootd.state_postgres", "bootd.dhcp.leases", "nbdexport.store"}


def _rank(name: str) -> int:
    """0 config models, 1 state, 2 protocol cores, 3 Service, 4 services and their helpers, 5 daemon and CLI."""
    if name in PACKAGES or name in CONFIG_LAYER or name in {"bootd.units", "bootd.macaddr"} or \
            (name in MODULES and MODULES[name].path.name == "__init__.py"):
        return 0
    if name in STORE_MODULES:
        return 1
    if name in PROTOCOL_CORES or name in CORE_SUPPORT:
        return 2
    if name == "bootd.service":
        return 3
    if _is_under(name, ("bootd.daemon", "bootd.cli")):
        return 5
    return 4


def test_no_module_imports_a_layer_above_its_own():
    bad = sorted(f"{m.name} ({_rank(m.name)}) imports {i} ({_rank(i)})" for m in MODULES.values()
                 for i in _imports(m) if i in MODULES and _rank(i) > _rank(m.name))
    assert bad == [], "\n".join(bad)


def test_shared_helpers_import_no_component():
    bad = sorted((name, i) for name in SHARED_HELPERS if name in MODULES for i in _imports(MODULES[name])
                 if i.split(".")[0] in PACKAGES and i not in SHARED_HELPERS and i != "bootd")
    assert bad == []
    assert "nbdexport.pidwatch" not in MODULES, "pidwatch is shared: bootd/pidwatch.py"


def test_http_routes_registered_by_explicit_imports():
    """No route (or bootctl command) module found by a string name: a missing one fails at import, not at start."""
    calls = [ast.unparse(n) for m in MODULES.values() if _is_under(m.name, ("bootd.http", "bootd.cli"))
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
    assert bad == [], "\n".join(bad)


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
    assert bad == [], "\n".join(bad)


def _calls_of(mod: Module, function: ast.FunctionDef) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)}


def test_one_size_formatter():
    """Byte sizes are formatted by bootd.units.human only (the CLI's tables and the store's refusals)."""
    def unit_ladder(node: ast.AST) -> bool:  # ("B", "KiB", "MiB", ...) or ("B", "K", "M", ...)
        words = {e.value for e in getattr(node, "elts", ()) if isinstance(e, ast.Constant)}
        return isinstance(node, (ast.Tuple, ast.List)) and "B" in words and bool(words & {"K", "KiB", "KB"})

    formatters = sorted(f"{m.name}.{f.name}" for m in MODULES.values() for f in ast.walk(m.tree)
                        if isinstance(f, ast.FunctionDef) and any(unit_ladder(n) for n in ast.walk(f)))
    assert formatters == ["bootd.units.human"]


def test_one_path_confinement():
    """HTTP's boot files are confined by the TFTP server's function: realpath checks live in one module."""
    checks = sorted(m.name for m in MODULES.values() for n in ast.walk(m.tree)
                    if isinstance(n, ast.Call) and ast.unparse(n.func) in ("os.path.realpath", "realpath")
                    and _is_under(m.name, ("bootd.http", "bootd.tftp")))
    assert set(checks) == {"bootd.tftp.paths"}
    boot = MODULES["bootd.http.boot"]
    confined = next(n for n in ast.walk(boot.tree) if isinstance(n, ast.FunctionDef) and n.name == "confined_path")
    assert "resolve" in _calls_of(boot, confined)


# -- the methods that replaced the components' SQL (behaviour, on a real state file) -------------------

def test_state_methods_that_replaced_component_sql(tmp_path):
    from bootd.state import open_state
    from nbdexport.store import DiskTables
    from pxe.tokens import fallback_token

    store = open_state(tmp_path / "state.db")
    try:
        mac = "52:54:00:00:00:01"
        # a host's fallback token is made once: a second caller with another new token gets the first
        assert store.pxe_token(mac, "first") == "first"
        assert store.pxe_token(mac, "second") == "first"
        assert fallback_token(store, "52-54-00-00-00-01") == "first"  # any spelling of the MAC

        store.put_dhcp_reservation(mac, "10.0.0.5", "pc01", now=1.0)
        store.put_dhcp_reservation(mac, "10.0.0.6", "pc01b", now=2.0)  # the MAC's reservation moves
        assert store.dhcp_reservations() == [{"mac": mac, "ip": "10.0.0.6", "name": "pc01b", "created": 1.0}]
        assert store.delete_dhcp_reservation(mac) is True
        assert store.delete_dhcp_reservation(mac) is False

        store.touch_host(mac, name="pc01")
        assert store.macs_named("pc01") == [mac] and store.macs_named("nobody") == []

        tables = DiskTables(store)
        assert tables.new_boot(mac, 1.0, []) == 1
        tables.add_export("tok", mac, 2, True, "7", 7, "img@v1", "/b", "/o", "ov1", False, 0, "10.0.0.1", 1.0, 1.0)
        assert tables.new_boot(mac, 2.0, ["tok"]) == 2 and tables.exports() == []
        tables.put_layer(mac, "/l1", "7", 7, "img@v1", "/b", 1.0)
        tables.put_layer(mac, "/l2", "8", 8, "img@v2", "/b2", 2.0)  # replaces the row (was INSERT OR REPLACE)
        assert dict(tables.layer(mac)) == {"mac": mac, "path": "/l2", "snapshot_key": "8", "snapshot_id": 8,
                                           "snapshot_name": "img@v2", "base_path": "/b2", "created": 2.0}
        tables.drop_layer(mac)
        assert tables.layer(mac) is None
    finally:
        store.close()


def test_human_sizes():
    from bootd.units import human

    assert [human(n) for n in (None, 0, 512, 1536, 5 << 20, 3 << 30, 2 << 40)] == \
        ["-", "0 B", "512 B", "1.5 KiB", "5.0 MiB", "3.0 GiB", "2.0 TiB"]
