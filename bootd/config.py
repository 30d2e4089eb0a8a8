"""bootd's configuration: one YAML file validated into typed models.

Every problem is reported with the file, the line and the field's path
(`bootd.yaml:14 hosts[3].mac: not a MAC address`), all at once, so an admin fixes a file in one go.
Structural checks are pydantic's; checks across fields (duplicates, pools inside the interface's
subnet, files that must exist) run afterwards in `_semantic_problems` with their own paths.
"""
from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Self, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from bootd import authenticode  # is a kernel signed (Secure Boot rooms)
from bootd.clientconfig.model import ClientsConfig  # client helper: what a client boots into
from bootd.macaddr import normalize_mac  # the one MAC normaliser (other modules import it from bootd.macaddr)
from bootd.nfsconfig import NfsConfig  # client helper: NFS exports of client roots (the pure model)

DEFAULT_CONFIG_PATH = "/etc/bootd/bootd.yaml"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError("names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


Mac = Annotated[str, AfterValidator(normalize_mac)]
Name = Annotated[str, AfterValidator(_check_name)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class InterfaceConfig(Section):
    """A network interface bootd serves on. Nothing is ever served on an interface not listed here."""

    name: Annotated[str, Field(min_length=1, max_length=15)]
    address: ipaddress.IPv4Interface  # bootd's own address on it, with prefix, e.g. 10.0.0.1/24

    @field_validator("address", mode="before")
    @classmethod
    def _has_prefix(cls, v: object) -> object:
        """A bare 10.0.0.1 would be a /32 subnet: said here, not as every pool and host 'outside' it."""
        if isinstance(v, str) and "/" not in v:
            raise ValueError(f"{v} has no prefix length: write bootd's address with its subnet, e.g. {v.strip()}/24")
        return v

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return self.address.network


class AddressRange(Section):
    """Addresses handed out from start to end, with the options that go with them."""

    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address
    router: Optional[ipaddress.IPv4Address] = None
    dns: list[ipaddress.IPv4Address] = []
    domain: Optional[str] = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if int(self.end) < int(self.start):
            raise ValueError("pool end is before its start")
        return self


class PoolConfig(AddressRange):
    """A dynamic address range on one served interface."""

    interface: str


class LoaderConfig(Section):
    """Boot program file names per firmware (paths in the boot root)."""

    bios: str = "undionly.kpxe"
    uefi_ia32: str = "ipxe-ia32.efi"
    uefi_x64: str = "ipxe.efi"
    uefi_arm64: str = "snponly-arm64.efi"
    uefi_http: str = "ipxe.efi"
    pxelinux: str = "pxelinux.0"
    grub_x64: str = "grubx64.efi"
    # Secure Boot (`secureboot: true` rooms): Debian's Microsoft-signed shim; Debian's signed network GRUB
    # goes next to it as grubx64.efi, the name shim loads from its own directory (pxe/loaders.py)
    shim_x64: str = "secureboot/shimx64.efi"

    def beside_shim(self, name: str) -> str:
        """A file shim loads from its own directory (grubx64.efi, MokManager's mmx64.efi)."""
        return posixpath.join(posixpath.dirname(self.shim_x64), name)

    @property
    def secureboot_grub(self) -> str:
        """The signed GRUB: what shim loads from its own directory."""
        return self.beside_shim("grubx64.efi")


class RelaySubnetConfig(AddressRange):
    """A remote subnet whose requests reach bootd through a relay agent (matched by giaddr)."""

    subnet: ipaddress.IPv4Network
    interface: str  # the served interface the relayed requests arrive on

    @model_validator(mode="after")
    def _inside(self) -> Self:
        if self.start not in self.subnet or self.end not in self.subnet:
            raise ValueError(f"range {self.start}-{self.end} is not inside {self.subnet}")
        return self


class DhcpRateLimitConfig(Section):
    """Packets bootd spends work on (issue 13): the rest is dropped unread and counted, never queued."""

    per_mac: Annotated[float, Field(gt=0)] = 50.0  # packets/s from one client MAC (chaddr)
    per_mac_burst: Annotated[int, Field(ge=1)] = 100  # packets one MAC may send at once
    # seconds of work per second for all MACs without host entry, reservation, lease or offer together
    unknown_cpu: Annotated[float, Field(gt=0, le=1)] = 0.5
    unknown_answers: Annotated[float, Field(gt=0)] = 200.0  # replies/boot events a second for them together
    unknown_answers_burst: Annotated[int, Field(ge=1)] = 1000  # a room of unknown PCs booting at once


class DhcpConfig(Section):
    mode: Literal["full", "proxy", "off"] = "off"
    lease_time: Annotated[int, Field(ge=60, le=31_536_000)] = 3600
    allow_unknown: bool = True  # give pool addresses to MACs that are not in `hosts`
    # the group (images, default image, menu flavour and so the loader, kernel arguments) of a PC that is
    # not in `hosts`; unset: every image, iPXE, no group
    default_group: Optional[str] = None
    pools: list[PoolConfig] = []
    router_advertisements: bool = True  # answer IPv6 RS with a minimal RA so iPXE does not wait 15 s
    decline_quarantine: Annotated[int, Field(ge=0)] = 600
    loaders: LoaderConfig = LoaderConfig()
    relay_subnets: list[RelaySubnetConfig] = []  # subnets behind DHCP relay agents (full mode)
    offer_hold: Annotated[int, Field(ge=1, le=3600)] = 60  # seconds an offered address is kept for its client
    # a request that waited longer than this in the receive queue is skipped, not answered (issue 22): its
    # client has retried (udhcpc every 3 s, PXE ROMs at 4 s), and the retry is answered instead
    stale_after: Annotated[float, Field(ge=0.5, le=60)] = 3.0
    # what an iPXE client is told to boot: {server} = bootd's address on the interface, {http_port}, {mac}
    ipxe_script_url: str = "http://{server}:{http_port}/boot/{mac}.ipxe"
    # UEFI HTTP boot: the loader's URL; {file} = the loader name from `loaders`, {host} = {server} with
    # ":{http_port}" unless the port is 80 (the ipxe_script_url knows {host} too)
    http_boot_url: str = "http://{host}/boot/files/{file}"
    rate_limit: DhcpRateLimitConfig = DhcpRateLimitConfig()
    detect_other_servers: bool = True  # full mode: look for another DHCP server at start/reload (bootd/dhcp/rogue.py)

    @field_validator("ipxe_script_url", "http_boot_url")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            v.format(server="10.0.0.1", http_port=80, host="10.0.0.1", mac="00:00:00:00:00:00", file="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad URL template ({e}); use {{server}}, {{http_port}}, {{host}}, {{mac}}, "
                             f"{{file}}") from None
        return v


class TftpConfig(Section):
    enabled: bool = True
    port: Annotated[int, Field(ge=1, le=65535)] = 69
    root: Optional[str] = None  # default: <storage.directory>/boot
    max_sessions: Annotated[int, Field(ge=1)] = 500
    max_sessions_per_client: Annotated[int, Field(ge=1)] = 16  # one client address cannot take every slot
    max_open_files: Annotated[int, Field(ge=1)] = 400
    max_blksize: Annotated[int, Field(ge=8, le=65464)] = 65464
    max_windowsize: Annotated[int, Field(ge=1, le=64)] = 64
    timeout: Annotated[float, Field(gt=0, le=255)] = 1.0
    retries: Annotated[int, Field(ge=1, le=50)] = 6
    session_timeout: Annotated[float, Field(gt=0)] = 60.0  # no progress this long: the session is dropped
    addresses: list[ipaddress.IPv4Address] = []  # listen here instead of on every interface's address
    leading_slash: Literal["root", "refuse"] = "root"  # "/x" means <root>/x (GRUB asks so) or is refused
    # c: the data phase of disk-file transfers runs in a small C process built at run time with gcc
    # (bootd/tftp/pump.c); python: everything in the event loop (also the fallback without gcc)
    data_pump: Literal["c", "python"] = "c"
    run_dir: Optional[str] = None  # where the C pump is built; default <storage.directory>/run


class HttpConfig(Section):
    enabled: bool = True
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    root: Optional[str] = None  # default: <storage.directory>/boot
    idle_timeout: Annotated[float, Field(gt=0)] = 15.0
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 16


class ApiConfig(Section):
    socket: str = "/run/bootd/api.sock"
    socket_mode: str = "0660"
    tcp: Optional[str] = None  # "HOST:PORT" to also serve the API on TCP (needs token_file)
    token_file: Optional[str] = None

    @field_validator("socket_mode")
    @classmethod
    def _octal(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError("an octal file mode like 0660")
        return v

    @field_validator("tcp")
    @classmethod
    def _hostport(cls, v: Optional[str]) -> Optional[str]:
        return _check_hostport(v)


def _check_hostport(v: Optional[str]) -> Optional[str]:
    if v is None:
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return v


class UiConfig(Section):
    """The web dashboard (bootd/ui): its own listener, never the boot port; off unless `listen` is set.

    On an address other than loopback it serves HTTPS with `tls_cert` + `tls_key`. Behind a reverse proxy
    that terminates TLS, listen on 127.0.0.1 and set `behind_proxy` (the proxy's X-Forwarded-For then names
    the browser for the lock-out and the audit)."""

    tls_cert: Optional[str] = None  # PEM certificate (chain) file
    tls_key: Optional[str] = None  # PEM private key file
    behind_proxy: bool = False
    session_idle: Annotated[int, Field(ge=60)] = 1800  # seconds without a request before a login ends
    session_max: Annotated[int, Field(ge=300)] = 12 * 3600  # seconds a login lasts at most
    listen: Optional[str] = None  # "HOST:PORT" (checked last: it reads the TLS fields above)

    @field_validator("tls_key")
    @classmethod
    def _pair(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if bool(v) != bool(info.data.get("tls_cert")):
            raise ValueError("tls_cert and tls_key go together")
        return v

    @field_validator("behind_proxy")
    @classmethod
    def _proxy(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("tls_cert"):
            raise ValueError("behind a proxy, the proxy terminates TLS: leave tls_cert and tls_key unset")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is None:
            return v
        _check_hostport(v)
        host = v.rpartition(":")[0].strip("[]")
        if not info.data.get("tls_cert") and host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"{v} is not loopback: set tls_cert and tls_key, or listen on 127.0.0.1 behind a "
                             "reverse proxy that terminates TLS (README)")
        return v


class EventsConfig(Section):
    """The boot-event log in state.db (bootctl hosts PC): kept bounded in age and in rows."""

    retention: Annotated[int, Field(ge=60)] = 7 * 86400  # seconds an event is kept
    max_rows: Annotated[int, Field(ge=100)] = 200_000  # newest rows kept; older ones are pruned
    coalesce: Annotated[float, Field(ge=0)] = 60.0  # seconds a repeat of a host's last event counts on its row
    # seconds a snapshot-store audit row (who promoted, sealed, deleted what) is kept; at least `retention`
    audit_retention: Annotated[int, Field(ge=86400)] = 365 * 86400

    @model_validator(mode="after")
    def _audit_outlives_events(self) -> Self:
        if self.audit_retention < self.retention and "audit_retention" not in self.model_fields_set:
            self.audit_retention = self.retention  # the default follows a longer event retention
        elif self.audit_retention < self.retention:
            raise ValueError(f"audit_retention ({self.audit_retention} s) must be at least retention "
                             f"({self.retention} s): audit rows are kept longer than boot events")
        return self


class StorageConfig(Section):
    directory: str = "/var/lib/bootd"
    min_free_mb: Annotated[int, Field(ge=0)] = 1024  # warn, then refuse writes, below this
    # space kept for the state database in a file next to it (state.db.reserve), freed when SQLite
    # finds the filesystem full, so leases and `bootctl disk reset` still write (bootd/state.py)
    state_reserve_mb: Annotated[int, Field(ge=0, le=1024)] = 16
    # the snapshot store's layer files; default <directory>/snapshots. Several servers on one PostgreSQL
    # point this at one shared directory (NFS is enough: sealed layers never change); overlays stay local
    snapshots: Optional[str] = None


class StateConfig(Section):
    """Where bootd keeps its state: the SQLite file <storage.directory>/state.db (one server), or a
    PostgreSQL database shared by several servers (bootd/state_postgres.py, bootd/cluster.py)."""

    # postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME (or ?host=/run/postgresql for a local socket);
    # the environment's BOOTD_STATE_URL overrides it (a systemd EnvironmentFile keeps the password out)
    url: Optional[str] = None
    server_name: Optional[str] = None  # this server's name in the shared database; default: the host name
    heartbeat: Annotated[float, Field(gt=0, le=60)] = 1.0  # seconds between a server's heartbeats
    # seconds without the DHCP server's heartbeat before a standby answers DHCP in its place
    dhcp_takeover: Annotated[float, Field(ge=2, le=600)] = 5.0

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^postgres(ql)?://", v):
            raise ValueError("must be a postgresql:// URL (leave it out for the SQLite file in storage.directory)")
        return v

    @model_validator(mode="after")
    def _heartbeat_within_takeover(self) -> Self:
        if self.heartbeat * 2 > self.dhcp_takeover:
            raise ValueError(f"heartbeat ({self.heartbeat} s) must be at most half of dhcp_takeover "
                             f"({self.dhcp_takeover} s): one missed heartbeat must not hand DHCP over")
        return self


StudentEntry = Literal["current", "previous", "images"]


class MenuConfig(Section):
    timeout: Annotated[int, Field(ge=0, le=3600)] = 10  # seconds before the default entry boots
    title: str = "bootd"
    local_disk_entry: bool = True
    previous_snapshot_entry: bool = True
    # what students see (groups and hosts override it): the room's current snapshot of the default image,
    # the "previous" entries, the room's other images; a hidden entry is not in the menu text at all
    student_entries: list[StudentEntry] = ["current"]
    admin_entry: bool = True  # iPXE menus get an "Admin" entry (login, then the admin menu) once an admin exists
    admin_failure_delay: Annotated[float, Field(ge=0, le=30)] = 2.0  # seconds a refused admin login waits
    admin_lockout_after: Annotated[int, Field(ge=1, le=100)] = 5  # failed logins (per PC, per account) before a lock
    admin_lockout: Annotated[float, Field(gt=0, le=86400)] = 30.0  # seconds of the first lock; doubles per failure
    # pxelinux and GRUB rooms: the bootloader's own password guards the admin (boot-once) entries; a hash
    # in the bootloader's format (an argon2 account hash cannot be turned into one): bootctl admin loader-hashes
    admin_pxelinux_passwd: Optional[str] = None  # SHA-512 crypt ($6$...) for MENU PASSWD
    admin_grub_pbkdf2: Optional[str] = None  # grub.pbkdf2.sha512.ITER.SALT.HASH for GRUB superuser "admin"

    @field_validator("admin_pxelinux_passwd")
    @classmethod
    def _sha512_crypt(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"\$6\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}", v):
            raise ValueError("a SHA-512 crypt hash ($6$SALT$HASH, e.g. from bootctl admin loader-hashes)")
        return v

    @field_validator("admin_grub_pbkdf2")
    @classmethod
    def _grub_pbkdf2(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"grub\.pbkdf2\.sha512\.\d+\.[0-9A-Fa-f]+\.[0-9A-Fa-f]+", v):
            raise ValueError("a grub-mkpasswd-pbkdf2 hash (grub.pbkdf2.sha512.ITER.SALT.HASH)")
        return v
    cmdline: str = "console=tty0 console=ttyS0"  # kernel arguments put first on every entry's command line
    pxelinux_ui: str = "menu.c32"  # pxelinux UI module (menu.c32 or vesamenu.c32), in the boot root
    # pxelinux reads its menu twice per power-on (ldlinux.c32, then the UI module): a second read from the
    # same PC within this many seconds, with no new loader fetch between, is the same boot (same disks)
    pxelinux_reread_window: Annotated[float, Field(gt=0, le=600)] = 60
    owner_only: bool = True  # per-host menus/scripts/client configs only to the host itself (bootd/peers.py)


class NbdTlsConfig(Section):
    """TLS for the NBD server (qemu tls-creds objects). Clients without credentials get nothing."""

    mode: Literal["x509", "psk"]
    dir: str  # x509: ca-cert.pem, server-cert.pem, server-key.pem; psk: keys.psk (identity:hexkey lines)
    verify_peer: bool = True  # x509: require a client certificate signed by the CA
    client_dir: Optional[str] = None  # x509: ca-cert.pem, client-cert.pem, client-key.pem for bootd's own export check
    psk_username: Optional[str] = None  # psk: identity bootd's own check uses (default: the first in keys.psk)


class NbdConfig(Section):
    enabled: bool = True
    port: Annotated[int, Field(ge=1, le=65535)] = 10809
    # default: the first served interface's address (127.0.0.1 without one)
    listen: Optional[ipaddress.IPv4Address] = None
    directory: Optional[str] = None  # overlays and persistent layers; default <storage.directory>/disks
    run_dir: Optional[str] = None  # QMP socket, pid file, log of the storage daemon; default <directory>/run
    reap_after: Annotated[float, Field(gt=0)] = 4 * 3600  # drop a boot's disk after this long without a connection
    reap_interval: Annotated[float, Field(gt=0)] = 60  # how often the reaper and the free-space check run
    # a maintenance host's draft export is released this many seconds after its NBD client disconnected
    # (and did not reconnect): `bootctl snapshot seal` works right after the PC is shut down
    maintenance_release_after: Annotated[float, Field(gt=0, le=3600)] = 10
    warn_free_percent: Annotated[float, Field(ge=0, le=100)] = 10  # warn below this share free (or storage.min_free_mb)
    check_exports: bool = True  # read each new export with libnbd before the host is told its name
    qsd_binary: str = "qemu-storage-daemon"
    tls: Optional[NbdTlsConfig] = None
    # NBD handshakes through bootd (a host lists and opens only its own export; data path in a C
    # splicer, or a Python relay when no C helper can run); the storage daemon then listens on a private
    # unix socket only. With tls the gatekeeper terminates TLS itself (see nbdexport/gatekeeper.py)
    gatekeeper: bool = True
    # gatekeeper: seconds a client has for its whole NBD handshake (qemu itself allows 10 since CVE-2024-7409)
    handshake_timeout: Annotated[float, Field(gt=0, le=300)] = 10
    # gatekeeper: NBD handshakes in progress at once from one address; more are closed (counted in metrics)
    handshakes_per_address: Annotated[int, Field(ge=1, le=512)] = 8
    # with the gatekeeper: each negotiated connection goes on inside the storage daemon on the client's
    # own socket (a small library preloaded into it, nbdexport/handoff.c); false: through the C splicer
    handoff: bool = True
    # how qemu-storage-daemon does file I/O. io_uring: ~2x the 4 KiB random-read IOPS of qemu's thread
    # pool here; where the kernel or qemu refuses it bootd uses threads and says so (bootctl status)
    aio: Literal["io_uring", "threads"] = "io_uring"
    # new overlays and persistent layers with qcow2 extended L2 entries: a client's first small write
    # into a cluster does not copy the snapshot's cluster first (see nbdexport/overlays.py)
    subclusters: bool = True
    # most one PC's overlay (or persistent layer) may take on disk ("20GiB", "512MiB", bytes); past it
    # that PC's writes fail with ENOSPC, nobody else's. 0: no limit (nbdexport/exports.py _capped)
    overlay_max: ByteSize = ByteSize(0)

    @field_validator("overlay_max")
    @classmethod
    def _overlay_max(cls, v: ByteSize) -> ByteSize:
        if v and v < 16 << 20:
            raise ValueError("0 (no limit) or at least 16MiB")
        return v


class ImageConfig(Section):
    """An OS image offered in the menu: kernel and initrd the client boots, plus its disk."""

    name: Name
    title: Optional[str] = None
    # client: the PC boots `kernel`/`initrd` below (a shared client Linux that runs the OS, the AnyOS way);
    # native: the PC boots the kernel and initramfs in the snapshot's own /boot (read at import and seal,
    # snapshots/bootfiles.py) and mounts the snapshot as its root (Debian's nbd-client hook: root=/dev/nbd0)
    kind: Literal["client", "native"] = "client"
    kernel_release: Optional[str] = None  # native, several kernels in /boot: which one (or "latest")
    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    cmdline: str = ""
    disk: Optional[str] = None  # a raw or qcow2 disk image to import as the first snapshot

    @field_validator("kernel", "initrd")
    @classmethod
    def _boot_path(cls, v: str) -> str:
        # pxelinux and GRUB menus cannot quote file names: refuse what they would misread.
        if not v or any(c.isspace() or ord(c) < 32 or c in "\"'`$;" for c in v) or ".." in v.split("/"):
            raise ValueError("a path in the boot root without spaces, quotes, '..' or control characters")
        return v

    @field_validator("kernel_release")
    @classmethod
    def _release(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not (v == "latest" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}", v)):
            raise ValueError("a kernel release as in /boot/vmlinuz-RELEASE (like 6.1.0-28-amd64), or latest")
        return v

    @model_validator(mode="after")
    def _native_fields(self) -> "ImageConfig":
        if self.kind == "client" and self.kernel_release is not None:
            raise ValueError("kernel_release is for kind: native images (they boot the kernel in their own /boot)")
        if self.kind == "native" and ("kernel" in self.model_fields_set or "initrd" in self.model_fields_set):
            raise ValueError("a kind: native image boots the kernel in its snapshot's /boot, not `kernel:`; "
                             "pick one of several with kernel_release: (and leave out kernel:/initrd:)")
        return self


class GroupConfig(Section):
    """A room: hosts that boot the same images."""

    name: Name
    images: list[str] = []
    default_image: Optional[str] = None
    boot: Literal["ipxe", "pxelinux", "grub"] = "ipxe"
    # UEFI PCs with Secure Boot on: shim -> Debian's signed GRUB -> signed kernels (boot: grub is implied)
    secureboot: bool = False
    persistent: bool = False
    cmdline: str = ""  # kernel arguments of the room, after menu.cmdline and the image's
    student_entries: Optional[list[StudentEntry]] = None  # overrides menu.student_entries for the room
    clients: Optional[ClientsConfig] = None  # QEMU instances / X server / viewer the PCs boot into

    @model_validator(mode="after")
    def _secureboot_boots_grub(self) -> Self:
        if self.secureboot:
            if "boot" in self.model_fields_set and self.boot != "grub":
                raise ValueError(secureboot_refusal(self.boot))
            self.boot = "grub"
        return self


def secureboot_refusal(boot: str) -> str:
    loader = {"ipxe": "iPXE", "pxelinux": "pxelinux"}.get(boot, boot)
    return (f"secureboot: true needs boot: grub (shim, then Debian's signed GRUB); {loader} is not signed "
            f"for Secure Boot, so a PC with Secure Boot on refuses to run it (leave boot: out, or set grub)")


class HostConfig(Section):
    """A known PC: fixed address, group, per-host overrides."""

    mac: Mac
    name: Name
    ip: Optional[ipaddress.IPv4Address] = None
    group: Optional[str] = None
    images: Optional[list[str]] = None  # overrides the group's list
    default_image: Optional[str] = None
    boot: Optional[Literal["ipxe", "pxelinux", "grub"]] = None
    secureboot: Optional[bool] = None  # overrides its group's
    persistent: Optional[bool] = None
    cmdline: str = ""  # kernel arguments of this PC, after its group's (the kernel takes the last of a repeated one)
    student_entries: Optional[list[StudentEntry]] = None  # overrides its group's (and menu.student_entries)
    clients: Optional[ClientsConfig] = None  # overrides the group's clients settings field by field

    @model_validator(mode="after")
    def _secureboot_boots_grub(self) -> Self:
        if self.secureboot and self.boot not in (None, "grub"):
            raise ValueError(secureboot_refusal(self.boot))
        return self


class WakeConfig(Section):
    """Wake-on-LAN (bootctl wake): magic packets paced so that waking a room does not flood its network."""

    rate: Annotated[float, Field(gt=0, le=10000)] = 20.0  # magic packets per second, over all wake requests
    port: Annotated[int, Field(ge=1, le=65535)] = 9  # UDP port of the broadcast magic packet (9 discard, or 7)


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(Section):
    interfaces: list[InterfaceConfig] = []
    dhcp: DhcpConfig = DhcpConfig()
    tftp: TftpConfig = TftpConfig()
    http: HttpConfig = HttpConfig()
    api: ApiConfig = ApiConfig()
    ui: UiConfig = UiConfig()
    storage: StorageConfig = StorageConfig()
    state: StateConfig = StateConfig()
    menu: MenuConfig = MenuConfig()
    nbd: NbdConfig = NbdConfig()
    nfs: NfsConfig = NfsConfig()
    log: LogConfig = LogConfig()
    events: EventsConfig = EventsConfig()
    wake: WakeConfig = WakeConfig()
    images: list[ImageConfig] = []
    groups: list[GroupConfig] = []
    hosts: list[HostConfig] = []

    # -- lookups used everywhere -------------------------------------------------------------
    def host_by_mac(self, mac: str) -> Optional[HostConfig]:
        mac = mac.lower()
        for h in self.hosts:
            if h.mac == mac:
                return h
        return None

    def host_by_name(self, name: str) -> Optional[HostConfig]:
        for h in self.hosts:
            if h.name == name:
                return h
        return None

    def group(self, name: Optional[str]) -> Optional[GroupConfig]:
        for g in self.groups:
            if g.name == name:
                return g
        return None

    def image(self, name: str) -> Optional[ImageConfig]:
        for i in self.images:
            if i.name == name:
                return i
        return None

    def interface(self, name: str) -> Optional[InterfaceConfig]:
        for i in self.interfaces:
            if i.name == name:
                return i
        return None

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage.directory)

    @property
    def snapshots_dir(self) -> Path:
        """The snapshot store's layer files (shared by every server of one PostgreSQL state)."""
        return Path(self.storage.snapshots) if self.storage.snapshots else self.storage_dir / "snapshots"

    @property
    def boot_root(self) -> Path:
        return Path(self.tftp.root) if self.tftp.root else self.storage_dir / "boot"

    @property
    def http_root(self) -> Path:
        return Path(self.http.root) if self.http.root else self.boot_root

    @property
    def server_ip(self) -> Optional[str]:
        return str(self.interfaces[0].address.ip) if self.interfaces else None


# ------------------------------------------------------------------------------------------------
# Loading with positions

@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: Optional[int]
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every reason with its position."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


ConfigPath = tuple[Union[str, int], ...]
"""Where in the document: mapping keys and list indices, outermost first (pydantic's `loc`)."""


def format_path(loc: ConfigPath) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class _Positions:
    """Maps a path in the loaded YAML (tuple of keys/indices) to the line it starts on."""

    def __init__(self) -> None:
        self.lines: dict[ConfigPath, int] = {}
        # unquoted scalars YAML turned into a bool or a number, as written (`off`, `52:54:00:12:34:56`)
        self.unquoted: dict[ConfigPath, str] = {}

    def walk(self, node: yaml.Node, path: ConfigPath = ()) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in _NOT_TEXT_TAGS:
            self.unquoted[path] = node.value
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self.walk(value_node, path + (key,))
                # keep the key's own line for the key (where a value is a block, the key names it)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, path + (i,))

    def line_for(self, loc: ConfigPath) -> Optional[int]:
        loc = tuple(loc)
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]


# Limits on what the loader accepts (issue 13): a broken or hostile file gets an error within a few
# seconds and ~100 MB (a reload parses it off the event loop), never blocks bootd or grows it by
# gigabytes. A big lab's config (5000 hosts) is ~400 KB, ~45 000 nodes, 6 levels deep.
MAX_CONFIG_BYTES = 1024 * 1024  # the file's size
MAX_CONFIG_NODES = 100_000  # YAML nodes, counting what aliases (`*name`) and merges expand to
MAX_CONFIG_DEPTH = 40  # nesting of mappings and lists, also through aliases


class ConfigLimitError(yaml.MarkedYAMLError):
    """The YAML is over one of the loader's limits (size, nodes, depth, recursive alias)."""

    def __init__(self, context: None, context_mark: None, problem: str, problem_mark: Optional[yaml.Mark]) -> None:
        super().__init__(context, context_mark, problem, problem_mark)
        self.reason = problem  # `problem`, never None here


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one silently, and refuses
    documents over MAX_CONFIG_NODES / MAX_CONFIG_DEPTH while composing them (so an alias bomb or a
    20 000-deep nesting is stopped before it costs memory or recursion)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # nesting of the node being composed, in the text
        self._nodes = 0  # nodes composed so far, each alias counted as what it expands to
        self._expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)

    def _next_event(self) -> tuple[yaml.Event, Optional[yaml.Mark]]:
        """The next event, not consumed, and where it starts (this pure-Python loader's marks are yaml.Mark)."""
        event: yaml.Event = self.peek_event()  # unannotated in yaml-stubs: typed here
        return event, event.start_mark if isinstance(event.start_mark, yaml.Mark) else None

    def compose_node(self, parent: Optional[yaml.Node], index: int) -> Optional[yaml.Node]:
        if self.check_event(yaml.AliasEvent):
            event, mark = self._next_event()
            anchor = event.anchor if isinstance(event, yaml.AliasEvent) else None
            target = self.anchors.get(anchor)
            if target is not None and id(target) not in self._expanded:
                raise ConfigLimitError(None, None, f"alias *{anchor} refers to a node that contains it", mark)
            node = super().compose_node(parent, index)
            self._count(*self._expanded[id(node)], mark)
            return node
        _, start = self._next_event()
        if self._depth >= MAX_CONFIG_DEPTH:
            raise ConfigLimitError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels", start)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self._expanded[id(c)][0] for c in children)
        depth = 1 + max((self._expanded[id(c)][1] for c in children), default=0)
        self._expanded[id(node)] = (size, depth)
        self._count(1, depth, start)
        return node

    def _count(self, size: int, depth: int, mark: Optional[yaml.Mark]) -> None:
        self._nodes += size
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigLimitError(None, None, f"more than {MAX_CONFIG_NODES} nodes (counting what aliases "
                                   f"expand to): refused, a config is far smaller", mark)
        if self._depth + depth > MAX_CONFIG_DEPTH:
            raise ConfigLimitError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels (through aliases)",
                                   mark)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by SafeLoader below,
            continue                                    # where keys written out override merged ones
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


_NOT_TEXT_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


def _friendly(err: ErrorDetails, unquoted: Optional[str] = None) -> str:
    """pydantic's message, said for an admin. `unquoted`: the value as written when YAML read it as a bool
    or a number (`off` -> false, a MAC of digits -> a base-60 number): then the fix is quotes."""
    kind = err.get("type", "")
    msg = err.get("msg", "invalid")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    value = err.get("input")
    if unquoted is not None and kind in ("string_type", "literal_error") and not isinstance(value, str):
        what = str(value).lower() if isinstance(value, bool) else f"the number {value}"
        return f'YAML reads {unquoted} as {what}: quote it ("{unquoted}")'
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    return msg


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate YAML text; raises ConfigError with every problem found."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(filename, None, "", f"larger than {MAX_CONFIG_BYTES // 1024} KiB: "
                                                             f"refused, a config is far smaller")])
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()  # composed once, within the limits; then built from the nodes
        data = loader.construct_document(node) if node is not None else None
    except ConfigLimitError as e:
        mark = e.problem_mark
        raise ConfigError([ConfigProblem(filename, mark.line + 1 if mark else None, "", e.reason)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError([ConfigProblem(filename, line, "", f"YAML syntax error: {e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigProblem(filename, None, "", f"YAML error: {e}")]) from None
    finally:
        loader.dispose()
    positions = _Positions()
    if node is not None:
        positions.walk(node)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(filename, 1, "", "the top level must be a mapping of sections")])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            problems.append(ConfigProblem(filename, positions.line_for(loc), format_path(loc),
                                          _friendly(err, positions.unquoted.get(loc))))
        raise ConfigError(problems) from None
    problems = [ConfigProblem(filename, positions.line_for(loc), format_path(loc), msg)
                for loc, msg in _semantic_problems(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError (also for a missing or unreadable file)."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more: a huge file is refused unread
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigProblem(filename, None, "", f"larger than {MAX_CONFIG_BYTES // 1024} KiB: "
                                                                 f"refused, a config is far smaller")])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(filename, None, "", "file not found")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem(filename, None, "", "is a directory, not a file")]) from None
    except OSError as e:
        raise ConfigError([ConfigProblem(filename, None, "", f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(filename, None, "", "not UTF-8 text")]) from None
    return parse_config(text, os.path.basename(filename))


def _semantic_problems(cfg: Config) -> list[tuple[ConfigPath, str]]:
    """Checks that span fields: duplicates, references, addresses inside subnets, files present."""
    out: list[tuple[ConfigPath, str]] = []

    seen_if: dict[str, int] = {}
    for i, served in enumerate(cfg.interfaces):
        if served.name in seen_if:
            out.append((("interfaces", i, "name"),
                        f"duplicate interface {served.name!r} (also interfaces[{seen_if[served.name]}])"))
        seen_if.setdefault(served.name, i)

    for i, pool in enumerate(cfg.dhcp.pools):
        iface = cfg.interface(pool.interface)
        if iface is None:
            out.append((("dhcp", "pools", i, "interface"), f"interface {pool.interface!r} is not in `interfaces`"))
            continue
        for field in ("start", "end"):
            addr = getattr(pool, field)
            if addr not in iface.subnet:
                out.append((("dhcp", "pools", i, field), f"{addr} is outside {iface.name}'s subnet {iface.subnet}"))
            elif addr == iface.address.ip:
                out.append((("dhcp", "pools", i, field), f"{addr} is bootd's own address"))
        if pool.router and pool.router not in iface.subnet:
            out.append((("dhcp", "pools", i, "router"), f"{pool.router} is outside {iface.subnet}"))
        if iface.subnet.network_address in (pool.start, pool.end) or \
                iface.subnet.broadcast_address in (pool.start, pool.end):
            out.append((("dhcp", "pools", i), "a pool cannot include the network or broadcast address"))
    for i, a in enumerate(cfg.dhcp.pools):
        for j in range(i):
            b = cfg.dhcp.pools[j]
            if int(a.start) <= int(b.end) and int(b.start) <= int(a.end):
                out.append((("dhcp", "pools", i), f"overlaps dhcp.pools[{j}]"))
    if cfg.dhcp.mode != "off" and not cfg.interfaces:
        out.append((("dhcp", "mode"), f"mode {cfg.dhcp.mode!r} needs at least one entry in `interfaces`"))
    if cfg.dhcp.mode == "full" and cfg.interfaces and not cfg.dhcp.pools and cfg.dhcp.allow_unknown:
        out.append((("dhcp", "pools"), "mode 'full' with allow_unknown needs at least one pool"))

    seen_img: dict[str, int] = {}
    for i, img in enumerate(cfg.images):
        if img.name in seen_img:
            out.append((("images", i, "name"), f"duplicate image {img.name!r} (also images[{seen_img[img.name]}])"))
        seen_img.setdefault(img.name, i)
        if img.disk is not None and not Path(img.disk).is_file():
            out.append((("images", i, "disk"), f"file not found: {img.disk}"))

    seen_grp: dict[str, int] = {}
    for i, grp in enumerate(cfg.groups):
        if grp.name in seen_grp:
            out.append((("groups", i, "name"), f"duplicate group {grp.name!r} (also groups[{seen_grp[grp.name]}])"))
        seen_grp.setdefault(grp.name, i)
        typos = False
        for j, name in enumerate(grp.images):
            if name not in seen_img:
                out.append((("groups", i, "images", j), f"unknown image {name!r}"))
                typos = True
        # a typo in `images` gets one message: the default then missing from them is not a second problem
        if grp.default_image and grp.default_image not in grp.images and not typos:
            out.append((("groups", i, "default_image"),
                        f"unknown image {grp.default_image!r}" if grp.default_image not in seen_img
                        else f"{grp.default_image!r} is not in this group's images"))

    if cfg.dhcp.default_group is not None and cfg.dhcp.default_group not in seen_grp:
        out.append((("dhcp", "default_group"), f"unknown group {cfg.dhcp.default_group!r}"))

    seen_mac: dict[str, int] = {}
    seen_ip: dict[ipaddress.IPv4Address, int] = {}
    seen_name: dict[str, int] = {}
    for i, host in enumerate(cfg.hosts):
        if host.mac in seen_mac:
            out.append((("hosts", i, "mac"), f"duplicate MAC {host.mac} (also hosts[{seen_mac[host.mac]}])"))
        seen_mac.setdefault(host.mac, i)
        if host.name in seen_name:
            out.append((("hosts", i, "name"),
                        f"duplicate host name {host.name!r} (also hosts[{seen_name[host.name]}])"))
        seen_name.setdefault(host.name, i)
        if host.ip is not None:
            if host.ip in seen_ip:
                out.append((("hosts", i, "ip"), f"duplicate IP {host.ip} (also hosts[{seen_ip[host.ip]}])"))
            seen_ip.setdefault(host.ip, i)
            if cfg.interfaces and not any(host.ip in iface.subnet for iface in cfg.interfaces):
                out.append((("hosts", i, "ip"), f"{host.ip} is in no served interface's subnet"))
            if any(host.ip == iface.address.ip for iface in cfg.interfaces):
                out.append((("hosts", i, "ip"), f"{host.ip} is bootd's own address"))
        if host.group is not None and host.group not in seen_grp:
            out.append((("hosts", i, "group"), f"unknown group {host.group!r}"))
        for j, name in enumerate(host.images or []):
            if name not in seen_img:
                out.append((("hosts", i, "images", j), f"unknown image {name!r}"))
        if host.default_image and host.default_image not in seen_img and host.default_image not in (host.images or []):
            out.append((("hosts", i, "default_image"), f"unknown image {host.default_image!r}"))  # once, not twice

    if cfg.api.token_file is not None and not Path(cfg.api.token_file).is_file():
        out.append((("api", "token_file"), f"file not found: {cfg.api.token_file}"))
    if cfg.api.tcp is not None and cfg.api.token_file is None:
        out.append((("api", "tcp"), "the API on TCP needs api.token_file (a bearer token)"))
    script_url = cfg.dhcp.ipxe_script_url
    if cfg.dhcp.mode != "off" and not cfg.http.enabled and script_url.startswith("http") and "{server}" in script_url:
        # DHCP would send every iPXE client to a URL on bootd that nothing serves: it boots nothing
        out.append((("http", "enabled"), f"false, but dhcp.mode {cfg.dhcp.mode!r} hands iPXE clients "
                                         f"{cfg.dhcp.ipxe_script_url} on bootd's own HTTP server: enable http, "
                                         f"or point dhcp.ipxe_script_url at another server"))
    if cfg.api.tcp is not None and cfg.http.enabled:
        api_host, _, api_port = cfg.api.tcp.rpartition(":")
        api_host = api_host.strip("[]")
        for iface in cfg.interfaces:
            if int(api_port) == cfg.http.port and api_host in ("", "0.0.0.0", "::", "*", str(iface.address.ip)):
                out.append((("api", "tcp"), f"{cfg.api.tcp} takes the boot port {iface.address.ip}:{cfg.http.port} "
                                            f"(http.port on {iface.name}): give the API another port"))
                break
    for section, root in (("tftp", cfg.tftp.root), ("http", cfg.http.root)):
        if root is not None and not Path(root).is_dir():
            out.append(((section, "root"), f"directory not found: {root}"))
    out += _secureboot_problems(cfg)
    return out


def _secureboot_problems(cfg: Config) -> list[tuple[ConfigPath, str]]:
    """What a PC with Secure Boot on would refuse: a kernel without a signature, for every image a
    `secureboot: true` room or PC may boot; and a shim directory whose grubx64.efi is the unsigned GRUB."""
    out: list[tuple[ConfigPath, str]] = []
    shim_grub = cfg.dhcp.loaders.secureboot_grub
    if shim_grub.lstrip("/") == cfg.dhcp.loaders.grub_x64.lstrip("/"):
        out.append((("dhcp", "loaders", "shim_x64"), f"{cfg.dhcp.loaders.shim_x64}: shim loads {shim_grub} beside "
                                                     f"it, which is the unsigned GRUB (dhcp.loaders.grub_x64): "
                                                     f"put shim in a directory of its own"))
    every = [i.name for i in cfg.images]
    rooms: list[tuple[ConfigPath, list[str]]] = []
    for i, g in enumerate(cfg.groups):
        if g.secureboot:
            rooms.append((("groups", i, "secureboot"), g.images or every))
    for i, h in enumerate(cfg.hosts):
        group = cfg.group(h.group)
        if h.secureboot and not (group and group.secureboot and h.images is None):
            rooms.append((("hosts", i, "secureboot"), h.images or (group.images if group and group.images else every)))
    seen: set[tuple[ConfigPath, str]] = set()
    for where, names in rooms:
        for name in names:
            image = cfg.image(name)
            if image is None or image.kind != "client" or (where, name) in seen:
                continue  # unknown: reported above; native: its kernel comes from the snapshot's /boot
            seen.add((where, name))
            kernel = cfg.boot_root / image.kernel.lstrip("/")
            if not kernel.is_file():
                continue  # missing: a warning at start (bootd/bootchecks.py), not a refusal
            try:
                signed = authenticode.is_signed(kernel)
            except OSError as e:
                out.append((where, f"image {name}: cannot read its kernel {kernel}: {e.strerror}"))
                continue
            if signed is None:
                out.append((where, f"image {name}: its kernel {image.kernel} is not an EFI program (no PE header): "
                                   f"a PC with Secure Boot on cannot start it"))
            elif not signed:
                out.append((where, f"image {name}: its kernel {image.kernel} is not signed (no Authenticode "
                                   f"signature): shim refuses it on a PC with Secure Boot on. Boot a signed "
                                   f"distribution kernel (Debian's linux-image-*-amd64 is), or sign it with "
                                   f"your own key enrolled as a MOK (README, Secure Boot)"))
    return out
