"""Write the benchmark's report from its saved runs: summary.csv, sim_vs_real.csv, quality.csv, checks.json,
figures and summary.md, every number computed here from the data in OUT (rerun with ``replay.py --report-only``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.serving.analysis import (bar_checks, load_label, per_seed_cuts, priority_order, repeatability,
                                         summarize_runs)

__all__ = ["load_runs", "write_report"]

POLICY_LABELS = {"fcfs": "FCFS", "prompt_len": "prompt length", "oracle": "oracle (reference lengths)",
                 "lenpred": "LenPred zero-shot (sibling)", "lenpred_adapted": "LenPred adapted (pass 2)"}


def load_runs(out: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    runs = pd.DataFrame([json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))])
    runs["load"] = runs["load"].astype(float)
    records = {r: pd.read_parquet(out / "runs" / f"{r}.parquet") for r in runs["run_id"]}
    return runs, records


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, (float, np.floating)) else str(x)


def _table(df: pd.DataFrame, cols: list[str], nd=2) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v, nd) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


def _figures(summary: pd.DataFrame, cuts: pd.DataFrame, svr: pd.DataFrame | None, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    made = []
    loads = sorted(summary["load"].unique(), key=lambda x: (math.isinf(x), x))
    pols = [p for p in POLICY_LABELS if p in set(summary["policy"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    w = 0.8 / max(len(pols), 1)
    for k, (metric, title) in enumerate((("mean_completion_s", "mean completion time (s)"),
                                         ("p90_completion_s", "p90 completion time (s)"))):
        ax = axes[k]
        for i, p in enumerate(pols):
            s = summary[summary["policy"] == p].set_index("load").reindex(loads)
            ax.bar(np.arange(len(loads)) + i * w, s[f"{metric}_mean"], w, yerr=s[f"{metric}_std"].fillna(0),
                   label=POLICY_LABELS[p], capsize=2)
        ax.set_xticks(np.arange(len(loads)) + w * (len(pols) - 1) / 2, [load_label(x) for x in loads])
        ax.set_xlabel("load (share of measured capacity)")
        ax.set_title(title + ", mean ± std over seeds")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "completion.png", dpi=110)
    plt.close(fig)
    made.append("completion.png")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, p in enumerate([p for p in pols if p != "fcfs"]):
        c = cuts[cuts["policy"] == p]
        x = np.array([loads.index(v) for v in c["load"]]) + (i - 1.5) * 0.12
        ax.scatter(x, c["cut_pct"], label=POLICY_LABELS[p], s=18)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(loads)), [load_label(x) for x in loads])
    ax.set_ylabel("cut in mean completion vs FCFS (%), one dot per seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cuts.png", dpi=110)
    plt.close(fig)
    made.append("cuts.png")
    if svr is not None and len(svr):
        fig, ax = plt.subplots(figsize=(5, 5))
        s = svr[svr["policy"] != "fcfs"]
        ax.scatter(s["real_cut_pct"], s["sim_cut_pct"])
        for r in s.itertuples(index=False):
            ax.annotate(f"{r.policy} @{load_label(r.load)}", (r.real_cut_pct, r.sim_cut_pct), fontsize=7)
        lim = [min(0, s[["real_cut_pct", "sim_cut_pct"]].min().min()) - 2,
               s[["real_cut_pct", "sim_cut_pct"]].max().max() + 5]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.fill_between(lim, [v * 0.75 for v in lim], [v * 1.25 for v in lim], color="grey", alpha=0.15)
        ax.set_xlabel("real engine: cut vs FCFS (%)")
        ax.set_ylabel("simulator, same trace: cut vs FCFS (%)")
        fig.tight_layout()
        fig.savefig(out / "sim_vs_real.png", dpi=110)
        plt.close(fig)
        made.append("sim_vs_real.png")
    return made


def write_report(out: Path, smoke: bool = False) -> dict:
    """Compute everything from OUT's runs and write the report files; return the checks."""
    from benchmarks.serving.simcompare import compare, fit_sim_config, oracle_noise

    out = Path(out)
    meta = json.loads((out / "meta.json").read_text())
    cfg = meta["config"]
    runs, records = load_runs(out)
    grid = runs[runs["phase"] == "grid"].copy()
    reference = pd.read_parquet(out / "reference.parquet")
    summary = summarize_runs(grid)
    summary.to_csv(out / "summary.csv", index=False)
    cuts = per_seed_cuts(grid)
    grid_rec = pd.concat([records[r] for r in grid["run_id"]], ignore_index=True)
    rep = repeatability(grid_rec, reference["tokens"])
    solo = pd.concat([records[r] for r in runs.loc[runs["phase"] == "solo", "run_id"]], ignore_index=True)
    sim_cfg, fit = fit_sim_config(solo, records["reference"], cfg["max_num_seqs"], cfg["max_tokens"],
                                  meta.get("kv_cache_tokens"))
    per_run, svr = compare(grid, records, sim_cfg)
    per_run.to_csv(out / "sim_vs_real_runs.csv", index=False)
    svr.to_csv(out / "sim_vs_real.csv", index=False)
    noise = oracle_noise(grid, records, sim_cfg)
    quality = None
    qpath = out / "quality.csv"
    if qpath.exists():
        q = pd.read_csv(qpath)
        get = lambda m: float(q.loc[q["model"] == m, "tau"].iloc[0]) if (q["model"] == m).any() else math.nan  # noqa
        # the zero-shot reference is the stand-in the product picks itself (`train.py --adapt sibling`, served as
        # `lenpred`); the MAE-on-the-log pick (`zero_shot`) where that export is absent
        zero = "lenpred" if (q["model"] == "lenpred").any() else "zero_shot"
        quality = {"tau_adapted": get("lenpred_adapted"), "tau_zero_shot": get(zero)}
    high = max([x for x in grid["load"].unique() if math.isfinite(x)], default=math.inf)
    all_ok = runs["check_ok"].astype(bool)
    lost = {"runs": int(len(runs)), "runs_ok": int(all_ok.sum())}
    checks = bar_checks(summary, high, quality, svr, lost)
    (out / "checks.json").write_text(json.dumps(dict(checks=checks, repeatability=rep, sim_fit=fit,
                                                     oracle_noise=noise.to_dict("records")), indent=2, default=str))
    figs = _figures(summary, cuts, svr, out)
    md = [f"# LenPred in front of a real vLLM{' — SMOKE RUN (busy CPU, tiny sizes: not results)' if smoke else ''}",
          "", f"Written by `benchmarks/serving/replay.py` from the runs in this folder. Served LLM "
          f"`{cfg['served_name']}` on vLLM (`--max-num-seqs {cfg['max_num_seqs']}`, `--scheduling-policy "
          f"priority`), LenPred base export `{cfg['base_export']}`; {cfg['requests']} requests a run, "
          f"`max_tokens` {cfg['max_tokens']}, temperature {cfg['temperature']}, seeds {cfg['seeds']}, loads "
          f"{[load_label(float(x)) for x in cfg['loads']]} of the measured capacity "
          f"({_fmt(meta.get('capacity_rps'), 3)} requests/s, FCFS backlog of the evaluation pool).", ""]
    md += [f"- note: {n}" for n in meta.get("notes", [])]
    md += ["", "## Bar", "", _table(pd.DataFrame(checks), ["check", "value", "target", "met"], 3), ""]
    s = summary.assign(load=summary["load"].map(load_label), policy=summary["policy"].map(
        lambda p: POLICY_LABELS.get(p, p)))
    cols = ["policy", "load", "n_seeds", "mean_completion_s_mean", "mean_completion_s_std", "p50_completion_s_mean",
            "p90_completion_s_mean", "mean_ttft_s_mean", "throughput_tps_mean", "preemptions_mean", "gain_pct_mean",
            "gain_pct_std", "share_of_oracle_gain"]
    md += ["## Completion time per policy and load (mean over seeds; std over seeds)", "",
           _table(s, [c for c in cols if c in s.columns]), "", "![completion](completion.png) ![cuts](cuts.png)", ""]
    honoured = pd.DataFrame([dict(run=r.run_id, policy=r.policy, tau=priority_order(records[r.run_id],
                                                                                  cfg["max_num_seqs"]))
                             for r in grid[np.isinf(grid["load"])].itertuples(index=False)]).dropna()
    if len(honoured):
        honoured.to_csv(out / "priority_order.csv", index=False)
        md += ["## Priorities honoured?", "", "Backlog runs: Kendall tau between the priority vLLM got and the "
               f"order requests started in (the first {cfg['max_num_seqs']} starters left out: they found free "
               "slots before the rest arrived); 1 = started strictly by priority.", "",
               _table(honoured, ["run", "policy", "tau"], 3), ""]
    md += ["## Greedy lengths repeat?", "",
           f"Over {rep['answers']} grid answers of {rep['prompts']} prompts: {100 * rep['same_length_share']:.1f} % "
           f"had exactly the reference pass's length, {100 * rep['prompts_always_same_share']:.1f} % of prompts never "
           f"changed length, mean |diff| {rep['mean_abs_diff']:.1f} tokens (p90 {rep['p90_abs_diff']:.0f}), "
           f"Kendall tau reference vs observed {rep['kendall_tau']:.3f}."]
    if len(noise) and np.isfinite(noise["share_of_exact"]).any():
        md += [f"On the oracle runs' own traces the simulator gives ordering by the reference lengths "
               f"{noise['sim_cut_sent_pct'].mean():.1f} % cut vs {noise['sim_cut_exact_pct'].mean():.1f} % for "
               f"ordering by the lengths the runs produced: the noise leaves the oracle "
               f"{100 * noise['share_of_exact'].mean():.0f} % of an exact oracle's cut."]
    md += ["", "## Simulator vs real (same traces)", "",
           "Simulator fitted on the solo requests and the FCFS reference pass only: " + ", ".join(
               f"{k} {_fmt(v, 3)}" for k, v in fit.items()) + ".", "",
           _table(svr.assign(load=svr["load"].map(load_label)), ["policy", "load", "seeds", "real_mean_completion_s",
                                                                 "sim_mean_completion_s", "real_cut_pct",
                                                                 "sim_cut_pct"]), "",
           "![sim vs real](sim_vs_real.png)", ""]
    if qpath.exists():
        q = pd.read_csv(qpath)
        md += ["## Closed loop: prediction quality for the served LLM on prompts not in pass 1's log", "",
               _table(q, [c for c in ("model", "llm", "n", "mae", "tau", "acc500", "acc50_of_mean") if c in q], 3), ""]
    for k, v in meta.get("adaptation", {}).items():
        md.append(f"- adaptation for `{k}`: {v['seconds']} s; `{v['command']}`")
    md += ["", "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in meta.get("timings_s", {}).items()), ""]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return dict(checks=checks, figures=figs)
