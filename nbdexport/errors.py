"""Errors of the disk layer; the message is what an admin or the menu shows."""
from __future__ import annotations


class DiskError(Exception):
    """A disk could not be prepared, found or changed; `status` is the HTTP status the API answers."""

    status = 409

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class StorageDaemonDown(DiskError):
    """qemu-storage-daemon is not running right now (it is being restarted)."""

    status = 503


class NoSpace(DiskError):
    status = 507
