"""Forwarding to the upstream: an aiohttp client session (pooled keep-alive connections, timeouts), the mapping of
upstream failures to HTTP statuses, and the SSE relay that reads each answer's length off the stream as it passes.

Failures and what the client gets (the answer is never logged in these cases):

    upstream down (connect refused)          502 upstream_error, kind "connect"
    silent past --upstream-timeout, or the   504 upstream_error, kind "timeout"
    request past --request-timeout
    connection reset / closed mid-answer     502 upstream_error, kind "reset"
    gateway shutting down, grace over        503 upstream_error, kind "shutdown"

Once a stream has started its status (200) is sent, so a failure then ends the stream cleanly the way vLLM ends a
failed stream: one `data: {"error": {...}}` event, then `data: [DONE]`, then the end of the chunked body.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse

import aiohttp
from multidict import CIMultiDict

__all__ = ["Upstream", "UpstreamError", "GatewayStopping", "Tally", "SSERelay", "error_body", "error_event",
           "request_headers", "response_headers"]

# Not forwarded: hop-by-hop headers, lengths recomputed on each side, accept-encoding (the gateway reads answers).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "content-length"}
DROP_REQUEST = HOP_BY_HOP | {"host", "accept-encoding", "expect"}
DROP_RESPONSE = HOP_BY_HOP | {"date", "server"}  # uvicorn writes its own
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_REASON = re.compile(rb'"finish_reason"\s*:\s*"')      # a finish reason that is not null
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')  # a non-empty content delta (chat) or text (completions)


class GatewayStopping(Exception):
    """Raised into an upstream read when the shutdown grace period is over."""


class UpstreamError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def error_body(status: int, message: str, kind: str) -> bytes:
    """OpenAI's error shape, which clients (the openai package, LiteLLM) parse."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


def error_event(err: UpstreamError) -> bytes:
    return b"data: " + error_body(err.status, str(err), "upstream_error") + b"\n\ndata: [DONE]\n\n"


def classify(exc: BaseException, upstream: str, stopping: bool = False) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, GatewayStopping) or stopping:
        return UpstreamError(503, "shutdown", "the gateway is shutting down; retry")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(502, "connect", f"upstream {upstream} unreachable: {exc.os_error}")
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's read / connect / total timeouts subclass it
        why = str(exc) or "the request took longer than the request timeout"
        return UpstreamError(504, "timeout", f"upstream {upstream} timed out: {why}")
    return UpstreamError(502, "reset", f"upstream {upstream} failed mid-answer ({type(exc).__name__}: {exc})")


def request_headers(raw: list[tuple[bytes, bytes]]) -> CIMultiDict:
    """The client's headers (Authorization included) minus the hop-by-hop ones."""
    out = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw
                      if k.decode("latin-1").lower() not in DROP_REQUEST)
    out["Accept-Encoding"] = "identity"
    return out


def response_headers(resp: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in resp.raw_headers if k.decode("latin-1").lower() not in DROP_RESPONSE]


