"""Score a training recipe quickly: train with `train.py`'s arguments (1 epoch by default, no checkpoints), then
score the dev split per Llama and over all LLMs: MAE of the mean, acc@500 (from the predicted mean) and Kendall
τ-b within prompt set (per LLM × prompt set over all LLMs). Use it to compare recipes before a full run.

    python benchmarks/probe_recipe.py --out runs/probe-base
    python benchmarks/probe_recipe.py --out runs/probe-ml128 -- --max_length 128

Everything after `--` goes to `train.py` (and overrides the probe's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from lenpred.data import load_castillo, make_splits  # noqa: E402
from lenpred.hub import load_export  # noqa: E402
from lenpred.inference import predict_rows  # noqa: E402
from lenpred.report import score_method  # noqa: E402


def dev_scores(pred) -> dict:
    """The report's own scores (`score_method`, bins of the predicted mean) for all LLMs, and per Llama; `bias` is the
    mean signed error of the predicted mean (tokens)."""
    out = {}
    for llm in ["all"] + sorted(name for name in pred["llm"].unique() if "Llama" in name):
        part = pred if llm == "all" else pred[pred["llm"] == llm]
        scores = score_method(part, "pred", bin_sizes=(500,))
        error = (part["pred_mean"] - part["output_mean"]).to_numpy(float)  # on the rows score_method scores
        out[llm] = {"rows": scores["n"], "mae": scores["regression"]["mae_mean"],
                    "bias": float(error[np.isfinite(error)].mean()),  # > 0: predicts too long
                    "acc500": scores["classification"]["500"]["accuracy"], "tau": scores["kendall_tau_b"],
                    "tau_by_prompt_set": scores["tau_by_prompt_set"]}
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder: the export and probe.json go here")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rescore", action="store_true", help="score OUT/export again without training")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    started = time.time()
    base = ["--output_dir", f"{args.out}/run", "--export_dir", f"{args.out}/export", "--num_train_epochs",
            str(args.epochs), "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"]
    train_metrics = {} if args.rescore else train.main(base + train_args)["train"]
    model, tokenizer = load_export(f"{args.out}/export", device="cuda" if torch.cuda.is_available() else None)
    _, dargs, targs = train.parse_args(base + train_args)  # the dev split exactly as train.py carved it
    rows = load_castillo(dargs.dataset)
    dev = make_splits(rows, dev_fraction=dargs.dev_fraction, seed=train.split_seed(dargs, targs),
                      llms=train.resolve_llms(dargs.llms, rows)).dev
    result = {"train_args": train_args, "epochs": args.epochs, "train_runtime": train_metrics.get("train_runtime"),
              "dev": dev_scores(predict_rows(model, tokenizer, dev, progress=False)),
              "seconds": round(time.time() - started, 1)}
    Path(args.out, "probe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
