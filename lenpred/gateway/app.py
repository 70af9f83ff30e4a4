"""The gateway's ASGI app (Starlette) and the `Gateway` that owns what the app uses: the model behind its
micro-batcher, the upstream session, the request log and the metrics.

The event loop never runs the model: a prediction is a future from `MicroBatcher`'s thread, awaited, so one slow
batch never holds up other requests' bytes. The proxied paths themselves: `lenpred.gateway.routes`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lenpred.gateway.config import GatewayConfig
from lenpred.gateway.logwriter import LogWriter
from lenpred.gateway.metrics import Metrics
from lenpred.gateway.policy import is_flagged
from lenpred.gateway.proxy import Tally, Upstream
from lenpred.gateway.routes import PRIORITY_PATHS, Ask, ProxyEndpoint

__all__ = ["Gateway", "build_app", "PRIORITY_PATHS"]

logger = logging.getLogger("lenpred.gateway")
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
PREDICTION_TIMEOUT = 60.0  # seconds; past it the request goes on at the default priority


class _Observed:
    """The predictor, with the size of each batch the micro-batcher hands it recorded (/metrics)."""

    def __init__(self, predictor, histogram):
        self.predictor, self.histogram = predictor, histogram

    def predict(self, prompts, tokenizer, **kw):
        self.histogram.observe(1 if isinstance(prompts, str) else len(prompts))
        return self.predictor.predict(prompts, tokenizer, **kw)

    def encode_prompts(self, prompts, tokenizer, **kw):  # online learning's path: vectors, then heads
        self.histogram.observe(len(prompts))
        return self.predictor.encode_prompts(prompts, tokenizer, **kw)

    def predict_vectors(self, vectors, llms):
        return self.predictor.predict_vectors(vectors, llms)


class Gateway:
    """`Gateway(model, tokenizer, GatewayConfig(...))`; `.app` is the ASGI app; `.start()` serves it in a thread
    (`.url`, `.close()`, or `with Gateway(...) as gw:`); `lenpred gateway` serves it in the main process.

    `model=None` (or `config.predict=False`) switches prediction off: every request gets the default priority with
    aging. `predictor`: anything with `model.predict`'s signature (a `lenpred.fast` option); default `model`, whose
    `config` resolves LLM names either way. `clock` is injectable for tests of aging.

    `config.learn`: online learning (`lenpred.gateway.learning`); `model` is the export every refit starts from,
    `learnt` (default `model`) the model served until the next refit (a learn dir's export on a restart), and
    `model_path` the export's folder, which a refit process loads (without it, refits run in a thread)."""

    def __init__(self, model, tokenizer, config: GatewayConfig, clock=time.monotonic, predictor=None, learnt=None,
                 model_path=None):
        if config.learn:  # refused before the log is opened and its writer thread started
            _check_learning(model, config, predictor)
        self.tokenizer, self.config, self.clock = tokenizer, config, clock
        self.upstream = Upstream(config.upstream, config.upstream_timeout, config.request_timeout,
                                 config.max_upstream_connections, config.upstream_keepalive)
        self.log = LogWriter(config.log_path, config.fsync) if config.log_path else None  # fails before serving
        self.metrics = Metrics(log_depth=self.log.depth if self.log else None)
        if self.log:
            self.log.on_error = self.metrics.log_errors.inc
        self.batcher, self.learner = None, None
        if config.learn:
            from lenpred.gateway.learning import Learner

            self.learner = Learner(model, tokenizer, config, self.swap_model, served=learnt, base_path=model_path)
            model = self.learner.served
            self.metrics.watch(self.learner)
        self.model = model
        if config.predict and model is not None:
            from lenpred.inference import MicroBatcher

            self.batcher = MicroBatcher(_Observed(predictor or model, self.metrics.batch_size), tokenizer,
                                        config.max_batch, config.batch_wait_ms, keep_vectors=config.learn)
        self._names: dict[str, str | None] = {}
        self.draining = False
        self.started = clock()
        self.app = build_app(self)
        self._thread_server = None

    @classmethod
    def from_export(cls, path, config: GatewayConfig, device: str | None = None, backend: str = "torch",
                    workdir: str | None = None, threads: int | None = None) -> "Gateway":
        """`backend`: "torch" (the model's fp32 fast path) or a `lenpred.fast` CPU option ("onnx", "int8", ...)
        built once from the export (ONNX files go to `workdir`, default `<export>/fast`; reused when there),
        running on `threads` CPU threads (default: the runtime's). "auto": the CPU serving path
        (`lenpred.fast.SERVING_OPTION`) where ONNX Runtime is installed and the model predicts on the CPU without
        learning, else "torch"."""
        from pathlib import Path

        from lenpred.hub import load_export

        if backend == "auto":
            from lenpred.fast import SERVING_OPTION, onnxruntime_available

            on_cpu = device is None or str(device).startswith("cpu")
            backend = (SERVING_OPTION if config.predict and not config.learn and on_cpu and onnxruntime_available()
                       else "torch")
            logger.info("backend: %s", backend)

        if config.learn and backend != "torch":
            raise ValueError(f"--learn refits the model while it serves, which the {backend!r} backend's built files "
                             "cannot follow: use --backend torch")
        model, tokenizer = load_export(path, device=device)
        predictor = None
        if backend != "torch" and config.predict:
            from lenpred.fast import build_option

            predictor = build_option(backend, model, tokenizer, workdir or Path(path) / "fast", threads=threads,
                                     spin=False)  # the event loop and the engine's traffic share these cores
        learnt = None
        if config.learn and config.learn_dir and (Path(config.learn_dir) / "config.json").exists():
            learnt = load_export(config.learn_dir, device=device)[0]  # what the gateway served when it stopped
        gw = cls(model, tokenizer, config, predictor=predictor, learnt=learnt, model_path=path)
        if gw.learner is not None:
            remembered = gw.learner.restore(config.log_path)
            logger.info("online learning: %d logged answer(s) remembered%s", remembered,
                        f", serving {config.learn_dir}" if learnt is not None else "")
            gw.learner.start()
        return gw

    def swap_model(self, model) -> None:
        """Serve `model` from the next prediction batch on (online learning's refits)."""
        self.model, self._names = model, {}
        if self.batcher is not None:
            self.batcher.model = _Observed(model, self.metrics.batch_size)

    # -- running in-process -------------------------------------------------------------------------------------
    def start(self) -> "Gateway":
        from lenpred.gateway.server import ServerThread

        self._thread_server = ServerThread(self.app, self.config.host, self.config.port, gateway=self).start()
        return self

    @property
    def url(self) -> str:
        if self._thread_server is None:
            raise RuntimeError("the gateway is not running in this process: call .start() first")
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
        if self.learner is not None:
            self.learner.close()
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

    async def predict(self, prompt: str | None, llm: str | None) -> tuple:
        """(mean, std, bound, prompt vector): mean and std in tokens, or None: use the default priority; the bound
        and the vector only when learning (then an LLM the model does not know still gets its vector)."""
        if self.batcher is None or prompt is None or (llm is None and self.learner is None):
            return None, None, None, None
        t0 = time.perf_counter()
        try:  # shielded: a request cancelled meanwhile must not cancel the batcher's future under it
            got = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.batcher.submit(prompt, llm))),
                                         PREDICTION_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a failed prediction costs the request its priority, not its answer
            logger.warning("prediction failed, default priority used: %r", exc)
            return None, None, None, None
        if llm is not None:
            self.metrics.prediction_seconds.observe(time.perf_counter() - t0)
        return got if len(got) == 4 else (*got, None, None)

    def upstream_failed(self, err, path: str) -> None:
        """Count an upstream failure, and say what it was (as a proxy's error log does)."""
        self.metrics.upstream_errors.labels(err.kind).inc()
        logger.warning("%s -> %d: %s", path, err.status, err)

    async def health(self, request: Request) -> Response:
        if self.draining:
            return Response(b'{"status": "draining"}', 503, media_type="application/json")
        return Response(b'{"status": "ok"}', 200, media_type="application/json")

    async def metrics_endpoint(self, request: Request) -> Response:
        body, ctype = self.metrics.render()
        return Response(body, 200, headers={"content-type": ctype})

    def record(self, ask: Ask, tally: Tally) -> None:
        """One log line per finished answer (the package docstring lists the fields)."""
        if self.log is None:
            return
        usage = tally.usage or {}
        if isinstance(usage.get("completion_tokens"), int):
            total, source = usage["completion_tokens"], "usage"
        else:
            total, source = tally.chunks, "chunks"
        actual, cfg = total / ask.n, self.config
        record = {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "endpoint": ask.endpoint, "model": ask.model, "prompt_text": ask.prompt,
            "input_size": usage.get("prompt_tokens"),
            "output_sizes": [total] if ask.n == 1 else None, "output_mean": actual,
            "predicted_mean": ask.mean, "predicted_std": ask.std, "priority": ask.priority,
            "latency_s": round(time.monotonic() - ask.arrived, 6), "stream": ask.stream, "usage_source": source,
            "finish_reasons": tally.finish_reasons(ask.n), "max_tokens": ask.max_tokens,
            "flagged": is_flagged(ask.mean, actual, cfg.flag_tokens, cfg.flag_fraction, cfg.flag_rule)}
        self.log.write(record)
        self.metrics.log_records.inc()
        if self.learner is not None and isinstance(ask.model, str):
            self.learner.observe(record, ask.vector, ask.bound)

    async def llms_endpoint(self, request: Request) -> Response:
        """`GET /llms`: the LLMs predicted for, and with `--learn` what each has learnt and how it scores."""
        known = list(self.model.config.llm_names) if self.model is not None else []
        body = {"learning": self.learner is not None, "predicted": known,
                "llms": self.learner.llms() if self.learner is not None else {}}
        return Response(json.dumps(body).encode(), 200, media_type="application/json")


def _check_learning(model, config: GatewayConfig, predictor) -> None:
    """Online learning's preconditions, each a clear error before serving."""
    if model is None or not config.predict:
        raise ValueError("--learn needs a model and prediction on (it refits the model's LLMs)")
    if not config.log_path:
        raise ValueError("--learn needs --log: the request log is what a restart rebuilds the learner from")
    if predictor is not None:
        raise ValueError("--learn refits the model while it serves, which a prebuilt predictor backend cannot "
                         "follow: use the torch backend")
    for name in ("learn_every", "learn_min_answers", "learn_memory", "learn_window"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.learn_memory < config.learn_min_answers or config.learn_interval < 0:
        raise ValueError("--learn-memory must hold --learn-min-answers answers, and --learn-interval be >= 0")
    if not hasattr(model, "encode_prompts"):
        raise ValueError("--learn needs a model with encode_prompts / predict_vectors (re-export it with this "
                         "version)")


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
                             Route("/llms", gateway.llms_endpoint, methods=["GET"]),
                             Route("/{path:path}", ProxyEndpoint(gateway), methods=METHODS)],
                     lifespan=lifespan)
