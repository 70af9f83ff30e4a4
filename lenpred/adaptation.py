"""Teach an export an LLM from that LLM's own logs without changing what it predicts for the others.

    python train.py --init-from EXPORT --dataset requests.jsonl                  # --adapt llm, the default
    python train.py --init-from EXPORT --dataset requests.jsonl --adapt sibling  # no training at all
    python train.py --init-from EXPORT --dataset requests.jsonl --adapt full     # plenty of logs: all weights

- `sibling`: each LLM new to the export becomes a copy of the known LLM whose predictions fit its log best.
- `llm`: the shared encoder and MLP stay frozen; only the logged LLMs' own embedding rows learn — a new LLM's from
  its best sibling's row, a known LLM's (a refresh) from its own. Nothing another LLM's prediction reads changes,
  so the others' predictions stay bitwise the same. The prompts are encoded once, so it takes seconds: the rows
  fit the model's own loss on the cached prompt vectors, pulled towards their start by an L2 prior whose strength
  is chosen by cross-validation over the log's prompts (the log is all a user has; nothing else is peeked at).
- `full` (train.py, with the Trainer): every weight learns, on the logs beside a replay of the original training
  pool so the other LLMs keep being taught what they knew.

In `sibling` and `llm` modes the adapted LLMs' reservation-bound offsets are refitted by split conformal on their
own log answers, predicted by models that did not see them (the cross-validation folds); an answer cut short by
its `max_tokens` counts as not covered, whatever the bound (its length is unknown beyond the cap).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lenpred.calibration import QUANTILES, answer_scores, conformal_offset
from lenpred.examples import group_by_prompt

__all__ = ["ADAPT_MODES", "AdaptationReport", "sibling_fit", "choose_siblings", "extend_llms", "llm_parameters",
           "splice_llm", "fit_llm_rows", "adapt", "MIN_CALIBRATION_ANSWERS"]

logger = logging.getLogger(__name__)
ADAPT_MODES = ("llm", "sibling", "full")
#: Prior strengths tried by the cross-validation (0: no pull towards the starting row).
PRIOR_GRID = (0.0, 0.01, 0.1, 1.0)
#: An adapted LLM with fewer log answers than this keeps its starting row's bound offsets (logged).
MIN_CALIBRATION_ANSWERS = 20


@dataclass
class AdaptationReport:
    """What `adapt` did, for `training_info.json` and the benchmark."""

    mode: str
    llms: list[str]
    new_llms: list[str]
    siblings: dict[str, str] = field(default_factory=dict)     # new LLM -> the known LLM its row started from
    sibling_losses: dict[str, dict[str, float]] = field(default_factory=dict)  # new LLM -> loss of each known one
    prior: float | None = None
    cv_loss: dict[str, float] = field(default_factory=dict)     # prior -> mean held-out loss over the folds
    prompts: int = 0
    calibrated: dict[str, str] = field(default_factory=dict)   # LLM -> "fitted on N answers" or why not
    seconds: float = 0.0


def _labels(ds, key: str, n_llms: int) -> torch.Tensor | None:
    if key not in ds.column_names:
        return None
    return torch.tensor(np.asarray(ds[key], dtype=np.float32).reshape(len(ds), n_llms))


def _loss(model, vectors, ids, labels, table=None) -> torch.Tensor:
    bin_logits, log_mean, log_std = model.heads(vectors, ids, llm_table=table)
    mean, std, floor = labels
    return model.loss(bin_logits, log_mean, log_std, mean, std, ids.shape, labels_mean_floor=floor)


@torch.no_grad()
def sibling_fit(model, vectors: torch.Tensor, labels) -> dict[str, float]:
    """How far each known LLM's predicted lengths are from one LLM's log (`labels` of shape (n, 1)): the mean L1
    of log1p lengths, as the mean head is trained (an answer cut short counts only when predicted below its cap).
    The length, not the whole loss, decides: the bin term mostly restates it, more noisily."""
    mean, _, floor = labels
    out = {}
    for j, name in enumerate(model.config.llm_names):
        _, log_mean, _ = model.heads(vectors, torch.full((len(vectors), 1), j, dtype=torch.long))
        errors = [(log_mean - torch.log1p(mean)).abs()[~torch.isnan(mean)]]
        if floor is not None:
            errors.append(torch.relu(torch.log1p(floor) - log_mean)[~torch.isnan(floor)])
        out[name] = float(torch.cat(errors).mean())
    return out


def choose_siblings(model, tokenizer, rows: pd.DataFrame, encoded=None) -> tuple[dict, dict]:
    """({new LLM: the known LLM whose predictions fit its log best}, {new LLM: {known LLM: loss}}) for the LLMs of
    `rows` that the model does not know, by `sibling_fit`. `encoded`: `_encode(model, tokenizer, rows)`, when
    already at hand."""
    ds, vectors, labels, llms = encoded or _encode(model, tokenizer, rows)
    siblings, losses = {}, {}
    for j, name in enumerate(llms):
        if name in model.config.llm_names:
            continue
        losses[name] = sibling_fit(model, vectors, tuple(None if t is None else t[:, j:j + 1] for t in labels))
        siblings[name] = min(losses[name], key=losses[name].get)
        logger.info("%s starts as %s (mean L1 of log1p lengths on the log %.3f; the average known LLM's %.3f)",
                    name, siblings[name], losses[name][siblings[name]], float(np.mean(list(losses[name].values()))))
    return siblings, losses


def _encode(model, tokenizer, rows: pd.DataFrame, progress: bool = False, vectors_of=None):
    """(one example per prompt, their prompt vectors, label tensors (mean, std, floor), the LLMs in label order).
    `vectors_of(prompts)` gives the prompt vectors where they are at hand (the encoder is frozen in these modes, so
    any copy of the model gives the same ones); else the prompts are encoded here."""
    llms = list(dict.fromkeys(rows["llm"]))
    ds = group_by_prompt(rows, llms)
    prompts = list(ds["prompt_text"])
    vectors = (vectors_of(prompts) if vectors_of is not None
               else model.encode_prompts(prompts, tokenizer, progress=progress))
    labels = tuple(_labels(ds, k, len(llms)) for k in ("labels_mean", "labels_std", "labels_mean_floor"))
    return ds, vectors, labels, llms


def extend_llms(model, start_rows: dict[str, str]):
    """A copy of `model` that also knows the LLMs of `start_rows` (new LLM -> known LLM it starts as): their
    embedding rows and bound offsets are copies of the known ones'. Every existing weight is copied unchanged."""
    config = model.config
    new = [n for n in start_rows if n not in config.llm_names]
    if not new:
        return copy.deepcopy(model)
    source = [config.llm_index(start_rows[n]) for n in new]
    offsets = {q: list(v) + [v[i] for i in source] for q, v in (config.bound_offsets or {}).items()}
    extended = type(model)(type(config)(**{**config.to_dict(), "llm_names": list(config.llm_names) + new,
                                             "bound_offsets": offsets or None}))
    state = model.state_dict()
    table = state["llm_embedding.weight"]
    state["llm_embedding.weight"] = torch.cat([table, table[source].clone()])
    extended.load_state_dict(state)
    return extended.to(model.device).train(model.training)


