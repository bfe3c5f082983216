"""OpenTelemetry metrics: every instrument the semantic conventions name, read from a real pool."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from sqlalchemy import text
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.otel import POOL_NAME, STATE, USED_BY, instrument
from langgraph_scoped_conn.testing import SUPERUSER_PASSWORD
from tests.conftest import Database, eventually

APP = "langgraph_scoped_conn%"
#: name -> (unit, kind, monotonic) as the semantic conventions give them
INSTRUMENTS = {
    "db.client.connection.count": ("{connection}", Sum, False),
    "db.client.connection.max": ("{connection}", Sum, False),
    "db.client.connection.idle.max": ("{connection}", Sum, False),
    "db.client.connection.pending_requests": ("{request}", Sum, False),
    "db.client.connection.timeouts": ("{timeout}", Sum, True),
    "db.client.connection.wait_time": ("s", Histogram, None),
    "db.client.connection.use_time": ("s", Histogram, None),
    "db.client.connection.create_time": ("s", Histogram, None),
}


class Otel(NamedTuple):
    """An SDK meter provider and the in-memory reader it reports to."""

    provider: MeterProvider
    reader: InMemoryMetricReader


@pytest.fixture
def otel() -> Iterator[Otel]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        yield Otel(provider, reader)
    finally:
        provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def attributes_of(point: Any) -> Mapping[str, Any]:
    return point.attributes or {}


def points(metric: Metric, **attributes: str) -> list[Any]:
    """The data points of ``metric`` whose attributes include ``attributes``."""
    return [
        p
        for p in metric.data.data_points
        if all(attributes_of(p).get(k) == v for k, v in attributes.items())
    ]


def value(metrics: dict[str, Metric], name: str, **attributes: str) -> float:
    (point,) = points(metrics[name], **attributes)
    assert isinstance(point, NumberDataPoint)
    return point.value


def histogram(metrics: dict[str, Metric], name: str, **attributes: str) -> HistogramDataPoint:
    (point,) = points(metrics[name], **attributes)
    assert isinstance(point, HistogramDataPoint)
    return point


def pool_name(pg_db: Database) -> str:
    url = make_url(pg_db.url)
    return f"{url.host}:{url.port}/{pg_db.name}"


def backends(pg_db: Database) -> int:
    """The pool's connections as the server sees them (its application_name)."""
    return pg_db.backends(APP)


