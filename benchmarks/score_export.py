"""Score an export quickly on the dev split, the test split (six training prompt sets) and Alpaca: MAE, acc@500 by
the bin of the predicted mean and Kendall τ-b within prompt set, over all LLMs and per Llama (the report's own
`score_method`, through `probe_recipe.dev_scores`). With `--ensemble-with EXPORT ...` it also scores the ensemble
of the export with those exports (mean, std and bound averaged in log1p space): what training more models would
buy, at that many times the cost.

    python benchmarks/score_export.py --model outputs/lenpred-minilm --json scores.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe_recipe import dev_scores  # noqa: E402

from lenpred.data import HELD_OUT_PROMPT_SET, load_castillo, make_splits  # noqa: E402
from lenpred.hub import load_export  # noqa: E402
from lenpred.inference import predict_rows  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a LenPred export folder")
    ap.add_argument("--dataset", default=None, help="CASTILLO folder or Hub id (default: the shipped copy)")
    ap.add_argument("--split-seed", type=int, default=42, help="seed train.py carved the dev split with")
    ap.add_argument("--ensemble-with", nargs="+", default=[], metavar="EXPORT",
                    help="also score the ensemble of --model with these exports (same LLMs)")
    ap.add_argument("--json", help="write the scores here")
    args = ap.parse_args(argv)
    model, tokenizer = load_export(args.model)
    others = [load_export(path) for path in args.ensemble_with]  # before any scoring, so a wrong path fails at once
    for path, (other, _) in zip(args.ensemble_with, others):
        if list(other.config.llm_names) != list(model.config.llm_names):
            raise SystemExit(f"{path} predicts other LLMs than {args.model}: cannot ensemble them")
    rows = load_castillo(args.dataset)
    splits = make_splits(rows, seed=args.split_seed, llms=[n for n in model.config.llm_names
                                                           if n in set(rows["llm"])])
    held = splits.test["prompt_set"] == HELD_OUT_PROMPT_SET
    parts = {"dev": splits.dev, "test": splits.test[~held], HELD_OUT_PROMPT_SET: splits.test[held]}
    parts = {part: frame for part, frame in parts.items() if len(frame)}
    def predict(m, t):
        return {part: predict_rows(m, t, frame, progress=False) for part, frame in parts.items()}

    started = time.time()
    preds = [predict(model, tokenizer)]  # the export, then the ensemble's other members
    results = {"export": {part: dev_scores(pred) for part, pred in preds[0].items()}}
    print_scores("export", results["export"], started)
    if others:
        started = time.time()
        preds += [predict(m, t) for m, t in others]
        results["ensemble"] = {part: dev_scores(average_predictions([p[part] for p in preds])) for part in parts}
        print_scores("ensemble", results["ensemble"], started)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def average_predictions(preds: list[pd.DataFrame]) -> pd.DataFrame:
    """One frame of predictions for the same rows from several models: mean, std and bound averaged in log1p space."""
    columns = ("pred_mean", "pred_std", "pred_bound")
    return preds[0].assign(**{c: np.expm1(np.mean([np.log1p(p[c].to_numpy(float)) for p in preds], axis=0))
                              for c in columns})


def print_scores(name: str, scores_by_part: dict, started: float) -> None:
    for part, scores in scores_by_part.items():
        line = "  ".join(f"{llm.split('/')[-1]}: MAE {s['mae']:.1f} acc@500 {100 * s['acc500']:.1f} "
                         f"τ {s['tau']:.3f}" for llm, s in scores.items())
        print(f"{name:>10} {part:>7}  {line}")
    print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
