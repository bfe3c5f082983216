"""The read-only guard for SQL written by a model, on a real PostgreSQL and on SQLite.

Every hostile input must be refused with a clear error (``UnsafeQueryError`` from the
guard, or ``ReadOnlyViolationError`` from the read-only transaction), come back as
``"Error: ..."`` text from ``run_no_throw`` (what SQL tools hand to the model), and
leave a checksum of the data and of the schema, and the state of the pooled session
(temp tables, prepared statements, cursors, LISTEN channels, advisory locks, role,
settings), unchanged.  The corpus runs through psycopg2 and psycopg 3.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from sqlalchemy.exc import DBAPIError
from typing_extensions import TypedDict

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.errors import ReadOnlyViolationError, UnsafeQueryError
from langgraph_scoped_conn.guard import check_read_only_sql, split_sqlite_statements
from langgraph_scoped_conn.testing import SAMPLE_SQL
from tests.conftest import Database, Server, assert_clean

PG_CHECKSUM = """
select md5(string_agg(x, '|' order by x)) from (
  select 'c' || c::text as x from customers c
  union all select 'o' || o::text from orders o
  union all select 'r' || n.nspname || '.' || relname || ':' || relkind::text || ':'
                   || relpersistence::text
   from pg_class join pg_namespace n on n.oid = relnamespace
   where n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg_toast%'
  union all select 'n' || nspname from pg_namespace
   where nspname not like 'pg_temp%' and nspname not like 'pg_toast_temp%'
  union all select 'p' || proname || ':' || prokind::text from pg_proc
   where pronamespace = 'public'::regnamespace
  union all select 'l' || count(*)::text from pg_largeobject_metadata
  union all select 'a' || rolname || ':' || rolsuper::text || ':' || rolcanlogin::text
   from pg_roles
) s
"""

UNSAFE = UnsafeQueryError
READ_ONLY = ReadOnlyViolationError
INVALID = "the query is not valid SQL"
BACKSLASH = "backslash before a quote"

#: The characters PostgreSQL reads as part of an identifier and the old lexer did not:
#: "€$a$" is one name, not "€" and a dollar quote that hides the rest of the text.
NON_ASCII = {
    "euro": "€",
    "middle dot": "·",
    "section": "§",
    "degree": "°",
    "emoji": "😀",
    "no-break space": "\u00a0",
    "e acute": "é",
}
DOLLAR_TAGS = ["$a$", "$$", "$_1$"]
PAYLOADS = {
    "commit-delete": ("COMMIT; DELETE FROM orders", 4),
    "rollback-drop": ("ROLLBACK; DROP TABLE orders CASCADE", 4),
    "read-write-truncate": (
        "COMMIT; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; TRUNCATE t",
        5,
    ),
}


def _non_ascii_corpus() -> list[tuple[str, str, type[Exception], str]]:
    out = []
    for cname, char in NON_ASCII.items():
        for tag in DOLLAR_TAGS:
            for pname, (payload, count) in PAYLOADS.items():
                query = f"SELECT 1 AS {char}{tag}; {payload}; SELECT 1 AS {char}{tag}"
                out.append((f"{cname} {tag} {pname}", query, UNSAFE, f"holds {count} statements"))
        # glued to a table name and a column, not only to an alias
        out.append(
            (
                f"{cname} in FROM",
                f"SELECT * FROM t{char}$a$; DELETE FROM t; SELECT 1 FROM t{char}$a$",
                UNSAFE,
                "holds 3 statements",
            )
        )
    return out


#: (id, query, error class, words the message must contain)
HOSTILE_PG: list[tuple[str, str, type[Exception], str]] = [
    # -- the reported bypass, exactly
    (
        "reported bypass",
        "SELECT 1 AS €$a$; COMMIT; DELETE FROM t; SELECT 1 AS €$a$",
        UNSAFE,
        "holds 4 statements",
    ),
    *_non_ascii_corpus(),
    # -- statements that are not queries
    ("drop", "DROP TABLE orders", UNSAFE, "DROP statements are refused"),
    ("update", "UPDATE orders SET amount = 0", UNSAFE, "UPDATE statements are refused"),
    ("insert", "INSERT INTO customers VALUES (999, 'x', 'y')", UNSAFE, "INSERT statements"),
    ("delete", "delete from orders", UNSAFE, "DELETE statements are refused"),
    (
        "merge",
        "MERGE INTO orders o USING customers c ON o.id = c.id WHEN MATCHED THEN DELETE",
        UNSAFE,
        "MERGE statements are refused",
    ),
    ("truncate", "TRUNCATE orders CASCADE", UNSAFE, "TRUNCATE statements"),
    ("grant", "GRANT ALL ON orders TO public", UNSAFE, "GRANT statements"),
    ("revoke", "REVOKE SELECT ON orders FROM public", UNSAFE, "REVOKE statements"),
    ("copy to program", "COPY orders TO PROGRAM 'true'", UNSAFE, "COPY statements"),
    ("copy query to stdout", "COPY (SELECT * FROM orders) TO STDOUT", UNSAFE, "COPY statements"),
    ("copy from", "COPY orders FROM '/etc/passwd'", UNSAFE, "COPY statements"),
    ("do-block", "DO $$ BEGIN DELETE FROM orders; END $$", UNSAFE, "DO statements"),
    ("do-block commit", "DO $x$ BEGIN COMMIT; DELETE FROM t; END $x$", UNSAFE, "DO statements"),
    ("call", "CALL cleanup()", UNSAFE, "CALL statements"),
    ("listen", "LISTEN pwned", UNSAFE, "LISTEN statements"),
    ("unlisten", "UNLISTEN *", UNSAFE, "UNLISTEN statements"),
    ("notify", "NOTIFY pwned, 'x'", UNSAFE, "NOTIFY statements"),
    ("prepare", "PREPARE p AS SELECT * FROM orders", UNSAFE, "PREPARE statements"),
    ("prepare delete", "PREPARE p AS DELETE FROM orders", UNSAFE, "PREPARE statements"),
    ("execute", "EXECUTE p", UNSAFE, "EXECUTE statements"),
    ("deallocate", "DEALLOCATE ALL", UNSAFE, "DEALLOCATE statements"),
    (
        "declare with hold",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM orders",
        UNSAFE,
        "DECLARE statements",
    ),
    ("declare", "DECLARE c CURSOR FOR SELECT 1", UNSAFE, "DECLARE statements"),
    ("fetch", "FETCH ALL FROM c", UNSAFE, "FETCH statements"),
    ("close cursor", "CLOSE ALL", UNSAFE, "CLOSE statements"),
    ("set role", "SET ROLE pg_read_all_data", UNSAFE, "SET statements"),
    (
        "set session authorization",
        "SET SESSION AUTHORIZATION pg_read_all_data",
        UNSAFE,
        "SET statements",
    ),
    ("reset all", "RESET ALL", UNSAFE, "RESET statements"),
    ("reset role", "RESET ROLE", UNSAFE, "RESET statements"),
    ("set search_path", "SET search_path = pg_catalog", UNSAFE, "SET statements"),
    ("set work_mem", "SET work_mem TO '64kB'", UNSAFE, "SET statements"),
    ("set local", "SET LOCAL statement_timeout = 0", UNSAFE, "SET statements"),
    ("set statement_timeout", "set statement_timeout = 0", UNSAFE, "SET statements"),
    ("set time zone", "SET TIME ZONE 'UTC'", UNSAFE, "SET statements"),
    ("set read-write alone", "SET default_transaction_read_only = off", UNSAFE, "SET statements"),
    ("set transaction", "SET TRANSACTION READ WRITE", UNSAFE, "SET statements"),
    (
        "set session characteristics",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        UNSAFE,
        "SET statements",
    ),
    ("create temp table", "CREATE TEMP TABLE x (a int)", UNSAFE, "CREATE statements"),
    (
        "create temp table as",
        "CREATE TEMPORARY TABLE x AS SELECT * FROM orders",
        UNSAFE,
        "CREATE statements",
    ),
    (
        "create table as",
        "CREATE TABLE stolen AS SELECT * FROM customers",
        UNSAFE,
        "CREATE statements",
    ),
    ("create view", "CREATE VIEW v AS SELECT 1", UNSAFE, "CREATE statements"),
    (
        "create function",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        UNSAFE,
        "CREATE statements",
    ),
    ("create extension", "CREATE EXTENSION IF NOT EXISTS dblink", UNSAFE, "CREATE statements"),
    ("create role", "CREATE ROLE pwned SUPERUSER LOGIN", UNSAFE, "CREATE statements"),
    (
        "create rule",
        "CREATE RULE r AS ON SELECT TO orders DO INSTEAD NOTHING",
        UNSAFE,
        "CREATE statements",
    ),
    ("alter table", "ALTER TABLE orders DROP COLUMN amount", UNSAFE, "ALTER statements"),
    (
        "alter role",
        "ALTER ROLE CURRENT_USER SET default_transaction_read_only = off",
        UNSAFE,
        "ALTER statements",
    ),
    (
        "alter system",
        "ALTER SYSTEM SET standard_conforming_strings = off",
        UNSAFE,
        "ALTER statements",
    ),
    ("lock table", "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", UNSAFE, "LOCK statements"),
    ("discard", "DISCARD ALL", UNSAFE, "DISCARD statements"),
    ("vacuum", "VACUUM orders", UNSAFE, "VACUUM statements"),
    ("analyze", "ANALYZE orders", UNSAFE, "ANALYZE statements"),
    ("cluster", "CLUSTER orders USING orders_pkey", UNSAFE, "CLUSTER statements"),
    ("reindex", "REINDEX TABLE orders", UNSAFE, "REINDEX statements"),
    ("checkpoint", "CHECKPOINT", UNSAFE, "CHECKPOINT statements"),
    ("load", "LOAD 'auto_explain'", UNSAFE, "LOAD statements"),
    ("comment on", "COMMENT ON TABLE orders IS 'x'", UNSAFE, "COMMENT statements"),
    ("refresh", "REFRESH MATERIALIZED VIEW mv", UNSAFE, "REFRESH statements"),
    ("drop owned", "DROP OWNED BY CURRENT_USER", UNSAFE, "DROP statements"),
    ("begin", "BEGIN", UNSAFE, "BEGIN statements"),
    ("start transaction", "START TRANSACTION READ WRITE", UNSAFE, "START statements"),
    ("commit alone", "commit", UNSAFE, "COMMIT statements"),
    ("end", "END", UNSAFE, "END statements"),
    ("rollback", "ROLLBACK", UNSAFE, "ROLLBACK statements"),
    ("abort", "ABORT", UNSAFE, "ABORT statements"),
    ("savepoint", "SAVEPOINT a", UNSAFE, "SAVEPOINT statements"),
    ("release savepoint", "RELEASE SAVEPOINT a", UNSAFE, "RELEASE statements"),
    ("prepare transaction", "PREPARE TRANSACTION 'x'", UNSAFE, "PREPARE statements"),
    ("commit prepared", "COMMIT PREPARED 'x'", UNSAFE, "COMMIT statements"),
    ("comment before delete", "/* SELECT */ DELETE FROM orders", UNSAFE, "DELETE statements"),
    ("line comment before delete", "-- SELECT\nDELETE FROM orders", UNSAFE, "DELETE statements"),
    ("cte then delete", "WITH x AS (SELECT 1) DELETE FROM orders", UNSAFE, "DELETE statements"),
    (
        "cte then insert",
        "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
        UNSAFE,
        "INSERT statements",
    ),
    ("delete in parentheses", "(DELETE FROM orders)", UNSAFE, INVALID),
    # -- several statements
    ("two statements", "SELECT 1; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("no spaces", "SELECT 1;DELETE FROM orders", UNSAFE, "holds 2 statements"),
    ("commit then drop", "COMMIT; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("rollback then delete", "ROLLBACK; DELETE FROM orders;", UNSAFE, "holds 2 statements"),
    ("delete then select", "DELETE FROM orders; SELECT 1", UNSAFE, "holds 2 statements"),
    ("empty statement between", "SELECT 1 ;; DELETE FROM orders", UNSAFE, "holds 2"),
    ("leading semicolon", "; DELETE FROM orders", UNSAFE, "DELETE statements"),
    ("comments between", "SELECT/**/1;DELETE/**/FROM/**/orders", UNSAFE, "holds 2"),
    (
        "set read-write then delete",
        "SET default_transaction_read_only=off; DELETE FROM orders",
        UNSAFE,
        "holds 2 statements",
    ),
    (
        "set session read-write then drop",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DROP TABLE orders",
        UNSAFE,
        "holds 2 statements",
    ),
    ("begin delete commit", "BEGIN; DELETE FROM orders; COMMIT", UNSAFE, "holds 3 statements"),
    (
        "set_config then commit",
        "SELECT set_config('default_transaction_read_only', 'off', false); COMMIT; "
        "DELETE FROM orders",
        UNSAFE,
        "holds 3 statements",
    ),
    (
        "set role then commit",
        "SELECT 1; COMMIT; SET ROLE pg_read_all_data",
        UNSAFE,
        "holds 3 statements",
    ),
    (
        "advisory lock then commit",
        "SELECT pg_advisory_lock(1); COMMIT",
        UNSAFE,
        "holds 2 statements",
    ),
    (
        "temp table after commit",
        "SELECT 1; COMMIT; CREATE TEMP TABLE x AS SELECT 1",
        UNSAFE,
        "holds 3 statements",
    ),
    (
        "hold cursor after commit",
        "SELECT 1; COMMIT; DECLARE c CURSOR WITH HOLD FOR SELECT * FROM orders",
        UNSAFE,
        "holds 3 statements",
    ),
    ("listen after commit", "SELECT 1; COMMIT; LISTEN pwned", UNSAFE, "holds 3 statements"),
    (
        "prepare after commit",
        "SELECT 1; COMMIT; PREPARE p AS SELECT 1",
        UNSAFE,
        "holds 3 statements",
    ),
    # -- limits
    ("very long", "SELECT " + " + ".join(["1"] * 10_000), UNSAFE, "above the limit"),
    (
        "very long hiding a drop",
        "SELECT 1 " + "/* padding */ " * 2_000 + "; DROP TABLE orders",
        UNSAFE,
        "above the limit",
    ),
    ("nul byte", "SELECT 1\x00; DROP TABLE orders", UNSAFE, "NUL character"),
    ("empty", "  ;  -- nothing\n", UNSAFE, "the query is empty"),
    ("only a comment", "/* SELECT 1 */", UNSAFE, "the query is empty"),
    # -- strings, identifiers and comments that hide a ";" from a naive splitter
    ("block comment hides ;", "SELECT 1 /* ; */ ; DROP TABLE orders", UNSAFE, "holds 2"),
    ("nested comment hides ;", "SELECT 1 /* /* ; */ ; */ ; DROP TABLE orders", UNSAFE, "holds 2"),
    ("nested comment closed once", "SELECT 1 /* /* */ ; DELETE FROM orders", UNSAFE, INVALID),
    ("comment closer outside", "SELECT 1 /* */ */; DELETE FROM orders", UNSAFE, INVALID),
    ("line comment hides ;", "SELECT 1 -- ;\n; DROP TABLE orders", UNSAFE, "holds 2"),
    (
        "line comment hides comment opener",
        "SELECT 1 -- /*\n; DELETE FROM orders; -- */",
        UNSAFE,
        "holds 2",
    ),
    (
        "block comment hides line comment",
        "SELECT 1 /* -- */; DELETE FROM orders",
        UNSAFE,
        "holds 2",
    ),
    (
        "carriage return ends a line comment",
        "SELECT 1 --x\r; COMMIT; DROP TABLE orders",
        UNSAFE,
        "holds 3 statements",
    ),
    ("CR LF ends a line comment", "SELECT 1 --x\r\n; DELETE FROM orders", UNSAFE, "holds 2"),
    ("form feed then newline", "SELECT 1 --x\f\n; DELETE FROM orders\n", UNSAFE, "holds 2"),
    ("string hides ;", "SELECT ';' ; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("doubled quote", "SELECT 'it''s;' ; DELETE FROM orders", UNSAFE, "holds 2"),
    ("identifier hides ;", 'SELECT 1 AS ";" ; DROP TABLE orders', UNSAFE, "holds 2"),
    ("identifier with doubled quote", 'SELECT 1 AS "a"";"; DROP TABLE orders', UNSAFE, "holds 2"),
    (
        "identifier that looks like a dollar quote",
        'SELECT 1 AS "$a$"; DELETE FROM orders; SELECT "$a$"',
        UNSAFE,
        "holds 3",
    ),
    ("unicode identifier ;", 'SELECT 1 AS U&"\\003B"; DELETE FROM orders', UNSAFE, "holds 2"),
    (
        "unicode identifier uescape",
        "SELECT 1 AS U&\"a!003Bb\" UESCAPE '!'; DELETE FROM orders",
        UNSAFE,
        "holds 2",
    ),
    ("unicode string quote", "SELECT U&'\\0027'; DELETE FROM orders", UNSAFE, "holds 2"),
    ("dollar quote hides ;", "SELECT $$;$$; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("tagged dollar quote", "SELECT $q$ ; $q$ ; DROP TABLE orders", UNSAFE, "holds 2"),
    ("nested dollar quotes", "SELECT $a$ $b$ ; $b$ $a$; DELETE FROM orders", UNSAFE, "holds 2"),
    (
        "dollar quotes crossed",
        "SELECT $a$ $b$ $a$; DELETE FROM orders; SELECT $b$",
        UNSAFE,
        INVALID,
    ),
    ("dollar tag of underscore and digit", "SELECT $_1$ ; $_1$; DELETE FROM t", UNSAFE, "holds 2"),
    (
        "dollar inside an identifier",
        "SELECT 1 AS a$$$; COMMIT; DROP TABLE orders; SELECT 1 AS b$$",
        UNSAFE,
        "holds 4 statements",
    ),
    ("identifier then a tag", "SELECT 1 AS a$b$; DELETE FROM orders; SELECT $b$", UNSAFE, INVALID),
    (
        "identifier ending in $$",
        "SELECT 1 AS x$$; COMMIT; DELETE FROM orders; SELECT $$",
        UNSAFE,
        INVALID,
    ),
    ("parameter then dollar", "SELECT $1$ ; DELETE FROM orders", UNSAFE, INVALID),
    ("unterminated comment", "SELECT 1 /* ; DROP TABLE orders", UNSAFE, "unterminated /* comment"),
    ("unterminated string", "SELECT '; DROP TABLE orders", UNSAFE, "unterminated quoted string"),
    ("unterminated dollar", "SELECT $x$; DROP TABLE orders", UNSAFE, "unterminated dollar-quoted"),
    ("unterminated identifier", 'SELECT "; DROP TABLE orders', UNSAFE, INVALID),
    ("non-ASCII space is not a space", "SELECT\u00a01; DELETE FROM orders", UNSAFE, INVALID),
    # A backslash before a quote is read differently by E'' strings, by a type name that
    # ends in "e" (name'\'), and with standard_conforming_strings=off.
    (
        "backslash quote after a type name",
        "SELECT name'\\'; COMMIT; DROP TABLE orders; --'",
        UNSAFE,
        BACKSLASH,
    ),
    ("E string backslash quote", "SELECT E'\\'; COMMIT; DROP TABLE orders; --'", UNSAFE, BACKSLASH),
    ("e string backslash quote", "SELECT e'\\'' ; DELETE FROM orders", UNSAFE, BACKSLASH),
    ("plain string backslash quote", "SELECT 'a\\'; DELETE FROM orders; --'", UNSAFE, BACKSLASH),
    ("national string backslash quote", "SELECT N'\\'; DELETE FROM orders; --'", UNSAFE, BACKSLASH),
    (
        "backslash before a doubled quote",
        "SELECT 'a\\'''; DELETE FROM orders; --'",
        UNSAFE,
        BACKSLASH,
    ),
    (
        "E string escaped backslash",
        "SELECT E'\\\\'; COMMIT; DELETE FROM orders",
        UNSAFE,
        "holds 3 statements",
    ),
    # -- single statements that look like reads but write or lock
    (
        "data-modifying CTE",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
        UNSAFE,
        "data-modifying DELETE",
    ),
    (
        "data-modifying CTE in parentheses",
        "(WITH u AS (UPDATE customers SET name = 'x' RETURNING 1) SELECT * FROM u)",
        UNSAFE,
        "data-modifying UPDATE",
    ),
    (
        "insert CTE",
        "WITH i AS (INSERT INTO t VALUES (0) RETURNING 1) SELECT 1",
        UNSAFE,
        "data-modifying INSERT",
    ),
    (
        "merge CTE",
        "WITH m AS (MERGE INTO t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE "
        "RETURNING 1) SELECT 1",
        UNSAFE,
        "data-modifying MERGE",
    ),
    (
        "CTE in a subquery",
        "SELECT * FROM (WITH d AS (DELETE FROM orders RETURNING 1) SELECT * FROM d) x",
        UNSAFE,
        "data-modifying DELETE",
    ),
    (
        "CTE nested in a CTE",
        "WITH a AS (WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d) SELECT * FROM a",
        UNSAFE,
        "data-modifying DELETE",
    ),
    (
        "recursive CTE with update",
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3), "
        "u AS (UPDATE orders SET amount = 0 RETURNING 1) SELECT * FROM r",
        UNSAFE,
        "data-modifying UPDATE",
    ),
    (
        "explain of a data-modifying CTE",
        "EXPLAIN ANALYZE WITH d AS (DELETE FROM orders RETURNING 1) SELECT * FROM d",
        UNSAFE,
        "data-modifying DELETE",
    ),
    ("select into", "SELECT * INTO stolen FROM customers", UNSAFE, "SELECT ... INTO"),
    ("select into temp", "SELECT 1 AS a INTO TEMP x", UNSAFE, "SELECT ... INTO"),
    ("select into unlogged", "SELECT * INTO UNLOGGED stolen FROM orders", UNSAFE, "INTO"),
    ("cte select into", "WITH x AS (SELECT 1) SELECT * INTO y FROM x", UNSAFE, "SELECT ... INTO"),
    ("explain select into", "EXPLAIN ANALYZE SELECT * INTO y FROM orders", UNSAFE, "INTO"),
    ("select for update", "SELECT * FROM orders FOR UPDATE", UNSAFE, "FOR UPDATE"),
    ("select for share", "SELECT * FROM orders FOR SHARE", UNSAFE, "locks rows"),
    ("for no key update", "SELECT * FROM orders FOR NO KEY UPDATE NOWAIT", UNSAFE, "locks rows"),
    (
        "for key share skip locked",
        "SELECT * FROM orders FOR KEY SHARE SKIP LOCKED",
        UNSAFE,
        "locks rows",
    ),
    (
        "for update in a subquery",
        "SELECT * FROM (SELECT * FROM orders FOR UPDATE) x",
        UNSAFE,
        "locks rows",
    ),
    ("for share in exists", "SELECT EXISTS (SELECT 1 FROM orders FOR SHARE)", UNSAFE, "locks rows"),
    (
        "for update in a CTE",
        "WITH l AS (SELECT * FROM orders FOR UPDATE) SELECT 1",
        UNSAFE,
        "locks rows",
    ),
    (
        "for update in a scalar subquery",
        "SELECT (SELECT id FROM orders LIMIT 1 FOR UPDATE)",
        UNSAFE,
        "locks rows",
    ),
    (
        "explain analyze for update",
        "EXPLAIN ANALYZE SELECT * FROM orders FOR UPDATE",
        UNSAFE,
        "locks rows",
    ),
    (
        "explain analyze delete",
        "EXPLAIN ANALYZE DELETE FROM orders",
        UNSAFE,
        "EXPLAIN DELETE is refused",
    ),
    ("explain delete", "EXPLAIN DELETE FROM orders", UNSAFE, "EXPLAIN DELETE is refused"),
    (
        "explain analyze update",
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE orders SET amount = 0",
        UNSAFE,
        "EXPLAIN UPDATE is refused",
    ),
    (
        "explain analyze insert",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (0)",
        UNSAFE,
        "EXPLAIN INSERT is refused",
    ),
    (
        "explain analyze merge",
        "EXPLAIN ANALYZE MERGE INTO t USING t s ON t.id = s.id WHEN MATCHED THEN DELETE",
        UNSAFE,
        "EXPLAIN MERGE is refused",
    ),
    (
        "explain analyze create table as",
        "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
        UNSAFE,
        "EXPLAIN CREATE TABLE AS is refused",
    ),
    (
        "explain analyze execute",
        "EXPLAIN ANALYZE EXECUTE p",
        UNSAFE,
        "EXPLAIN EXECUTE is refused",
    ),
    (
        "explain declare",
        "EXPLAIN DECLARE c CURSOR FOR SELECT 1",
        UNSAFE,
        "EXPLAIN DECLARE is refused",
    ),
    # -- one plain query calling a function that changes state: refused by the guard
    # (before: the read-only transaction refused some, and rolled the others back)
    (
        "set_config read-write",
        "SELECT set_config('transaction_read_only', 'off', true)",
        UNSAFE,
        "set_config() is volatile",
    ),
    (
        "set_config read-write for the session",
        "SELECT set_config('transaction_read_only', 'off', false)",
        UNSAFE,
        "set_config() is volatile",
    ),
    ("nextval", "SELECT nextval('s')", UNSAFE, "nextval() is volatile"),
    ("setval", "SELECT setval('s', 1000)", UNSAFE, "setval() is volatile"),
    (
        "delete through query_to_xml",
        "SELECT query_to_xml('DELETE FROM orders', false, false, '')",
        UNSAFE,
        "query_to_xml() reaches other sessions, or runs SQL the guard cannot see",
    ),
    (
        "temp table through query_to_xml",
        "SELECT query_to_xml('CREATE TEMP TABLE x AS SELECT 1', false, false, '')",
        UNSAFE,
        "query_to_xml() reaches other sessions, or runs SQL the guard cannot see",
    ),
    # -- one SELECT that reaches other runs or the server (one role for every run):
    # signal or watch other sessions, take locks, write WAL, notify, touch files
    (
        "terminate the other runs",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        UNSAFE,
        "the query reads pg_stat_activity",
    ),
    (
        "cancel the other runs",
        "SELECT pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity",
        UNSAFE,
        "the query reads pg_stat_activity",
    ),
    ("terminate by pid", "SELECT pg_terminate_backend(1)", UNSAFE, "pg_terminate_backend()"),
    (
        "cancel by pid",
        "SELECT pg_catalog.pg_cancel_backend(1)",
        UNSAFE,
        "pg_catalog.pg_cancel_backend() is volatile",
    ),
    ("read other runs' SQL", "SELECT query FROM pg_stat_activity", UNSAFE, "pg_stat_activity"),
    (
        "read sessions, quoted schema",
        'SELECT * FROM "pg_catalog".pg_stat_activity',
        UNSAFE,
        "pg_stat_activity",
    ),
    ("sessions through TABLE", "TABLE pg_stat_activity", UNSAFE, "pg_stat_activity"),
    (
        "sessions through a function",
        "SELECT * FROM pg_stat_get_activity(NULL)",
        UNSAFE,
        "pg_stat_get_activity() reaches other sessions",
    ),
    (
        "another backend's SQL",
        "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
        UNSAFE,
        "reaches other sessions",
    ),
    ("the lock table", "SELECT * FROM pg_locks", UNSAFE, "the query reads pg_locks"),
    ("blocking pids", "SELECT pg_blocking_pids(1)", UNSAFE, "pg_blocking_pids() reaches other"),
    ("progress views", "SELECT * FROM pg_stat_progress_vacuum", UNSAFE, "pg_stat_progress_vacuum"),
    (
        "other sessions' statements",
        "SELECT query FROM pg_stat_statements",
        UNSAFE,
        "pg_stat_statements",
    ),
    (
        "session advisory lock",
        "SELECT pg_advisory_lock(7)",
        UNSAFE,
        "pg_advisory_lock() is volatile",
    ),
    (
        "shared and try advisory locks",
        "SELECT pg_advisory_lock_shared(8), pg_try_advisory_lock(9)",
        UNSAFE,
        "pg_advisory_lock_shared() is volatile",
    ),
    (
        "advisory lock storm",
        "SELECT count(pg_advisory_lock(g)) FROM generate_series(1, 6600) g",
        UNSAFE,
        "pg_advisory_lock() is volatile",
    ),
    ("setseed", "SELECT setseed(0.5)", UNSAFE, "setseed() is volatile"),
    (
        "setseed in a CTE",
        "WITH s AS (SELECT setseed(0.1)) SELECT random() FROM s",
        UNSAFE,
        "setseed() is volatile",
    ),
    (
        "WAL flood",
        "SELECT pg_logical_emit_message(true, 'x', repeat('x', 1000000))",
        UNSAFE,
        "pg_logical_emit_message() is volatile",
    ),
    ("notify from a query", "SELECT pg_notify('pwned', 'x')", UNSAFE, "pg_notify() is volatile"),
    (
        "session setting",
        "SELECT set_config('search_path', 'pg_catalog', false)",
        UNSAFE,
        "set_config() is volatile",
    ),
    (
        "role setting",
        "SELECT set_config('role', 'pg_read_all_data', false)",
        UNSAFE,
        "set_config() is volatile",
    ),
    ("large object import", "SELECT lo_import('/etc/passwd')", UNSAFE, "lo_import() is volatile"),
    ("large object", "SELECT lo_create(0)", UNSAFE, "lo_create() is volatile"),
    ("large object data", "SELECT data FROM pg_largeobject", UNSAFE, "pg_largeobject"),
    ("read a file", "SELECT pg_read_file('postgresql.conf')", UNSAFE, "pg_read_file() is volatile"),
    ("list a directory", "SELECT * FROM pg_ls_dir('.')", UNSAFE, "pg_ls_dir() is volatile"),
    ("config file", "SELECT * FROM pg_file_settings", UNSAFE, "pg_file_settings"),
    (
        "any SQL through query_to_xml",
        "SELECT query_to_xml('select pg_advisory_lock(10)', false, false, '')",
        UNSAFE,
        "query_to_xml() reaches other sessions",
    ),
    (
        "sessions through table_to_xml",
        "SELECT table_to_xml('pg_stat_activity', false, false, '')",
        UNSAFE,
        "table_to_xml() reaches other sessions",
    ),
    (
        "SQL through ts_stat",
        "SELECT * FROM ts_stat('select to_tsvector(query) from pg_stat_activity')",
        UNSAFE,
        "ts_stat() reaches other sessions",
    ),
    (
        "dblink",
        "SELECT * FROM dblink('dbname=postgres', 'delete from orders') AS t(a int)",
        UNSAFE,
        "dblink() reaches other sessions",
    ),
    ("sleep via unknown function", "SELECT no_such_function(1)", UNSAFE, "not a function the"),
]


CORPUS_SQL = """
create table t (id int primary key);
insert into t select generate_series(1, 20);
create sequence s;
create procedure cleanup() language sql as $$ delete from orders $$;
create materialized view mv as select 1 as one;
"""
T_CHECKSUM = (
    "select md5(string_agg(id::text, ',' order by id)) || (select last_value::text from s) from t"
)

#: The state of one pooled session, read by that session: what a statement could leave
#: behind on a connection that goes back to the pool for the next run.
SESSION_STATE = """
select pg_backend_pid(), current_user::text, session_user::text,
  (select count(*) from pg_class where relpersistence = 't'
     and relnamespace = pg_my_temp_schema()) as temp_tables,
  (select count(*) from pg_prepared_statements where from_sql) as prepared,
  (select count(*) from pg_cursors) as cursors,
  (select count(*) from pg_listening_channels()) as channels,
  (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())
     as advisory_locks,
  current_setting('search_path'), current_setting('work_mem'),
  current_setting('statement_timeout'), current_setting('default_transaction_read_only'),
  current_setting('role'), current_setting('TimeZone'), current_setting('application_name'),
  (select md5(string_agg(name || '=' || setting, ',' order by name)) from pg_settings)
