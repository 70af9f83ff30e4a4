"""What the replay sends: prompt pools, arrival times, submission order and each policy's client priority.

Why a module of its own: these are the parts of the benchmark that decide whether a comparison is fair (every
policy sees the same prompts at the same times; the evaluation pool never reaches the adaptation log), and they are
pure functions, so `tests/test_serving_replay.py` checks them without any server.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lenpred.data import HELD_OUT_PROMPT_SET, load_castillo, prompt_table

__all__ = ["POLICIES", "CLIENT_POLICIES", "GATEWAY_POLICIES", "Pools", "sample_pools", "arrival_times",
           "submission_order", "client_priority", "make_trace"]

#: Policies the replay knows. Client policies set `priority` in the request body (the gateway keeps it with
#: `--keep-client-priority`); gateway policies leave it out and let the gateway's LenPred prediction set it.
CLIENT_POLICIES = ("fcfs", "prompt_len", "oracle")
GATEWAY_POLICIES = ("lenpred", "lenpred_adapted")
POLICIES = CLIENT_POLICIES + GATEWAY_POLICIES


@dataclass(frozen=True)
class Pools:
    """Disjoint prompt pools, each a frame of prompt_id, prompt_text, prompt_set.

    - ``eval``: replayed under every policy, and scored for prediction quality;
    - ``holdout``: scored for prediction quality only (more unseen prompts make the closed loop's tau less noisy);
    - ``adapt``: sent once in pass 1, whose gateway log the adaptation trains on.
    """

    eval: pd.DataFrame
    holdout: pd.DataFrame
    adapt: pd.DataFrame

    def unseen(self) -> pd.DataFrame:
        """The prompts not in the adaptation log: where the closed loop's quality is measured."""
        return pd.concat([self.eval, self.holdout], ignore_index=True)


def _stratified(prompts: pd.DataFrame, n: int, alpaca_share: float, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` prompts, ``alpaca_share`` of them Alpaca (the held-out prompt set), the rest spread over the other sets
    in proportion to their size; a shortfall in one part is filled from the other."""
    is_alp = (prompts["prompt_set"] == HELD_OUT_PROMPT_SET).to_numpy()
    n_alp = min(int(round(n * alpaca_share)), int(is_alp.sum()))
    n_in = min(n - n_alp, int((~is_alp).sum()))
    n_alp = min(n - n_in, int(is_alp.sum()))
    pick = np.concatenate([rng.choice(np.flatnonzero(is_alp), n_alp, replace=False),
                           rng.choice(np.flatnonzero(~is_alp), n_in, replace=False)])
    return prompts.iloc[np.sort(pick)]


def sample_pools(prompts: pd.DataFrame, n_eval: int, n_holdout: int, n_adapt: int, seed: int = 0,
                 alpaca_share: float = 0.3) -> Pools:
    """Draw three disjoint pools from ``prompts`` (one row per prompt), each with the same Alpaca share.

    The pools are fixed by ``seed`` alone, not by the replay seeds, so every run of a benchmark replays the same
    evaluation prompts and the adaptation never sees them.
    """
    prompts = prompts.drop_duplicates("prompt_id").drop_duplicates("prompt_text").reset_index(drop=True)
    need = n_eval + n_holdout + n_adapt
    if need > len(prompts):
        raise ValueError(f"pools need {need} prompts, only {len(prompts)} available")
    rng = np.random.default_rng([seed, 7])
    out, left = [], prompts
    for n in (n_eval, n_holdout, n_adapt):
        part = _stratified(left, n, alpaca_share, rng)
        out.append(part.reset_index(drop=True))
        left = left[~left["prompt_id"].isin(part["prompt_id"])]
    return Pools(*out)


def castillo_prompts(source=None, split: str = "test", tokenizer=None, max_prompt_tokens: int | None = None):
    """CASTILLO prompts of one split (one row per prompt), optionally without those whose chat-formatted length in
    the served LLM's ``tokenizer`` exceeds ``max_prompt_tokens`` (they would not fit ``--max-model-len`` with
    ``max_tokens`` on top, and on a CPU their prefill would dominate the run)."""
    rows = load_castillo(source, splits=[split])
    prompts = prompt_table(rows)
    if tokenizer is not None and max_prompt_tokens:
        n = [len(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
             for t in prompts["prompt_text"]]
        prompts = prompts.assign(chat_tokens=n)
        prompts = prompts[prompts["chat_tokens"] <= max_prompt_tokens].reset_index(drop=True)
    return prompts


def arrival_times(n: int, load: float, capacity_rps: float, seed: int) -> np.ndarray:
    """Submission times in seconds from the run's start: Poisson at ``load`` x the measured capacity, or all at
    t = 0 for ``load = inf`` (a backlog: a standing queue from the first moment). Depends only on (n, load, seed),
    so every policy of one seed sees the same trace."""
    if not load > 0:
        raise ValueError(f"load must be > 0, got {load}")
    if math.isinf(load):
        return np.zeros(n)
    if not capacity_rps > 0:
        raise ValueError(f"capacity must be > 0 requests/s, got {capacity_rps}")
    rng = np.random.default_rng([seed, 11])
    gaps = rng.exponential(1.0 / (load * capacity_rps), n)
    gaps[0] = 0.0  # the run starts with its first request, not with an idle gap
    return np.cumsum(gaps)


def submission_order(n: int, seed: int) -> np.ndarray:
    """Which prompt goes i-th: a seeded permutation, so that seeds also vary which prompts meet in the queue."""
    return np.random.default_rng([seed, 13]).permutation(n)


def client_priority(policy: str, prompt_tokens: int | None = None, ref_tokens: int | None = None) -> int | None:
    """The ``priority`` the client sends (lower runs first), or None when the gateway sets it.

    - fcfs: a constant 0; vLLM breaks ties by arrival time, which is first-come-first-served.
    - prompt_len: the prompt's length in the served LLM's tokens (the best a scheduler does without a predictor).
    - oracle: the answer's length in a reference pass (temperature 0; how well it repeats is measured).
    """
    if policy == "fcfs":
        return 0
    if policy == "prompt_len":
        if prompt_tokens is None:
            raise ValueError("prompt_len needs the prompt's token count")
        return int(prompt_tokens)
    if policy == "oracle":
        if ref_tokens is None:
            raise ValueError("oracle needs the reference answer length")
        return int(ref_tokens)
    if policy in GATEWAY_POLICIES:
        return None
    raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")


def make_trace(pool: pd.DataFrame, policy: str, load: float, capacity_rps: float, seed: int,
               reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One run's requests: prompt_id, prompt_text, prompt_set, submit_s, priority (nullable int), in submission
    order. ``reference`` (indexed by prompt_id, columns prompt_tokens and tokens) supplies what prompt_len and
    oracle need."""
    order = submission_order(len(pool), seed)
    trace = pool.iloc[order].reset_index(drop=True)
    trace = trace[["prompt_id", "prompt_text", "prompt_set"]].assign(
        submit_s=arrival_times(len(trace), load, capacity_rps, seed))
    if policy in ("prompt_len", "oracle") and reference is None:
        raise ValueError(f"policy {policy} needs the reference pass")
    ref = reference.reindex(trace["prompt_id"]) if reference is not None else None
    if ref is not None and policy in ("prompt_len", "oracle") and ref[["prompt_tokens", "tokens"]].isna().any().any():
        raise ValueError("the reference pass lacks some prompts of the pool")
    pri = [client_priority(policy, None if ref is None else int(ref["prompt_tokens"].iloc[i]),
                           None if ref is None else int(ref["tokens"].iloc[i])) for i in range(len(trace))]
    return trace.assign(priority=pd.array(pri, dtype="Int64"))
