"""What a finished TFTP transfer leaves on the boot timeline.

Every finished transfer is `store.record_event(mac, kind, {"path": ...}, nbytes=, duration=)` with kind
loader / menu / kernel / initrd / config / file guessed from the name (HTTP boot uses the same names).
"""
from __future__ import annotations

import logging
from typing import Optional, Protocol

from bootd.hoststate import record_failure
from bootd.tftp.session import ReadSession

log = logging.getLogger("bootd.tftp")


class BootEventLog(Protocol):
    """The part of the state store (bootd/state.py StateStore) a transfer writes to."""

    def record_event(self, mac: Optional[str], kind: str, detail: Optional[dict[str, object]] = None,
                     nbytes: Optional[int] = None, duration: Optional[float] = None) -> None: ...

    def touch_host(self, mac: str, ip: Optional[str] = None) -> None: ...

    # who is at a peer address, when the server has no resolver of its own (bootd/peers.py resolver)
    def mac_for_ip(self, ip: str, now: Optional[float] = None) -> Optional[str]: ...


def event_kind(path: str, dynamic: bool = False) -> str:
    """Which step of a boot a fetched name is, for the boot timeline."""
    name = path.lower()
    base = name.rsplit("/", 1)[-1]
    if name.startswith("clients/"):
        return "config"  # rendered client configs (bootd/clientconfig)
    if (dynamic or name.startswith("pxelinux.cfg/") or base.endswith((".cfg", ".ipxe", ".conf", ".menu"))
            or "grub.cfg" in base):
        return "menu"
    if base.endswith((".efi", ".kpxe", ".pxe", ".0", ".c32", ".lkrn", ".com", ".mod")):
        return "loader"
    if base.startswith(("vmlinuz", "bzimage", "linux", "kernel")):
        return "kernel"
    if base.startswith(("initrd", "initramfs", "initram")) or base.endswith((".cpio", ".cpio.gz", ".img")):
        return "initrd"
    return "file"


def record_not_found(store: BootEventLog, *, mac: str, ip: str, path: str, host: Optional[str],
                     why: Optional[str] = None) -> None:
    """A PC asked for a name that is not served (or whose provider failed, `why`): a failed boot step
    ("kernel vmlinuz-x: not found over TFTP") on its timeline and a warning naming the host."""
    step = event_kind(path)
    reason = f"{step} {path}: not found over TFTP" if why is None else f"{step} {path}: not made ({why}) over TFTP"
    record_failure(store, mac, step, reason, host=host, path=path, protocol="tftp", client=ip,
                   outcome="not-found" if why is None else "provider-failed")
    try:
        store.touch_host(mac, ip=ip)
    except Exception as e:
        log.error("tftp: cannot record a host: %s", e)


def record_transfer(store: BootEventLog, session: ReadSession, *, mac: Optional[str], ip: str, path: str,
                    dynamic: bool, outcome: str, nbytes: int, duration: float, host: Optional[str] = None) -> None:
    """One boot event for a finished transfer; a PC seen only over TFTP still shows up as a host.
    A transfer the client stopped answering is also a failed boot step (a client that aborts on
    purpose, after learning the size, is not). A store that fails is logged: the transfer is over
    either way."""
    detail: dict[str, object] = {"path": path, "protocol": "tftp", "client": ip, "outcome": outcome,
                                 "mode": session.request.mode, "blksize": session.blksize,
                                 "windowsize": session.windowsize}
    if dynamic:
        detail["dynamic"] = True
    if session.retransmits:
        detail["retransmits"] = session.retransmits
    try:
        store.record_event(mac, event_kind(path, dynamic), detail, nbytes=nbytes, duration=duration)
        if mac:
            store.touch_host(mac, ip=ip)
    except Exception as e:
        log.error("tftp: cannot record a boot event: %s", e)
    if outcome == "timeout" and mac:
        step = event_kind(path, dynamic)
        record_failure(store, mac, step, f"{step} {path}: client timeout over TFTP after {nbytes} bytes",
                       host=host, path=path, protocol="tftp", client=ip, outcome=outcome)
