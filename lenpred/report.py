"""The evaluation report: scores per (subset, LLM, method), the paper's published figures, Markdown.

Every table is built from one JSON-able dict (`build_results`), and the Markdown is rendered from that dict, so
`report.json` and `report.md` agree by construction (the figures are `lenpred.figures`). Table builders take a
DataFrame of rows with prediction columns `{method}_mean`, `{method}_std` and optionally `{method}_bound` (the
reservation quantile), `{method}_p99` (the estimated p99 of the prompt's answers) and `{method}_bin` (bin-head argmax).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from configuration_lenpred import PAPER_BIN_SIZES, make_bin_edges
from lenpred.data import PAPER_LLMS
from lenpred.metrics import (bin_index, classification_scores, interval_coverage, kendall_within_sets,
                             length_prediction_scores, noise_floor, nominal_coverage, per_group_mae)

__all__ = ["METHODS", "SUBSETS", "PAPER_CITATION", "PAPER_RESULTS", "ALL_LLMS", "true_p99", "score_method",
           "ranking_scores", "build_results", "order_llms", "to_jsonable", "render_markdown", "render_subset",
           "render_scheduling", "measured_methods", "md_table", "short_llm_name", "fmt", "write_json",
           "calibration_curve"]

METHODS = {"lenpred": "LenPred (ours)", "median": "Prompt-set median", "knn": "kNN",
           "prompt": "Prompt baseline", "paper": "Paper (published, not measured here)",
           "paper_prompt": "Paper prompt baseline (published, not measured here)",
           "prompt_length": "Prompt length (input_size; ranking only)"}
SUBSETS = {"in_distribution": "Test split, the six training prompt sets (in distribution)",
           "alpaca": "Test split, Alpaca (held out: never trained on)"}
ALL_LLMS = "ALL"  # the pooled row over every LLM
PAPER_CITATION = ("\"Proactive Inference Scheduling via Output Length Prediction in LLMs\" (2025; the copy used "
                  "here names no authors), Tables 2-5")


def _paper_table(classification: dict, regression: dict) -> dict:
    """{short llm: (acc%, f1, …)} and {short llm: (mse, mae of mean, mse, mae of std)} → {full id: scores}."""
    ids = {"llama-1B": PAPER_LLMS[0], "llama-3B": PAPER_LLMS[1], "llama-8B": PAPER_LLMS[2]}
    return {ids[k]: {"classification": {str(s): {"accuracy": v[2 * i] / 100, "f1": v[2 * i + 1]}
                                        for i, s in enumerate(PAPER_BIN_SIZES)},
                     "regression": dict(zip(("mse_mean", "mae_mean", "mse_std", "mae_std"), regression[k]))}
            for k, v in classification.items()}


#: The paper's Tables 2-5 (in distribution = test split without Alpaca; alpaca = generalisation), verbatim.
PAPER_RESULTS = {
    "in_distribution": _paper_table({
        "llama-1B": (16.81, 0.164, 31.21, 0.305, 50.66, 0.499, 68.90, 0.679, 89.78, 0.8844),
        "llama-3B": (19.23, 0.187, 33.63, 0.335, 50.55, 0.505, 72.64, 0.720, 92.19, 0.9099),
        "llama-8B": (16.15, 0.151, 28.35, 0.280, 49.12, 0.484, 67.25, 0.667, 91.86, 0.9020)}, {
        "llama-1B": (75378.30, 121.02, 108624.30, 80.84), "llama-3B": (45735.30, 119.18, 28182.20, 54.68),
        "llama-8B": (82152.72, 128.28, 19193.33, 51.60)}),
    "alpaca": _paper_table({
        "llama-1B": (10.00, 0.094, 17.70, 0.164, 35.45, 0.361, 71.50, 0.714, 93.60, 0.927),
        "llama-3B": (13.35, 0.135, 24.35, 0.254, 41.65, 0.435, 74.50, 0.747, 96.55, 0.952),
        "llama-8B": (11.50, 0.105, 21.75, 0.215, 34.80, 0.354, 75.45, 0.756, 94.55, 0.943)}, {
        "llama-1B": (70542.27, 163.87, 48814.96, 70.78), "llama-3B": (73246.13, 164.94, 16033.02, 53.45),
        "llama-8B": (78596.34, 175.10, 21076.86, 52.87)}),
}
#: Table 4's prompt baseline (Llama-3.1-8B only; the paper reports no std for it).
PAPER_PROMPT_BASELINE = {"in_distribution": {PAPER_LLMS[2]: {"regression": {"mse_mean": 3210768.61,
                                                                          "mae_mean": 384.03}}}}


def true_p99(sizes) -> np.ndarray:
    """p99 of each row's sampled sizes (numpy's linear percentile, as CASTILLO's `output_percentiles`)."""
    return np.array([np.percentile(s, 99) if s is not None and len(s) else np.nan for s in sizes], dtype=float)


