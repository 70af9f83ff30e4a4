"""Turn per-request records into per-run metrics, a summary over seeds, repeatability figures and the bar's checks.

Why pure functions over frames: the summary's numbers are the serving targets, so they must come from the data by code
that tests can check with made-up records, never from hand-written text. The aggregation over seeds (mean, std,
cut vs FCFS paired by load and seed, share of the oracle's cut) is `lenpred.scheduling.summarize`, the simulator's
own, so "cut" means the same thing for the simulator and the real engine.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lenpred.scheduling import summarize

__all__ = ["run_metrics", "summarize_runs", "repeatability", "bar_checks", "load_label", "priority_order"]


def load_label(load: float) -> str:
    return "backlog" if math.isinf(load) else f"{load:g}"


def run_metrics(records: pd.DataFrame) -> dict:
    """Metrics of one run (seconds): completion = end of the answer's stream - submission, TTFT = first content
    chunk - submission; throughput over the span from the first submission to the last answer's end. Named like
    `lenpred.scheduling.simulate`'s output so both go through the same summary."""
    ok = records[(records["status"] == 200) & records["tokens"].notna()]
    comp = (ok["done_s"] - ok["submit_s"]).to_numpy(float)
    ttft = (ok["first_s"] - ok["submit_s"]).to_numpy(float)
    ttft = ttft[np.isfinite(ttft)]
    span = float(ok["done_s"].max() - records["submit_s"].min()) if len(ok) else math.nan
    tokens = ok["tokens"].to_numpy(float)

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else math.nan

    return dict(n_requests=int(len(records)), n_answered=int(len(ok)),
                mean_completion_s=float(comp.mean()) if len(comp) else math.nan,
                p50_completion_s=pct(comp, 50), p90_completion_s=pct(comp, 90), p99_completion_s=pct(comp, 99),
                mean_ttft_s=float(ttft.mean()) if len(ttft) else math.nan, p50_ttft_s=pct(ttft, 50),
                p90_ttft_s=pct(ttft, 90), throughput_rps=len(ok) / span if span else math.nan,
                throughput_tps=float(tokens.sum()) / span if span else math.nan, makespan_s=span,
                mean_tokens=float(tokens.mean()) if len(tokens) else math.nan,
                capped_share=float((ok["finish_reason"] == "length").mean()) if len(ok) else math.nan)


def summarize_runs(runs: pd.DataFrame, baseline: str = "fcfs", oracle: str = "oracle") -> pd.DataFrame:
    """Mean and std over seeds per policy x load, plus ``gain_pct`` (the cut in mean completion time vs FCFS, %,
    paired by load and seed) and ``share_of_oracle_gain``; see `lenpred.scheduling.summarize`."""
    return summarize(runs, baseline=baseline, oracle=oracle)


def per_seed_cuts(runs: pd.DataFrame, baseline: str = "fcfs") -> pd.DataFrame:
    """The cut (%) of every run against FCFS of the same load and seed: the spread behind the summary's mean."""
    base = runs.loc[runs["policy"] == baseline, ["load", "seed", "mean_completion_s"]]
    d = runs.merge(base.rename(columns={"mean_completion_s": "_base"}), on=["load", "seed"])
    return d.assign(cut_pct=100 * (d["_base"] - d["mean_completion_s"]) / d["_base"]).drop(columns="_base")


def repeatability(records: pd.DataFrame, reference: pd.Series) -> dict:
    """How often greedy decoding repeats a prompt's answer length across runs (batching changes the numerics on
    CPU): share of answers whose length equals the reference pass's, share of prompts whose length never changed,
    mean and p90 absolute difference, and the Kendall tau between reference and observed lengths."""
    from scipy.stats import kendalltau

    ok = records[records["tokens"].notna()]
    ref = reference.reindex(ok["prompt_id"]).to_numpy(float)
    got = ok["tokens"].to_numpy(float)
    keep = np.isfinite(ref)
    ref, got, pids = ref[keep], got[keep], ok["prompt_id"].to_numpy()[keep]
    diff = np.abs(got - ref)
    same = pd.Series(diff == 0).groupby(pids).all()
    return dict(answers=int(len(got)), prompts=int(len(same)), same_length_share=float((diff == 0).mean()),
                prompts_always_same_share=float(same.mean()), mean_abs_diff=float(diff.mean()),
                p90_abs_diff=float(np.percentile(diff, 90)), within_5pct_share=float((diff <= 0.05 * ref).mean()),
                kendall_tau=float(kendalltau(ref, got).statistic) if len(got) > 1 else math.nan)


