"""The guide's debug routes as a Starlette app: status, cleanup and Prometheus metrics.

Serve it on its own, mount its routes into your FastAPI or Starlette app, or name
it as ``http.app`` in ``langgraph.json``::

    {"http": {"app": "langgraph_scoped_conn.http:app"}}

Routes:

* ``GET /api/memory/debug/connections/status``: ``{"success": true, "data":
  {"connection_stats": {...}, "timestamp": "<ISO-8601>"}}``.
* ``POST /api/memory/debug/connections/cleanup``: releases the scopes older than
  ``max_scope_lifetime`` (or ``max_age`` seconds), or one execution named by
  ``execution_id``; never a live execution otherwise.  Fails closed: it requires
  ``Authorization: Bearer <token>`` with the token of ``SCOPED_CONN_DEBUG_TOKEN`` (or
  ``token=``); with no token configured it answers 403, unless the routes were created
  with ``allow_unauthenticated_cleanup=True``; even then a request must be JSON or carry
  the ``X-Scoped-Conn-Cleanup`` header, so a web page on another origin cannot send it.
  An empty token is a configuration error.
* ``GET /metrics`` and ``GET /api/memory/debug/connections/metrics``: Prometheus
  text, read from the stats at scrape time (needs the ``metrics`` extra).  Under
  ``langgraph dev`` the server's own ``/metrics`` shadows the first one; use the
  second.

The app's lifespan runs the orphan reaper: every ``reap_interval`` seconds it
releases the scopes older than ``max_scope_lifetime``.  No response ever contains
a password or a DSN: pool URLs are shown as ``driver://host:port/database``.

Requires the ``http`` extra (``pip install 'langgraph-scoped-conn[http]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, Router

from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.manager import ExecutionConnectionManager
from langgraph_scoped_conn.redaction import redact_url

__all__ = [
    "CLEANUP_HEADER",
    "CLEANUP_PATH",
    "METRICS_PATH",
    "STATUS_PATH",
    "TOKEN_ENV",
    "app",
    "create_app",
    "create_router",
    "create_routes",
    "reaper",
]

logger = logging.getLogger("langgraph_scoped_conn")

STATUS_PATH = "/api/memory/debug/connections/status"
CLEANUP_PATH = "/api/memory/debug/connections/cleanup"
METRICS_PATH = "/metrics"
#: The metrics route under the debug prefix, which ``langgraph dev`` does not shadow.
DEBUG_METRICS_PATH = "/api/memory/debug/connections/metrics"
#: Environment variable holding the bearer token that protects the cleanup route.
TOKEN_ENV = "SCOPED_CONN_DEBUG_TOKEN"  # noqa: S105 (the variable name, not a secret)

ManagerSource = Callable[[], ExecutionConnectionManager]


def _manager_source(manager: ExecutionConnectionManager | None) -> ManagerSource:
    if manager is not None:
        if not isinstance(manager, ExecutionConnectionManager):
            raise ConfigurationError(
                f"manager must be an ExecutionConnectionManager, got {type(manager).__name__}; "
                "pass the manager returned by configure(), or None for the process default"
            )
        return lambda: manager
    return get_connection_manager  # looked up per request: configure() may replace it


_EMPTY_TOKEN = (
    f"{TOKEN_ENV} is set but empty, which would leave the cleanup route unprotected; "
    "set it to a token (for example the output of "
    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or unset it"
)


def _env_token() -> str | None:
    """The token of ``SCOPED_CONN_DEBUG_TOKEN``, stripped; ``None`` when unset.

    Raises:
        ConfigurationError: the variable is set but empty or only whitespace.
    """
    value = os.environ.get(TOKEN_ENV)
    if value is None:
        return None
    if not value.strip():
        raise ConfigurationError(_EMPTY_TOKEN)
    return value.strip()


def _token_source(token: str | None) -> Callable[[], str | None]:
    """Where the cleanup token comes from; checked now, and (the environment) per request.

    Raises:
        ConfigurationError: ``token`` is empty or not a string, or ``token`` is ``None``
            and ``SCOPED_CONN_DEBUG_TOKEN`` is set but empty.
    """
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise ConfigurationError(
                "token must be a non-empty string, or None to read "
                f"{TOKEN_ENV} from the environment at each request"
            )
        stripped = token.strip()
        return lambda: stripped
    _env_token()  # fail at creation, not at the first request
    return _env_token  # read per request: the variable may be set after startup


def _check_opt_in(allow_unauthenticated_cleanup: object) -> None:
    if not isinstance(allow_unauthenticated_cleanup, bool):
        raise ConfigurationError(
            "allow_unauthenticated_cleanup must be True or False, got "
            f"{allow_unauthenticated_cleanup!r}"
        )


_NO_TOKEN = (
    f"the cleanup route is disabled: no token is configured. Set {TOKEN_ENV} (or pass "
    "token=... to create_app/create_routes/create_router) and send "
    "'Authorization: Bearer <token>'; or, on a network only trusted callers can reach, "
    "create the routes with allow_unauthenticated_cleanup=True"
)


#: a header a browser sends cross-origin only after a CORS preflight the app would refuse
CLEANUP_HEADER = "X-Scoped-Conn-Cleanup"
_SIMPLE_REQUEST = (
    "unauthenticated cleanup needs 'Content-Type: application/json' or the header "
    f"'{CLEANUP_HEADER}: 1', which a browser cannot send cross-origin without a CORS "
    "preflight; send one of them (or configure a token)"
)


def _not_a_simple_request(request: Request) -> bool:
    """True for a request a web page on another origin cannot send without a preflight.

    A cross-origin ``POST`` with ``Content-Type: text/plain`` (or a form, or no body) is
    a "simple request": the browser sends it, with the user's network position, and
    only hides the answer.  JSON or a custom header forces a preflight first.
    """
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return content_type == "application/json" or CLEANUP_HEADER.lower() in request.headers


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status, headers=headers)


def _public_url(safe_url: str) -> str:
    """``driver://host:port/database``: no user, no password, no query (never a full DSN)."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(safe_url)
    except Exception:
        return "(unparseable URL hidden)"
    host = url.host or ""
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{host}{port}/{url.database or ''}"


