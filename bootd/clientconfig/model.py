"""Config models for what a client boots into: its QEMU instances, the X server and the viewer.

Every value that reaches a rendered job or unit is validated here first: names and paths are
restricted to characters that are safe in a shell word, a QEMU option value and a systemd unit
(no quotes, spaces, commas or shell metacharacters); the only free text (descriptions) refuses
quotes, backslashes, `$`, backticks and control characters and is quoted on output. Extra QEMU
arguments come only from VETTED_QEMU_ARGS. A group sets `clients:`; a host may override any part
(`merge_clients`).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from bootd.macaddr import parse_mac

MAX_INSTANCES = 8

_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PATH_RE = re.compile(r"/[A-Za-z0-9._/-]{0,255}")
# Free text: letters (any script), digits, spaces and a few harmless punctuation marks.
_TEXT_FORBIDDEN = re.compile(r"[\"'`$\\;|&<>*?!{}\[\]~#%,\x00-\x1f\x7f]")
_NBD_URI_RE = re.compile(
    r"nbd://(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>[0-9]{1,5}))?/(?P<export>[A-Za-z0-9._-]{0,128})"
    r"|nbd\+unix:///(?P<uexport>[A-Za-z0-9._-]{0,128})\?socket=(?P<socket>/[A-Za-z0-9._/-]{1,200})")


def check_token(value: str, what: str = "value") -> str:
    """A name used as one shell word / QEMU option value / unit-name part: [A-Za-z0-9._-], no leading dot."""
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-' "
                         "(starting with a letter or digit): no spaces, quotes or shell metacharacters")
    return value


def check_path(value: str, what: str = "path") -> str:
    """An absolute path without spaces, quotes, commas, '..' or shell metacharacters."""
    if not isinstance(value, str) or not _PATH_RE.fullmatch(value) or ".." in value.split("/") \
            or "//" in value:
        raise ValueError(f"{what} {value!r} must be an absolute path of letters, digits, '.', '_', '-' and '/' "
                         "without '..', spaces, quotes, commas or shell metacharacters")
    return value


def check_text(value: str, what: str = "text") -> str:
    """Free text for descriptions: printable, at most 120 characters, no quotes/`$`/backslash/control."""
    if not isinstance(value, str) or len(value) > 120 or _TEXT_FORBIDDEN.search(value) or not value.strip() \
            or any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in value):
        raise ValueError(f"{what} {value!r} must be 1-120 printable characters without quotes, backslashes, "
                         "commas or shell metacharacters ($ ` ; | & < > * ? ! {{ }} [ ] ~ # %)")
    return value


def parse_nbd_uri(uri: str) -> dict[str, str | int]:
    """Split a vetted NBD URI into host, port, export (or socket, export)."""
    m = _NBD_URI_RE.fullmatch(uri or "")
    if not m:
        raise ValueError(f"disk URI {uri!r} must be nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=/PATH "
                         "with an export name of letters, digits, '.', '_' or '-'")
    if m.group("socket"):
        return {"socket": m.group("socket"), "export": m.group("uexport")}
    port = int(m.group("port") or 10809)
    if not 1 <= port <= 65535:
        raise ValueError(f"disk URI {uri!r}: port {port} out of range")
    return {"host": m.group("host"), "port": port, "export": m.group("export")}


Token = Annotated[str, AfterValidator(check_token)]
SafePath = Annotated[str, AfterValidator(check_path)]
FreeText = Annotated[str, AfterValidator(check_text)]


def _parse_memory(v: Any) -> Any:
    """Accept 2048, "2048", "2048M", "2G" (MiB by default)."""
    if isinstance(v, bool):
        raise ValueError("memory must be a size such as 2048, '2048M' or '2G'")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]{1,7})\s*([MmGg]?)i?[Bb]?\s*", v)
        if not m:
            raise ValueError(f"memory {v!r} must be a size such as 2048, '2048M' or '2G'")
        n = int(m.group(1))
        return n * 1024 if m.group(2).lower() == "g" else n
    return v


MemoryMiB = Annotated[int, BeforeValidator(_parse_memory), Field(ge=16, le=4 * 1024 * 1024)]

# Extra QEMU arguments an admin may add, and what each one's value may be: None = a flag without value,
# a frozenset = one of those exact values, a regex = a value matching it in full.
_SAFE_FILE = r"/[A-Za-z0-9._/-]{1,200}"
VETTED_QEMU_ARGS: dict[str, None | frozenset[str] | re.Pattern[str]] = {
    "-usb": None,
    "-no-reboot": None,
    "-no-hpet": None,
    "-device": frozenset({
        "usb-tablet", "usb-kbd", "usb-mouse", "qemu-xhci", "virtio-rng-pci", "virtio-balloon-pci",
        "virtio-keyboard-pci", "virtio-tablet-pci", "virtio-mouse-pci", "intel-hda", "ich9-intel-hda",
        "hda-duplex", "hda-output", "AC97", "usb-ehci", "nec-usb-xhci"}),
    "-vga": frozenset({"std", "virtio", "qxl", "cirrus", "vmware", "none"}),
    "-rtc": frozenset({"base=utc", "base=localtime", "base=utc,clock=host", "base=localtime,clock=host",
                       "base=utc,driftfix=slew", "base=localtime,driftfix=slew"}),
    "-k": re.compile(r"[a-z]{2}(-[a-z]{2,3})?"),
    "-boot": re.compile(
        r"(order=[acdn]{1,4}|once=[acdn]{1,4}|menu=(on|off)|splash-time=[0-9]{1,5}|strict=(on|off))"
        r"(,(order=[acdn]{1,4}|once=[acdn]{1,4}|menu=(on|off)|splash-time=[0-9]{1,5}|strict=(on|off)))*"),
    "-serial": re.compile(rf"null|none|file:{_SAFE_FILE}"),
    # a local QMP socket for a management agent on the client (screendumps, clean powerdown)
    "-qmp": re.compile(rf"unix:{_SAFE_FILE},server=on,wait=off"),
    "-smp": re.compile(r"[0-9]{1,3}(,(sockets|cores|threads|maxcpus)=[0-9]{1,3})*"),
    "-global": frozenset({"kvm-pit.lost_tick_policy=delay", "ICH9-LPC.disable_s3=1", "PIIX4_PM.disable_s3=1"}),
}


def parse_extra_arg(item: Any) -> tuple[str, ...]:
    """One extra QEMU argument: "-usb", "-device usb-tablet" or ["-device", "usb-tablet"]."""
    if isinstance(item, (list, tuple)):
        parts = [str(p) for p in item]
    elif isinstance(item, str):
        parts = item.strip().split(" ", 1) if item.strip() else []
    else:
        raise ValueError(f"extra QEMU argument {item!r} must be a string such as '-device usb-tablet'")
    if not parts or len(parts) > 2:
        raise ValueError(f"extra QEMU argument {item!r} must be an option and at most one value")
    opt = parts[0]
    if opt not in VETTED_QEMU_ARGS:
        raise ValueError(f"extra QEMU argument {opt!r} is not in the vetted list "
                         f"({', '.join(sorted(VETTED_QEMU_ARGS))})")
    rule = VETTED_QEMU_ARGS[opt]
    if rule is None:
        if len(parts) != 1:
            raise ValueError(f"extra QEMU argument {opt} takes no value (got {parts[1]!r})")
        return (opt,)
    if len(parts) != 2:
        raise ValueError(f"extra QEMU argument {opt} needs a value")
    value = parts[1]
    ok = value in rule if isinstance(rule, frozenset) else bool(rule.fullmatch(value))
    if ok and opt in ("-serial", "-qmp") and ".." in value.split(",")[0].split("/"):
        ok = False
    if not ok:
        allowed = ", ".join(sorted(rule)) if isinstance(rule, frozenset) else f"values matching {rule.pattern}"
        raise ValueError(f"value {value!r} for extra QEMU argument {opt} is not allowed (allowed: {allowed})")
    return (opt, value)


QemuArg = Annotated[tuple[str, ...], BeforeValidator(parse_extra_arg)]

Protocol = Literal["vnc", "spice", "rdp"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstanceConfig(_Strict):
    """One QEMU instance on the client: which OS disk it boots and how it is shown."""

    name: Token | None = None                      # default "instanceN"
    description: FreeText | None = None
    image: Token | None = None                     # image/snapshot whose per-host export it boots (None: current)
    disk_uri: str | None = None                    # a fixed NBD URI instead of the host's export
    format: Literal["raw", "qcow2"] | None = None  # None: what the export says (raw for bootd's exports)
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = "writeback"
    discard_writes: bool = True                    # QEMU snapshot=on: every start of the instance is clean
    overlay_dir: SafePath = "/var/tmp"             # where QEMU keeps that throw-away overlay (TMPDIR)
    disk_interface: Literal["virtio", "ide", "scsi"] = "virtio"
    memory: MemoryMiB = 2048                       # MiB, or "2G"
    cpus: int = Field(2, ge=1, le=256)
    machine: Literal["pc", "q35"] = "q35"
    accel: Literal["kvm", "tcg", "kvm:tcg"] = "kvm:tcg"
    cpu_model: Token | None = "max"
    display: Protocol = "vnc"
    vt: int | None = Field(None, ge=1, le=63)      # virtual terminal of its X server (default 6+N)
    display_port: int | None = Field(None, ge=1024, le=65535)  # default 5900+N (vnc), 5930+N (spice), 3389+N (rdp)
    network: Literal["user", "bridge", "none"] = "user"
    bridge: Token = "br0"
    nic_model: Literal["virtio-net-pci", "e1000", "e1000e", "rtl8139"] = "virtio-net-pci"
    guest_mac: str | None = None
    extra_args: list[QemuArg] = Field(default_factory=list)

    @field_validator("disk_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None:
            parse_nbd_uri(v)
        return v

    @field_validator("guest_mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None:
            mac = parse_mac(v)
            if mac is None:
                raise ValueError(f"guest_mac {v!r} must look like 52:54:00:12:34:56")
            v = mac
        return v


class XServerConfig(_Strict):
    """The X server that shows one instance per virtual terminal."""

    program: Literal["/usr/bin/Xorg", "/usr/bin/X", "/usr/bin/Xvfb"] = "/usr/bin/Xorg"
    display_base: int = Field(default=0, ge=0, le=999)    # instance N uses display :(base+N)
    blanking: bool = False                         # False: -s 0 -dpms (a lab screen never blanks)
    no_cursor: bool = False                        # -nocursor (the viewer draws the guest's cursor)
    depth: Literal[16, 24, 30] | None = None


class ViewerConfig(_Strict):
    """The viewer program that connects to an instance's display on its X server."""

    program: Literal["xtigervncviewer", "vncviewer", "remote-viewer", "xfreerdp"] | None = None
    protocol: Protocol | None = None               # None: the instance's display protocol
    fullscreen: bool = True
    view_only: bool = False
    shared: bool = True
    # TigerVNC's F8 menu (disconnect, options, "exit viewer"): off, so a student at the PC cannot leave
    # the guest's screen; an admin may turn it on for a teacher's PC
    menu_key: bool = False


