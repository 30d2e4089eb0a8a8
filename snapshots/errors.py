"""Errors of the snapshot store: every refusal carries a reason an admin can act on."""
from __future__ import annotations


class SnapshotError(Exception):
    """An operation was refused or failed; `str(err)` is the message shown to the admin.

    `status` is the HTTP status the API answers with (404 unknown, 409 refused by state, 400 bad input,
    507 no space, 500 the tool failed).
    """

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(SnapshotError):
    status = 404


class Refused(SnapshotError):
    """The store is in a state where this change would lose or break something."""

    status = 409


class NoSpace(SnapshotError):
    status = 507


class ToolFailed(SnapshotError):
    """qemu-img or the file system failed; nothing was changed in the store."""

    status = 500
