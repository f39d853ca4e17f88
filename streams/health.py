"""``GET /healthz``: every stage's state, for a person, a load balancer or an orchestrator's probe; and
``GET /metrics``: the same stages' counters for Prometheus (:mod:`streams.metrics`).

``/healthz`` answers 200 when every stage is running, 503 otherwise; the body is the JSON of
:meth:`streams.pipeline.Pipeline.health` either way (which stage is ``retrying`` or ``stopped``, and why).
Served from a daemon thread by the standard library's HTTP server: one small request now and then.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from streams.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)


class HealthServer:
    """Serves ``health()`` at ``/healthz`` and, when given, ``metrics()`` at ``/metrics`` on ``host:port``
    (port 0: a free one; see :attr:`url`)."""

    def __init__(self, health: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0, *,
                 metrics: Callable[[], str] | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                path = self.path.split("?")[0]
                if path == "/metrics" and metrics is not None:
                    self._send(200, CONTENT_TYPE, metrics().encode())
                elif path == "/healthz":
                    body = health()
                    self._send(200 if body.get("ok") else 503, "application/json",
                               json.dumps(body, default=str).encode())
                else:
                    self.send_error(404, "/healthz and /metrics are served here")

            def _send(self, status: int, content_type: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds: quiet
                log.debug(format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True)

    @property
    def url(self) -> str:
        """The ``/healthz`` URL (``/metrics`` is beside it)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/healthz"

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


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