def public_stats(manager: ExecutionConnectionManager) -> dict[str, Any]:
    """The manager's stats with every pool URL reduced to ``driver://host:port/database``."""
    stats = manager.get_stats()
    for pool in stats.get("pools", ()):
        if "url" in pool:
            pool["url"] = _public_url(str(pool["url"]))
    return stats


def create_routes(
    manager: ExecutionConnectionManager | None = None,
    token: str | None = None,
    *,
    allow_unauthenticated_cleanup: bool = False,
) -> list[BaseRoute]:
    """The debug routes, ready to add to a Starlette or FastAPI app's routes.

    Args:
        manager: the manager to report on; the process default (looked up at each
            request, so a later ``configure()`` takes effect) when ``None``.
        token: the bearer token for the cleanup route (surrounding whitespace ignored);
            ``None`` reads ``SCOPED_CONN_DEBUG_TOKEN`` at each request.
        allow_unauthenticated_cleanup: with no token configured, let anyone who can
            reach the route call cleanup.  Without it (the default) cleanup answers 403
            until a token is configured.  A configured token is required either way.

    Returns:
        Routes for status, cleanup and metrics.  Status and metrics need no token.

    Raises:
        ConfigurationError: ``manager`` or ``token`` is of the wrong kind, ``token`` is
            empty, or ``SCOPED_CONN_DEBUG_TOKEN`` is set but empty.  When it becomes empty
            after this call, cleanup answers 500 and releases nothing.

    Example:
        >>> api = FastAPI()  # doctest: +SKIP
        >>> api.router.routes.extend(create_routes())
    """
    get_manager = _manager_source(manager)
    get_token = _token_source(token)
    _check_opt_in(allow_unauthenticated_cleanup)

    async def status(request: Request) -> Response:
        stats = public_stats(get_manager())
        return JSONResponse(
            {"success": True, "data": {"connection_stats": stats, "timestamp": _now()}}
        )

    async def cleanup(request: Request) -> Response:
        try:
            expected = get_token()
        except ConfigurationError as exc:  # emptied after startup: refuse, loudly
            logger.error("debug cleanup route refused: %s", exc)
            return _error(500, str(exc))
        if expected is None and not allow_unauthenticated_cleanup:
            return _error(403, _NO_TOKEN)
        if expected is None and not _not_a_simple_request(request):
            return _error(415, _SIMPLE_REQUEST)
        if expected is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected.encode()
            ):
                return _error(
                    401,
                    f"cleanup requires 'Authorization: Bearer <token>' with the token set in "
                    f"{TOKEN_ENV}",
                    **{"WWW-Authenticate": "Bearer"},
                )
        try:
            execution_id, max_age = await _cleanup_arguments(request)
        except ValueError as exc:
            return _error(400, str(exc))
        mgr = get_manager()
        if execution_id is not None and mgr.execution(execution_id) is None:
            return _error(
                404,
                f"no open execution with id {execution_id!r}; GET {STATUS_PATH} lists the "
                "open ones",
            )
        limit = max_age if max_age is not None else mgr.settings.max_scope_lifetime
        # a release by id is not a reap: the run may be seconds old, and the log must say so
        reason = "reaped" if execution_id is None else "released by request"
        released = await asyncio.to_thread(
            mgr.reap, max_age=max_age, execution_id=execution_id, reason=reason
        )
        logger.info(
            "debug cleanup route released %d execution(s)%s%s",
            len(released),
            f": {', '.join(released)}" if released else "",
            f" (requested id {execution_id})" if execution_id is not None else "",
        )
        return JSONResponse(
            {
                "success": True,
                "data": {
                    "released": released,
                    "released_count": len(released),
                    "mode": "execution" if execution_id is not None else "expired",
                    "max_scope_lifetime": None if execution_id is not None else limit,
                    "connection_stats": public_stats(mgr),
                    "timestamp": _now(),
                },
            }
        )

    async def metrics(request: Request) -> Response:
        try:
            from langgraph_scoped_conn.metrics import render_latest
        except ImportError:
            return PlainTextResponse(
                "prometheus-client is not installed; install it with "
                "`pip install 'langgraph-scoped-conn[metrics]'` (from a clone of the "
                "repository: `pip install '.[metrics]'`)\n",
                status_code=501,
            )
        body, content_type = render_latest(get_manager())
        return Response(body, media_type=content_type)

    return [
        Route(STATUS_PATH, status, methods=["GET"], name="scoped_conn_status"),
        Route(CLEANUP_PATH, cleanup, methods=["POST"], name="scoped_conn_cleanup"),
        Route(METRICS_PATH, metrics, methods=["GET"], name="scoped_conn_metrics"),
        Route(DEBUG_METRICS_PATH, metrics, methods=["GET"], name="scoped_conn_debug_metrics"),
    ]


