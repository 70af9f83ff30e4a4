"""The OpenAI-compatible gateway against a fake OpenAI-format upstream on loopback (tiny random model)."""

from __future__ import annotations

import collections
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lenpred.gateway import Gateway, GatewayConfig, compute_priority, is_flagged

LLM = "meta-llama/Llama-3.2-1B-Instruct"
STREAM_CHUNKS = 5
COMPLETION_TOKENS = 42


class FakeUpstream:
    """Speaks enough of the OpenAI API; records every JSON body it received. `status` != 200 answers errors;
    `usage_in_stream=False` mimics a server without stream usage; `gate` holds a stream after its first chunk."""

    def __init__(self, status: int = 200, usage_in_stream: bool = True, gate: threading.Event | None = None):
        self.status, self.usage_in_stream, self.gate = status, usage_in_stream, gate
        self.received: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between headers and body

            def log_message(self, *args):
                pass

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(200, {"object": "list", "data": [{"id": LLM, "object": "model"}], "path": self.path})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.received.append(body)
                if fake.status != 200:
                    return self.reply(fake.status, {"error": {"message": "boom", "type": "server_error"}})
                if not body.get("stream"):
                    return self.reply(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                         "finish_reason": "stop"}],
                                            "usage": {"prompt_tokens": 9, "completion_tokens": COMPLETION_TOKENS,
                                                      "total_tokens": 9 + COMPLETION_TOKENS}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events = [{"choices": [{"index": 0, "delta": {"content": f"c{i} "}}]} for i in range(STREAM_CHUNKS)]
                if fake.usage_in_stream and (body.get("stream_options") or {}).get("include_usage"):
                    events.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": STREAM_CHUNKS}})
                for i, ev in enumerate([json.dumps(e) for e in events] + ["[DONE]"]):
                    data = f"data: {ev}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    if i == 0 and fake.gate is not None:
                        fake.gate.wait(10)
                self.wfile.write(b"0\r\n\r\n")

        class Server(ThreadingHTTPServer):
            daemon_threads, request_queue_size = True, 256  # listen() backlog: set before the constructor binds

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def call(base_url: str, path: str, body=None, method: str = "POST", conn=None):
    """(status, parsed JSON or raw bytes) through http.client."""
    host, port = base_url.split("//")[1].split(":")
    c = conn or http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    raw = resp.read()
    if conn is None:
        c.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


def chat(prompt: str, model: str = LLM, **extra) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": "Be helpful."},
                                         {"role": "user", "content": prompt}], **extra}


def wait_lines(path, n: int) -> list[str]:
    """The log's lines once it has at least `n` (a request is logged just after its answer was sent)."""
    deadline = time.monotonic() + 10
    while len(lines := path.read_text().splitlines()) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return lines


def log_lines(path, n: int = 1) -> list[dict]:
    return [json.loads(line) for line in wait_lines(path, n)]


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    yield fake
    fake.close()


@pytest.fixture
def make_gateway(tiny_model, tokenizer, tmp_path):
    gateways = []

    def make(upstream_url: str, clock=None, **kw) -> Gateway:
        cfg = GatewayConfig(upstream=upstream_url, port=0, log_path=str(tmp_path / "requests.jsonl"), **kw)
        gw = Gateway(tiny_model, tokenizer, cfg, **({"clock": clock} if clock else {})).start()
        gateways.append(gw)
        return gw

    yield make
    for gw in gateways:
        gw.close()


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


