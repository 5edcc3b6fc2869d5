"""A real PostgreSQL server for tests: Debian's packages (make install puts them there), on a Unix socket.

`initdb` into a temporary directory and `pg_ctl start` with no TCP listener at all, so parallel
runs never collide. PostgreSQL refuses to run as root: under root (CI) it runs as the `postgres`
user the Debian package creates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

START_TIMEOUT_S = 120  # generous: a loaded machine


def binary(name: str) -> str:
    """initdb and pg_ctl live under /usr/lib/postgresql/<version>/bin on Debian, off the PATH."""
    found = shutil.which(name)
    if found:
        return found
    root = Path("/usr/lib/postgresql")
    for version in sorted((p.name for p in root.iterdir() if p.name.isdigit()), key=int, reverse=True) if root.exists() else []:
        candidate = root / version / "bin" / name
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(f"{name} is not installed: `make install` installs Debian's postgresql")


class PostgresServer:
    """One postgres cluster in `directory`; `url` reaches its `lorag` database over the socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.sockets = directory / "sockets"
        self.url = f"postgresql://postgres@/lorag?host={self.sockets}"
        self._as_user: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> PostgresServer:
        self.sockets.mkdir(parents=True, exist_ok=True)
        if self._as_user:
            shutil.chown(self.directory, "postgres")
            shutil.chown(self.sockets, "postgres")
        if not self.data.exists():
            self._run(binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
        self._run(binary("pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "postgres.log"), "-w",
                  "-t", str(START_TIMEOUT_S), "-o", f"-c listen_addresses='' -k {self.sockets} -c fsync=off",
                  "start")
        self._run("psql", "-h", str(self.sockets), "-U", "postgres", "-d", "postgres", "-q", "-c",
                  "SELECT 1 FROM pg_database WHERE datname = 'lorag'", check_created=True)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.sql(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@/{name}?host={self.sockets}"

    def sql(self, statement: str) -> str:
        """Run one statement as the superuser (tests use it to cut connections)."""
        return self._run("psql", "-h", str(self.sockets), "-U", "postgres", "-d", "lorag", "-At", "-c", statement)

    def _run(self, *command: str, check_created: bool = False) -> str:
        if check_created:  # CREATE DATABASE has no IF NOT EXISTS: create it unless it is there
            exists = self._run(*command[:-1], "SELECT count(*) FROM pg_database WHERE datname = 'lorag'", "-At")
            if exists.strip() == "1":
                return exists
            command = (*command[:-1], "CREATE DATABASE lorag")
        done = subprocess.run([*self._as_user, *command], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                              cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

