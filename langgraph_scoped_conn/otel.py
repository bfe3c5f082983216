"""OpenTelemetry metrics of the pools, named as the semantic conventions name them.

:func:`instrument` creates the database client connection-pool instruments of the
OpenTelemetry semantic conventions (experimental in them) on a meter named
``langgraph_scoped_conn``.  The gauges cost nothing per checkout: they read
``manager.get_stats()`` once per collection.  The three histograms are recorded per
event, through :meth:`~langgraph_scoped_conn.manager.ExecutionConnectionManager.observe_pools`,
and only while instrumented.

Requires the ``otel`` extra (``pip install 'langgraph-scoped-conn[otel]'``), which
installs ``opentelemetry-api`` only; the application sets up the SDK and its exporter.
``import langgraph_scoped_conn`` does not import OpenTelemetry; importing this module does.

Each instrument is named ``db.client.connection.<name>``:

================  ===================  ================  =========================================
name              kind                 unit              source
================  ===================  ================  =========================================
count             async UpDownCounter  ``{connection}``  ``connections_in_use`` (state ``used``),
                                                         ``connections_idle`` (state ``idle``)
max               async UpDownCounter  ``{connection}``  ``max_connections`` less
                                                         ``connections_reserved``
idle.max          async UpDownCounter  ``{connection}``  the same: a pool may keep all idle
pending_requests  async UpDownCounter  ``{request}``     ``requests_waiting``
timeouts          async Counter        ``{timeout}``     ``timeouts`` (rows that have it)
wait_time         Histogram            ``s``             each checkout that waited for the budget
                                                         (one that then timed out, too)
use_time          Histogram            ``s``             each connection checked back in
create_time       Histogram            ``s``             each server connection opened
================  ===================  ================  =========================================

"async": an asynchronous (observable) instrument, read at collection from the keys of
the stats' pool rows (:mod:`langgraph_scoped_conn.stats`), summed per pool name.

Every instrument carries two attributes:

* ``db.client.connection.pool.name``: ``server.address:server.port/db.namespace`` of
  the pool's URL, as the convention suggests for a pool without a name of its own: no
  user, no password.  The per-execution pools of one URL (strategy ``per_execution``)
  add up under that one name.
* ``langgraph_scoped_conn.used_by``: what uses the pool's connections: ``tools`` (the
  runs' pools), ``checkpointer`` or ``store`` (LangGraph's).  The conventions have no
  attribute for this; with it, two pools on one database stay apart.

``db.client.connection.count`` also carries ``db.client.connection.state``: ``idle``
or ``used``.  A pool's ``max`` is its share of the budget: the slots set aside for
the checkpointer count in the checkpointer's pool, so the ``max`` of all pools on one
server add up to ``max_connections``.

Instruments are created once per meter provider (a second :func:`instrument` on the
same provider gets the first one's observable instruments back, and with them the
first one's callbacks): instrument once, at startup, after
:func:`~langgraph_scoped_conn.configure`.

Example:
    >>> import langgraph_scoped_conn as lsc  # doctest: +SKIP
    >>> from langgraph_scoped_conn.otel import instrument
    >>> manager = lsc.configure("postgresql://app@db/agents")
    >>> instrumentation = instrument(manager)  # the global MeterProvider
    >>> instrumentation.uninstrument()  # at shutdown
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation

import langgraph_scoped_conn.stats as keys
from langgraph_scoped_conn._version import __version__
from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.manager import ExecutionConnectionManager

__all__ = [
    "METER_NAME",
    "POOL_NAME",
    "STATE",
    "USED_BY",
    "Instrumentation",
    "instrument",
]

METER_NAME = "langgraph_scoped_conn"
#: attribute names
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
USED_BY = "langgraph_scoped_conn.used_by"

#: histogram bucket bounds in seconds: connects take milliseconds, waits up to
#: ``pool_timeout``, uses as long as a tool holds a connection
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: event of :meth:`~ExecutionConnectionManager.observe_pools` -> (histogram, description)
HISTOGRAMS = {
    "wait": (
        "db.client.connection.wait_time",
        "The time it took to obtain an open connection from the pool.",
    ),
    "use": (
        "db.client.connection.use_time",
        "The time between borrowing a connection and returning it to the pool.",
    ),
    "create": ("db.client.connection.create_time", "The time it took to create a new connection."),
}
_BY = (keys.POOL_NAME, keys.USED_BY)
_KEYS = (keys.IN_USE, keys.IDLE, keys.MAX_CONNECTIONS, keys.RESERVED, keys.WAITING, keys.TIMEOUTS)
_Rows = dict[tuple[str, ...], dict[str, float]]


class _Readings:
    """The pool rows, read from the manager once per collection and summed per pool.

    Each observable instrument asks once per collection; one that asks again starts a
    new collection.  So each reader's collection costs one ``get_stats()``, whatever the
    number of instruments.
    """

    def __init__(self, manager: ExecutionConnectionManager) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._rows: _Rows = {}
        self._asked: set[str] = set()

    def rows(self, instrument: str) -> _Rows:
        with self._lock:
            if not self._asked or instrument in self._asked:
                pools = self._manager.get_stats()["pools"]
                self._rows = keys.sum_rows(pools, _BY, _KEYS)
                self._asked = set()
            self._asked.add(instrument)
            return self._rows


class Instrumentation:
    """The instruments :func:`instrument` created; :meth:`uninstrument` stops them.

    Args:
        manager: the manager whose pools are measured.
        meter_provider: the provider to create the instruments with.
    """

    def __init__(self, manager: ExecutionConnectionManager, meter_provider: MeterProvider) -> None:
        self.manager = manager
        self._readings = _Readings(manager)
        self._active = True
        self._attributes: dict[tuple[str, str], dict[str, str]] = {}
        meter = meter_provider.get_meter(METER_NAME, __version__)
        connections, requests = "{connection}", "{request}"
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._count],
            unit=connections,
            description="The number of connections that are currently in state described "
            "by the state attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._max],
            unit=connections,
            description="The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max",
            callbacks=[self._idle_max],
            unit=connections,
            description="The maximum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._pending],
            unit=requests,
            description="The number of current pending requests for an open connection.",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=[self._timeouts],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        self._histograms: dict[str, Histogram] = {
            event: meter.create_histogram(
                name, unit="s", description=doc, explicit_bucket_boundaries_advisory=BUCKETS
            )
            for event, (name, doc) in HISTOGRAMS.items()
        }
        self._observer = self._record
        manager.observe_pools(self._observer)

    def uninstrument(self) -> None:
        """Stop recording: the histograms hear no more events, the gauges report nothing.

        The instruments stay registered with the meter provider (OpenTelemetry has no
        way to remove them); a new :func:`instrument` needs a new provider.
        """
        self._active = False
        self.manager.unobserve_pools(self._observer)

    # -- histograms: per event ---------------------------------------------------------

    def _record(self, pool_name: str, used_by: str, event: str, seconds: float) -> None:
        histogram = self._histograms.get(event)
        if histogram is not None:
            histogram.record(seconds, self._attributes_of(pool_name, used_by))

    def _attributes_of(self, pool_name: str, used_by: str) -> dict[str, str]:
        found = self._attributes.get((pool_name, used_by))
        if found is None:  # one dict per pool, made once (a race makes an equal one)
            found = {POOL_NAME: pool_name, USED_BY: used_by}
            self._attributes[pool_name, used_by] = found
        return found

    # -- observable instruments: per collection ------------------------------------------

    def _observe(self, instrument: str) -> Iterable[tuple[dict[str, str], dict[str, float]]]:
        if not self._active:
            return ()
        return (
            (self._attributes_of(pool_name, used_by), values)
            for (pool_name, used_by), values in self._readings.rows(instrument).items()
        )

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, values in self._observe("count"):
            yield Observation(int(values.get(keys.IN_USE, 0)), {**attributes, STATE: "used"})
            yield Observation(int(values.get(keys.IDLE, 0)), {**attributes, STATE: "idle"})

    def _max(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, values in self._observe("max"):
            yield Observation(_capacity(values), attributes)

    def _idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, values in self._observe("idle.max"):
            yield Observation(_capacity(values), attributes)

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, values in self._observe("pending_requests"):
            yield Observation(int(values.get(keys.WAITING, 0)), attributes)

    def _timeouts(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, values in self._observe("timeouts"):
            if keys.TIMEOUTS in values:
                yield Observation(int(values[keys.TIMEOUTS]), attributes)

    def __repr__(self) -> str:
        state = "active" if self._active else "stopped"
        return f"<Instrumentation {state} {self.manager!r}>"


def _capacity(values: dict[str, float]) -> int:
    """The connections a pool may open: its budget less the slots set aside from it."""
    return int(values.get(keys.MAX_CONNECTIONS, 0) - values.get(keys.RESERVED, 0))


def instrument(
    manager: ExecutionConnectionManager | None = None,
    *,
    meter_provider: MeterProvider | None = None,
) -> Instrumentation:
    """Create the connection-pool instruments for ``manager``'s pools (see the module).

    Args:
        manager: the manager to measure; the process default when ``None`` (the one
            installed now: call this after :func:`~langgraph_scoped_conn.configure`).
        meter_provider: the provider to create the instruments with; OpenTelemetry's
            global one when ``None``.

    Returns:
        The :class:`Instrumentation`; its :meth:`~Instrumentation.uninstrument` stops it.
    """
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    return Instrumentation(manager if manager is not None else get_connection_manager(), provider)
