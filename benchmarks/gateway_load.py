"""The gateway under load: streaming clients through `lenpred gateway` vs straight to the upstream.

Three processes, so that each one's CPU is its own: a fake OpenAI upstream (`lenpred.gateway.fake`) that streams
`--tokens` tokens per answer at `--token-rate` tokens/s (or a real server, `--upstream URL`), the gateway (`python
-m lenpred.cli gateway`, request log on, fsync on, as deployed), and this process, the clients (aiohttp, one event
loop). For each concurrency level the same requests go once straight to the upstream and once through the gateway
(at concurrency 1 alternating one by one, so the pairs share conditions); the figures:

    added TTFT / TTLT   gateway minus direct time to the first / last token, p50 and p99 (concurrency 1: p50 of
                        the per-pair differences as well)
    rps                 finished gateway requests per second (closed loop: each client sends its next request when
                        its answer has ended)
    CPU per request     the gateway process's CPU seconds (all threads) over its phase / its requests; the fake
                        upstream's and the clients' too, to tell whether they, not the gateway, set the limit
    lost / duplicated   requests without a whole answer ([DONE], every token) / ids the upstream saw twice
    log                 lines that are not whole JSON (torn), gateway requests without exactly one line

Modes: `--no-predict` (the gateway's own cost: the >= 500 rps bar), `--model EXPORT [--backend onnx]`, or
`--untrained-layers N` (MiniLM warm-started LenPred, random heads: a trained model's cost, no export needed). With
a model, its batch-1 `predict` time alone (tokenisation included) is measured in this process before the load,
back to back and after the idle time a concurrency-1 request pair leaves the gateway's model (waking costs a CPU
model several ms); the latter is the reference for the added-TTFT bar. Writes `<out>.json` and `<out>.md`.

    python benchmarks/gateway_load.py --no-predict
    python benchmarks/gateway_load.py --model outputs/lenpred-base --backend onnx --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--no-predict", action="store_true", help="prediction off (the default without a model)")
    mode.add_argument("--model", help="LenPred export folder")
    mode.add_argument("--untrained-layers", type=int, help="MiniLM warm-started LenPred with this many layers")
    ap.add_argument("--backend", default="torch", help="torch, onnx, ... (as lenpred gateway --backend)")
    ap.add_argument("--threads", type=int, help="model CPU threads, in the gateway and for predict alone")
    ap.add_argument("--concurrency", default="1,64,512", help="comma-separated client counts")
    ap.add_argument("--requests-c1", type=int, default=200, help="request pairs at concurrency 1")
    ap.add_argument("--rounds", type=int, default=4, help="requests per client at higher concurrency")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per answer (fake upstream)")
    ap.add_argument("--token-rate", type=float, default=100.0, help="tokens/s per stream (fake upstream)")
    ap.add_argument("--upstream", help="a running OpenAI-compatible server instead of the fake (e.g. vLLM)")
    ap.add_argument("--llm", help="the model name sent (default: the model's first LLM)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed requests per client and path before each level (opens its connections)")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra `lenpred gateway` flag (repeat)")
    ap.add_argument("--out", help="output path without suffix (default reports/benchmarks/gateway_load_<mode>)")
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A child process serving HTTP on 127.0.0.1:port; `cpu()` is its CPU seconds so far."""

    def __init__(self, name: str, argv: list[str], port: int, env=None):
        import psutil

        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, path: str, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: the gateway drains its log
        return self.proc.wait(120)


def _prompts(n: int) -> list[str]:
    """CASTILLO test prompts when the local copy is there (realistic lengths), else synthetic ones."""
    try:
        from lenpred.data import LOCAL_CASTILLO, load_rows

        if LOCAL_CASTILLO.is_dir():
            texts = load_rows(LOCAL_CASTILLO, splits=("test",))["prompt_text"].drop_duplicates()
            return texts.sample(min(n, len(texts)), random_state=0).tolist()
    except Exception:  # noqa: BLE001 - any problem: synthetic prompts
        pass
    words = "explain the difference between a list and a tuple in python with examples".split()
    return [" ".join(words[j % len(words)] for j in range(5 + 37 * i % 150)) for i in range(n)]


