"""The prediction path every LenPred backend shares (the model's own `predict`, ONNX Runtime, int8): prompt checks,
head + tail tokenization, length-sorted batches, and the reservation bound with its calibration offsets.

This file is remote code: it is copied into every exported Hub folder and imports nothing from the
project's `lenpred` package — only torch and its sibling `configuration_lenpred`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

try:
    from .configuration_lenpred import LenPredConfig
except ImportError:  # loaded as a plain module from the repository root
    from configuration_lenpred import LenPredConfig

__all__ = ["LenPredPrediction", "check_prompts", "tokenize_prompts", "run_in_batches", "predict_in_batches",
           "reservation_bound", "lognormal_quantile"]


@dataclass
class LenPredPrediction:
    """What `LenPredModel.predict` returns: arrays of shape `(n_prompts, n_llms[, num_bins])` on the CPU."""

    llm_names: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    bound: torch.Tensor
    bin_probs: torch.Tensor
    bin_edges: list[int]
    reservation_quantile: float
    bound_calibrated: bool = False  # the bound's offsets were fitted on held-out answers (`config.bound_offsets`)


def check_prompts(prompts) -> list[str]:
    """Bad input gets a clear error: non-strings are a `TypeError`, empty or blank prompts a `ValueError`."""
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty or whitespace only; nothing to predict a length for")
    if not items:
        raise ValueError("no prompts given")
    return list(items)


def tokenize_prompts(tokenizer, prompts: Sequence[str], config: LenPredConfig,
                     max_length: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Encoder ids of each prompt and its full length in encoder tokens (special tokens included).

    A prompt longer than `max_length` (default `config.max_length`) keeps its head and, when
    `config.prompt_tail_tokens` > 0, that many tokens of its end; the closing special token stays. With no tail
    this is exactly the tokenizer's own `truncation=True`. The full length feeds the length feature
    (`config.full_prompt_length`), which would otherwise stop growing at `max_length`.
    """
    max_length = max_length or config.max_length
    full = tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
    sep = tokenizer.sep_token_id
    ids = []
    for seq in full:
        if len(seq) > max_length:
            closing = 1 if sep is not None and seq[-1] == sep else 0
            tail = min(getattr(config, "prompt_tail_tokens", 0), max_length - 1 - closing) + closing
            seq = seq[: max_length - tail] + (seq[-tail:] if tail else [])
        ids.append(seq)
    return ids, [len(seq) for seq in full]


def run_in_batches(config: LenPredConfig, tokenizer, prompts, run_batch, batch_size: int = 32,
                   max_length: int | None = None, progress: bool = False, desc: str = "predict") -> list[torch.Tensor]:
    """The batching every backend shares: check the prompts, tokenize (head + tail, whole lengths), sort by
    length, pad each batch to its own longest prompt and call `run_batch(input_ids, attention_mask,
    prompt_length)` → a tuple of CPU tensors with the batch first; then put the prompts back in their order.
    Returns each output stacked over all prompts."""
    prompts = check_prompts(prompts)
    encoded, lengths = tokenize_prompts(tokenizer, prompts, config, max_length)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs = [None] * len(prompts)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    for start in batches:
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        rows = run_batch(batch["input_ids"], batch["attention_mask"], torch.tensor([lengths[i] for i in idx]))
        for i, row in zip(idx, zip(*rows)):
            outputs[i] = row
    return [torch.stack(t) for t in zip(*outputs)]


def predict_in_batches(config: LenPredConfig, tokenizer, prompts, llms, run_batch, batch_size: int = 32,
                       max_length: int | None = None, progress: bool = False, desc: str = "predict",
                       quantile: float | None = None) -> LenPredPrediction:
    """Predictions for every prompt and every LLM in `llms` (names or unique parts of them; None: all) through
    `run_in_batches`, with `run_batch(input_ids, attention_mask, prompt_length, llm_ids)` → (bin probs, mean,
    std) of shape (batch, len(llm_ids)[, num_bins]). The bound is the `quantile` (default
    `config.reservation_quantile`) of one answer's length, calibrated where `config.bound_offsets` has it."""
    prompts = check_prompts(prompts)
    names = config.llm_names if llms is None else ([llms] if isinstance(llms, str) else list(llms))
    ids = [config.llm_index(config.resolve_llm(n)) for n in names]
    names = [config.llm_names[i] for i in ids]
    probs, mean, std = run_in_batches(config, tokenizer, prompts, lambda *batch: run_batch(*batch, ids), batch_size,
                                      max_length, progress, desc)
    q = config.reservation_quantile if quantile is None else quantile
    bound, calibrated = reservation_bound(config, mean, std, ids, q)
    return LenPredPrediction(names, mean, std, bound, probs, list(config.bin_edges), q, calibrated)


def reservation_bound(config: LenPredConfig, mean, std, llm_ids: Sequence[int], q: float):
    """(bound, calibrated): the log-normal `q`-quantile of one answer's length for columns of LLMs `llm_ids`,
    shifted in log1p space by `config.bound_offsets` where they hold `q` (see `lenpred calibrate`)."""
    bound = lognormal_quantile(torch.as_tensor(mean), torch.as_tensor(std), q)
    offsets = (config.bound_offsets or {}).get(f"{q:g}")
    if offsets is None:
        return bound, False
    return torch.expm1(torch.log1p(bound) + torch.tensor([offsets[i] for i in llm_ids], dtype=bound.dtype)), True


def lognormal_quantile(mean: torch.Tensor, std: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile `q` of the log-normal with this mean and std: answer lengths are positive and right-skewed,
    so a moment-matched log-normal gives a tighter, more honest upper bound than mean + kσ."""
    mean = mean.clamp(min=1.0)
    sigma2 = torch.log1p((std / mean) ** 2)
    z = math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * q - 1, dtype=mean.dtype, device=mean.device))
    return torch.exp(torch.log(mean) - sigma2 / 2 + z * sigma2.sqrt())