async def _cleanup_arguments(request: Request) -> tuple[str | None, float | None]:
    """``execution_id`` and ``max_age`` from the query string or a JSON object body."""
    args: dict[str, Any] = dict(request.query_params)
    body = await request.body()
    if body.strip():
        try:
            payload = json.loads(body)
        except ValueError:
            raise ValueError(
                'the cleanup body must be a JSON object such as {"execution_id": "..."} '
                'or {"max_age": 600}, or empty'
            ) from None
        if not isinstance(payload, dict):
            raise ValueError(
                f"the cleanup body must be a JSON object, got {type(payload).__name__}"
            )
        args.update(payload)
    unknown = set(args) - {"execution_id", "max_age"}
    if unknown:
        raise ValueError(
            f"unknown cleanup argument(s) {', '.join(sorted(map(str, unknown)))}; "
            "use execution_id (release one execution) or max_age (seconds)"
        )
    execution_id = args.get("execution_id")
    if execution_id is not None and (not isinstance(execution_id, str) or not execution_id):
        raise ValueError(f"execution_id={execution_id!r} must be a non-empty string")
    max_age = args.get("max_age")
    if max_age is not None:
        try:
            max_age = float(max_age)
        except (TypeError, ValueError):
            raise ValueError(f"max_age={max_age!r} must be a number of seconds") from None
        if not math.isfinite(max_age) or max_age < 0:
            raise ValueError(f"max_age={max_age!r} must be a finite number of seconds, >= 0")
    if execution_id is not None and max_age is not None:
        raise ValueError("give either execution_id or max_age, not both")
    return execution_id, max_age


