"""Execution-scoped database connections for LangGraph.

Every graph run (execution) gets its own tracked engines, SQLDatabase objects and
custom resources, drawn from one shared pool per database URL under a hard
connection budget, and released when the run ends, errors, is cancelled or its
stream is closed.

The public names are listed once, in ``__init__.pyi``; each is imported on first use
(lazy_loader reads the stub), so ``import langgraph_scoped_conn`` loads neither
SQLAlchemy nor LangChain, and concurrent first uses wait for one import.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