def test_priority_is_formula_of_own_prediction(upstream, make_gateway, tiny_model, tokenizer, tmp_path):
    now = [500.0]
    gw = make_gateway(upstream.url, clock=lambda: now[0], aging_rate=4.0)
    prompts = ["Hi.", "Write a long detailed essay about the history of Rome, with sources and many examples."]
    now[0] = 502.6  # every request arrives 2.6 s after start: aging credit floor(4 * 2.6) = 10
    for p in prompts:
        status, body = call(gw.url, "/v1/chat/completions", chat(p))
        assert status == 200 and body["usage"]["completion_tokens"] == COMPLETION_TOKENS
    means = tiny_model.predict(prompts, tokenizer, llms=[LLM]).mean[:, 0].tolist()
    got = [r["priority"] for r in upstream.received]
    assert got == [round(m) + 10 for m in means]
    assert (got[0] < got[1]) == (round(means[0]) < round(means[1]))  # order follows the prediction
    assert all(isinstance(p, int) for p in got)
    rows = log_lines(tmp_path / "requests.jsonl", 2)
    assert [r["prompt_text"] for r in rows] == prompts  # the last user message, not the system prompt
    assert rows[0]["priority"] == got[0] and rows[0]["predicted_mean"] == pytest.approx(means[0], rel=1e-4)
    assert rows[0]["output_sizes"] == [COMPLETION_TOKENS] and rows[0]["input_size"] == 9
    assert rows[0]["flagged"] == is_flagged(rows[0]["predicted_mean"], COMPLETION_TOKENS)


def test_completions_endpoint_and_partial_llm_name(upstream, make_gateway, tiny_model, tokenizer, tmp_path):
    gw = make_gateway(upstream.url, aging_rate=0.0)
    status, _ = call(gw.url, "/v1/completions", {"model": "llama-3.2-3b", "prompt": "Once upon a time"})
    assert status == 200
    llm = "meta-llama/Llama-3.2-3B-Instruct"
    mean = tiny_model.predict("Once upon a time", tokenizer, llms=[llm]).mean[0, 0].item()
    assert upstream.received[0]["priority"] == round(mean)
    assert upstream.received[0]["model"] == "llama-3.2-3b"  # the request itself is not rewritten
    assert log_lines(tmp_path / "requests.jsonl")[0]["model"] == llm  # the log names the id train.py knows


def test_unknown_llm_passes_through_with_default_priority(upstream, make_gateway, tmp_path):
    gw = make_gateway(upstream.url, default_priority=777, aging_rate=0.0)
    status, body = call(gw.url, "/v1/chat/completions", chat("Hello there", model="mistral-7b", temperature=0.3))
    assert status == 200 and body["model"] == "mistral-7b"
    sent = upstream.received[0]
    assert sent["priority"] == 777 and sent["temperature"] == 0.3 and sent["messages"][1]["content"] == "Hello there"
    row = log_lines(tmp_path / "requests.jsonl")[0]
    assert row["model"] == "mistral-7b" and row["predicted_mean"] is None and row["flagged"] is None


def read_stream(resp) -> list[dict | str]:
    events = []
    while line := resp.readline():
        if line.startswith(b"data: "):
            payload = line[6:].strip().decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_request(url: str, body: dict):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
    return conn, conn.getresponse()


@pytest.mark.parametrize("client_usage", [False, True])
def test_streaming_passes_chunks_in_order(upstream, make_gateway, tmp_path, client_usage):
    gw = make_gateway(upstream.url)
    extra = {"stream_options": {"include_usage": True}} if client_usage else {}
    conn, resp = stream_request(gw.url, chat("Tell me a story", stream=True, **extra))
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = read_stream(resp)
    conn.close()
    content = [e["choices"][0]["delta"]["content"] for e in events if isinstance(e, dict) and e["choices"]]
    assert content == [f"c{i} " for i in range(STREAM_CHUNKS)] and events[-1] == "[DONE]"
    assert any(isinstance(e, dict) and e.get("usage") for e in events) == client_usage  # no surprise usage chunk
    assert upstream.received[0]["stream_options"] == {"include_usage": True}
    row = log_lines(tmp_path / "requests.jsonl")[0]
    assert row["output_sizes"] == [STREAM_CHUNKS] and row["usage_source"] == "usage" and row["stream"] is True


