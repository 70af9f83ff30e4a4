"""Length prediction: how well predicted answer lengths fit an LLM's sampled answers, as the LenPred report scores
them — MAE/MSE of the mean and std, accuracy and weighted F1 of the length bin, Kendall τ-b within groups, and the
coverage of the std intervals and of a reservation bound.

The arithmetic is `lenpred.metrics.length_prediction_scores`, the function LenPred's report and Trainer call, so
a figure here equals the report's for the same predictions.
"""

import datasets
import evaluate
import numpy as np
from lenpred.metrics import length_prediction_scores

_CITATION = """\
@article{lenpred-paper,
  title = {Proactive Inference Scheduling via Output Length Prediction in LLMs},
  year = {2025},
}
"""

_DESCRIPTION = """\
Scores predicted answer lengths (tokens) against the lengths of the answers an LLM actually gave: the true length
of a prompt is the mean of its sampled answers, its spread their standard deviation. Ranking is scored by Kendall
τ-b within groups (a scheduler only orders requests that wait together: group by LLM and prompt set), the
reservation bound by the share of sampled answers it would have held.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted mean answer length of each prompt, in tokens.
    references (`list` of `list` of `float`): the lengths of each prompt's sampled answers (one or more).
    predicted_std (`list` of `float`, optional): predicted spread; adds `mae_std`, `mse_std` (over prompts with at
        least 2 answers) and `coverage_1sigma` / `coverage_2sigma` (share of answers within mean ± k·std).
    predicted_bound (`list` of `float`, optional): a reservation bound per prompt; adds `bound_coverage`.
    predicted_bins (`list` of `int`, optional): predicted length bins at `bin_size` (e.g. a bin head's argmax);
        without them the bin of the predicted mean is scored.
    groups (`list`, optional): one key per prompt (e.g. "llm|prompt set"); τ is computed within each group and
        averaged by group size. Default: one group.
    bin_size (`int`, default 500): width of the length bins, in tokens; the last bin starts at `max_tokens`.
    max_tokens (`int`, default 4000): start of the open-ended last bin.
Returns:
    n, mae_mean, mse_mean, mae_std, mse_std, accuracy, f1 (weighted), kendall_tau_b, coverage_1sigma,
    coverage_2sigma, bound_coverage — a score whose inputs were not given is None.
Examples:
    >>> metric = evaluate.load("metrics/length_prediction")
    >>> scores = metric.compute(predictions=[120.0, 610.0, 40.0], references=[[100, 140], [700, 520], [35, 60]],
    ...                         predicted_std=[20.0, 90.0, 10.0], predicted_bound=[180.0, 800.0, 70.0])
    >>> round(scores["mae_mean"], 1), scores["accuracy"], scores["bound_coverage"]
    (2.5, 1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LengthPrediction(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("float64"),
                "references": datasets.Sequence(datasets.Value("float64")),
            }),
            reference_urls=["https://huggingface.co/datasets/danfperam/castillo"],
        )

    def _compute(self, predictions, references, predicted_std=None, predicted_bound=None, predicted_bins=None,
                 groups=None, bin_size=500, max_tokens=4000):
        samples = [np.asarray(r, dtype=float) for r in references]
        empty = [i for i, s in enumerate(samples) if s.size == 0]
        if empty:
            raise ValueError(f"references: {len(empty)} prompt(s) without any answer length (first: row {empty[0]})")
        bad = [i for i, s in enumerate(samples) if not np.all(np.isfinite(s)) or np.any(s < 0)]
        if bad:
            raise ValueError(f"references: {len(bad)} prompt(s) with a negative or non-finite length "
                             f"(first: row {bad[0]})")
        true_std = [float(s.std()) if s.size >= 2 else float("nan") for s in samples]
        return length_prediction_scores(
            [float(s.mean()) for s in samples], predictions, samples=samples, true_std=true_std,
            predicted_std=predicted_std, predicted_bound=predicted_bound, predicted_bins=predicted_bins,
            groups=groups, bin_size=bin_size, max_tokens=max_tokens)
