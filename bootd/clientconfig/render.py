"""Render a host's client jobs (qemuinstanceN, xserverN, viewerN) as Upstart jobs and systemd units.

Pure: takes the merged ClientsConfig, the host and one DiskRef per instance, returns file name ->
text. Commands are built as argv lists from validated values and only then quoted for the target
(POSIX shell words for Upstart `exec`, systemd's own quoting for ExecStart=), so no value is ever
glued into a command line as raw text.
"""
from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from importlib import resources

from .model import DEFAULT_VIEWER, ClientsConfig, InstanceConfig, check_token, display_port, parse_nbd_uri

QEMU = "/usr/bin/qemu-system-x86_64"
VIEWER_PATHS = {"xtigervncviewer": "/usr/bin/xtigervncviewer", "vncviewer": "/usr/bin/vncviewer",
                "remote-viewer": "/usr/bin/remote-viewer", "xfreerdp": "/usr/bin/xfreerdp"}
KINDS = ("qemuinstance", "xserver", "viewer")


class RenderError(ValueError):
    """The host's client config cannot be rendered (e.g. no disk export for an instance)."""


@dataclass(frozen=True)
class DiskRef:
    """Where an instance's disk is: a vetted NBD URI and the image format QEMU should expect."""

    uri: str
    format: str = "raw"
    source: str = "config"   # config | disks | menu: where the URI came from (shown in the index)

    def __post_init__(self) -> None:
        parse_nbd_uri(self.uri)
        if self.format not in ("raw", "qcow2"):
            raise ValueError(f"disk format {self.format!r} must be raw or qcow2")


@dataclass(frozen=True)
class HostRef:
    mac: str
    name: str | None = None

    @property
    def label(self) -> str:
        """The host name when it is a safe token, else the MAC (host names are shown in comments)."""
        if self.name:
            try:
                return check_token(self.name)
            except ValueError:
                pass
        return self.mac