DEFAULT_VIEWER = {"vnc": "xtigervncviewer", "spice": "remote-viewer", "rdp": "xfreerdp"}
VIEWER_PROTOCOLS = {"xtigervncviewer": {"vnc"}, "vncviewer": {"vnc"}, "remote-viewer": {"vnc", "spice"},
                    "xfreerdp": {"rdp"}}


class ClientsConfig(_Strict):
    """What a client boots into (group level, overridable per host)."""

    instances: list[InstanceConfig] = Field(default_factory=list, max_length=MAX_INSTANCES)
    xserver: XServerConfig = Field(default_factory=XServerConfig)
    viewer: ViewerConfig = Field(default_factory=ViewerConfig)
    init: Literal["upstart", "systemd", "both"] = "both"

    @model_validator(mode="after")
    def _consistent(self) -> ClientsConfig:
        names, vts, ports = set(), set(), set()
        for n, inst in enumerate(self.instances, 1):
            name = inst.name or f"instance{n}"
            if name in names:
                raise ValueError(f"instance name {name!r} is used twice")
            names.add(name)
            vt = inst.vt or 6 + n
            if vt in vts:
                raise ValueError(f"virtual terminal {vt} is used by two instances")
            vts.add(vt)
            port = display_port(inst, n)
            if inst.display == "vnc" and port < 5900:
                raise ValueError(f"instance {name}: a VNC display_port must be 5900 or more (display :port-5900)")
            if inst.display == "rdp" and inst.network != "user":
                raise ValueError(f"instance {name}: display rdp reaches the guest through user networking "
                                 "(network: user)")
            if port in ports:
                raise ValueError(f"display port {port} is used by two instances")
            ports.add(port)
            proto = self.viewer.protocol or inst.display
            prog = self.viewer.program or DEFAULT_VIEWER[proto]
            if proto not in VIEWER_PROTOCOLS[prog]:
                raise ValueError(f"viewer {prog} cannot show protocol {proto} (instance {name})")
            if self.viewer.protocol and self.viewer.protocol != inst.display:
                raise ValueError(f"viewer protocol {self.viewer.protocol} does not match instance {name}'s "
                                 f"display {inst.display}")
        return self


def display_port(inst: InstanceConfig, n: int) -> int:
    if inst.display_port:
        return inst.display_port
    return {"vnc": 5900, "spice": 5930, "rdp": 3389}[inst.display] + n


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def merge_clients(*layers: ClientsConfig | dict[str, Any] | None) -> ClientsConfig | None:
    """Group settings overridden by host settings: only fields a layer sets explicitly win; a layer
    that sets `instances` replaces the whole list. None when no layer has a clients section."""
    merged: dict[str, Any] | None = None
    for layer in layers:
        if layer is None:
            continue
        d = layer.model_dump(exclude_unset=True) if isinstance(layer, BaseModel) else dict(layer)
        merged = _deep_merge(merged or {}, d)
    return None if merged is None else ClientsConfig.model_validate(merged)
