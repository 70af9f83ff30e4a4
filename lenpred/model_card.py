"""Render the model card (`model_card.md`, a template) from `report.json`, so no figure is ever typed by hand.

Placeholders are `{{ name }}`; an unknown one is an error, so the template and this file cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lenpred.data import PAPER_LLMS
from lenpred.report import ALL_LLMS, PAPER_CITATION, render_subset

__all__ = ["TEMPLATE", "model_index", "card_values", "render_card", "write_cards", "MODEL_INDEX_DIGITS"]

TEMPLATE = Path(__file__).resolve().parents[1] / "model_card.md"
#: Decimals the model-index keeps (accuracy/F1 as fractions, MAE in tokens).
MODEL_INDEX_DIGITS = {"accuracy": 4, "f1": 4, "mae": 2}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DATASET_NAMES = {"in_distribution": "CASTILLO test split, six training prompt sets",
                  "alpaca": "CASTILLO test split, Alpaca (held out)"}


class _NoAliasDumper(yaml.SafeDumper):
    """Repeated dicts are written out in full: the Hub's card parser does not need YAML anchors."""

    def ignore_aliases(self, data):
        return True


def _hub_id() -> str:
    try:
        from pipeline_lenpred import HUB_MODEL_ID
    except ImportError:
        return "lenpred/lenpred-minilm-castillo"
    return HUB_MODEL_ID


def _metric(kind: str, value, name: str) -> dict | None:
    if value is None:
        return None
    key = "mae" if kind.startswith("mae") else kind
    return {"type": key, "value": round(float(value), MODEL_INDEX_DIGITS[key]), "name": name}


def model_index(report: dict, name: str | None = None) -> list[dict]:
    """The Hub's `model-index`: LenPred's measured scores per subset, for the paper's Llamas and all LLMs pooled
    (values from report.json; every LLM's full tables are in the card's body)."""
    meta = report["meta"]
    size = meta["head_bin_size"] or meta["trained_bin_size"]
    results = []
    for subset, per in report["results"].items():
        dataset = {"type": "danfperam/castillo", "name": _DATASET_NAMES[subset], "config": "original",
                   "split": "test"}
        cls, reg = [], []
        for llm, entry in per.items():
            sc = entry.get("lenpred")
            if not sc or llm not in (*PAPER_LLMS, ALL_LLMS):
                continue
            who = "all LLMs" if llm == ALL_LLMS else llm
            c = sc["classification"][str(size)]
            cls += [_metric("accuracy", c["accuracy"], f"accuracy @ {size}-token bins, {who}"),
                    _metric("f1", c["f1"], f"weighted F1 @ {size}-token bins, {who}")]
            reg += [_metric("mae_mean", sc["regression"]["mae_mean"], f"MAE of mean length (tokens), {who}"),
                    _metric("mae_std", sc["regression"]["mae_std"], f"MAE of length std (tokens), {who}")]
        for task, metrics in ((f"Response-length bin classification ({size} tokens per bin)", cls),
                              ("Response-length regression (mean and std)", reg)):
            metrics = [m for m in metrics if m]
            if metrics:
                results.append({"task": {"type": "text-classification", "name": task}, "dataset": dataset,
                                "metrics": metrics})
    return [{"name": name or _hub_id().split("/")[-1], "results": results}]


def _training_text(training: dict) -> str:
    if not training:
        return "No `trainer_state.json` was found in the export, so no training statistics are shown here."
    labels = {"global_step": "optimizer steps", "epochs": "epochs", "train_batch_size": "batch size (prompts)",
              "peak_learning_rate": "peak learning rate", "final_train_loss": "final training loss",
              "final_eval_loss": "final eval loss", "best_metric": "best eval metric"}
    return "\n".join(f"- {label}: {training[k]:.4g}" if isinstance(training[k], float) else f"- {label}: {training[k]}"
                     for k, label in labels.items() if training.get(k) is not None)


def _truncation_text(cfg: dict) -> str:
    n, tail = cfg.get("max_length"), cfg.get("prompt_tail_tokens") or 0
    if n is None:
        return ""
    text = f"Prompts longer than {n} encoder tokens are cut to " + (
        f"their first {n - tail} and last {tail} tokens." if tail else f"their first {n}.")
    if cfg.get("use_prompt_length"):
        text += (" The log of the prompt's length in encoder tokens is an input too, counted "
                 + ("before the cut." if cfg.get("full_prompt_length") else "after the cut."))
    return text


def card_values(report: dict) -> dict[str, str]:
    """Every placeholder's text, computed from the report dict."""
    meta, cfg = report["meta"], report.get("model_config", {})
    llms = meta["llms"]
    tables = [render_subset(report, name, level=3, extra=False) for name, per in report["results"].items() if per]
    return {
        "model_index": yaml.dump({"model-index": model_index(report)}, Dumper=_NoAliasDumper, sort_keys=False,
                                 allow_unicode=True, width=1000).rstrip(),
        "report_date": meta["date"], "n_llms": str(len(cfg.get("llm_names", llms))),
        "bin_size": str(meta["trained_bin_size"]), "reservation_quantile": f"{meta['reservation_quantile']:g}",
        "encoder_layers": str(cfg.get("encoder_layers")), "encoder_hidden_size": str(cfg.get("encoder_hidden_size")),
        "end_dim": str(cfg.get("end_dim")), "max_length": str(cfg.get("max_length")),
        "truncation": _truncation_text(cfg),
        "bound_calibration": ("calibrated per LLM to cover that share of held-out answers: split-conformal "
                              "offsets fitted on the dev split")
                             if f"{meta['reservation_quantile']:g}" in (cfg.get("bound_offsets") or {})
                             else "from the log-normal of the predicted mean and std, uncalibrated",
        "paper_citation": PAPER_CITATION.rsplit(",", 1)[0],
        "llm_list": ", ".join(f"`{m}`" for m in cfg.get("llm_names", llms)),
        "hub_id": _hub_id(), "example_llm": llms[0] if llms else "",
        "pool_rows": f"{meta['pool_rows']:,}", "pool_prompts": f"{meta['pool_prompts']:,}",
        "test_rows": f"{meta['test_rows']:,}", "test_prompts": f"{meta['test_prompts']:,}",
        "training_summary": _training_text(report.get("training") or {}),
        "notes": "\n".join(f"- {n}" for n in meta["notes"]),
        "evaluation_tables": "\n".join(tables).strip(),
    }


def render_card(report: dict, template: str | Path = TEMPLATE) -> str:
    """The card's text: the template with every `{{ placeholder }}` filled; unknown placeholders raise KeyError."""
    text = Path(template).read_text(encoding="utf-8")
    values = card_values(report)
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for placeholder(s) {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def write_cards(report: dict, *paths: str | Path | None, template: str | Path = TEMPLATE) -> list[Path]:
    """Write the rendered card to each path (None skipped); returns the paths written."""
    text, written = render_card(report, template), []
    for p in paths:
        if p is not None:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            Path(p).write_text(text, encoding="utf-8")
            written.append(Path(p))
    return written
