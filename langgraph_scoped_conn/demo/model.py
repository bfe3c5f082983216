"""A deterministic chat model for the SQL agent, and the switch to a real provider.

:class:`ScriptedSQLChatModel` makes no network call.  It reads the conversation and
emits the same real tool calls a capable model would: list the tables, show the
schema of the table the question is about, run one read-only query built from the
question, then answer with the result.  Set ``LSC_CHAT_MODEL=provider:model`` (for
example ``openai:gpt-4o-mini``) to use a real model through ``init_chat_model``
instead, when langchain and the provider package are installed.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from langgraph_scoped_conn.errors import ConfigurationError

__all__ = [
    "LIST_TABLES_TOOL",
    "QUERY_TOOL",
    "SCHEMA_TOOL",
    "ScriptedSQLChatModel",
    "load_chat_model",
]

LIST_TABLES_TOOL = "sql_db_list_tables"
SCHEMA_TOOL = "sql_db_schema"
QUERY_TOOL = "sql_db_query"

#: Environment variable naming a real model, as ``provider:model``.
MODEL_ENV = "LSC_CHAT_MODEL"

_NUMERIC = re.compile(r"\b(INT|INTEGER|BIGINT|SMALLINT|NUMERIC|DECIMAL|REAL|FLOAT|DOUBLE)", re.I)
_CONSTRAINT_WORDS = frozenset({"PRIMARY", "FOREIGN", "CONSTRAINT", "UNIQUE", "CHECK"})
_MEASURE_PREFERENCE = ("amount", "total", "revenue", "price", "unit_price", "quantity")
_SQL_IN_QUESTION = re.compile(
    r"```(?:sql)?\s*(?P<sql>.+?)```|^\s*sql:\s*(?P<line>.+)$", re.I | re.S
)


class ScriptedSQLChatModel(BaseChatModel):
    """A rule-based chat model that drives a SQL agent offline and deterministically.

    Each call looks at the tool results since the last human message and takes the
    next step: ``sql_db_list_tables`` → ``sql_db_schema`` → ``sql_db_query`` → answer.
    The query is built from the question: "how many" counts rows, "total"/"revenue"
    sums the money column, "average" averages it, "by <column>" groups, "top"/"most"
    orders; otherwise it shows five rows.  SQL given in the question (a fenced
    block, or a line starting ``sql:``) is run as written.

    Example:
        >>> model = ScriptedSQLChatModel()  # doctest: +SKIP
        >>> model.bind_tools(tools).invoke("How many sales are there?").tool_calls
    """

    tool_names: tuple[str, ...] = ()

    @property
    def _llm_type(self) -> str:
        return "scripted-sql"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Return a copy that may call ``tools`` (only their names matter)."""
        names = tuple(convert_to_openai_tool(t)["function"]["name"] for t in tools)
        return self.model_copy(update={"tool_names": names})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = self._next_message(messages)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _next_message(self, messages: list[BaseMessage]) -> AIMessage:
        start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)
        if start < 0:
            return AIMessage(content="Ask me a question about the database.")
        question = _text(messages[start].content)
        results = {m.name: _text(m.content) for m in messages[start:] if isinstance(m, ToolMessage)}
        step = len(messages)
        if QUERY_TOOL in results:
            return AIMessage(content=_answer(results[QUERY_TOOL], _last_query(messages[start:])))
        if not {LIST_TABLES_TOOL, SCHEMA_TOOL, QUERY_TOOL} <= set(self.tool_names):
            return AIMessage(content="I need the SQL tools to answer questions about the database.")
        given = _SQL_IN_QUESTION.search(question)
        if given:
            sql = (given["sql"] or given["line"]).strip()
            return _call(QUERY_TOOL, {"query": sql}, step)
        if LIST_TABLES_TOOL not in results:
            return _call(LIST_TABLES_TOOL, {}, step)
        tables = [t.strip() for t in results[LIST_TABLES_TOOL].split(",") if t.strip()]
        if not tables or results[LIST_TABLES_TOOL].startswith("Error"):
            return AIMessage(content=f"I could not list the tables: {results[LIST_TABLES_TOOL]}")
        table = _pick_table(question, tables)
        if SCHEMA_TOOL not in results:
            return _call(SCHEMA_TOOL, {"table_names": table}, step)
        columns = _columns(results[SCHEMA_TOOL])
        return _call(QUERY_TOOL, {"query": build_query(question, table, columns)}, step)


