"""The fast prediction path and the CPU options agree with the plain forward (tiny random model, seconds).

Timings live in `benchmarks/latency.py`; these tests only check that the paths compute the same thing.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lenpred.fast import AGREEMENT_BAR, OnnxLenPred, agreement, export_onnx, quantize_dynamic_int8

PROMPTS = [
    "Write a long detailed essay about the history of the Roman empire and its fall.",
    "hi",
    "def fib(n):\n    # complete this function\n",
    "Answer briefly: what is the capital of France?",
    "List " + "ten many words " * 30,  # longer than max_length 64: truncated
    "Translate to German: good morning",
    "x",
]


def _spread_heads(model):
    """Random heads give means of ≈ 1 token for every prompt; spread them so the comparisons mean something."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (model.reduce, model.mlp[0], model.mlp[3]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / layer.weight.shape[1] ** 0.5 * 2)
        model.llm_embedding.weight.copy_(torch.randn(model.llm_embedding.weight.shape, generator=gen))
        model.length_head.weight.copy_(torch.randn(model.length_head.weight.shape, generator=gen) * 0.1)
        model.length_head.bias.fill_(4.0)
        model.bin_head.weight.copy_(torch.randn(model.bin_head.weight.shape, generator=gen))
    return model


@pytest.fixture
def model(tiny_model):
    return _spread_heads(tiny_model)


def _naive_row(model, tokenizer, prompt: str, llm: int):
    """What a straightforward implementation does: one forward per ⟨prompt, LLM⟩, padded to max_length."""
    enc = tokenizer([prompt], padding="max_length", truncation=True, max_length=model.config.max_length,
                    return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, llm_ids=torch.tensor([llm]))
    return out.mean[0], out.std[0], out.bin_logits[0].softmax(-1)


def test_fast_path_equals_naive_per_row_forward(model, tokenizer):
    pred = model.predict(PROMPTS, tokenizer, batch_size=3)  # several length-sorted batches
    n_llms, n_bins = model.config.num_llms, model.config.num_bins
    assert pred.mean.shape == (len(PROMPTS), n_llms) and pred.bin_probs.shape == (len(PROMPTS), n_llms, n_bins)
    assert pred.mean.std() > 1.0  # the heads give different means to different rows
    for i, prompt in enumerate(PROMPTS):
        for j in range(n_llms):
            mean, std, probs = _naive_row(model, tokenizer, prompt, j)
            torch.testing.assert_close(pred.mean[i, j], mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pred.std[i, j], std, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pred.bin_probs[i, j], probs, rtol=1e-5, atol=1e-5)


