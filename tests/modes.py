"""The one driver of LangGraph's invocation modes: invoke, ainvoke, stream, astream, batch,
abatch and astream_events.

A test that takes the ``mode`` fixture (``tests/conftest.py``) runs once per mode; one that
runs a subset narrows it with ``@pytest.mark.parametrize("mode", [...], indirect=True)``.

* :meth:`Mode.run` is for sync tests: an async mode gets its own event loop.
* :meth:`Mode.arun_any` and :meth:`Mode.final` are for async tests: a sync mode runs in a
  worker thread (``asyncio.to_thread``), an async one on the test's loop.
* :meth:`Mode.arun` drives the async modes on the running loop (a coroutine a test may
  cancel or time out).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.pregel import Pregel

SYNC_MODES = ("invoke", "stream", "batch")
ASYNC_MODES = ("ainvoke", "astream", "abatch", "astream_events")
ALL_MODES = ("invoke", "ainvoke", "stream", "astream", "batch", "abatch", "astream_events")


@dataclass
class Mode:
    """Runs a graph the way one invocation mode does; async modes get their own loop."""

    name: str

    @property
    def is_async(self) -> bool:
        return self.name in ASYNC_MODES

    @property
    def is_batch(self) -> bool:
        return self.name in ("batch", "abatch")

    def run(
        self, graph: Any, inputs: list[Any], configs: list[RunnableConfig] | None = None
    ) -> list[Any]:
        """Run every input as its own root run (one batch call for the batch modes)."""
        configs = configs or [{} for _ in inputs]
        if self.is_async:
            return asyncio.run(self.arun(graph, inputs, configs))
        if self.name == "batch":
            return list(graph.batch(inputs, configs))
        out = []
        for inp, cfg in zip(inputs, configs, strict=True):
            if self.name == "invoke":
                out.append(graph.invoke(inp, cfg))
            else:
                last = None
                for chunk in graph.stream(inp, cfg, **_values(graph)):
                    last = chunk
                out.append(last)
        return out

    async def arun(self, graph: Any, inputs: list[Any], configs: list[RunnableConfig]) -> list[Any]:
        """An async mode on the running loop: every input as its own root run."""
        if self.name == "abatch":
            return list(await graph.abatch(inputs, configs))
        out = []
        for inp, cfg in zip(inputs, configs, strict=True):
            if self.name == "ainvoke":
                out.append(await graph.ainvoke(inp, cfg))
            elif self.name == "astream":
                last = None
                async for chunk in graph.astream(inp, cfg, **_values(graph)):
                    last = chunk
                out.append(last)
            else:
                result = None
                async for event in graph.astream_events(inp, cfg, version="v2"):
                    if event["event"] == "on_chain_end" and not event["parent_ids"]:
                        result = event["data"]["output"]
                out.append(result)
        return out

    async def arun_any(
        self, graph: Any, inputs: list[Any], configs: list[RunnableConfig] | None = None
    ) -> list[Any]:
        """:meth:`run` from an async test: a sync mode in a worker thread, never on the loop."""
        if not self.is_async:
            return await asyncio.to_thread(self.run, graph, inputs, configs)
        return await self.arun(graph, inputs, configs or [{} for _ in inputs])

    async def final(self, graph: Any, inputs: Any, config: RunnableConfig | None = None) -> Any:
        """One root run from an async test; its final state (the last ``values`` chunk)."""
        (out,) = await self.arun_any(graph, [inputs], [config or {}])
        return out


def _values(runnable: Any) -> dict[str, Any]:
    return {"stream_mode": "values"} if isinstance(runnable, Pregel) else {}
