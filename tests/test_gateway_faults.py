"""The gateway under faults (fake upstream with fault switches, gates instead of sleeps): upstream 5xx, down, reset
mid-stream, stalled past the timeout; client gone mid-stream or before the answer; slow request bodies; SIGTERM
under load; a log that fails. Each: the client gets a clear status or a cleanly ended stream, the gateway keeps
serving, and the log holds exactly one whole line per finished answer."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from _gateway_util import (FAULT_TIMEOUT, LLM, TOKENS, chat, content_of, events_of, log_rows,  # noqa: F401
                           make_gateway, post, stream, upstream, wait_for)


def error_events(events) -> list[dict]:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


def still_serving(gw, upstream, prompt: str = "after the fault") -> None:
    """The gateway answers the next request, and logs it."""
    upstream.status, upstream.stall, upstream.gate_after, upstream.reset_after = 200, False, None, None
    assert post(gw.url, chat(prompt)).status_code == 200
    assert log_rows(gw)[-1]["prompt_text"] == prompt


def metric(gw, name: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_upstream_5xx_is_returned_with_its_status(upstream, make_gateway):
    upstream.status = 503
    gw = make_gateway(upstream.url)
    resp = post(gw.url, chat("Hello"))
    assert resp.status_code == 503 and resp.json()["error"]["message"] == "boom"
    assert stream(gw.url, chat("Hello"))[0] == 503
    assert log_rows(gw) == []  # failed requests are not training data
    assert metric(gw, 'lenpred_gateway_upstream_errors_total{kind="status_5xx"}') == 2
    still_serving(gw, upstream)


def test_upstream_down_is_502(make_gateway):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    gw = make_gateway(f"http://127.0.0.1:{port}")
    resp = post(gw.url, chat("Hello"))
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "upstream_error"
    assert "unreachable" in resp.json()["error"]["message"]
    assert httpx.get(gw.url + "/v1/models").status_code == 502 and stream(gw.url, chat("Hi"))[0] == 502
    assert log_rows(gw) == [] and httpx.get(gw.url + "/health").status_code == 200


def test_upstream_reset_mid_stream_ends_the_stream_cleanly(upstream, make_gateway):
    upstream.reset_after = 2  # two events, then the connection drops without ending the body
    gw = make_gateway(upstream.url)
    status, events = stream(gw.url, chat("Story"))  # httpx raises if the chunked body is not ended properly
    assert status == 200 and content_of(events) == ["c0 ", "c1 "] and events[-1] == "[DONE]"
    (err,) = error_events(events)
    assert err["type"] == "upstream_error" and err["code"] == 502 and "failed mid-answer" in err["message"]
    assert log_rows(gw) == []
    assert metric(gw, 'lenpred_gateway_upstream_errors_total{kind="reset"}') == 1
    still_serving(gw, upstream)


def test_upstream_stalled_past_the_timeout(upstream, make_gateway):
    gw = make_gateway(upstream.url, upstream_timeout=FAULT_TIMEOUT)
    upstream.stall = True  # holds the request before its headers until the gate opens (never, here)
    resp = post(gw.url, chat("Hello"))
    assert resp.status_code == 504 and "timed out" in resp.json()["error"]["message"]
    upstream.stall, upstream.gate_after = False, 1  # now: one event, then silence
    status, events = stream(gw.url, chat("Story"))
    assert status == 200 and content_of(events) == ["c0 "] and events[-1] == "[DONE]"
    assert error_events(events)[0]["code"] == 504
    assert log_rows(gw) == []
    assert metric(gw, 'lenpred_gateway_upstream_errors_total{kind="timeout"}') == 2
    whole = make_gateway(upstream.url, request_timeout=FAULT_TIMEOUT, log_path=None)  # a deadline for the whole request
    status, events = stream(whole.url, chat("Story"))
    assert status == 200 and content_of(events) == ["c0 "] and events[-1] == "[DONE]"
    assert "longer than the request timeout" in error_events(events)[0]["message"]
    upstream.gate.set()
    still_serving(gw, upstream)


def test_connection_closed_before_the_answer_is_sent_again(upstream, make_gateway):
    """A pooled connection that the upstream closes just as it is reused (its keep-alive ran out) fails before the
    request was handled: it is sent again on another connection, twice at most, then it is a 502."""
    import aiohttp

    gw = make_gateway(upstream.url)
    fails = [2]

    class Flaky:  # the session, but its first requests meet a connection closed under them
        def __init__(self, session):
            self.session = session

        async def request(self, *args, **kw):
            if fails[0]:
                fails[0] -= 1
                raise aiohttp.ServerDisconnectedError()
            return await self.session.request(*args, **kw)

        async def close(self):
            await self.session.close()

    gw.upstream.session = Flaky(gw.upstream.session)
    assert post(gw.url, chat("Hello")).status_code == 200 and len(upstream.received) == 1
    fails[0] = 3
    resp = post(gw.url, chat("Hello"))
    assert resp.status_code == 502 and "failed" in resp.json()["error"]["message"]
    assert len(upstream.received) == 1 and len(log_rows(gw)) == 1


def test_client_gone_mid_stream_cancels_the_upstream(upstream, make_gateway):
    upstream.gate_after = 1
    gw = make_gateway(upstream.url)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat("Story", stream=True), timeout=30) as resp:
        assert next(line for line in resp.iter_lines() if line).startswith("data: ")
    # the client closed its connection mid-stream: the gateway closes the upstream one, the upstream sees it
    assert upstream.cancelled.wait(10)
    still_serving(gw, upstream)
    assert [r["prompt_text"] for r in log_rows(gw)] == ["after the fault"]  # the cut answer is not logged
    assert metric(gw, "lenpred_gateway_requests_in_flight") == 0


def test_client_gone_before_the_answer_cancels_the_upstream(upstream, make_gateway):
    upstream.stall = True
    gw = make_gateway(upstream.url)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on the stalled answer and closes its connection
        httpx.post(gw.url + "/v1/chat/completions", json=chat("Hello"), timeout=httpx.Timeout(30, read=FAULT_TIMEOUT))
    assert upstream.cancelled.wait(10)  # the stalled upstream request was closed by the gateway
    still_serving(gw, upstream)
    assert len(log_rows(gw)) == 1


def test_slow_request_body_past_the_request_timeout_is_408(upstream, make_gateway):
    import aiohttp

    gw = make_gateway(upstream.url, request_timeout=FAULT_TIMEOUT)

    async def main():
        never = asyncio.Event()

        async def body():  # half a body, then nothing
            yield b'{"model": "x", '
            await never.wait()

        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", data=body()) as resp:
                return resp.status, await resp.json()

    status, obj = asyncio.run(main())
    assert status == 408 and "not received within" in obj["error"]["message"]
    assert upstream.received == []
    still_serving(gw, upstream)


def test_log_write_failures_are_retried_whole(upstream, make_gateway):
    """A disk that fails (ENOSPC twice, then a short write): every line lands once, whole, in order."""
    gw = make_gateway(upstream.url)
    gw.log.retry_delay = 0.01
    real, calls = os.write, []

    def flaky(fd, data):
        calls.append(len(data))
        if len(calls) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        if len(calls) == 3:
            return real(fd, bytes(data[:7]))  # a short write: the rest follows in the next call
        return real(fd, data)

    gw.log._write = flaky
    for i in range(3):
        assert post(gw.url, chat(f"Question {i}")).status_code == 200
    assert [r["prompt_text"] for r in log_rows(gw)] == [f"Question {i}" for i in range(3)]
    assert len(calls) >= 4 and metric(gw, "lenpred_gateway_log_write_errors_total") == 2


def test_closed_mid_stream_ends_the_stream_after_the_grace(upstream, make_gateway):
    """Past the shutdown grace, a stream still open ends cleanly with a 503 error event, and a request still
    waiting for its answer's headers gets 503."""
    gw = make_gateway(upstream.url, shutdown_timeout=FAULT_TIMEOUT)
    assert post(gw.url, chat("Logged first")).status_code == 200
    upstream.stall, waiting = True, []
    stalled = threading.Thread(target=lambda: waiting.append(post(gw.url, chat("Stalled"))))
    stalled.start()
    wait_for(lambda: len(upstream.received) >= 2, what="the stalled request at the upstream")
    upstream.stall, upstream.gate_after = False, 1
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat("Story", stream=True), timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        closer = threading.Thread(target=gw.close)  # the upstream stays silent past the grace
        closer.start()
        events = events_of(lines)
    closer.join(30)
    stalled.join(30)
    assert events[-1] == "[DONE]" and error_events(events)[0]["code"] == 503
    assert waiting[0].status_code == 503 and "shutting down" in waiting[0].json()["error"]["message"]
    assert [r["prompt_text"] for r in log_rows(gw)] == ["Logged first"]