class Upstream:
    """One pooled aiohttp session to the upstream; opened and closed with the app (its lifespan)."""

    #: A pooled connection the upstream closes as the gateway reuses it fails before the request is handled: sent
    #: again on another connection, this many times at most.
    retries = 2

    def __init__(self, base_url: str, timeout: float, request_timeout: float = 0.0, max_connections: int = 0,
                 keepalive: float = 4.0):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {base_url!r}")
        self.base, self.prefix = base_url.rstrip("/"), url.path.rstrip("/")
        self.origin = f"{url.scheme}://{url.netloc}"
        self.timeout = aiohttp.ClientTimeout(total=request_timeout or None, sock_connect=timeout, sock_read=timeout)
        self.max_connections, self.keepalive = max_connections, keepalive
        self.session: aiohttp.ClientSession | None = None
        self.active: set[aiohttp.ClientResponse] = set()
        self.stopping = False

    async def open(self) -> None:
        # idle connections are dropped before the upstream drops them (uvicorn, hence vLLM: after 5 s)
        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=self.keepalive)
        self.session = aiohttp.ClientSession(self.origin, connector=connector, timeout=self.timeout,
                                             auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def send(self, method: str, path_qs: str, headers: CIMultiDict, body: bytes | None):
        """The upstream's response (headers read, body not yet), tracked until `done`; or UpstreamError."""
        for attempt in range(self.retries + 1):
            try:
                resp = await self.session.request(method, self.prefix + path_qs, headers=headers, data=body,
                                                  allow_redirects=False)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # closed before any answer: a keep-alive connection the upstream had just closed, or the upstream
                # went away (then the next attempt fails to connect)
                if attempt == self.retries or self.stopping or isinstance(exc, aiohttp.ClientConnectorError):
                    raise classify(exc, self.base, self.stopping) from exc
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status (classify)
                raise classify(exc, self.base, self.stopping) from exc
        self.active.add(resp)
        return resp

    async def read(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except Exception as exc:  # noqa: BLE001
            raise classify(exc, self.base, self.stopping) from exc

    def done(self, resp: aiohttp.ClientResponse, complete: bool) -> None:
        """Back to the pool if the answer was read to its end, else close the connection: vLLM and SGLang abort
        a request whose connection closes, so the upstream stops generating for a client that left."""
        self.active.discard(resp)
        if complete:
            resp.release()
        else:
            resp.close()

    def stop_reads(self) -> None:
        """Shutdown grace over: every read still waiting on the upstream raises GatewayStopping, and closing the
        session ends the requests still waiting for their answer's headers; all of them become 503s."""
        self.stopping = True
        for resp in list(self.active):
            resp.content.set_exception(GatewayStopping())
        if self.session is not None:
            asyncio.ensure_future(self.session.close())


class Tally:
    """What an answer says about its length: usage, count of non-empty content deltas (the stand-in when a stream
    has no usage), finish reason per choice, and whether the upstream reported an error."""

    __slots__ = ("usage", "chunks", "finish", "error")

    def __init__(self):
        self.usage, self.chunks, self.finish, self.error = None, 0, {}, False

    def feed(self, obj: dict, stream: bool) -> None:
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        if obj.get("error"):
            self.error = True
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict):
                continue
            if stream:
                delta = ch.get("delta") or {}
                self.chunks += bool(delta.get("content") or ch.get("text"))
            if ch.get("finish_reason") is not None or ch.get("index", 0) not in self.finish:
                self.finish[ch.get("index", 0)] = ch.get("finish_reason")

    def feed_json(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if isinstance(obj, dict):
            self.feed(obj, stream=False)

    def finish_reasons(self, n: int) -> list:
        size = max([n, *(i + 1 for i in self.finish if isinstance(i, int) and 0 <= i < 1024)])
        return [self.finish.get(i) for i in range(size)]


def _keep_event(event: bytes, tally: Tally, client_usage: bool) -> bool:
    """Tally an SSE event; False for the usage-only chunk the gateway asked for and the client did not.

    Most events are one token's delta: those are only counted, with a regex on the raw JSON (a key's quotes are
    never escaped, a string value's always are, so the patterns cannot match inside content). Events with usage,
    an error or a finish reason are parsed."""
    if b'"usage"' not in event and b'"error"' not in event and not _REASON.search(event):
        tally.chunks += len(_CONTENT.findall(event))
        return True
    keep = True
    for line in event.splitlines():
        if not line.startswith(b"data:") or line[5:].strip() in (b"", b"[DONE]"):
            continue
        try:
            obj = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(obj, dict):
            tally.feed(obj, stream=True)
            if isinstance(obj.get("usage"), dict) and not obj.get("choices") and not client_usage:
                keep = False
    return keep


class SSERelay:
    """Relays one upstream SSE answer: `events()` yields the upstream's bytes as they arrive, complete events only,
    one write per upstream read, tallied when `tally` is given. A failure mid-stream ends the stream with an error
    event. A client that leaves cancels the iteration, and `end` closes the upstream connection.

    `on_end(error, finished)` runs exactly once: (None, True) once the whole answer has been sent, (UpstreamError,
    False) after a failure, (None, False) when the client left (or the stream never started)."""

    def __init__(self, upstream: Upstream, resp, tally: Tally | None, client_usage: bool, on_end=None):
        self.upstream, self.resp, self.tally = upstream, resp, tally
        self.client_usage, self.on_end = client_usage, on_end
        self._ended = False

    def end(self, err: UpstreamError | None, finished: bool) -> None:
        if not self._ended:
            self._ended = True
            self.upstream.done(self.resp, finished)
            if self.on_end is not None:
                self.on_end(err, finished)

    async def events(self):
        tally, client_usage = self.tally, self.client_usage
        finished, err, rest = False, None, b""
        try:
            async for data in self.resp.content.iter_any():
                if tally is None:
                    yield data
                    continue
                buf, out, start = rest + data, [], 0
                for m in _EVENT_END.finditer(buf):
                    event, start = buf[start:m.end()], m.end()
                    if _keep_event(event, tally, client_usage):
                        out.append(event)
                rest = buf[start:]
                if out:
                    yield b"".join(out)
            if rest and (tally is None or _keep_event(rest, tally, client_usage)):  # last event, no blank line
                yield rest
            finished = True
        except Exception as exc:  # noqa: BLE001 - the stream has started: end it cleanly, say why
            err = classify(exc, self.upstream.base, self.upstream.stopping)
            yield error_event(err)
        finally:
            self.end(err, finished)
