"""Online learning (`lenpred gateway --learn`): each LLM in the traffic is refitted from its own answers while the
gateway serves.

- Memory: per LLM (the name the log gives it), its newest `learn_memory` finished answers — the log records — with
  the prompt vectors their predictions computed, so a refit never runs the encoder.
- Refit: once an LLM has `learn_every` answers more than at its last refit (and `learn_min_answers` in all), and
  `learn_interval` seconds have passed since that refit, a background thread has a worker process (niced, one
  torch thread, the starting export loaded once; in-thread when the gateway was given a model object, not an
  export) refit that LLM's own parameters from all its remembered answers (`lenpred.adaptation.adapt`, `train.py --adapt llm`'s
  fit), always from the export the gateway started with: a refit is a pure
  function of the answers, so a restart from the same log and vectors gives bitwise the same parameters. The result
  is spliced into the served model (`splice_llm`: every other LLM's parameters untouched) and swapped in between
  prediction batches. Until its first refit, an LLM the export does not know gets the default priority.
- Prequential scores: each prediction made before its answer was known is scored when the answer arrives, over the
  newest `learn_window` answers of its LLM (`scores`, `GET /llms`, `/metrics`).
- `learn_dir`: after each refit, the served model as an export beside the learner's state and remembered vectors,
  written to a new folder that a symlink at `learn_dir` is then atomically switched to: a crash mid-write leaves the
  previous export in place. Started again with the same `learn_dir`, the gateway serves that export and rebuilds its
  memory from the request log, taking each prompt's vector from the saved ones where they hold it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Learner", "prequential_scores"]

logger = logging.getLogger("lenpred.gateway")
STATE_FILE, VECTORS_FILE = "learning.json", "learning_vectors.safetensors"


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _capped(record: dict) -> bool:
    """Cut short by `max_tokens` (as `lenpred.data` reads the log: a finish reason that is not a complete one)."""
    from lenpred.data import COMPLETE_FINISH_REASONS

    reasons, cap, sizes = record.get("finish_reasons") or [], record.get("max_tokens"), record["output_sizes"]
    if any(isinstance(r, str) for r in reasons):
        return any(isinstance(r, str) and r not in COMPLETE_FINISH_REASONS for r in reasons)
    return isinstance(cap, int) and sizes[0] >= cap


def prequential_scores(window) -> dict:
    """MAE of the mean and Kendall τ-b over answers not cut short, bound coverage (a cut-short answer counts as not
    covered: its length is unknown beyond the cap) and the share cut short, of (predicted mean, bound, actual, cut
    short) tuples."""
    from scipy.stats import kendalltau

    items = list(window)
    if not items:
        return {"answers": 0, "mae": None, "tau": None, "coverage": None, "capped_share": None}
    pred, bound, actual, cut = (np.array(c, dtype=float) for c in zip(*items))
    whole = cut == 0
    tau = kendalltau(pred[whole], actual[whole]).statistic if whole.sum() >= 3 else float("nan")
    has_bound = ~np.isnan(bound)
    return {"answers": len(items), "mae": float(np.abs(pred[whole] - actual[whole]).mean()) if whole.any() else None,
            "tau": None if np.isnan(tau) else float(tau),
            "coverage": float(((actual <= bound) & whole)[has_bound].mean()) if has_bound.any() else None,
            "capped_share": float(cut.mean())}


@dataclass
class _LLMState:
    answers: deque                      # (log record, prompt vector), newest last
    window: deque                       # (predicted mean, bound, actual, cut short) of predicted answers
    seen: int = 0                       # answers observed in all
    fitted_on: int = 0                  # `seen` at the last refit
    refits: int = 0
    last_refit: float | None = None     # wall-clock time (s) of the last refit
    last_refit_clock: float | None = None
    info: dict = field(default_factory=dict)


class Learner:
    """Owns the memory, the refit thread and the learn dir; `swap(model)` is called with each new served model."""

    def __init__(self, base, tokenizer, config, swap, served=None, clock=time.monotonic, base_path=None):
        self.base, self.tokenizer, self.config, self.swap, self.clock = base, tokenizer, config, swap, clock
        self.served = served if served is not None else base
        self.base_path, self._pool = base_path, None
        self._llms: dict[str, _LLMState] = {}
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = None
        self.errors = 0

    # -- the gateway's side ---------------------------------------------------------------------------------------
    def observe(self, record: dict, vector: torch.Tensor | None, bound: float | None) -> None:
        """One finished answer (its log record) and the prompt vector its prediction computed."""
        if vector is None or record.get("output_sizes") is None:
            return  # no vector to learn from, or n > 1 answers (one mean, no single length)
        capped = _capped(record)
        with self._lock:
            state = self._state(record["model"])
            state.answers.append((record, vector))
            state.seen += 1
            if record.get("predicted_mean") is not None:
                state.window.append((record["predicted_mean"], np.nan if bound is None else bound,
                                     record["output_sizes"][0], capped))
            due = self._due(state)
        if due:
            self._wake.set()

    def llms(self) -> dict:
        """`GET /llms`: per LLM, what is remembered, the refits and the prequential scores."""
        with self._lock:
            items = [(name, s, list(s.window)) for name, s in self._llms.items()]
        known = set(self.served.config.llm_names)
        return {name: {"answers_seen": s.seen, "answers_remembered": len(s.answers), "refits": s.refits,
                       "last_refit": s.last_refit, "predicted": name in known, **s.info,
                       "prequential": prequential_scores(window)} for name, s, window in items}

    # -- the refit thread -----------------------------------------------------------------------------------------
    def start(self) -> "Learner":
        """Start the refit thread; with `base_path` (the export on disk), the fits run in one worker process that
        loads it once, so a refit never competes with the serving threads for the GIL."""
        if self.base_path is not None and self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(str(self.base_path),))
        self._thread = threading.Thread(target=self._run, name="lenpred-learner", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _state(self, llm: str) -> _LLMState:
        if llm not in self._llms:
            self._llms[llm] = _LLMState(deque(maxlen=self.config.learn_memory), deque(maxlen=self.config.learn_window))
        return self._llms[llm]

    def _due(self, state: _LLMState) -> bool:
        cfg = self.config
        return (state.seen - state.fitted_on >= cfg.learn_every and len(state.answers) >= cfg.learn_min_answers
                and (state.last_refit_clock is None or self.clock() - state.last_refit_clock >= cfg.learn_interval))

    def _run(self) -> None:
        try:  # below the serving threads: a refit waits for them, never they for it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._lock:
                due = [name for name, s in self._llms.items() if self._due(s)]
            for name in due:
                if self._stop.is_set():
                    break
                try:
                    self.refit(name)
                except Exception:  # noqa: BLE001 - a failed refit keeps the served model; the gateway goes on
                    self.errors += 1
                    logger.exception("refit of %s failed; its predictions stay as they were", name)

    def refit(self, llm: str) -> None:
        """Refit `llm` from all its remembered answers, swap the result in, persist it."""
        from lenpred.adaptation import splice_llm

        with self._lock:
            state = self._llms[llm]
            items, seen = list(state.answers), state.seen
        records = [r for r, _ in items]
        vectors = torch.stack([v for _, v in items]).numpy()
        if self._pool is not None:  # the fit runs in the worker process: no GIL shared with the serving threads
            params, info = self._pool.submit(_fit_in_worker, records, vectors, llm).result()
        else:
            params, info = fit_llm(self.base, self.tokenizer, records, vectors, llm)
        if params is None:
            state.fitted_on, state.last_refit_clock = seen, self.clock()
            logger.warning("%s: no usable answer among %d remembered (%s); no refit", llm, len(items), info)
            return
        served = splice_llm(self.served, llm, params)
        self.served = served
        self.swap(served)
        with self._lock:
            state.fitted_on, state.refits = seen, state.refits + 1
            state.last_refit, state.last_refit_clock = time.time(), self.clock()
            state.info = {**info, "fitted_on_answers": len(items)}
        logger.info("refitted %s on %d answers (%.1f s)", llm, len(items), info["refit_seconds"])
        if self.config.learn_dir:
            self.persist()

    # -- the learn dir --------------------------------------------------------------------------------------------
    def persist(self) -> Path:
        """Write the served model, the state and the remembered vectors to a new version folder, then switch the
        `learn_dir` symlink to it (atomic rename); older versions beyond the previous one are removed."""
        from safetensors.torch import save_file

        from lenpred.hub import export_model

        link = Path(self.config.learn_dir)
        versions = link.parent / f"{link.name}.versions"
        versions.mkdir(parents=True, exist_ok=True)
        target = versions / f"{time.time_ns()}"
        export_model(self.served, self.tokenizer, target)
        with self._lock:
            snapshot = {name: (list(s.answers), s) for name, s in self._llms.items()}
            state = {name: {"seen": s.seen, "fitted_on": s.fitted_on, "refits": s.refits, "last_refit": s.last_refit,
                            "info": s.info, "prompts": [_hash(r["prompt_text"]) for r, _ in items]}
                     for name, (items, s) in snapshot.items()}
        tensors = {f"llm{i}": torch.stack([v for _, v in items]).contiguous()
                   for i, (items, _) in enumerate(snapshot.values()) if items}
        save_file(tensors, str(target / VECTORS_FILE))
        (target / STATE_FILE).write_text(json.dumps({"llms": state, "order": list(snapshot)}, default=str))
        tmp = link.parent / f".{link.name}.{target.name}"
        os.symlink(target.resolve(), tmp)
        os.replace(tmp, link)  # a symlink replaced by rename: readers see the old export or the new one, whole
        for old in sorted(versions.iterdir())[:-2]:
            if old.resolve() != target.resolve():
                shutil.rmtree(old, ignore_errors=True)
        return target

    def restore(self, log_path: str | None) -> int:
        """Rebuild the memory from the request log (its newest `learn_memory` answers per LLM), with the vectors
        and counts saved in `learn_dir` where they are; prompts without a saved vector are encoded. Returns the
        number of answers remembered."""
        saved, state = {}, {}
        folder = Path(self.config.learn_dir) if self.config.learn_dir else None
        if folder is not None and (folder / STATE_FILE).exists():
            from safetensors.torch import load_file

            meta = json.loads((folder / STATE_FILE).read_text())
            state = meta["llms"]
            tensors = load_file(str(folder / VECTORS_FILE))
            for i, name in enumerate(meta["order"]):
                if f"llm{i}" in tensors:
                    saved.update(zip(state[name]["prompts"], tensors[f"llm{i}"]))
        records = _read_log(log_path) if log_path and os.path.exists(log_path) else []
        missing = list(dict.fromkeys(r["prompt_text"] for r in records if _hash(r["prompt_text"]) not in saved))
        if missing:
            logger.info("encoding %d logged prompt(s) without a saved vector", len(missing))
            saved.update(zip(map(_hash, missing), self.served.encode_prompts(missing, self.tokenizer)))
        with self._lock:
            for r in records:
                s = self._state(r["model"])
                s.answers.append((r, saved[_hash(r["prompt_text"])]))
                s.seen += 1
            for name, st in state.items():
                s = self._state(name)
                s.fitted_on, s.refits, s.last_refit, s.info = (min(st["fitted_on"], s.seen), st["refits"],
                                                               st["last_refit"], st["info"])
        return len(records)


def fit_llm(base, tokenizer, records: list[dict], vectors: np.ndarray, llm: str) -> tuple[dict | None, dict]:
    """(`llm_parameters` of `llm` refitted on `records` by `adapt(mode="llm")` from `base`, what the fit chose), or
    (None, the skipped rows' counts) when no record is usable. A pure function of its inputs."""
    from lenpred.adaptation import adapt, llm_parameters
    from lenpred.data import rows_from_records

    rows, skipped = rows_from_records(records, origin=f"{llm}'s remembered answers")
    if rows.empty:
        return None, skipped
    by_text = {r["prompt_text"]: torch.from_numpy(v) for r, v in zip(records, vectors)}
    adapted, report = adapt(base, tokenizer, rows, mode="llm",
                            vectors_of=lambda prompts: torch.stack([by_text[p] for p in prompts]))
    return llm_parameters(adapted, llm), {"mode": report.mode, "sibling": report.siblings.get(llm),
                                          "prior": report.prior, "refit_seconds": report.seconds,
                                          "skipped_rows": skipped}


_WORKER: dict = {}


def _worker_init(path: str) -> None:
    """The refit process: below the server in CPU priority, one torch thread, the starting export loaded once."""
    try:
        os.nice(10)
    except OSError:
        pass
    torch.set_num_threads(1)
    from lenpred.hub import load_export

    _WORKER["base"], _WORKER["tokenizer"] = load_export(path)


def _fit_in_worker(records, vectors, llm):
    return fit_llm(_WORKER["base"], _WORKER["tokenizer"], records, vectors, llm)


def _read_log(path: str) -> list[dict]:
    """The log's records a refit can learn from (one answer, a prompt, a model), in order; other lines skipped and
    counted in the log."""
    out, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                bad += bool(line.strip())
                continue
            if (isinstance(r, dict) and isinstance(r.get("prompt_text"), str) and r["prompt_text"].strip()
                    and isinstance(r.get("model"), str) and isinstance(r.get("output_sizes"), list)):
                out.append(r)
            else:
                bad += 1
    if bad:
        logger.warning("%s: %d line(s) skipped on restoring the learner (unparsable or not a single answer)", path,
                       bad)
    return out
