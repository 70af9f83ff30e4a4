"""The report's figures (PNG, matplotlib's Agg backend): what a table cannot show at a glance — length
distributions, loss curves, accuracy against bin size, predicted against true means, calibration, and the
scheduling sweep against load."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lenpred.data import PAPER_LLMS
from lenpred.report import ALL_LLMS, METHODS, order_llms, short_llm_name

__all__ = ["plot_figures", "plot_sweep"]


def plot_figures(report: dict, rows: pd.DataFrame, out_dir: str | Path, trainer_state: dict | None = None) -> dict:
    """Write the PNGs into `out_dir/figures`; returns {title: relative path} for report["figures"]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(out_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        made[title] = f"figures/{name}"

    llms = order_llms(rows["llm"].unique())
    ncol = min(4, len(llms))
    nrow = math.ceil(len(llms) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    bins = np.logspace(0, np.log10(16000), 40)
    for ax, llm in zip(axes.flat, llms):
        sizes = np.concatenate([np.asarray(s, float) for s in rows.loc[rows["llm"] == llm, "output_sizes"]
                                if s is not None and len(s)] or [np.zeros(0)])
        ax.hist(np.clip(sizes, 1, None), bins=bins, color="tab:blue")
        ax.set_xscale("log"), ax.set_title(short_llm_name(llm), fontsize=8), ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(llms):]:
        ax.axis("off")
    fig.suptitle("Sampled output lengths per LLM (test split, tokens)")
    save(fig, "length_distribution.png", "Output-length distribution per LLM")

    if trainer_state and trainer_state.get("log_history"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("loss", "training loss"), ("eval_loss", "eval loss")):
            pts = [(h["step"], h[key]) for h in trainer_state["log_history"] if key in h and "step" in h]
            if pts:
                ax.plot(*zip(*pts), marker="." if key == "eval_loss" else None, label=label)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
        save(fig, "loss_curves.png", "Training and eval loss")

    res = report["results"]
    fig, axes = plt.subplots(1, len(res), figsize=(5.5 * len(res), 3.8), squeeze=False)
    sizes = report["meta"]["bin_sizes"]
    for ax, (name, per) in zip(axes.flat, res.items()):
        picks = [m for m in PAPER_LLMS if m in per] or [m for m in per if m != ALL_LLMS]
        for m in [*report["meta"]["methods"], "paper"]:
            accs = [[per[l][m]["classification"][str(s)]["accuracy"] for l in picks if m in per[l]] for s in sizes]
            if all(accs):
                ax.plot(sizes, [100 * np.mean(a) for a in accs], marker="o", label=METHODS[m],
                        color=f"C{list(METHODS).index(m)}")
        ax.set_xscale("log"), ax.set_xlabel("bin size (tokens)"), ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{name} (mean over {len(picks)} LLMs)", fontsize=9), ax.legend(fontsize=7)
    save(fig, "accuracy_vs_bin_size.png", "Accuracy vs bin size")

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, color in (("in_distribution", "tab:blue"), ("alpaca", "tab:orange")):
        part = rows[rows["subset"] == name]
        ax.scatter(part["output_mean"].clip(lower=1), part["lenpred_mean"].clip(lower=1), s=3, alpha=0.3,
                   color=color, label=name)
    ax.plot([1, 16000], [1, 16000], color="k", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("true mean (tokens)")
    ax.set_ylabel("predicted mean (tokens)"), ax.legend()
    save(fig, "predicted_vs_true.png", "Predicted vs true mean (LenPred)")

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, curves in report.get("calibration_curve", {}).items():
        for m, c in curves.items():
            if c:
                ax.plot(c["nominal"], c["empirical"], marker=".", color=f"C{list(METHODS).index(m)}",
                        ls="--" if name == "alpaca" else "-", label=f"{METHODS[m]}, {name}")
    ax.plot([0, 1], [0, 1], color="k", lw=0.8)
    ax.set_xlabel("nominal share inside mean ± kσ"), ax.set_ylabel("observed share"), ax.legend(fontsize=7)
    save(fig, "calibration.png", "Calibration of the predicted std")
    return made


def plot_sweep(summary: pd.DataFrame, path: str) -> str:
    """Save a PNG: mean completion time vs load (left), share of the oracle's gain vs load (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    summary = summary[np.isfinite(summary["load"])]  # the backlog (load inf) is a table, not a point
    for name, g in summary.groupby("policy", sort=False):
        g = g.sort_values("load")
        ax1.errorbar(g["load"], g["mean_completion_s_mean"], yerr=g["mean_completion_s_std"].fillna(0),
                     marker="o", capsize=3, label=name)
        ax2.plot(g["load"], g["share_of_oracle_gain"], marker="o", label=name)
    ax1.set(xlabel="load (share of server capacity)", ylabel="mean completion time (s)",
            title="Completion time")
    ax2.set(xlabel="load (share of server capacity)", ylabel="share of oracle gain vs FCFS",
            title="Share of oracle gain")
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.axhline(1, color="grey", lw=0.5, ls="--")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
