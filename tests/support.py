"""Test support shared by tests, benchmarks and the demo: the real bootd daemon as a child process,
a real NOTIFY_SOCKET listener, artifact folders. (Not in conftest.py: several test folders have a
conftest of their own, so `from conftest import` would be ambiguous.)"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from netns import Netns  # noqa: E402

from bootd.cli.api_client import ApiClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


class NotifyListener:
    """A real NOTIFY_SOCKET: a datagram socket collecting what the daemon sends to systemd."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float = 30.0, after: int = 0, proc=None) -> Optional[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, m in self.messages[after:]:
                    if needle in m.split("\n"):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (proc is not None and proc.poll() is not None):
                    return None
                self._cond.wait(min(left, 0.2))

    def fields(self, name: str) -> list[str]:
        with self._cond:
            return [line for _, m in self.messages for line in m.split("\n") if line.startswith(name)]

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(timeout=1)


class BootdProcess:
    """The real bootd daemon as a child process (inside a namespace when given one)."""

    def __init__(self, workdir: Path, config: dict, ns: Optional[Netns] = None, env: Optional[dict] = None):
        self.workdir = workdir
        self.ns = ns
        self.config_dict = config
        self.config_path = workdir / "bootd.yaml"
        self.log_path = workdir / "bootd.log"
        self.storage = Path(config.setdefault("storage", {}).setdefault("directory", str(workdir / "storage")))
        self.socket = config.setdefault("api", {}).setdefault("socket", str(workdir / "api.sock"))
        self.extra_env = env or {}
        self.wrapper: list[str] = []  # argv prefix for the daemon (e.g. unshare -m ... for a private mount)
        self.write_config(config)
        self.api = ApiClient(socket_path=self.socket, timeout=60)
        self.proc: Optional[subprocess.Popen] = None
        self.notify: Optional[NotifyListener] = None

    def write_config(self, config: dict | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(self.config_path)

    def start(self, wait: bool = True, timeout: float = 60.0, extra_env: Optional[dict] = None) -> "BootdProcess":
        if self.notify:
            self.notify.close()
        npath = self.workdir / "notify.sock"
        if npath.exists():
            npath.unlink()
        self.notify = NotifyListener(npath)
        env = dict(os.environ, NOTIFY_SOCKET=str(npath), PYTHONUNBUFFERED="1", **self.extra_env, **(extra_env or {}))
        STATE_URLS[str(self.storage / "state.db")] = env.get("BOOTD_STATE_URL")  # where its state is (state_rows)
        env.pop("INVOCATION_ID", None)
        env.pop("JOURNAL_STREAM", None)
        argv = [*self.wrapper, sys.executable, "-m", "bootd.cli.bootd_main", "--config", str(self.config_path), "run"]
        log = open(self.log_path, "ab")
        if self.ns is not None:
            self.proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        else:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                         start_new_session=True)
        log.close()
        if wait:
            if self.notify.wait_for("READY=1", timeout=timeout, proc=self.proc) is None:
                raise RuntimeError(f"bootd did not become ready; log:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def bootctl(self, *args: str, check: bool = False, timeout: float = 120,
                input: Optional[str] = None) -> subprocess.CompletedProcess:
        argv = [str(Path(sys.executable).parent / "bootctl"), "--socket", self.socket, *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"bootctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        # `ip netns exec` execs the daemon, so the child pid is bootd itself.
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def close(self) -> None:
        try:
            self.kill()
        finally:
            if self.notify:
                self.notify.close()


def artifact_dir(name: str) -> Path:
    d = ARTIFACTS / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def have(program: str) -> bool:
    return shutil.which(program) is not None


def small_lab_files(workdir: Path, kernel_bytes: int = 1000, initrd_bytes: int = 1000) -> Path:
    """A boot root under workdir/storage/boot with a stand-in kernel and initrd (for tests whose PCs fetch
    them with curl), and an empty 64 MiB qcow2 disk for an image; returns the disk's path."""
    boot = workdir / "storage" / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k" * kernel_bytes)
    (boot / "initrd.img").write_bytes(b"i" * initrd_bytes)
    disk = workdir / "deb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return disk


GANESHA_CONF = """NFS_CORE_PARAM {{
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}}
NFSv4 {{
    Graceless = true;
    RecoveryRoot = "{recovery}";
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}}
%include "{exports}"
"""


class Ganesha:
    """NFS-Ganesha (NFSv4 only, no grace period) run by a test inside a namespace, with an exports file
    for bootd to fill (nfs.ganesha_exports_file) and the pid file bootd sends SIGHUP to."""

    def __init__(self, ns: Netns, workdir: Path):
        if shutil.which("ganesha.nfsd") is None:
            raise RuntimeError("nfs-ganesha is not installed (deps/debian-packages.txt)")
        self.dir = Path(workdir)
        (self.dir / "recovery").mkdir(parents=True, exist_ok=True)
        self.exports = self.dir / "bootd-exports.conf"
        self.exports.write_text("# filled by bootd\n")
        self.log = self.dir / "ganesha.log"
        self.pidfile = self.dir / "ganesha.pid"
        conf = self.dir / "ganesha.conf"
        conf.write_text(GANESHA_CONF.format(recovery=self.dir / "recovery", exports=self.exports))
        self.proc = ns.popen(["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(self.log), "-p", str(self.pidfile),
                              "-N", "NIV_EVENT"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ganesha exited: {self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("ganesha did not start in 20 s")
            time.sleep(0.1)

    def nfs_config(self, roots: list[dict]) -> dict:
        """bootd's `nfs:` section for these roots, served by this Ganesha."""
        return {"server": "ganesha", "roots": roots, "ganesha_exports_file": str(self.exports),
                "ganesha_pidfile": str(self.pidfile)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


STATE_URLS: dict[str, Optional[str]] = {}  # a started bootd's <storage>/state.db -> its BOOTD_STATE_URL


def state_rows(db_path: Path, sql: str, params: tuple = (), sqlite_file: bool = False) -> list[tuple]:
    """Rows of the state database a bootd with this `db_path` (<storage>/state.db) uses, read as another
    process would: the SQLite file read-only, or, with BOOTD_TEST_STATE=postgresql, the test's PostgreSQL
    database (BOOTD_STATE_URL). `sql` is in SQLite's dialect, as bootd's own. `sqlite_file`: the file
    whatever the backend (a server a module-scoped fixture started before the test's database existed)."""
    key = str(db_path)
    url = None if sqlite_file else STATE_URLS[key] if key in STATE_URLS else os.environ.get("BOOTD_STATE_URL")
    if url:
        import psycopg

        from bootd.state_postgres import translate
        with psycopg.connect(url, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(translate(sql, False) if params else sql,  # type: ignore[arg-type]
                                                   params or None).fetchall()]
    import sqlite3
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()
