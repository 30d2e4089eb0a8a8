"""A PostgreSQL server for tests: Debian's postgresql 15, `initdb` + `pg_ctl` in a temporary directory as
the postgres user, reachable only on a Unix socket in that directory (no TCP: nothing listens on the
machine's network, and a bootd in any network namespace reaches it through the file system)."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

# the state backend the suite runs against (tests/conftest.py): sqlite, or postgresql (`make test-postgres`)
STATE_BACKEND = os.environ.get("BOOTD_TEST_STATE", "sqlite")

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "bootd"
TEMPLATE = "bootd_migrated"  # a database at the current schema: each test's database is a copy of it


CURRENT: "PgServer | None" = None  # the session's server (tests/conftest.py pg_server), for per-example databases


def fresh_state_url() -> "str | None":
    """With BOOTD_TEST_STATE=postgresql, the URL of a new database (a property-based test's example needs one
    of its own, as it gets a new temporary directory); None with SQLite."""
    if STATE_BACKEND != "postgresql":
        return None
    assert CURRENT is not None, "the pg_server fixture is not running"
    return CURRENT.new_database()


class PgServer:
    """One PostgreSQL cluster owned by the tests; `stop()` stops it and removes its directory."""

    def __init__(self, base: Optional[Path] = None):
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError("PostgreSQL 15 is not installed (deps/test-packages.txt: postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="bootd-pg-", dir=base))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self.log = self.dir / "server.log"
        self._names = itertools.count(1)
        self._template_ready = False
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        try:
            self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                               "-E", "UTF8", "--no-sync"])
            conf = self.data / "postgresql.conf"
            with open(conf, "a") as f:
                f.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.socket_dir}'\n"
                        "max_connections = 1000\nshared_buffers = 32MB\nfsync = off\n"
                        "synchronous_commit = off\nfull_page_writes = off\n")
            self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                               "-t", "60", "start"])
        except BaseException:
            self.stop()
            raise

    def _as_postgres(self, argv: list[str]) -> None:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def new_database(self, prefix: str = "t") -> str:
        """A new empty database at the current schema (a copy of a migrated template); its URL."""
        if not self._template_ready:
            from bootd.state import open_state
            self.sql(f"CREATE DATABASE {TEMPLATE}")
            open_state("", url=self.url(TEMPLATE)).close()
            self._template_ready = True
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)

    def copy_database(self, url: str, prefix: str = "c") -> str:
        """A new database that is a copy of the one at `url` (nobody may be connected to it); its URL."""
        source = url.split("@/", 1)[1].split("?")[0]
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE {source}")
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                            "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
