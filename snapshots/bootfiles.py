"""Boot files a snapshot carries: the kernel and initramfs of a *native* image, read from the snapshot's
own /boot at import and seal and kept per snapshot, so rolling the snapshot back rolls its kernel back.

A native image's PCs boot the OS's own kernel (as LTSP does) and mount the snapshot as their root over
NBD; a *client* image's PCs boot the config's shared client Linux, which runs the OS (the AnyOS way) and
keeps the config's kernel. The image's /boot is read with libguestfs: a small appliance VM reads any
file system, partition table or LVM volume without mounting anything on the server. One read is one
appliance launch (~3 s with KVM, 15-30 s under TCG).

Which kernel, when /boot holds several: the one the admin names (`--kernel RELEASE`, or
`kernel_release:` of the image in the config), `latest` (what the image's /vmlinuz link points to, else
the highest release), or the only one there is; several and no choice is an error naming them.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SnapshotError

KERNEL = "vmlinuz"      # the names a snapshot's files get in its directory under the boot root
INITRD = "initrd.img"
BOOT_SUBDIR = "snapshots"  # <boot root>/snapshots/<image>/<snapshot id>/{vmlinuz,initrd.img}
LATEST = "latest"
_RELEASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$")
# initramfs names per distribution: Debian/Ubuntu, Fedora/RHEL/Arch-dracut, SUSE
_INITRD_NAMES = ("initrd.img-{r}", "initramfs-{r}.img", "initrd-{r}", "initrd-{r}.img")


@dataclass(frozen=True)
class NativeBoot:
    """What the config says about a native image: which kernel to take (None: the only one)."""

    kernel_release: str | None = None


BootKind = Callable[[str], "NativeBoot | None"]  # image name -> NativeBoot for a native image, else None


@dataclass(frozen=True)
class KernelFound:
    """One kernel in an image's /boot (paths inside the image)."""

    release: str
    kernel: str
    initrd: str | None


@dataclass(frozen=True)
class BootListing:
    """What an image's /boot holds: its kernels and the release its /vmlinuz link names (or None)."""

    kernels: tuple[KernelFound, ...]
    default_release: str | None


def valid_release(release: str) -> bool:
    return bool(_RELEASE_RE.match(release or "")) and release not in (".", "..")


