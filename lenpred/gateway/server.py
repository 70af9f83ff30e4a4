"""Serving the app with uvicorn: in the main process for `lenpred gateway` (SIGTERM / SIGINT handled), or in a
thread on an ephemeral port for tests, benchmarks and notebooks (`ServerThread`, also used for the fake upstream).

Shutdown (SIGTERM, or `Gateway.close`): stop accepting connections, close idle keep-alive ones, let in-flight
answers run for `shutdown_timeout` seconds; streams still open then are ended cleanly (an error event, `[DONE]`,
the end of the chunked body) and non-streamed requests still waiting get 503; then the app's lifespan ends, which
drains the request log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time

import uvicorn

__all__ = ["GatewayServer", "ServerThread", "serve", "bind"]

logger = logging.getLogger("lenpred.gateway")
BACKLOG = 4096
BACKSTOP_S = 5.0  # past the grace, uvicorn cancels whatever is still running


class GatewayServer(uvicorn.Server):
    """uvicorn's server plus the gateway's grace period (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, gateway=None):
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets=None):
        handle = None
        for server in self.servers:  # as uvicorn does first, but before the line below: no new connections then
            server.close()
        for sock in sockets or []:
            sock.close()
        if self.gateway is not None:
            self.gateway.draining = True
            logger.info("draining: %d request(s) in flight get %.1f s to finish", len(self.server_state.tasks),
                        self.gateway.config.shutdown_timeout)
            handle = asyncio.get_running_loop().call_later(self.gateway.config.shutdown_timeout,
                                                           self.gateway.upstream.stop_reads)
        try:
            await super().shutdown(sockets)
        finally:
            if handle is not None:
                handle.cancel()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so the caller knows the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)  # connections made before uvicorn runs wait in the backlog instead of being refused
    sock.set_inheritable(True)
    return sock


def _config(app, gateway=None, **kw) -> uvicorn.Config:
    grace = gateway.config.shutdown_timeout if gateway is not None else 1.0
    access_log = gateway.config.access_log if gateway is not None else False
    kw = {"log_config": None, "access_log": access_log, "lifespan": "on", "backlog": BACKLOG,
          "timeout_graceful_shutdown": grace + BACKSTOP_S, **kw}
    return uvicorn.Config(app, **kw)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """uvicorn serving `app` in a daemon thread: `.start()` returns once it accepts connections; `.url`; `.stop()`
    shuts it down gracefully and waits."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, gateway=None, **uvicorn_kw):
        self.sock = bind(host, port)
        self.url = _url(self.sock)
        self.server = GatewayServer(_config(app, gateway, **uvicorn_kw), gateway)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="lenpred-uvicorn")

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError("the server did not start (see the log above)")
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def serve(gateway, log_level: str = "info") -> int:
    """Serve in the foreground until SIGTERM / SIGINT; graceful shutdown; 0 once the log is drained."""
    sock = bind(gateway.config.host, gateway.config.port)
    server = GatewayServer(_config(gateway.app, gateway, log_level=log_level), gateway)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers that ends in a clean exit
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    logger.info("LenPred gateway on %s -> %s", _url(sock), gateway.config.upstream)
    try:
        server.run(sockets=[sock])
    finally:
        gateway.close_resources()
        sock.close()
    return 0 if server.started else 1
