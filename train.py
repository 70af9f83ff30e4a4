"""Train LenPred on CASTILLO (or your own serving logs) with the HF Trainer, then export a Hub-ready folder.

    python train.py                                   # defaults: MiniLM, all 12 LLMs, shipped CASTILLO copy
    accelerate launch train.py --num_train_epochs 3   # multi-GPU / multi-node, unchanged
    python train.py --dataset logs.jsonl --init_from outputs/lenpred-minilm   # add an LLM from a few examples

One example is one prompt with labels for every LLM that answered it: one encoder pass trains all LLMs at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import (AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, Trainer, TrainingArguments,
                          set_seed)

from configuration_lenpred import LenPredConfig
from lenpred.adaptation import ADAPT_MODES, adapt, choose_siblings
from lenpred.calibration import QUANTILES, fit_bound_offsets
from lenpred.data import PAPER_LLMS, default_dataset_source, load_castillo, make_splits
from lenpred.examples import group_by_prompt, label_weights
from lenpred.hub import default_encoder_path, export_model, load_export, weights_sha256
from lenpred.metrics import length_prediction_scores
from modeling_lenpred import LenPredModel
from prediction_lenpred import tokenize_prompts

logger = logging.getLogger("lenpred.train")


@dataclass
class ModelArguments:
    encoder: str = field(default_factory=default_encoder_path,
                         metadata={"help": "BERT-family encoder to warm-start from: path or Hub id (default: MiniLM)"})
    init_from: str | None = field(default=None, metadata={
        "aliases": ["--init-from"],
        "help": "continue from a LenPred export, teaching it the LLMs of --dataset (see --adapt)"})
    adapt: str = field(default="llm", metadata={
        "help": "with --init_from: 'llm' (default) learns only the logged LLMs' own embedding rows, the rest frozen, "
                "so every other LLM's predictions stay bitwise the same (seconds; it sets the LLM's scale from a few "
                "hundred to a few thousand logged prompts and keeps its sibling's ranking: docs/adaptation.md); 'sibling' adds a new LLM as the known LLM that fits its log "
                "best, with no training; 'full' fine-tunes every weight on the logs beside a replay of the "
                "original training pool (--replay), for large logs (slow: an epoch over the pool)"})
    heads: str = field(default="both", metadata={"help": "which heads to train: both | classification | regression"})
    bin_size: int = field(default=500, metadata={"help": "tokens per bin of the bin head (50/100/200/500/1000)"})
    encoder_layers: int | None = field(default=None, metadata={
        "help": "keep only the encoder's first N layers (e.g. 3 of MiniLM's 6: about half the latency)"})
    end_dim: int = field(default=256, metadata={"help": "size the prompt vector is reduced to (paper: end dimension)"})
    head_hidden_dim: int = 256
    llm_embedding_dim: int = 32
    dropout: float = 0.1
    attention_dropout: float = field(default=0.0, metadata={
        "help": "dropout on the encoder's attention probabilities (MiniLM's own: 0.1). 0 lets PyTorch run its fused "
                "attention kernel: a training step about 1.7x faster on 2 CPU cores, dev metrics within noise"})
    max_length: int = field(default=192, metadata={"help": "prompts are truncated to this many encoder tokens"})
    prompt_tail_tokens: int | None = field(default=None, metadata={
        "help": "of a prompt longer than max_length, keep its last N tokens after the head (0: the head only; "
                "default: half of max_length)"})
    full_prompt_length: bool = field(default=True, metadata={
        "help": "the length feature counts the prompt's tokens before truncation (else those the encoder sees)"})
    reservation_quantile: float = field(default=0.9, metadata={
        "help": "quantile of one answer's length the bound reserves; calibrated on the dev split at the end"})
    head_learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the heads (encoder: --learning_rate)"})
    keep_best: bool = field(default=True, metadata={
        "help": "export the checkpoint with the lowest dev MAE of the mean (when eval and save strategies match)"})


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={
        "help": "CASTILLO folder or Hub id (default: ../shared/data/castillo if present, else danfperam/castillo), "
                "or comma-separated parquet/JSONL/CSV log files with prompt_text, model, output_sizes|output_mean"})
    llms: str | None = field(default=None, metadata={
        "help": "comma-separated LLM ids to train for (default: all in the data; 'paper' = the three Llamas)"})
    dev_fraction: float = 0.1
    split_seed: int | None = field(default=None, metadata={
        "help": "seed of the dev split (default: --seed); fix it to compare training seeds on the same dev prompts"})
    llm_loss_weights: str | None = field(default="paper=3", metadata={
        "help": "comma-separated LLM=WEIGHT: how much each LLM's labels count in the loss (LLM: an id, or 'paper' "
                "for those of the three Llamas that are trained; LLMs not named weigh 1; '' = all weigh 1)"})
    replay: str | None = field(default=None, metadata={
        "help": "with --adapt full: CASTILLO folder or Hub id whose training pool is replayed beside the logs, so "
                "the other LLMs keep learning what they knew (default: the shipped copy; 'none': the logs alone)"})
    max_train_prompts: int | None = field(default=None, metadata={"help": "use only this many training prompts"})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "use only this many dev/test prompts"})
    export_dir: str = field(default="outputs/lenpred-minilm", metadata={"help": "where the Hub-ready folder goes"})


DEFAULTS = dict(output_dir="runs/lenpred", num_train_epochs=5, learning_rate=1e-4, warmup_steps=0.06,
                per_device_train_batch_size=16, per_device_eval_batch_size=64, weight_decay=0.01,
                eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, logging_steps=25,
                train_sampling_strategy="random", seed=42, dataloader_drop_last=False)


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), description=__doc__)
    parser.set_defaults(**DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def resolve_llms(spec: str | None, rows) -> list[str]:
    present = sorted(rows["llm"].unique())
    if not spec:
        return present
    wanted = list(PAPER_LLMS) if spec == "paper" else [s.strip() for s in spec.split(",") if s.strip()]
    missing = [w for w in wanted if w not in present]
    if missing:
        raise ValueError(f"--llms names LLMs absent from the data: {missing}. Present: {present}")
    return wanted


def split_seed(dargs: DataArguments, targs: TrainingArguments) -> int:
    return targs.seed if dargs.split_seed is None else dargs.split_seed


def build_model(margs: ModelArguments, llm_names: list[str], train_rows) -> LenPredModel:
    """A fresh model warm-started from the encoder, or an export extended with any LLMs new to it."""
    weights = {"both": (1.0, 1.0, 0.5), "classification": (1.0, 0.0, 0.0), "regression": (0.0, 1.0, 0.5)}
    if margs.heads not in weights:
        raise ValueError(f"--heads must be one of {list(weights)}, got {margs.heads!r}")
    bin_w, mean_w, std_w = weights[margs.heads]
    if not 0.0 <= margs.attention_dropout < 1.0:
        raise ValueError(f"--attention_dropout must be in [0, 1), got {margs.attention_dropout}")
    if margs.init_from:
        old, tokenizer = load_export(margs.init_from)
        names = list(old.config.llm_names) + [n for n in llm_names if n not in old.config.llm_names]
        logged = train_rows[train_rows["llm"].isin(names[old.config.num_llms:])]
        siblings = choose_siblings(old, tokenizer, logged)[0] if len(logged) else {}
        encoder_config = {**old.config.encoder_config, "attention_probs_dropout_prob": margs.attention_dropout}
        config = LenPredConfig(**{**old.config.to_dict(), "llm_names": names, "encoder_config": encoder_config,
                                  "bin_loss_weight": bin_w, "mean_loss_weight": mean_w, "std_loss_weight": std_w,
                                  "reservation_quantile": margs.reservation_quantile,
                                  "bound_offsets": None})  # refitted at the end, for every LLM
        model = LenPredModel(config)
        state, table = old.state_dict(), old.state_dict()["llm_embedding.weight"]
        # a new LLM's row starts as the known LLM whose predictions fit its log best (the average, without rows)
        state["llm_embedding.weight"] = torch.cat([table] + [
            table[old.config.llm_index(siblings[n])][None] if n in siblings else table.mean(0, keepdim=True)
            for n in names[old.config.num_llms:]])
        model.load_state_dict(state)
        logger.info("continuing from %s; new LLMs: %s", margs.init_from,
                    {n: f"starts as {siblings.get(n, 'the average')}" for n in names[old.config.num_llms:]} or "none")
        return model
    model = LenPredModel.from_encoder(
        margs.encoder, num_layers=margs.encoder_layers, attention_dropout=margs.attention_dropout,
        llm_names=llm_names, bin_size=margs.bin_size,
        end_dim=margs.end_dim, head_hidden_dim=margs.head_hidden_dim, llm_embedding_dim=margs.llm_embedding_dim,
        dropout=margs.dropout, max_length=margs.max_length,
        prompt_tail_tokens=margs.max_length // 2 if margs.prompt_tail_tokens is None else margs.prompt_tail_tokens,
        full_prompt_length=margs.full_prompt_length, reservation_quantile=margs.reservation_quantile,
        bin_loss_weight=bin_w, mean_loss_weight=mean_w, std_loss_weight=std_w)
    # Start the length head at the data's typical answer instead of ~1 token: fewer steps wasted climbing.
    with torch.no_grad():
        typical = torch.tensor([np.log1p(train_rows["output_mean"]).median(),
                                np.log1p(train_rows["output_std"].dropna()).median()], dtype=torch.float32)
        model.length_head.bias.copy_(typical + torch.log(-torch.expm1(-typical)))  # inverse softplus
    return model


def tokenized(dataset, tokenizer, config: LenPredConfig):
    def encode(batch):
        ids, full = tokenize_prompts(tokenizer, batch["prompt_text"], config)
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "length": [len(i) for i in ids],
                "prompt_length": full}

    keep = {"labels_mean", "labels_std", "labels_mean_floor", "label_weight"}
    return dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep],
                       desc="tokenizing")


def make_compute_metrics(config: LenPredConfig):
    """Trainer metrics over every present ⟨prompt, LLM⟩ label: bin accuracy/F1 at the trained size (the bin head),
    MAE of mean/std, Kendall τ-b within LLM — `length_prediction_scores`, as the report and `evaluate` module."""
    def compute_metrics(eval_pred):
        bin_logits, mean, std = eval_pred.predictions[:3]
        labels_mean, labels_std = eval_pred.label_ids
        present = ~np.isnan(labels_mean)
        llm_of = np.broadcast_to(np.arange(labels_mean.shape[-1]), labels_mean.shape)
        s = length_prediction_scores(labels_mean[present], mean[present], true_std=labels_std[present],
                                     predicted_std=std[present], predicted_bins=bin_logits.argmax(-1)[present],
                                     groups=llm_of[present].tolist(), bin_size=config.bin_size,
                                     max_tokens=config.bin_max_tokens)
        out = {f"bin{config.bin_size}_accuracy": s["accuracy"], f"bin{config.bin_size}_f1": s["f1"],
               "mean_mae": s["mae_mean"], "kendall_tau_b": s["kendall_tau_b"]}
        if s["mae_std"] is not None:
            out["std_mae"] = s["mae_std"]
        return out
    return compute_metrics


class LenPredTrainer(Trainer):
    """Trainer with a separate learning rate for the freshly initialised heads."""

    def __init__(self, *args, head_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.head_learning_rate:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n.startswith("encoder.")]},
                      {"params": [p for n, p in named if not n.startswith("encoder.")], "lr": self.head_learning_rate}]
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return super().create_optimizer(model)


def adapt_export(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments, rows) -> dict:
    """`--adapt llm|sibling`: no Trainer — the logged LLMs' rows fit on prompt vectors encoded once."""
    model, tokenizer = load_export(margs.init_from)
    rows = rows[rows["llm"].isin(resolve_llms(dargs.llms, rows))]
    adapted, report = adapt(model, tokenizer, rows, mode=margs.adapt, seed=targs.seed, progress=True)
    export = export_model(adapted, tokenizer, dargs.export_dir)
    info = {"adaptation": asdict(report), "init_from": margs.init_from, "command": " ".join(sys.argv),
            "seconds": report.seconds}
    (export / "training_info.json").write_text(json.dumps(info, indent=2))
    logger.info("exported %s in %.0f s (%s mode; started as: %s; calibration: %s)", export, report.seconds,
                report.mode, report.siblings or "their own rows", report.calibrated)
    return info