def build_query(question: str, table: str, columns: Sequence[tuple[str, str]]) -> str:
    """The SQL the scripted model runs for ``question`` on ``table`` with ``columns``."""
    q = question.lower()
    names = [name for name, _ in columns]
    numeric = [n for n, t in columns if _NUMERIC.search(t) and n != "id" and not n.endswith("_id")]
    measure = next(
        (m for m in _MEASURE_PREFERENCE if m in numeric), numeric[0] if numeric else None
    )
    group = None
    by = re.search(r"\bby\s+(\w+)", q)
    if by:
        word = by.group(1).rstrip("s")
        group = next((n for n in names if n in (word, f"{word}_id") or n.rstrip("s") == word), None)
    if re.search(r"\bhow many\b|\bcount\b|\bnumber of\b", q):
        if group:
            return (
                f"SELECT {group}, COUNT(*) AS count FROM {table} "
                f"GROUP BY {group} ORDER BY count DESC, {group} LIMIT 10"
            )
        return f"SELECT COUNT(*) AS count FROM {table}"
    for words, fn in ((r"total|sum|revenue", "SUM"), (r"average|avg|mean", "AVG")):
        if measure and re.search(rf"\b({words})\b", q):
            alias = f"{fn.lower()}_{measure}"
            value = f"ROUND({fn}({measure}), 2)"
            if group:
                return (
                    f"SELECT {group}, {value} AS {alias} FROM {table} "
                    f"GROUP BY {group} ORDER BY {alias} DESC, {group} LIMIT 10"
                )
            return f"SELECT {value} AS {alias} FROM {table}"
    if measure and re.search(r"\b(top|most|highest|largest|biggest|best)\b", q):
        return f"SELECT * FROM {table} ORDER BY {measure} DESC, {names[0]} LIMIT 5"
    order = f" ORDER BY {names[0]}" if names else ""
    return f"SELECT * FROM {table}{order} LIMIT 5"


def load_chat_model(spec: str | None = None) -> BaseChatModel:
    """The chat model for the SQL agent: the scripted one, or ``LSC_CHAT_MODEL`` when set.

    Args:
        spec: ``provider:model`` (e.g. ``openai:gpt-4o-mini``); ``None`` reads
            ``LSC_CHAT_MODEL``; empty or ``scripted`` gives :class:`ScriptedSQLChatModel`.

    Raises:
        ConfigurationError: a real model was asked for but langchain's
            ``init_chat_model`` or the provider's package is not installed.
    """
    spec = os.environ.get(MODEL_ENV, "") if spec is None else spec
    if spec.strip() in ("", "scripted"):
        return ScriptedSQLChatModel()
    init_chat_model = _find_init_chat_model()
    if init_chat_model is None:
        raise ConfigurationError(
            f"{MODEL_ENV}={spec!r} needs langchain's init_chat_model: "
            "pip install langchain (and the provider package), or unset it to use the "
            "offline scripted model"
        )
    try:
        with warnings.catch_warnings():
            # langchain_classic's copy warns that it moved to langchain; it still works
            warnings.filterwarnings("ignore", message=".*init_chat_model.*deprecated")
            model: BaseChatModel = init_chat_model(spec)
    except ImportError as exc:
        raise ConfigurationError(
            f"{MODEL_ENV}={spec!r}: the provider package is missing ({exc}); install it, "
            "or unset the variable to use the offline scripted model"
        ) from None
    return model


def _find_init_chat_model() -> Callable[..., Any] | None:
    import importlib

    for module in ("langchain.chat_models", "langchain_classic.chat_models"):
        try:
            found: Callable[..., Any] = importlib.import_module(module).init_chat_model
        except (ImportError, AttributeError):
            continue
        return found
    return None


def _call(name: str, args: dict[str, Any], step: int) -> AIMessage:
    return AIMessage(
        content="", tool_calls=[{"name": name, "args": args, "id": f"call_{step}_{name}"}]
    )


def _text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content)


def _pick_table(question: str, tables: Sequence[str]) -> str:
    # "revenue by store" is about sales, grouped by store: skip the word after "by"
    words = re.findall(r"[a-z_]+", re.sub(r"\bby\s+\w+", " ", question.lower()))
    for word in words:
        for table in tables:
            t = table.lower()
            if word in (t, t.rstrip("s"), f"{t}s") or (len(word) > 3 and t.startswith(word)):
                return table
    return "sales" if "sales" in tables else tables[0]


def _columns(schema: str) -> list[tuple[str, str]]:
    match = re.search(r"CREATE TABLE [^(]+\((?P<body>.*?)\n\)", schema, re.S)
    if not match:
        return []
    out = []
    for line in match["body"].splitlines():
        parts = line.strip().rstrip(",").split()
        if len(parts) >= 2 and parts[0].upper() not in _CONSTRAINT_WORDS:
            out.append((parts[0].strip('"'), parts[1]))
    return out


def _last_query(messages: Sequence[BaseMessage]) -> str:
    for m in reversed(messages):
        if isinstance(m, AIMessage):
            for call in m.tool_calls:
                if call["name"] == QUERY_TOOL:
                    return str(call["args"].get("query", ""))
    return ""


def _answer(result: str, query: str) -> str:
    if result.startswith("Rejected"):
        return f"I did not run the query: {result}"
    if result.startswith("Error"):
        return f"The query failed. {result}\n\nSQL: {query}"
    return f"Result: {result}\n\nSQL: {query}"
