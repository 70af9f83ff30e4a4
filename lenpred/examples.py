"""Training examples: one per prompt, with a label vector over the LLMs and the weights each label has in the loss.

One example per prompt (not per ⟨prompt, LLM⟩ row) is what lets one encoder pass train every LLM at once; NaN in a
label vector marks an LLM that did not answer the prompt (or a std that a single length cannot give), which the
loss masks out.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from lenpred.data import PAPER_LLMS, mean_std, prompt_table

__all__ = ["group_by_prompt", "llm_loss_weights", "label_weights"]

logger = logging.getLogger(__name__)


def _pool_duplicates(rows: pd.DataFrame) -> pd.DataFrame:
    """Merge repeated ⟨prompt, LLM⟩ rows (e.g. a gateway logging one prompt twice)."""
    dup = rows.duplicated(["prompt_id", "llm"], keep=False)
    if not dup.any():
        return rows
    merged = []
    for (pid, llm), grp in rows[dup].groupby(["prompt_id", "llm"], sort=False):
        first = grp.iloc[0].copy()
        if grp["output_sizes"].map(lambda s: s is not None).all():
            allsizes = [v for s in grp["output_sizes"] for v in s]
            (m,), (sd,) = mean_std([allsizes])
            first["output_sizes"], first["output_mean"], first["output_std"] = allsizes, m, sd
            flags = [c if isinstance(c, list) else [False] * len(s)
                     for s, c in zip(grp["output_sizes"], grp.get("output_capped", [None] * len(grp)))]
            first["output_capped"] = [f for c in flags for f in c] if any(map(any, flags)) else None
        else:  # some rows only know a mean: average the means, spread unknown
            first["output_sizes"], first["output_mean"] = None, grp["output_mean"].mean()
            first["output_std"] = np.nan
        merged.append(first)
    logger.info("pooled %d duplicate ⟨prompt, LLM⟩ row(s) into %d", int(dup.sum()), len(merged))
    return pd.concat([rows[~dup], pd.DataFrame(merged)], ignore_index=True)


def group_by_prompt(rows: pd.DataFrame, llm_names: Sequence[str]):
    """One example per prompt with per-LLM label vectors; NaN marks 'no answer from that LLM'."""
    import datasets

    llm_names = list(llm_names)
    if not llm_names or len(set(llm_names)) != len(llm_names):
        raise ValueError(f"llm_names must be non-empty and unique, got {llm_names}")
    keep = rows["llm"].isin(llm_names)
    if (~keep).any():
        logger.info("group_by_prompt: ignored %d row(s) of %d LLM(s) not in llm_names",
                    int((~keep).sum()), rows.loc[~keep, "llm"].nunique())
    sub = _pool_duplicates(rows[keep])
    capped = (sub["output_capped"].map(lambda c: isinstance(c, list) and any(c)).to_numpy(bool)
              if "output_capped" in sub.columns else np.zeros(len(sub), bool))
    if capped.any():  # a cut-short answer only bounds the mean from below: the mean and std labels go, a floor stays
        sub = sub.assign(output_mean_floor=np.where(capped, sub["output_mean"], np.nan),
                         output_mean=np.where(capped, np.nan, sub["output_mean"]),
                         output_std=np.where(capped, np.nan, sub["output_std"]))
        logger.info("group_by_prompt: %d ⟨prompt, LLM⟩ label(s) of %d hold an answer cut short by max_tokens: "
                    "learnt as lower bounds", int(capped.sum()), len(sub))
    single = int((sub["output_sizes"].map(lambda s: isinstance(s, list) and len(s) == 1) & ~capped).sum())
    if single:
        logger.info("group_by_prompt: %d label(s) hold a single answer length: no std label there", single)
    table = prompt_table(sub)
    out = {c: table[c].tolist() for c in ("prompt_id", "prompt_text", "prompt_set")}
    columns = ("mean", "std", "mean_floor") if capped.any() else ("mean", "std")
    for col in columns:
        wide = sub.pivot(index="prompt_id", columns="llm", values=f"output_{col}")
        wide = wide.reindex(index=table["prompt_id"], columns=llm_names)
        out[f"labels_{col}"] = wide.to_numpy(float).tolist()
    text, vec = datasets.Value("string"), datasets.List(datasets.Value("float64"))
    return datasets.Dataset.from_dict(out, features=datasets.Features(
        {"prompt_id": text, "prompt_text": text, "prompt_set": text, **{f"labels_{c}": vec for c in columns}}))


def llm_loss_weights(spec: str | None, names: list[str]) -> np.ndarray | None:
    """Per-LLM loss weights, aligned with `names`, from `--llm_loss_weights` (None: every LLM weighs 1).

    Items are `LLM=WEIGHT`; an LLM id the model does not train is an error, while `paper` means those of the
    paper's three Llamas that it trains (none, when training on logs of other LLMs: then it weighs nothing).
    """
    if not spec:
        return None
    weights = np.ones(len(names))
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        llm, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not llm or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"--llm_loss_weights takes LLM=WEIGHT items with a weight >= 0, got {item!r}")
        if llm == "paper":
            targets = [t for t in PAPER_LLMS if t in names]
            if len(targets) < len(PAPER_LLMS):
                logger.info("--llm_loss_weights: 'paper' weighs %d of the paper's LLMs (the others are not trained)",
                            len(targets))
        elif llm not in names:
            raise ValueError(f"--llm_loss_weights names an LLM the model does not train: {llm!r}. Known: {names}")
        else:
            targets = [llm]
        for t in targets:
            weights[names.index(t)] = weight
    if not weights.any():
        raise ValueError("--llm_loss_weights gives every LLM weight 0: nothing would be learnt")
    return None if (weights == 1).all() else weights


def label_weights(n_prompts: int, llm_names: Sequence[str], llm_spec: str | None = None) -> np.ndarray | None:
    """(prompts, LLMs) loss weights from `--llm_loss_weights`, the same row for every prompt; None when all weigh 1."""
    per_llm = llm_loss_weights(llm_spec, list(llm_names))
    return None if per_llm is None else np.outer(np.ones(n_prompts), per_llm)
