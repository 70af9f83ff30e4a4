"""Checks of lenpred.baselines against hand-computed values, a real MiniLM and a local fake chat server."""

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

import lenpred.baselines as bl
from lenpred.baselines import (
    PAPER_TEMPLATE,
    BaselineEndpointError,
    KnnBaseline,
    PromptSetMedian,
    build_baseline_prompt,
    cached_embeddings,
    encode_sentences,
    parse_stated_length,
    query_chat_endpoint,
    run_prompt_baseline,
)

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ PromptSetMedian
def test_prompt_set_median_with_fallbacks():
    rows = pd.DataFrame(
        [
            ("A", "s1", 10, 1), ("A", "s1", 20, NAN), ("A", "s1", 30, 5),
            ("A", "s2", 100, NAN),
            ("A", "s3", 40, 11),
            ("B", "s1", 1000, 50),
            ("B", "s1", NAN, 7),  # no mean: dropped from training
        ],
        columns=["llm", "prompt_set", "output_mean", "output_std"],
    )
    model = PromptSetMedian().fit(rows)
    mean, std = model.predict(["A", "A", "A", "B", "C"], ["s1", "s2", "unseen", "s1", "s1"])
    # (A,s1): median(10,20,30)=20, median(1,5)=3
    # (A,s2): mean 100; its std unknown -> A's median std over (1,5,11) = 5
    # (A,unseen): A's median mean over (10,20,30,100,40) = 30, std 5
    # (B,s1): 1000, 50;  (C,s1) unseen LLM: global median mean (10,20,30,100,40,1000) = 35, std (1,5,11,50) = 8
    np.testing.assert_allclose(mean, [20, 100, 30, 1000, 35])
    np.testing.assert_allclose(std, [3, 5, 5, 50, 8])


# ---------------------------------------------------------------------------------------------------- KnnBaseline
def _deg(angle):
    return np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])


@pytest.fixture
def knn_data():
    emb = {"p1": _deg(0), "p2": _deg(30), "p3": _deg(90), "p4": _deg(180), "q": _deg(10)}
    rows = pd.DataFrame(
        [
            ("A", "p1", 3, NAN), ("A", "p2", 15, 0), ("A", "p3", 50, 8), ("A", "p4", 500, 100),
            ("B", "p3", 99, NAN), ("B", "p4", 0, NAN),
        ],
        columns=["llm", "prompt_id", "output_mean", "output_std"],
    )
    return rows, emb


def test_knn_geometric_means_by_hand(knn_data):
    rows, emb = knn_data
    model = KnnBaseline(k=2).fit(rows, emb)
    mean, std = model.predict(["A", "B"], ["q", "q"])
    # A, query at 10°: nearest p1 (0°), p2 (30°) -> expm1(mean(log 4, log 16)) = sqrt(4*16) - 1 = 7
    #   std: p1's is NaN, so the 2 nearest with a known std are p2 (0) and p3 (8) -> sqrt(1*9) - 1 = 2
    # B has only p3, p4: sqrt(100*1) - 1 = 9; no known std -> NaN
    np.testing.assert_allclose(mean, [7, 9])
    assert std[0] == pytest.approx(2)
    assert math.isnan(std[1])


def test_knn_accepts_query_matrix_and_id_matrix_pairs(knn_data):
    rows, emb = knn_data
    ids = list(emb)
    model = KnnBaseline(k=1).fit(rows, (ids, np.stack([emb[i] for i in ids])))
    # unnormalised query vectors are normalised: 5*(cos 170°, sin 170°) is nearest to p4
    mean, std = model.predict(["A", "A"], np.stack([5 * _deg(170), 0.1 * _deg(80)]))
    np.testing.assert_allclose(mean, [500, 50])
    np.testing.assert_allclose(std, [100, 8])


def test_knn_unknown_llm_raises_naming_it(knn_data):
    rows, emb = knn_data
    model = KnnBaseline(k=2).fit(rows, emb)
    with pytest.raises(ValueError, match="meta-llama/Unknown-LLM"):
        model.predict(["A", "meta-llama/Unknown-LLM"], ["q", "q"])