def test_one_encoder_pass_for_all_llms_equals_one_pass_per_llm(model, tokenizer):
    enc = tokenizer(PROMPTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    n = model.config.num_llms
    with torch.no_grad():
        all_at_once = model(**enc)  # llm_ids=None: every LLM from one encoder pass
        for j in range(n):
            one = model(**enc, llm_ids=torch.full((len(PROMPTS),), j))
            torch.testing.assert_close(all_at_once.mean[:, j], one.mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(all_at_once.bin_logits[:, j], one.bin_logits, rtol=1e-5, atol=1e-5)


def test_predict_llm_subset_and_order(model, tokenizer):
    full = model.predict(PROMPTS, tokenizer)
    names = model.config.llm_names
    sub = model.predict(PROMPTS, tokenizer, llms=[names[2], names[0]])
    assert sub.llm_names == [names[2], names[0]]
    torch.testing.assert_close(sub.mean, full.mean[:, [2, 0]])
    torch.testing.assert_close(sub.bin_probs, full.bin_probs[:, [2, 0]])


# -- agreement ----------------------------------------------------------------------------------------------------
def _pred(mean, bins, n_bins=4):
    mean = np.asarray(mean, dtype=float)
    probs = np.full(mean.shape + (n_bins,), 0.1)
    np.put_along_axis(probs, np.asarray(bins)[..., None], 0.7, axis=-1)
    return SimpleNamespace(mean=torch.tensor(mean), std=torch.tensor(mean / 2), bin_probs=torch.tensor(probs))


def test_agreement_math_on_constructed_predictions():
    ref = _pred([[100.0, 200.0], [50.0, 0.5]], [[0, 1], [2, 3]])
    other = _pred([[101.0, 200.0], [50.0, 0.6]], [[0, 1], [2, 0]])
    a = agreement(ref, other)
    # relative differences: 1/100, 0, 0, 0.1/max(0.5, 1 token) = 0.1
    assert a["n"] == 4
    assert a["max_rel_mean"] == pytest.approx(0.1)
    assert a["median_rel_mean"] == pytest.approx(0.005)
    assert a["share_mean_within_2pct"] == pytest.approx(0.75)
    assert a["bin_agreement"] == pytest.approx(0.75)
    assert a["passes"] is False

    same = agreement(ref, ref)
    assert same["max_rel_mean"] == 0 and same["median_rel_mean"] == 0 and same["bin_agreement"] == 1
    assert same["passes"] is True

    # inside the bar: one mean 1.5 % off, all bins equal; outside: every mean 1.5 % off (median > 1 %)
    close = agreement(ref, _pred([[101.5, 200.0], [50.0, 0.5]], [[0, 1], [2, 3]]))
    assert close["max_rel_mean"] == pytest.approx(0.015) and close["passes"] is True
    assert set(AGREEMENT_BAR) <= set(close)
    drift = agreement(ref, _pred([[101.5, 203.0], [50.75, 0.5075]], [[0, 1], [2, 3]]))
    assert drift["median_rel_mean"] == pytest.approx(0.015, rel=0.05) and drift["passes"] is False

    with pytest.raises(ValueError, match="shapes"):
        agreement(ref, _pred([[1.0, 2.0, 3.0]], [[0, 0, 0]]))


# -- torch dynamic int8 -------------------------------------------------------------------------------------------
def test_int8_quantized_predict_runs_with_right_shapes(model, tokenizer):
    q = quantize_dynamic_int8(model)
    linear_types = {type(m).__module__ for m in q.encoder.modules() if "Linear" in type(m).__name__}
    assert any("quantized" in t for t in linear_types)
    assert type(model.encoder.encoder.layer[0].intermediate.dense) is torch.nn.Linear  # the original is untouched
    pred, ref = q.predict(PROMPTS, tokenizer, batch_size=4), model.predict(PROMPTS, tokenizer)
    assert pred.mean.shape == ref.mean.shape and pred.bin_probs.shape == ref.bin_probs.shape
    torch.testing.assert_close(pred.bin_probs.sum(-1), torch.ones_like(pred.mean))
    a = agreement(ref, pred)
    assert a["n"] == len(PROMPTS) * model.config.num_llms
    # int8 arithmetic really ran (the means moved), and within the speed work's agreement bar (fp32 heads)
    assert 0 < a["median_rel_mean"] <= a["max_rel_mean"] <= AGREEMENT_BAR["max_rel_mean"], a
    assert a["passes"], a


def test_int8_from_an_export(model, tokenizer, tmp_path):
    from lenpred.hub import export_model, load_export

    export_model(model, tokenizer, tmp_path / "export")
    loaded, tok = load_export(tmp_path / "export")
    pred = quantize_dynamic_int8(loaded).predict(PROMPTS, tok)
    a = agreement(model.predict(PROMPTS, tokenizer), pred)  # against the fp32 model the export was written from
    assert a["n"] == len(PROMPTS) * model.config.num_llms and a["max_rel_mean"] > 0 and a["passes"], a


# -- ONNX ---------------------------------------------------------------------------------------------------------
_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_MISSING), reason=f"ONNX export/agreement needs {', '.join(_MISSING)} "
                    "(pip install onnx onnxscript onnxruntime)")
def test_onnx_export_and_ort_predictor_agree_with_torch(model, tokenizer, tmp_path):
    model.config.full_prompt_length, model.config.prompt_tail_tokens = True, 8  # PROMPTS[4] is past the cut
    folder = export_onnx(model, tokenizer, tmp_path / "onnx")
    ort_model = OnnxLenPred(folder, threads=1)
    assert ort_model.config.llm_names == model.config.llm_names
    assert [i.name for i in ort_model.session.get_inputs()] == ["input_ids", "attention_mask", "prompt_length"]
    ref = model.predict(PROMPTS, tokenizer)
    for batch_size in (1, 3, 32):  # dynamic batch and sequence axes
        got = ort_model.predict(PROMPTS, batch_size=batch_size)
        assert got.llm_names == ref.llm_names
        torch.testing.assert_close(got.mean, ref.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.std, ref.std, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.bin_probs, ref.bin_probs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.bound, ref.bound, rtol=1e-4, atol=1e-3)
    names = model.config.llm_names
    one = ort_model.predict("Answer briefly: what is the capital of France?", tokenizer, llms=[names[1]])
    torch.testing.assert_close(one.mean[0, 0], ref.mean[3, 1], rtol=1e-4, atol=1e-4)
    assert agreement(ref, ort_model.predict(PROMPTS))["passes"]


