"""A fake OpenAI-format upstream that streams at a set token rate, with switches for the faults a real server has:
for the gateway's tests and load benchmark, and to try the gateway without an LLM.

    python -m lenpred.gateway.fake --port 8000 --tokens 64 --token-rate 50

Chat and completions requests are answered with `tokens` tokens ("c0 ", "c1 ", ...; fewer when the request's
max_tokens is smaller, then with finish_reason "length"), streamed one SSE event per token at `token_rate` tokens/s
(0: as fast as it can), usage in the last chunk when asked for. Fault switches, settable while it runs: `status`
(answer every request with that error status), `stall` (hold every request before its headers until `gate` is
set), `gate_after` (hold each stream after that many events until `gate` is set), `reset_after` (close the
connection after that many events, with no end of body). Every JSON body received is kept in `received`; a stream
that its client left before the end sets `cancelled`. `GET /fake/stats` counts requests by their "user" field
(the load benchmark's request ids).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = ["FakeUpstream", "main"]


class _Reset(Exception):
    """Raised mid-stream: uvicorn then drops the connection without ending the chunked body."""


class FakeUpstream:
    """The fake server: `.app` (ASGI), or `.start()` in a thread (`.url`, `.close()`); switches as attributes.
    `tokens`: the answer length, or a function of the request body giving one per request."""

    def __init__(self, tokens: int = 5, token_rate: float = 0.0, status: int = 200, usage_in_stream: bool = True,
                 models=("meta-llama/Llama-3.2-1B-Instruct",)):
        self.tokens, self.token_rate, self.status, self.usage_in_stream = tokens, token_rate, status, usage_in_stream
        self.models = list(models)
        self.gate = threading.Event()
        self.stall, self.gate_after, self.reset_after = False, None, None
        self.received: list[dict] = []
        self.by_user: collections.Counter = collections.Counter()
        self.cancelled = threading.Event()
        self.app = Starlette(routes=[Route("/v1/models", self.models_endpoint, methods=["GET"]),
                                     Route("/fake/stats", self.stats, methods=["GET"]),
                                     Route("/v1/chat/completions", self.complete, methods=["POST"]),
                                     Route("/v1/completions", self.complete, methods=["POST"])])
        self._server = None

    # -- in-process serving -----------------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> "FakeUpstream":
        from lenpred.gateway.server import ServerThread

        self._server = ServerThread(self.app, host, port, timeout_graceful_shutdown=1).start()
        return self

    @property
    def url(self) -> str:
        return self._server.url

    def close(self) -> None:
        self.gate.set()
        if self._server:
            self._server.stop()
            self._server = None

    # -- endpoints --------------------------------------------------------------------------------------------
    async def models_endpoint(self, request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return _json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models],
                           "path": path})

    async def stats(self, request: Request) -> Response:
        return _json(200, {"received": sum(self.by_user.values()), "distinct": len(self.by_user),
                           "duplicated": sorted(u for u, c in self.by_user.items() if c > 1)})

    async def complete(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.received.append(body)
        self.by_user[body.get("user")] += 1
        if self.stall:
            await _wait(self.gate, request)
            if await request.is_disconnected():
                self.cancelled.set()  # the client gave up on the stalled request
                return _json(499, {})
        if self.status != 200:
            return _json(self.status, {"error": {"message": "boom", "type": "server_error"}})
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        wants = self.tokens(body) if callable(self.tokens) else self.tokens  # a length per request (tests)
        n_tok = min(wants, cap) if isinstance(cap, int) and cap > 0 else wants
        reason = "length" if n_tok < wants else "stop"
        chat = request.url.path.endswith("/chat/completions")
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "hi"}} if chat else
                      {"index": 0, "text": "hi"})
            return _json(200, {"id": "fake", "object": "chat.completion" if chat else "text_completion",
                               "model": body.get("model"), "choices": [{**choice, "finish_reason": reason}],
                               "usage": {"prompt_tokens": 9, "completion_tokens": n_tok,
                                         "total_tokens": 9 + n_tok}})
        usage = self.usage_in_stream and (body.get("stream_options") or {}).get("include_usage")
        return StreamingResponse(self._events(body.get("model"), chat, n_tok, reason, usage),
                                 media_type="text/event-stream")

    async def _events(self, model, chat: bool, n_tok: int, reason: str, usage: bool):
        head = json.dumps({"id": "fake", "object": "chat.completion.chunk" if chat else "text_completion",
                           "model": model})[:-1]
        finished = False
        try:
            for i in range(n_tok):
                part = {"delta": {"content": f"c{i} "}} if chat else {"text": f"c{i} "}
                choice = {"index": 0, **part, "finish_reason": reason if i == n_tok - 1 else None}
                yield f'data: {head}, "choices": [{json.dumps(choice)}]}}\n\n'.encode()
                sent = i + 1
                if sent == self.reset_after:
                    raise _Reset("reset mid-stream (fault switch)")
                if sent == self.gate_after:
                    await _wait(self.gate)
                if self.token_rate > 0:
                    await asyncio.sleep(1.0 / self.token_rate)
            if usage:
                yield (f'data: {head}, "choices": [], "usage": {{"prompt_tokens": 9, "completion_tokens": {n_tok}, '
                       f'"total_tokens": {9 + n_tok}}}}}\n\n').encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.cancelled.set()


async def _wait(event: threading.Event, request: Request | None = None, timeout: float = 60.0) -> None:
    """Until `event` is set (or `timeout`), without blocking the loop; early when `request`'s client leaves."""
    loop = asyncio.get_running_loop()
    for _ in range(int(timeout / 0.05)):
        if await loop.run_in_executor(None, event.wait, 0.05) or (request and await request.is_disconnected()):
            return


def _json(status: int, obj) -> Response:
    return Response(json.dumps(obj).encode(), status, media_type="application/json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lenpred.gateway.fake", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    ap.add_argument("--token-rate", type=float, default=50.0, help="tokens per second per stream (0: no wait)")
    ap.add_argument("--model", action="append", help="model id(s) listed by /v1/models")
    args = ap.parse_args(argv)
    import uvicorn

    fake = FakeUpstream(args.tokens, args.token_rate, models=args.model or ("meta-llama/Llama-3.2-1B-Instruct",))
    uvicorn.run(fake.app, host=args.host, port=args.port, access_log=False, log_level="warning", backlog=4096)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
