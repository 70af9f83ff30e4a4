"""The head warm-up (LP-FT): it fits the heads on the frozen encoder's pooled states and leaves the encoder as it was."""

from __future__ import annotations

import torch


def test_head_warm_up_fits_the_heads_and_leaves_the_encoder(tiny_encoder, castillo_dir, tmp_path):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    import train
    from lenpred.data import load_castillo, make_splits
    from lenpred.examples import group_by_prompt, label_weights
    from lenpred.head_warmup import warm_up_heads

    margs, dargs, _ = train.parse_args(["--encoder", str(tiny_encoder), "--dataset", str(castillo_dir),
                                        "--output_dir", str(tmp_path), "--max_length", "32", "--end_dim", "16",
                                        "--head_hidden_dim", "16", "--llm_embedding_dim", "4"])
    assert margs.head_warmup_epochs == 5  # on by default
    rows = load_castillo(dargs.dataset)
    splits = make_splits(rows, seed=42, llms=train.resolve_llms(None, rows))
    torch.manual_seed(0)
    model = train.build_model(margs, train.resolve_llms(None, rows), splits.train)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    examples = group_by_prompt(splits.train, model.config.llm_names)
    examples = examples.add_column("label_weight", label_weights(
        len(examples), model.config.llm_names, "paper=3").tolist())
    dataset = train.tokenized(examples, tokenizer, model.config)
    collator = DataCollatorWithPadding(tokenizer)

    def training_loss() -> float:
        model.eval()
        with torch.no_grad():
            batch = collator([dataset[i] for i in range(len(dataset))])
            return model(**{k: v for k, v in batch.items() if k != "length"}).loss.item()

    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    before = training_loss()
    warm_up_heads(model, dataset, collator, epochs=30, lr=1e-2, seed=0)
    after = training_loss()
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    changed = [k for k, v in heads.items() if not torch.equal(v, model.state_dict()[k])]
    assert {"reduce.weight", "mlp.0.weight", "length_head.weight", "bin_head.weight", "llm_embedding.weight"} <= set(
        changed)