def llm_parameters(model, llm: str) -> dict:
    """What `model` holds of `llm` alone: its embedding row and bound offsets (small, so a worker process can send
    them back to the server that splices them in)."""
    i = model.config.llm_index(llm)
    return {"row": model.llm_embedding.weight[i].detach().clone(),
            "offsets": {q: values[i] for q, values in (model.config.bound_offsets or {}).items()}}


def splice_llm(target, llm: str, params: dict):
    """A copy of `target` holding `params` (`llm_parameters` of a model from the same export) for `llm`, added when
    `target` does not know it: the other LLMs' parameters stay bitwise `target`'s."""
    config = target.config
    start = {} if llm in config.llm_names else {llm: config.llm_names[0]}  # a placeholder row, overwritten below
    out = extend_llms(target, start)
    i = out.config.llm_index(llm)
    with torch.no_grad():
        out.llm_embedding.weight[i] = params["row"]
    for q, values in (out.config.bound_offsets or {}).items():
        if q in params["offsets"]:
            values[i] = params["offsets"][q]
    return out


def fit_llm_rows(model, vectors: torch.Tensor, labels, llm_ids: list[int], prior: float, steps: int = 200,
                 lr: float = 0.05) -> torch.Tensor:
    """The embedding rows of `llm_ids` that minimise the model's loss on `labels` ((n, len(llm_ids)) each) from
    frozen prompt vectors, plus `prior` × the squared distance to their starting rows (full-batch Adam, on one
    thread: these small steps lose more to thread hand-offs than they gain). Returns the rows."""
    start = model.llm_embedding.weight.detach()[llm_ids].clone()
    rows = torch.nn.Parameter(start.clone())
    ids = torch.tensor(llm_ids).expand(len(vectors), -1)
    optimizer = torch.optim.Adam([rows], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            table = _with_rows(model, llm_ids, rows)
            loss = _loss(model, vectors, ids, labels, table) + prior * ((rows - start) ** 2).mean()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return rows.detach()


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)] if n >= 2 * k else []


def _subset(labels, idx):
    return tuple(None if t is None else t[idx] for t in labels)


