"""Every score LenPred reports, in one place.

The evaluation report, the Trainer's `compute_metrics`, the `evaluate` module (`metrics/length_prediction`) and the
tests all call `length_prediction_scores` or the functions under it, so a number means the same thing everywhere.
The arithmetic is scikit-learn's and SciPy's, not hand-rolled.

Conventions: lengths are tokens; a row's "true" length is the mean of its sampled answer lengths
(`output_mean`), its spread their standard deviation (`output_std`); `output_sizes` holds the samples themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

from configuration_lenpred import make_bin_edges

__all__ = [
    "length_prediction_scores",
    "sanitise_lengths",
    "bin_index",
    "classification_scores",
    "regression_scores",
    "kendall_within_sets",
    "interval_coverage",
    "nominal_coverage",
    "bound_coverage",
    "noise_floor",
    "per_group_mae",
]


def sanitise_lengths(lengths) -> np.ndarray:
    """Lengths as a float array, negatives clipped to 0 (a length cannot be negative; a regression head can).

    Non-finite values raise: a NaN target would silently fall into bin -1 or poison a mean.
    """
    arr = np.asarray(lengths, dtype=float).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"lengths contain {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return np.clip(arr, 0.0, None)


def bin_index(lengths, edges: Sequence[int]) -> np.ndarray:
    """Bin of each length given lower bin `edges` (`make_bin_edges`); the last bin is open-ended.

    `searchsorted(side="right") - 1` puts a length equal to an edge into the bin that starts there.
    """
    arr = np.asarray(lengths, dtype=float).reshape(-1)
    return np.searchsorted(np.asarray(edges, dtype=float), arr, side="right").astype(int) - 1


def classification_scores(true_lengths, pred_bins, bin_size: int, max_tokens: int = 4000) -> dict[str, float]:
    """Accuracy (fraction 0–1) and weighted F1 of predicted bins against the bins of the true mean lengths.

    Weighted F1 (`zero_division=0`) as in the paper's Tables 2–3: the bins are very unbalanced (most answers are
    short), so a plain macro F1 would be dominated by nearly empty long-answer bins.
    """
    edges = make_bin_edges(bin_size, max_tokens)
    true_bins = bin_index(sanitise_lengths(true_lengths), edges)
    pred = np.asarray(pred_bins).reshape(-1).astype(int)
    if pred.shape != true_bins.shape:
        raise ValueError(f"{len(true_bins)} true lengths but {len(pred)} predicted bins")
    return {
        "accuracy": float(accuracy_score(true_bins, pred)),
        "f1": float(f1_score(true_bins, pred, average="weighted", zero_division=0)),
    }


def regression_scores(true, pred) -> dict[str, float]:
    """MSE and MAE (in tokens) — the paper's Table 4 reports both for the mean and for the std."""
    t = np.asarray(true, dtype=float).reshape(-1)
    p = np.asarray(pred, dtype=float).reshape(-1)
    return {"mse": float(mean_squared_error(t, p)), "mae": float(mean_absolute_error(t, p))}


def _group_indices(groups, n: int) -> dict:
    """Row indices of each group key, in first-seen order (tuples such as (llm, prompt_set) are single keys)."""
    index: dict = {}
    for i, key in enumerate(groups):
        index.setdefault(key, []).append(i)
    if sum(len(v) for v in index.values()) != n:
        raise ValueError(f"{sum(len(v) for v in index.values())} group keys for {n} values")
    return {key: np.asarray(v) for key, v in index.items()}


