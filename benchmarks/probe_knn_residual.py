"""Probe: does a kNN correction of the row-only fit, in the model's own prompt-vector space, re-rank a new LLM?

For each held-out LLM, N and log seed (as `adapt_new_llm.py` draws them): `--adapt llm` (row only) on the log, then
every prediction's log1p mean is moved by w × the mean log1p residual of its k nearest logged prompts (cosine over
the held-out model's prompt vectors); k and w are chosen by leave-one-out L1 on the log. Scored on the held-out
LLM's dev (or test) prompts beside the row alone and sibling transfer. The decision rule is in docs/adaptation.md.

    python benchmarks/probe_knn_residual.py --split dev --n 200,1000
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adapt_new_llm import HELD_OUT, CachedVectors, make_log, predict, scores  # noqa: E402
from lenpred.adaptation import adapt  # noqa: E402
from lenpred.data import HELD_OUT_PROMPT_SET, load_castillo, make_splits  # noqa: E402
from lenpred.hub import load_export  # noqa: E402

KS, WS = (5, 10, 20, 50, 100, 200), (0.0, 0.25, 0.5, 0.75, 1.0)


def unit(v: torch.Tensor) -> np.ndarray:
    v = v.double().numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def neighbour_means(sim: np.ndarray, residuals: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-sim, kth=min(k, sim.shape[1] - 1) - 1, axis=1)[:, :k]
    return residuals[idx].mean(axis=1)


def choose(log_vecs: np.ndarray, residuals: np.ndarray, log_pred: np.ndarray, by: str = "l1"):
    """(k, w, leave-one-out loss), each logged prompt left out of its own neighbours: by the L1 of the corrected
    log residuals, or ("tau") by minus Kendall τ-b between the answers and the corrected predictions; ties go to
    the smaller w (w = 0: the row alone)."""
    sim = log_vecs @ log_vecs.T
    np.fill_diagonal(sim, -np.inf)
    answers = residuals + log_pred
    best = None
    for k in KS:
        if k >= len(residuals):
            continue
        c = neighbour_means(sim, residuals, k)
        for w in WS:
            loss = (float(np.abs(residuals - w * c).mean()) if by == "l1"
                    else -float(kendalltau(answers, log_pred + w * c).statistic))
            if best is None or loss < best[2] - 1e-12:
                best = (k, w, loss)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-out-model", default=str(ROOT / "outputs" / "loo-llama-3.2-3b-gemma-3-4b"))
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--n", default="200,1000")
    ap.add_argument("--log-seeds", default="0,1,2")
    ap.add_argument("--choose", choices=("l1", "tau"), default="l1",
                    help="leave-one-out criterion on the log choosing k and w")
    ap.add_argument("--out", help="default: reports/adaptation/dev-knn-residual[-tau]")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "reports" / "adaptation" / ("dev-knn-residual" + ("-tau" if args.choose == "tau"
                                                                                          else "")))
    rows = load_castillo(None)
    base, tokenizer = load_export(args.held_out_model)
    known = list(base.config.llm_names)
    dev_ids = set(make_splits(rows, seed=42, llms=known).dev["prompt_id"])
    splits = make_splits(rows, seed=42)
    pool_rows = pd.concat([splits.train, splits.dev], ignore_index=True)
    train_rows = pool_rows[~pool_rows["prompt_id"].isin(dev_ids)]
    evaluated = splits.test if args.split == "test" else pool_rows[pool_rows["prompt_id"].isin(dev_ids)]
    evaluated = evaluated[evaluated["prompt_set"] != HELD_OUT_PROMPT_SET]
    cache = CachedVectors(base, tokenizer, [*train_rows.loc[train_rows["llm"].isin(HELD_OUT), "prompt_text"],
                                            *evaluated["prompt_text"]])
    runs = []
    for llm, n, seed in itertools.product(HELD_OUT, [int(x) for x in args.n.split(",")],
                                          [int(s) for s in args.log_seeds.split(",")]):
        pool, target = train_rows[train_rows["llm"] == llm], evaluated[evaluated["llm"] == llm]
        log = make_log(pool, n, seed)
        sibling, _ = adapt(base, tokenizer, log, mode="sibling", vectors_of=cache)
        adapted, _ = adapt(base, tokenizer, log, vectors_of=cache)
        on_log = predict(cache.predictor(adapted), tokenizer, log)
        residuals = np.log1p(log["output_mean"].to_numpy()) - np.log1p(on_log["pred_mean"].to_numpy())
        log_vecs, target_vecs = unit(cache(list(log["prompt_text"]))), unit(cache(list(target["prompt_text"])))
        k, w, loo = choose(log_vecs, residuals, np.log1p(on_log["pred_mean"].to_numpy()), args.choose)
        row_only = predict(cache.predictor(adapted), tokenizer, target)
        shift = w * neighbour_means(target_vecs @ log_vecs.T, residuals, k)
        corrected = row_only.assign(pred_mean=np.expm1(np.log1p(row_only["pred_mean"]) + shift),
                                    pred_bound=np.expm1(np.log1p(row_only["pred_bound"]) + shift))
        run = {"llm": llm, "n": n, "seed": seed, "k": k, "w": w, "loo_l1": loo,
               "sibling": scores(predict(cache.predictor(sibling), tokenizer, target)),
               "row_only": scores(row_only), "knn_residual": scores(corrected)}
        runs.append(run)
        print(f"{llm} N={n} seed={seed}: k={k} w={w} | sibling tau {run['sibling']['tau']:.3f} MAE "
              f"{run['sibling']['mae']:.1f} | row tau {run['row_only']['tau']:.3f} MAE {run['row_only']['mae']:.1f} | "
              f"knn-residual tau {run['knn_residual']['tau']:.3f} MAE {run['knn_residual']['mae']:.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-{args.split}.json").write_text(json.dumps(runs, indent=2))
    lines = [f"# kNN-residual probe ({args.split})", "",
             f"`python benchmarks/probe_knn_residual.py --split {args.split} --n {args.n} --choose {args.choose}`; mean over log seeds "
             f"{args.log_seeds}.", "",
             "| LLM | N | sibling MAE / τ | row only MAE / τ | knn-residual MAE / τ | τ gain | k, w chosen |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (llm, n), group in itertools.groupby(runs, key=lambda r: (r["llm"], r["n"])):
        group = list(group)
        m = {key: {s: float(np.mean([g[key][s] for g in group])) for s in ("mae", "tau")}
             for key in ("sibling", "row_only", "knn_residual")}
        lines.append(f"| {llm} | {n} | {m['sibling']['mae']:.1f} / {m['sibling']['tau']:.3f} | "
                     f"{m['row_only']['mae']:.1f} / {m['row_only']['tau']:.3f} | {m['knn_residual']['mae']:.1f} / "
                     f"{m['knn_residual']['tau']:.3f} | {m['knn_residual']['tau'] - m['row_only']['tau']:+.3f} | "
                     + ", ".join(f"{g['k']}, {g['w']}" for g in group) + " |")
    (out / f"results-{args.split}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
