"""Running the console with uvicorn: in the foreground (``smtpguard console``) or in a thread of a
process that owns the store and does other work (tests; ``serve`` could host it the same way).

Example::

    with Store(cfg.store_dsn, cfg.store.database) as store:
        with ConsoleServer(create_app(cfg, store), "127.0.0.1", 0) as server:
            print(server.url)      # http://127.0.0.1:PORT, the port the system picked
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from smtpguard.core.errors import SmtpguardError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8025


def uvicorn_config(app: FastAPI, host: str, port: int, *, ssl_certfile: str | None = None,
                   ssl_keyfile: str | None = None, forwarded_allow_ips: str | None = None, **extra) -> uvicorn.Config:
    # proxy headers are believed only from forwarded_allow_ips (uvicorn's default: 127.0.0.1), so a
    # reverse proxy on the same machine can tell the console that the browser speaks https
    return uvicorn.Config(app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                          proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips, log_config=None,
                          server_header=False, **extra)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0 = a free one); SmtpguardError when the address is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SmtpguardError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or stop "
                             "what holds it") from None
    return sock


class ConsoleServer:
    """The app on ``host:port`` (port 0 = a free one) in a background thread, stopped on exit."""

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0):
        self.host = host
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       name="console", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}" if ":" not in self.host else f"http://[{self.host}]:{self.port}"

    def start(self, timeout_s: float = 15.0) -> "ConsoleServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SmtpguardError(f"the console did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(10)
        self._sock.close()

    def __enter__(self) -> "ConsoleServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