@pytest.mark.skipif(bool(_MISSING), reason=f"ONNX export needs {', '.join(_MISSING)}")
def test_onnx_graph_of_a_model_without_the_full_length_feature_has_no_length_input(model, tokenizer, tmp_path):
    """Exports made before `full_prompt_length` (and models without it) keep the two-input graph."""
    ort_model = OnnxLenPred(export_onnx(model, tokenizer, tmp_path / "onnx"), threads=1)
    assert [i.name for i in ort_model.session.get_inputs()] == ["input_ids", "attention_mask"]
    torch.testing.assert_close(ort_model.predict(PROMPTS).mean, model.predict(PROMPTS, tokenizer).mean,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(bool(_MISSING), reason=f"ONNX export needs {', '.join(_MISSING)}")
def test_onnx_graph_is_fused_and_its_int8_keeps_the_heads_fp32(model, tokenizer, tmp_path):
    import onnx

    from lenpred.fast import quantize_onnx_int8

    folder = export_onnx(model, tokenizer, tmp_path / "onnx")
    ops = [n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node]
    layers = model.config.encoder_config["num_hidden_layers"]
    assert ops.count("Attention") == layers and ops.count("SkipLayerNormalization") == 2 * layers
    assert "EmbedLayerNormalization" in ops and ops.count("BiasGelu") == layers
    nodes = onnx.load(str(quantize_onnx_int8(folder, tmp_path / "int8") / "model.onnx")).graph.node
    heads = [n for n in nodes if not n.name.startswith("/encoder/") and n.op_type in ("MatMul", "Gemm")]
    assert heads and {n.op_type for n in nodes} & {"DynamicQuantizeMatMul", "MatMulInteger", "QAttention"}
    int8 = OnnxLenPred(tmp_path / "int8", threads=1).predict(PROMPTS)
    assert 0 < agreement(model.predict(PROMPTS, tokenizer), int8)["median_rel_mean"] < 0.05


@pytest.mark.skipif(bool(_MISSING), reason=f"ONNX export needs {', '.join(_MISSING)}")
def test_built_onnx_files_are_reused_only_for_the_same_weights(model, tokenizer, tmp_path):
    from lenpred.fast import build_option

    build_option("onnx", model, tokenizer, tmp_path)
    graph = tmp_path / "onnx" / "model.onnx"
    built = graph.stat().st_mtime_ns
    build_option("onnx", model, tokenizer, tmp_path)
    assert graph.stat().st_mtime_ns == built  # the same weights: reused
    with torch.no_grad():
        model.length_head.bias.add_(1.0)  # a retrained export: rebuilt, and it predicts as the new weights do
    rebuilt = build_option("onnx", model, tokenizer, tmp_path)
    assert graph.stat().st_mtime_ns != built
    torch.testing.assert_close(rebuilt.predict(PROMPTS).mean, model.predict(PROMPTS, tokenizer).mean,
                               rtol=1e-4, atol=1e-4)


def test_quality_agreement_per_llm_by_hand(model, tokenizer):
    import pandas as pd

    from lenpred.fast import quality_agreement

    ref = model.predict(PROMPTS, tokenizer)
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"prompt_id": str(i), "prompt_text": p, "llm": m, "prompt_set": "Mbpp",
                          "output_sizes": list(s), "output_mean": float(np.mean(s)), "output_std": float(np.std(s))}
                         for i, p in enumerate(PROMPTS) for m in model.config.llm_names
                         for s in [rng.integers(1, 400, size=10)]])
    same = quality_agreement(rows, PROMPTS, ref, ref)
    assert same["passes"] and set(same["per_llm"]) == set(model.config.llm_names)
    assert all(g == 0 for v in same["per_llm"].values() for g in v["gaps"].values())
    scaled = type(ref)(ref.llm_names, ref.mean * 1.3, ref.std, ref.bound * 1.3, ref.bin_probs, ref.bin_edges,
                       ref.reservation_quantile, ref.bound_calibrated)
    moved = quality_agreement(rows, PROMPTS, ref, scaled)
    assert not moved["passes"]
    one = next(iter(moved["per_llm"].values()))
    assert one["gaps"]["mae_rel"] == pytest.approx(one["option"]["mae"] / one["reference"]["mae"] - 1)
    assert one["gaps"]["tau"] == pytest.approx(0.0)  # a common scale keeps the ranking
    with pytest.raises(ValueError, match="LLMs the predictions do not cover: \\['acme/unknown'\\]"):
        quality_agreement(rows.assign(llm="acme/unknown"), PROMPTS, ref, ref)
    with pytest.raises(ValueError, match="1 row\\(s\\) hold prompts that are not among the 7 predicted prompts"):
        quality_agreement(rows.iloc[:1].assign(prompt_text="never predicted"), PROMPTS, ref, ref)
