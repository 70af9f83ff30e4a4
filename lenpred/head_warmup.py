"""Linear probing before fine-tuning (LP-FT): fit a fresh model's heads on its frozen encoder's pooled states first.

A fine-tune that starts with random heads spends its first steps pushing their errors back into the warm-started
encoder, distorting the features it came with; heads fitted first on what the encoder already says leave it a
signal to refine instead (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022). The encoder runs once over the training prompts; the heads' epochs take seconds.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["warm_up_heads"]

logger = logging.getLogger(__name__)


def warm_up_heads(model, dataset, collator, epochs: float, lr: float, seed: int,
                  batch_size: int = 16) -> None:
    """Fit every non-encoder weight of a `LenPredModel` on its frozen encoder's pooled states of `dataset` (encoded
    once, batches of 64 through `collator`): `epochs` passes of AdamW at `lr` in random batches of `batch_size`."""
    keys = [k for k in ("labels_mean", "labels_std", "labels_mean_floor", "label_weight") if k in dataset.column_names]
    loader = DataLoader(dataset.remove_columns([c for c in ("length",) if c in dataset.column_names]),
                        batch_size=64, collate_fn=collator)
    pooled, n_tokens, labels = [], [], {k: [] for k in keys}
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="head warm-up: pooling"):
            pooled.append(model.pool(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")))
            full = batch.get("prompt_length")
            n_tokens.append(full if full is not None and model.config.full_prompt_length
                            else batch["attention_mask"].sum(-1))
            for k in keys:
                labels[k].append(batch[k])
    pooled, n_tokens = torch.cat(pooled), torch.cat(n_tokens)
    labels = {k: torch.cat(v) for k, v in labels.items()}
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    optimizer = torch.optim.AdamW(heads, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    steps = int(round(epochs * -(-len(pooled) // batch_size)))
    ids = torch.arange(model.config.num_llms).expand(batch_size, -1)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in tqdm(range(steps), desc="head warm-up: fitting"):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(pooled), generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        bin_logits, log_mean, log_std = model.heads(model.prompt_vector(pooled[idx], n_tokens[idx]), ids[:len(idx)])
        loss = model.loss(bin_logits, log_mean, log_std, labels["labels_mean"][idx], labels["labels_std"][idx],
                          log_mean.shape, labels["label_weight"][idx] if "label_weight" in labels else None,
                          labels["labels_mean_floor"][idx] if "labels_mean_floor" in labels else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logger.info("head warm-up: %d steps on %d prompts' pooled states, last loss %.4f", steps, len(pooled), loss.item())
