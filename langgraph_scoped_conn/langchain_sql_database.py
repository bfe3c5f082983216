"""langchain-community's ``SQLDatabase``, imported in one place, its sunset warning silenced.

The package's core never imports it; only the SQLDatabase adapter, its proxy and the
schema cache's first reflection do, so an app that only uses scoped engines never loads
LangChain's community package, and one that does never sees the warning on import.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r".*langchain-community.*", category=DeprecationWarning
    )
    from langchain_community.utilities.sql_database import SQLDatabase

__all__ = ["SQLDatabase"]
