"""Shared by the gateway tests: the fake upstream and gateway fixtures, and small httpx helpers."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from lenpred.gateway import Gateway, GatewayConfig
from lenpred.gateway.fake import FakeUpstream

LLM = "meta-llama/Llama-3.2-1B-Instruct"
TOKENS = 5  # the fake upstream's answer length
#: The gateway timeouts the fault tests provoke: short enough to keep the tests quick, long enough that a request
#: which should pass (the follow-up "still serving" one) never meets them on a busy 2-core machine.
FAULT_TIMEOUT = 2.0


def wait_for(check, timeout: float = 120.0, what: str = "the condition") -> None:
    """Poll `check()` until it is true; an AssertionError after `timeout` seconds instead of hanging."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.01)


def chat(prompt: str, model: str = LLM, **extra) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": "Be helpful."},
                                         {"role": "user", "content": prompt}], **extra}


def post(url: str, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    """POST a dict as JSON, or bytes / an iterator of bytes (httpx sends an iterator chunked) as is."""
    content = json.dumps(body).encode() if isinstance(body, dict | list) else body
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30, **kw)


def events_of(lines) -> list:
    """SSE data payloads: parsed JSON objects, or the string "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(url: str, body: dict, path: str = "/v1/chat/completions") -> tuple[int, list]:
    """(status, events) of a streamed request read to its end."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30) as resp:
        return resp.status_code, events_of(resp.iter_lines())


def content_of(events) -> list[str]:
    return [e["choices"][0]["delta"]["content"] for e in events if isinstance(e, dict) and e.get("choices")]


def log_rows(gw: Gateway) -> list[dict]:
    """Every line of the gateway's log, once all records queued so far are written; each must be whole JSON."""
    assert gw.log.flush(30)
    with open(gw.config.log_path, encoding="utf-8") as f:
        text = f.read()
    assert not text or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def upstream():
    fake = FakeUpstream(tokens=TOKENS).start()
    yield fake
    fake.close()


@pytest.fixture
def make_gateway(tiny_model, tokenizer, tmp_path):
    """make(upstream_url, model=tiny_model, clock=None, **GatewayConfig fields) -> a started Gateway."""
    gateways = []

    def make(upstream_url: str, model="tiny", clock=None, **kw) -> Gateway:
        kw.setdefault("log_path", str(tmp_path / "requests.jsonl"))
        cfg = GatewayConfig(upstream=upstream_url, port=0, **kw)
        model = tiny_model if model == "tiny" else model
        gw = Gateway(model, tokenizer, cfg, **({"clock": clock} if clock else {})).start()
        gateways.append(gw)
        return gw

    yield make
    for gw in gateways:
        gw.close()
