"""The real engine's trace through `lenpred.scheduling`: the simulator, configured like the measured server, against
what the server did.

Why: the simulator is how LenPred's scheduling gains were argued so far; a real engine says whether it can be
trusted. The simulator replays each run exactly (same submission times, same priorities as vLLM received them,
each request's actual answer length and prompt length), so any gap is the cost model's or the engine's, not the
workload's. Its constants come from the server, not from defaults:

- ``max_batch`` = vLLM's ``--max-num-seqs``; ``kv_capacity`` = the KV-cache tokens vLLM reports; ``max_tokens`` =
  the replay's cap;
- ``prefill_per_token_ms``: time to first token over prompt tokens (least squares through the origin), requests
  sent one at a time;
- decode step ``step_base_ms + step_per_req_ms * B``: one request alone fixes the step at B = 1 (its time between
  tokens); ``step_per_req_ms`` is then the value at which the simulated FCFS backlog reference pass takes as long
  as the real one (bisection). Every other run, and every policy's cut, is a prediction.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from lenpred.scheduling import SimConfig, simulate

__all__ = ["sim_requests", "simulate_run", "fit_sim_config", "compare", "oracle_noise"]


def sim_requests(records: pd.DataFrame, priority: str = "priority") -> pd.DataFrame:
    """A run's records as simulator requests: one server, the actual lengths, the times the client sent them
    (a backlog's requests leave a few ms apart, and vLLM starts the first before the rest arrive: so does the
    simulator)."""
    ok = records[records["tokens"].notna()]
    sent = ok["sent_s"] if "sent_s" in ok and ok["sent_s"].notna().all() else ok["submit_s"]
    pri = pd.to_numeric(ok[priority], errors="coerce").fillna(0).to_numpy(float) if priority in ok else 0.0
    return pd.DataFrame({"llm": "served", "input_size": ok["prompt_tokens"].astype(int).to_numpy(),
                         "output_sizes": [[int(t)] for t in ok["tokens"]], "arrival_s": sent.to_numpy(float),
                         "priority": pri})


def simulate_run(records: pd.DataFrame, config: SimConfig, order: str = "spf", priority: str = "priority") -> dict:
    """Simulate one run as it was sent. ``order="spf"`` with the priorities vLLM got (FCFS is a constant priority:
    ties go to the earlier arrival), or "oracle" (the actual lengths, known a posteriori)."""
    req = sim_requests(records, priority)
    return simulate(req, order=order, order_column="priority" if order == "spf" else None, config=config,
                    arrival_column="arrival_s")


def fit_sim_config(solo: pd.DataFrame, reference: pd.DataFrame, max_num_seqs: int, max_tokens: int,
                   kv_tokens: int | None) -> tuple[SimConfig, dict]:
    """Fit the cost model to the server (see the module docstring); return the config and what it was fitted on."""
    s = solo[solo["tokens"].notna() & (solo["tokens"] > 1)]
    if len(s) == 0:
        raise ValueError("no solo request with more than one token: cannot time a decode step")
    itl1 = float(np.median((s["last_s"] - s["first_s"]) / (s["tokens"] - 1))) * 1000
    ttft = (s["first_s"] - s["submit_s"]).to_numpy(float) * 1000
    x = s["prompt_tokens"].to_numpy(float)
    slope = float((x * ttft).sum() / (x * x).sum())  # through the origin: vLLM's first token comes from the prefill
    kv = int(kv_tokens) if kv_tokens else 1_000_000
    base = SimConfig(step_base_ms=itl1, step_per_req_ms=0.0, step_per_ctx_token_us=0.0,
                     prefill_per_token_ms=max(slope, 0.0), kv_capacity=max(kv, max_tokens + 1), max_tokens=max_tokens,
                     max_batch=max_num_seqs, aging_rate=0.0)
    real = float(reference["done_s"].max() - reference["submit_s"].min())

    def makespan(per_req):
        cfg = dataclasses.replace(base, step_base_ms=itl1 - per_req, step_per_req_ms=per_req)
        return simulate_run(reference.assign(priority=0), cfg)["makespan_s"], cfg

    lo, hi = 0.0, itl1
    if makespan(lo)[0] >= real:
        hi = lo
    elif makespan(hi)[0] <= real:
        lo = hi
    for _ in range(40):
        if hi - lo < 1e-4:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if makespan(mid)[0] < real else (lo, mid)
    fitted, cfg = makespan((lo + hi) / 2)
    return cfg, dict(itl_batch1_ms=itl1, prefill_per_token_ms=base.prefill_per_token_ms, solo_requests=int(len(s)),
                     reference_makespan_s=real, simulated_makespan_s=fitted,
                     step_ms_at_max_batch=cfg.step_base_ms + cfg.step_per_req_ms * max_num_seqs,
                     kv_capacity=cfg.kv_capacity, kv_reported=kv_tokens is not None)


def compare(runs: pd.DataFrame, records: dict[str, pd.DataFrame], config: SimConfig) -> tuple[pd.DataFrame,
                                                                                               pd.DataFrame]:
    """Simulate every grid run; return (per-run table with sim_mean_completion_s, per policy x load table of the
    mean real and simulated cut vs FCFS over seeds, paired by seed)."""
    rows = []
    for r in runs.itertuples(index=False):
        sim = simulate_run(records[r.run_id], config)
        rows.append(dict(run_id=r.run_id, policy=r.policy, load=r.load, seed=r.seed,
                         real_mean_completion_s=r.mean_completion_s, sim_mean_completion_s=sim["mean_completion_s"],
                         real_mean_ttft_s=r.mean_ttft_s, sim_mean_ttft_s=sim["mean_ttft_s"],
                         real_makespan_s=r.makespan_s, sim_makespan_s=sim["makespan_s"]))
    per_run = pd.DataFrame(rows)
    base = per_run[per_run["policy"] == "fcfs"].set_index(["load", "seed"])
    out = []
    for (policy, load), g in per_run.groupby(["policy", "load"], sort=False):
        b = base.reindex(list(zip(g["load"], g["seed"])))
        real = 100 * (b["real_mean_completion_s"].to_numpy() - g["real_mean_completion_s"].to_numpy()) \
            / b["real_mean_completion_s"].to_numpy()
        sim = 100 * (b["sim_mean_completion_s"].to_numpy() - g["sim_mean_completion_s"].to_numpy()) \
            / b["sim_mean_completion_s"].to_numpy()
        out.append(dict(policy=policy, load=load, seeds=int(len(g)),
                        real_mean_completion_s=g["real_mean_completion_s"].mean(),
                        sim_mean_completion_s=g["sim_mean_completion_s"].mean(),
                        real_cut_pct=float(np.nanmean(real)), sim_cut_pct=float(np.nanmean(sim)),
                        real_cut_std=float(np.nanstd(real, ddof=1)) if len(g) > 1 else math.nan,
                        sim_cut_std=float(np.nanstd(sim, ddof=1)) if len(g) > 1 else math.nan))
    return per_run, pd.DataFrame(out)


def oracle_noise(runs: pd.DataFrame, records: dict[str, pd.DataFrame], config: SimConfig) -> pd.DataFrame:
    """How much the reference lengths' noise costs the oracle: on each oracle run's own trace, the simulator's cut
    vs FCFS when ordering by the reference lengths that were sent, and when ordering by the lengths the run
    actually produced (a perfect oracle). Their ratio bounds what the real oracle could gain from exact lengths."""
    rows = []
    for r in runs[runs["policy"] == "oracle"].itertuples(index=False):
        rec = records[r.run_id]
        fcfs = simulate_run(rec.assign(priority=0), config)["mean_completion_s"]
        sent = simulate_run(rec, config)["mean_completion_s"]
        exact = simulate_run(rec, config, order="oracle")["mean_completion_s"]
        rows.append(dict(load=r.load, seed=r.seed, sim_cut_sent_pct=100 * (fcfs - sent) / fcfs,
                         sim_cut_exact_pct=100 * (fcfs - exact) / fcfs))
    d = pd.DataFrame(rows)
    if len(d):
        d["share_of_exact"] = d["sim_cut_sent_pct"] / d["sim_cut_exact_pct"]
    return d