"""


@dataclass
class Corpus:
    """One database and one manager (one pooled connection) for a whole corpus run."""

    db: Database
    mgr: lsc.ExecutionConnectionManager
    admin: Any
    baseline: tuple[Any, ...]

    def checksum(self) -> tuple[str, str]:
        with self.admin.cursor() as cur:
            cur.execute(PG_CHECKSUM)
            data = str(cur.fetchone()[0])
            cur.execute(T_CHECKSUM)
            return data, str(cur.fetchone()[0])

    def session_state(self) -> tuple[Any, ...]:
        """The state of the pooled session as the next run that checks it out finds it."""
        with lsc.ExecutionScope(manager=self.mgr):
            engine = lsc.get_scoped_engine(manager=self.mgr)
            with engine.connect() as conn:
                return self.probe(conn)

    def probe(self, conn: Any) -> tuple[Any, ...]:
        """SESSION_STATE read on ``conn``, plus what the server sees of its backend."""
        row = tuple(conn.exec_driver_sql(SESSION_STATE).one())
        conn.rollback()
        with self.admin.cursor() as cur:
            cur.execute(
                "select (select count(*) from pg_locks where pid = %s and locktype = 'advisory'),"
                " (select count(*) from pg_class where relpersistence = 't'),"
                " (select count(*) from pg_stat_activity where pid = %s and state <> 'idle')",
                (row[0], row[0]),
            )
            return (*row, *cur.fetchone())


@pytest.fixture(scope="module")
def corpus_db(pg_server: Server) -> Iterator[Database]:
    name = f"lsc_ro_{uuid.uuid4().hex[:10]}"
    admin = pg_server.admin()
    with admin.cursor() as cur:
        cur.execute(f'create database "{name}"')
    admin.close()
    conn = pg_server.admin(name)
    with conn.cursor() as cur:
        cur.execute(SAMPLE_SQL + CORPUS_SQL)
    conn.close()
    try:
        yield Database(pg_server, name, pg_server.url_for(name))
    finally:
        admin = pg_server.admin()
        with admin.cursor() as cur:
            cur.execute(f'drop database if exists "{name}" with (force)')
        admin.close()


@pytest.fixture(scope="module", params=["psycopg2", "psycopg"])
def corpus(request: pytest.FixtureRequest, corpus_db: Database) -> Iterator[Corpus]:
    """A manager with ONE connection, so every checkout is the same server session."""
    mgr = lsc.ExecutionConnectionManager(
        corpus_db.url_with(request.param), max_connections=1, pool_timeout=5
    )
    admin = corpus_db.server.admin(corpus_db.name)
    try:
        env = Corpus(corpus_db, mgr, admin, ())
        env.baseline = env.session_state()
        assert env.baseline[3:8] == (0, 0, 0, 0, 0), env.baseline
        assert env.baseline[1] == env.baseline[2]  # current_user = session_user
        yield env
        assert_clean(mgr)
        assert mgr.get_stats()["connections_opened"] == 1, "the session was replaced"
    finally:
        mgr.close()
        admin.close()


def _assert_untouched(corpus: Corpus, before: tuple[str, str]) -> None:
    assert corpus.checksum() == before
    assert corpus.session_state() == corpus.baseline


@pytest.mark.parametrize(
    ("query", "error", "words"),
    [pytest.param(q, e, w, id=i) for i, q, e, w in HOSTILE_PG],
)
def test_hostile_query_is_refused_on_postgres(
    corpus: Corpus, query: str, error: type[Exception], words: str
) -> None:
    before = corpus.checksum()
    with lsc.ExecutionScope(manager=corpus.mgr):
        db = lsc.get_scoped_sql_database(manager=corpus.mgr, read_only=True)
        with pytest.raises(error) as caught:
            db.run(query)
        message = str(caught.value)
        assert words in message, message
        assert "read-only" in message or "query" in message, message
        answer = db.run_no_throw(query)
        assert isinstance(answer, str)
        assert answer.startswith("Error: "), answer
        assert words in answer, answer
        # the connection is still good for the next query of the same run
        assert db.run("select count(*) from orders") == "[(500,)]"
    _assert_untouched(corpus, before)


def test_hostile_corpus_is_large_and_distinct() -> None:
    assert len(HOSTILE_PG) >= 150
    assert len({i for i, *_ in HOSTILE_PG}) == len(HOSTILE_PG), "duplicate ids"
    assert len({q for _, q, *_ in HOSTILE_PG}) == len(HOSTILE_PG), "duplicate queries"


#: Leftovers a statement could leave on a pooled session; the probe must see each one.
LEFTOVERS = [
    "create temp table leftover (a int)",
    "prepare leftover as select 1",
    "declare leftover cursor with hold for select 1",
    "listen leftover",
    "select pg_advisory_lock(77)",
    "set role pg_read_all_data",
    "set session authorization pg_read_all_data",
    "set search_path = pg_catalog",
    "set work_mem = '64kB'",
    "set statement_timeout = 1234",
    "set enable_seqscan = off",
]


@pytest.mark.parametrize("leftover", LEFTOVERS)
def test_the_session_probe_sees_each_leftover(corpus: Corpus, leftover: str) -> None:
    """The state check can fail: a leftover on the session is reported by the probe.

    Probed on the same checkout, so a pool that cleans sessions on check-in cannot hide it.
    """
    with lsc.ExecutionScope(manager=corpus.mgr):
        engine = lsc.get_scoped_engine(manager=corpus.mgr)
        with engine.connect() as conn:
            conn.exec_driver_sql(leftover)
            conn.commit()
            try:
                assert corpus.probe(conn) != corpus.baseline
            finally:
                auto = conn.execution_options(isolation_level="AUTOCOMMIT")
                auto.exec_driver_sql("discard all")
            assert corpus.probe(conn) == corpus.baseline
    assert corpus.session_state() == corpus.baseline


def test_the_reported_bypass_leaves_every_row(corpus: Corpus) -> None:
    query = "SELECT 1 AS €$a$; COMMIT; DELETE FROM t; SELECT 1 AS €$a$"
    with corpus.admin.cursor() as cur:
        cur.execute("select count(*) from t")
        assert cur.fetchone()[0] == 20
    with lsc.ExecutionScope(manager=corpus.mgr):
        db = lsc.get_scoped_sql_database(manager=corpus.mgr, read_only=True)
        with pytest.raises(UnsafeQueryError, match="holds 4 statements"):
            db.run(query)
        assert db.run_no_throw(query).startswith("Error: the query holds 4 statements")
    with corpus.admin.cursor() as cur:
        cur.execute("select count(*) from t")
        assert cur.fetchone()[0] == 20


#: Queries a model sends that must keep working.
BENIGN_PG: list[tuple[str, str]] = [
    ("select count(*) from orders", "[(500,)]"),
    (
        "SELECT c.name, sum(o.amount) AS total FROM customers c JOIN orders o "
        "ON o.customer_id = c.id WHERE c.id = 1 GROUP BY c.name",
        "[('customer 1', Decimal(",
    ),
    ("WITH big AS (SELECT * FROM orders WHERE amount > 90) SELECT count(*) FROM big", "[(35,)]"),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
        "SELECT sum(n) FROM r",
        "[(6,)]",
    ),
    (
        "SELECT id, rank() OVER (PARTITION BY customer_id ORDER BY amount DESC) FROM orders "
        "WHERE customer_id = 2 ORDER BY id LIMIT 1",
        "[(1, ",
    ),
    ("VALUES (1, 'a'), (2, 'b')", "[(1, 'a'), (2, 'b')]"),
    ("TABLE customers LIMIT 1", "[(1, 'customer 1', 'Oslo')]"),
    ("(SELECT 1) UNION ALL (SELECT 2) ORDER BY 1", "[(1,), (2,)]"),
    ("EXPLAIN SELECT * FROM orders", "Seq Scan"),
    ("EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM orders", "Aggregate"),
    ("EXPLAIN (FORMAT JSON) SELECT 1", "Plan"),
    ("SHOW search_path", '"$user", public'),
    ("SELECT ';' AS semi, $$;$$ AS dollar -- a comment; DROP\n", "[(';', ';')]"),
    ("SELECT $a$ $$ ; DELETE FROM t; $$ $a$", "DELETE FROM t"),
    ("SELECT 'it''s' AS a, E'tab\\there' AS b, '\\\\' AS c", "it's"),
    ('SELECT 1 AS "€$a$", 2 AS "a;b", 3 AS "x""y"', "[(1, 2, 3)]"),
    ("SELECT 1 AS €$a$", "[(1,)]"),
    ("SELECT 1 AS café", "[(1,)]"),
    ("SELECT 1 /* a /* nested */ comment */ + 1 -- trailing\r", "[(2,)]"),
    ("select 1 ; -- one statement and a comment", "[(1,)]"),
    # a form feed does not end a line comment: the DELETE is part of the comment
    ("SELECT 1 --x\f; DELETE FROM orders", "[(1,)]"),
    ("SELECT count(*) FROM orders WHERE created > now() - interval '10 years'", "[(500,)]"),
    ("SELECT EXISTS (SELECT 1 FROM customers WHERE city = 'Oslo')", "[(True,)]"),
    ("SELECT x::int FROM generate_series(1, 2) x", "[(1,), (2,)]"),
    ("SELECT current_setting('transaction_read_only')", "[('on',)]"),
    ("SELECT U&'d\\0061t\\+000061' AS u", "[('data',)]"),
    # ordinary analytics: functions the server marks immutable or stable, and the few
    # harmless volatile ones (random, clock_timestamp, gen_random_uuid)
    (
        "SELECT customer_id, amount, sum(amount) OVER (PARTITION BY customer_id ORDER BY id) "
        "AS running, lag(amount) OVER (ORDER BY id) FROM orders WHERE customer_id = 3 "
        "ORDER BY id LIMIT 1",
        "[(3, Decimal(",
    ),
    (
        "SELECT date_trunc('month', created)::date AS m, count(*) FROM orders "
        "GROUP BY 1 ORDER BY 1 LIMIT 1",
        "[(datetime.date(2024, 1, 1), ",
    ),
    (
        "SELECT extract(year FROM created), to_char(created, 'YYYY-MM'), "
        "age(date '2025-01-01', created) > interval '0' FROM orders ORDER BY id LIMIT 1",
        "2024-01",
    ),
    (
        "SELECT upper(name), lower(city), concat(name, '/', city), substring(name from 1 for 8), "
        "trim('  x '), regexp_replace(name, '[0-9]+', '#'), length(name), left(city, 2) "
        "FROM customers ORDER BY id LIMIT 1",
        "'CUSTOMER 1'",
    ),
    (
        "SELECT CAST(amount AS int), amount::text, '42'::numeric + 1, round(amount, 0) "
        "FROM orders ORDER BY id LIMIT 1",
        "Decimal('43')",
    ),
    (
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount), "
        "string_agg(DISTINCT city, ',' ORDER BY city), "
        "json_agg(orders.id ORDER BY orders.id)::text LIKE '[1,%' "
        "FROM orders JOIN customers ON customers.id = orders.customer_id",
        "'Lima,Oslo,Pune'",
    ),
    ("SELECT count(*) FROM (SELECT * FROM orders ORDER BY random() LIMIT 5) s", "[(5,)]"),
    (
        "SELECT clock_timestamp() >= now() AS a, gen_random_uuid() IS NOT NULL AS b, "
        "random() BETWEEN 0 AND 1 AS c",
        "[(True, True, True)]",
    ),
    ("SELECT sum(g) FROM generate_series(1, 10) g", "[(55,)]"),
    ("SELECT coalesce(NULL, 'x'), nullif(1, 1), greatest(1, 3, 2)", "[('x', None, 3)]"),
    ("SELECT current_date = now()::date AS a, version() LIKE 'PostgreSQL%' AS b", "[(True, True)]"),
    ("SELECT pg_size_pretty(1024::bigint), current_database() <> ''", "[('1024 bytes', True)]"),
    (
        "EXPLAIN SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id",
        "on customers c",
    ),  # whatever plan: a join, a nested loop
]


@pytest.mark.parametrize(
    ("query", "expected"), [pytest.param(q, e, id=q[:40]) for q, e in BENIGN_PG]
)
def test_benign_queries_still_run(corpus: Corpus, query: str, expected: str) -> None:
    before = corpus.checksum()
    assert check_read_only_sql(query)
    with lsc.ExecutionScope(manager=corpus.mgr):
        db = lsc.get_scoped_sql_database(manager=corpus.mgr, read_only=True)
        answer = db.run(query)
    assert expected in str(answer), answer
    _assert_untouched(corpus, before)


# -- hypothesis: random splices around COMMIT; DELETE ----------------------------------

_TRICKS = [
    *NON_ASCII.values(),
    "$",
    "$a$",
    "$$",
    "$_1$",
    "$b$",
    "a$",
    "'",
    "''",
    '"',
    "E'",
    "e'",
    "U&'",
    'U&"',
    "\\",
    "\\'",
    "--",
    "\r",
    "\n",
    "/*",
    "*/",
    ";",
    " ",
    "(",
    ")",
    "AS",
    "SELECT",
    "1",
    "x",
    "::",
]
_fragment = st.lists(st.sampled_from(_TRICKS), max_size=6).map("".join)


@st.composite
def _spliced(draw: st.DrawFn) -> str:
    head, tail, mid = draw(_fragment), draw(_fragment), draw(_fragment)
    ident = draw(st.text(alphabet="aé€·§°😀\u00a0$_1", max_size=4))
    return f"SELECT 1 AS {ident}{head}; {mid}COMMIT; DELETE FROM orders; SELECT 1 AS {ident}{tail}"


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(query=_spliced())
def test_spliced_commit_delete_changes_nothing(corpus: Corpus, query: str) -> None:
    before = corpus.checksum()
    with lsc.ExecutionScope(manager=corpus.mgr):
        db = lsc.get_scoped_sql_database(manager=corpus.mgr, read_only=True)
        db.run_no_throw(query)
    _assert_untouched(corpus, before)


_ALLOWED_TOP = {"SelectStmt", "ExplainStmt", "VariableShowStmt"}
_GUARD_PIECES = [
    *_TRICKS,
    "COMMIT",
    "DELETE FROM orders",
    "SELECT 1",
    "WITH d AS (",
    "DELETE FROM t RETURNING 1)",
    "FOR UPDATE",
    "FOR SHARE",
    "INTO x",
    "FROM t",
    "EXPLAIN",
    "ANALYZE",
    "SHOW",
    "SET x = 1",
    "VALUES (1)",
    "TABLE t",
    "UNION",
    "INSERT INTO t VALUES (1)",
    "(SELECT 1)",
    "LOCK t",
]


def _json_nodes(tree: Any) -> Iterator[tuple[str, Any]]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


@settings(max_examples=1500, deadline=None)
@given(
    sql=st.lists(st.sampled_from(_GUARD_PIECES) | st.text(max_size=3), min_size=1, max_size=12).map(
        " ".join
    )
    | st.lists(st.sampled_from(_GUARD_PIECES), min_size=1, max_size=12).map("".join)
)
def test_guard_accepts_only_one_plain_query(sql: str) -> None:
    from pglast.parser import parse_sql_json, scan

    try:
        returned = check_read_only_sql(sql)
    except UnsafeQueryError:
        return
    statements = json.loads(parse_sql_json(sql))["stmts"]
    assert len(statements) == 1, sql
    top = next(iter(statements[0]["stmt"]))
    assert top in _ALLOWED_TOP, sql
    for key, value in _json_nodes(statements[0]["stmt"]):
        assert key not in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"), sql
        assert key not in ("intoClause", "lockingClause"), sql
        assert not key.endswith("Stmt") or key in _ALLOWED_TOP, sql
        if top == "ExplainStmt" and key == "ExplainStmt":
            assert next(iter(value["query"])) == "SelectStmt", sql

    # what goes to the server is the same statement, token for token
    def code(text: str) -> list[tuple[str, str]]:
        return [
            (t.name, text[t.start : t.end + 1])
            for t in scan(text)
            if t.name not in ("SQL_COMMENT", "C_COMMENT", "ASCII_59")
        ]

    assert code(returned) == code(sql), sql
    # PostgreSQL's white space only: a trailing U+00A0 is an identifier (an alias) there
    assert returned.strip(" \t\n\r\f\v") == returned


# -- the rest of the PostgreSQL read-only path ------------------------------------------


def _checksum(db: Database) -> str:
    return str(db.query(PG_CHECKSUM)[0][0])


def test_reads_run_in_a_read_only_transaction_with_a_timeout(
    manager: lsc.ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True, statement_timeout=1.5)
        assert db.read_only
        assert db.run("select current_setting('transaction_read_only')") == "[('on',)]"
        assert db.run("show statement_timeout") == "[('1500ms',)]"
        assert db.run("TABLE customers LIMIT 1") == "[(1, 'customer 1', 'Oslo')]"
        assert db.run("VALUES (1), (2)") == "[(1,), (2,)]"
        assert "Seq Scan" in db.run("EXPLAIN SELECT * FROM orders")
        assert db.run("SELECT ';' AS semi, $$;$$ AS dollar -- a comment; DROP\n") == (
            "[(';', ';')]"
        )
        assert db.run("SELECT 'O''Brien' AS a, E'tab\\there' AS b, '\\\\' AS c") == (
            "[(\"O'Brien\", 'tab\\there', '\\\\\\\\')]"
        )
        # the same SQLDatabase of this run, not another one
        assert lsc.get_scoped_sql_database(read_only=True, statement_timeout=1.5) is db
        writable = lsc.get_scoped_sql_database()
        assert not writable.read_only
        assert writable.run("select current_setting('transaction_read_only')") == "[('off',)]"


def test_session_settings_a_query_tries_to_change_are_refused(
    manager: lsc.ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        for setting in ("application_name', 'pwned", "statement_timeout', '0"):
            answer = db.run_no_throw(f"select set_config('{setting}', false)")
            assert answer.startswith("Error: set_config() is volatile"), answer
        answer = db.run_no_throw("select set_config('default_transaction_read_only', 'off', false)")
        assert answer.startswith("Error: "), answer
        # the pooled connection keeps none of it
        assert db.run("select current_setting('application_name')") == (
            "[('langgraph_scoped_conn',)]"
        )
        assert db.run("show statement_timeout") == "[('30s',)]"
    rows = pg_db.query(
        "select application_name from pg_stat_activity where datname = current_database() "
        "and application_name <> 'lsc-test-admin' and backend_type = 'client backend'"
    )
    assert rows, "the pooled connection is gone"
    assert {r[0] for r in rows} == {"langgraph_scoped_conn"}


def test_session_advisory_locks_are_refused_and_none_is_held(
    manager: lsc.ExecutionConnectionManager, pg_db: Database
) -> None:
    """pg_advisory_lock would outlive the read-only transaction's rollback: it is refused."""
    locks = "select count(*) from pg_locks where locktype = 'advisory'"
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        for query in (
            "select pg_advisory_lock(42)",
            "select query_to_xml('select pg_try_advisory_lock_shared(43)', false, false, '')",
            "select pg_advisory_lock(44), 1/0",
            "select pg_try_advisory_xact_lock(45)",
        ):
            with pytest.raises(UnsafeQueryError):
                db.run(query)
            assert pg_db.query(locks) == [(0,)]
        assert db.run("select 1") == "[(1,)]"
    assert pg_db.query(locks) == [(0,)]


