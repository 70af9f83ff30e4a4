"""Replay CASTILLO prompts through the LenPred gateway into a real vLLM, under FCFS, prompt-length priority, an
oracle, LenPred zero-shot and LenPred adapted from the server's own log; compare with the simulator; report.

    bash benchmarks/serving/setup.sh                     # once: vLLM's venv + SmolLM2 as a folder vLLM serves
    python benchmarks/serving/replay.py --model outputs/lenpred-minilm --out reports/serving/full

It starts vLLM (``--upstream URL`` uses a running one instead) and the gateways, runs every phase (see
``bench.py``), stops them, then writes OUT/summary.md with the bar's checks computed from the runs (see
``report.py``). On a GPU server: ``--model-dir`` / ``--served-name`` for your LLM, ``--vllm-python`` for the
venv with the stock vLLM, and ``--scale`` to grow the workload with the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.serving` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd  # noqa: E402

from benchmarks.serving.stack import REPO, SERVED_NAME, repo_path  # noqa: E402
from benchmarks.serving.workload import POLICIES  # noqa: E402

__all__ = ["build_parser", "main", "closed_loop_quality"]

SIZING = """
Defaults are sized for 2 CPU cores (about an hour): 40 requests a run, max_tokens 192, prompts of at most 128
chat tokens, seeds 0 1, load 0.9 and a backlog. The full grid (3 seeds, loads 0.7 0.9 inf, 100 requests)
is `--seeds 0 1 2 --loads 0.7 0.9 inf --requests 100 --holdout 100 --adapt-prompts 200`: about 5 h on 2 cores,
minutes on a GPU server. The replay prints the grid's expected duration once it has measured the capacity.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__ + SIZING, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="outputs/lenpred-minilm", help="LenPred export (the base model)")
    ap.add_argument("--out", default="reports/serving/full", help="output folder (runs, logs, report)")
    ap.add_argument("--dataset", help="CASTILLO folder or Hub id (default: lenpred.data's, ../shared/data/castillo)")
    ap.add_argument("--model-dir", default=".cache/serving/SmolLM2-135M-Instruct", help="LLM folder vLLM serves")
    ap.add_argument("--served-name", default=SERVED_NAME, help="name vLLM serves it under (the log's `model`)")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the venv with vLLM")
    ap.add_argument("--upstream", help="use this running vLLM (base URL) instead of starting one")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="vLLM batch: small, so that a queue forms")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (CPU build only)")
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    ap.add_argument("--requests", type=int, default=40, help="requests a run (= the evaluation pool)")
    ap.add_argument("--holdout", type=int, default=40, help="further unseen prompts, scored for quality only")
    ap.add_argument("--adapt-prompts", type=int, default=100, help="prompts of pass 1 (the adaptation log)")
    ap.add_argument("--solo", type=int, default=6, help="requests sent one at a time (the simulator's fit)")
    ap.add_argument("--max-tokens", type=int, default=192, help="answer cap of every request")
    ap.add_argument("--max-prompt-tokens", type=int, default=128,
                    help="leave out longer prompts (chat tokens): on a CPU a prompt token costs about half an answer "
                         "token, and the benchmark is about answer lengths")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="replay seeds (order and arrivals)")
    ap.add_argument("--pool-seed", type=int, default=0, help="which prompts form the pools (same for every seed)")
    ap.add_argument("--loads", type=float, nargs="+", default=[0.9, math.inf],
                    help="shares of the measured capacity; inf = a backlog (all requests at t = 0)")
    ap.add_argument("--single-seed-loads", type=float, nargs="*", default=[],
                    help="of --loads, those run with the first seed only (to fit a time budget)")
    ap.add_argument("--gateway-threads", type=int, default=1, help="OMP_NUM_THREADS of each gateway")
    ap.add_argument("--gateway-cpus", type=int, nargs="*", help="pin the gateways to these CPUs")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply requests, pools and --max-num-seqs (a bigger server needs more of all three)")
    ap.add_argument("--backend", default="torch", help="gateway predictor backend (torch, onnx, ...)")
    ap.add_argument("--adapt-args", default="", help="extra train.py arguments for the adaptation, one string")
    ap.add_argument("--resume", action="store_true", help="skip runs already saved in --out")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from the saved runs")
    ap.add_argument("--smoke", action="store_true", help="label the report a smoke run (not results)")
    return ap


