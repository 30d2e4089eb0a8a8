"""Thin wrappers around qemu-img and blkid: the data path stays in C, we only read their answers."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SnapshotError, ToolFailed

QEMU_IMG = os.environ.get("BOOTD_QEMU_IMG", "qemu-img")
ACCEPTED_FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class ImageInfo:
    """What qemu-img says about one file (not its backing chain)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None          # backing file name as written in the header (relative or absolute)
    full_backing: str | None     # resolved absolute/relative path qemu-img would open
    backing_format: str | None
    corrupt: bool
    dirty: bool


def _run(argv: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ToolFailed(f"{what}: {argv[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise ToolFailed(f"{what}: {msg[-1] if msg else f'exit status {proc.returncode}'}")
    return proc


def info(path: str, force_share: bool = True) -> ImageInfo:
    """`qemu-img info --output=json` of one file; -U so it works while a client has the file open."""
    argv = [QEMU_IMG, "info", "--output=json"]
    if force_share:
        argv.append("-U")
    argv.append(path)
    proc = _run(argv, f"cannot read {path}", timeout=60)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise ToolFailed(f"qemu-img info {path}: unreadable answer ({exc})") from exc
    spec = (data.get("format-specific") or {}).get("data") or {}
    return ImageInfo(
        path=path,
        format=data.get("format", "?"),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        backing=data.get("backing-filename"),
        full_backing=data.get("full-backing-filename"),
        backing_format=data.get("backing-filename-format"),
        corrupt=bool(spec.get("corrupt", False)),
        dirty=bool(data.get("dirty-flag", False)),
    )


def probe_signature(path: str) -> str | None:
    """A partition table or file system signature in a raw file (blkid -p), or None if there is none."""
    try:
        proc = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None
    if proc.returncode != 0:
        return None
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if "PTTYPE" in fields:
        return f"partition table {fields['PTTYPE']}"
    if "TYPE" in fields:
        return f"file system {fields['TYPE']}"
    return None


def check_importable(path: str) -> ImageInfo:
    """Refuse what is not a raw or qcow2 disk image, with a message that says why."""
    if not os.path.exists(path):
        raise SnapshotError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SnapshotError(f"{path} is a directory, not a disk image")
    if not os.access(path, os.R_OK):
        raise SnapshotError(f"{path}: not readable")
    try:
        found = info(path)
    except ToolFailed as exc:
        raise SnapshotError(f"{path} is not a disk image qemu-img can read ({exc})") from exc
    if found.format not in ACCEPTED_FORMATS:
        raise SnapshotError(
            f"{path} is a {found.format} image; import accepts {' or '.join(ACCEPTED_FORMATS)} "
            f"(convert it first: qemu-img convert -O qcow2 {path} out.qcow2)")
    if found.format == "raw":
        import stat as _stat
        st = os.stat(path)
        size = st.st_size if _stat.S_ISREG(st.st_mode) else found.virtual_size
        if size == 0 or size % 512:
            raise SnapshotError(
                f"{path} is not a disk image: {size} bytes is not a whole number of 512-byte sectors")
        if probe_signature(path) is None:
            raise SnapshotError(
                f"{path} is not a disk image: qemu-img sees only raw data and blkid finds no partition table "
                f"or file system in it (create an empty disk with `bootctl image create NAME --size SIZE`)")
    if found.corrupt:
        raise SnapshotError(f"{path}: qcow2 image is marked corrupt (run qemu-img check -r all on a copy)")
    return found


def measure(path: str, fmt: str) -> int:
    """Bytes a standalone qcow2 copy of `path` (with its chain) needs: `qemu-img measure`."""
    proc = _run([QEMU_IMG, "measure", "--output=json", "-U", "-f", fmt, "-O", "qcow2", path],
                f"cannot measure {path}", timeout=120)
    return int(json.loads(proc.stdout)["required"])


def create_overlay(path: str, backing_name: str, virtual_size: int | None = None) -> None:
    """An empty qcow2 layer on top of `backing_name` (relative to path's directory): O(1) in disk size."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", backing_name, "-F", "qcow2", path]
    if virtual_size is not None:
        argv.append(str(virtual_size))
    _run(argv, f"cannot create layer {path}", timeout=60)


def rebase_unsafe(path: str, backing_name: str) -> None:
    """Rewrite only the backing file name in the header (same data, new name): `qemu-img rebase -u`."""
    _run([QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing_name, path],
         f"cannot rebase {path}", timeout=60)


def create_empty(path: str, size: int) -> None:
    _run([QEMU_IMG, "create", "-q", "-f", "qcow2", path, str(size)], f"cannot create {path}", timeout=60)


def check(path: str) -> None:
    """`qemu-img check`: refuse to seal a layer with leaked or corrupt clusters."""
    proc = subprocess.run([QEMU_IMG, "check", "-U", "-q", path], capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0,):
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise SnapshotError(f"qemu-img check {os.path.basename(path)} failed (status {proc.returncode}): "
                            f"{msg[-1] if msg else 'errors found'}", status=409)


_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def convert(src: str, src_format: str, dst: str, progress: Callable[[float], None] | None = None) -> None:
    """`qemu-img convert -O qcow2` src (with its whole chain) into a standalone dst, reporting progress 0..1.

    Writes dst in place: callers give a temporary name and rename it when this returns."""
    argv = [QEMU_IMG, "convert", "-p", "-U", "-f", src_format, "-O", "qcow2", src, dst]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise ToolFailed(f"{QEMU_IMG} is not installed") from exc
    buf = b""
    stdout = proc.stdout
    assert isinstance(stdout, io.BufferedReader)  # a PIPE with the default buffering
    try:
        while True:
            chunk = stdout.read1(4096)
            if not chunk:
                break
            buf = (buf + chunk)[-256:]
            matches = _PROGRESS.findall(buf)
            if matches and progress is not None:
                progress(min(1.0, float(matches[-1]) / 100.0))  # may raise to cancel
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        lines = err.strip().splitlines()
        detail = lines[-1] if lines else f"exit status {rc}"
        if "No space left" in err:
            from .errors import NoSpace
            raise NoSpace(f"disk full while writing {os.path.basename(dst)}: {detail}")
        raise ToolFailed(f"qemu-img convert {os.path.basename(src)} failed: {detail}")
    if progress is not None:
        progress(1.0)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
