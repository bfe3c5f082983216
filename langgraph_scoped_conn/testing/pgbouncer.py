"""A throwaway PgBouncer in transaction mode, in front of a throwaway PostgreSQL.

:class:`PgBouncer` writes a ``pgbouncer.ini`` and a ``userlist.txt`` into a temporary
directory and starts the ``pgbouncer`` binary in the foreground on 127.0.0.1 and a free
port (never a Unix socket, never a well-known port).  PgBouncer refuses to run as root,
so as root it runs as the same non-root user as the PostgreSQL clusters
(:func:`~langgraph_scoped_conn.testing.binaries.server_user`).

Authentication matches the cluster's: ``auth_type = scram-sha-256`` with the role's
SCRAM *secret* (``pg_authid.rolpassword``) in the userlist, so no plaintext password is
written to disk; PgBouncer reuses the client's SCRAM proof to log in to the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langgraph_scoped_conn.testing.binaries import server_user
from langgraph_scoped_conn.testing.postgres import free_port

__all__ = ["DEBIAN_PACKAGE", "ENV_BINARY", "PgBouncer", "pgbouncer_binary", "scram_secret"]

_ADMIN_COMMANDS = frozenset({"RECONNECT", "PAUSE", "RESUME", "KILL", "RELOAD"})

#: The Debian/Ubuntu package that provides the binary (``apt-get install -y pgbouncer``).
DEBIAN_PACKAGE = "pgbouncer"
#: The path of the binary to use; when set, nothing else is tried (a path that does not
#: exist hides PgBouncer, to run the suite as on a machine without it).
ENV_BINARY = "LSC_PGBOUNCER_BINARY"


def pgbouncer_binary() -> str | None:
    """Path of the ``pgbouncer`` binary, or ``None`` when it is not installed.

    ``LSC_PGBOUNCER_BINARY`` when set, else ``pgbouncer`` on PATH, else the usual
    Debian and local install paths.
    """
    explicit = os.environ.get(ENV_BINARY)
    if explicit is not None:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def scram_secret(admin_conn: Any, role: str) -> str:
    """The SCRAM-SHA-256 secret of ``role`` from ``pg_authid`` (needs a superuser connection)."""
    with admin_conn.cursor() as cur:
        cur.execute("select rolpassword from pg_authid where rolname = %s", (role,))
        row = cur.fetchone()
    if row is None or not str(row[0] or "").startswith("SCRAM-SHA-256$"):
        raise RuntimeError(
            f"role {role!r} has no SCRAM-SHA-256 password; set one with "
            "password_encryption = 'scram-sha-256' before starting PgBouncer"
        )
    return str(row[0])


class PgBouncer:
    """One PgBouncer process in front of one PostgreSQL server.

    Every database name is forwarded to the same-named database on the server (the
    ``*`` fallback entry), so one bouncer serves every test database.  Pools are per
    (database, user) pair and hold at most ``pool_size`` server connections
    (``default_pool_size``, no reserve pool, ``max_db_connections`` the same).

    Args:
        server_port: the PostgreSQL port.
        users: role name -> SCRAM secret (or plaintext password) for ``userlist.txt``.
        pool_size: ``default_pool_size`` and ``max_db_connections``.
        max_client_conn: how many client connections PgBouncer accepts in all.
        server_host: the PostgreSQL host (the throwaway clusters listen on 127.0.0.1).
        pool_mode: ``transaction`` (the point of these tests), ``session`` or ``statement``.
    """

    def __init__(
        self,
        *,
        server_port: int,
        users: dict[str, str],
        server_host: str = "127.0.0.1",
        pool_size: int = 3,
        max_client_conn: int = 400,
        pool_mode: str = "transaction",
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError(
                f"pgbouncer is not installed; install it with `apt-get install -y {DEBIAN_PACKAGE}`"
                f" (or set {ENV_BINARY})"
            )
        self.binary = binary
        self.server_host = server_host
        self.server_port = server_port
        self.users = dict(users)
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.pool_mode = pool_mode
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="lsc-pgbouncer-"))
        self.ini = self.root / "pgbouncer.ini"
        self.userlist = self.root / "userlist.txt"
        self.logfile = self.root / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- files -------------------------------------------------------------------------

    def _write_files(self) -> None:
        lines = [f'"{user}" "{secret}"' for user, secret in self.users.items()]
        self.userlist.write_text("\n".join(lines) + "\n")
        users = ", ".join(self.users)
        self.ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={self.server_host} port={self.server_port}",
                    "",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    f"max_db_connections = {self.pool_size}",
                    f"max_client_conn = {self.max_client_conn}",
                    "auth_type = scram-sha-256",
                    f"auth_file = {self.userlist}",
                    f"admin_users = {users}",
                    f"stats_users = {users}",
                    "ignore_startup_parameters = extra_float_digits",
                    "server_login_retry = 1",
                    "query_wait_timeout = 60",
                    f"logfile = {self.logfile}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "",
                ]
            )
        )
        os.chmod(self.root, 0o700)
        os.chmod(self.userlist, 0o600)
        user = server_user()
        if user is not None:
            for p in (self.root, self.ini, self.userlist):
                os.chown(p, user.pw_uid, user.pw_gid)

    # -- process -----------------------------------------------------------------------

    def start(self) -> PgBouncer:
        """Start PgBouncer in the foreground and wait until it accepts connections."""
        if self._proc is not None:
            raise RuntimeError("PgBouncer is already running")
        self.port = free_port()
        self._write_files()
        kwargs: dict[str, Any] = {}
        user = server_user()
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self._proc = subprocess.Popen(
            [self.binary, str(self.ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            **kwargs,
        )
        self._wait_ready()
        return self

    @property
    def pid(self) -> int | None:
        """The PgBouncer process id while this object's process runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        log = self.logfile.read_text()[-2000:] if self.logfile.exists() else "(no log)"
        self.stop()
        raise RuntimeError(f"PgBouncer did not start on 127.0.0.1:{self.port}; log:\n{log}")

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL after 10 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def destroy(self) -> None:
        """Stop the process and delete its directory (config, userlist, log)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kwargs: Any) -> Iterator[PgBouncer]:
        """A started PgBouncer (``kwargs`` go to the constructor), destroyed on exit."""
        bouncer = cls(**kwargs)
        try:
            yield bouncer.start()
        finally:
            bouncer.destroy()

    # -- clients -----------------------------------------------------------------------

    def url(
        self,
        database: str,
        *,
        user: str,
        password: str,
        driver: str = "psycopg2",
        flag: bool = True,
    ) -> str:
        """A client URL through PgBouncer; ``flag`` adds ``?pgbouncer=true`` (auto-detection)."""
        query = "?pgbouncer=true" if flag else ""
        return f"postgresql+{driver}://{user}:{password}@127.0.0.1:{self.port}/{database}{query}"

    def show(self, what: str, *, user: str, password: str) -> list[dict[str, Any]]:
        """Rows of ``SHOW <what>`` from the admin console (``pools``, ``clients``, ``servers``).

        ``what`` may also be an admin command such as ``RECONNECT <db>`` (no rows).
        """
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=user, password=password, dbname="pgbouncer"
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                verb = what.split(maxsplit=1)[0].upper()
                command = what if verb in _ADMIN_COMMANDS else f"SHOW {what}"
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def __repr__(self) -> str:
        state = "running" if self._proc is not None else "stopped"
        return f"PgBouncer(127.0.0.1:{self.port}, pool_size={self.pool_size}, {state})"
