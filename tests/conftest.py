"""Session fixtures: the real embedded services Weir ships with, started once per test session.

Set WEIR_KAFKA_BOOTSTRAP / WEIR_REDIS_URL / WEIR_POSTGRES_DSN to run the same
tests against external services instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack


@pytest.fixture(scope="session")
def weir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weir")


@pytest.fixture(scope="session")
def endpoints(weir_dir: Path) -> Iterator[Endpoints]:
    stack = Stack(WeirSettings(data_dir=weir_dir / "stack"))
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def fail_on_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test fails when a background thread died of an exception it did not report."""
    errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    yield
    if errors:
        e = errors[0]
        pytest.fail(f"thread {e.thread.name if e.thread else '?'} raised {e.exc_type.__name__}: {e.exc_value}")
