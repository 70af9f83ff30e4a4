"""The LenPred gateway's added latency at concurrency 1 (issue goal: <= 15 ms p50 on CPU).

A fake OpenAI-format upstream answers instantly on loopback; each round sends the same chat request once directly
to it and once through the gateway (interleaved, keep-alive client connections, the order alternating), so the
difference is what the gateway adds: parsing, one LenPred prediction (batch 1, tokenisation included), the
forwarding hop and the JSON pass-through. The request log is written (fsync on) as in production. Prints p50 /
p90 / p99 of the direct and gateway round trips, of the per-round difference ("added"), and of `predict` alone.

    python benchmarks/gateway_latency.py --model outputs/lenpred-minilm
    python benchmarks/gateway_latency.py              # MiniLM warm-started LenPred (random heads: same cost)
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lenpred.inference import CPU_OPTIONS  # noqa: E402

ANSWER = json.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 50, "completion_tokens": 120, "total_tokens": 170}}).encode()


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)


def _prompts(n: int) -> list[str]:
    """CASTILLO prompts when the local copy is there (realistic lengths), else synthetic ones of varied length."""
    try:
        from lenpred.data import LOCAL_CASTILLO, load_rows

        if LOCAL_CASTILLO.is_dir():
            texts = load_rows(LOCAL_CASTILLO, splits=("test",))["prompt_text"].drop_duplicates()
            return texts.sample(min(n, len(texts)), random_state=0).tolist()
    except Exception:  # noqa: BLE001 - any problem: fall back to synthetic prompts
        pass
    words = "explain the difference between a list and a tuple in python with examples".split()
    return [" ".join(words[j % len(words)] for j in range(5 + 37 * i % 150)) for i in range(n)]


def _pct(xs) -> dict:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="LenPred export folder (default: MiniLM warm-started LenPred)")
    ap.add_argument("--requests", type=int, default=200, help="timed rounds (one direct + one gateway request each)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--backend", choices=("torch", *CPU_OPTIONS), default="torch",
                    help="predictor: the fp32 torch fast path or a lenpred.fast CPU option (as `lenpred gateway`)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from lenpred.gateway import Gateway, GatewayConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from lenpred.hub import load_export

        model, tokenizer = load_export(args.model)
        source = args.model
    else:
        from transformers import AutoTokenizer

        from lenpred.data import PAPER_LLMS
        from lenpred.hub import default_encoder_path
        from modeling_lenpred import LenPredModel

        source = default_encoder_path()
        model = LenPredModel.from_encoder(source, llm_names=list(PAPER_LLMS)).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    llm = model.config.llm_names[0]
    predictor = model
    if args.backend != "torch":
        from lenpred.fast import build_option

        predictor = build_option(args.backend, model, tokenizer, tempfile.mkdtemp(prefix="lenpred-fast-"),
                                 threads=args.threads)
        source += f" ({args.backend})"

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    upstream = Server(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, args=(0.1,), daemon=True).start()
    log = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    gw = Gateway(model, tokenizer, GatewayConfig(upstream=f"http://127.0.0.1:{upstream.server_address[1]}",
                                                 port=0, log_path=log), predictor=predictor).start()
    direct = http.client.HTTPConnection("127.0.0.1", upstream.server_address[1], timeout=60)
    via = http.client.HTTPConnection("127.0.0.1", gw.server.server_address[1], timeout=60)

    def once(conn, body: bytes) -> float:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        return time.perf_counter() - t0

    prompts = _prompts(args.requests + args.warmup)
    d_times, g_times, p_times = [], [], []
    for i in range(args.requests + args.warmup):
        text = prompts[i % len(prompts)]
        body = json.dumps({"model": llm, "messages": [{"role": "user", "content": text}]}).encode()
        if i % 2:
            d, g = once(direct, body), once(via, body)
        else:
            g, d = once(via, body), once(direct, body)
        t0 = time.perf_counter()
        predictor.predict(text, tokenizer, llms=[llm])
        if i >= args.warmup:
            d_times.append(d)
            g_times.append(g)
            p_times.append(time.perf_counter() - t0)
    gw.close()
    upstream.shutdown()
    n_logged = sum(1 for _ in open(log))
    os.unlink(log)
    enc = tokenizer(prompts, truncation=True, max_length=model.config.max_length)["input_ids"]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": source,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "requests": args.requests, "prompt_tokens_median": int(np.median([len(e) for e in enc])),
        "direct": _pct(d_times), "gateway": _pct(g_times),
        "added": _pct(np.asarray(g_times) - np.asarray(d_times)), "predict_alone": _pct(p_times),
        "logged_lines": n_logged,
    }
    print(f"gateway added latency, concurrency 1, {args.requests} requests, model {source}")
    print(f"  machine: {result['machine']}; median prompt {result['prompt_tokens_median']} encoder tokens")
    for name in ("direct", "gateway", "added", "predict_alone"):
        r = result[name]
        print(f"  {name:14s} p50 {r['p50_ms']:8.2f} ms   p90 {r['p90_ms']:8.2f} ms   p99 {r['p99_ms']:8.2f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