def test_statement_timeout_stops_a_slow_read(
    manager: lsc.ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True, statement_timeout=0.2)
        with pytest.raises(DBAPIError, match="statement timeout"):
            db.run("select pg_sleep(30)")
        answer = db.run_no_throw("select pg_sleep(30)")
        assert answer.startswith("Error: ") and "statement timeout" in answer
        assert db.run("select 1") == "[(1,)]"
    assert (
        pg_db.query(
            "select count(*) from pg_stat_activity where query like '%pg_sleep(30)%'"
            " and state = 'active' and pid <> pg_backend_pid()"
        )[0][0]
        == 0
    )


def test_manager_wide_read_only_default(pg_db: Database) -> None:
    mgr = lsc.ExecutionConnectionManager(pg_db.url, read_only=True, max_connections=2)
    before = _checksum(pg_db)
    try:
        with lsc.ExecutionScope(manager=mgr):
            db = lsc.get_scoped_sql_database(manager=mgr)
            assert db.read_only
            assert "Error: " in db.run_no_throw("DELETE FROM orders")
            # the guard refuses a data-modifying WITH before the database sees it
            with pytest.raises(UnsafeQueryError, match="data-modifying DELETE"):
                db.run("WITH d AS (DELETE FROM orders RETURNING 1) SELECT 1")
            # an explicit read_only=False overrides the default for trusted code
            assert not lsc.get_scoped_sql_database(manager=mgr, read_only=False).read_only
        assert_clean(mgr)
    finally:
        mgr.close()
    assert _checksum(pg_db) == before


