"""The sample store/sales database: generated from a fixed seed, loaded on first use.

Four tables, about 3,200 rows: ``regions``, ``stores``, ``products`` and ``sales``.
The same seed gives the same rows on every machine, so answers are reproducible.
By default the data goes into a SQLite file under the user's cache directory;
:func:`ensure_sample_database` loads it into PostgreSQL instead when given a
``postgresql://`` URL (optionally into one schema).  Loading is idempotent and safe to
race.  On PostgreSQL each table carries the comment :data:`SAMPLE_COMMENT`, so the
demo can tell the tables it created from a user's own.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.urls import parse_url

__all__ = [
    "SALES_ROWS",
    "SAMPLE_COMMENT",
    "SAMPLE_TABLES",
    "default_sample_path",
    "ensure_sample_database",
    "sample_rows",
]

logger = logging.getLogger("langgraph_scoped_conn")

#: Bump when the generated data changes, so old cached files are not reused.
DATA_VERSION = 1
SEED = 20240601
SALES_ROWS = 3000
SAMPLE_TABLES = ("products", "regions", "sales", "stores")
#: The table comment (PostgreSQL) that marks a table as this module's sample data.
SAMPLE_COMMENT = "sample data of the langgraph_scoped_conn demo"

_money = Numeric(10, 2).with_variant(Float(), "sqlite")
metadata = MetaData()
regions = Table(
    "regions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), nullable=False),
    comment=SAMPLE_COMMENT,
)
stores = Table(
    "stores",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(80), nullable=False),
    Column("city", String(40), nullable=False),
    Column("region_id", Integer, ForeignKey("regions.id"), nullable=False),
    Column("opened_on", Date, nullable=False),
    comment=SAMPLE_COMMENT,
)
products = Table(
    "products",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(80), nullable=False),
    Column("category", String(40), nullable=False),
    Column("unit_price", _money, nullable=False),
    comment=SAMPLE_COMMENT,
)
sales = Table(
    "sales",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("store_id", Integer, ForeignKey("stores.id"), nullable=False),
    Column("product_id", Integer, ForeignKey("products.id"), nullable=False),
    Column("sold_on", Date, nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("amount", _money, nullable=False),
    comment=SAMPLE_COMMENT,
)

_REGIONS = ("North", "South", "East", "West")
_CITIES = (
    ("Oslo", 1), ("Bergen", 1), ("Tromso", 1), ("Lima", 2), ("Cusco", 2), ("Arequipa", 2),
    ("Pune", 3), ("Kochi", 3), ("Jaipur", 3), ("Porto", 4), ("Braga", 4), ("Faro", 4),
)  # fmt: skip
_CATEGORIES = {
    "coffee": ("Espresso beans", "Filter roast", "Decaf blend", "Cold brew pack", "Single origin"),
    "tea": ("Green tea", "Earl grey", "Chai mix", "Mint infusion", "Oolong"),
    "bakery": ("Croissant", "Sourdough loaf", "Bagel", "Muffin", "Cinnamon roll"),
    "kitchen": ("Mug", "French press", "Grinder", "Kettle", "Travel cup"),
}
_SIZES = ("small", "medium", "large")


def sample_rows() -> dict[str, list[dict[str, Any]]]:
    """The sample rows, table by table, generated from a fixed seed (same on every machine)."""
    rng = random.Random(SEED)  # noqa: S311 - reproducible sample data, not security
    out: dict[str, list[dict[str, Any]]] = {
        "regions": [{"id": i, "name": n} for i, n in enumerate(_REGIONS, 1)],
        "stores": [],
        "products": [],
        "sales": [],
    }
    start = dt.date(2024, 1, 1)
    for i, (city, region) in enumerate(_CITIES, 1):
        opened = dt.date(2018, 1, 1) + dt.timedelta(days=rng.randrange(2000))
        out["stores"].append(
            {"id": i, "name": f"{city} store", "city": city, "region_id": region,
             "opened_on": opened}
        )  # fmt: skip
    pid = 0
    for category, names in _CATEGORIES.items():
        for name in names:
            for size in _SIZES:
                pid += 1
                price = Decimal(rng.randrange(150, 4500)) / 100
                out["products"].append(
                    {"id": pid, "name": f"{name} ({size})", "category": category,
                     "unit_price": price}
                )  # fmt: skip
    prices = {p["id"]: p["unit_price"] for p in out["products"]}
    for i in range(1, SALES_ROWS + 1):
        product_id = rng.randrange(1, pid + 1)
        quantity = rng.choice((1, 1, 1, 2, 2, 3, 4, 6))
        out["sales"].append(
            {
                "id": i,
                "store_id": rng.randrange(1, len(_CITIES) + 1),
                "product_id": product_id,
                "sold_on": start + dt.timedelta(days=rng.randrange(366)),
                "quantity": quantity,
                "amount": prices[product_id] * quantity,
            }
        )
    return out


def default_sample_path() -> Path:
    """Where the embedded SQLite sample lives: ``$LSC_CACHE_DIR`` or the user cache directory."""
    base = os.environ.get("LSC_CACHE_DIR")
    if base:
        root = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "langgraph_scoped_conn"
    return root / f"store-v{DATA_VERSION}.sqlite"


def ensure_sample_database(database_url: str | None = None, *, schema: str | None = None) -> str:
    """Make sure the sample store/sales data exists and return the URL to reach it.

    Args:
        database_url: a PostgreSQL URL to load the sample into (tables are created
            when missing, rows inserted when ``sales`` is empty), or ``None`` for the
            SQLite file (see :func:`default_sample_path`), created on first use.
        schema: PostgreSQL only: the schema (which must exist) to load into instead of
            the connection's current one.

    Returns:
        The database URL (with its password, for connecting; never log it unredacted).

    Raises:
        ConfigurationError: the URL is invalid, some sample tables exist but not all,
            or ``schema`` was given for SQLite.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    url = parse_url(database_url) if database_url is not None else None
    if schema is not None and (url is None or url.get_backend_name() == "sqlite"):
        raise ConfigurationError("the sample's schema= is for PostgreSQL; SQLite has one schema")
    if url is None:
        return _ensure_sqlite(default_sample_path())
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "the sample database needs a SQLite file, e.g. sqlite:///store.db, not :memory:"
            )
        _ensure_sqlite(Path(str(url.database)))
        return str(database_url)
    engine = create_engine(url, poolclass=NullPool)
    where = redact_url(str(database_url)) + (f" (schema {schema})" if schema else "")
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # one loader at a time; the lock ends with the transaction
                conn.execute(text("select pg_advisory_xact_lock(72010601)"))
            _load(conn, where, schema)
    finally:
        engine.dispose()
    return str(database_url)