_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def sh_join(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def systemd_quote(arg: str) -> str:
    """Quote one argument for ExecStart= (systemd.service(5) "Command lines")."""
    if "\n" in arg or "\r" in arg:
        raise RenderError(f"argument {arg!r} contains a line break")
    arg = arg.replace("%", "%%")
    if _SYSTEMD_PLAIN.fullmatch(arg) and "$" not in arg:
        return arg
    arg = arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{arg}"'


def systemd_join(argv: list[str]) -> str:
    return " ".join(systemd_quote(a) for a in argv)


@functools.lru_cache(maxsize=None)
def _template(name: str) -> str:
    """Templates are package data; read once per process (a new bootd version restarts the daemon)."""
    return resources.files("upstart_templates").joinpath(name).read_text()


_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


def fill(template: str, values: dict[str, str]) -> str:
    """Replace {{key}} placeholders; every placeholder must have a value (no silent blanks)."""
    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise RenderError(f"template placeholder {key!r} has no value")
        return values[key]
    return _PLACEHOLDER.sub(sub, template)


@dataclass(frozen=True)
class Instance:
    """One instance with every derived value resolved (index, VT, display, ports)."""

    n: int
    cfg: InstanceConfig
    disk: DiskRef
    clients: ClientsConfig

    @property
    def name(self) -> str:
        return self.cfg.name or f"instance{self.n}"

    @property
    def vt(self) -> int:
        return self.cfg.vt or 6 + self.n

    @property
    def port(self) -> int:
        return display_port(self.cfg, self.n)

    @property
    def x_display(self) -> str:
        return f":{self.clients.xserver.display_base + self.n}"

    @property
    def protocol(self) -> str:
        return self.clients.viewer.protocol or self.cfg.display

    @property
    def viewer_program(self) -> str:
        return self.clients.viewer.program or DEFAULT_VIEWER[self.protocol]


def qemu_argv(inst: Instance) -> list[str]:
    c = inst.cfg
    argv = [QEMU, "-name", f"guest={inst.name},process=qemuinstance{inst.n}"]
    argv += ["-machine", c.machine]
    for accel in c.accel.split(":"):
        argv += ["-accel", accel]
    if c.cpu_model:
        argv += ["-cpu", c.cpu_model]
    argv += ["-smp", str(c.cpus), "-m", str(c.memory)]
    drive = [f"file={inst.disk.uri}", f"format={c.format or inst.disk.format}", f"cache={c.cache}"]
    if c.discard_writes:
        drive.append("snapshot=on")
    if c.disk_interface == "scsi":
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        argv += ["-drive", ",".join(drive + ["if=none", "id=disk0"]), "-device", "scsi-hd,drive=disk0,bus=scsi0.0"]
    else:
        argv += ["-drive", ",".join(drive + [f"if={c.disk_interface}", "media=disk"])]
    if c.display == "vnc":
        argv += ["-display", f"vnc=127.0.0.1:{inst.port - 5900}"]
    elif c.display == "spice":
        argv += ["-display", "none", "-spice", f"addr=127.0.0.1,port={inst.port},disable-ticketing=on"]
    else:
        argv += ["-display", "none"]
    if c.network == "none":
        argv += ["-nic", "none"]
    else:
        nic = "user" if c.network == "user" else f"bridge,br={c.bridge}"
        nic += f",model={c.nic_model}"
        if c.guest_mac:
            nic += f",mac={c.guest_mac}"
        if c.display == "rdp":
            nic += f",hostfwd=tcp:127.0.0.1:{inst.port}-:3389"
        argv += ["-nic", nic]
    # Nothing a lab user can reach from the display: no monitor, no serial/parallel console on it.
    extra = [tuple(a) for a in c.extra_args]
    argv += ["-monitor", "none", "-parallel", "none"]
    if not any(a[0] == "-serial" for a in extra):
        argv += ["-serial", "none"]
    for a in extra:
        argv += list(a)
    return argv


def xserver_argv(inst: Instance) -> list[str]:
    x = inst.clients.xserver
    argv = [x.program, inst.x_display]
    if x.program == "/usr/bin/Xvfb":
        argv += ["-screen", "0", f"1024x768x{x.depth or 24}"]
    else:
        argv += [f"vt{inst.vt}"]
        if x.depth:
            argv += ["-depth", str(x.depth)]
    argv += ["-nolisten", "tcp"]
    if not x.blanking:
        argv += ["-s", "0", "-dpms"]
    if x.no_cursor:
        argv += ["-nocursor"]
    return argv


def viewer_argv(inst: Instance) -> list[str]:
    v = inst.clients.viewer
    prog = inst.viewer_program
    argv = [VIEWER_PATHS[prog]]
    if prog in ("xtigervncviewer", "vncviewer"):
        if v.fullscreen:
            argv.append("-FullScreen")
        if v.view_only:
            argv.append("-ViewOnly")
        if v.shared:
            argv.append("-Shared")
        if not v.menu_key:
            argv.append("-MenuKey=")  # a name TigerVNC does not know: no menu key, no "Press F8" banner
        argv += ["-AlertOnFatalError=0", "-ReconnectOnError=0", f"127.0.0.1::{inst.port}"]
    elif prog == "remote-viewer":
        if v.fullscreen:
            argv.append("--full-screen")
        argv.append(f"{inst.protocol}://127.0.0.1:{inst.port}")
    else:  # xfreerdp
        if v.fullscreen:
            argv.append("/f")
        argv += ["/cert:ignore", f"/v:127.0.0.1:{inst.port}"]
    return argv


def _description(inst: Instance, kind: str, host: HostRef) -> str:
    base = inst.cfg.description or inst.name
    what = {"qemuinstance": "QEMU instance", "xserver": "X server", "viewer": "Viewer"}[kind]
    return f"bootd {what} {inst.n} ({base}) for {host.label}"


def instances_of(clients: ClientsConfig, disks: list[DiskRef]) -> list[Instance]:
    if len(disks) != len(clients.instances):
        raise RenderError(f"{len(clients.instances)} instances but {len(disks)} disks")
    pairs = zip(clients.instances, disks, strict=True)
    return [Instance(n, cfg, disk, clients) for n, (cfg, disk) in enumerate(pairs, 1)]


def render_host(host: HostRef, clients: ClientsConfig, disks: list[DiskRef]) -> dict[str, str]:
    """All files for one host, in start order per instance: qemuinstanceN, xserverN, viewerN."""
    files: dict[str, str] = {}
    formats = {"upstart": [".conf"], "systemd": [".service"], "both": [".conf", ".service"]}[clients.init]
    for inst in instances_of(clients, disks):
        argvs = {"qemuinstance": qemu_argv(inst), "xserver": xserver_argv(inst), "viewer": viewer_argv(inst)}
        for ext in formats:
            for kind in KINDS:
                fname = f"{kind}{inst.n}{ext}"
                desc = _description(inst, kind, host)
                quote_cmd = sh_join if ext == ".conf" else systemd_join
                values = {
                    "file": fname, "n": str(inst.n), "name": inst.name, "host": host.label, "mac": host.mac,
                    "description": f'"{desc}"' if ext == ".conf" else desc.replace("%", "%%"),
                    "command": quote_cmd(argvs[kind]),
                    "overlay_dir": shlex.quote(inst.cfg.overlay_dir),
                    "display": inst.x_display, "vt": str(inst.vt),
                    "x_socket": f"/tmp/.X11-unix/X{inst.x_display[1:]}",
                    "instance_job": f"qemuinstance{inst.n}", "xserver_job": f"xserver{inst.n}",
                    "disk_uri": inst.disk.uri, "port": str(inst.port),
                }
                files[fname] = fill(_template(f"{kind}{ext}.tmpl"), values)
    return files


def index_entries(host: HostRef, clients: ClientsConfig, disks: list[DiskRef]) -> list[dict[str, object]]:
    """What the index lists per instance (for humans and the init hook)."""
    out: list[dict[str, object]] = []
    for inst in instances_of(clients, disks):
        out.append({"n": inst.n, "name": inst.name, "vt": inst.vt, "display": inst.x_display,
                    "protocol": inst.protocol, "port": inst.port, "viewer": inst.viewer_program,
                    "disk": inst.disk.uri, "format": inst.cfg.format or inst.disk.format,
                    "cache": inst.cfg.cache, "disk_source": inst.disk.source})
    return out
