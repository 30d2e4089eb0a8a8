"""What a finished TFTP transfer leaves on the boot timeline.

Every finished transfer is `store.record_event(mac, kind, {"path": ...}, nbytes=, duration=)` with kind
loader / menu / kernel / initrd / config / file guessed from the name (HTTP boot uses the same names).

The names themselves (which step, which program, which are optional) are bootd/bootnames.py.
"""
from __future__ import annotations

import logging
from typing import Optional, Protocol

from bootd.bootnames import event_kind, is_optional
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


def record_not_found(store: BootEventLog, *, mac: str, ip: str, path: str, host: Optional[str],
                     why: Optional[str] = None) -> None:
    """A PC asked for a name that is not served (or whose provider failed, `why`): a failed boot step
    ("kernel vmlinuz-x: not found over TFTP") on its timeline and a warning naming the host. A name boot
    programs only probe for (OPTIONAL_NAMES) is not a failure."""
    if why is None and is_optional(path):
        log.debug("tftp: %s asked for optional %r: not there", ip, path)
        return
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