def _pct(xs, q) -> float | None:
    import numpy as np

    return round(float(np.percentile(np.asarray(xs) * 1000, q)), 2) if len(xs) else None


async def _one(session, url: str, body: dict, tokens: int | None) -> dict:
    """One streamed request: status, time to first / last byte, whether the answer was whole."""
    t0 = time.perf_counter()
    first = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            data = bytearray()
            async for chunk in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                data += chunk
            end = time.perf_counter()
            whole = (resp.status == 200 and data.count(b"data: [DONE]") == 1 and b'"error"' not in data
                     and (tokens is None or data.count(b'"content": "') >= tokens))
            return {"ok": whole, "status": resp.status, "ttft": (first or end) - t0, "ttlt": end - t0}
    except Exception as exc:  # noqa: BLE001 - a lost request, counted
        return {"ok": False, "status": repr(exc), "ttft": None, "ttlt": None}


async def _phase(url: str, bodies: list[dict], concurrency: int, tokens) -> tuple[list[dict], float]:
    import aiohttp

    counter = itertools.count()
    results: list = [None] * len(bodies)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def worker():
            while (i := next(counter)) < len(bodies):
                results[i] = await _one(session, url, bodies[i], tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


async def _paired(direct: str, via: str, bodies: list[dict], tokens) -> tuple[list[dict], list[dict], float]:
    """Concurrency 1, one direct and one gateway request in turn (order alternating)."""
    import aiohttp

    d_out, g_out, g_time = [], [], 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for i, body in enumerate(bodies):
            for path in ((direct, via) if i % 2 else (via, direct)):
                t0 = time.perf_counter()
                r = await _one(session, path, {**body, "user": body["user"] + ("-d" if path == direct else "")},
                               tokens)
                if path == via:
                    g_out.append(r)
                    g_time += time.perf_counter() - t0
                else:
                    d_out.append(r)
    return d_out, g_out, g_time


def _summary(results: list[dict], seconds: float) -> dict:
    ok = [r for r in results if r["ok"]]
    failures: dict = {}
    for r in results:
        if not r["ok"]:
            failures[str(r["status"])[:120]] = failures.get(str(r["status"])[:120], 0) + 1
    return {"requests": len(results), "lost": len(results) - len(ok), "failures": failures,
            "rps": round(len(ok) / seconds, 1),
            "ttft_p50_ms": _pct([r["ttft"] for r in ok], 50), "ttft_p99_ms": _pct([r["ttft"] for r in ok], 99),
            "ttlt_p50_ms": _pct([r["ttlt"] for r in ok], 50), "ttlt_p99_ms": _pct([r["ttlt"] for r in ok], 99)}


def _model(args, workdir: Path):
    """(export folder, predictor, tokenizer, LLM names) for the model modes, else (None, None, None, None)."""
    if args.no_predict or not (args.model or args.untrained_layers):
        return None, None, None, None
    import torch

    from lenpred.hub import export_model, load_export

    if args.threads:
        torch.set_num_threads(args.threads)
    export = args.model
    if args.untrained_layers:
        from transformers import AutoTokenizer

        from lenpred.data import PAPER_LLMS
        from lenpred.hub import default_encoder_path
        from modeling_lenpred import LenPredModel

        enc = default_encoder_path()
        model = LenPredModel.from_encoder(enc, num_layers=args.untrained_layers, llm_names=list(PAPER_LLMS)).eval()
        export = export_model(model, AutoTokenizer.from_pretrained(enc), workdir / "model")
    model, tokenizer = load_export(export)
    predictor = model
    if args.backend != "torch":
        from lenpred.fast import build_option

        predictor = build_option(args.backend, model, tokenizer, workdir / "fast", threads=args.threads,
                                 spin=False)  # as the gateway builds it
    return str(export), predictor, tokenizer, list(model.config.llm_names)


def _predict_alone(predictor, tokenizer, llm: str, prompts: list[str], n: int, idle_s: float, n_idle: int = 60) -> dict:
    """The model's batch-1 time in this process: back to back (caches and threads warm), and after `idle_s` of
    idleness each time, as the gateway's model runs at concurrency 1 (one prediction per request pair). Waking from
    idle costs a CPU model several ms (cold caches and threads), so the second is the reference for added TTFT."""
    for p in prompts[:10]:
        predictor.predict(p, tokenizer, llms=[llm])

    def timed(i: int) -> float:
        t0 = time.perf_counter()
        predictor.predict(prompts[i % len(prompts)], tokenizer, llms=[llm])
        return time.perf_counter() - t0

    warm = [timed(i) for i in range(n)]
    idle = []
    for i in range(n_idle):
        time.sleep(idle_s)
        idle.append(timed(i))
    return {"batch1_p50_ms": _pct(warm, 50), "batch1_p99_ms": _pct(warm, 99), "n": n,
            "batch1_after_idle_p50_ms": _pct(idle, 50), "batch1_after_idle_p99_ms": _pct(idle, 99),
            "idle_s": round(idle_s, 3), "n_after_idle": n_idle}


def _log_check(path: Path, gateway_ids: set[str]) -> dict:
    """Torn lines, and the gateway requests whose id has no line or more than one."""
    counts, torn = {}, 0
    for line in path.read_bytes().split(b"\n")[:-1] if path.exists() else []:
        try:
            rid = json.loads(line)["prompt_text"].split("]", 1)[0].lstrip("[")
        except (ValueError, KeyError, AttributeError):
            torn += 1
            continue
        counts[rid] = counts.get(rid, 0) + 1
    return {"lines": sum(counts.values()), "torn": torn,
            "missing": len([i for i in gateway_ids if i not in counts]),
            "duplicated": len([i for i, c in counts.items() if c > 1])}


def main(argv=None) -> dict:
    args = _args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    mode = (f"untrained-l{args.untrained_layers}" if args.untrained_layers else
            Path(args.model).name if args.model else "no-predict")
    mode += "" if args.backend == "torch" else f"-{args.backend}"
    out = Path(args.out or ROOT / "reports" / "benchmarks" / f"gateway_load_{mode}")
    work = Path(tempfile.mkdtemp(prefix="gateway-load-"))
    print(f"gateway load benchmark, mode {mode}; work files in {work}", flush=True)
    export, predictor, tokenizer, llms = _model(args, work)
    llm = args.llm or (llms[0] if llms else "meta-llama/Llama-3.2-1B-Instruct")
    prompts = _prompts(500)
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    fake = None
    if args.upstream:
        upstream_url = args.upstream.rstrip("/")
    else:
        port = _free_port()
        fake = Service("fake upstream", [sys.executable, "-m", "lenpred.gateway.fake", "--port", str(port), "--tokens",
                                         str(args.tokens), "--token-rate", str(args.token_rate), "--model", llm],
                       port, env)
        fake.wait_ready("/v1/models")
        print(f"fake upstream on {fake.url}: {args.tokens} tokens at {args.token_rate} tokens/s", flush=True)
        upstream_url = fake.url
    tokens = None if args.upstream else args.tokens
    idle_s = 0.3 if args.upstream else 2 * args.tokens / args.token_rate  # a concurrency-1 pair: direct, gateway
    reference = _predict_alone(predictor, tokenizer, llm, prompts, 200, idle_s) if predictor is not None else None
    if reference:
        print(f"predict alone, batch 1: p50 {reference['batch1_p50_ms']} ms back to back, "
              f"{reference['batch1_after_idle_p50_ms']} ms after {idle_s:.2f} s idle", flush=True)
    log = work / "requests.jsonl"
    gw_port = _free_port()
    cmd = [sys.executable, "-m", "lenpred.cli", "gateway", "--upstream", upstream_url, "--port", str(gw_port),
           "--log", str(log), "--log-level", "warning", *args.gateway_arg]
    cmd += (["--model", export, "--backend", args.backend, "--fast-dir", str(work / "fast")] if export
            else ["--no-predict"])
    cmd += ["--threads", str(args.threads)] if args.threads else []
    gateway = Service("gateway", cmd, gw_port, env)
    gateway.wait_ready("/health")
    print(f"gateway on {gateway.url}", flush=True)
    import psutil

    me = psutil.Process()

    def body(tag: str, i: int) -> dict:
        rid = f"{tag}-{i}"
        return {"model": llm, "stream": True, "user": rid,
                "messages": [{"role": "user", "content": f"[{rid}] {prompts[i % len(prompts)]}"}]}

    gateway_ids: set[str] = set()
    levels_out = []
    for k, c in enumerate(levels):
        print(f"concurrency {c}: {args.requests_c1 if c == 1 else c * args.rounds} requests per path ...", flush=True)
        warm = [body(f"w{k}", i) for i in range(c * args.warmup)]
        asyncio.run(_phase(upstream_url, [{**b, "user": b["user"] + "-d"} for b in warm], c, tokens))
        asyncio.run(_phase(gateway.url, warm, c, tokens))
        gateway_ids |= {b["user"] for b in warm}
        cpu0 = (gateway.cpu(), fake.cpu() if fake else 0.0, sum(me.cpu_times()[:2]))
        if c == 1:
            bodies = [body(f"L{k}", i) for i in range(args.requests_c1)]
            d_res, g_res, g_secs = asyncio.run(_paired(upstream_url, gateway.url, bodies, tokens))
            d_secs = None
        else:
            bodies = [body(f"L{k}", i) for i in range(c * args.rounds)]
            d_res, d_secs = asyncio.run(_phase(upstream_url, [{**b, "user": b["user"] + "-d"} for b in bodies], c,
                                               tokens))
            cpu0 = (gateway.cpu(), fake.cpu() if fake else 0.0, sum(me.cpu_times()[:2]))
            g_res, g_secs = asyncio.run(_phase(gateway.url, bodies, c, tokens))
        cpu1 = (gateway.cpu(), fake.cpu() if fake else 0.0, sum(me.cpu_times()[:2]))
        gateway_ids |= {b["user"] for b in bodies}
        direct = _summary(d_res, d_secs or sum(r["ttlt"] or 0 for r in d_res))
        via = _summary(g_res, g_secs)
        level = {"concurrency": c, "direct": direct, "gateway": via,
                 "added_ms": {k: round(via[k] - direct[k], 2) if via[k] is not None and direct[k] is not None
                              else None for k in ("ttft_p50_ms", "ttft_p99_ms", "ttlt_p50_ms", "ttlt_p99_ms")},
                 # at concurrency 1 the upstream and the clients also served the direct requests: halved
                 "cpu_ms_per_request": {name: round((b - a) * 1000 / len(bodies) / share, 3) for name, a, b, share
                                        in zip(("gateway", "upstream", "clients"), cpu0, cpu1,
                                               (1, 2, 2) if c == 1 else (1, 1, 1), strict=True)}}
        if c == 1:
            pairs = [(g["ttft"] - d["ttft"], g["ttlt"] - d["ttlt"]) for g, d in zip(g_res, d_res, strict=True)
                     if g["ok"] and d["ok"]]
            level["added_ms"]["paired_ttft_p50_ms"] = _pct([p[0] for p in pairs], 50)
            level["added_ms"]["paired_ttlt_p50_ms"] = _pct([p[1] for p in pairs], 50)
        levels_out.append(level)
        print(f"concurrency {c:4d}: gateway {via['rps']:7.1f} rps (direct {direct['rps']:7.1f}), lost {via['lost']}"
              f"+{direct['lost']}, added TTFT p50 {level['added_ms']['ttft_p50_ms']} ms p99 "
              f"{level['added_ms']['ttft_p99_ms']} ms, TTLT p50 {level['added_ms']['ttlt_p50_ms']} ms, gateway CPU "
              f"{level['cpu_ms_per_request']['gateway']} ms/request", flush=True)
    import httpx

    stats = httpx.get(fake.url + "/fake/stats").json() if fake else None
    upstream_errors = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                       for line in httpx.get(gateway.url + "/metrics").text.splitlines()
                       if line.startswith("lenpred_gateway_upstream_errors_total{")}
    exit_code = gateway.stop()  # SIGTERM: drains the log
    if fake:
        fake.stop()
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": mode,
              "model": args.model or mode, "backend": args.backend, "llm": llm,
              "upstream": args.upstream or f"fake: {args.tokens} tokens at {args.token_rate} tokens/s",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg": [round(x, 2) for x in os.getloadavg()], "threads": args.threads},
              "predict_alone": reference, "levels": levels_out, "gateway_exit_code": exit_code,
              "duplicated_at_upstream": len(stats["duplicated"]) if stats else None,
              "gateway_upstream_errors": upstream_errors,
              "log": _log_check(log, gateway_ids)}
    result["bar"] = _bar(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_table(result))
    print(_table(result))
    return result