def test_stream_without_usage_counts_chunks(make_gateway, tmp_path):
    fake = FakeUpstream(usage_in_stream=False)
    try:
        gw = make_gateway(fake.url)
        conn, resp = stream_request(gw.url, chat("Tell me a story", stream=True))
        read_stream(resp)
        conn.close()
    finally:
        fake.close()
    row = log_lines(tmp_path / "requests.jsonl")[0]
    assert row["output_sizes"] == [STREAM_CHUNKS] and row["usage_source"] == "chunks"


def test_stream_is_relayed_live(make_gateway):
    gate = threading.Event()
    fake = FakeUpstream(gate=gate)  # upstream holds the stream after its first chunk until the gate opens
    try:
        gw = make_gateway(fake.url)
        conn, resp = stream_request(gw.url, chat("Tell me a story", stream=True))
        first = resp.readline()
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "c0 "  # arrived while upstream waits
        gate.set()
        assert len([e for e in read_stream(resp) if isinstance(e, dict)]) == STREAM_CHUNKS - 1
        conn.close()
    finally:
        gate.set()
        fake.close()


def test_upstream_error_is_returned_with_its_status(make_gateway, tmp_path):
    fake = FakeUpstream(status=500)
    try:
        gw = make_gateway(fake.url)
        status, body = call(gw.url, "/v1/chat/completions", chat("Hello"))
        assert status == 500 and body["error"]["message"] == "boom"
        status, _ = call(gw.url, "/v1/chat/completions", chat("Hello", stream=True))
        assert status == 500
    finally:
        fake.close()
    assert not (tmp_path / "requests.jsonl").read_text()  # failed requests are not training data


def test_upstream_down_is_502(make_gateway):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    gw = make_gateway(f"http://127.0.0.1:{port}")
    status, body = call(gw.url, "/v1/chat/completions", chat("Hello"))
    assert status == 502 and body["error"]["type"] == "upstream_error"
    assert call(gw.url, "/v1/models", method="GET")[0] == 502


def test_bad_json_is_400(upstream, make_gateway):
    gw = make_gateway(upstream.url)
    for raw in (b"{not json", b"[1, 2]", b""):
        status, body = call(gw.url, "/v1/chat/completions", raw)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert upstream.received == []


def test_other_paths_are_proxied(upstream, make_gateway):
    gw = make_gateway(upstream.url)
    status, body = call(gw.url, "/v1/models?x=1", method="GET")
    assert status == 200 and body["data"][0]["id"] == LLM and body["path"] == "/v1/models?x=1"


def test_log_is_training_data(upstream, make_gateway, tmp_path):
    from lenpred.data import load_rows, validate_rows

    log = tmp_path / "requests.jsonl"
    log.write_text('{"prompt_text": "torn line from a cras')  # a crash mid-write before: no trailing newline
    gw = make_gateway(upstream.url)
    for i, model in enumerate([LLM, "Qwen/Qwen2.5-7B-Instruct", "unknown-llm"]):
        assert call(gw.url, "/v1/chat/completions", chat(f"Question {i}?", model=model))[0] == 200
    conn, resp = stream_request(gw.url, chat("Streamed question?", stream=True))
    read_stream(resp)
    conn.close()
    wait_lines(log, 5)  # the torn line + 4 records
    rows, faults = validate_rows(load_rows(log))
    assert faults == {} and len(rows) == 4
    assert rows["output_mean"].tolist() == [COMPLETION_TOKENS] * 3 + [STREAM_CHUNKS]
    assert rows["llm"].tolist()[:3] == [LLM, "Qwen/Qwen2.5-7B-Instruct", "unknown-llm"]
    keys = {"timestamp", "endpoint", "model", "prompt_text", "input_size", "output_sizes", "output_mean",
            "predicted_mean", "predicted_std", "priority", "latency_s", "stream", "usage_source", "flagged"}
    assert set(json.loads(log.read_text().splitlines()[1])) == keys