def kendall_within_sets(true, pred, groups) -> float:
    """Kendall's τ-b between true and predicted lengths inside each group, averaged weighted by group size.

    A scheduler only ever orders requests that are waiting together, so ranking quality is measured within a
    group (e.g. one LLM × prompt set), not across groups whose lengths differ wholesale. A group with fewer than
    2 items, or where the prediction (or truth) is constant, carries no ranking information and scores 0.
    """
    t = np.asarray(true, dtype=float).reshape(-1)
    p = np.asarray(pred, dtype=float).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true values but {len(p)} predictions")
    if len(t) == 0:
        return float("nan")
    total, weight = 0.0, 0
    for mask in _group_indices(groups, len(t)).values():
        n = len(mask)
        tau = 0.0
        if n >= 2 and np.ptp(t[mask]) > 0 and np.ptp(p[mask]) > 0:
            tau = float(kendalltau(t[mask], p[mask]).statistic)  # τ-b is SciPy's default variant
            if not math.isfinite(tau):
                tau = 0.0
        total += tau * n
        weight += n
    return total / weight


def _pooled(samples: Sequence) -> list[np.ndarray | None]:
    return [None if s is None else np.asarray(s, dtype=float).reshape(-1) for s in samples]


def _per_row(value, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.size == 1:
        return np.full(n, float(arr[0]))
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} values for {n} rows")
    return arr


def interval_coverage(samples: Sequence, mean, std, k: float) -> float:
    """Share of all sampled answer lengths inside `mean ± k·std`, pooled over rows.

    Checks whether the predicted std is calibrated: compare with `nominal_coverage(k)`. Rows whose samples are
    `None` or empty are skipped; a non-finite predicted interval covers nothing. NaN if no sample is left.
    """
    rows = _pooled(samples)
    m, s = _per_row(mean, len(rows), "mean"), _per_row(std, len(rows), "std")
    inside = total = 0
    for x, mu, sd in zip(rows, m, s):
        if x is None or x.size == 0:
            continue
        total += x.size
        if math.isfinite(mu) and math.isfinite(sd):
            inside += int(np.sum(np.abs(x - mu) <= k * sd))
    return inside / total if total else float("nan")


def nominal_coverage(k: float) -> float:
    """Share of a normal distribution within k standard deviations (k=1 → 0.683, k=2 → 0.954)."""
    return math.erf(k / math.sqrt(2.0))


def bound_coverage(samples: Sequence, bound) -> float:
    """Share of sampled answer lengths ≤ `bound` (a scalar or one per row), pooled over rows.

    How often a memory reservation of `bound` tokens would have sufficed. Rows without samples are skipped.
    """
    rows = _pooled(samples)
    b = _per_row(bound, len(rows), "bound")
    inside = total = 0
    for x, lim in zip(rows, b):
        if x is None or x.size == 0:
            continue
        total += x.size
        inside += int(np.sum(x <= lim))
    return inside / total if total else float("nan")


def _size_lists(rows) -> list[np.ndarray]:
    col = rows["output_sizes"] if hasattr(rows, "columns") or isinstance(rows, Mapping) else rows
    out = []
    for r in col:
        if isinstance(r, Mapping):
            r = r.get("output_sizes")
        if r is None or (isinstance(r, float) and math.isnan(r)):
            continue
        arr = np.asarray(r, dtype=float).reshape(-1)
        if arr.size:
            out.append(arr)
    return out


def noise_floor(rows) -> dict[str, float]:
    """How well anyone can do, given that one prompt's answers vary in length from sample to sample.

    `rows`: a DataFrame with an `output_sizes` column, or an iterable of size lists / row dicts. Per row, with
    the samples x_1..x_n and their mean x̄:

    - `single_sample_mae` = mean_i |x_i − x̄|, `single_sample_mse` = mean_i (x_i − x̄)²: the error of guessing
      the mean from one sampled answer — a predictor of a single answer's length cannot beat this spread.
    - `mean_sampling_mae` = std_ddof1 / √n · √(2/π): the expected absolute error of the n-sample mean itself
      (normal approximation), i.e. the noise already in the `output_mean` target (rows with n < 2 skipped).

    Each is averaged over rows; rows without sizes are skipped. `n_rows` counts the rows used.
    """
    arrays = _size_lists(rows)
    if not arrays:
        return {"single_sample_mae": float("nan"), "single_sample_mse": float("nan"),
                "mean_sampling_mae": float("nan"), "n_rows": 0}
    mae = [float(np.mean(np.abs(a - a.mean()))) for a in arrays]
    mse = [float(np.mean((a - a.mean()) ** 2)) for a in arrays]
    samp = [float(np.std(a, ddof=1) / math.sqrt(a.size) * math.sqrt(2 / math.pi)) for a in arrays if a.size >= 2]
    return {
        "single_sample_mae": float(np.mean(mae)),
        "single_sample_mse": float(np.mean(mse)),
        "mean_sampling_mae": float(np.mean(samp)) if samp else float("nan"),
        "n_rows": len(arrays),
    }