def test_each_read_only_choice_keeps_its_own_ready_copy(pg_db: Database) -> None:
    """read_only=True and read_only=False, asked for in turn over many executions (each
    kind made ready after its first), never hand one kind's database for the other."""
    mgr = lsc.ExecutionConnectionManager(pg_db.url, max_connections=2)
    before = _checksum(pg_db)
    try:
        for i in range(6):
            with lsc.ExecutionScope(manager=mgr):
                guarded = lsc.get_scoped_sql_database(manager=mgr, read_only=True)
                trusted = lsc.get_scoped_sql_database(manager=mgr, read_only=i % 2 == 0)
                plain = lsc.get_scoped_sql_database(manager=mgr)
                assert guarded.read_only and not plain.read_only
                assert trusted.read_only is (i % 2 == 0)
                assert "Error: " in guarded.run_no_throw("DELETE FROM orders WHERE id = -1")
                assert plain.run("SELECT count(*) FROM orders") == "[(500,)]"
            assert_clean(mgr)
        with (  # an override of a cap is still checked
            lsc.ExecutionScope(manager=mgr),
            pytest.raises(lsc.ConfigurationError, match="max_result_rows"),
        ):
            lsc.get_scoped_sql_database(manager=mgr, read_only=True, max_result_rows=0)
    finally:
        mgr.close()
    assert _checksum(pg_db) == before


