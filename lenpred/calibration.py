"""Split-conformal calibration of the reservation bound.

The bound is a quantile of the log-normal fitted to the predicted mean and std — the spread of the answers
alone. The predictor's own error comes on top, so that "p99" covered about 83 % of held-out answers. Here each
LLM's bound gets one offset in `log1p` space: the conformal quantile, over the dev split's sampled answer
lengths, of `log1p(length) − log1p(bound)`. On exchangeable prompts the shifted bound covers at least `q` of
answers (split conformal prediction: Vovk et al. 2005; Angelopoulos & Bates 2021). The offsets live in
`config.bound_offsets`, which the model's one prediction path applies.

    lenpred calibrate outputs/lenpred-minilm            # refit on the dev split train.py used (split seed 42)
    lenpred calibrate outputs/lenpred-minilm --reservation-quantile 0.9   # and reserve that quantile from now on
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from configuration_lenpred import LenPredConfig
from prediction_lenpred import lognormal_quantile

__all__ = ["QUANTILES", "MIN_ANSWERS", "conformal_offset", "answer_scores", "fit_bound_offsets", "calibrate_export",
           "main"]

logger = logging.getLogger(__name__)
#: Quantiles calibrated by default (besides the model's own `reservation_quantile`): the paper's p99 among them.
QUANTILES = (0.5, 0.9, 0.95, 0.99)
#: An LLM with fewer held-out answers than this takes the offset pooled over all LLMs.
MIN_ANSWERS = 100


def conformal_offset(scores: np.ndarray, q: float) -> float:
    """The ⌈(n + 1) q⌉-th smallest score: adding it to every bound makes a new answer's coverage ≥ q."""
    scores = np.sort(np.asarray(scores, float))
    if not len(scores):
        raise ValueError("no held-out answers to calibrate on")
    k = min(math.ceil((len(scores) + 1) * q), len(scores)) - 1
    return float(scores[k])


def answer_scores(sizes, capped, mean, std, q: float) -> np.ndarray:
    """Conformity scores `log1p(length) − log1p(bound)` of every sampled answer, row by row (`sizes`: a list per
    row; `capped`: per row None or a flag per answer). The log-normal `q`-quantile of the row's predicted `mean`
    and `std` is the bound. An answer cut short by its `max_tokens` scores +inf: its length is unknown beyond the
    cap, so it counts as not covered, whatever the bound (conservative)."""
    counts = [len(s) for s in sizes]
    bound = np.log1p(lognormal_quantile(torch.tensor(np.asarray(mean, float)), torch.tensor(np.asarray(std, float)),
                                        q).numpy())
    scores = np.log1p(np.concatenate([np.asarray(s, float) for s in sizes])) - np.repeat(bound, counts)
    cut = np.concatenate([np.asarray(c, bool) if isinstance(c, list) else np.zeros(n, bool)
                          for c, n in zip(capped, counts)])
    return np.where(cut, np.inf, scores)