def _finite(x) -> np.ndarray:
    return np.isfinite(np.asarray(x, dtype=float))


def score_method(rows: pd.DataFrame, method: str, head_bin_size: int | None = None, max_tokens: int = 4000,
                 bin_sizes=PAPER_BIN_SIZES) -> dict | None:
    """Every metric of one method on `rows` (one LLM or all, one subset); None if it predicted for no row.

    Labels are bins of the sanitised `output_mean`; F1 is weighted. At `head_bin_size` a `{method}_bin` column
    (the bin head's argmax) is scored, at every other size the bin of the predicted mean.
    """
    col = f"{method}_mean"
    if col not in rows or not _finite(rows[col]).any():
        return None
    rows = rows[_finite(rows[col])]
    true, pred = rows["output_mean"].to_numpy(float), rows[col].to_numpy(float)
    std = rows[f"{method}_std"].to_numpy(float) if f"{method}_std" in rows else None
    bound = rows[f"{method}_bound"].to_numpy(float) if f"{method}_bound" in rows else None
    sizes = rows["output_sizes"].tolist()
    core = length_prediction_scores(  # the `evaluate` module's scores, by the same function
        true, pred, samples=sizes, true_std=rows["output_std"].to_numpy(float),
        predicted_std=std if std is not None and _finite(std).any() else None, predicted_bound=bound,
        groups=list(zip(rows["llm"], rows["prompt_set"])), bin_size=bin_sizes[0] if bin_sizes else 500,
        max_tokens=max_tokens)
    out: dict = {"n": int(len(rows)), "classification": {}}
    for size in bin_sizes:
        use_head = size == head_bin_size and f"{method}_bin" in rows
        of_mean = {k: core[k] for k in ("accuracy", "f1")} if size == bin_sizes[0] else classification_scores(
            true, bin_index(np.clip(pred, 0, None), make_bin_edges(size, max_tokens)), size, max_tokens)
        scores = classification_scores(true, rows[f"{method}_bin"].to_numpy(int), size, max_tokens) if use_head \
            else of_mean
        out["classification"][str(size)] = {  # the quality targets define acc@500 by the bin of the predicted mean
            **scores, "source": "bin head" if use_head else "predicted mean", "accuracy_mean_bin": of_mean["accuracy"]}
    out["regression"] = {k: core[k] for k in ("mse_mean", "mae_mean", "mse_std", "mae_std")}
    out.update(ranking_scores(rows, pred, overall=core["kendall_tau_b"]))
    out["mae_by_prompt_set"] = per_group_mae(true, pred, rows["prompt_set"].tolist())
    out.update({k: core[k] for k in ("coverage_1sigma", "coverage_2sigma", "bound_coverage")})
    out["p99_bin_accuracy"] = None
    if f"{method}_p99" in rows and head_bin_size:  # the paper's p99 class: the estimated p99 of the prompt's answers
        bound99, p99 = rows[f"{method}_p99"].to_numpy(float), true_p99(sizes)
        keep = _finite(p99) & _finite(bound99)
        edges = make_bin_edges(head_bin_size, max_tokens)
        if keep.any():
            out["p99_bin_accuracy"] = float(np.mean(bin_index(bound99[keep], edges) == bin_index(p99[keep], edges)))
    return out


