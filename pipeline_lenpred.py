"""The `length-prediction` pipeline and the paper's `predict_response_length` API.

This file is remote code: it is copied into every exported Hub folder and imports nothing from the
project's `lenpred` package — only transformers, torch and its siblings.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from transformers import Pipeline

try:
    from .configuration_lenpred import bin_labels
    from .prediction_lenpred import LenPredPrediction, check_prompts, lognormal_quantile
except ImportError:  # loaded as a plain module from the repository root
    from configuration_lenpred import bin_labels
    from prediction_lenpred import LenPredPrediction, check_prompts, lognormal_quantile

__all__ = ["LenPredPipeline", "predict_response_length", "PIPELINE_TASK", "HUB_MODEL_ID"]

PIPELINE_TASK = "length-prediction"
#: Where the trained model is published; `LENPRED_MODEL` overrides it (a local export folder works too).
HUB_MODEL_ID = "lenpred/lenpred-minilm-castillo"


def format_predictions(pred: LenPredPrediction) -> list[list[dict]]:
    """One list per prompt, one dict per LLM: mean, std, most likely bin with its token range, bin probabilities
    and the reservation bound (a quantile of one answer's length)."""
    labels = bin_labels(pred.bin_edges)
    q = f"p{round(pred.reservation_quantile * 100):d}"
    out = []
    for p in range(pred.mean.shape[0]):
        rows = []
        for j, llm in enumerate(pred.llm_names):
            probs = pred.bin_probs[p, j]
            b = int(probs.argmax())
            hi = pred.bin_edges[b + 1] - 1 if b + 1 < len(pred.bin_edges) else None
            rows.append({
                "llm": llm,
                "predicted_mean": float(pred.mean[p, j]),
                "predicted_std": float(pred.std[p, j]),
                "predicted_bin": b,
                "predicted_range": labels[b],
                "bin_range": (pred.bin_edges[b], hi),
                "bin_probabilities": {lab: float(v) for lab, v in zip(labels, probs)},
                "reservation_quantile": q,
                "upper_bound": float(pred.bound[p, j]),
                "bound_calibrated": pred.bound_calibrated,
            })
        out.append(rows)
    return out


class LenPredPipeline(Pipeline):
    """Predict answer lengths for a prompt or a list of prompts, for one LLM, several, or (`llm=None`) every LLM
    the model knows.

    ```python
    >>> from transformers import pipeline
    >>> predictor = pipeline(model="path/or/hub-id", trust_remote_code=True)
    >>> predictor("Write a haiku about autumn.", llm="meta-llama/Llama-3.2-3B-Instruct")
    [{'llm': 'meta-llama/Llama-3.2-3B-Instruct', 'predicted_mean': 24.1, 'predicted_std': 6.0, ...}]
    ```
    A single prompt gives a list of per-LLM dicts; a list of prompts gives one such list per prompt.
    """

    def _sanitize_parameters(self, llm=None, batch_size=None, **kwargs):
        forward = {}
        if llm is not None:
            forward["llm"] = llm
        if batch_size is not None:
            forward["batch_size"] = batch_size
        return {}, forward, {}

    def __call__(self, inputs: str | Sequence[str], llm: str | Sequence[str] | None = None, batch_size: int = 32,
                 **kwargs):
        # The whole batch goes through the model's one fast path (sorted, padded per batch, one encoder pass).
        single = isinstance(inputs, str)
        out = self._forward(self.preprocess(inputs), llm=llm, batch_size=batch_size)
        rows = self.postprocess(out)
        return rows[0] if single else rows

    def preprocess(self, inputs, **kwargs):
        return check_prompts(inputs)

    def _forward(self, prompts, llm=None, batch_size=32, **kwargs):
        return self.model.predict(prompts, self.tokenizer, llms=llm, batch_size=batch_size)

    def postprocess(self, outputs, **kwargs):
        return format_predictions(outputs)

    def predict_response_length(self, prompt: str, model: str, task: str = "regression") -> dict:
        """The paper's API (Appendix B): `model` is the LLM's id (or a unique part of it, e.g. `"llama-3.2-3B"`);
        `task="regression"` gives `predicted_mean`/`predicted_std`, `task="classification"` the bin and its range
        (plus the paper's `predicted_p99_class`: the bin of the 99th percentile of the predicted log-normal answer
        distribution — an estimate of the prompt's own p99, so without the reservation bound's calibration)."""
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        row = self(prompt, llm=model)[0]
        if task == "regression":
            return {"llm": row["llm"], "predicted_mean": row["predicted_mean"], "predicted_std": row["predicted_std"]}
        edges = self.model.config.bin_edges
        p99 = float(lognormal_quantile(torch.tensor(row["predicted_mean"]), torch.tensor(row["predicted_std"]), 0.99))
        bound_bin = sum(e <= p99 for e in edges) - 1
        return {
            "llm": row["llm"],
            "predicted_class": row["predicted_bin"],
            "predicted_range": row["predicted_range"],
            "predicted_p99_class": bound_bin,
            "predicted_p99_range": bin_labels(edges)[bound_bin],
        }


_DEFAULT: dict[str, LenPredPipeline] = {}


def predict_response_length(prompt: str, model: str, task: str = "regression",
                            predictor: LenPredPipeline | str | None = None) -> dict:
    """`predict_response_length(prompt, model, task)` as in the paper. `predictor` is a loaded pipeline or a path /
    Hub id; by default `$LENPRED_MODEL` or the published model, loaded once."""
    if not isinstance(predictor, LenPredPipeline):
        source = predictor or os.environ.get("LENPRED_MODEL", HUB_MODEL_ID)
        if source not in _DEFAULT:
            from transformers import pipeline

            _DEFAULT[source] = pipeline(PIPELINE_TASK, model=source, trust_remote_code=True)
        predictor = _DEFAULT[source]
    return predictor.predict_response_length(prompt, model, task)
