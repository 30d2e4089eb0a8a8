"""NFS exports of the client roots (the minimal Linux a lab PC boots): render, apply, check.

The exports are read-only and limited to the served subnets. They are applied to the kernel NFS
server (`/etc/exports.d/bootd.exports` + `exportfs -ra`) or, where the kernel server is absent, to
NFS-Ganesha (a file of EXPORT blocks that the admin's ganesha.conf `%include`s, then SIGHUP: Ganesha
makes its export list equal to its config, so a root dropped from bootd's config is unexported).
Files are replaced atomically and only when their content changes.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from bootd.nfsconfig import ClientRootConfig, NfsConfig  # the config models (pure: check-config loads them)
from bootd.service import Service

if TYPE_CHECKING:
    from bootd.config import Config
    from bootd.daemon import Context

log = logging.getLogger("bootd.nfs")


# -- rendering ---------------------------------------------------------------------------------

def served_subnets(config: Config) -> list[ipaddress.IPv4Network]:
    """The subnets exports are limited to: nfs.subnets, else the served interfaces' subnets."""
    if config.nfs.subnets:
        return list(config.nfs.subnets)
    out: list[ipaddress.IPv4Network] = []
    for iface in config.interfaces:
        if iface.subnet not in out:
            out.append(iface.subnet)
    return out


def pseudo_path(nfs: NfsConfig, root: ClientRootConfig) -> str:
    return nfs.pseudo_root.rstrip("/") + "/" + root.name


def export_id(nfs: NfsConfig, index: int, root: ClientRootConfig) -> int:
    return root.export_id or nfs.export_id_base + index


KERNEL_OPTIONS = "ro,no_root_squash,async,no_subtree_check,insecure"


def render_kernel_exports(nfs: NfsConfig, subnets: list[ipaddress.IPv4Network]) -> str:
    """exports(5) lines: each root read-only to each served subnet, nothing when no subnet is served."""
    lines = ["# Rendered by bootd from nfs.roots; edits are lost at the next apply."]
    for root in nfs.roots:
        if not subnets:
            break
        clients = " ".join(f"{net}({KERNEL_OPTIONS})" for net in subnets)
        lines.append(f"{root.path} {clients}")
    return "\n".join(lines) + "\n"


def render_ganesha_exports(nfs: NfsConfig, subnets: list[ipaddress.IPv4Network]) -> str:
    """NFS-Ganesha EXPORT blocks: no access by default, read-only for the served subnets."""
    out = ["# Rendered by bootd from nfs.roots; %include this file from ganesha.conf.",
           "# Edits are lost at the next apply."]
    if not subnets:
        return "\n".join(out) + "\n"
    for i, root in enumerate(nfs.roots):
        out += [
            "EXPORT {",
            f"    Export_Id = {export_id(nfs, i, root)};",
            f'    Path = "{root.path}";',
            f'    Pseudo = "{pseudo_path(nfs, root)}";',
            "    Protocols = 4;",
            "    Transports = TCP;",
            "    Access_Type = None;",
            "    Squash = No_Root_Squash;",
            "    SecType = sys;",
            "    FSAL { Name = VFS; }",
            "    CLIENT {",
            f"        Clients = {', '.join(str(n) for n in subnets)};",
            "        Access_Type = RO;",
            "    }",
            "}",
        ]
    return "\n".join(out) + "\n"


def kernel_nfsd_available() -> bool:
    try:
        has_fs = "nfsd" in Path("/proc/filesystems").read_text()
    except OSError:
        has_fs = False
    return has_fs and shutil.which("exportfs") is not None


def choose_server(nfs: NfsConfig) -> str:
    """kernel or ganesha (or off): `auto` takes the kernel server when it exists here."""
    if nfs.server != "auto":
        return nfs.server
    if kernel_nfsd_available():
        return "kernel"
    if Path(nfs.ganesha_exports_file).parent.is_dir() or shutil.which("ganesha.nfsd"):
        return "ganesha"
    return "off"


class NfsError(RuntimeError):
    pass


def write_if_changed(path: Path, text: str) -> bool:
    """Atomic replace; False (and no write) when the file already holds exactly this text."""
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.bootd-tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


@dataclass
class ApplyResult:
    server: str
    file: Optional[str]
    changed: bool
    exports: list[str]
    reloaded: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"server": self.server, "file": self.file, "changed": self.changed, "exports": self.exports,
                "reloaded": self.reloaded}


