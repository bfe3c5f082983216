"""LangGraph's Postgres checkpointer and store for the SQL agent, on the tools' budget.

``langgraph.postgres.json`` here serves ``graph.py:graph`` with these, so LangGraph
Server and ``langgraph dev`` keep threads and memories in PostgreSQL instead of
memory, and every connection of the process (the runs' SQL tools, the checkpointer,
the store) counts against one ``max_connections`` per database URL::

    "checkpointer": {"path": "./agent.py:checkpointer"},
    "store": {"path": "./agent.py:store"}

The server calls each function and enters the async context manager it returns on
its event loop, once; it is closed at shutdown.  The URL and the budget are the
process-default manager's (``DATABASE_URL`` or ``SCOPED_CONN_DATABASE_URL``,
``SCOPED_CONN_MAX_CONNECTIONS``); the default ``reserve=1`` sets one connection
aside for each.  Needs the ``checkpoint`` extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.store.postgres import AsyncPostgresStore

import langgraph_scoped_conn as lsc


@asynccontextmanager
async def checkpointer() -> AsyncIterator[AsyncPostgresSaver]:
    """LangGraph's AsyncPostgresSaver with one connection set aside from the budget."""
    async with lsc.apostgres_checkpointer(reserve=1) as saver:
        yield saver


@asynccontextmanager
async def store() -> AsyncIterator[AsyncPostgresStore]:
    """LangGraph's AsyncPostgresStore with one connection set aside from the budget."""
    async with lsc.apostgres_store(reserve=1) as memories:
        yield memories