def _start_cli(args, env=None):
    """The `lenpred gateway` process; returns (process, its URL, a queue of its stderr lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "lenpred.cli", "gateway", "--port", "0", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    return proc, _wait_for(lines, "LenPred gateway on ", 120).split("LenPred gateway on ")[1].split()[0], lines


def _wait_for(lines: queue.Queue, text: str, timeout: float = 60.0) -> str:
    """The first stderr line holding `text`; an AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on stderr within {timeout:g} s"
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if text in line:
            return line


def test_sigterm_under_load(upstream, tmp_path):
    """`lenpred gateway` sent SIGTERM with 32 streams mid-answer: new connections are refused, the streams finish,
    the process exits 0 and the log holds one whole line per answer. (Past the grace the streams are ended
    cleanly: test_closed_mid_stream_ends_the_stream_after_the_grace, the same shutdown path in-process.)"""
    import aiohttp

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = tmp_path / "requests.jsonl"
    proc, url, lines = _start_cli(["--no-predict", "--upstream", upstream.url, "--log", str(log),
                                   "--shutdown-timeout", "30"],
                                  env={"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
    try:
        assert post(url, chat("before")).status_code == 200
        upstream.gate_after = 1
        n = 32

        async def main():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                async def one(i):
                    async with s.post(url + "/v1/chat/completions", json=chat(f"p{i}", stream=True)) as resp:
                        first = await resp.content.readline()
                        return resp.status, first + await resp.read()

                tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
                deadline = time.monotonic() + 60
                while len(upstream.received) < n + 1:  # every stream is under way at the upstream
                    assert time.monotonic() < deadline, "the streams did not all reach the upstream"
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                await asyncio.get_running_loop().run_in_executor(None, _wait_for, lines, "draining:")
                with pytest.raises(httpx.ConnectError):
                    httpx.get(url + "/health")
                upstream.gate.set()
                return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        assert proc.wait(60) == 0
    finally:
        upstream.gate.set()
        if proc.poll() is None:
            proc.kill()
    for status, body in results:
        events = events_of(body.decode().splitlines())
        assert status == 200 and events[-1] == "[DONE]"
        assert content_of(events) == [f"c{i} " for i in range(TOKENS)] and not error_events(events)
    text = log.read_text()
    assert text.endswith("\n")
    prompts = sorted(json.loads(x)["prompt_text"] for x in text.splitlines())
    assert prompts == sorted(["before", *(f"p{i}" for i in range(n))])
