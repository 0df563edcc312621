"""The studio database: the engine, migrations to the latest schema, and sessions.

SQLite in the data folder is the embedded default; PostgreSQL (`postgresql://...`, driven by psycopg 3) is the
database of a service spread over several processes (`flux2.studio.distributed`). The schema is owned by the
Alembic revisions in `migrations/`, so an existing database upgrades in place.
"""

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlmodel import Session

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# How long a SQLite writer waits for another one before "database is locked": writes here take milliseconds, so
# reaching this means something is stuck.
SQLITE_BUSY_TIMEOUT_S = 30
# Held while migrating a PostgreSQL database, so processes starting together upgrade it one after another
# (an arbitrary constant: the key of a transaction-level advisory lock).
MIGRATION_LOCK_KEY = 0x464C5558  # "FLUX"


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def sqlalchemy_url(url: str) -> str:
    """`url` with a driver SQLAlchemy can use: a bare `postgresql://` URL (as libpq and procrastinate take it)
    gets psycopg 3, the PostgreSQL driver this package depends on."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def libpq_url(url: str) -> str:
    """`url` as libpq takes it (psycopg, procrastinate): without SQLAlchemy's `+driver` part."""
    parsed = make_url(url)
    if not is_postgres(url):
        raise ValueError(f"database_url must be a PostgreSQL URL (postgresql://...), got {parsed.drivername}://")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite is set up for a threaded server: usable from any thread, WAL journal (readers
    never block the writer), foreign keys enforced, and writers wait for each other instead of failing."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(sqlalchemy_url(url), pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, connection_record: object) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; the WAL recipe SQLite recommends
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.close()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises. Objects stay readable after the
    commit (no expiry), so a route can return what it just saved."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str | None = None, script_location: Path = MIGRATIONS_DIR) -> Config:
    """The Alembic configuration of the studio database, built in code (there is no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # the option parser interpolates %
    return config


def upgrade(engine_or_url: Engine | str, revision: str = "head", *, script_location: Path = MIGRATIONS_DIR) -> None:
    """Migrate the database to `revision` (default: the latest), creating it if empty. Safe to run at every start:
    a database already there is left as it is. On SQLite the whole upgrade is one transaction."""
    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        with migration_connection(engine) as connection:
            config = alembic_config(script_location=script_location)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        if engine is not engine_or_url:
            engine.dispose()


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection to run migrations on, committed when the block ends.

    SQLite needs two things there that its Python driver does not do by itself:
    - foreign keys off while migrating: batch mode rebuilds a table by copying it and dropping the original, and
      dropping `project` with foreign keys on would cascade and delete every element and asset
      (https://www.sqlite.org/foreignkeys.html, section 5; the Alembic batch docs say the same);
    - a real transaction around the DDL (the driver autocommits DDL), so a failing revision leaves the database
      as it was rather than half migrated.
    Foreign keys are checked before the commit, so a revision cannot leave dangling references behind.
    """
    with engine.connect() as connection:
        if connection.dialect.name != "sqlite":
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            yield connection
            connection.commit()
            return
        driver = connection.connection.driver_connection
        isolation_level = driver.isolation_level
        driver.isolation_level = None  # the driver issues no BEGIN/COMMIT of its own; we do
        try:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield connection
                dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if dangling:
                    raise RuntimeError(f"the migration left rows with dangling foreign keys: {dangling[:5]}")
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
        finally:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
            driver.isolation_level = isolation_level
