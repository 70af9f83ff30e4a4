"""An OpenAI-compatible gateway that sets each request's scheduling `priority` from LenPred's length prediction.

    client ──► gateway (predict length, set "priority") ──► vLLM `--scheduling-policy priority`
                                                           or SGLang `--enable-priority-scheduling
                                                           --schedule-low-priority-values-first`

Standard library only (plus the model). POST /v1/chat/completions and /v1/completions get a `priority` (lower runs
first); every other path is proxied as is. SSE streams are relayed event by event.

Priority (an int, lower = sooner), with `t` = seconds since the gateway started when the request arrived:

    priority = round(predicted_mean_tokens) + floor(aging_rate * t)        (known LLM)
    priority = default_priority             + floor(aging_rate * t)        (unknown LLM, no usable prompt, or a
                                                                            prediction error)

The upstream compares the priorities of requests waiting at the same moment `now`; subtracting the aging credit
`aging_rate * (now - arrival)` from every one of them gives the same order as the formula above (the common
`aging_rate * now` cancels), so fixed priorities sent once age correctly: a request predicted L tokens longer than
a newcomer is overtaken by newcomers for at most L / aging_rate seconds, hence none starves. `aging_rate` is in
tokens per second (0 disables aging: pure shortest-predicted-first). Unknown LLMs age at the same rate.

Prompt used for prediction: /v1/completions `prompt` (a string, or a list of one string); chat requests use the
*last user message* (text parts of a content list joined by newlines), which is what CASTILLO's single-turn prompts
look like; `chat_prompt="all"` concatenates every message's content instead. The same text is logged.

Log (`log_path`, JSONL, append-only, O_APPEND; one writer thread writes whole lines only, one write + one fsync
per group of queued records, and drains the queue on close, so a gateway stopped mid-stream never leaves a partial
line; a torn last line from a crash is closed by a newline on reopen; `load_rows` / `train.py --dataset` read it):
one line per finished 200 answer with a prompt text, fields: timestamp (UTC ISO), endpoint, model (the LLM id the
model resolved, else the name the client sent), prompt_text, input_size (usage.prompt_tokens or null),
output_sizes ([completion_tokens], or null when n > 1), output_mean (completion_tokens / n), predicted_mean,
predicted_std (null for unknown LLMs), priority, latency_s, stream, usage_source ("usage", or "chunks" when a
stream had no usage chunk and the count of non-empty content deltas stands in for completion_tokens), flagged.
`flagged` follows the issue's wording of Cheng et al. 2024's online-learning rule: |predicted - actual| > 10
tokens OR > 10 % of the actual (the literal reading; `flag_rule="and"` for both; thresholds configurable); null
when there was no prediction.
`upstream` is the server's base URL (no `/v1`); the client's headers (e.g. Authorization) are forwarded.
Streams are forwarded with `stream_options.include_usage = true`; the usage-only final chunk is dropped from the
relay when the client had not asked for it. Answers cut short by the client are not logged.
"""

from __future__ import annotations

import datetime
import http.client
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lenpred.inference import MicroBatcher

__all__ = ["GatewayConfig", "Gateway", "compute_priority", "is_flagged"]

logger = logging.getLogger(__name__)
PRIORITY_PATHS = ("/v1/chat/completions", "/v1/completions")
# Not forwarded: hop-by-hop headers, lengths we recompute, and accept-encoding (we parse the answers).
DROP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}


def compute_priority(predicted_mean: float | None, seconds_since_start: float, default_priority: int,
                     aging_rate: float) -> int:
    """The module docstring's formula."""
    base = default_priority if predicted_mean is None else int(round(predicted_mean))
    return int(base + math.floor(aging_rate * max(seconds_since_start, 0.0)))


def is_flagged(predicted: float | None, actual: float, tokens: float = 10.0, fraction: float = 0.10,
               rule: str = "or") -> bool | None:
    """Cheng et al. 2024's rule as the issue and paper word it ("error exceeded 10 tokens or 10 %"): error >
    `tokens` OR error > `fraction` * actual, i.e. error > min(tokens, fraction * actual). `rule="and"` flags only
    errors above both (error > max(...)), the stricter reading."""
    if predicted is None:
        return None
    err = abs(predicted - actual)
    big, rel = err > tokens, err > fraction * actual
    return bool(big or rel) if rule == "or" else bool(big and rel)


