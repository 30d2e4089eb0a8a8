"""Small C helper programs that bootd runs and keeps running (the NBD splicer, the TFTP pump).

An installed bootd finds them prebuilt in HELPERS_DIR (compiled when the Debian package was built, from
the same source: the source's hash is in the name). Otherwise (a source tree, a wheel) each is one C file
compiled with gcc at run time into a run directory (the source's hash in the binary's name, so
an update rebuilds), started in their own session with a SOCK_SEQPACKET control socket, watched with a
pidfd, and restarted with a backoff when they die. What each says over its control socket, and what a
death costs, is the subclass's business.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from bootd.pidwatch import PidWatch

log = logging.getLogger("bootd.chelper")

CFDS_HEADER = Path(__file__).with_name("cfds.h")  # scm_fds(): every helper's control messages carry fds


# Warnings are errors, and the binaries are hardened the way Debian builds its own (dpkg-buildflags).
WARN_FLAGS = ("-Wall", "-Wextra", "-Werror")
HARDEN_FLAGS = ("-O2", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-fstack-clash-protection",
                "-Wl,-z,relro,-z,now")
PROGRAM_FLAGS = ("-fPIE", "-pie")       # executables
LIBRARY_FLAGS = ("-fPIC", "-shared")    # preload libraries


def compiler_identity(cc: str) -> bytes:
    """`cc --version` (and its resolved path), hashed into every build's name: a new compiler rebuilds."""
    try:
        r = subprocess.run([cc, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot run the C compiler {cc!r}: {e}") from None
    return (shutil.which(cc) or cc).encode() + b"\0" + r.stdout


def check_private_dir(path: Path) -> None:
    """Refuse a build directory that someone else could write into: a binary found there is only trusted
    because bootd put it there. The directory must be ours and not writable by group or others."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise RuntimeError(f"{path} belongs to uid {st.st_uid}, not to bootd (uid {os.geteuid()}): "
                           "refusing to build or run helpers from it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                           "refusing to build or run helpers from it")


# Where an installed bootd (the Debian package, `make deb`) finds the helpers compiled at package build
# time (scripts/build-helpers.py): looked at first, so an installed bootd needs no compiler. Compiling at
# run time stays as the developer's path (a source tree, an editable install, a plain wheel).
HELPERS_DIR = Path("/usr/lib/bootd/helpers")


def _argv(cc: str, flags: Sequence[str], headers: Sequence[Path], library: bool) -> list[str]:
    return [cc, *WARN_FLAGS, *HARDEN_FLAGS, *(LIBRARY_FLAGS if library else PROGRAM_FLAGS), *flags,
            *dict.fromkeys(f"-I{Path(h).resolve().parent}" for h in headers)]


def prebuilt_name(source: Path, prefix: str, flags: Sequence[str] = (), suffix: str = "",
                  headers: Sequence[Path] = (), library: bool = False) -> str:
    """`<prefix><hash><suffix>` of a package-built helper: the hash covers the source, its headers and our
    flags (not the include paths nor the compiler, which differ between the build and the installed
    system), so an installed bootd uses a prebuilt binary only if it was made from the very same source."""
    digest = hashlib.sha256(Path(source).read_bytes())
    for h in headers:
        digest.update(Path(h).read_bytes())
    digest.update("\0".join(_argv("cc", flags, (), library)[1:]).encode())
    return f"{prefix}{digest.hexdigest()[:12]}{suffix}"


def _trusted(path: Path) -> bool:
    """A file (or directory) root or bootd owns and nobody else can write."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def find_prebuilt(source: Path, prefix: str, flags: Sequence[str] = (), suffix: str = "",
                  headers: Sequence[Path] = (), library: bool = False,
                  helpers_dir: Optional[Path] = None) -> Optional[Path]:
    """The package-built helper for exactly this source in `helpers_dir` (default HELPERS_DIR), or None."""
    d = Path(helpers_dir) if helpers_dir is not None else HELPERS_DIR
    binary = d / prebuilt_name(source, prefix, flags, suffix, headers, library)
    if binary.is_file() and os.access(binary, os.X_OK) and _trusted(binary) and _trusted(d):
        return binary
    return None


def prebuild_c_program(source: Path, out_dir: Path, prefix: str, what: str, cc: Optional[str] = None,
                       flags: Sequence[str] = (), suffix: str = "", headers: Sequence[Path] = (),
                       library: bool = False) -> Path:
    """Compile `source` with exactly build_c_program's flags into `out_dir/prebuilt_name(...)` (the
    package build: scripts/build-helpers.py). Raises RuntimeError with the compiler's message."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / prebuilt_name(source, prefix, flags, suffix, headers, library)
    argv = _argv(cc or "gcc", flags, headers, library)
    try:
        r = subprocess.run([*argv, "-o", str(binary), "-x", "c", "-"], input=Path(source).read_bytes(),
                           capture_output=True)
    except OSError as e:
        raise RuntimeError(f"cannot run the C compiler: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"cannot compile the {what}: {r.stderr.decode(errors='replace').strip()[-400:]}")
    os.chmod(binary, 0o755)
    return binary


def build_c_program(source: Path, run_dir: Path, prefix: str, what: str, cc: Optional[str] = None,
                    flags: Sequence[str] = (), suffix: str = "", headers: Sequence[Path] = (),
                    library: bool = False, helpers_dir: Optional[Path] = None) -> Path:
    """`run_dir/<prefix><hash><suffix>`, compiled from `source` (a hardened executable, or with
    `library` a shared object for LD_PRELOAD; extra `flags` after ours) if missing; older builds are
    removed. `headers` are the files it #includes by name (their directories go on the include path and
    their text into the hash, so a change to one rebuilds). The hash also covers the flags and the
    compiler's identity, so a build is reused only for exactly the same inputs; and `run_dir` must be
    private to bootd (check_private_dir), so a file found under that name was built by bootd.
    Raises RuntimeError when it cannot be built, or cannot run from `run_dir` (a `noexec` mount: the
    kernel refuses to exec or to map it executable there, so building it would only hide the reason).
    A helper prebuilt for this very source in `helpers_dir` (default HELPERS_DIR) is returned first."""
    prebuilt = find_prebuilt(source, prefix, flags, suffix, headers, library, helpers_dir)
    if prebuilt is not None:
        return prebuilt
    run_dir = Path(run_dir)
    check_private_dir(run_dir)
    if os.statvfs(run_dir).f_flag & os.ST_NOEXEC:
        raise RuntimeError(f"{run_dir} is on a noexec mount: the {what} cannot run from there")
    cc = cc or "gcc"
    argv = _argv(cc, flags, headers, library)
    src = Path(source).read_bytes()
    digest = hashlib.sha256(src)
    for h in headers:
        digest.update(Path(h).read_bytes())
    digest.update("\0".join(argv[1:]).encode())
    digest.update(compiler_identity(cc))
    binary = run_dir / f"{prefix}{digest.hexdigest()[:12]}{suffix}"
    if binary.exists() and os.access(binary, os.X_OK):
        st = os.lstat(binary)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return binary
        binary.unlink()  # not a file bootd wrote: build it again
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    try:
        r = subprocess.run([*argv, "-o", str(tmp), "-x", "c", "-"], input=src, capture_output=True)
    except OSError as e:
        raise RuntimeError(f"cannot run the C compiler: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"cannot compile the {what}: {r.stderr.decode(errors='replace').strip()[-400:]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, binary)
    for old in run_dir.glob(f"{prefix}*"):
        if old != binary:
            try:
                old.unlink()
            except OSError:
                pass
    return binary


class SupervisedHelper:
    """One helper process and its control socket (`self.ctl`; messages from it go to `_on_ctl`).

    Subclasses give `what` (for logs), `_build()`, `_command(ctl_fd)` and may override the hooks
    `_spawned()`, `_gone()` (after the process ended, before any restart) and `_restarted()`."""

    what = "helper"
    BACKOFF = (0.05, 0.2, 1.0, 2.0, 5.0)
    SEND_TIMEOUT: Optional[float] = None  # None: sends never wait (a full queue raises BlockingIOError)
    STOP_SIGNAL: Optional[int] = None     # sent at stop after the control socket closed (None: it exits by itself)
    STOP_POLL = 0.01                      # stop waits 100 of these before a SIGKILL

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.binary: Optional[Path] = None
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.ctl: Optional[socket.socket] = None
        self.restarts = 0
        self._rx: Optional[socket.socket] = None
        self._reader_fd: Optional[int] = None
        self._pidwatch = PidWatch()
        self._stopping = False
        self._restart_task: Optional[asyncio.Task[None]] = None

    # -- to be provided ----------------------------------------------------------------------------
    def _build(self) -> Path:
        raise NotImplementedError

    def _command(self, ctl_fd: int) -> tuple[list[str], list[int]]:
        """(argv, extra fds to pass) for a new process whose control socket is `ctl_fd`."""
        raise NotImplementedError

    def _on_ctl(self) -> None:
        """Read what the helper sent (`self._recv()` until None)."""

    def _spawned(self) -> None:
        pass

    def _gone(self, status: Optional[int]) -> None:
        """The process is gone (died, or stop() was called: then `self._stopping` is set)."""

    def _restarted(self) -> None:
        pass

    # -- life cycle --------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self.ctl is not None and self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        """Build (if needed) and start. Raises RuntimeError/OSError when the helper cannot run."""
        self._stopping = False
        self.binary = await asyncio.to_thread(self._build)
        self._spawn()

    def _spawn(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv, fds = self._command(theirs.fileno())
            # own session: a kill of bootd's process group leaves the helper (and its clients) alone
            self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), *fds], stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        if self.SEND_TIMEOUT is None:
            mine.setblocking(False)
            rx = mine
        else:
            mine.settimeout(self.SEND_TIMEOUT)
            rx = mine.dup()  # receives never wait: a timeout socket would block the loop in recv
            rx.setblocking(False)
        self.ctl, self._rx = mine, rx
        try:
            asyncio.get_running_loop().add_reader(rx.fileno(), self._on_ctl)
            self._reader_fd = rx.fileno()
        except RuntimeError:  # no loop (tools)
            pass
        self._spawned()
        self._pidwatch.start(self.proc.pid, self._died)
        log.debug("%s pid %d started", self.what, self.proc.pid)

    def _recv(self, size: int = 256) -> Optional[bytes]:
        """One message from the helper; None when there is none now; b"" when it closed its end (then
        the control socket is closed here: the pidfd tells when the process has really exited)."""
        if self._rx is None:
            return None
        try:
            msg = self._rx.recv(size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            msg = b""
        if not msg:
            self._close_ctl()
        return msg

    def _close_ctl(self) -> None:
        if self._reader_fd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._reader_fd)
            except RuntimeError:
                pass
            self._reader_fd = None
        if self._rx is not None and self._rx is not self.ctl:
            self._rx.close()
        self._rx = None
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    def _died(self) -> None:
        self._pidwatch.stop()
        status = self.proc.poll() if self.proc is not None else None
        self._on_ctl()  # what it sent before it died
        self._close_ctl()
        self._gone(status)
        if self._stopping:
            return
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        attempt = 0
        while not self._stopping:
            await asyncio.sleep(self.BACKOFF[min(attempt, len(self.BACKOFF) - 1)])
            attempt += 1
            try:
                if self.binary is None or not self.binary.exists():
                    self.binary = await asyncio.to_thread(self._build)
                self._spawn()
                self.restarts += 1
                self._restarted()
                return
            except Exception as e:
                log.error("restarting the %s failed: %s", self.what, e)

    async def stop(self) -> None:
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        self._pidwatch.stop()
        self._close_ctl()
        self._gone(None)
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            if self.STOP_SIGNAL is not None:
                p.send_signal(self.STOP_SIGNAL)
            for _ in range(100):
                if p.poll() is not None:
                    break
                await asyncio.sleep(self.STOP_POLL)
            else:
                p.kill()
                p.wait()

