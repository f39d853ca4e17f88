"""Session fixtures: the real embedded services Weir ships with, started once per test session.

Set WEIR_KAFKA_BOOTSTRAP / WEIR_REDIS_URL / WEIR_POSTGRES_DSN to run the same
tests against external services instead.

The tests run the fraud shop (``examples/fraud_shop``) unless they declare a
project of their own: it is ``WEIR_PROJECT`` for the whole session, and this
process's schema catalog knows its schemas and generated contracts.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FRAUD_SHOP = "examples.fraud_shop.project:project"
os.environ.setdefault("WEIR_PROJECT", FRAUD_SHOP)
# every service a test (or a process it starts) runs takes a free port: the stable defaults are for a person's
# `weir up`, which may be running beside the tests; tests/test_ports.py checks the fixed ones
FREE_PORTS = {v: "0" for v in ("WEIR_KAFKA_PORT", "WEIR_REDIS_PORT", "WEIR_POSTGRES_PORT",
                                "WEIR_SCHEMA_REGISTRY_PORT", "WEIR_HEALTH_PORT")}
"""For the environment of a process a test starts with no other ``WEIR_`` setting."""
for _variable, _port in FREE_PORTS.items():
    os.environ.setdefault(_variable, _port)

from streams.project.contracts import use_project  # noqa: E402
from streams.project.load import load  # noqa: E402
from streams.project.spec import Project  # noqa: E402
from streams.settings import WeirSettings  # noqa: E402
from streams.stack import Endpoints, Stack  # noqa: E402

SHOP = load(FRAUD_SHOP)
use_project(SHOP)


@pytest.fixture(scope="session")
def shop() -> Project:
    """The fraud shop project (``examples/fraud_shop/project.py``)."""
    return SHOP


@pytest.fixture(scope="session")
def weir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weir")


@pytest.fixture(scope="session")
def chdb_path(weir_dir: Path) -> Path:
    """The one embedded ClickHouse directory of the session: chdb opens one path per process."""
    return weir_dir / "clickhouse"


@pytest.fixture
def clickhouse_client(chdb_path: Path, request: pytest.FixtureRequest) -> Any:
    """A clickhouse-connect client on a database of this test's own, in the session's chdb."""
    import clickhouse_connect

    database = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}").command(f"DROP DATABASE IF EXISTS {database}")
    clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}").command(f"CREATE DATABASE {database}")
    return clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}", database=database)


@pytest.fixture(scope="session")
def endpoints(weir_dir: Path) -> Iterator[Endpoints]:
    stack = Stack(WeirSettings(data_dir=weir_dir / "stack"), SHOP)
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def minimal(endpoints: Endpoints) -> Iterator[Project]:
    """The minimal project (``examples/minimal``), its topics created, known to this process's catalog and
    the session's registry for the test; the shop's again after it."""
    from streams import schemas
    from streams import topics as T
    from streams.kafka import ensure_topics

    project = load(str(Path(__file__).resolve().parent.parent / "examples/minimal/project.py"))
    ensure_topics(endpoints.kafka_bootstrap, T.all_topics(project), 4)
    previous = schemas.set_catalog(None)
    use_project(project)
    schemas.use_registry(endpoints.schema_registry_url)
    try:
        yield project
    finally:
        use_project(SHOP)
        schemas.set_catalog(previous)


@pytest.fixture(autouse=True)
def fail_on_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test fails when a background thread died of an exception it did not report."""
    errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    yield
    if errors:
        e = errors[0]
        pytest.fail(f"thread {e.thread.name if e.thread else '?'} raised {e.exc_type.__name__}: {e.exc_value}")
