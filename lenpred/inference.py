"""Predictions through the model's one fast path (`LenPredModel.predict`): for data rows, and micro-batched for
concurrent requests.

The report, the simulator, the app and the gateway use these helpers and never loop over the model themselves.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

import numpy as np
import pandas as pd
import torch

from lenpred.data import prompt_table
from prediction_lenpred import lognormal_quantile

__all__ = ["predict_rows", "MicroBatcher", "CPU_OPTIONS"]

#: The CPU options `lenpred.fast.build_option` makes; `--backend` adds "torch", the fp32 path. Kept here, not in
#: `lenpred.fast` (which imports transformers), so that building the CLI's parsers stays quick.
CPU_OPTIONS = ("int8", "onnx", "onnx-int8")


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
    p99 = lognormal_quantile(pred.mean, pred.std, 0.99).numpy()  # the prompt's own p99, no calibration offset
    return rows.assign(
        pred_mean=pred.mean.numpy()[p, j].astype(float),
        pred_std=pred.std.numpy()[p, j].astype(float),
        pred_bound=pred.bound.numpy()[p, j].astype(float),
        pred_p99=p99[p, j].astype(float),  # for the paper's p99 class, whatever the reservation quantile
        pred_bin=probs.argmax(-1),
        pred_bin_probs=list(probs.astype(np.float32)),
    )


class MicroBatcher:
    """One thread runs the model; requests that arrive while it is busy (or within `wait_ms`) share one batch.

    `keep_vectors`: a future's result is (mean, std, bound, prompt vector) instead of (mean, std), and `llm=None`
    is allowed (the vector only, for an LLM the model does not know yet): what online learning keeps. The model
    needs `encode_prompts` and `predict_vectors` then. `model` may be replaced while serving (`swap`): each batch
    runs whole on the model it started with."""

    def __init__(self, model, tokenizer, max_batch: int = 64, wait_ms: float = 0.0, keep_vectors: bool = False):
        self.model, self.tokenizer, self.max_batch, self.wait = model, tokenizer, max_batch, wait_ms / 1000
        self.keep_vectors = keep_vectors
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lenpred-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: str, llm: str | None) -> concurrent.futures.Future:
        """Future of (mean, std) in tokens for an LLM id the model knows (see `keep_vectors`)."""
        if llm is None and not self.keep_vectors:
            raise ValueError("an LLM id is needed unless the batcher keeps prompt vectors")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((prompt, llm, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            batch, deadline = [item], time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            self._predict(batch)

    def _predict(self, batch) -> None:
        prompts = list(dict.fromkeys(p for p, _, _ in batch))
        llms = list(dict.fromkeys(m for _, m, _ in batch if m is not None))
        model = self.model  # one model for the whole batch, whatever a swap does meanwhile
        try:
            # the model's own batch size: its length-sorted batches pad each to its own longest prompt, where one
            # batch of everything queued would pad all to the longest (docs/speed.md: 58 → 75–83 rps at 64 streams)
            if self.keep_vectors:
                vectors = model.encode_prompts(prompts, self.tokenizer)
                pred = model.predict_vectors(vectors, llms) if llms else None
            else:
                pred = model.predict(prompts, self.tokenizer, llms=llms)
        except Exception as exc:  # one bad prompt must not fail its neighbours: retry one by one
            if len(batch) > 1:
                for item in batch:
                    self._predict([item])
            else:
                batch[0][2].set_exception(exc)
            return
        for p, m, fut in batch:
            i = prompts.index(p)
            if m is None:
                fut.set_result((None, None, None, vectors[i]))
                continue
            j = llms.index(m)
            mean, std = float(pred.mean[i, j]), float(pred.std[i, j])
            fut.set_result((mean, std, float(pred.bound[i, j]), vectors[i]) if self.keep_vectors else (mean, std))
