"""The Confluent Schema Registry REST API (the subset Confluent's clients and serializers use) over a ``SchemaStore``.

JSON in and out (``application/vnd.schemaregistry.v1+json``); errors are
Confluent's ``{"error_code": N, "message": "..."}`` with Confluent's codes, so
``confluent_kafka.schema_registry.SchemaRegistryClient`` and the Avro
serializers work against it unchanged. Only AVRO schemas, without references.
A reply to a write is sent only after the store's write is acknowledged by
Kafka (see ``store``). Schema bodies are logged at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from streams.registry.store import (
    InvalidSchema,
    RegisteredVersion,
    RegistryError,
    SchemaNotFound,
    SchemaStore,
    parse_version,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class BadRequest(RegistryError):
    """A body that is not the JSON object an endpoint expects."""

    error_code, http_status = 400, 400


@dataclass(frozen=True)
class Request:
    """What a route sees: the path parameters (decoded), the query (last value wins) and the JSON body."""

    params: tuple[str, ...]
    query: dict[str, str]
    body: Any

    def flag(self, name: str) -> bool:
        """A boolean query parameter; clients send ``true``, ``True`` or ``False``."""
        return self.query.get(name, "false").lower() == "true"


Reply = tuple[int, Any]
Route = tuple[str, re.Pattern[str], Callable[[SchemaStore, Request], Reply]]


def _version_json(v: RegisteredVersion) -> dict[str, Any]:
    return {"subject": v.subject, "version": v.version, "id": v.schema_id, "schema": v.schema}


def _schema_of(body: Any) -> str:
    """The Avro schema text of a registration body; ``InvalidSchema`` for other types or references."""
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise InvalidSchema("Request body must be a JSON object with a string field 'schema'")
    schema_type = body.get("schemaType") or "AVRO"
    if str(schema_type).upper() != "AVRO":
        raise InvalidSchema(f"Schema type {schema_type} is not supported: this registry serves AVRO only")
    if body.get("references"):
        raise InvalidSchema("Schema references are not supported by this registry")
    return str(body["schema"])


def _schema_id(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SchemaNotFound(f"Schema {raw} not found") from None


# --- routes ---

def _root(store: SchemaStore, r: Request) -> Reply:
    return 200, {}


def _subjects(store: SchemaStore, r: Request) -> Reply:
    return 200, store.subjects(deleted=r.flag("deleted"), deleted_only=r.flag("deleted_only"),
                               prefix=r.query.get("subjectPrefix", ""))


def _versions(store: SchemaStore, r: Request) -> Reply:
    return 200, store.versions(r.params[0], deleted=r.flag("deleted"), deleted_only=r.flag("deleted_only"))


def _get_version(store: SchemaStore, r: Request) -> Reply:
    return 200, _version_json(store.get_version(r.params[0], parse_version(r.params[1]), deleted=r.flag("deleted")))


def _get_version_schema(store: SchemaStore, r: Request) -> Reply:
    v = store.get_version(r.params[0], parse_version(r.params[1]), deleted=r.flag("deleted"))
    return 200, json.loads(v.schema)


def _register(store: SchemaStore, r: Request) -> Reply:
    v = store.register(r.params[0], _schema_of(r.body))
    return 200, {"id": v.schema_id, "subject": v.subject, "version": v.version}


def _lookup(store: SchemaStore, r: Request) -> Reply:
    return 200, _version_json(store.lookup(r.params[0], _schema_of(r.body), deleted=r.flag("deleted")))


def _delete_subject(store: SchemaStore, r: Request) -> Reply:
    return 200, store.delete_subject(r.params[0], permanent=r.flag("permanent"))


def _delete_version(store: SchemaStore, r: Request) -> Reply:
    return 200, store.delete_version(r.params[0], parse_version(r.params[1]), permanent=r.flag("permanent"))


def _schema_by_id(store: SchemaStore, r: Request) -> Reply:
    return 200, {"schema": store.schema(_schema_id(r.params[0]))}


def _id_versions(store: SchemaStore, r: Request) -> Reply:
    found = store.versions_of_id(_schema_id(r.params[0]), deleted=r.flag("deleted"))
    subject = r.query.get("subject")
    return 200, [{"subject": v.subject, "version": v.version} for v in found if subject in (None, v.subject)]


def _id_subjects(store: SchemaStore, r: Request) -> Reply:
    found = store.versions_of_id(_schema_id(r.params[0]), deleted=r.flag("deleted"))
    subject = r.query.get("subject")
    return 200, sorted({v.subject for v in found if subject in (None, v.subject)})


def _types(store: SchemaStore, r: Request) -> Reply:
    return 200, ["AVRO"]


def _compatible(messages: list[str]) -> Reply:
    return 200, {"is_compatible": not messages, "messages": messages}


def _test_version(store: SchemaStore, r: Request) -> Reply:
    return _compatible(store.check(r.params[0], _schema_of(r.body), parse_version(r.params[1])))


def _test_all(store: SchemaStore, r: Request) -> Reply:
    return _compatible(store.check(r.params[0], _schema_of(r.body)))


def _level_of(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("compatibility"), str):
        raise BadRequest("Request body must be a JSON object with a string field 'compatibility'")
    return str(body["compatibility"])


def _get_config(store: SchemaStore, r: Request) -> Reply:
    return 200, {"compatibilityLevel": store.compatibility(None)}


def _put_config(store: SchemaStore, r: Request) -> Reply:
    return 200, {"compatibility": store.set_compatibility(_level_of(r.body))}


def _delete_config(store: SchemaStore, r: Request) -> Reply:
    return 200, {"compatibilityLevel": store.delete_compatibility(None)}


def _get_subject_config(store: SchemaStore, r: Request) -> Reply:
    if r.flag("defaultToGlobal"):
        return 200, {"compatibilityLevel": store.compatibility(r.params[0])}
    return 200, {"compatibilityLevel": store.subject_compatibility(r.params[0])}


def _put_subject_config(store: SchemaStore, r: Request) -> Reply:
    return 200, {"compatibility": store.set_compatibility(_level_of(r.body), r.params[0])}


def _delete_subject_config(store: SchemaStore, r: Request) -> Reply:
    return 200, {"compatibilityLevel": store.delete_compatibility(r.params[0])}


def _route(method: str, pattern: str, fn: Callable[[SchemaStore, Request], Reply]) -> Route:
    return method, re.compile("^" + pattern.replace("{}", "([^/]+)") + "/?$"), fn


ROUTES: list[Route] = [
    _route("GET", "", _root),
    _route("GET", "/subjects", _subjects),
    _route("GET", "/subjects/{}/versions", _versions),
    _route("POST", "/subjects/{}/versions", _register),
    _route("GET", "/subjects/{}/versions/{}", _get_version),
    _route("DELETE", "/subjects/{}/versions/{}", _delete_version),
    _route("GET", "/subjects/{}/versions/{}/schema", _get_version_schema),
    _route("POST", "/subjects/{}", _lookup),
    _route("DELETE", "/subjects/{}", _delete_subject),
    _route("GET", "/schemas/types", _types),
    _route("GET", "/schemas/ids/{}", _schema_by_id),
    _route("GET", "/schemas/ids/{}/versions", _id_versions),
    _route("GET", "/schemas/ids/{}/subjects", _id_subjects),
    _route("POST", "/compatibility/subjects/{}/versions/{}", _test_version),
    _route("POST", "/compatibility/subjects/{}/versions", _test_all),
    _route("GET", "/config", _get_config),
    _route("PUT", "/config", _put_config),
    _route("DELETE", "/config", _delete_config),
    _route("GET", "/config/{}", _get_subject_config),
    _route("PUT", "/config/{}", _put_subject_config),
    _route("DELETE", "/config/{}", _delete_subject_config),
]


def dispatch(store: SchemaStore, method: str, target: str, body: bytes) -> Reply:
    """Answer one request: the route's reply, or a Confluent error body. Never raises."""
    url = urlsplit(target)
    path = url.path.rstrip("/")
    allowed = False
    for route_method, pattern, fn in ROUTES:
        match = pattern.match(path)
        if match is None:
            continue
        allowed = True
        if route_method != method:
            continue
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            return 400, {"error_code": 400, "message": "Request body is not valid JSON"}
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        request = Request(tuple(unquote(p) for p in match.groups()), query, parsed)
        try:
            return fn(store, request)
        except RegistryError as exc:
            return exc.http_status, {"error_code": exc.error_code, "message": str(exc)}
        except Exception:  # a bug, not the client's fault: answer 500, keep serving
            log.exception("%s %s failed", method, path)
            return 500, {"error_code": 50001, "message": "Error in the backend data store"}
    if allowed:
        return 405, {"error_code": 405, "message": f"HTTP {method} is not allowed on {path or '/'}"}
    return 404, {"error_code": 404, "message": "HTTP 404 Not Found"}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload = dispatch(self.server.store, self.command, self.path, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: SchemaStore) -> None:
        super().__init__(address, _Handler)
        self.store = store


class RegistryServer:
    """Serves ``store`` over HTTP on ``host:port`` (0 = a free port) from a daemon thread."""

    def __init__(self, store: SchemaStore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self._httpd = _Server((host, port), store)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8081``."""
        host, port = self._httpd.server_address[:2]
        if host in ("0.0.0.0", "::"):  # listening everywhere: this machine reaches it on loopback
            host = "127.0.0.1"
        return f"http://{host!s}:{port}"

    def start(self) -> RegistryServer:
        """Start answering requests; returns at once. The store must be started."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="weir-registry", daemon=True)
        self._thread.start()
        log.info("schema registry serving %s on %s", self.store.topic, self.url)
        return self

    def stop(self) -> None:
        """Stop answering, release the port, close the store's producer. Blocks until the loop exits."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self.store.close()
