"""LangChain's SQL agent tutorial, unchanged but for one line, with execution-scoped connections.

The tutorial builds ``SQLDatabase.from_uri(...)``, a ``SQLDatabaseToolkit`` and a
prebuilt agent once, at import time.  Here the ``SQLDatabase`` is a
``ScopedSQLDatabaseProxy``, which holds no connection: each tool call uses the
current run's scoped ``SQLDatabase``, so every run's connections come from one
budgeted pool and are released when the run ends.  The graph is wrapped with
``with_scoped_connections``.

Serve it with ``langgraph dev`` (see ``langgraph.json`` here) or import ``graph``.
The database is ``DATABASE_URL`` when set (the sample store/sales tables are loaded
into it if missing), else the embedded SQLite sample, created on first use under
``~/.cache/langgraph_scoped_conn``.  The chat model is the offline scripted one
unless ``LSC_CHAT_MODEL=provider:model`` names a real one.
"""

from __future__ import annotations

import os
import warnings

from langchain_community.agent_toolkits import SQLDatabaseToolkit

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.demo import ensure_sample_database, load_chat_model

_env_url = os.environ.get("DATABASE_URL")
if os.environ.get("LSC_LOAD_SAMPLE", "1") != "0":
    _sample_url = ensure_sample_database(_env_url)  # idempotent
else:
    _sample_url = _env_url

SYSTEM_PROMPT = """You are an agent designed to interact with a SQL database.
Given an input question, create a syntactically correct {dialect} query to run,
then look at the results of the query and return the answer. Unless the user
specifies a specific number of examples they wish to obtain, always limit your
query to at most {top_k} results. Never make DML statements (INSERT, UPDATE,
DELETE, DROP etc.) to the database. First list the tables, then query the
schema of the most relevant tables."""

model = load_chat_model()

# The tutorial's one changed line. It was:  db = SQLDatabase.from_uri(url)
# With DATABASE_URL set, the proxy uses the manager's URL (configure() or DATABASE_URL).
db = lsc.ScopedSQLDatabaseProxy(None if _env_url else _sample_url, read_only=True)

toolkit = SQLDatabaseToolkit(db=db, llm=model)
tools = toolkit.get_tools()
system_prompt = SYSTEM_PROMPT.format(dialect=db.dialect, top_k=5)  # read without connecting

try:
    from langchain.agents import create_agent
except ImportError:  # without langchain: langgraph's prebuilt agent, the tutorial's older form
    from langgraph.prebuilt import create_react_agent

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "moved to langchain.agents"
        agent = create_react_agent(model, tools, prompt=system_prompt)
else:
    agent = create_agent(model, tools, system_prompt=system_prompt)

graph = lsc.with_scoped_connections(agent)