def per_group_mae(true, pred, groups: Iterable) -> dict:
    """MAE per group (e.g. per prompt set), keyed by group in first-seen order: where the errors come from."""
    t = np.asarray(true, dtype=float).reshape(-1)
    p = np.asarray(pred, dtype=float).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true values but {len(p)} predictions")
    return {key: float(mean_absolute_error(t[i], p[i])) for key, i in _group_indices(groups, len(t)).items()}


def _optional(values, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} values for {n} predictions")
    return arr


def length_prediction_scores(true_mean, predicted_mean, *, samples: Sequence | None = None, true_std=None,
                             predicted_std=None, predicted_bound=None, predicted_bins=None, groups=None,
                             bin_size: int = 500, max_tokens: int = 4000) -> dict:
    """Every score of one set of length predictions, as the report gives them.

    `true_mean`: each row's mean answer length (tokens); `samples`: the sampled answer lengths themselves (needed
    for the coverage scores); `true_std`: their spread (needed for the std scores; NaN rows are left out of them).
    `predicted_bins`: bin indices at `bin_size` (e.g. the bin head's argmax); without them the bin of the
    predicted mean is scored. `groups`: one key per row (e.g. (LLM, prompt set)); τ is Kendall's τ-b within each
    group, averaged by size (None: one group). A score whose inputs are not given is None.
    """
    true = np.asarray(true_mean, dtype=float).reshape(-1)
    pred = np.asarray(predicted_mean, dtype=float).reshape(-1)
    n = len(true)
    if len(pred) != n:
        raise ValueError(f"{n} true lengths but {len(pred)} predictions")
    if n == 0:
        raise ValueError("no predictions to score")
    if not np.all(np.isfinite(pred)):
        raise ValueError(f"predictions contain {int((~np.isfinite(pred)).sum())} non-finite value(s)")
    if samples is not None and len(samples) != n:
        raise ValueError(f"samples has {len(samples)} rows for {n} predictions")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} predictions")
    std, bound = _optional(predicted_std, n, "predicted_std"), _optional(predicted_bound, n, "predicted_bound")
    edges = make_bin_edges(bin_size, max_tokens)
    bins = (bin_index(np.clip(pred, 0, None), edges) if predicted_bins is None
            else np.asarray(predicted_bins).reshape(-1).astype(int))
    out: dict = {"n": n, **{f"{k}_mean": v for k, v in regression_scores(true, pred).items()},
                 "mae_std": None, "mse_std": None,
                 **classification_scores(true, bins, bin_size, max_tokens),
                 "kendall_tau_b": kendall_within_sets(true, pred, [0] * n if groups is None else list(groups)),
                 "coverage_1sigma": None, "coverage_2sigma": None, "bound_coverage": None}
    t_std = _optional(true_std, n, "true_std")
    if std is not None and t_std is not None:
        ok = np.isfinite(t_std) & np.isfinite(std)
        if ok.any():
            out.update({f"{k}_std": v for k, v in regression_scores(t_std[ok], std[ok]).items()})
    if samples is not None:
        if std is not None:
            out["coverage_1sigma"] = interval_coverage(samples, pred, std, 1.0)
            out["coverage_2sigma"] = interval_coverage(samples, pred, std, 2.0)
        if bound is not None:
            out["bound_coverage"] = bound_coverage(samples, bound)
    return out
