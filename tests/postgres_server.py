"""A throwaway PostgreSQL server for tests: Debian's package (installed if missing), a cluster initialised in a
temporary folder, listening on a free port of 127.0.0.1 with trust authentication, stopped and removed at the end.

The server refuses to run as root, so as root the cluster belongs to the `postgres` system user (the package
creates it) and its commands run through `runuser`.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "postgres"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PostgresServer:
    port: int
    database: str = "postgres"

    @property
    def url(self) -> str:
        """A libpq URL; the studio takes it as its database_url as it is."""
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{self.database}"

    def create_database(self, name: str) -> "PostgresServer":
        """A new, empty database on this server (one per test keeps tests apart)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return PostgresServer(self.port, name)


def server_bin() -> Path:
    """The folder of `initdb` and `pg_ctl`, installing Debian's postgresql package when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        if os.geteuid() != 0:
            raise RuntimeError("PostgreSQL is not installed and only root can install it: apt-get install postgresql")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env, capture_output=True)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(*command: str) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else list(command)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running server until the block ends."""
    bin_dir = server_bin()
    folder = Path(tempfile.mkdtemp(prefix="flux2-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, SERVER_USER)
    port = free_port()
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(_as_server_user(str(bin_dir / "initdb"), "-D", str(data), "-U", SERVER_USER, "-A", "trust",
                                   "--no-sync", "-E", "UTF8"), **run)  # fmt: skip
    # fsync off: a test server's data may be lost in a power cut; 200 connections: API and worker pools.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=200"
    ctl = str(bin_dir / "pg_ctl")
    try:
        subprocess.run(_as_server_user(ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w",
                                       "-t", str(START_TIMEOUT_S), "start"), **run)  # fmt: skip
        yield PostgresServer(port)
    finally:
        subprocess.run(_as_server_user(ctl, "-D", str(data), "-m", "immediate", "-w", "stop"), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
