"""The demo: a sample store/sales database, an offline SQL agent, and the demo runner.

Used by ``python -m langgraph_scoped_conn demo``, by ``examples/sql_agent`` and by
the quickstart notebook.  Nothing here makes a network call unless
``LSC_CHAT_MODEL`` names a real provider model.
"""

from __future__ import annotations

from langgraph_scoped_conn.demo.agent import (
    SQLAgentState,
    build_sql_agent,
    make_sql_tools,
    scoped_database,
)
from langgraph_scoped_conn.demo.data import default_sample_path, ensure_sample_database
from langgraph_scoped_conn.demo.model import ScriptedSQLChatModel, build_query, load_chat_model

__all__ = [
    "SQLAgentState",
    "ScriptedSQLChatModel",
    "build_query",
    "build_sql_agent",
    "default_sample_path",
    "ensure_sample_database",
    "load_chat_model",
    "make_sql_tools",
    "scoped_database",
]