def test_load_none_lost(upstream, make_gateway, tmp_path):
    """2,000 requests at concurrency 50 on loopback (keep-alive client connections): every one answered, logged."""
    n, workers = 2000, 50
    gw = make_gateway(upstream.url)  # fsync on, as deployed
    local = threading.local()

    def one(i):
        if not hasattr(local, "conn"):
            host, port = gw.url.split("//")[1].split(":")
            local.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        return call(gw.url, "/v1/chat/completions", chat(f"Request number {i % 97}: what is {i}?"),
                    conn=local.conn)[0]

    with ThreadPoolExecutor(workers) as pool:
        statuses = list(pool.map(one, range(n)))
    assert statuses.count(200) == n, collections.Counter(statuses)
    assert len(upstream.received) == n
    rows = log_lines(tmp_path / "requests.jsonl", n)
    assert len(rows) == n and all(r["output_sizes"] == [COMPLETION_TOKENS] for r in rows)


def test_export_and_cli(tiny_model, tokenizer, tmp_path, upstream, capsys):
    from lenpred.cli import main
    from lenpred.hub import export_model

    with pytest.raises(SystemExit) as exit_:
        main(["gateway", "--help"])
    assert exit_.value.code == 0 and "--aging-rate" in capsys.readouterr().out
    for command, flag in (("simulate", "--loads"), ("export", "--push")):  # delegated parsers, own --help
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and flag in capsys.readouterr().out
    export = export_model(tiny_model, tokenizer, tmp_path / "m")
    gw = Gateway.from_export(export, GatewayConfig(upstream=upstream.url, port=0, aging_rate=0.0)).start()
    try:
        assert call(gw.url, "/v1/chat/completions", chat("Hi"))[0] == 200
        mean = tiny_model.predict("Hi", tokenizer, llms=[LLM]).mean[0, 0].item()
        assert upstream.received[0]["priority"] == round(mean)
    finally:
        gw.close()


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
        time.sleep(0.2)
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


def test_stopped_mid_stream_leaves_no_partial_line(make_gateway, tmp_path):
    gate = threading.Event()
    fake = FakeUpstream(gate=gate)
    try:
        gw = make_gateway(fake.url)
        assert call(gw.url, "/v1/chat/completions", chat("Logged first"))[0] == 200
        wait_lines(tmp_path / "requests.jsonl", 1)
        conn, resp = stream_request(gw.url, chat("Tell me a story", stream=True))
        resp.readline()  # the stream is under way
        gw.close()  # the gateway stops mid-stream
        gate.set()
        read_stream(resp)
        conn.close()
    finally:
        gate.set()
        fake.close()
    text = (tmp_path / "requests.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["prompt_text"] for line in text.splitlines()] == ["Logged first"]


def test_chunked_request_body_is_400(upstream, make_gateway):
    gw = make_gateway(upstream.url)
    host, port = gw.url.split("//")[1].split(":")
    data = json.dumps(chat("Hi")).encode()
    # The chunked body is framed by hand and sent with the headers in one write: the gateway may answer the 400
    # and close as soon as it reads the header, and a body sent after that would fail with a broken pipe.
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["type"] == "invalid_request_error"
    conn.close()


def test_onnx_backend_sets_the_same_priority(tiny_model, tokenizer, tmp_path, upstream):
    """`lenpred gateway --backend onnx`: the ONNX Runtime predictor, built from the export, gives the priority the
    fp32 torch path gives."""
    pytest.importorskip("onnxruntime")
    from lenpred.hub import export_model

    export = export_model(tiny_model, tokenizer, tmp_path / "m")
    config = GatewayConfig(upstream=upstream.url, port=0, aging_rate=0.0)
    gw = Gateway.from_export(export, config, backend="onnx", workdir=str(tmp_path / "fast")).start()
    try:
        assert (tmp_path / "fast" / "onnx" / "model.onnx").exists()
        assert call(gw.url, "/v1/chat/completions", chat("Hi"))[0] == 200
        mean = tiny_model.predict("Hi", tokenizer, llms=[LLM]).mean[0, 0].item()
        assert upstream.received[-1]["priority"] == round(mean)
    finally:
        gw.close()
    with pytest.raises(ValueError, match="unknown CPU option"):
        Gateway.from_export(export, config, backend="fp8")