def ranking_scores(rows: pd.DataFrame, pred, overall: float | None = None) -> dict:
    """Kendall τ-b of `pred` against `output_mean` within LLM × prompt set: overall (unless given) and per prompt
    set."""
    true, pred = rows["output_mean"].to_numpy(float), np.asarray(pred, dtype=float)
    llm, sets = rows["llm"].to_numpy(), rows["prompt_set"].to_numpy()
    by_set = {s: kendall_within_sets(true[sets == s], pred[sets == s], llm[sets == s]) for s in dict.fromkeys(sets)}
    if overall is None:
        overall = kendall_within_sets(true, pred, list(zip(llm, sets)))
    return {"kendall_tau_b": overall, "tau_by_prompt_set": by_set}


def order_llms(llms) -> list[str]:
    """The paper's three Llamas first, then the others in the given order."""
    llms = list(dict.fromkeys(llms))
    return [m for m in PAPER_LLMS if m in llms] + [m for m in llms if m not in PAPER_LLMS]


def build_results(subsets: dict[str, pd.DataFrame], methods, llms, head_bin_size: int, max_tokens: int = 4000,
                  bin_sizes=PAPER_BIN_SIZES) -> dict:
    """{subset: {llm or ALL: {"n_rows", "n_prompts", "noise_floor", method: scores, "paper": …}}}."""
    results = {}
    for name, rows in subsets.items():
        per = {}
        for llm in [*order_llms(llms), ALL_LLMS]:
            part = rows if llm == ALL_LLMS else rows[rows["llm"] == llm]
            if part.empty:
                continue
            entry = {"n_rows": int(len(part)), "n_prompts": int(part["prompt_id"].nunique()),
                     "noise_floor": noise_floor(part)}
            for m in methods:
                scores = score_method(part, m, head_bin_size, max_tokens, bin_sizes)
                if scores is not None:
                    entry[m] = scores
            if "input_size" in part:  # what ordering by prompt length (a scheduling baseline) gets right
                entry["prompt_length"] = ranking_scores(part, part["input_size"])
            for key, table in (("paper", PAPER_RESULTS), ("paper_prompt", PAPER_PROMPT_BASELINE)):
                if llm in table.get(name, {}):
                    entry[key] = {**table[name][llm], "source": PAPER_CITATION}
            per[llm] = entry
        results[name] = per
    return results


def calibration_curve(rows: pd.DataFrame, method: str, ks=tuple(np.round(np.linspace(0.25, 3.0, 12), 2))) -> dict:
    """Share of sampled sizes inside mean ± kσ for a grid of k, next to the normal's nominal share."""
    std = rows.get(f"{method}_std")
    if std is None or not _finite(std).any():
        return {}
    sizes = rows["output_sizes"].tolist()
    mean = rows[f"{method}_mean"].to_numpy(float)
    return {"k": list(ks), "nominal": [nominal_coverage(k) for k in ks],
            "empirical": [interval_coverage(sizes, mean, std.to_numpy(float), k) for k in ks]}


