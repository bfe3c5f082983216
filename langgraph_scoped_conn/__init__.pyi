# The package's public names: the one list.  ``__init__.py`` loads each on first use
# (lazy_loader reads this stub), and type checkers read it as the package's interface.
from ._version import __version__ as __version__
from .checkpoint import apostgres_checkpointer as apostgres_checkpointer
from .checkpoint import apostgres_store as apostgres_store
from .checkpoint import postgres_checkpointer as postgres_checkpointer
from .checkpoint import postgres_store as postgres_store
from .configure import aconfigure as aconfigure
from .configure import configure as configure
from .configure import get_connection_manager as get_connection_manager
from .current import current_execution as current_execution
from .engine import ScopedEngine as ScopedEngine
from .errors import ConfigurationError as ConfigurationError
from .errors import ConnectionBudgetExceededError as ConnectionBudgetExceededError
from .errors import ConnectionReclaimedError as ConnectionReclaimedError
from .errors import ExecutionConnectionLimitError as ExecutionConnectionLimitError
from .errors import NoActiveScopeError as NoActiveScopeError
from .errors import ReadOnlyViolationError as ReadOnlyViolationError
from .errors import ScopeClosedError as ScopeClosedError
from .errors import ScopedConnectionError as ScopedConnectionError
from .errors import ScopeUnavailableError as ScopeUnavailableError
from .errors import UnsafeQueryError as UnsafeQueryError
from .graph import with_scoped_connections as with_scoped_connections
from .handler import ScopedConnectionHandler as ScopedConnectionHandler
from .manager import ExecutionConnectionManager as ExecutionConnectionManager
from .middleware import ScopedConnectionMiddleware as ScopedConnectionMiddleware
from .scope import ExecutionScope as ExecutionScope
from .scope import close_database_connections as close_database_connections
from .scope import create_execution_scoped_engine as create_execution_scoped_engine
from .scope import create_execution_scoped_engine_sync as create_execution_scoped_engine_sync
from .scope import create_execution_scoped_sql_database as create_execution_scoped_sql_database
from .scope import (
    create_execution_scoped_sql_database_sync as create_execution_scoped_sql_database_sync,
)
from .scope import get_connection_stats as get_connection_stats
from .scope import get_scoped_engine as get_scoped_engine
from .scope import get_scoped_sql_database as get_scoped_sql_database
from .scope import invalidate_schema_cache as invalidate_schema_cache
from .scope import track_connection as track_connection
from .sql_database import ScopedSQLDatabase as ScopedSQLDatabase
from .sql_database_proxy import ScopedSQLDatabaseProxy as ScopedSQLDatabaseProxy