def main(argv=None) -> dict:
    margs, dargs, targs = parse_args(argv)
    logging.basicConfig(level=logging.INFO if targs.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(targs.seed)
    started = time.time()
    if margs.adapt not in ADAPT_MODES:
        raise ValueError(f"--adapt must be one of {list(ADAPT_MODES)}, got {margs.adapt!r}")

    try:
        rows = load_castillo(dargs.dataset)
    except (ValueError, OSError) as err:  # a bad file or folder: one readable line, not a traceback
        raise SystemExit(f"train.py: --dataset {dargs.dataset}: {err}") from None
    if margs.init_from and margs.adapt != "full":
        return adapt_export(margs, dargs, targs, rows)
    if margs.init_from and (dargs.replay or "") != "none":
        replay = load_castillo(dargs.replay or default_dataset_source())
        known = set(LenPredConfig.from_pretrained(margs.init_from).llm_names)
        rows = pd.concat([rows, replay[replay["llm"].isin(known)]], ignore_index=True)
        logger.info("replaying %d rows of the original pool beside the logs", int(replay["llm"].isin(known).sum()))
    llm_names = resolve_llms(dargs.llms, rows)
    splits = make_splits(rows, dev_fraction=dargs.dev_fraction, seed=split_seed(dargs, targs), llms=llm_names)
    logger.info("splits: %s", json.dumps(splits.summary()))
    model = build_model(margs, llm_names, splits.train)
    tokenizer = AutoTokenizer.from_pretrained(margs.init_from or margs.encoder)
    names = model.config.llm_names

    def prepare(frame, limit, weighted=False):
        ds = group_by_prompt(frame, names)
        if limit:
            ds = ds.shuffle(seed=targs.seed).select(range(min(limit, len(ds))))
        weights = label_weights(len(ds), names, dargs.llm_loss_weights) if weighted else None
        if weights is not None:
            ds = ds.add_column("label_weight", weights.tolist())  # one weight per ⟨prompt, LLM⟩ label
        return tokenized(ds, tokenizer, model.config)

    train_ds = prepare(splits.train, dargs.max_train_prompts, weighted=True)
    dev_ds = prepare(splits.dev, dargs.max_eval_prompts) if len(splits.dev) else None
    test_ds = prepare(splits.test, dargs.max_eval_prompts) if len(splits.test) else None
    if dev_ds is None:
        targs.eval_strategy = "no"
    keep_best = margs.keep_best and not targs.load_best_model_at_end
    if keep_best and targs.eval_strategy == targs.save_strategy != "no":
        targs.load_best_model_at_end, targs.metric_for_best_model, targs.greater_is_better = True, "mean_mae", False
    targs.label_names = ["labels_mean", "labels_std"]

    trainer = LenPredTrainer(
        model=model, args=targs, train_dataset=train_ds, eval_dataset=dev_ds, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=make_compute_metrics(model.config),
        head_learning_rate=margs.head_learning_rate,
    )
    result = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_state()
    metrics = {"train": result.metrics}
    for name, ds in (("dev", dev_ds), ("test", test_ds)):
        if ds is not None:
            metrics[name] = trainer.evaluate(ds, metric_key_prefix=name)

    info = {"world_size": targs.world_size, "llm_names": names, "train_prompts": len(train_ds),
            "seconds": round(time.time() - started, 1), "command": " ".join(sys.argv), "splits": splits.summary()}
    if trainer.is_world_process_zero():
        try:  # the dev answers were not trained on: the bound's split-conformal calibration set
            trainer.model.config.bound_offsets = fit_bound_offsets(
                trainer.model, tokenizer, splits.dev, {*QUANTILES, trainer.model.config.reservation_quantile})
        except ValueError as err:  # no dev rows, or logs with a mean per prompt but no single answer's length
            logger.warning("the reservation bound is left uncalibrated: %s", err)
        export = export_model(trainer.model, tokenizer, dargs.export_dir)
        shutil.copy2(Path(targs.output_dir) / "trainer_state.json", export / "trainer_state.json")
        for name, values in metrics.items():
            (export / f"{name}_metrics.json").write_text(json.dumps(values, indent=2))
        info["weights_sha256"] = weights_sha256(export)
        (export / "training_info.json").write_text(json.dumps(info, indent=2))
        logger.info("exported %s in %.0f s; dev: %s", export, info["seconds"], metrics.get("dev"))
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