# -------------------------------------------------------------------------------------------- prompt + parsing
def test_build_baseline_prompt_is_paper_template():
    prompt = build_baseline_prompt("Who are you")
    assert prompt.startswith('Predict the length of your answer before answering my question, use the format: ')
    assert prompt.endswith("Remember to follow the format. Who are you")
    assert prompt == PAPER_TEMPLATE + "Who are you"


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('55: I\'m an artificial intelligence model known as Llama.', 55),  # the paper's example answer
        ("[55]: I'm an AI", 55),
        ("[55 tokens]: I'm an AI", 55),
        ("Length: 55\n\nI'm an AI", 55),
        ("**[120]**: Here is", 120),
        ("  \n\n## 300: text", 300),
        ("1,200: long essay", 1200),
        ("80", 80),  # a bare number
        ("I am an AI assistant.", None),  # no number
        ("3 ways to cook rice: ...", None),  # a number starting a sentence is not a stated length
        ("#$%&!!", None),  # garbage
        ("", None),
        (None, None),
        ("-40: answer", None),  # negative
        ("999999: answer", None),  # absurd
    ],
)
def test_parse_stated_length(reply, expected):
    assert parse_stated_length(reply) == expected


# ------------------------------------------------------------------------------------------------ chat endpoint
class _FakeChat(BaseHTTPRequestHandler):
    received: list = []  # the user messages the server saw, checked by the tests

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        _FakeChat.received.append(question)
        if "boom" in question:
            self.send_error(500, "model crashed")
            return
        text = "55: I'm an AI." if "good" in question else "Sure! Here is my answer."
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def chat_url(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    _FakeChat.received.clear()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_run_prompt_baseline_counts_ok_malformed_failed(chat_url):
    lengths, counts = run_prompt_baseline(["good question", "bad question", "boom"], chat_url, "m",
                                          timeout=10, show_progress=False)
    assert lengths == [55, None, None]
    assert counts == {"ok": 1, "malformed": 1, "failed": 1}
    assert _FakeChat.received == [build_baseline_prompt(q) for q in ("good question", "bad question", "boom")]


def test_query_chat_endpoint_url_forms_and_errors(chat_url):
    assert query_chat_endpoint(chat_url + "/v1", "raw", "good", timeout=10) == "55: I'm an AI."
    assert query_chat_endpoint(chat_url + "/", "raw", "good", timeout=10) == "55: I'm an AI."
    with pytest.raises(BaselineEndpointError, match="HTTP 500"):
        query_chat_endpoint(chat_url, "raw", "boom", timeout=10)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(BaselineEndpointError, match="could not reach"):
        query_chat_endpoint(f"http://127.0.0.1:{closed}", "raw", "good", timeout=5)


# ---------------------------------------------------------------------------------------------------- embeddings
def test_encode_sentences_real_minilm():
    texts = ["How do I bake bread at home?", "What is a simple recipe for homemade bread?",
             "The central bank raised interest rates again."]
    emb = encode_sentences(texts, batch_size=2, show_progress=False)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    # order is restored despite length-sorted batching
    np.testing.assert_allclose(encode_sentences(texts[::-1], show_progress=False), emb[::-1], atol=1e-5)


def test_cached_embeddings_reuses_file(tmp_path, monkeypatch):
    texts = ["short prompt", "another, slightly longer prompt"]
    first = cached_embeddings(texts, cache_dir=tmp_path, show_progress=False)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and first.shape == (2, 384)

    class Encoded(Exception):
        """Raised by the encoder stand-in: only an encoding raises it."""

    def no_encoding(*args, **kwargs):
        raise Encoded

    monkeypatch.setattr(bl, "encode_sentences", no_encoding)
    second = cached_embeddings(texts, cache_dir=tmp_path, show_progress=False)  # from the file: no encoding
    np.testing.assert_array_equal(first, second)
    with pytest.raises(Encoded):  # different texts -> a different key -> encodes again
        cached_embeddings(texts[:1], cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 1