def test_read_only_refuses_non_text_statements(manager: lsc.ExecutionConnectionManager) -> None:
    from sqlalchemy import text

    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        with pytest.raises(ReadOnlyViolationError, match="SQL text only"):
            db.run(text("select 1"))


class _State(TypedDict):
    query: str
    answer: str


@tool
def _sql_tool(query: str, config: RunnableConfig) -> str:
    """Run one read-only SQL query."""
    return str(lsc.get_scoped_sql_database(config, read_only=True).run_no_throw(query))


def _graph() -> Any:
    def node(state: _State, config: RunnableConfig) -> dict[str, str]:
        return {"answer": _sql_tool.invoke({"query": state["query"]}, config)}

    builder = StateGraph(_State)
    builder.add_node("sql", node)
    builder.add_edge(START, "sql")
    builder.add_edge("sql", END)
    return lsc.with_scoped_connections(builder.compile())


async def test_a_tool_in_a_real_graph_hands_refusals_to_the_model(
    manager: lsc.ExecutionConnectionManager, pg_db: Database
) -> None:
    graph = _graph()
    before = _checksum(pg_db)
    # the guard's refusals: they do not depend on what the database holds
    for _, query, error, words in HOSTILE_PG:
        if error is not UNSAFE:
            continue
        out = await graph.ainvoke({"query": query, "answer": ""})
        assert out["answer"].startswith("Error: "), (query, out["answer"])
        assert words in out["answer"], (query, out["answer"])
    ok = graph.invoke({"query": "select count(*) from customers", "answer": ""})
    assert ok["answer"] == "[(50,)]"
    assert _checksum(pg_db) == before
    manager.drain()
    assert manager.get_stats()["connections_in_use"] == 0