def _release_key(release: str) -> list[tuple[int, int | str]]:
    """Natural order: 6.1.0-10 after 6.1.0-9."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", release) if p]


def list_kernels(names: list[str], prefix: str, link_target: str | None) -> BootListing:
    """The kernels among `names` (the entries of a /boot directory at `prefix`), each with its initramfs
    when one of the usual names is there; `link_target` is what a /vmlinuz link points to."""
    present = set(names)
    kernels = []
    for name in sorted(names):
        if not name.startswith("vmlinuz-"):
            continue
        release = name[len("vmlinuz-"):]
        if not valid_release(release):
            continue
        initrd = next((f"{prefix}/{pat.format(r=release)}" for pat in _INITRD_NAMES
                       if pat.format(r=release) in present), None)
        kernels.append(KernelFound(release, f"{prefix}/{name}", initrd))
    default = None
    if link_target:
        base = os.path.basename(link_target)
        if base.startswith("vmlinuz-") and any(k.release == base[len("vmlinuz-"):] for k in kernels):
            default = base[len("vmlinuz-"):]
    return BootListing(tuple(kernels), default)


def choose_kernel(listing: BootListing, want: str | None, what: str) -> KernelFound:
    """The kernel a snapshot boots (see the module docstring). Raises SnapshotError saying what to do."""
    kernels = listing.kernels
    releases = ", ".join(k.release for k in kernels)
    if not kernels:
        raise SnapshotError(f"{what}: no kernel in the image's /boot (no /boot/vmlinuz-*): a native image boots "
                            f"its own kernel; install one in the image (apt install linux-image-amd64), or make "
                            f"the image `kind: client` in the config to boot the config's kernel")
    chosen: KernelFound | None
    if want == LATEST:
        chosen = next((k for k in kernels if k.release == listing.default_release), None) \
            or max(kernels, key=lambda k: _release_key(k.release))
    elif want:
        chosen = next((k for k in kernels if k.release == want), None)
        if chosen is None:
            raise SnapshotError(f"{what}: no kernel {want} in the image's /boot (it has: {releases})")
    elif len(kernels) == 1:
        chosen = kernels[0]
    else:
        link = f", the /vmlinuz link: {listing.default_release}" if listing.default_release else ""
        raise SnapshotError(
            f"{what}: the image's /boot has {len(kernels)} kernels ({releases}); say which one its PCs boot: "
            f"--kernel RELEASE (or --kernel latest{link}), or kernel_release: RELEASE|latest for the image in "
            f"the config")
    assert chosen is not None
    if chosen.initrd is None:
        raise SnapshotError(f"{what}: kernel {chosen.release} has no initramfs in the image's /boot (looked for "
                            f"{', '.join(p.format(r=chosen.release) for p in _INITRD_NAMES)}); a PC cannot mount "
                            f"its root over NBD without one: run `update-initramfs -c -k {chosen.release}` in "
                            f"the image")
    return chosen


# --------------------------------------------------------------------------------------------------
# Reading the image: libguestfs

_force_tcg: bool | None = None  # learnt at the first launch: KVM does not work here, use TCG


def kvm_usable(cpuinfo: str = "/proc/cpuinfo", device: str = "/dev/kvm") -> bool:
    """Worth trying the appliance under KVM: /dev/kvm opens AND the CPU shows vmx or svm. A /dev/kvm
    without them (a paravirtualised host, PVM) creates VMs that boot nothing: the appliance's kernel
    then spins instead of failing, and the launch would wait for libguestfs's own timeout (minutes)
    before the TCG retry."""
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) is not None


def _guestfs() -> Any:
    try:
        import guestfs  # Debian's python3-guestfs (system site packages)
    except ImportError:
        raise SnapshotError("reading a native image's kernel needs libguestfs: apt install python3-guestfs "
                            "(and a kernel in the server's /boot for its appliance)", status=500) from None
    return guestfs


def _launch(path: str, fmt: str) -> Any:
    """A read-only libguestfs handle on `path`, launched. Under TCG from the start where KVM cannot work
    (kvm_usable); where /dev/kvm exists and still fails (nested hosts), the first launch fails and every
    later one runs under TCG."""
    global _force_tcg
    guestfs = _guestfs()
    if _force_tcg is None and not kvm_usable():
        _force_tcg = True
    attempts = [True] if _force_tcg or os.environ.get("LIBGUESTFS_BACKEND_SETTINGS") else \
        ([False, True] if _force_tcg is None else [False])
    last: Exception | None = None
    for tcg in attempts:
        g = guestfs.GuestFS(python_return_dict=True)
        if os.environ.get("LIBGUESTFS_BACKEND") is None:
            g.set_backend("direct")
        if tcg and not os.environ.get("LIBGUESTFS_BACKEND_SETTINGS"):
            g.set_backend_settings(["force_tcg"])
        g.add_drive_opts(path, format=fmt, readonly=1)
        try:
            g.launch()
        except RuntimeError as e:
            last = e
            g.close()
            continue
        if _force_tcg is None:
            _force_tcg = tcg
        return g
    raise SnapshotError(f"cannot start libguestfs to read {path}: {last}", status=500)


def _read_listing(g: Any) -> tuple[str, BootListing]:
    """Mount each file system of the image until one has kernels in /boot (a root) or at its top (a
    separate /boot partition); its device and listing. No kernel anywhere: an empty listing."""
    filesystems = g.list_filesystems()
    for dev, fstype in sorted(filesystems.items()):
        if fstype in ("swap", "unknown", ""):
            continue
        try:
            g.mount_ro(dev, "/")
        except RuntimeError:
            continue
        try:
            for prefix in ("/boot", ""):
                directory = prefix or "/"
                if not g.is_dir(directory):
                    continue
                link = None
                for candidate in ("/vmlinuz", "/boot/vmlinuz") if prefix else ("/vmlinuz",):
                    if g.is_symlink(candidate):
                        link = g.readlink(candidate)
                        break
                listing = list_kernels(g.ls(directory), prefix, link)
                if listing.kernels:
                    return dev, listing
        finally:
            g.umount_all()
    return "", BootListing((), None)


def read_boot_files(path: str, fmt: str, want: str | None, what: str, dest: Path) -> KernelFound:
    """Copy the chosen kernel and its initramfs out of the disk image at `path` into directory `dest`
    (as vmlinuz and initrd.img). Raises SnapshotError (no kernel, several and no choice, no initramfs)."""
    g = _launch(path, fmt)
    try:
        dev, listing = _read_listing(g)
        chosen = choose_kernel(listing, want, what)
        g.mount_ro(dev, "/")
        try:
            g.download(chosen.kernel, str(dest / KERNEL))
            g.download(chosen.initrd, str(dest / INITRD))
        finally:
            g.umount_all()
        return chosen
    except RuntimeError as e:
        raise SnapshotError(f"{what}: cannot read the image's /boot: {e}", status=500) from e
    finally:
        try:
            g.shutdown()
        finally:
            g.close()


class BootFileStore:
    """Where snapshots' boot files live: `<boot root>/snapshots/<image>/<snapshot id>/`, beside the other
    boot files, so TFTP and HTTP serve them like any other."""

    def __init__(self, boot_root: str | Path):
        self.boot_root = Path(boot_root)

    def rel_dir(self, image: str, snapshot_id: int) -> str:
        return f"{BOOT_SUBDIR}/{image}/{snapshot_id}"

    def dir_of(self, image: str, snapshot_id: int) -> Path:
        return self.boot_root / self.rel_dir(image, snapshot_id)

    def read(self, layer: str, image: str, want: str | None, what: str) -> tuple[Path, KernelFound]:
        """Read the boot files of `layer` (a qcow2 file, its chain complete) into a new temporary directory
        beside the image's snapshot directories; `place` then renames it into place, `discard` drops it.
        A PC therefore never fetches half a kernel, and a failed read changes nothing."""
        parent = self.boot_root / BOOT_SUBDIR / image
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            chosen = read_boot_files(layer, "qcow2", want, what, tmp)
            for name in (KERNEL, INITRD):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp / name, 0o444)
            os.chmod(tmp, 0o755)
        except BaseException:
            self.discard(tmp)
            raise
        return tmp, chosen

    def place(self, tmp: Path, image: str, snapshot_id: int) -> None:
        """The files read by `read` become the snapshot's (replacing what it had)."""
        final = self.dir_of(image, snapshot_id)
        if final.exists():
            old = final.with_name(f".old-{snapshot_id}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)

    @staticmethod
    def discard(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, image: str, snapshot_id: int) -> None:
        shutil.rmtree(self.dir_of(image, snapshot_id), ignore_errors=True)

    def present(self, image: str, snapshot_id: int) -> bool:
        d = self.dir_of(image, snapshot_id)
        return (d / KERNEL).is_file() and (d / INITRD).is_file()

    def known_dirs(self) -> list[tuple[str, int]]:
        """(image, snapshot id) of every snapshot directory on disk (for fsck)."""
        root = self.boot_root / BOOT_SUBDIR
        out: list[tuple[str, int]] = []
        if not root.is_dir():
            return out
        for image_dir in root.iterdir():
            if image_dir.is_dir():
                out += [(image_dir.name, int(d.name)) for d in image_dir.iterdir() if d.is_dir() and d.name.isdigit()]
        return out

    def debris(self) -> list[Path]:
        """Directories of reads or replacements that never finished (a crash): fsck removes them."""
        root = self.boot_root / BOOT_SUBDIR
        if not root.is_dir():
            return []
        return sorted(d for image_dir in root.iterdir() if image_dir.is_dir() for d in image_dir.iterdir()
                      if d.is_dir() and d.name.startswith((".tmp-", ".old-")))