def _bar(r: dict) -> dict:
    """The gateway bar, judged on this run's figures (None where this mode does not measure it)."""
    top = max(r["levels"], key=lambda x: x["concurrency"])
    c1 = next((x for x in r["levels"] if x["concurrency"] == 1), None)
    lost = sum(x["gateway"]["lost"] for x in r["levels"])
    out = {"no_loss_duplicate_or_torn_line": lost == 0 and not r["duplicated_at_upstream"] and r["log"]["torn"] == 0
           and r["log"]["missing"] == 0 and r["log"]["duplicated"] == 0,
           "rps_500_at_512_no_predict": (top["gateway"]["rps"] >= 500) if r["mode"] == "no-predict"
           and top["concurrency"] >= 512 else None, "ttft_c1_within_predict_plus_3ms": None}
    if c1 and r["predict_alone"]:
        limit = r["predict_alone"]["batch1_after_idle_p50_ms"] + 3  # the model's own time at the same pace
        out["ttft_c1_within_predict_plus_3ms"] = c1["added_ms"]["ttft_p50_ms"] <= limit
    return out


def _table(r: dict) -> str:
    lines = [f"# Gateway load: {r['mode']} ({r['date']})", "",
             f"Upstream: {r['upstream']}; LLM {r['llm']}; machine {r['machine']}.",
             f"Predict alone (batch 1): {r['predict_alone']}" if r["predict_alone"] else "Prediction off.", "",
             "| concurrency | gateway rps | direct rps | lost | added TTFT p50 / p99 ms | added TTLT p50 / p99 ms "
             "| gateway CPU ms/req | upstream / clients CPU ms/req |", "|---|---|---|---|---|---|---|---|"]
    for x in r["levels"]:
        a, cpu = x["added_ms"], x["cpu_ms_per_request"]
        lines.append(f"| {x['concurrency']} | {x['gateway']['rps']} | {x['direct']['rps']} | {x['gateway']['lost']} "
                     f"| {a['ttft_p50_ms']} / {a['ttft_p99_ms']} | {a['ttlt_p50_ms']} / {a['ttlt_p99_ms']} "
                     f"| {cpu['gateway']} | {cpu['upstream']} / {cpu['clients']} |")
    lines += ["", f"Log: {r['log']}; duplicated at the upstream: {r['duplicated_at_upstream']}; gateway exit code "
                  f"{r['gateway_exit_code']}.", f"Bar: {r['bar']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
