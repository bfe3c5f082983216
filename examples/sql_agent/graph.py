"""A SQL agent whose every run gets its own tracked database connections.

Serve it with ``langgraph dev`` (see ``langgraph.json`` here) or import ``graph``.
The database is ``DATABASE_URL`` when set (the sample store/sales tables are loaded
into it if missing), else the embedded SQLite sample, created on first use under
``~/.cache/langgraph_scoped_conn``.  The chat model is the offline scripted one
unless ``LSC_CHAT_MODEL=provider:model`` names a real one.

Ask for approval before each query by sending ``{"require_approval": true}`` with
the messages; resume with ``Command(resume=True)`` or ``Command(resume="reason")``.
"""

from __future__ import annotations

import os

from langgraph_scoped_conn import with_scoped_connections
from langgraph_scoped_conn.demo import build_sql_agent, ensure_sample_database

_env_url = os.environ.get("DATABASE_URL")
if os.environ.get("LSC_LOAD_SAMPLE", "1") != "0":
    # idempotent: creates the sample tables only where they are missing
    _sample_url = ensure_sample_database(_env_url)
else:
    _sample_url = _env_url

# With DATABASE_URL set, the tools use the manager's URL (configure() or DATABASE_URL);
# without it, they use the embedded SQLite sample.
graph = with_scoped_connections(build_sql_agent(database_url=None if _env_url else _sample_url))