@dataclass
class GatewayConfig:
    upstream: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8080
    log_path: str | None = None
    default_priority: int = 1000
    aging_rate: float = 10.0          # tokens of priority per second of arrival time
    chat_prompt: str = "last_user"    # or "all"
    batch_wait_ms: float = 0.0        # 0: batch whatever queued up while the model was busy
    max_batch: int = 64
    upstream_timeout: float = 600.0
    fsync: bool = True
    flag_tokens: float = 10.0
    flag_fraction: float = 0.10
    flag_rule: str = "or"             # or "and"


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class Gateway:
    """`Gateway(model, tokenizer, GatewayConfig(...)).start()` serves in a thread; `.close()` stops it."""

    def __init__(self, model, tokenizer, config: GatewayConfig, clock=time.monotonic, predictor=None):
        """`predictor`: anything with `model.predict`'s signature (e.g. a `lenpred.fast` option); default `model`,
        whose `config` resolves the LLM names either way."""
        self.model, self.config, self.clock = model, config, clock
        url = urllib.parse.urlsplit(config.upstream)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"upstream must be an http(s) URL, got {config.upstream!r}")
        self._up = (url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80), url.path.rstrip("/"))
        gateway = self

        class Handler(_Handler):
            gw = gateway
        self.server = _Server((config.host, config.port), Handler)
        self._thread: threading.Thread | None = None
        self._log_q: queue.SimpleQueue = queue.SimpleQueue()
        self._log_thread = None
        if config.log_path:
            fd = os.open(config.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size and not _ends_with_newline(config.log_path):
                os.write(fd, b"\n")  # a torn line from a crash stays alone (load_rows skips it)
            self._log_thread = threading.Thread(target=self._log_writer, args=(fd,), name="lenpred-log", daemon=True)
            self._log_thread.start()
        self.batcher = MicroBatcher(predictor or model, tokenizer, config.max_batch, config.batch_wait_ms)
        self.started = clock()

    @classmethod
    def from_export(cls, path, config: GatewayConfig, device: str | None = None, backend: str = "torch",
                    workdir: str | None = None) -> "Gateway":
        """`backend`: "torch" (the model's fp32 fast path) or a `lenpred.fast` CPU option ("onnx", "int8", ...)
        built once from the export (ONNX files go to `workdir`, default `<export>/fast`)."""
        from lenpred.hub import load_export

        model, tokenizer = load_export(path, device=device)
        predictor = None
        if backend != "torch":
            from lenpred.fast import build_option

            predictor = build_option(backend, model, tokenizer, workdir or Path(path) / "fast")
        return cls(model, tokenizer, config, predictor=predictor)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Gateway":
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), name="lenpred-gateway",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread:
            self.server.shutdown()
        self.server.server_close()
        self.batcher.close()
        if self._log_thread:  # write what is queued, then stop; later records are dropped whole
            self._log_q.put(None)
            self._log_thread.join(timeout=30)
            self._log_thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- per request ---------------------------------------------------------------------------------------------
    def prompt_of(self, path: str, body: dict) -> str | None:
        if path.endswith("/chat/completions"):
            msgs = [m for m in body.get("messages") or [] if isinstance(m, dict)]
            if self.config.chat_prompt == "all":
                text = "\n".join(t for m in msgs if (t := _text(m.get("content"))))
            else:
                text = next((_text(m.get("content")) for m in reversed(msgs) if m.get("role") == "user"), "")
        else:
            p = body.get("prompt")
            text = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str) else p
        return text if isinstance(text, str) and text.strip() else None

    def predict(self, prompt: str | None, name) -> tuple[str | None, float | None, float | None]:
        """(resolved LLM id or None, mean, std); None values mean "use the default priority"."""
        if prompt is None or not isinstance(name, str):
            return None, None, None
        try:
            llm = self.model.config.resolve_llm(name)
        except (ValueError, TypeError):
            return None, None, None
        try:
            mean, std = self.batcher.submit(prompt, llm).result(timeout=60)
        except Exception as exc:
            logger.warning("prediction failed, default priority used: %s", exc)
            return llm, None, None
        return llm, mean, std

    def write_log(self, record: dict) -> None:
        if self._log_thread:
            self._log_q.put((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def _log_writer(self, fd: int) -> None:
        """Group commit: write every queued line (complete lines only) with one write, then one fsync."""
        stop = False
        while not stop:
            lines = [self._log_q.get()]
            while True:
                try:
                    lines.append(self._log_q.get_nowait())
                except queue.Empty:
                    break
            stop = None in lines
            data = memoryview(b"".join(x for x in lines if x is not None))
            while data:
                data = data[os.write(fd, data):]
            if self.config.fsync:
                os.fsync(fd)
        os.close(fd)

    def connect(self) -> http.client.HTTPConnection:
        scheme, host, port, _ = self._up
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return cls(host, port, timeout=self.config.upstream_timeout)


def _ends_with_newline(path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class _Server(ThreadingHTTPServer):
    daemon_threads, request_queue_size = True, 1024  # listen() backlog for bursts of new connections


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lenpred-gateway"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
    gw: Gateway

    def log_message(self, fmt, *args):  # access log at debug level only
        logger.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._proxy()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _send(self, status: int, body: bytes, headers=(("Content-Type", "application/json"),)) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        gw, cfg = self.gw, self.gw.config
        arrived, since_start = time.monotonic(), gw.clock() - gw.started
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise ValueError("chunked request bodies are not supported; send Content-Length")
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        except ValueError as exc:
            self.close_connection = True
            return self._send(400, _error_body(400, str(exc), "invalid_request_error"))
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        ctx = None
        if self.command == "POST" and path in PRIORITY_PATHS:
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
            except ValueError as exc:
                return self._send(400, _error_body(400, f"Invalid JSON body: {exc}", "invalid_request_error"))
            prompt = gw.prompt_of(path, body)
            llm, mean, std = gw.predict(prompt, body.get("model"))
            body["priority"] = compute_priority(mean, since_start, cfg.default_priority, cfg.aging_rate)
            stream = bool(body.get("stream"))
            client_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
            if stream:
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            raw = json.dumps(body).encode()
            n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
            ctx = {"endpoint": path, "model": llm or body.get("model"), "prompt_text": prompt, "mean": mean,
                   "std": std, "priority": body["priority"], "stream": stream, "n": n, "client_usage": client_usage}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in DROP_HEADERS}
        conn = gw.connect()
        try:
            conn.request(self.command, gw._up[3] + self.path, body=raw if raw or self.command == "POST" else None,
                         headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            timeout = isinstance(exc, TimeoutError)
            return self._send(504 if timeout else 502, _error_body(
                504 if timeout else 502, f"upstream {cfg.upstream} unreachable: {exc}", "upstream_error"))
        try:
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in DROP_HEADERS]
            if "text/event-stream" in (resp.getheader("Content-Type") or ""):
                usage, chunks = self._relay_stream(resp, out, ctx)
            else:
                data = resp.read()
                self._send(resp.status, data, out)
                usage, chunks = (_usage(data) if ctx and resp.status == 200 else None), 0
        except (OSError, http.client.HTTPException) as exc:  # client gone, or upstream died mid-answer
            logger.info("%s %s aborted: %s", self.command, self.path, exc)
            self.close_connection = True
            return
        finally:
            conn.close()
        if ctx and ctx["prompt_text"] and resp.status == 200 and (usage or chunks):
            self._log(ctx, usage, chunks, time.monotonic() - arrived)

    def _relay_stream(self, resp, headers, ctx) -> tuple[dict | None, int]:
        """Forward SSE events one chunked-encoding chunk each; return (usage, count of content deltas)."""
        self.send_response(resp.status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        usage, chunks, event, done = None, 0, [], False
        while not done:
            line = resp.readline()
            done = not line
            if line:
                event.append(line)
            if not event or (line not in (b"\n", b"\r\n") and not done):
                continue
            data = b"".join(event)
            event = []
            keep = True
            if ctx:
                for obj in _sse_json(data):
                    if isinstance(obj.get("usage"), dict):
                        usage = obj["usage"]
                        keep = ctx["client_usage"] or bool(obj.get("choices"))
                    for ch in obj.get("choices") or []:
                        delta = ch.get("delta") or {}
                        chunks += bool(delta.get("content") or ch.get("text"))
            if keep:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")
        return usage, chunks

    def _log(self, ctx, usage, chunks, latency) -> None:
        if usage and isinstance(usage.get("completion_tokens"), int):
            total, source = usage["completion_tokens"], "usage"
        else:
            total, source = chunks, "chunks"
        actual = total / ctx["n"]
        cfg = self.gw.config
        self.gw.write_log({
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "endpoint": ctx["endpoint"], "model": ctx["model"], "prompt_text": ctx["prompt_text"],
            "input_size": (usage or {}).get("prompt_tokens"),
            "output_sizes": [total] if ctx["n"] == 1 else None, "output_mean": actual,
            "predicted_mean": ctx["mean"], "predicted_std": ctx["std"], "priority": ctx["priority"],
            "latency_s": round(latency, 6), "stream": ctx["stream"], "usage_source": source,
            "flagged": is_flagged(ctx["mean"], actual, cfg.flag_tokens, cfg.flag_fraction, cfg.flag_rule)})


def _usage(data: bytes) -> dict | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj.get("usage") if isinstance(obj, dict) and isinstance(obj.get("usage"), dict) else None


def _sse_json(event: bytes):
    for line in event.splitlines():
        if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
            try:
                obj = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj
