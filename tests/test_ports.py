"""Stable ports: the embedded services listen where the settings say, a restart keeps every endpoint, and a
port another process holds is refused with the setting to change (never a service Weir did not start)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.embedded._proc import PortInUse, claim_port, free_port
from streams.settings import WeirSettings
from streams.stack import Stack
from tests.conftest import FREE_PORTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_fixed_port_is_checked_and_zero_means_any(taken: int) -> None:
    with pytest.raises(PortInUse, match=rf"the broker cannot listen on 127\.0\.0\.1:{taken} \(.*\): another "
                                        r"process has it\. Set WEIR_X_PORT to a free port \(0: any free one\), or "
                                        r"WEIR_X_URL to use the service there instead of starting one"):
        claim_port(taken, "the broker", "WEIR_X_PORT", "WEIR_X_URL")
    port = free_port()
    assert claim_port(port, "the broker", "WEIR_X_PORT") == port
    assert claim_port(0, "the broker", "WEIR_X_PORT") > 0


def test_a_restart_keeps_every_endpoint(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("kafka_port", "redis_port", "schema_registry_port")}
    settings = WeirSettings(data_dir=tmp_path, **ports)  # type: ignore[arg-type]
    seen = []
    for _ in range(2):
        stack = Stack(settings, with_postgres=False)
        try:
            e = stack.start()
            seen.append((e.kafka_bootstrap, e.redis_url, e.schema_registry_url))
        finally:
            stack.stop()
    assert seen[0] == seen[1] == (f"127.0.0.1:{ports['kafka_port']}", f"redis://127.0.0.1:{ports['redis_port']}/0",
                                  f"http://127.0.0.1:{ports['schema_registry_port']}")


@pytest.mark.parametrize("variable", ["WEIR_KAFKA_PORT", "WEIR_REDIS_PORT", "WEIR_SCHEMA_REGISTRY_PORT",
                                      "WEIR_HEALTH_PORT"])
def test_weir_up_refuses_a_port_another_process_holds(variable: str, taken: int, tmp_path: Path) -> None:
    """Tried on an earlier Weir: an embedded valkey that could not bind its port left Weir writing into another
    process's Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS | {
        "WEIR_DATA_DIR": str(tmp_path), variable: str(taken)}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "--project", "examples.minimal.project:project",
                           "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("weir up: ") and f":{taken} (" in last and f"Set {variable} to a free port" in last, last
    assert "weir is up" not in done.stdout
