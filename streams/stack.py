"""The services a Weir process talks to: embedded ones it starts, or external ones from settings.

``Stack.start()`` starts whatever is not configured (Tansu, valkey, chdb,
PostgreSQL, Weir's schema registry), creates the project's topics and Weir's
own, registers the schemas of both (Weir's ``schemas/``, the project's folder
and the subjects generated from it: this process's codecs then take their ids
from the registry, and an incompatible change fails here, with the registry's
explanation), and knows the endpoints; ``stop()``
stops what it started, in reverse order, leaving no child process behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streams import schemas
from streams import topics as T
from streams.embedded.reaper import EmbeddedService, Reaper
from streams.kafka import ensure_topics
from streams.project.contracts import use_project
from streams.project.plan import Plan, check, record_applied
from streams.project.spec import Project
from streams.settings import WeirSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """Where a person or a client finds each service (written to ``endpoints.json``)."""

    kafka_bootstrap: str
    redis_url: str
    clickhouse_dsn: str
    postgres_dsn: str
    schema_registry_url: str

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


class EndpointNotFound(LookupError):
    """Neither an explicit value nor ``endpoints.json`` says where a service is; the message says what to do."""


def endpoint(name: str, explicit: str | None, *, flag: str, data_dir: Path | None = None) -> str:
    """``explicit``, else the field ``name`` of ``<data_dir>/endpoints.json`` (written by ``weir up``;
    ``data_dir`` defaults to ``WEIR_DATA_DIR``). ``flag`` names the option a person can pass instead."""
    if explicit:
        return explicit
    path = (data_dir if data_dir is not None else WeirSettings().data_dir) / "endpoints.json"
    try:
        value = json.loads(path.read_text())[name]
    except FileNotFoundError:
        raise EndpointNotFound(f"no {name}: pass {flag}, or start the stack with `weir up` "
                               f"(it writes {path}; WEIR_DATA_DIR picks another data dir)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointNotFound(f"{path} has no {name} ({exc!r}); pass {flag}") from None
    if not isinstance(value, str) or not value:
        raise EndpointNotFound(f"{path} has no {name}; pass {flag}")
    return value


class Stack:
    """The services a process running ``project`` needs (see the module docstring); without a project, only
    Weir's own topics and schemas (``weir replay``)."""

    def __init__(self, settings: WeirSettings, project: Project | None = None, *, with_postgres: bool = True) -> None:
        self.settings = settings
        self.project = project
        # PostgreSQL only for a project that streams tables from it (CDC sources)
        self.with_postgres = with_postgres and (project is None or bool(project.cdc_sources))
        self.data_dir = settings.data_dir.resolve()
        self._started: list[Any] = []
        self._reaper = Reaper()  # stops the embedded services if this process dies without stopping them
        self.endpoints: Endpoints | None = None
        self.plan: Plan | None = None  # what starting changed of the project's applied state
        self._previous_catalog: schemas.Catalog | None = None

    def start(self) -> Endpoints:
        """Start what is not configured and apply the project (see :mod:`streams.project.plan`); raises
        :class:`~streams.project.plan.PlanRefused` (having stopped what it started) when the running stack must
        not take the project as it is."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Endpoints:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        kafka = s.kafka_bootstrap or self._start_kafka()
        redis_url = s.redis_url or self._start_redis()
        clickhouse = s.clickhouse_url or f"chdb://{self.data_dir / 'clickhouse'}"
        postgres = ""
        if s.postgres_dsn is not None:
            postgres = s.postgres_dsn.get_secret_value()
        elif self.with_postgres:
            postgres = self._start_postgres()
        topics = T.all_topics(self.project) if self.project is not None else T.PUBLIC + T.INTERNAL
        ensure_topics(kafka, topics, s.partitions)
        registry = s.schema_registry_url or self._start_registry(kafka)
        self._previous_catalog = schemas.set_catalog(None)
        self.endpoints = Endpoints(kafka, redis_url, clickhouse, postgres, registry)
        if self.project is not None:
            self.plan = check(self.project, kafka, registry)
            use_project(self.project)
        schemas.use_registry(registry)  # registers Weir's schemas and the project's
        if self.project is not None:
            record_applied(kafka, registry, self.project)
        return self.endpoints

    def _start_kafka(self) -> str:
        from streams.embedded.kafka import EmbeddedKafka

        kafka = EmbeddedKafka(self.data_dir / "logs")
        kafka.start()
        self._started_service(kafka)
        return kafka.bootstrap

    def _start_registry(self, kafka: str) -> str:
        from streams.registry import start_registry

        server = start_registry(kafka)
        self._started.append(server)
        return str(server.url)

    def _start_redis(self) -> str:
        from streams.embedded.redis import EmbeddedRedis

        redis = EmbeddedRedis(self.data_dir / "redis")
        redis.start()
        self._started_service(redis)
        return redis.url

    def _start_postgres(self) -> str:
        from streams.embedded.postgres import EmbeddedPostgres

        pg = EmbeddedPostgres(self.data_dir / "postgres")
        pg.start()
        self._started_service(pg)
        return pg.dsn

    def _started_service(self, service: EmbeddedService) -> None:
        self._started.append(service)
        if service.pid is not None:
            self._reaper.watch(service.pid, service.stop_signal)

    def stop(self) -> None:
        if self.endpoints is not None:  # codecs made from now on must not point at a registry we stop
            schemas.set_catalog(self._previous_catalog)
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception:  # keep stopping the others
                log.exception("stopping %s failed", type(service).__name__)
        self._reaper.close()

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
