"""Shared fixtures: a tiny random BERT encoder (with MiniLM's real tokenizer) and a tiny CASTILLO-shaped data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg",
                   "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

LLMS = ["meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct"]
SETS = ["DollyDataset", "Mbpp", "Alpaca"]


def tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from lenpred.hub import default_encoder_path

    return AutoTokenizer.from_pretrained(default_encoder_path())


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, tokenizer) -> Path:
    """A saved random 2-layer BERT plus tokenizer: what `--encoder` takes, in milliseconds."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_encoder")
    BertModel(tiny_bert_config(tokenizer.vocab_size), add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tokenizer):
    import torch

    from configuration_lenpred import LenPredConfig
    from modeling_lenpred import LenPredModel

    torch.manual_seed(0)
    config = LenPredConfig(encoder_config=tiny_bert_config(tokenizer.vocab_size).to_diff_dict(), llm_names=LLMS,
                           end_dim=16, head_hidden_dim=16, llm_embedding_dim=4, max_length=64)
    return LenPredModel(config).eval()


@pytest.fixture
def varied_model(tiny_model):
    """The tiny model with its weights shaken and answer lengths of a few hundred tokens, so every LLM and prompt
    gets different figures."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tiny_model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
        tiny_model.length_head.weight.mul_(torch.tensor([[0.3], [0.03]]))
        tiny_model.length_head.bias.add_(torch.tensor([5.0, 3.5]))
    return tiny_model


def make_castillo_rows(n_prompts: int = 36, seed: int = 0, llms=LLMS, sets=SETS) -> pd.DataFrame:
    """CASTILLO-schema rows: each prompt answered by each LLM with 10 sampled lengths; length depends on the text."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        prompt_set = sets[p % len(sets)]
        long = p % 2 == 0
        text = f"{'Write a long detailed essay about' if long else 'Answer briefly:'} topic {p} of {prompt_set}"
        for j, llm in enumerate(llms):
            sizes = rng.lognormal(np.log(400 if long else 40) + 0.2 * j, 0.3, size=10).astype(int) + 1
            rows.append({"sample_id": f"s{p}-{j}", "prompt_id": f"p{p}", "model": llm, "dataset": prompt_set,
                         "prompt_text": text, "input_size": len(text.split()), "output_sizes": sizes.tolist(),
                         "output_mean": float(sizes.mean()), "output_std": float(sizes.std())})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def castillo_dir(tmp_path_factory) -> Path:
    """A tiny CASTILLO folder: train / validation / test parquet files, disjoint by prompt."""
    path = tmp_path_factory.mktemp("castillo")
    rows = make_castillo_rows(60)
    n = rows["prompt_id"].str[1:].astype(int)
    rows[n < 30].to_parquet(path / "train.parquet")
    rows[(n >= 30) & (n < 45)].to_parquet(path / "validation.parquet")
    rows[n >= 45].to_parquet(path / "test.parquet")
    return path
