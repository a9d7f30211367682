"""The worker's HTTP endpoints: /metrics, /healthz, /readyz, /progress.

The server runs on its own thread, not on the worker's event loop: a server on the loop it
monitors could not answer while that loop is blocked, which is exactly when /healthz must say
503 and why. It only calls the functions it is given; each returns quickly and never blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

__all__ = ["Check", "StatusServer"]

Check = Callable[[], tuple[bool, dict[str, Any]]]


class StatusServer:
    def __init__(self, host: str, port: int, *, metrics: Callable[[], bytes], health: Check,
                 ready: Check, progress: Callable[[], dict[str, Any] | None]) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics()),
            "/healthz": lambda: _check(health),
            "/readyz": lambda: _check(ready),
            "/progress": lambda: (200, "application/json",
                                  orjson.dumps(progress() or {}, default=str)),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    code, ctype, body = 404, "text/plain", b"not found\n"
                else:
                    try:
                        code, ctype, body = route()
                    except Exception as exc:  # a broken check must not kill the server
                        code, ctype, body = 500, "text/plain", f"{exc}\n".encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # probes every few seconds would drown the worker's log

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="sc-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _check(fn: Check) -> tuple[int, str, bytes]:
    ok, detail = fn()
    return (200 if ok else 503), "application/json", orjson.dumps({"ok": ok, **detail})
