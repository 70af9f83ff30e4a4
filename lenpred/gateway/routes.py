"""The proxied paths as one plain ASGI endpoint: read the body (size- and time-limited), set the priority, forward,
relay the answer, log it.

A plain ASGI callable rather than Starlette's request/response pair, because a proxy must watch for the client
leaving for the whole request, not only while a stream is relayed: one watcher task waits for `http.disconnect`
and cancels the request's task, which closes the upstream connection (vLLM and SGLang abort a request whose
connection closes), whether the gateway was waiting for the answer's headers, its body, or relaying a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import ClientDisconnect, Request

from lenpred.gateway.policy import client_priority, compute_priority, max_tokens_of, prompt_of
from lenpred.gateway.proxy import SSERelay, Tally, UpstreamError, error_body, request_headers, response_headers

__all__ = ["ProxyEndpoint", "Ask", "PRIORITY_PATHS"]

logger = logging.getLogger("lenpred.gateway")
PRIORITY_PATHS = ("/v1/chat/completions", "/v1/completions")
JSON = [(b"content-type", b"application/json")]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Ask:
    """What the gateway knows of one priority-path request, for its log record."""

    __slots__ = ("endpoint", "model", "prompt", "mean", "std", "priority", "stream", "n", "client_usage",
                 "max_tokens", "arrived", "bound", "vector")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


async def _reply(send, status: int, body: bytes, headers=JSON, close: bool = False) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    if close:  # the rest of an unread body must not be taken for the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ProxyEndpoint:
    """ASGI app for every path the gateway forwards (a class instance, so Starlette's Route mounts it as ASGI)."""

    def __init__(self, gateway):
        self.gw = gateway

    async def __call__(self, scope, receive, send):
        gw, m = self.gw, self.gw.metrics
        arrived, since_start = time.monotonic(), gw.clock() - gw.started
        path = scope["path"]
        endpoint = path.rstrip("/") if path.rstrip("/") in PRIORITY_PATHS else "other"
        status, task, left, watcher = 500, asyncio.current_task(), [], None
        m.in_flight.inc()

        def client_left():
            left.append(True)
            task.cancel()

        try:
            try:
                raw = await self._read_body(Request(scope, receive))
            except _BadRequest as exc:
                status = exc.status
                return await _reply(send, status, error_body(status, str(exc), "invalid_request_error"),
                                    close=True)
            watcher = asyncio.ensure_future(_watch(receive, client_left))
            status = await self._forward(scope, raw, endpoint, arrived, since_start, send, watcher)
        except ClientDisconnect:
            status = 499
        except asyncio.CancelledError:
            if not left:  # shutdown past its backstop: uvicorn cancels us
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()
            status = 499  # nginx's "client closed request"; never sent
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in OpenAI's shape, the gateway goes on
            logger.exception("%s %s failed", scope["method"], path)
            status = 500
            try:
                await _reply(send, 500, error_body(500, f"gateway error: {type(exc).__name__}: {exc}",
                                                   "internal_error"))
            except RuntimeError:  # the answer had started: uvicorn closes the connection instead
                pass
        finally:
            if watcher is not None:
                watcher.cancel()
            m.in_flight.dec()
            m.requests.labels(endpoint, str(status)).inc()

    async def _read_body(self, request: Request) -> bytes:
        limit = self.gw.config.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _BadRequest(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BadRequest(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)

        timeout = self.gw.config.request_timeout or None
        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise _BadRequest(408, f"request body not received within {timeout} s") from None
        return b"".join(chunks)

    async def _forward(self, scope, raw: bytes, endpoint: str, arrived: float, since_start: float, send,
                       watcher) -> int:
        """Prepare, send upstream, answer the client; the status sent."""
        gw, method = self.gw, scope["method"]
        ask, headers = None, request_headers(scope["headers"])
        if method == "POST" and endpoint != "other":
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
                if endpoint.endswith("/chat/completions") and not isinstance(body.get("messages"), list):
                    raise ValueError("'messages' must be a list of messages")
            except ValueError as exc:
                await _reply(send, 400, error_body(400, f"Invalid JSON body: {exc}", "invalid_request_error"))
                return 400
            ask = await self._prepare(endpoint, body, arrived, since_start)
            raw = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        qs = scope.get("query_string") or b""
        path_qs = scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
        try:
            resp = await gw.upstream.send(method, path_qs, headers, raw if raw or method == "POST" else None)
        except UpstreamError as err:
            gw.upstream_failed(err, path_qs)
            await _reply(send, err.status, error_body(err.status, str(err), "upstream_error"))
            return err.status
        if resp.status >= 500:
            gw.metrics.upstream_errors.labels("status_5xx").inc()
        out = response_headers(resp)
        if "text/event-stream" in resp.headers.get("Content-Type", ""):
            await self._relay(resp, out, ask, send, watcher)
            return resp.status
        try:
            data = await gw.upstream.read(resp)
        except UpstreamError as err:
            gw.upstream.done(resp, False)
            gw.upstream_failed(err, path_qs)
            await _reply(send, err.status, error_body(err.status, str(err), "upstream_error"))
            return err.status
        except BaseException:
            gw.upstream.done(resp, False)
            raise
        gw.upstream.done(resp, True)
        if ask and resp.status == 200 and ask.prompt:
            tally = Tally()
            tally.feed_json(data)
            if tally.usage and not tally.error:
                gw.record(ask, tally)  # queued before the client has the answer: a test can wait on the log
        watcher.cancel()  # the answer is complete: its end is no disconnect
        await _reply(send, resp.status, data, out)
        return resp.status

    async def _relay(self, resp, headers, ask: Ask | None, send, watcher) -> None:
        gw, tally = self.gw, Tally() if ask else None

        def ended(err, finished):
            if err is not None:
                gw.upstream_failed(err, resp.url.path)
            if (finished and ask and resp.status == 200 and ask.prompt and not tally.error
                    and (tally.usage or tally.chunks)):
                gw.record(ask, tally)

        relay = SSERelay(gw.upstream, resp, tally, bool(ask and ask.client_usage), on_end=ended)
        events = relay.events()
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await events.aclose()
            relay.end(None, False)  # no-op when the stream ended itself; else closes the upstream connection

    async def _prepare(self, endpoint: str, body: dict, arrived: float, since_start: float) -> Ask:
        """Predict, set `priority` in `body` (and ask the upstream for stream usage); what the log will need."""
        gw, cfg = self.gw, self.gw.config
        prompt = prompt_of(endpoint, body, cfg.chat_prompt)
        llm = gw.resolve(body.get("model"))
        mean, std, bound, vector = await gw.predict(prompt, llm)
        own = client_priority(body) if cfg.keep_client_priority else None
        body["priority"] = own if own is not None else compute_priority(mean, since_start, cfg.default_priority,
                                                                         cfg.aging_rate)
        gw.metrics.priority.observe(body["priority"])
        stream = bool(body.get("stream"))
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        if stream:
            body["stream_options"] = {**options, "include_usage": True}
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        return Ask(endpoint=endpoint, model=llm or body.get("model"), prompt=prompt, mean=mean, std=std,
                   priority=body["priority"], stream=stream, n=n, max_tokens=max_tokens_of(body),
                   client_usage=stream and bool(options.get("include_usage")), arrived=arrived, bound=bound,
                   vector=vector)


async def _watch(receive, on_disconnect) -> None:
    """Wait for the client to leave (the body has been read: nothing else comes), then say so."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_disconnect()
