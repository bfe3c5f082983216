"""A throwaway PostgreSQL 15 cluster on a free loopback port, for tests and benchmarks.

The server refuses to run as root, so when we are root every server command runs
as the ``postgres`` system user (``runuser``).  Password authentication
(scram-sha-256) is on for TCP, so tests can check that no password leaks.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SAMPLE_SQL", "PostgresCluster", "free_port", "pg_bin"]

#: A small customers/orders schema that tests and benchmarks load into their databases.
SAMPLE_SQL = """
create table customers (id int primary key, name text not null, city text not null);
create table orders (id int primary key, customer_id int references customers(id),
                     amount numeric(10,2) not null, created date not null);
insert into customers select g, 'customer ' || g, (array['Lima','Oslo','Pune'])[1 + g % 3]
  from generate_series(1, 50) g;
insert into orders select g, 1 + g % 50, (g % 97) + 0.5, date '2024-01-01' + (g % 300)
  from generate_series(1, 500) g;
"""

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "s3cr3t-Sup3ruser-pw"


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (15 preferred)."""
    for candidate in ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin"):
        path = Path(candidate) / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(
        f"PostgreSQL binary {name!r} not found; install it with "
        "`apt-get install -y postgresql-15` (or set TEST_DATABASE_URL)"
    )


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


class PostgresCluster:
    """One initdb'd cluster: start, stop, restart, and URLs for its databases."""

    def __init__(self, *, max_connections: int = 100, extra_conf: dict[str, str] | None = None):
        self.max_connections = max_connections
        self.extra_conf = extra_conf or {}
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="lsc-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self._chown_needed = os.geteuid() == 0

    def _own(self, *paths: Path) -> None:
        if self._chown_needed:
            pw = pwd.getpwnam("postgres")
            for p in paths:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def init(self) -> PostgresCluster:
        self.sockdir.mkdir(parents=True)
        pwfile = self.root / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        os.chmod(self.root, 0o755)
        self._own(self.root, self.sockdir, pwfile)
        subprocess.run(
            _as_server_user(
                [
                    pg_bin("initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        return self

    def start(self) -> PostgresCluster:
        if not self.port:
            self.port = free_port()
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sockdir),
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": "3",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
            **self.extra_conf,
        }
        opts = " ".join(f"-c {k}={v}" for k, v in conf.items())
        self._own_logfile()
        subprocess.run(
            _as_server_user(
                [
                    pg_bin("pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self._wait_ready()
        return self

    def _own_logfile(self) -> None:
        if not self.logfile.exists():
            self.logfile.touch()
            self._own(self.logfile)

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not start; log:\n{self.logfile.read_text()[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_server_user([pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]),
            check=False,
            capture_output=True,
        )

    def restart(self) -> None:
        """Stop (fast: every backend is terminated) and start again on the same port."""
        self.stop("fast")
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(
        self,
        database: str = "postgres",
        *,
        user: str = SUPERUSER,
        password: str = SUPERUSER_PASSWORD,
        driver: str = "psycopg2",
    ) -> str:
        return f"postgresql+{driver}://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL over the local socket as the superuser (no password needed there)."""
        out = subprocess.run(
            _as_server_user(
                [
                    pg_bin("psql").replace("/bin/psql", "/bin/psql"),
                    "-h",
                    str(self.sockdir),
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                    "-d",
                    database,
                    "-Atqc",
                    sql,
                ]
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kwargs: object) -> Iterator[PostgresCluster]:
        cluster = cls(**kwargs).init().start()  # type: ignore[arg-type]
        try:
            yield cluster
        finally:
            cluster.destroy()
