"""``GET /healthz``: every stage's state, for a person, a load balancer or an orchestrator's probe.

200 when every stage is running, 503 otherwise; the body is the JSON of
:meth:`streams.pipeline.Pipeline.health` either way (which stage is ``retrying`` or ``stopped``, and why).
Served from a daemon thread by the standard library's HTTP server: one small request now and then.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class HealthServer:
    """Serves ``health()`` at ``/healthz`` on ``host:port`` (port 0: a free one; see :attr:`url`)."""

    def __init__(self, health: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                if self.path.split("?")[0] != "/healthz":
                    self.send_error(404, "only /healthz is served here")
                    return
                body = health()
                data = json.dumps(body, default=str).encode()
                self.send_response(200 if body.get("ok") else 503)
                self.send_header("Content-Type", "application/json")
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
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/healthz"

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