def adapt(model, tokenizer, rows: pd.DataFrame, mode: str = "llm", folds: int = 5, seed: int = 0,
          priors=PRIOR_GRID, quantiles=QUANTILES, progress: bool = False, vectors_of=None):
    """(adapted model, `AdaptationReport`) for the LLMs that `rows` (normalised log rows, `lenpred.data`) name, in
    `sibling` or `llm` mode (see the module docstring). The input model is left as it is.
    `vectors_of(prompts)`: the prompts' vectors where they are cached (a gateway's, a benchmark's)."""
    if mode not in ("llm", "sibling"):
        raise ValueError(f"adapt() runs the 'llm' and 'sibling' modes (train.py runs 'full'), got {mode!r}")
    if rows.empty:
        raise ValueError("the log holds no usable rows to adapt from")
    began = time.time()
    config = model.config
    ds, vectors, labels, llms = encoded = _encode(model, tokenizer, rows, progress, vectors_of)
    new = [n for n in llms if n not in config.llm_names]
    report = AdaptationReport(mode, llms, new, prompts=len(ds))
    report.siblings, report.sibling_losses = choose_siblings(model, tokenizer, rows, encoded)
    adapted = extend_llms(model, report.siblings)
    ids = [adapted.config.llm_index(n) for n in llms]
    for p in adapted.parameters():
        p.requires_grad_(False)
    adapted.eval()
    held_out = _predict(adapted, vectors, ids)  # sibling mode: nothing was fitted on the log
    if mode == "llm":
        splits = _folds(len(ds), folds, seed)
        if not splits:  # too few prompts to cross-validate: the strongest pull towards the starting rows
            report.prior = max(priors)
        for prior in priors if splits else []:
            mean, std = torch.empty(len(ds), len(ids)), torch.empty(len(ds), len(ids))
            losses = []
            for test in splits:
                train = np.setdiff1d(np.arange(len(ds)), test)
                table = _with_rows(adapted, ids, fit_llm_rows(adapted, vectors[train], _subset(labels, train), ids,
                                                              prior))
                with torch.no_grad():
                    test_ids = torch.tensor(ids).expand(len(test), -1)
                    losses.append(float(_loss(adapted, vectors[test], test_ids, _subset(labels, test), table)))
                mean[test], std[test] = _predict(adapted, vectors[test], ids, table)
            report.cv_loss[f"{prior:g}"] = float(np.mean(losses))
            if report.prior is None or report.cv_loss[f"{prior:g}"] < report.cv_loss[f"{report.prior:g}"]:
                report.prior, held_out = prior, (mean, std)  # predictions of folds that did not see the answers
        fitted = fit_llm_rows(adapted, vectors, labels, ids, report.prior)
        with torch.no_grad():
            adapted.llm_embedding.weight[ids] = fitted
    _refit_offsets(adapted, rows, ds, llms, ids, held_out, quantiles, report)
    for p in adapted.parameters():
        p.requires_grad_(True)
    report.seconds = round(time.time() - began, 2)
    return adapted, report


@torch.no_grad()
def _predict(model, vectors, ids, table=None) -> tuple[torch.Tensor, torch.Tensor]:
    _, log_mean, log_std = model.heads(vectors, torch.tensor(ids).expand(len(vectors), -1), llm_table=table)
    return torch.expm1(log_mean), torch.expm1(log_std)


def _with_rows(model, ids, rows) -> torch.Tensor:
    """The LLM embedding table with `rows` in place of those of `ids`."""
    return model.llm_embedding.weight.detach().index_put((torch.tensor(ids),), rows)


def _refit_offsets(model, rows, ds, llms, ids, held_out, quantiles, report) -> None:
    """Split-conformal offsets of the adapted LLMs from held-out predictions of their log answers."""
    config = model.config
    position = {p: i for i, p in enumerate(list(ds["prompt_id"]))}
    offsets = {q: list(v) for q, v in (config.bound_offsets or {}).items()}
    qs = [q for q in sorted({*map(float, quantiles), float(config.reservation_quantile)}) if f"{q:g}" in offsets]
    if not qs:
        report.calibrated = dict.fromkeys(llms, "none: the export's bound is not calibrated")
        return
    for j, (name, idx) in enumerate(zip(llms, ids)):
        part = rows[(rows["llm"] == name) & rows["output_sizes"].map(lambda s: isinstance(s, list) and len(s) > 0)]
        if part.empty:
            report.calibrated[name] = "kept: the log holds no single answer lengths"
            continue
        at = np.array([position[p] for p in part["prompt_id"]])
        answers = int(part["output_sizes"].map(len).sum())
        if answers < MIN_CALIBRATION_ANSWERS:
            report.calibrated[name] = f"kept: {answers} answers (< {MIN_CALIBRATION_ANSWERS})"
            continue
        mean, std = held_out[0][at, j].numpy(), held_out[1][at, j].numpy()
        fitted = {f"{q:g}": conformal_offset(answer_scores(part["output_sizes"], part["output_capped"], mean, std, q),
                                             q) for q in qs}
        cut = int(sum(sum(c) for c in part["output_capped"] if isinstance(c, list)))
        for q, value in fitted.items():
            if np.isfinite(value):
                offsets[q][idx] = round(value, 5)
        beyond = [q for q, value in fitted.items() if not np.isfinite(value)]
        report.calibrated[name] = f"fitted on {answers} answers ({cut} cut short)" + (
            f"; quantiles {beyond} lie beyond the caps of the cut-short answers and keep the starting offsets"
            if beyond else "")
        if beyond:
            logger.warning("%s: %s", name, report.calibrated[name])
    config.bound_offsets = offsets
