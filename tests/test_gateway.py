"""The OpenAI-compatible gateway against the fake OpenAI-format upstream on loopback (tiny random model): priority,
prompts, streaming, the log, bad input, load. Faults and shutdown: test_gateway_faults.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
from _gateway_util import (LLM, TOKENS, chat, content_of, events_of, log_rows, make_gateway, post,  # noqa: F401
                           stream, upstream, wait_for)

from lenpred.gateway import Gateway, GatewayConfig, compute_priority, is_flagged
from lenpred.gateway.fake import FakeUpstream

LOG_KEYS = {"timestamp", "endpoint", "model", "prompt_text", "input_size", "output_sizes", "output_mean",
            "predicted_mean", "predicted_std", "priority", "latency_s", "stream", "usage_source", "flagged",
            "finish_reasons", "max_tokens"}


def test_formula_and_flag_rule():
    assert compute_priority(123.4, 0.0, 1000, 10.0) == 123
    assert compute_priority(123.4, 2.55, 1000, 10.0) == 123 + 25
    assert compute_priority(None, 1.0, 1000, 3.0) == 1003
    assert is_flagged(None, 50) is None
    assert is_flagged(105, 100) is False           # 5 tokens, 5 %
    assert is_flagged(115, 100) is True            # > 10 tokens
    assert is_flagged(3, 2) is True                # 1 token, but 50 % of 2
    assert is_flagged(1000, 1080) is True          # 8 %, but 80 tokens
    assert is_flagged(3, 2, rule="and") is False and is_flagged(1000, 1080, rule="and") is False
    assert is_flagged(130, 100, rule="and") is True and is_flagged(2, 2) is False


def test_priority_is_formula_of_own_prediction(upstream, make_gateway, tiny_model, tokenizer):
    now = [500.0]
    gw = make_gateway(upstream.url, clock=lambda: now[0], aging_rate=4.0)
    prompts = ["Hi.", "Write a long detailed essay about the history of Rome, with sources and many examples."]
    now[0] = 502.6  # every request arrives 2.6 s after start: aging credit floor(4 * 2.6) = 10
    for p in prompts:
        resp = post(gw.url, chat(p))
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == TOKENS
    means = tiny_model.predict(prompts, tokenizer, llms=[LLM]).mean[:, 0].tolist()
    got = [r["priority"] for r in upstream.received]
    assert got == [round(m) + 10 for m in means]
    assert all(isinstance(p, int) for p in got)
    rows = log_rows(gw)
    assert [r["prompt_text"] for r in rows] == prompts  # the last user message, not the system prompt
    assert set(rows[0]) == LOG_KEYS
    assert rows[0]["priority"] == got[0] and rows[0]["predicted_mean"] == pytest.approx(means[0], rel=1e-4)
    assert rows[0]["output_sizes"] == [TOKENS] and rows[0]["input_size"] == 9
    assert rows[0]["flagged"] == is_flagged(rows[0]["predicted_mean"], TOKENS)
    assert rows[0]["finish_reasons"] == ["stop"] and rows[0]["max_tokens"] is None


def test_completions_endpoint_and_partial_llm_name(upstream, make_gateway, tiny_model, tokenizer):
    gw = make_gateway(upstream.url, aging_rate=0.0)
    resp = post(gw.url, {"model": "llama-3.2-3b", "prompt": "Once upon a time"}, path="/v1/completions")
    assert resp.status_code == 200
    llm = "meta-llama/Llama-3.2-3B-Instruct"
    mean = tiny_model.predict("Once upon a time", tokenizer, llms=[llm]).mean[0, 0].item()
    assert upstream.received[0]["priority"] == round(mean)
    assert upstream.received[0]["model"] == "llama-3.2-3b"  # the request itself is not rewritten
    assert log_rows(gw)[0]["model"] == llm  # the log names the id train.py knows


def test_unknown_llm_and_empty_prompt_get_default_priority(upstream, make_gateway):
    gw = make_gateway(upstream.url, default_priority=777, aging_rate=0.0)
    resp = post(gw.url, chat("Hello there", model="mistral-7b", temperature=0.3))
    assert resp.status_code == 200 and resp.json()["model"] == "mistral-7b"
    sent = upstream.received[0]
    assert sent["priority"] == 777 and sent["temperature"] == 0.3 and sent["messages"][1]["content"] == "Hello there"
    assert post(gw.url, chat("   ")).status_code == 200  # a known LLM, but no text to predict from
    assert post(gw.url, {"model": LLM, "prompt": ["two", "prompts"]}, path="/v1/completions").status_code == 200
    assert [r["priority"] for r in upstream.received[1:]] == [777, 777]
    rows = log_rows(gw)  # the prompt-less answers are no training data
    assert len(rows) == 1 and rows[0]["model"] == "mistral-7b" and rows[0]["predicted_mean"] is None
    assert rows[0]["flagged"] is None


def test_no_predict_and_keep_client_priority(upstream, make_gateway, tiny_model, tokenizer):
    now = [0.0]
    gw = make_gateway(upstream.url, clock=lambda: now[0], keep_client_priority=True, aging_rate=1.0)
    now[0] = 3.0
    assert post(gw.url, chat("Hi", priority=5)).status_code == 200
    assert post(gw.url, chat("Hi", priority=True)).status_code == 200  # not an integer priority: computed
    mean = tiny_model.predict("Hi", tokenizer, llms=[LLM]).mean[0, 0].item()
    assert [r["priority"] for r in upstream.received] == [5, round(mean) + 3]
    rows = log_rows(gw)
    assert rows[0]["priority"] == 5 and rows[0]["predicted_mean"] == pytest.approx(mean, rel=1e-4)

    off = make_gateway(upstream.url, model=None, predict=False, default_priority=300, aging_rate=0.0,
                       log_path=str(gw.config.log_path) + ".off")
    assert off.batcher is None
    assert post(off.url, chat("Hi", priority=5)).status_code == 200
    assert upstream.received[-1]["priority"] == 300  # --keep-client-priority not set: replaced
    row = log_rows(off)[0]
    assert row["predicted_mean"] is None and row["priority"] == 300 and row["model"] == LLM


@pytest.mark.parametrize("client_usage", [False, True])
def test_streaming_passes_chunks_in_order(upstream, make_gateway, client_usage):
    gw = make_gateway(upstream.url)
    extra = {"stream_options": {"include_usage": True}} if client_usage else {}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat("Tell me a story", stream=True, **extra),
                      timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = events_of(resp.iter_lines())
    assert content_of(events) == [f"c{i} " for i in range(TOKENS)] and events[-1] == "[DONE]"
    assert any(isinstance(e, dict) and e.get("usage") for e in events) == client_usage  # no surprise usage chunk
    assert upstream.received[0]["stream_options"] == {"include_usage": True}
    row = log_rows(gw)[0]
    assert row["output_sizes"] == [TOKENS] and row["usage_source"] == "usage" and row["stream"] is True
    assert row["finish_reasons"] == ["stop"]


def test_finish_reasons_and_max_tokens_are_logged(upstream, make_gateway):
    gw = make_gateway(upstream.url)
    assert post(gw.url, chat("Capped", max_tokens=3)).json()["choices"][0]["finish_reason"] == "length"
    assert stream(gw.url, chat("Capped stream", max_completion_tokens=2, max_tokens=50))[0] == 200
    assert post(gw.url, {"model": LLM, "prompt": "Uncapped"}, path="/v1/completions").status_code == 200
    rows = log_rows(gw)
    assert [(r["output_sizes"], r["finish_reasons"], r["max_tokens"]) for r in rows] == [
        ([3], ["length"], 3), ([2], ["length"], 2), ([TOKENS], ["stop"], None)]


def test_stream_without_usage_counts_chunks(make_gateway):
    fake = FakeUpstream(tokens=TOKENS, usage_in_stream=False).start()
    try:
        gw = make_gateway(fake.url)
        assert stream(gw.url, chat("Tell me a story"))[0] == 200
        row = log_rows(gw)[0]
    finally:
        fake.close()
    assert row["output_sizes"] == [TOKENS] and row["usage_source"] == "chunks" and row["finish_reasons"] == ["stop"]


def test_stream_is_relayed_live(upstream, make_gateway):
    upstream.gate_after = 1  # the upstream holds the stream after its first event until the gate opens
    gw = make_gateway(upstream.url)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat("Story", stream=True), timeout=30) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "c0 "  # arrived while upstream waits
        upstream.gate.set()
        rest = [line for line in lines if line.startswith("data: ")]
    assert len(rest) == TOKENS - 1 + 1  # the other content events, then [DONE]


@pytest.mark.parametrize("raw, status", [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b"\xff\xfe", 400),
                                         (b'{"model": "m", "messages": 5}', 400), (b'{"model": "m"}', 400)])
def test_bad_body_is_400(upstream, make_gateway, raw, status):
    gw = make_gateway(upstream.url)
    resp = post(gw.url, raw)
    assert resp.status_code == status and resp.json()["error"]["type"] == "invalid_request_error"
    assert upstream.received == []
    assert post(gw.url, chat("still serving")).status_code == 200


def test_size_limit_and_chunked_bodies(upstream, make_gateway):
    gw = make_gateway(upstream.url, max_request_bytes=2000)
    small = json.dumps(chat("Chunked but fine")).encode()
    big = json.dumps(chat("x" * 3000)).encode()

    def chunks(data: bytes):  # an iterator: httpx sends it with Transfer-Encoding: chunked
        yield from (data[i:i + 100] for i in range(0, len(data), 100))

    resp = post(gw.url, chunks(small))
    assert resp.status_code == 200 and upstream.received[-1]["messages"][1]["content"] == "Chunked but fine"
    for body in (big, chunks(big)):  # announced by Content-Length, or found out while reading chunks
        resp = post(gw.url, body)
        assert resp.status_code == 413 and "exceeds the limit of 2000 bytes" in resp.json()["error"]["message"]
    assert len(upstream.received) == 1
    assert [r["prompt_text"] for r in log_rows(gw)] == ["Chunked but fine"]


def test_413_closes_the_connection(upstream, make_gateway):
    """An announced oversize body is refused before it is read, and the connection closed, so its unread bytes are
    never taken for a next request."""
    gw = make_gateway(upstream.url, max_request_bytes=2000)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b"x" * 1000)
        received = b""
        while chunk := sock.recv(65536):  # until the gateway closes its end (a timeout here fails the test)
            received += chunk
    head = received.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 413") and "connection: close" in head
    assert upstream.received == [] and post(gw.url, chat("still serving")).status_code == 200


@pytest.mark.parametrize("status", [400, 404, 422])
def test_upstream_4xx_passes_through_with_its_body(upstream, make_gateway, status):
    upstream.status = status
    gw = make_gateway(upstream.url)
    resp = post(gw.url, chat("Hello"))
    assert resp.status_code == status and resp.json() == {"error": {"message": "boom", "type": "server_error"}}
    assert stream(gw.url, chat("Hello"))[0] == status
    assert log_rows(gw) == []  # an error is not training data
    upstream.status = 200
    assert post(gw.url, chat("after")).status_code == 200 and log_rows(gw)[-1]["prompt_text"] == "after"


def test_other_paths_health_and_metrics(upstream, make_gateway):
    gw = make_gateway(upstream.url)
    resp = httpx.get(gw.url + "/v1/models?x=1")
    assert resp.status_code == 200 and resp.json()["data"][0]["id"] == LLM and resp.json()["path"] == "/v1/models?x=1"
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    assert post(gw.url, chat("Hi")).status_code == 200 and post(gw.url, b"{").status_code == 400
    text = httpx.get(gw.url + "/metrics").text
    for line in ('lenpred_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
                 'lenpred_gateway_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0',
                 'lenpred_gateway_requests_total{endpoint="other",status="200"} 1.0',
                 "lenpred_gateway_prediction_seconds_count 1.0", "lenpred_gateway_prediction_batch_size_sum 1.0",
                 "lenpred_gateway_priority_count 1.0",
                 "lenpred_gateway_log_records_total 1.0", "lenpred_gateway_requests_in_flight 0.0"):
        assert line in text, line
    assert "lenpred_gateway_log_queue_depth" in text and "lenpred_gateway_upstream_errors_total" in text


def test_log_is_training_data(upstream, make_gateway, tmp_path):
    from lenpred.data import load_rows, validate_rows

    log = tmp_path / "requests.jsonl"
    log.write_text('{"prompt_text": "torn line from a cras')  # a crash mid-write before: no trailing newline
    gw = make_gateway(upstream.url)
    for i, model in enumerate([LLM, "Qwen/Qwen2.5-7B-Instruct", "unknown-llm"]):
        assert post(gw.url, chat(f"Question {i}?", model=model)).status_code == 200
    assert stream(gw.url, chat("Streamed question?"))[0] == 200
    assert gw.log.flush(30)
    lines = log.read_text().splitlines()  # the torn line stays alone on its line; load_rows skips it
    assert len(lines) == 5 and lines[0] == '{"prompt_text": "torn line from a cras'
    rows, faults = validate_rows(load_rows(log))
    assert faults == {} and len(rows) == 4
    assert rows["output_mean"].tolist() == [TOKENS] * 4
    assert rows["llm"].tolist()[:3] == [LLM, "Qwen/Qwen2.5-7B-Instruct", "unknown-llm"]


def test_512_concurrent_streams_none_lost(upstream, make_gateway):
    """512 streaming clients at once (and 64 non-streamed): every one answered whole, once; one log line each."""
    import aiohttp

    gw = make_gateway(upstream.url)

    async def one(session, i):
        body = chat(f"Request {i}: what is {i % 37}?", user=f"r{i}", stream=i < 512)
        async with session.post(gw.url + "/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            return resp.status, text

    async def main():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
            return await asyncio.gather(*(one(s, i) for i in range(576)))

    results = asyncio.run(main())
    assert [s for s, _ in results] == [200] * 576
    for i, (_, text) in enumerate(results[:512]):
        assert text.count("data: [DONE]") == 1 and text.count('"content": "c') == TOKENS, i
    assert sorted(upstream.by_user) == sorted(f"r{i}" for i in range(576)) and set(upstream.by_user.values()) == {1}
    rows = log_rows(gw)
    assert sorted(r["prompt_text"] for r in rows) == sorted(f"Request {i}: what is {i % 37}?" for i in range(576))
    assert all(r["predicted_mean"] is not None for r in rows)
    # each prompt predicted once, in however many batches
    assert gw.metrics.registry.get_sample_value("lenpred_gateway_prediction_batch_size_sum") == 576


def test_log_path_that_cannot_be_written_fails_at_start(upstream, tmp_path, capsys):
    from lenpred.cli import main
    from lenpred.gateway import LogPathError

    def writers():
        return sum(t.name == "lenpred-log" for t in threading.enumerate())

    (tmp_path / "file").write_text("")
    before = writers()
    for bad in (tmp_path, tmp_path / "missing" / "requests.jsonl", tmp_path / "file" / "requests.jsonl"):
        with pytest.raises(LogPathError, match="cannot append to the request log"):
            Gateway(None, None, GatewayConfig(upstream=upstream.url, log_path=str(bad), predict=False))
    assert writers() == before  # no writer thread left behind
    code = main(["gateway", "--no-predict", "--upstream", upstream.url, "--log", str(tmp_path)])
    assert code == 2 and "cannot append to the request log" in capsys.readouterr().err


def test_export_and_cli(tiny_model, tokenizer, tmp_path, upstream, capsys):
    from lenpred.cli import main
    from lenpred.hub import export_model

    with pytest.raises(SystemExit) as exit_:
        main(["gateway", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(f in out for f in ("--aging-rate", "--no-predict", "--keep-client-priority", "--shutdown-timeout"))
    for command, flag in (("simulate", "--loads"), ("export", "--push")):  # delegated parsers, own --help
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and flag in capsys.readouterr().out
    assert main(["gateway", "--upstream", upstream.url]) == 2  # no --model and prediction on
    export = export_model(tiny_model, tokenizer, tmp_path / "m")
    with Gateway.from_export(export, GatewayConfig(upstream=upstream.url, port=0, aging_rate=0.0)) as gw:
        assert post(gw.url, chat("Hi")).status_code == 200
    mean = tiny_model.predict("Hi", tokenizer, llms=[LLM]).mean[0, 0].item()
    assert upstream.received[0]["priority"] == round(mean)


def test_onnx_backend_sets_the_same_priority(tiny_model, tokenizer, tmp_path, upstream):
    """`lenpred gateway --backend onnx`: the ONNX Runtime predictor, built from the export, gives the priority the
    fp32 torch path gives."""
    pytest.importorskip("onnxruntime")
    from lenpred.hub import export_model

    export = export_model(tiny_model, tokenizer, tmp_path / "m")
    config = GatewayConfig(upstream=upstream.url, port=0, aging_rate=0.0)
    with Gateway.from_export(export, config, backend="onnx", workdir=str(tmp_path / "fast")) as gw:
        assert (tmp_path / "fast" / "onnx" / "model.onnx").exists()
        assert post(gw.url, chat("Hi")).status_code == 200
    mean = tiny_model.predict("Hi", tokenizer, llms=[LLM]).mean[0, 0].item()
    assert upstream.received[-1]["priority"] == round(mean)
    with pytest.raises(ValueError, match="unknown CPU option"):
        Gateway.from_export(export, config, backend="fp8")


def test_auto_backend_serves_the_cpu_serving_path_unless_learning(tiny_model, tokenizer, tmp_path, upstream):
    pytest.importorskip("onnxruntime")
    from lenpred.fast import SERVING_OPTION
    from lenpred.hub import export_model

    export = export_model(tiny_model, tokenizer, tmp_path / "m")
    with Gateway.from_export(export, GatewayConfig(upstream=upstream.url, port=0), backend="auto") as gw:
        assert (export / "fast" / "onnx" / "model.onnx").exists()  # built beside the export, without a step
        assert post(gw.url, chat("Hi")).status_code == 200 and upstream.received[-1]["priority"] < 1000
    assert SERVING_OPTION in ("onnx", "onnx-int8")
    learning = GatewayConfig(upstream=upstream.url, port=0, learn=True, log_path=str(tmp_path / "l.jsonl"))
    with Gateway.from_export(export, learning, backend="auto") as gw:  # refits need the torch model
        assert gw.learner is not None


def test_microbatcher_batches_what_queued_meanwhile(tiny_model, tokenizer):
    from lenpred.inference import MicroBatcher

    release, sizes = threading.Event(), []

    class Slow:  # the model, but the first call waits until the others queued up
        def predict(self, prompts, tok, **kw):
            sizes.append(len(prompts))
            release.wait(10)
            return tiny_model.predict(prompts, tok, **kw)

    batcher = MicroBatcher(Slow(), tokenizer)
    try:
        first = batcher.submit("first prompt", LLM)
        wait_for(lambda: sizes, 30, "the batcher thread inside the first call")
        llms = [LLM, "Qwen/Qwen2.5-7B-Instruct"]
        rest = [(f"prompt {i} " * (i + 1), llms[i % 2]) for i in range(6)]
        futures = [batcher.submit(p, m) for p, m in rest]
        release.set()
        got = [f.result(10)[0] for f in futures]
        first.result(10)
    finally:
        release.set()
        batcher.close()
    assert sizes == [1, 6]
    want = [tiny_model.predict(p, tokenizer, llms=[m]).mean[0, 0].item() for p, m in rest]
    assert got == pytest.approx(want, rel=1e-4)
