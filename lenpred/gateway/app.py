"""The gateway's ASGI app (Starlette) and the `Gateway` that owns what the app uses: the model behind its
micro-batcher, the upstream session, the request log and the metrics.

The event loop never runs the model: a prediction is a future from `MicroBatcher`'s thread, awaited, so one slow
batch never holds up other requests' bytes. Every request is read whole first (size-limited), then raced against
the client leaving: a client that disconnects cancels the upstream request at any point, before or during its
answer.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from contextlib import asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lenpred.gateway.config import GatewayConfig
from lenpred.gateway.logwriter import LogWriter
from lenpred.gateway.metrics import Metrics
from lenpred.gateway.policy import client_priority, compute_priority, is_flagged, max_tokens_of, prompt_of
from lenpred.gateway.proxy import (SSERelay, Tally, Upstream, UpstreamError, error_body, request_headers,
                                   response_headers)

__all__ = ["Gateway", "build_app", "PRIORITY_PATHS"]

logger = logging.getLogger("lenpred.gateway")
PRIORITY_PATHS = ("/v1/chat/completions", "/v1/completions")
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
PREDICTION_TIMEOUT = 60.0  # seconds; past it the request goes on at the default priority


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Once:
    """Call `fn` at most once (a request's end is reached by more than one path)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class _Ask:
    """What the gateway knows of one priority-path request, for its log record."""

    __slots__ = ("endpoint", "model", "prompt", "mean", "std", "priority", "stream", "n", "client_usage",
                 "max_tokens", "arrived")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class RelayResponse(StreamingResponse):
    """A streamed upstream answer with the upstream's own headers; the relay is ended even if the stream never
    started (client gone before the first byte), so its upstream connection never leaks."""

    def __init__(self, relay: SSERelay, status: int, raw_headers):
        super().__init__(relay.events(), status_code=status)
        self.raw_headers, self.relay = raw_headers, relay

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            self.relay.end(None, False)  # no-op when the stream ended itself


def _error(status: int, message: str, kind: str, close: bool = False) -> Response:
    return Response(error_body(status, message, kind), status, media_type="application/json",
                    headers={"connection": "close"} if close else None)


class Gateway:
    """`Gateway(model, tokenizer, GatewayConfig(...))`; `.app` is the ASGI app; `.start()` serves it in a thread
    (`.url`, `.close()`, or `with Gateway(...) as gw:`); `lenpred gateway` serves it in the main process.

    `model=None` (or `config.predict=False`) switches prediction off: every request gets the default priority with
    aging. `predictor`: anything with `model.predict`'s signature (a `lenpred.fast` option); default `model`, whose
    `config` resolves LLM names either way. `clock` is injectable for tests of aging."""

    def __init__(self, model, tokenizer, config: GatewayConfig, clock=time.monotonic, predictor=None):
        self.model, self.tokenizer, self.config, self.clock = model, tokenizer, config, clock
        self.upstream = Upstream(config.upstream, config.upstream_timeout, config.request_timeout,
                                 config.max_upstream_connections)
        self.log = LogWriter(config.log_path, config.fsync) if config.log_path else None  # fails before serving
        self.metrics = Metrics(log_depth=self.log.depth if self.log else None)
        if self.log:
            self.log.on_error = self.metrics.log_errors.inc
        self.batcher = None
        if config.predict and model is not None:
            from lenpred.inference import MicroBatcher

            self.batcher = MicroBatcher(predictor or model, tokenizer, config.max_batch, config.batch_wait_ms)
        self._names: dict[str, str | None] = {}
        self.draining = False
        self.started = clock()
        self.app = build_app(self)
        self._thread_server = None

    @classmethod
    def from_export(cls, path, config: GatewayConfig, device: str | None = None, backend: str = "torch",
                    workdir: str | None = None) -> "Gateway":
        """`backend`: "torch" (the model's fp32 fast path) or a `lenpred.fast` CPU option ("onnx", "int8", ...)
        built once from the export (ONNX files go to `workdir`, default `<export>/fast`)."""
        from pathlib import Path

        from lenpred.hub import load_export

        model, tokenizer = load_export(path, device=device)
        predictor = None
        if backend != "torch" and config.predict:
            from lenpred.fast import build_option

            predictor = build_option(backend, model, tokenizer, workdir or Path(path) / "fast")
        return cls(model, tokenizer, config, predictor=predictor)

    # -- running in-process -------------------------------------------------------------------------------------
    def start(self) -> "Gateway":
        from lenpred.gateway.server import ServerThread

        self._thread_server = ServerThread(self.app, self.config.host, self.config.port, gateway=self).start()
        return self

    @property
    def url(self) -> str:
        return self._thread_server.url

    def begin_shutdown(self) -> None:
        """What SIGTERM does, without waiting: stop accepting, let in-flight answers finish within the grace."""
        if self._thread_server:
            self._thread_server.server.should_exit = True

    def close(self) -> None:
        """Graceful stop (in-flight answers get `shutdown_timeout` seconds), then the log is drained."""
        if self._thread_server:
            self._thread_server.stop()
            self._thread_server = None
        self.close_resources()

    def close_resources(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        if self.log is not None:
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- per request --------------------------------------------------------------------------------------------
    def resolve(self, name) -> str | None:
        """The LLM id the model knows for a client's `model` name, else None (passed through)."""
        if self.model is None or not isinstance(name, str):
            return None
        if name not in self._names:
            try:
                llm = self.model.config.resolve_llm(name)
            except (ValueError, TypeError):
                llm = None
            if len(self._names) < 4096:
                self._names[name] = llm
            return llm
        return self._names[name]

    async def predict(self, prompt: str | None, llm: str | None) -> tuple[float | None, float | None]:
        """(mean, std) in tokens, or (None, None): use the default priority."""
        if self.batcher is None or prompt is None or llm is None:
            return None, None
        t0 = time.perf_counter()
        try:
            mean, std = await asyncio.wait_for(asyncio.wrap_future(self.batcher.submit(prompt, llm)),
                                               PREDICTION_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a failed prediction costs the request its priority, not its answer
            logger.warning("prediction failed, default priority used: %r", exc)
            return None, None
        self.metrics.prediction_seconds.observe(time.perf_counter() - t0)
        return mean, std

    async def health(self, request: Request) -> Response:
        if self.draining:
            return Response(b'{"status": "draining"}', 503, media_type="application/json")
        return Response(b'{"status": "ok"}', 200, media_type="application/json")

    async def metrics_endpoint(self, request: Request) -> Response:
        body, ctype = self.metrics.render()
        return Response(body, 200, headers={"content-type": ctype})

    async def handle(self, request: Request) -> Response:
        arrived, since_start = time.monotonic(), self.clock() - self.started
        path = request.scope["path"]
        endpoint = path.rstrip("/") if path.rstrip("/") in PRIORITY_PATHS else "other"
        self.metrics.in_flight.inc()
        done = _Once(self.metrics.in_flight.dec)
        resp = None
        try:
            resp = await self._handle(request, endpoint, arrived, since_start, done)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in OpenAI's shape, the gateway goes on
            logger.exception("%s %s failed", request.method, path)
            resp = _error(500, f"gateway error: {type(exc).__name__}: {exc}", "internal_error")
        finally:
            if not isinstance(resp, RelayResponse):
                done()
        self.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        return resp

    async def _handle(self, request: Request, endpoint: str, arrived: float, since_start: float, done) -> Response:
        cfg = self.config
        try:
            raw = await self._read_body(request)
        except _BadRequest as exc:
            return _error(exc.status, str(exc), "invalid_request_error", close=True)
        except ClientDisconnect:
            return Response(status_code=499)
        ask, headers = None, request_headers(request.scope["headers"])
        if request.method == "POST" and endpoint != "other":
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
            except ValueError as exc:
                return _error(400, f"Invalid JSON body: {exc}", "invalid_request_error")
            ask = await self._prepare(endpoint, body, arrived, since_start)
            raw = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        qs = request.scope.get("query_string") or b""
        path_qs = request.scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
        work = asyncio.ensure_future(self._exchange(request.method, path_qs, headers,
                                                    raw if raw or request.method == "POST" else None, ask, done))
        return await _unless_client_leaves(request, work)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
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

        try:
            await asyncio.wait_for(read(), self.config.request_timeout or None)
        except asyncio.TimeoutError:
            raise _BadRequest(408, f"request body not received within {self.config.request_timeout} s") from None
        return b"".join(chunks)

    async def _prepare(self, endpoint: str, body: dict, arrived: float, since_start: float) -> _Ask:
        """Predict, set `priority` in `body` (and ask the upstream for stream usage); what the log will need."""
        cfg = self.config
        prompt = prompt_of(endpoint, body, cfg.chat_prompt)
        llm = self.resolve(body.get("model"))
        mean, std = await self.predict(prompt, llm)
        own = client_priority(body) if cfg.keep_client_priority else None
        body["priority"] = own if own is not None else compute_priority(mean, since_start, cfg.default_priority,
                                                                         cfg.aging_rate)
        self.metrics.priority.observe(body["priority"])
        stream = bool(body.get("stream"))
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        if stream:
            body["stream_options"] = {**options, "include_usage": True}
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        return _Ask(endpoint=endpoint, model=llm or body.get("model"), prompt=prompt, mean=mean, std=std,
                    priority=body["priority"], stream=stream, n=n, max_tokens=max_tokens_of(body),
                    client_usage=stream and bool(options.get("include_usage")), arrived=arrived)

    async def _exchange(self, method: str, path_qs: str, headers, body: bytes | None, ask: _Ask | None,
                        done) -> Response:
        try:
            resp = await self.upstream.send(method, path_qs, headers, body)
        except UpstreamError as err:
            self.metrics.upstream_errors.labels(err.kind).inc()
            return _error(err.status, str(err), "upstream_error")
        if resp.status >= 500:
            self.metrics.upstream_errors.labels("status_5xx").inc()
        out = response_headers(resp)
        try:
            if "text/event-stream" in resp.headers.get("Content-Type", ""):
                tally = Tally() if ask else None
                relay = SSERelay(self.upstream, resp, tally, bool(ask and ask.client_usage),
                                 on_end=partial(self._stream_ended, ask, tally, resp.status, done))
                return RelayResponse(relay, resp.status, out)
            data = await self.upstream.read(resp)
        except UpstreamError as err:
            self.upstream.done(resp, False)
            self.metrics.upstream_errors.labels(err.kind).inc()
            return _error(err.status, str(err), "upstream_error")
        except BaseException:
            self.upstream.done(resp, False)
            raise
        self.upstream.done(resp, True)
        if ask and resp.status == 200 and ask.prompt:
            tally = Tally()
            tally.feed_json(data)
            if tally.usage and not tally.error:
                self._record(ask, tally)  # queued before the client has the answer: a test can wait on the log
        reply = Response(data, resp.status)
        reply.raw_headers = out + [(b"content-length", str(len(data)).encode())]
        return reply

    def _stream_ended(self, ask, tally, status, done, err, finished) -> None:
        done()
        if err is not None:
            self.metrics.upstream_errors.labels(err.kind).inc()
        if (finished and ask and status == 200 and ask.prompt and not tally.error
                and (tally.usage or tally.chunks)):
            self._record(ask, tally)

    def _record(self, ask: _Ask, tally: Tally) -> None:
        """One log line per finished answer (the package docstring lists the fields)."""
        if self.log is None:
            return
        usage = tally.usage or {}
        if isinstance(usage.get("completion_tokens"), int):
            total, source = usage["completion_tokens"], "usage"
        else:
            total, source = tally.chunks, "chunks"
        actual, cfg = total / ask.n, self.config
        self.log.write({
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "endpoint": ask.endpoint, "model": ask.model, "prompt_text": ask.prompt,
            "input_size": usage.get("prompt_tokens"),
            "output_sizes": [total] if ask.n == 1 else None, "output_mean": actual,
            "predicted_mean": ask.mean, "predicted_std": ask.std, "priority": ask.priority,
            "latency_s": round(time.monotonic() - ask.arrived, 6), "stream": ask.stream, "usage_source": source,
            "finish_reasons": tally.finish_reasons(ask.n), "max_tokens": ask.max_tokens,
            "flagged": is_flagged(ask.mean, actual, cfg.flag_tokens, cfg.flag_fraction, cfg.flag_rule)})
        self.metrics.log_records.inc()


async def _unless_client_leaves(request: Request, work: asyncio.Future) -> Response:
    """`work`'s response, unless the client disconnects first: then `work` (the upstream request) is cancelled."""
    watch = asyncio.ensure_future(request.receive())
    try:
        finished, _ = await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work in finished:
        watch.cancel()
        return work.result()
    work.cancel()
    try:
        resp = await work
    except BaseException:  # noqa: BLE001 - cancelled, as asked
        resp = None
    if isinstance(resp, RelayResponse):
        resp.relay.end(None, False)
    return Response(status_code=499)  # nginx's "client closed request"; never sent


def build_app(gateway: Gateway) -> Starlette:
    """The ASGI app: `/health`, `/metrics`, and every other path proxied (priority set on the two above)."""

    @asynccontextmanager
    async def lifespan(app):
        await gateway.upstream.open()
        try:
            yield
        finally:
            await gateway.upstream.close()
            gateway.close_resources()

    return Starlette(routes=[Route("/health", gateway.health, methods=["GET"]),
                             Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
                             Route("/{path:path}", gateway.handle, methods=METHODS)],
                     lifespan=lifespan)
