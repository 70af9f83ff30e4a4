"""Predictions for data rows through the model's one fast path (`LenPredModel.predict`).

The report, the simulator, the app and the gateway use these helpers and never loop over the model themselves.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lenpred.data import prompt_table

__all__ = ["predict_rows", "PREDICTION_COLUMNS"]

PREDICTION_COLUMNS = ("pred_mean", "pred_std", "pred_bound", "pred_bin", "pred_bin_probs")


def predict_rows(model, tokenizer, rows: pd.DataFrame, batch_size: int = 64, progress: bool = True,
                 autocast_dtype: torch.dtype | None = None) -> pd.DataFrame:
    """`rows` (one per ⟨prompt, LLM⟩) with prediction columns added. Each prompt is encoded once for all its LLMs.

    Rows for an LLM the model does not know are an error, never silently dropped.
    """
    known = set(model.config.llm_names)
    unknown = sorted(set(rows["llm"]) - known)
    if unknown:
        raise ValueError(f"rows name LLMs the model does not know: {unknown}; it knows {model.config.llm_names}")
    prompts = prompt_table(rows)
    llms = [n for n in model.config.llm_names if n in set(rows["llm"])]
    pred = model.predict(prompts["prompt_text"].tolist(), tokenizer, llms=llms, batch_size=batch_size,
                         progress=progress, autocast_dtype=autocast_dtype)
    p = pd.Index(prompts["prompt_id"]).get_indexer(rows["prompt_id"])
    j = pd.Index(llms).get_indexer(rows["llm"])
    probs = pred.bin_probs.numpy()[p, j]
    return rows.assign(
        pred_mean=pred.mean.numpy()[p, j].astype(float),
        pred_std=pred.std.numpy()[p, j].astype(float),
        pred_bound=pred.bound.numpy()[p, j].astype(float),
        pred_bin=probs.argmax(-1),
        pred_bin_probs=list(probs.astype(np.float32)),
    )