def _config(a: argparse.Namespace):
    from benchmarks.serving.bench import BenchConfig

    s = a.scale
    return BenchConfig(out=a.out, base_export=a.model, model_dir=a.model_dir, served_name=a.served_name,
                       vllm_python=a.vllm_python, upstream=a.upstream, max_num_seqs=max(1, round(a.max_num_seqs * s)),
                       max_model_len=a.max_model_len, kv_cache_gib=a.kv_cache_gib, vllm_args=a.vllm_arg,
                       requests=round(a.requests * s), holdout=round(a.holdout * s), adapt=round(a.adapt_prompts * s),
                       solo=a.solo, max_tokens=a.max_tokens, max_prompt_tokens=a.max_prompt_tokens, seeds=a.seeds,
                       loads=a.loads, single_seed_loads=a.single_seed_loads, gateway_threads=a.gateway_threads,
                       gateway_cpus=a.gateway_cpus, policies=a.policies, backend=a.backend,
                       adapt_args=shlex.split(a.adapt_args),
                       pool_seed=a.pool_seed, resume=a.resume, dataset=a.dataset)


def closed_loop_quality(out: Path, meta: dict) -> pd.DataFrame | None:
    """Quality for the served LLM on the prompts pass 1 never logged (evaluation + holdout pools), truth = the
    reference passes' lengths; written to OUT/quality.csv (and the zero-shot fit on the log to fit_on_log.csv)."""
    from benchmarks.serving.adapt import quality_table

    cfg = meta["config"]
    ref = pd.read_parquet(out / "reference.parquet")
    unseen = pd.concat([pd.read_parquet(out / f"pool-{p}.parquet") for p in ("eval", "holdout")], ignore_index=True)
    unseen = unseen.join(ref["tokens"], on="prompt_id").dropna(subset=["tokens"])
    pass1 = pd.read_parquet(out / "runs" / "pass1.parquet")[["prompt_id", "tokens"]].dropna()
    log_prompts = pd.read_parquet(out / "pool-adapt.parquet").merge(pass1, on="prompt_id")
    exports = {k: v for k, v in meta.get("exports", {}).items()}
    q = quality_table(cfg["base_export"], exports, cfg["served_name"], unseen, log_prompts, log_prompts["tokens"],
                      cfg["max_tokens"])
    q["table"].to_csv(out / "quality.csv", index=False)
    q["fit_on_log"].to_csv(out / "fit_on_log.csv", index=False)
    q["per_known_llm"].to_csv(out / "quality_known_llms.csv", index=False)
    return q["table"]


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for key in ("out", "model", "model_dir", "vllm_python", "dataset"):  # the servers run from the repository root
        if getattr(a, key) and (key == "out" or Path(getattr(a, key)).exists()):
            setattr(a, key, repo_path(getattr(a, key)))
    os.chdir(REPO)
    out = Path(a.out)
    if not a.report_only:
        from benchmarks.serving.bench import Bench

        if not a.upstream and not (REPO / a.vllm_python).exists() and not Path(a.vllm_python).exists():
            sys.exit(f"{a.vllm_python} not found: run `bash benchmarks/serving/setup.sh` first")
        t0 = time.monotonic()
        meta = Bench(_config(a)).run_all()
        t1 = time.monotonic()
        if meta.get("exports"):
            closed_loop_quality(out, meta)
        meta["timings_s"]["quality"] = round(time.monotonic() - t1, 1)
        meta["timings_s"]["benchmark"] = round(time.monotonic() - t0, 1)
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    from benchmarks.serving.report import write_report

    res = write_report(out, smoke=a.smoke)
    for c in res["checks"]:
        print(f"{'MET ' if c['met'] else 'n/a ' if c['met'] is None else 'MISS'} {c['check']}: {c['value']} "
              f"(target {c['target']})")
    print(f"report: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