# -- SQLite ---------------------------------------------------------------------------

HOSTILE_SQLITE: list[tuple[str, str, type[Exception], str]] = [
    ("drop", "DROP TABLE orders", UNSAFE, "DROP statements"),
    ("update", "UPDATE orders SET amount = 0", UNSAFE, "UPDATE statements"),
    ("insert", "INSERT INTO customers VALUES (999, 'x', 'y')", UNSAFE, "INSERT statements"),
    ("replace", "REPLACE INTO customers VALUES (1, 'x', 'y')", UNSAFE, "REPLACE statements"),
    ("delete", "DELETE FROM orders", UNSAFE, "DELETE statements"),
    (
        "create temp table",
        "CREATE TEMP TABLE x AS SELECT * FROM orders",
        UNSAFE,
        "CREATE statements",
    ),
    ("two statements", "SELECT 1; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("commit then drop", "COMMIT; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("begin", "BEGIN", UNSAFE, "BEGIN statements"),
    ("savepoint", "SAVEPOINT a", UNSAFE, "SAVEPOINT statements"),
    ("query_only off", "PRAGMA query_only = OFF", UNSAFE, "PRAGMA statements"),
    ("writable_schema", "PRAGMA writable_schema = 1", UNSAFE, "PRAGMA statements"),
    ("pragma then delete", "PRAGMA query_only=0; DELETE FROM orders", UNSAFE, "holds 2"),
    ("attach", "ATTACH DATABASE '/tmp/x.db' AS x", UNSAFE, "ATTACH statements"),
    ("detach", "DETACH DATABASE main", UNSAFE, "DETACH statements"),
    ("vacuum into", "VACUUM INTO '/tmp/copy.db'", UNSAFE, "VACUUM statements"),
    ("reindex", "REINDEX", UNSAFE, "REINDEX statements"),
    ("analyze", "ANALYZE", UNSAFE, "ANALYZE statements"),
    ("very long", "SELECT " + " + ".join(["1"] * 10_000), UNSAFE, "above the limit"),
    ("nul byte", "SELECT 1\x00; DELETE FROM orders", UNSAFE, "NUL character"),
    ("empty", " ; -- nothing", UNSAFE, "the query is empty"),
    ("comment hides ;", "SELECT 1 /* ; */ ; DELETE FROM orders", UNSAFE, "holds 2"),
    # SQLite has no dollar quoting, and "$" and non-ASCII characters continue a name
    (
        "non-ASCII dollar",
        "SELECT 1 AS €$a$; DELETE FROM orders; SELECT 1 AS €$a$",
        UNSAFE,
        "holds 3 statements",
    ),
    (
        "emoji dollar",
        "SELECT 1 AS 😀$$; DELETE FROM orders; SELECT 1 AS 😀$$",
        UNSAFE,
        "holds 3 statements",
    ),
    ("no-break space dollar", "SELECT 1 AS \u00a0$_1$; DELETE FROM orders", UNSAFE, "holds 2"),
    ("dollars are not quotes", "SELECT $$; DELETE FROM orders; SELECT $$", UNSAFE, "holds 3"),
    ("tcl variable", "SELECT $a(;DELETE FROM orders)", UNSAFE, "holds 2"),
    # comments are not nested and end only at a newline
    ("comments are not nested", "SELECT 1 /* /* */ ; DELETE FROM orders /* */", UNSAFE, "holds 2"),
    ("unterminated comment", "SELECT 1 /* ; DELETE FROM orders", UNSAFE, "inside a /* comment"),
    # no backslash escapes: 'a\' is a whole string
    ("backslash is not an escape", "SELECT 'a\\'; DELETE FROM orders; --'", UNSAFE, "holds 2"),
    ("bracket identifier", "SELECT [a;b]]; DELETE FROM orders; --]", UNSAFE, "holds 2"),
    ("backtick identifier", "SELECT `a``;`; DELETE FROM orders", UNSAFE, "holds 2"),
    ("double-quoted identifier", 'SELECT "a"";"; DELETE FROM orders', UNSAFE, "holds 2"),
    ("unterminated string", "SELECT '; DELETE FROM orders", UNSAFE, "inside a string"),
    ("unterminated bracket", "SELECT [a; DELETE FROM orders", UNSAFE, "quoted identifier"),
    (
        "CTE then delete",
        "WITH x AS (SELECT 1) DELETE FROM orders WHERE id IN (SELECT * FROM x)",
        READ_ONLY,
        "refused",
    ),
    (
        "CTE then insert",
        "WITH x AS (SELECT 1) INSERT INTO orders SELECT 9, 1, 1, 'x' FROM x",
        READ_ONLY,
        "refused",
    ),
    ("select into", "SELECT * INTO stolen FROM customers", DBAPIError, "syntax error"),
]

BENIGN_SQLITE: list[tuple[str, str]] = [
    ("select count(*) from orders", "[(2,)]"),
    ("SELECT 1 AS [a;b], 2 AS `c;d`, 3 AS \"e;f\", ';' AS g", "[(1, 2, 3, ';')]"),
    ("SELECT 1 AS €$a$", "[(1,)]"),
    ("SELECT 'a\\' AS backslash", "[('a\\\\',)]"),
    ("SELECT 1 --x\r; DELETE FROM orders", "[(1,)]"),
    ("WITH c AS (SELECT city FROM customers) SELECT count(*) FROM c", "[(2,)]"),
    ("VALUES (1), (2)", "[(1,), (2,)]"),
    ("EXPLAIN QUERY PLAN SELECT * FROM orders", "SCAN"),
    ("EXPLAIN DELETE FROM orders", "Init"),
]


@pytest.fixture
def sqlite_manager(tmp_path: Path) -> Iterator[tuple[lsc.ExecutionConnectionManager, Path]]:
    path = tmp_path / f"agent-{uuid.uuid4().hex[:6]}.db"
    con = sqlite3.connect(path)
    con.executescript(
        "create table customers (id int primary key, name text not null, city text not null);"
        "create table orders (id int primary key, customer_id int, amount real, created text);"
        "insert into customers values (1, 'a', 'Lima'), (2, 'b', 'Oslo');"
        "insert into orders values (1, 1, 10.5, '2024-01-01'), (2, 2, 3.5, '2024-01-02');"
    )
    con.commit()
    con.close()
    mgr = lsc.ExecutionConnectionManager(f"sqlite:///{path}", read_only=True, max_connections=1)
    try:
        yield mgr, path
        assert_clean(mgr)
    finally:
        mgr.close()


def _sqlite_checksum(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(
            "select 'c' || id || name || city from customers union all "
            "select 'o' || id || customer_id || amount || created from orders union all "
            "select 't' || name from sqlite_master order by 1"
        ).fetchall()
    finally:
        con.close()
    return "|".join(r[0] for r in rows)


def _sqlite_session(mgr: lsc.ExecutionConnectionManager) -> tuple[Any, ...]:
    """query_only, temp objects, attached databases and pragmas of the pooled connection."""
    with lsc.ExecutionScope(manager=mgr):
        engine = lsc.get_scoped_engine(manager=mgr)
        with engine.connect() as conn:
            return (
                conn.exec_driver_sql("PRAGMA query_only").scalar_one(),
                conn.exec_driver_sql("select count(*) from temp.sqlite_master").scalar_one(),
                conn.exec_driver_sql("select count(*) from pragma_database_list").scalar_one(),
                conn.exec_driver_sql("PRAGMA writable_schema").scalar_one(),
                conn.in_transaction() and conn.rollback(),
            )


@pytest.mark.parametrize(
    ("query", "error", "words"),
    [pytest.param(q, e, w, id=i) for i, q, e, w in HOSTILE_SQLITE],
)
def test_hostile_query_is_refused_on_sqlite(
    sqlite_manager: tuple[lsc.ExecutionConnectionManager, Path],
    query: str,
    error: type[Exception],
    words: str,
) -> None:
    mgr, path = sqlite_manager
    before = _sqlite_checksum(path)
    session = _sqlite_session(mgr)
    with lsc.ExecutionScope(manager=mgr):
        db = lsc.get_scoped_sql_database(manager=mgr)
        assert db.read_only
        with pytest.raises(error) as caught:
            db.run(query)
        assert words in str(caught.value), str(caught.value)
        answer = db.run_no_throw(query)
        assert answer.startswith("Error: "), answer
        assert db.run("select count(*) from orders") == "[(2,)]"
    assert _sqlite_checksum(path) == before
    assert _sqlite_session(mgr) == session
    assert mgr.get_stats()["connections_opened"] == 1


@pytest.mark.parametrize(("query", "expected"), BENIGN_SQLITE)
def test_benign_queries_run_on_sqlite(
    sqlite_manager: tuple[lsc.ExecutionConnectionManager, Path], query: str, expected: str
) -> None:
    mgr, path = sqlite_manager
    before = _sqlite_checksum(path)
    with lsc.ExecutionScope(manager=mgr):
        db = lsc.get_scoped_sql_database(manager=mgr)
        assert expected in str(db.run(query))
    assert _sqlite_checksum(path) == before


def test_sqlite_query_only_is_switched_off_after_each_statement(
    sqlite_manager: tuple[lsc.ExecutionConnectionManager, Path],
) -> None:
    mgr, path = sqlite_manager
    with lsc.ExecutionScope(manager=mgr):
        ro = lsc.get_scoped_sql_database(manager=mgr)
        assert ro.run("select name from customers where id = 1") == "[('a',)]"
        # trusted code of the same run writes through the same pooled connection
        rw = lsc.get_scoped_sql_database(manager=mgr, read_only=False)
        rw.run("update customers set name = 'z' where id = 1")
    assert mgr.get_stats()["connections_opened"] == 1
    con = sqlite3.connect(path)
    try:
        assert con.execute("select name from customers where id = 1").fetchone() == ("z",)
    finally:
        con.close()


# -- the guard alone --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("select 1", ["select 1"]),
        ("select 1;", ["select 1"]),
        ("select 1; select 2", ["select 1", "select 2"]),
        ("select ';'", ["select ';'"]),
        ("select 'it''s'; select 2", ["select 'it''s'", "select 2"]),
        ('select 1 as "a;b"', ['select 1 as "a;b"']),
        ("select [a;b], `c;d`", ["select [a;b], `c;d`"]),
        ("select 'a\\'; select 2", ["select 'a\\'", "select 2"]),
        # no dollar quoting in SQLite: "$" is part of a name or a $parameter
        ("select $$a;b$$", ["select $$a", "b$$"]),
        ("select €$a$; select 2", ["select €$a$", "select 2"]),
        ("select a$b from t; select 2", ["select a$b from t", "select 2"]),
        ("select 1 -- c;\n", ["select 1"]),
        ("select 1 -- c\r; select 2", ["select 1"]),
        ("select /* a /* b; */ c; */ 1", ["select   c", "*/ 1"]),
    ],
)
def test_split_sqlite_statements(sql: str, expected: list[str]) -> None:
    assert split_sqlite_statements(sql) == expected


def test_guard_error_names_the_limit_and_what_to_do() -> None:
    with pytest.raises(UnsafeQueryError, match=r"30001 characters long.*limit of 30000"):
        check_read_only_sql("x" * 30_001, max_length=30_000)
    with pytest.raises(UnsafeQueryError, match="must be a string"):
        check_read_only_sql(b"select 1")  # type: ignore[arg-type]
    assert check_read_only_sql("  (select 1)  ;") == "(select 1)"
    assert check_read_only_sql("/* why */ select 1 -- done\n;") == "select 1"
    assert check_read_only_sql("select 1 AS €$a$; ", dialect="sqlite") == "select 1 AS €$a$"
    with pytest.raises(
        UnsafeQueryError,
        match=r"not valid SQL: syntax error at or near .*"
        r"send one SELECT statement",
    ):
        check_read_only_sql("selec 1")
    with pytest.raises(UnsafeQueryError, match="cannot check mysql SQL"):
        check_read_only_sql("select 1", dialect="mysql")


def test_importing_the_package_does_not_load_pglast() -> None:
    import subprocess
    import sys

    code = (
        "import sys, langgraph_scoped_conn, langgraph_scoped_conn.guard; "
        "print('pglast' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out