def create_router(
    manager: ExecutionConnectionManager | None = None,
    token: str | None = None,
    *,
    allow_unauthenticated_cleanup: bool = False,
) -> Router:
    """A :class:`~starlette.routing.Router` of the debug routes, to ``Mount`` in an app.

    Arguments as for :func:`create_routes`.  A mounted router's lifespan does not run;
    add :func:`reaper` to your app's lifespan for the periodic orphan reaper.
    """
    return Router(
        routes=create_routes(
            manager, token, allow_unauthenticated_cleanup=allow_unauthenticated_cleanup
        )
    )


@contextlib.asynccontextmanager
async def reaper(
    manager: ExecutionConnectionManager | None = None, interval: float | None = None
) -> AsyncIterator[None]:
    """Release scopes older than ``max_scope_lifetime`` every ``interval`` seconds meanwhile.

    Args:
        manager: the manager; the process default (looked up at each pass) when ``None``.
        interval: seconds between passes; by default a quarter of
            ``max_scope_lifetime``, at most 60.  Nothing runs while the lifetime is ``None``.

    Raises:
        ConfigurationError: ``interval`` is not a positive number.
    """
    _check_interval(interval)
    get_manager = _manager_source(manager)

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval or get_manager().reap_interval())
            mgr = get_manager()
            if mgr.settings.max_scope_lifetime is None:
                continue
            try:
                await asyncio.to_thread(mgr.reap)
            except Exception as exc:  # keep reaping on the next pass
                logger.warning(
                    "the orphan reaper failed: %s: %s", type(exc).__name__, redact_url(str(exc))
                )

    task = asyncio.create_task(loop(), name="langgraph_scoped_conn-reaper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _check_interval(interval: object) -> None:
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0
    ):
        raise ConfigurationError(f"reap interval={interval!r} must be a number of seconds above 0")


def create_app(
    manager: ExecutionConnectionManager | None = None,
    token: str | None = None,
    *,
    reap_interval: float | None = None,
    allow_unauthenticated_cleanup: bool = False,
) -> Starlette:
    """A Starlette app serving the debug routes, with the orphan reaper in its lifespan.

    Args:
        manager: the manager to report on; the process default when ``None``.
        token: the cleanup route's bearer token; ``None`` reads ``SCOPED_CONN_DEBUG_TOKEN``.
        reap_interval: seconds between reaper passes (see :func:`reaper`).
        allow_unauthenticated_cleanup: see :func:`create_routes`; without a token and
            without this, cleanup answers 403.

    Returns:
        The app.  The lifespan does not close the manager: its owner does.

    Raises:
        ConfigurationError: an argument is of the wrong kind, a token is empty, or
            ``SCOPED_CONN_DEBUG_TOKEN`` is set but empty.
    """
    routes = create_routes(
        manager, token, allow_unauthenticated_cleanup=allow_unauthenticated_cleanup
    )
    _check_interval(reap_interval)  # fail now, not at startup

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with reaper(manager, reap_interval):
            yield

    return Starlette(routes=routes, lifespan=lifespan)


app = create_app()