def _ensure_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"
    if path.exists():
        return url
    path.parent.mkdir(parents=True, exist_ok=True)
    # build in a temporary file, then rename: concurrent first runs never see half a file
    fd, tmp_name = tempfile.mkstemp(prefix=".store-", suffix=".sqlite", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    engine = create_engine(f"sqlite:///{tmp}", poolclass=NullPool)
    try:
        with engine.begin() as conn:
            _load(conn, str(path), None)
    finally:
        engine.dispose()
    if path.exists():  # another process won the race; its file is identical
        tmp.unlink()
    else:
        os.replace(tmp, path)
    logger.info("created the sample database at %s", path)
    return url


def _load(conn: Connection, where: str, schema: str | None) -> None:
    existing = set(inspect(conn).get_table_names(schema=schema)) & set(SAMPLE_TABLES)
    if existing and existing != set(SAMPLE_TABLES):
        raise ConfigurationError(
            f"{where} has some sample tables ({', '.join(sorted(existing))}) but not all of "
            f"{', '.join(SAMPLE_TABLES)}; drop them or use an empty database"
        )
    if schema is not None:  # the tables carry no schema: put them (and their DDL) in this one
        conn = conn.execution_options(schema_translate_map={None: schema})
    metadata.create_all(conn, checkfirst=True)
    if conn.execute(select(func.count()).select_from(sales)).scalar_one():
        return  # loaded before
    rows = sample_rows()
    for table in metadata.sorted_tables:
        conn.execute(table.insert(), rows[table.name])
    logger.info("loaded %d sample sales rows into %s", SALES_ROWS, where)