def test_every_instrument_reads_the_pools_with_their_attributes_and_no_password(
    configure_default: Any, pg_db: Database, otel: Otel
) -> None:
    mgr = configure_default(max_connections=1, pool_timeout=30)
    instrument(mgr, meter_provider=otel.provider)
    name = pool_name(pg_db)
    pool = {POOL_NAME: name, USED_BY: "tools"}
    holding, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with lsc.ExecutionScope("holder"), lsc.create_execution_scoped_engine_sync().connect():
                holding.set()
                done.wait(30)
        except BaseException as exc:
            errors.append(exc)
            holding.set()

    def waiter() -> None:
        try:
            with (
                lsc.ExecutionScope("waiter"),
                lsc.create_execution_scoped_engine_sync().connect() as conn,
            ):
                conn.execute(text("select 1"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    threads[0].start()
    assert holding.wait(30)
    threads[1].start()
    eventually(lambda: mgr.get_stats()["requests_waiting"] == 1, "the waiter is in line")

    m = collect(otel.reader)  # two checkouts on a budget of one: one waits
    assert value(m, "db.client.connection.pending_requests", **pool) == 1
    assert value(m, "db.client.connection.count", **pool, **{STATE: "used"}) == 1
    assert value(m, "db.client.connection.count", **pool, **{STATE: "idle"}) == 0
    assert backends(pg_db) == 1

    done.set()
    for t in threads:
        t.join(30)
    assert errors == []
    # one execution that holds the whole budget and asks for more: it waits, then fails
    with lsc.ExecutionScope("greedy"):
        engine = lsc.create_execution_scoped_engine_sync()
        with engine.connect(), pytest.raises(lsc.ConnectionBudgetExceededError):
            engine.connect()

    m = collect(otel.reader)
    stats = mgr.get_stats()
    assert set(m) == set(INSTRUMENTS)
    for metric_name, (unit, kind, monotonic) in INSTRUMENTS.items():
        metric = m[metric_name]
        assert metric.unit == unit, metric_name
        assert isinstance(metric.data, kind), metric_name
        if isinstance(metric.data, Sum):
            assert metric.data.is_monotonic is monotonic, metric_name
        for point in metric.data.data_points:  # one pool: the runs' tools
            assert attributes_of(point)[POOL_NAME] == name
            assert attributes_of(point)[USED_BY] == "tools"
    count_points = m["db.client.connection.count"].data.data_points
    assert {attributes_of(p)[STATE] for p in count_points} == {"idle", "used"}
    used = value(m, "db.client.connection.count", **pool, **{STATE: "used"})
    idle = value(m, "db.client.connection.count", **pool, **{STATE: "idle"})
    assert (used, idle) == (0, 1)
    assert used + idle == backends(pg_db)  # what the server sees
    assert value(m, "db.client.connection.max", **pool) == 1  # the budget
    assert value(m, "db.client.connection.idle.max", **pool) == 1
    assert value(m, "db.client.connection.pending_requests", **pool) == 0
    assert value(m, "db.client.connection.timeouts", **pool) == stats["checkout_timeouts"] == 1
    waits = histogram(m, "db.client.connection.wait_time", **pool)
    assert waits.count == stats["checkout_waits"] == 2  # the waiter's, and the greedy one's
    assert waits.sum > 0
    uses = histogram(m, "db.client.connection.use_time", **pool)
    assert uses.count == stats["checkins"] == 3
    creates = histogram(m, "db.client.connection.create_time", **pool)
    assert creates.count == stats["connections_opened"] == stats["connections_num"]
    assert creates.count >= 1 and creates.sum > 0

    data = otel.reader.get_metrics_data()
    assert data is not None
    exported = data.to_json()
    password = make_url(pg_db.url).password
    assert password and password in pg_db.url  # the URL the pool uses has one
    for secret in {password, SUPERUSER_PASSWORD}:
        assert secret not in exported
        for metric in m.values():
            for point in metric.data.data_points:
                assert all(secret not in str(v) for v in attributes_of(point).values())


class CheckpointerPool:
    """Stands in for the checkpointer's pool: its stats row, as the manager shows it."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name

    def snapshot(self, used_by: str) -> dict[str, Any]:
        return {
            "url": self.url,
            "pool_name": self.name,
            "used_by": used_by,
            "strategy": "shared",
            "max_connections": 1,
            "connections_in_use": 1,
            "connections_idle": 0,
            "requests_waiting": 2,
        }


def test_pools_on_one_database_stay_apart_by_what_uses_them(
    configure_default: Any, pg_db: Database, otel: Otel
) -> None:
    mgr = configure_default(max_connections=3)
    instrument(mgr, meter_provider=otel.provider)
    with lsc.ExecutionScope("tools"), lsc.create_execution_scoped_engine_sync().connect() as c:
        c.execute(text("select 1"))
    name = pool_name(pg_db)
    (row,) = mgr.get_stats()["pools"]
    checkpointer = CheckpointerPool(row["url"], name)
    mgr.pool_for().reserve(1, timeout=5)  # its slot, set aside from the budget of 3
    mgr.add_langgraph_pool("checkpointer", checkpointer)
    mgr.notify_observers(name, "checkpointer", "create", 0.25)  # as the checkpointer's pool does
    try:
        m = collect(otel.reader)
    finally:
        mgr.remove_langgraph_pool(checkpointer)
        mgr.pool_for().unreserve(1)

    tools = {POOL_NAME: name, USED_BY: "tools"}
    cp = {POOL_NAME: name, USED_BY: "checkpointer"}
    assert value(m, "db.client.connection.count", **tools, **{STATE: "idle"}) == 1
    assert value(m, "db.client.connection.count", **cp, **{STATE: "used"}) == 1
    assert value(m, "db.client.connection.pending_requests", **cp) == 2
    # each pool's share of the budget: together, the budget
    assert value(m, "db.client.connection.max", **tools) == 2
    assert value(m, "db.client.connection.idle.max", **tools) == 2
    assert value(m, "db.client.connection.max", **cp) == 1
    assert points(m["db.client.connection.timeouts"], **cp) == []  # its row has no timeouts
    created = histogram(m, "db.client.connection.create_time", **cp)
    assert (created.count, created.sum) == (1, 0.25)
    assert histogram(m, "db.client.connection.create_time", **tools).count == 1


def test_a_collection_reads_the_stats_once(
    configure_default: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = configure_default()
    calls: list[int] = []
    original = mgr.get_stats

    def counted() -> dict[str, Any]:
        calls.append(1)
        return original()  # type: ignore[no-any-return]

    monkeypatch.setattr(mgr, "get_stats", counted)
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[first, second])
    try:
        instrument(mgr, meter_provider=provider)
        assert calls == []  # instrumenting reads nothing
        first.get_metrics_data()
        assert len(calls) == 1  # five asynchronous instruments, one read
        first.get_metrics_data()
        second.get_metrics_data()
        assert len(calls) == 3
    finally:
        provider.shutdown()


def test_uninstrument_stops_the_histograms_and_the_gauges(
    configure_default: Any, otel: Otel
) -> None:
    mgr: ExecutionConnectionManager = configure_default(max_connections=2)
    instrumentation = instrument(meter_provider=otel.provider)
    assert instrumentation.manager is mgr  # the process default

    def use_a_connection() -> None:
        with lsc.ExecutionScope("one"), lsc.create_execution_scoped_engine_sync().connect() as c:
            c.execute(text("select 1"))

    use_a_connection()
    m = collect(otel.reader)
    assert histogram(m, "db.client.connection.use_time").count == 1
    assert len(points(m["db.client.connection.count"])) == 2

    instrumentation.uninstrument()
    instrumentation.uninstrument()  # twice is harmless
    use_a_connection()
    m = collect(otel.reader)
    assert mgr.get_stats()["checkins"] == 2
    # a cumulative histogram keeps its last point: nothing was added to it
    assert histogram(m, "db.client.connection.use_time").count == 1
    assert "db.client.connection.count" not in m or not points(m["db.client.connection.count"])
    assert "stopped" in repr(instrumentation)


def test_importing_the_package_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, langgraph_scoped_conn as lsc\n"
        "import langgraph_scoped_conn.manager, langgraph_scoped_conn.engine\n"
        "lsc.ExecutionConnectionManager, lsc.get_connection_stats\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry')\n"
        "assert not loaded, loaded\n"
        "import langgraph_scoped_conn.otel\n"
        "assert 'opentelemetry.metrics' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