def priority_order(records: pd.DataFrame, skip_first: int = 0) -> float:
    """Kendall tau between the priority vLLM got and when the request started (its first token), leaving out the
    ``skip_first`` requests that started first (under a backlog, those that found a free slot before the rest had
    arrived): near 1 when the engine honours the priority field, near 0 when it does not. NaN for constant
    priorities (FCFS)."""
    from scipy.stats import kendalltau

    r = records.dropna(subset=["priority", "first_s"]).sort_values("first_s").iloc[skip_first:]
    if len(r) < 3 or r["priority"].nunique() < 2:
        return math.nan
    return float(kendalltau(r["priority"], r["first_s"]).statistic)


def _get(summary: pd.DataFrame, policy: str, load: float, col: str) -> float:
    row = summary[(summary["policy"] == policy) & (summary["load"] == load)]
    return float(row[col].iloc[0]) if len(row) else math.nan


def bar_checks(summary: pd.DataFrame, high_load: float, quality: dict | None = None,
               sim_vs_real: pd.DataFrame | None = None, lost: dict | None = None) -> list[dict]:
    """The serving targets, each as {check, value, target, met} computed from the data (met is None when a part
    could not be measured). ``quality``: {"tau_adapted", "tau_zero_shot"}; ``sim_vs_real``: rows of policy,
    load, real_cut_pct, sim_cut_pct; ``lost``: {"runs", "runs_ok"}."""
    out = []

    def add(check, value, target, met):
        out.append(dict(check=check, value=value, target=target,
                        met=None if met is None or (isinstance(value, float) and math.isnan(value)) else bool(met)))

    for load in (math.inf, high_load):
        lab = load_label(load)
        oracle_cut = _get(summary, "oracle", load, "gain_pct_mean")
        # a share of a cut the oracle does not make (<= 0) says nothing: unmeasured, not met
        usable = oracle_cut > 0
        note = "" if usable or math.isnan(oracle_cut) else f" (oracle cut {oracle_cut:.1f} %: no share)"
        for policy, what, target in (("lenpred", "LenPred (zero-shot)", 0.85), ("lenpred_adapted",
                                                                                "pass 2 (adapted)", 0.90)):
            share = _get(summary, policy, load, "share_of_oracle_gain") if usable else math.nan
            add(f"{lab}: {what} share of the oracle's cut{note}", share, f">= {target:.2f}", share >= target)
        lp, pl = (_get(summary, p, load, "gain_pct_mean") for p in ("lenpred", "prompt_len"))
        add(f"{lab}: LenPred cut {lp:.1f} % vs prompt-length cut {pl:.1f} %", lp - pl, "> 0", lp > pl)
    if quality:
        d = quality.get("tau_adapted", math.nan) - quality.get("tau_zero_shot", math.nan)
        add("closed loop: tau(adapted) - tau(zero-shot sibling), unseen prompts", d, ">= 0.05", d >= 0.05)
    if sim_vs_real is not None and len(sim_vs_real):
        for r in sim_vs_real.itertuples(index=False):
            if r.policy == "fcfs":
                continue
            rel = abs(r.sim_cut_pct - r.real_cut_pct) / abs(r.real_cut_pct) if r.real_cut_pct else math.nan
            se = getattr(r, "real_cut_std", math.nan) / math.sqrt(max(getattr(r, "seeds", 1), 1))
            noise = f" ± {se:.1f} (s.e. over seeds)" if math.isfinite(se) else ""
            add(f"{load_label(r.load)}: simulator cut {r.sim_cut_pct:.1f} % vs real {r.real_cut_pct:.1f} %{noise} "
                f"({r.policy}), relative error", rel, "<= 0.25", rel <= 0.25)
    if lost:
        add(f"nothing lost: runs with every request answered and logged exactly once ({lost['runs_ok']} of "
            f"{lost['runs']})", float(lost["runs_ok"]), f"= {lost['runs']}", lost["runs_ok"] == lost["runs"])
    return out
