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

import fcntl
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streams import schemas
from streams import topics as T
from streams.embedded._proc import PortInUse, claim_port
from streams.embedded.reaper import EmbeddedService, Reaper
from streams.kafka import ensure_topics
from streams.project.contracts import use_project
from streams.project.plan import Plan, check, record_applied
from streams.project.spec import Project
from streams.registry.store import DEFAULT_TOPIC as SCHEMAS_TOPIC
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
        """Write the endpoints, readable by their owner only (a DSN may hold a password)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


class DataDirInUse(RuntimeError):
    """Another Weir process holds the data directory's lock; the message names it and what to do."""


class ServiceUnreachable(RuntimeError):
    """A configured service does not answer; the message names it and its setting."""


def _written_pid(fd: int) -> str:
    """What the lock's holder wrote in it: its pid (empty while it is writing)."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip()


class DataDirLock:
    """An exclusive lock on ``<data dir>/weir.lock`` (``flock``; the kernel lets it go when the process dies,
    SIGKILL included), holding the owner's pid for the message a second process gets."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "weir.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirInUse`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _written_pid(fd) or "?"
            os.close(fd)
            raise DataDirInUse(f"another Weir process (pid {holder}) is running on {self.path.parent}: stop it "
                               "first, or set WEIR_DATA_DIR to another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> int | None:
        """The pid of the process holding the lock (-1 if it wrote none), None when no process does. Reads only:
        it takes the lock shared for an instant when free (a Weir process starting in that instant is told the
        directory is in use)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = _written_pid(fd)
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def check_reachable(kafka: str | None, redis_url: str | None, registry: str | None, *,
                    clickhouse: str | None = None, postgres: str | None = None, timeout_s: float = 10.0) -> None:
    """Raise :class:`ServiceUnreachable`, naming the setting, for the first of the given services that does not
    answer or refuses Weir's credentials (a Redis that wants a password counts as not answering); the embedded
    ClickHouse (``chdb://``) is opened by the stages themselves."""
    import urllib.error
    import urllib.request

    import redis
    from confluent_kafka.admin import AdminClient

    if kafka:
        try:
            AdminClient({"bootstrap.servers": kafka, "log_level": 0}).list_topics(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means the same to a person: not reachable
            raise ServiceUnreachable(f"Kafka at {kafka} does not answer ({exc}): check WEIR_KAFKA_BOOTSTRAP") from None
    if redis_url:
        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()
        except redis.RedisError as exc:
            raise ServiceUnreachable(f"Redis at {without_password(redis_url)} does not answer ({exc}): check "
                                     "WEIR_REDIS_URL") from None
    if registry:
        try:
            with urllib.request.urlopen(f"{registry.rstrip('/')}/subjects", timeout=timeout_s):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceUnreachable(f"the schema registry at {registry} does not answer ({exc}): check "
                                     "WEIR_SCHEMA_REGISTRY_URL") from None
    if clickhouse and not clickhouse.startswith("chdb://"):
        import clickhouse_connect

        try:
            clickhouse_connect.get_client(dsn=clickhouse, connect_timeout=timeout_s).command("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - connection refused, a wrong password, TLS: all mean the same
            raise ServiceUnreachable(f"ClickHouse at {without_password(clickhouse)} does not answer "
                                     f"({_first_line(exc)}): check WEIR_CLICKHOUSE_URL") from None
    if postgres:
        import psycopg

        try:
            psycopg.connect(postgres, connect_timeout=max(1, int(timeout_s))).close()
        except psycopg.Error as exc:
            raise ServiceUnreachable(f"PostgreSQL at {without_password(postgres)} does not answer "
                                     f"({_first_line(exc)}): check WEIR_POSTGRES_DSN") from None


def without_password(url: str) -> str:
    """``url`` (or a ``key=value`` DSN) with every password in it replaced by ``***``, for messages.

    >>> without_password("postgresql://weir:s3cret@db:5432/shop"), without_password("http://ch:8123")
    ('postgresql://weir:***@db:5432/shop', 'http://ch:8123')
    >>> without_password("redis://:pw@r:6379/0"), without_password("host=db password=pw user=weir")
    ('redis://:***@r:6379/0', 'host=db password=*** user=weir')
    >>> without_password("postgresql://db/shop?user=weir&password=pw")
    'postgresql://db/shop?user=weir&password=***'
    """
    url = re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|[^\s&]+)", r"\1***", url, flags=re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class EndpointNotFound(LookupError):
    """Neither an explicit value nor ``endpoints.json`` says where a service is; the message says what to do."""


def endpoint(name: str, explicit: str | None, *, flag: str, data_dir: Path | None = None) -> str:
    """``explicit``, else the field ``name`` of ``<data_dir>/endpoints.json`` (written by ``weir up``;
    ``data_dir`` defaults to ``WEIR_DATA_DIR``). ``flag`` names the option (or the ``WEIR_`` variable) a person
    can give instead."""
    if explicit:
        return explicit
    give = f"set {flag}" if flag.startswith("WEIR_") else f"pass {flag}"
    path = (data_dir if data_dir is not None else WeirSettings().data_dir) / "endpoints.json"
    try:
        value = json.loads(path.read_text())[name]
    except FileNotFoundError:
        raise EndpointNotFound(f"no {name}: {give}, or start the stack with `weir up` "
                               f"(it writes {path}; WEIR_DATA_DIR picks another data dir)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointNotFound(f"{path} has no {name} ({exc!r}); {give}") from None
    if not isinstance(value, str) or not value:
        raise EndpointNotFound(f"{path} has no {name}; {give}")
    return value


KEPT_TOPICS = (SCHEMAS_TOPIC, T.MODEL_EVENTS, T.PROJECTS)
"""What a restart of the embedded broker must not forget (the schema registry's state, the model registry's
transitions, what was applied of each project): journaled by :class:`~streams.embedded.journal.TopicJournal`."""


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
        self.restored: dict[str, int] = {}  # records restored per kept topic (embedded broker only)
        self._previous_schemas: schemas.SchemaState | None = None
        self._lock = DataDirLock(self.data_dir)

    def start(self) -> Endpoints:
        """Take the data directory's lock, check the configured services answer, start what is not configured
        and apply the project (see :mod:`streams.project.plan`). Raises :class:`DataDirInUse`,
        :class:`ServiceUnreachable`, or :class:`~streams.project.plan.PlanRefused` when the running stack must
        not take the project as it is, having stopped what it started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Endpoints:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        check_reachable(s.kafka_bootstrap, s.redis_url, s.schema_registry_url, clickhouse=s.clickhouse_url,
                        postgres=s.postgres_dsn.get_secret_value() if s.postgres_dsn and self.with_postgres else None)
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
        if not s.kafka_bootstrap:  # a broker in memory: restore what it must keep, journal it from now on
            self._start_journal(kafka)
        registry = s.schema_registry_url or self._start_registry(kafka)
        self._previous_schemas = schemas.schema_state()  # the project and registry below are this stack's
        schemas.set_catalog(None)
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

        kafka = EmbeddedKafka(self.data_dir / "logs", self.settings.kafka_port)
        kafka.start()
        self._started_service(kafka)
        return kafka.bootstrap

    def _start_journal(self, kafka: str) -> None:
        from streams.embedded.journal import TopicJournal
        from streams.registry.store import ensure_schemas_topic

        ensure_schemas_topic(kafka, SCHEMAS_TOPIC)
        journal = TopicJournal(kafka, self.data_dir / "journal", KEPT_TOPICS)
        self.restored = journal.restore()
        self._started.append(journal.start())

    def _start_registry(self, kafka: str) -> str:
        from streams.registry import start_registry

        port = claim_port(self.settings.schema_registry_port, "the schema registry", "WEIR_SCHEMA_REGISTRY_PORT",
                          "WEIR_SCHEMA_REGISTRY_URL")
        try:
            server = start_registry(kafka, host=self.settings.schema_registry_host, port=port)
        except OSError as exc:  # taken between the check and the bind
            raise PortInUse(f"the schema registry cannot listen on {self.settings.schema_registry_host}:{port} "
                            f"({exc.strerror}): set WEIR_SCHEMA_REGISTRY_PORT to a free port (0: any free one)") \
                from None
        self._started.append(server)
        return str(server.url)

    def _start_redis(self) -> str:
        from streams.embedded.redis import EmbeddedRedis

        redis = EmbeddedRedis(self.data_dir / "redis", self.settings.redis_port)
        redis.start()
        self._started_service(redis)
        return redis.url

    def _start_postgres(self) -> str:
        from streams.embedded.postgres import EmbeddedPostgres

        pg = EmbeddedPostgres(self.data_dir / "postgres", port=self.settings.postgres_port)
        pg.start()
        self._started_service(pg)
        return pg.dsn

    def _started_service(self, service: EmbeddedService) -> None:
        self._started.append(service)
        if service.pid is not None:
            self._reaper.watch(service.pid, service.stop_signal)

    def stop(self) -> None:
        if self._previous_schemas is not None:  # codecs made from now on must not point at a registry we stop,
            schemas.set_schema_state(self._previous_schemas)  # nor know only this stack's project
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception:  # keep stopping the others
                log.exception("stopping %s failed", type(service).__name__)
        self._reaper.close()
        self._lock.release()

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
