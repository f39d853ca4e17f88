"""``GET /healthz``: every stage's state, for a person, a load balancer or an orchestrator's probe; and
``GET /metrics``: the same stages' counters for Prometheus (:mod:`streams.metrics`).

``/healthz`` answers 200 when every stage is running, 503 otherwise; the body is the JSON of
:meth:`streams.pipeline.Pipeline.health` either way (which stage is ``retrying`` or ``stopped``, and why).
Served from a daemon thread by the standard library's HTTP server: one small request now and then.

``POST /clickhouse/query`` (:data:`QUERY_PATH`), when given a ``query`` handler: the hub (``weir up``) owns
the embedded ClickHouse (chdb admits one process), so the CLI reads it through this process
(:mod:`streams.clickhouse_hub`). It answers only a peer on this machine (a loopback address, or the
connection's own local address): when ``WEIR_HEALTH_HOST`` is ``0.0.0.0`` (a container, for the probes),
``/healthz`` and ``/metrics`` are open to the network, the queries are not (403).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from streams.embedded._proc import PortInUse
from streams.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

QUERY_PATH = "/clickhouse/query"
MAX_QUERY_BYTES = 1 << 20  # a request body: the SQL and its parameters


class QueryError(Exception):
    """A query the handler refuses, or ClickHouse rejects before its first row (``code``: ClickHouse's error
    code): answered 400 with the message and the code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class QueryHandler(Protocol):
    """Answers one ``POST /clickhouse/query`` body (JSON) with the chunks of the response body, raising
    :class:`QueryError` before the first chunk for a query it does not run."""

    def __call__(self, request: dict[str, Any]) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def same_machine(peer: str, local: str) -> bool:
    """Whether a connection from ``peer`` to ``local`` (IP addresses) comes from this machine: a loopback
    peer, or one whose address is the connection's own local address.

    >>> same_machine("127.0.0.1", "10.0.0.5"), same_machine("10.0.0.5", "10.0.0.5")
    (True, True)
    >>> same_machine("10.0.0.7", "10.0.0.5")
    False
    """
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or peer == local


def loopback_host(host: str) -> bool:
    """Whether an HTTP ``Host`` header names this machine's loopback (with or without a port).

    >>> loopback_host("127.0.0.1:18088"), loopback_host("localhost"), loopback_host("[::1]:80")
    (True, True, True)
    >>> loopback_host("evil.example:18088"), loopback_host("")
    (False, False)
    """
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip("[]").rsplit("]:", 1)[0] if host.startswith("[") else name
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HealthServer:
    """Serves ``health()`` at ``/healthz`` and, when given, ``metrics()`` at ``/metrics`` on ``host:port``
    (port 0: a free one; see :attr:`url`), and ``query`` at ``POST /clickhouse/query`` to this machine only
    (see the module docstring); :meth:`stop` closes ``query``."""

    def __init__(self, health: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0, *,
                 metrics: Callable[[], str] | None = None, query: QueryHandler | None = None) -> None:
        self._query = query

        class Handler(BaseHTTPRequestHandler):
            timeout = 120  # a client that stops reading a query's answer releases it after this long

            def do_GET(self) -> None:  # the standard library's names
                path = self.path.split("?")[0]
                if path == "/metrics" and metrics is not None:
                    self._send(200, CONTENT_TYPE, metrics().encode())
                elif path == "/healthz":
                    body = health()
                    self._send(200 if body.get("ok") else 503, "application/json",
                               json.dumps(body, default=str).encode())
                else:
                    self.send_error(404, "/healthz and /metrics are served here")

            def do_POST(self) -> None:
                if self.path.split("?")[0] != QUERY_PATH or query is None:
                    self._error(404, "no ClickHouse queries are served here")
                elif not same_machine(str(self.client_address[0]), str(self.connection.getsockname()[0])) \
                        or not loopback_host(self.headers.get("Host", "")):
                    # a page in a browser on this machine, its name rebound to 127.0.0.1, sends another Host
                    self._error(403, "ClickHouse queries are served to this machine only (Host: 127.0.0.1, "
                                     "localhost or ::1)")
                else:
                    self._query(query)

            def _query(self, handler: QueryHandler) -> None:
                try:
                    size = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self._error(411, "a query needs a Content-Length")
                    return
                if not 0 < size <= MAX_QUERY_BYTES:
                    self._error(413, f"a query is 1 to {MAX_QUERY_BYTES} bytes of JSON")
                    return
                try:
                    request = json.loads(self.rfile.read(size))
                    if not isinstance(request, dict):
                        raise QueryError("the body is not a JSON object")
                    chunks = handler(request)
                    first = next(chunks, b"")
                except (QueryError, ValueError) as exc:
                    self._error(400, str(exc), getattr(exc, "code", None))
                    return
                except Exception as exc:  # the hub keeps serving; the client gets the reason
                    log.exception("ClickHouse query failed")
                    self._error(500, f"{type(exc).__name__}: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                try:
                    self.wfile.write(first)
                    for chunk in chunks:
                        self.wfile.write(chunk)
                except OSError:  # the client went away: stop reading ClickHouse
                    log.debug("query client went away")
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()

            def _error(self, status: int, message: str, code: int | None = None) -> None:
                self._send(status, "application/json", json.dumps({"error": message, "code": code}).encode())

            def _send(self, status: int, content_type: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: quiet
                log.debug(format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise PortInUse(f"/healthz cannot listen on {host}:{port} ({exc.strerror}): set WEIR_HEALTH_PORT to a "
                            "free port (0: any free one), or WEIR_HEALTH_HOST to an address of this machine") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True)

    @property
    def url(self) -> str:
        """The ``/healthz`` URL (``/metrics`` is beside it)."""
        host, port = self._server.server_address[:2]
        if host in ("0.0.0.0", "::"):  # listening everywhere: this machine reaches it on loopback
            host = "127.0.0.1"
        return f"http://{host!s}:{port}/healthz"

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._query is not None:
            self._query.close()


def read_health(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The JSON a ``/healthz`` at ``url`` answers (with 200 or 503), None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as exc:  # 503: it answers, some stage is not running
        try:
            return dict(json.loads(exc.read()))
        except ValueError:
            return None
    except (urllib.error.URLError, OSError, ValueError):
        return None
