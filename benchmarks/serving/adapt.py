"""The closed loop's offline half: adapt LenPred to the served LLM from pass 1's gateway log, and score predictions
for that LLM on prompts the log never saw.

Why here and not in the replay: adaptation is `train.py`'s job (`--adapt sibling|llm|full`); this module only calls
it. Scores are `lenpred.metrics`'s, predictions `lenpred.inference.predict_rows`, so the figures mean what the
report's mean.
"""
from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.serving.stack import REPO, repo_path
from lenpred.metrics import classification_scores, kendall_within_sets, regression_scores

__all__ = ["run_adaptation", "quality_table", "zero_shot_choice"]



def run_adaptation(mode: str, base: str, log: str, out_dir: Path, python: str = sys.executable,
                   extra: list[str] | None = None) -> dict:
    """Run one adaptation; return {mode, command, seconds, export (or None), rc}. Its output goes to
    ``out_dir/adapt-MODE.log``, with this machine's repository folder written as a relative path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    export = out_dir / f"export-{mode}"
    cmd = [python, "train.py", "--init-from", base, "--dataset", log, "--export_dir", str(export),
           "--output_dir", str(out_dir / f"run-{mode}"), "--adapt", mode, *(extra or [])]
    info = dict(mode=mode, command=shlex.join([repo_path(cmd[0]), *cmd[1:]]), seconds=None, export=None, rc=None)
    t0 = time.monotonic()
    log_path = out_dir / f"adapt-{mode}.log"
    with open(log_path, "wb") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    # tool output (warnings, transformers' remote-code notice) names absolute paths: keep reports free of them
    log_path.write_text(log_path.read_text(errors="replace").replace(str(REPO) + os.sep, "").replace(str(REPO), "."))
    info.update(seconds=round(time.monotonic() - t0, 1), rc=rc,
                export=str(export) if rc == 0 and (export / "config.json").exists() else None)
    return info


def _predict(export: str, prompts: pd.DataFrame, llms: list[str]) -> pd.DataFrame:
    """Predictions of ``export`` for every (prompt, llm): rows with prompt_id, llm, pred_mean, pred_bin."""
    from lenpred.hub import load_export
    from lenpred.inference import predict_rows

    model, tok = load_export(export)
    rows = pd.concat([prompts.assign(llm=m) for m in llms], ignore_index=True)
    out = predict_rows(model, tok, rows, progress=False)
    return out.assign(bin_size=model.config.bin_size, bin_max_tokens=model.config.bin_max_tokens)


def _scores(true, pred: pd.DataFrame, groups, cap: int | None) -> dict:
    """MAE (predictions clipped at the run's max_tokens: no answer can be longer), Kendall tau within prompt sets
    (raw predictions), acc@500 of the bin head where the model's bins are 500 wide, and acc@50 of the predicted
    mean's bin (under a small max_tokens every answer falls into the first 500-token bin)."""
    t = np.asarray(true, float)
    p = pred["pred_mean"].to_numpy(float)
    pc = np.minimum(p, cap) if cap else p
    size, top = int(pred["bin_size"].iloc[0]), int(pred["bin_max_tokens"].iloc[0])
    acc500 = classification_scores(t, pred["pred_bin"].to_numpy(int), size, top)["accuracy"] if size == 500 \
        else math.nan
    edges50 = 50 * np.arange(int(np.ceil(max(t.max(), pc.max()) / 50)) + 2)
    acc50 = float((np.searchsorted(edges50, t, "right") == np.searchsorted(edges50, pc, "right")).mean())
    return dict(n=int(len(t)), mae=regression_scores(t, pc)["mae"], tau=kendall_within_sets(t, p, groups),
                acc500=acc500, acc50_of_mean=acc50)


def zero_shot_choice(base: str, log_prompts: pd.DataFrame, log_tokens, cap: int | None) -> tuple[str, pd.DataFrame]:
    """The known LLM whose predictions fit pass 1's log best (lowest MAE): the zero-shot stand-in for the new LLM,
    chosen without looking at the unseen prompts. Returns (llm, per-LLM fit table)."""
    from lenpred.hub import load_export

    llms = list(load_export(base)[0].config.llm_names)
    pred = _predict(base, log_prompts, llms)
    fit = []
    for m in llms:
        part = pred[pred["llm"] == m]
        fit.append(dict(llm=m, **_scores(log_tokens, part, log_prompts["prompt_set"], cap)))
    fit = pd.DataFrame(fit).sort_values("mae").reset_index(drop=True)
    return str(fit["llm"].iloc[0]), fit


def quality_table(base: str, exports: dict[str, str], served: str, unseen: pd.DataFrame, log_prompts: pd.DataFrame,
                  log_tokens, cap: int | None) -> dict:
    """Prediction quality for the served LLM on ``unseen`` (prompt_id, prompt_text, prompt_set, tokens):

    - ``zero_shot``: the base model's predictions for the LLM :func:`zero_shot_choice` picks on the log;
    - ``best_known_on_unseen``: the best of all known LLMs on the unseen prompts themselves (a choice no user could
      make; an upper bound for any zero-shot pick);
    - one row per adapted export (its predictions for ``served``).
    """
    choice, fit = zero_shot_choice(base, log_prompts, log_tokens, cap)
    from lenpred.hub import load_export

    llms = list(load_export(base)[0].config.llm_names)
    pred = _predict(base, unseen, llms)
    per_llm = pd.DataFrame([dict(llm=m, **_scores(unseen["tokens"], pred[pred["llm"] == m], unseen["prompt_set"],
                                                  cap)) for m in llms])
    rows = [dict(model="zero_shot", llm=choice, **per_llm.set_index("llm").loc[choice].to_dict())]
    best = per_llm.sort_values("tau", ascending=False).iloc[0]
    rows.append(dict(model="best_known_on_unseen", **best.to_dict()))
    for name, path in exports.items():
        p = _predict(path, unseen, [served])
        rows.append(dict(model=name, llm=served, **_scores(unseen["tokens"], p, unseen["prompt_set"], cap)))
    table = pd.DataFrame(rows)
    return dict(zero_shot_llm=choice, fit_on_log=fit, per_known_llm=per_llm, table=table)
