"""Size the replay: how long are the served LLM's answers, and what would an oracle gain at each `max_tokens` cap?

Why: on a CPU the benchmark's hour buys only so many tokens, and the cap decides what ordering can gain: answers
that hit the cap all tie. This sends ``--prompts`` pool prompts (the replay's filter) to vLLM directly at a high
cap, as a backlog, saves their lengths, and replays them through `lenpred.scheduling` at several caps with a cost
model given on the command line (defaults: 2 free cores, ~70 answer tokens/s at batch 4, a prompt token ~0.6 of an
answer token).

    python benchmarks/serving/probe_lengths.py --out reports/serving/probe-lengths            # measure + simulate
    python benchmarks/serving/probe_lengths.py --out reports/serving/probe-lengths --simulate-only
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lenpred.scheduling import SimConfig, simulate  # noqa: E402


def measure(a) -> pd.DataFrame:
    from transformers import AutoTokenizer

    from benchmarks.serving.client import run_trace
    from benchmarks.serving.stack import SERVED_NAME, VLLMServer, VLLMSpec
    from benchmarks.serving.workload import castillo_prompts, make_trace, sample_pools

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    pool = sample_pools(castillo_prompts(split="test", tokenizer=tok, max_prompt_tokens=a.max_prompt_tokens),
                        a.prompts, 0, 0, seed=a.seed).eval
    with VLLMServer(VLLMSpec(model_dir=a.model_dir, python=a.vllm_python), Path(a.out) / "vllm.log") as v:
        trace = make_trace(pool, "fcfs", math.inf, 0.0, 0)
        rec = run_trace(v.url, SERVED_NAME, trace, a.cap, 0.0, 0)
    return rec.merge(trace[["prompt_id", "prompt_set"]], on="prompt_id")


def oracle_cuts(lengths, prompt_tokens, caps, n: int, cfg: SimConfig, seeds: int = 8) -> pd.DataFrame:
    """The simulator's oracle cut vs FCFS (%) per cap and load, for ``n`` requests drawn from the measured ones."""
    rng = np.random.default_rng(0)
    rows = []
    for cap in caps:
        for s in range(seeds):
            k = rng.integers(0, len(lengths), n)
            req = pd.DataFrame({"llm": "x", "input_size": np.asarray(prompt_tokens)[k],
                                "output_sizes": [[int(min(x, cap))] for x in np.asarray(lengths)[k]]})
            c = SimConfig(**{**cfg.__dict__, "max_tokens": cap})
            for load in (math.inf, 0.9, 0.7):
                f = simulate(req, "fcfs", config=c, load=load, seed=s)
                o = simulate(req, "oracle", config=c, load=load, seed=s)
                rows.append(dict(cap=cap, load=load, seed=s, fcfs_makespan_s=f["makespan_s"],
                                 oracle_cut_pct=100 * (1 - o["mean_completion_s"] / f["mean_completion_s"])))
    d = pd.DataFrame(rows)
    return d.groupby(["cap", "load"]).agg(oracle_cut_pct=("oracle_cut_pct", "mean"),
                                          oracle_cut_std=("oracle_cut_pct", "std"),
                                          fcfs_makespan_s=("fcfs_makespan_s", "mean")).reset_index()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/serving/probe-lengths")
    ap.add_argument("--model-dir", default=".cache/serving/SmolLM2-135M-Instruct")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--cap", type=int, default=384, help="max_tokens of the probe")
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--simulate-only", action="store_true", help="reuse OUT/lengths.csv")
    ap.add_argument("--requests", type=int, default=40, help="requests a simulated run")
    ap.add_argument("--caps", type=int, nargs="+", default=[64, 96, 128, 192, 256, 384])
    ap.add_argument("--step-ms", type=float, default=57.0, help="decode step at batch 4 (70 tokens/s / 4)")
    ap.add_argument("--prefill-ms", type=float, default=8.5, help="per prompt token")
    ap.add_argument("--max-prompt-sim", type=int, default=128, help="simulated prompts: the replay's default cap")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.simulate_only:
        measure(a)[["prompt_id", "prompt_set", "prompt_tokens", "tokens", "finish_reason"]].to_csv(
            out / "lengths.csv", index=False)
    rec = pd.read_csv(out / "lengths.csv")
    t = rec["tokens"]
    print(f"{len(t)} answers at cap {a.cap}: median {t.median():.0f}, mean {t.mean():.0f}, "
          f"{100 * (rec['finish_reason'] == 'length').mean():.0f} % hit the cap")
    cfg = SimConfig(step_base_ms=a.step_ms - 8, step_per_req_ms=2.0, step_per_ctx_token_us=0.0,
                    prefill_per_token_ms=a.prefill_ms, kv_capacity=93_184, max_batch=4, aging_rate=0.0)
    prompts = np.random.default_rng(1).integers(35, a.max_prompt_sim, len(t))  # the replay's prompt range
    cuts = oracle_cuts(t.to_numpy(), prompts, a.caps, a.requests, cfg)
    cuts.to_csv(out / "oracle_cuts.csv", index=False)
    print(cuts.assign(load=cuts["load"].map(lambda x: "backlog" if math.isinf(x) else x)).round(1).to_string(
        index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