def to_jsonable(obj):
    """NaN/inf → None and numpy scalars → Python, so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ Markdown
_FORMATS = {"pct": lambda v: f"{100 * v:.2f}", "f1": lambda v: f"{v:.3f}", "mse": lambda v: f"{v:.1f}",
            "mae": lambda v: f"{v:.2f}", "tau": lambda v: f"{v:.3f}", "int": lambda v: f"{int(v)}"}


def fmt(value, kind: str) -> str:
    """One cell: `—` for a missing value; the formats the test of JSON/Markdown agreement relies on."""
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else _FORMATS[kind](value)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def short_llm_name(llm: str) -> str:
    return "all LLMs (pooled)" if llm == ALL_LLMS else llm.split("/")[-1]


def _method_rows(per: dict, methods) -> list[tuple[str, str, dict]]:
    return [(llm, m, entry[m]) for llm, entry in per.items() for m in methods if m in entry]


def _classification_md(per, methods, head_bin_size, bin_sizes) -> str:
    header = ["LLM", "Method", "n"]
    for s in bin_sizes:
        mark = "†" if s == head_bin_size else ""
        header += [f"Acc@{s}{mark} (%)", f"F1@{s}{mark}"]
    header += [f"p99-bin acc@{head_bin_size} (%)"] + ([f"Acc@{head_bin_size}, bin of the mean (%)"] if head_bin_size
                                                       else [])
    rows = []
    for llm, m, sc in _method_rows(per, methods):
        cells = [short_llm_name(llm), METHODS[m], fmt(sc.get("n"), "int")]
        for s in bin_sizes:
            c = sc["classification"].get(str(s), {})
            cells += [fmt(c.get("accuracy"), "pct"), fmt(c.get("f1"), "f1")]
        of_mean = sc["classification"].get(str(head_bin_size), {}).get("accuracy_mean_bin")
        rows.append(cells + [fmt(sc.get("p99_bin_accuracy"), "pct")] + ([fmt(of_mean, "pct")] if head_bin_size else []))
    return md_table(header, rows)


def _regression_md(per, methods) -> str:
    header = ["LLM", "Method", "n", "MSE(mean)", "MAE(mean)", "MSE(std)", "MAE(std)"]
    rows = [[short_llm_name(llm), METHODS[m], fmt(sc.get("n"), "int")] +
            [fmt(sc["regression"].get(k), "mse" if k.startswith("mse") else "mae")
             for k in ("mse_mean", "mae_mean", "mse_std", "mae_std")] for llm, m, sc in _method_rows(per, methods)]
    return md_table(header, rows)


def _noise_md(per) -> str:
    header = ["LLM", "rows", "one sample vs 10-sample mean: MAE", "MSE", "sampling error of the mean: MAE"]
    rows = [[short_llm_name(llm), fmt(e["noise_floor"]["n_rows"], "int"),
             fmt(e["noise_floor"]["single_sample_mae"], "mae"), fmt(e["noise_floor"]["single_sample_mse"], "mse"),
             fmt(e["noise_floor"]["mean_sampling_mae"], "mae")] for llm, e in per.items()]
    return md_table(header, rows)


def _beyond_md(per, methods, meta) -> str:
    header = ["LLM", "Method", "Kendall τ-b (within prompt set)",
              f"inside ±1σ (%) [nominal {100 * meta['nominal_1sigma']:.2f}]",
              f"inside ±2σ (%) [nominal {100 * meta['nominal_2sigma']:.2f}]",
              f"≤ bound (%) [nominal {100 * meta['reservation_quantile']:.2f}]"]
    rows = [[short_llm_name(llm), METHODS[m], fmt(sc["kendall_tau_b"], "tau"), fmt(sc["coverage_1sigma"], "pct"),
             fmt(sc["coverage_2sigma"], "pct"), fmt(sc["bound_coverage"], "pct")]
            for llm, m, sc in _method_rows(per, methods)]
    return md_table(header, rows)


def _per_set_md(per, methods, key: str = "mae_by_prompt_set", kind: str = "mae", label: str = "MAE(mean)") -> str:
    sets = sorted({s for _, _, sc in _method_rows(per, methods) for s in sc[key]})
    rows = [[short_llm_name(llm), METHODS[m]] + [fmt(sc[key].get(s), kind) for s in sets]
            for llm, m, sc in _method_rows(per, methods)]
    return md_table(["LLM", "Method"] + [f"{label} {s}" for s in sets], rows)


def measured_methods(meta: dict) -> list[str]:
    return [m for m in ("lenpred", "median", "knn", "prompt") if m in meta["methods"]]


def render_subset(report: dict, name: str, level: int = 2, extra: bool = True) -> str:
    """One subset's tables (classification, regression; with `extra`, noise floor, ranking/calibration, per set)."""
    meta, per, h = report["meta"], report["results"][name], "#" * level
    measured = measured_methods(meta)
    out = [f"{h} {SUBSETS[name]}\n", f"{h}# Classification (paper Table {2 if name == 'in_distribution' else 3})\n",
           _classification_md(per, [*measured, "paper"], meta["head_bin_size"], meta["bin_sizes"]), "",
           f"{h}# Regression (paper Table {4 if name == 'in_distribution' else 5})\n",
           _regression_md(per, [*measured, "paper", "paper_prompt"]), ""]
    if extra:
        out += [f"{h}# Noise floor (from the 10 samples per row)\n", _noise_md(per), "",
                f"{h}# Ranking, calibration and reservation bound (beyond the paper)\n",
                _beyond_md(per, measured, meta), "", f"{h}# MAE of the mean per prompt set\n",
                _per_set_md(per, measured), "", f"{h}# Kendall τ-b per prompt set (within each LLM)\n",
                _per_set_md(per, [*measured, "prompt_length"], "tau_by_prompt_set", "tau", "τ"), ""]
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    """The whole report.md, from the report dict alone."""
    meta = report["meta"]
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in meta.get("timings_s", {}).items())
    out = ["# LenPred evaluation report\n",
           f"- Model: `{meta['model']}`\n- Data: `{meta['dataset']}` (test split, sanitised; "
           f"{meta['test_rows']} rows, {meta['test_prompts']} prompts)\n- Command: `{meta['command']}`\n"
           + (f"- Weights: sha256 `{meta['weights_sha256']}`\n" if meta.get("weights_sha256") else "")
           + f"- Date: {meta['date']}\n- Wall time: {meta['wall_time_s']:.1f} s ({timing})\n",
           "## How to read this\n", *[f"- {line}" for line in meta["notes"]], ""]
    out += [render_subset(report, name) for name, per in report["results"].items() if per]
    if "prompt_baseline" in meta:
        pb = meta["prompt_baseline"]
        out += ["## Prompt baseline replies\n", md_table(["endpoint model", "scored against", "ok", "malformed",
                                                          "failed"],
                [[f"`{pb['model']}`", short_llm_name(pb["llm"]), *(fmt(pb["counts"][k], "int")
                                                            for k in ("ok", "malformed", "failed"))]]), ""]
    if report.get("scheduling"):
        out += [render_scheduling(report["scheduling"]), ""]
    out += ["## Figures\n"] + [f"![{k}]({v})\n" for k, v in report.get("figures", {}).items()]
    return "\n".join(out).rstrip() + "\n"


