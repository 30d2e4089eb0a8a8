"""Value objects of the snapshot store: what the API, the menus and the NBD engine see."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

ALL_GROUPS = "*"


def valid_image_name(name: str) -> bool:
    return bool(_IMAGE_NAME_RE.match(name or "")) and name not in (".", "..", "lost+found")


@dataclass(frozen=True)
class Snapshot:
    """One qcow2 layer. `parent_id` is its lineage (what it was drafted from), `backing_id` the file it
    physically reads through (None once flattened or for the first import). `depth` counts the files in
    its chain (1 = standalone)."""

    id: int
    image: str
    image_id: int
    version: int | None
    state: str
    parent_id: int | None
    backing_id: int | None
    path: str
    file: str
    virtual_size: int
    note: str
    created_at: float
    created_by: str
    sealed_at: float | None
    sealed_by: str | None
    kernel_release: str | None = None  # a native image's snapshot: the kernel it carries (snapshots/bootfiles.py)
    depth: int = 1

    @property
    def name(self) -> str:
        if self.version is None:
            return f"{self.image}@draft-{self.id}"
        return f"{self.image}@v{self.version}"

    @property
    def sealed(self) -> bool:
        return self.state == "sealed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        return d


@dataclass(frozen=True)
class Assignment:
    """Who boots what: the current snapshot of a group ('*' = every group), a test or pin for one host,
    or the draft a maintenance host boots writable."""

    id: int
    image: str
    kind: str
    target: str
    snapshot_id: int
    snapshot: str
    status: str
    created_at: float
    created_by: str
    reason: str
    ended_at: float | None = None
    ended_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FsckReport:
    """What fsck found and what it did about it; `problems` are things it could not repair."""

    removed_temp: list[str] = field(default_factory=list)
    orphans_moved: list[str] = field(default_factory=list)
    finished_deletes: list[str] = field(default_factory=list)
    fixed_modes: list[str] = field(default_factory=list)
    fixed_backing: list[str] = field(default_factory=list)
    ended_assignments: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    left_recent: list[str] = field(default_factory=list)  # unknown but recent: another server's (shared store)
    checked: int = 0

    @property
    def clean(self) -> bool:
        return not (self.removed_temp or self.orphans_moved or self.finished_deletes or self.fixed_modes
                    or self.fixed_backing or self.ended_assignments or self.problems)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clean"] = self.clean
        return d