def _answer_sizes(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rows that hold sampled lengths (a log with only a mean per prompt tells no single answer's length)."""
    if "output_sizes" not in rows:
        return rows.iloc[:0], len(rows)
    has = rows["output_sizes"].map(lambda s: isinstance(s, (list, tuple, np.ndarray)) and len(s) > 0)
    return rows[has], int((~has).sum())


def fit_bound_offsets(model, tokenizer, rows: pd.DataFrame, quantiles=QUANTILES,
                      progress: bool = False) -> dict[str, list[float]]:
    """Per quantile, one `log1p` offset per LLM of `model.config.llm_names`, fitted on `rows` (held-out
    ⟨prompt, LLM⟩ rows with `output_sizes`). LLMs with fewer than `MIN_ANSWERS` answers there share the pooled
    offset (logged), so a model trained on few examples of an LLM still gets a calibrated bound."""
    from lenpred.inference import predict_rows

    if rows.empty:
        raise ValueError("no held-out rows to calibrate the reservation bound on")
    rows, skipped = _answer_sizes(rows)
    if skipped:
        logger.info("calibration: %d rows without sampled lengths skipped", skipped)
    if rows.empty:
        raise ValueError("calibration needs held-out rows with output_sizes (sampled answer lengths)")
    pred = predict_rows(model, tokenizer, rows, progress=progress)
    capped = pred["output_capped"] if "output_capped" in pred.columns else [None] * len(pred)
    llm_of_answer = np.repeat(pred["llm"].to_numpy(), pred["output_sizes"].map(len).to_numpy())
    names = model.config.llm_names
    offsets = {}
    for q in sorted({float(q) for q in quantiles}):
        scores = answer_scores(pred["output_sizes"], capped, pred["pred_mean"].to_numpy(float),
                               pred["pred_std"].to_numpy(float), q)
        pooled = conformal_offset(scores, q)
        if not math.isfinite(pooled):
            raise ValueError(f"more than {1 - q:.0%} of the held-out answers were cut short by max_tokens: their "
                             f"{q:g} quantile lies beyond the caps and cannot be calibrated")
        per_llm = []
        for name in names:
            own = scores[llm_of_answer == name]
            offset = conformal_offset(own, q) if len(own) >= MIN_ANSWERS else pooled
            if len(own) < MIN_ANSWERS or not math.isfinite(offset):
                logger.info("calibration q=%g: %s has %d held-out answers (%d cut short), takes the pooled offset "
                            "%.3f", q, name, len(own), int(np.isinf(own).sum()), pooled)
                offset = pooled
            per_llm.append(offset)
        offsets[f"{q:g}"] = [round(o, 5) for o in per_llm]
    return offsets


def calibrate_export(path: str, dataset: str | None = None, split_seed: int = 42, quantiles=QUANTILES,
                     reservation_quantile: float | None = None) -> dict:
    """Refit an export's `bound_offsets` on the dev split (train.py's `make_splits` with `split_seed`) and save
    its config in place (with `reservation_quantile`, when given, as the bound it reserves). Returns the offsets."""
    from lenpred.data import load_castillo, make_splits
    from lenpred.hub import REMOTE_CODE_FILES, REPO_ROOT, load_export

    if not Path(path).is_dir():
        raise ValueError(f"{path} is not an export folder here: calibration rewrites a folder's config.json in place "
                         "(for a Hub model, download it first, e.g. `hf download REPO_ID --local-dir DIR`)")
    LenPredConfig.from_pretrained(path)  # an export this code cannot run fails before its remote code is replaced
    # the offsets take effect through the folder's own remote code: an older export gets this repository's
    stale = [n for n in REMOTE_CODE_FILES if (REPO_ROOT / n).exists()
             and not ((Path(path) / n).exists() and filecmp.cmp(REPO_ROOT / n, Path(path) / n, shallow=False))]
    for name in stale:
        shutil.copy2(REPO_ROOT / name, Path(path) / name)
    if stale:
        logger.info("updated the remote code in %s: %s", path, ", ".join(stale))
    model, tokenizer = load_export(path)
    rows = load_castillo(dataset)
    llms = [n for n in model.config.llm_names if n in set(rows["llm"])]
    dev = make_splits(rows, seed=split_seed, llms=llms).dev
    if dev.empty:
        raise ValueError(f"the dev split of {dataset or 'the default dataset'} is empty: nothing to calibrate on")
    if reservation_quantile is not None:
        model.config.reservation_quantile = reservation_quantile
    q_all = {*quantiles, model.config.reservation_quantile}
    model.config.bound_offsets = fit_bound_offsets(model, tokenizer, dev, q_all, progress=True)
    model.config.save_pretrained(path)
    return model.config.bound_offsets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a LenPred export folder (its config.json is rewritten)")
    ap.add_argument("--dataset", help="CASTILLO folder, Hub id or log files (default: the shipped copy)")
    ap.add_argument("--split-seed", type=int, default=42, help="the seed train.py carved the dev split with")
    ap.add_argument("--quantiles", default=",".join(f"{q:g}" for q in QUANTILES),
                    help="comma-separated quantiles to calibrate (the model's reservation_quantile is added)")
    ap.add_argument("--reservation-quantile", type=float,
                    help="also make this the quantile the model's bound reserves (config.reservation_quantile)")
    args = ap.parse_args(argv)
    if args.reservation_quantile is not None and not 0.5 <= args.reservation_quantile < 1.0:
        ap.error(f"--reservation-quantile must be in [0.5, 1), got {args.reservation_quantile}")
    try:
        quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    except ValueError:
        ap.error(f"--quantiles must be comma-separated numbers, got {args.quantiles!r}")
    if not quantiles or not all(0.0 < q < 1.0 for q in quantiles):
        ap.error(f"--quantiles must lie in (0, 1), got {args.quantiles!r}")
    if not Path(args.model).is_dir():
        ap.error(f"{args.model} is not an export folder here (calibration rewrites its config.json in place)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    offsets = calibrate_export(args.model, args.dataset, args.split_seed, quantiles, args.reservation_quantile)
    for q, values in offsets.items():
        print(f"q={q}: log1p offsets {min(values):+.3f} … {max(values):+.3f} over {len(values)} LLMs")
    return 0