def render_scheduling(sched: dict) -> str:
    """The simulator's summary: one table per load, policies as rows (means over seeds; ± their std)."""
    cols = [("mean_completion_s_mean", "mean JCT (s)", "f2"), ("p99_completion_s_mean", "p99 JCT (s)", "f2"),
            ("mean_ttft_s_mean", "mean TTFT (s)", "f2"), ("throughput_rps_mean", "req/s", "f2"),
            ("mean_running_mean", "mean running", "f1"), ("preempted_share_mean", "preempted %", "pct"),
            ("max_wait_s_mean", "longest wait (s)", "f1"), ("gain_pct_mean", "gain vs FCFS %", "f1"),
            ("share_of_oracle_gain", "share of oracle gain", "f2")]
    spread = {"mean_completion_s_mean", "gain_pct_mean"}  # the goal's figures: shown with their spread over seeds
    show = {"f2": lambda v: f"{v:.2f}", "f1": lambda v: f"{v:.1f}", "pct": lambda v: f"{100 * v:.2f}"}
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731

    def cell(row, key, kind):
        value = row.get(key)
        sd = row.get(key.removesuffix("_mean") + "_std") if key in spread else None
        if missing(value):
            return "—"
        return show[kind](value) + ("" if missing(sd) else f" ± {show[kind](sd)}")

    seeds = sorted({r.get("n_seeds") for r in sched["summary"]} - {None})
    out = ["## Proactive scheduling (trace-driven simulator)\n", *[f"- {line}" for line in sched["notes"]],
           *([f"- ± is the standard deviation over the {'/'.join(map(str, seeds))} seeds of each load "
              "(gains paired with FCFS by seed)."] if seeds else []), ""]
    backlog = lambda load: load is None or math.isinf(load)  # noqa: E731  (inf is None once in report.json)
    for load in sorted({r["load"] for r in sched["summary"]}, key=lambda v: math.inf if backlog(v) else v):
        rows = [r for r in sched["summary"] if r["load"] == load]
        title = "Backlog (every request queued at t = 0)" if backlog(load) else f"Load {load:g}"
        out += [f"### {title}\n", md_table(["policy"] + [c[1] for c in cols],
                [[r["policy"]] + [cell(r, k, kind) for k, _, kind in cols] for r in rows]), ""]
    return "\n".join(out)