def ganesha_pid(nfs: NfsConfig) -> int:
    try:
        pid = int(Path(nfs.ganesha_pidfile).read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError) as e:
        raise NfsError(f"NFS-Ganesha is not running (pid file {nfs.ganesha_pidfile}: {e})") from None


def apply_exports(config: Config, force: bool = False) -> ApplyResult:
    """Make the NFS server's exports equal to nfs.roots (read-only, served subnets only). `force`
    reloads the server even when the file is unchanged (after a failed reload)."""
    nfs: NfsConfig = config.nfs
    kind = choose_server(nfs)
    subnets = served_subnets(config)
    if kind == "off":
        return ApplyResult("off", None, False, [])
    if nfs.roots and not subnets:
        log.warning("nfs: client roots configured but no served subnet: nothing is exported")
    if kind == "kernel":
        path = Path(nfs.exports_file)
        text = render_kernel_exports(nfs, subnets)
        if not nfs.roots and not path.exists():
            return ApplyResult(kind, str(path), False, [])
        changed = write_if_changed(path, text) or force
        exports = [r.path for r in nfs.roots] if subnets else []
        if changed:
            try:
                res = subprocess.run(["exportfs", "-ra"], capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise NfsError(f"exportfs -ra could not run ({e}); {path} is written") from None
            if res.returncode != 0:
                raise NfsError(f"exportfs -ra failed: {res.stderr.strip() or res.returncode}")
        return ApplyResult(kind, str(path), changed, exports, reloaded=changed)
    path = Path(nfs.ganesha_exports_file)
    text = render_ganesha_exports(nfs, subnets)
    if not nfs.roots and not path.exists():
        return ApplyResult(kind, str(path), False, [])
    changed = write_if_changed(path, text) or force
    exports = [pseudo_path(nfs, r) for r in nfs.roots] if subnets else []
    reloaded = False
    if changed:
        # SIGHUP makes Ganesha's export list equal to its config (adds, updates and removes).
        try:
            os.kill(ganesha_pid(nfs), signal.SIGHUP)
        except OSError as e:
            raise NfsError(f"cannot signal NFS-Ganesha: {e}") from None
        reloaded = True
    return ApplyResult(kind, str(path), changed, exports, reloaded)


# -- reachability check: ONC RPC over TCP, NFSv4.0 COMPOUND {PUTROOTFH, LOOKUP...} ------------------

NFS_PROGRAM, NFS_V4 = 100003, 4
OP_LOOKUP, OP_PUTROOTFH = 15, 24
NFS4_ERRORS = {0: "NFS4_OK", 1: "NFS4ERR_PERM", 2: "NFS4ERR_NOENT", 13: "NFS4ERR_ACCESS",
               10016: "NFS4ERR_WRONGSEC", 10013: "NFS4ERR_GRACE", 10008: "NFS4ERR_DELAY"}


def _xdr_opaque(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)


def _auth_sys() -> bytes:
    body = struct.pack(">I", int(time.time()) & 0xFFFFFFFF) + _xdr_opaque(b"bootd") + struct.pack(">III", 0, 0, 0)
    return struct.pack(">I", 1) + _xdr_opaque(body)


def rpc_call(sock: socket.socket, xid: int, proc: int, args: bytes) -> bytes:
    """One RPC call to NFSv4 on a connected TCP socket; returns the procedure's result bytes."""
    msg = struct.pack(">IIIIII", xid, 0, 2, NFS_PROGRAM, NFS_V4, proc) + _auth_sys() + struct.pack(">II", 0, 0) + args
    sock.sendall(struct.pack(">I", 0x80000000 | len(msg)) + msg)
    data = b""
    last = False
    while not last:
        hdr = _recv_exact(sock, 4)
        (mark,) = struct.unpack(">I", hdr)
        last = bool(mark & 0x80000000)
        data += _recv_exact(sock, mark & 0x7FFFFFFF)
    rxid, mtype, stat = struct.unpack(">III", data[:12])
    if rxid != xid or mtype != 1:
        raise NfsError("not an RPC reply to our call")
    if stat != 0:
        raise NfsError("RPC call denied by the server")
    _flavor, vlen = struct.unpack(">II", data[12:20])
    off = 20 + vlen + (-vlen % 4)
    (accept,) = struct.unpack(">I", data[off:off + 4])
    if accept != 0:
        raise NfsError(f"RPC call not accepted (accept_stat {accept}): no NFSv4 service")
    return data[off + 4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NfsError("connection closed by the NFS server")
        buf += chunk
    return buf


def check_export(address: str, path: str, port: int = 2049, timeout: float = 3.0) -> str:
    """Ask the NFS server at `address` to look up `path` (NFSv4 pseudo or real path); returns "ok"
    or raises NfsError saying what failed (connection, RPC, or the NFS status)."""
    comps = [c for c in path.split("/") if c]
    ops = struct.pack(">I", OP_PUTROOTFH) + b"".join(
        struct.pack(">I", OP_LOOKUP) + _xdr_opaque(c.encode()) for c in comps)
    args = _xdr_opaque(b"") + struct.pack(">II", 0, 1 + len(comps)) + ops
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            res = rpc_call(s, int(time.time() * 1000) & 0x7FFFFFFF, 1, args)
    except OSError as e:
        raise NfsError(f"cannot reach NFS on {address}:{port}: {e}") from None
    (status,) = struct.unpack(">I", res[:4])
    if status != 0:
        raise NfsError(f"NFS lookup of {path} on {address} failed: {NFS4_ERRORS.get(status, status)}")
    return "ok"


def check_exports(config: Config, result: ApplyResult) -> dict[str, str]:
    """Per export: "ok" or the reason it is not reachable, checked on each served interface address."""
    nfs: NfsConfig = config.nfs
    out: dict[str, str] = {}
    addrs = [str(i.address.ip) for i in config.interfaces] or ["127.0.0.1"]
    for root in nfs.roots:
        path = pseudo_path(nfs, root) if result.server == "ganesha" else root.path
        for addr in addrs:
            key = f"{addr}:{path}"
            # A reload is asynchronous in the server: retry for a moment before calling it unreachable.
            deadline = time.monotonic() + nfs.check_timeout
            while True:
                try:
                    out[key] = check_export(addr, path, timeout=nfs.check_timeout)
                    break
                except NfsError as e:
                    out[key] = str(e)
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
    return out


def cmdline_for(config: Config, host_mac: str | None = None, root_name: str | None = None) -> str:
    """Kernel command line words for a client that boots the client root over NFS (pxe.booter adds
    them to every entry): `root=/dev/nfs nfsroot=SERVER:PATH,vers=4.2,ro ip=dhcp`; empty when no
    client root is configured."""
    nfs: NfsConfig = config.nfs
    if not nfs.roots or not config.interfaces:
        return ""
    root = next((r for r in nfs.roots if r.name == root_name), nfs.roots[0])
    kind = choose_server(nfs)
    path = pseudo_path(nfs, root) if kind == "ganesha" else root.path
    server = config.interfaces[0].address.ip
    # The menu adds bootd.config=http://.../clients/<mac>/, which the client root's init hook reads.
    return f"root=/dev/nfs nfsroot={server}:{path},vers=4.2,ro ip=dhcp"


class NfsService(Service):
    """Applies the client-root exports at start and on every reload; keeps the last result."""

    name = "nfs"

    def __init__(self) -> None:
        self.last: dict[str, object] = {}
        self.failed = False  # the last reload failed: reload again next time even if the file is unchanged

    async def start(self, ctx: Context) -> None:
        await self._apply(ctx)

    async def reload(self, ctx: Context) -> None:
        await self._apply(ctx)

    async def stop(self) -> None:
        pass  # exports stay: clients that run from the client root must not lose it when bootd restarts

    async def _apply(self, ctx: Context) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, apply_exports, ctx.config, self.failed)
        except (NfsError, OSError) as e:
            self.failed = True
            self.last = {"error": str(e)}
            ctx.metrics.inc("nfs", "apply_errors")
            log.error("nfs: %s", e)
            return
        self.failed = False
        info = result.as_dict()
        if ctx.config.nfs.check and result.exports:
            checks = await loop.run_in_executor(None, check_exports, ctx.config, result)
            info["check"] = checks
            for where, state in checks.items():
                if state != "ok":
                    log.warning("nfs: export %s not reachable: %s", where, state)
        if result.changed:
            log.info("nfs: %s exports now %s (%s)", result.server, ", ".join(result.exports) or "none", result.file)
        self.last = info

    def status(self) -> dict[str, object]:
        return self.last
