"""CPU options for the fast prediction path: torch dynamic int8 quantisation, ONNX export with an ONNX Runtime
predictor (fp32 or ORT int8), and the agreement check against the fp32 model.

Every option returns something with the same `predict(prompts, tokenizer, llms=None, batch_size=32,
max_length=None, progress=False)` as `LenPredModel.predict`, returning a `LenPredPrediction`-shaped object, so the
benchmark, the report and the gateway can swap them freely. The bar a CPU option must pass to be used, checked on
the test prompts against fp32 (`agreement`): predicted mean within 2 % (median relative difference ≤ 1 %) and bin
agreement ≥ 99 %.

CLI (agreement of the CPU options with fp32 on the 1,136 CASTILLO test prompts)::

    python -m lenpred.fast --model outputs/lenpred-minilm --check int8 onnx onnx-int8
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from configuration_lenpred import LenPredConfig
from lenpred.inference import CPU_OPTIONS
from prediction_lenpred import LenPredPrediction, predict_in_batches

__all__ = ["quantize_dynamic_int8", "export_onnx", "quantize_onnx_int8", "OnnxLenPred", "agreement",
           "AGREEMENT_BAR", "QUALITY_BAR", "quality_agreement", "CPU_OPTIONS", "SERVING_OPTION", "build_option",
           "onnxruntime_available", "check_agreement"]

#: What a CPU option must reach against fp32 on the test prompts to be used instead of it.
AGREEMENT_BAR = {"max_rel_mean": 0.02, "median_rel_mean": 0.01, "bin_agreement": 0.99}
ONNX_FILE = "model.onnx"
TOKENIZER_DIR = "tokenizer"


# -- torch dynamic int8 -------------------------------------------------------------------------------------------
def quantize_dynamic_int8(model, heads: bool = False):
    """A copy of `model` with the encoder's `nn.Linear` layers (and the heads' when `heads=True`) replaced by
    dynamically quantised int8 ones (weights int8 per tensor, activations quantised per batch at run time).

    Works on a model from `load_export` (remote-code class) as well as on a `LenPredModel`; the copy keeps
    `predict`. The heads are a few 256-wide layers run on 12 rows per prompt: they cost nothing next to the
    encoder, so by default they stay fp32 and add no quantisation error.
    """
    from torch.ao.quantization import quantize_dynamic

    qmodel = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization prints a deprecation warning in torch ≥ 2.10
        if heads:
            quantize_dynamic(qmodel, {nn.Linear}, dtype=torch.qint8, inplace=True)
        else:
            quantize_dynamic(qmodel.encoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return qmodel


# -- ONNX ---------------------------------------------------------------------------------------------------------
def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _AllLLMsGraph(nn.Module):
    """What the ONNX graph computes: encoder + heads for every LLM the model knows, in one pass.

    inputs  input_ids, attention_mask: int64 (batch, seq); and prompt_length: int64 (batch,), the length before
            truncation, only for a model whose length feature counts it (`config.full_prompt_length`)
    outputs bin_probs (batch, n_llms, num_bins), mean (batch, n_llms), std (batch, n_llms) — float32, tokens.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("llm_ids", torch.arange(model.config.num_llms, dtype=torch.long).unsqueeze(0),
                             persistent=False)
        # exports made before `full_prompt_length` existed carry remote code whose `encode` has no such argument
        self.takes_prompt_length = bool(getattr(model.config, "full_prompt_length", False))

    def forward(self, input_ids, attention_mask, prompt_length=None):
        extra = {"prompt_length": prompt_length} if self.takes_prompt_length else {}
        vector = self.model.encode(input_ids, attention_mask, **extra)
        ids = self.llm_ids.expand(input_ids.shape[0], -1)
        logits, log_mean, log_std = self.model.heads(vector, ids)
        # exp − 1, not expm1 (which the TorchScript exporter lacks): log_mean ≥ 0 here, where the two agree to
        # float32 rounding
        return logits.softmax(-1), torch.exp(log_mean) - 1, torch.exp(log_std) - 1


def export_onnx(model, tokenizer, path: str | Path, opset: int = 17) -> Path:
    """Export `model` (encoder + heads for all its LLMs, dynamic batch and sequence axes) to `path/model.onnx` as
    ONNX Runtime's fused transformer graph, with the model's config and the tokenizer (`path/tokenizer/`) so that
    `OnnxLenPred(path)` needs nothing else. Returns the folder.

    The encoder is traced with eager attention by the TorchScript exporter — the pattern ONNX Runtime's transformer
    optimiser recognises — and then fused: EmbedLayerNormalization, one Attention op per layer, BiasGelu and
    SkipLayerNormalization (docs/speed.md)."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    traced = copy.deepcopy(model).cpu().eval()
    traced.encoder.set_attn_implementation("eager")
    graph = _AllLLMsGraph(traced).eval()
    example = tokenizer(["a first example prompt to trace the graph", "and a second one, a little longer, to have "
                         "two different lengths"], padding=True, return_tensors="pt")
    args, axes = (example["input_ids"], example["attention_mask"]), {
        "input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if graph.takes_prompt_length:
        args, axes["prompt_length"] = (*args, example["attention_mask"].sum(-1) + 300), {0: "batch"}
    raw = out / "model.raw.onnx"
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(raw), input_names=list(axes), output_names=["bin_probs", "mean", "std"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    enc = traced.encoder.config
    fused = optimize_model(str(raw), model_type="bert", num_heads=enc.num_attention_heads,
                           hidden_size=enc.hidden_size, opt_level=0)
    fused.save_model_to_file(str(out / ONNX_FILE))
    raw.unlink()
    model.config.save_pretrained(out)
    # in a subfolder: next to a config.json with an `auto_map`, AutoTokenizer would ask about remote code
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    return out


def quantize_onnx_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of an `export_onnx` folder's encoder into `dst` (config and tokenizer copied
    along): weights int8 per output channel, activations quantised per batch at run time. The heads (12 rows per
    prompt: no time worth saving) stay fp32. Returns `dst`."""
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name, dirs_exist_ok=True)
        elif f.name != ONNX_FILE:
            shutil.copy2(f, dst / f.name)
    nodes = onnx.load(str(src / ONNX_FILE), load_external_data=False).graph.node
    keep = [n.name for n in nodes if n.op_type in ("MatMul", "Gemm") and not n.name.startswith("/encoder/")]
    quantize_dynamic(str(src / ONNX_FILE), str(dst / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=keep,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # the fused ops' outputs
    return dst


class OnnxLenPred:
    """ONNX Runtime predictor for an `export_onnx` folder, with `LenPredModel.predict`'s signature and output.

    `spin=False` lets the intra-op threads sleep between runs instead of spinning: a little slower right after an
    idle gap, but behind the gateway (event loop and engine traffic on the same cores) it cut the CPU per request
    at concurrency 1 from 77 to 23 ms and raised the rate at 64 streams by 13 % (docs/speed.md)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 spin: bool = True):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.config = LenPredConfig.from_pretrained(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path / TOKENIZER_DIR)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not spin:  # idle threads sleep instead of spinning: a server sharing its cores keeps that CPU
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path / ONNX_FILE), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self._inputs = {i.name for i in self.session.get_inputs()}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, prompt_length: np.ndarray | None = None):
        """(bin_probs, mean, std) numpy arrays for every LLM, shape (batch, n_llms[, num_bins]). `prompt_length`:
        the prompts' lengths before truncation (default: the tokens given)."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        full = mask.sum(-1) if prompt_length is None else np.asarray(prompt_length, dtype=np.int64)
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": mask, "prompt_length": full}
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})

    def predict(self, prompts, tokenizer=None, llms=None, batch_size: int = 8, max_length: int | None = None,
                autocast_dtype=None, progress: bool = False) -> LenPredPrediction:
        """As `LenPredModel.predict`: length-sorted batches, dynamic padding, one pass per prompt for all LLMs."""
        def run_batch(input_ids, attention_mask, prompt_length, llm_ids):
            probs, mean, std = self.run(input_ids.numpy(), attention_mask.numpy(), prompt_length.numpy())
            return tuple(torch.from_numpy(out[:, llm_ids]) for out in (probs, mean, std))

        return predict_in_batches(self.config, tokenizer or self.tokenizer, prompts, llms, run_batch, batch_size,
                                  max_length, progress, desc="predict[onnx]")


# -- agreement ----------------------------------------------------------------------------------------------------
def _arr(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def agreement(reference, other, min_tokens: float = 1.0) -> dict:
    """How closely `other` reproduces `reference` (both `predict` outputs, or anything with `.mean` and
    `.bin_probs` of shape (n_prompts, n_llms[, num_bins])).

    Relative difference of the predicted mean: |other − ref| / max(ref, `min_tokens`) (means below one token
    would turn a rounding difference into a huge ratio). Bin agreement: share of ⟨prompt, LLM⟩ cells whose most
    probable bin is the same. `passes` applies the agreement bar (`AGREEMENT_BAR`).
    """
    ref_mean, oth_mean = _arr(reference.mean).astype(np.float64), _arr(other.mean).astype(np.float64)
    if ref_mean.shape != oth_mean.shape:
        raise ValueError(f"predictions have different shapes: {ref_mean.shape} vs {oth_mean.shape}")
    rel = np.abs(oth_mean - ref_mean) / np.maximum(np.abs(ref_mean), min_tokens)
    ref_bins, oth_bins = _arr(reference.bin_probs).argmax(-1), _arr(other.bin_probs).argmax(-1)
    out = {
        "n": int(rel.size),
        "max_rel_mean": float(rel.max()),
        "p99_rel_mean": float(np.quantile(rel, 0.99)),
        "median_rel_mean": float(np.median(rel)),
        "share_mean_within_2pct": float((rel <= AGREEMENT_BAR["max_rel_mean"]).mean()),
        "bin_agreement": float((ref_bins == oth_bins).mean()),
    }
    if getattr(reference, "std", None) is not None and getattr(other, "std", None) is not None:
        ref_std, oth_std = _arr(reference.std).astype(np.float64), _arr(other.std).astype(np.float64)
        out["median_rel_std"] = float(np.median(np.abs(oth_std - ref_std) / np.maximum(np.abs(ref_std), min_tokens)))
    out["passes"] = bool(out["max_rel_mean"] <= AGREEMENT_BAR["max_rel_mean"]
                         and out["median_rel_mean"] <= AGREEMENT_BAR["median_rel_mean"]
                         and out["bin_agreement"] >= AGREEMENT_BAR["bin_agreement"])
    return out


#: What a fast path must keep of fp32's quality for every LLM, on data with sampled answers (docs/speed.md): MAE of
#: the mean within 1 %, Kendall τ-b within 0.005, acc@500 within 0.5 points, bound coverage within 1 point.
QUALITY_BAR = {"mae_rel": 0.01, "tau": 0.005, "acc500_points": 0.5, "coverage_points": 1.0}


def _scores_of(rows, index: dict, pred) -> dict:
    from lenpred.report import score_method

    p = np.array([index[t] for t in rows["prompt_text"]])
    j = np.array([pred.llm_names.index(m) for m in rows["llm"]])
    scored = score_method(rows.assign(pred_mean=_arr(pred.mean)[p, j], pred_std=_arr(pred.std)[p, j],
                                      pred_bound=_arr(pred.bound)[p, j]), "pred", bin_sizes=(500,))
    return {"mae": scored["regression"]["mae_mean"], "tau": scored["kendall_tau_b"],
            "acc500": 100 * scored["classification"]["500"]["accuracy_mean_bin"],
            "coverage": 100 * scored["bound_coverage"]}


def quality_agreement(rows, prompts: Sequence[str], reference, other) -> dict:
    """What a scheduler sees of `other` against `reference` (`predict` outputs over `prompts`, every LLM), per LLM
    of `rows` (⟨prompt, LLM⟩ rows with their sampled answers): MAE, τ, acc@500 and bound coverage of each, the
    gaps, and whether every gap is within `QUALITY_BAR`."""
    index = {}
    for i, text in enumerate(prompts):
        index.setdefault(text, i)
    for pred in (reference, other):
        unknown = sorted(set(rows["llm"]) - set(pred.llm_names))
        if unknown:
            raise ValueError(f"rows name LLMs the predictions do not cover: {unknown}; they cover {pred.llm_names}")
    missing = int((~rows["prompt_text"].isin(index)).sum())
    if missing:
        raise ValueError(f"{missing} row(s) hold prompts that are not among the {len(index)} predicted prompts")
    per_llm = {}
    for llm, part in rows.groupby("llm", sort=False):
        ref, got = _scores_of(part, index, reference), _scores_of(part, index, other)
        gaps = {"mae_rel": got["mae"] / ref["mae"] - 1, "tau": got["tau"] - ref["tau"],
                "acc500_points": got["acc500"] - ref["acc500"], "coverage_points": got["coverage"] - ref["coverage"]}
        per_llm[llm] = {"reference": ref, "option": got, "gaps": gaps,
                        "passes": all(abs(gaps[k]) <= QUALITY_BAR[k] for k in QUALITY_BAR)}
    return {"per_llm": per_llm, "passes": all(v["passes"] for v in per_llm.values()),
            "worst_gaps": {k: max((v["gaps"][k] for v in per_llm.values()), key=abs) for k in QUALITY_BAR}}


#: The CPU option the gateway serves with by default (`--backend auto`), chosen by docs/speed.md's rule.
SERVING_OPTION = "onnx"

#: Bumped whenever `export_onnx` writes a different graph, so that files built before are rebuilt, not reused.
GRAPH_VERSION = "ort-fused-1"


def _fingerprint(model) -> str:
    """What an ONNX folder was built from: the graph version and every weight of `model`."""
    import hashlib

    digest = hashlib.sha256(GRAPH_VERSION.encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_option(name: str, model, tokenizer, workdir: str | Path, threads: int | None = None, spin: bool = True):
    """A predictor for CPU option `name` ("int8", "onnx", "onnx-int8") built from the fp32 `model` (`spin`: as
    `OnnxLenPred`'s)."""
    workdir = Path(workdir)
    if name == "int8":
        return quantize_dynamic_int8(model)
    if name in ("onnx", "onnx-int8"):
        fp32_dir = workdir / "onnx"
        stamp, mark = _fingerprint(model), fp32_dir / "built_from.txt"
        if not (fp32_dir / ONNX_FILE).exists() or not mark.exists() or mark.read_text() != stamp:
            export_onnx(model, tokenizer, fp32_dir)  # none yet, or one of other weights or an older graph
            mark.write_text(stamp)
        if name == "onnx":
            return OnnxLenPred(fp32_dir, threads=threads, spin=spin)
        return OnnxLenPred(quantize_onnx_int8(fp32_dir, workdir / "onnx-int8"), threads=threads, spin=spin)
    raise ValueError(f"unknown CPU option {name!r}; choose from {', '.join(CPU_OPTIONS)}")


def check_agreement(model, tokenizer, prompts: Sequence[str], options: Sequence[str], workdir: str | Path,
                    batch_size: int = 32, threads: int | None = None, reference=None) -> dict:
    """Agreement of each CPU option with the fp32 fast path on `prompts` (all LLMs), plus each one's seconds."""
    results = {}
    if reference is None:
        t = time.perf_counter()
        reference = model.predict(list(prompts), tokenizer, batch_size=batch_size)
        results["fp32"] = {"seconds": time.perf_counter() - t}
    for name in options:
        predictor = build_option(name, model, tokenizer, workdir, threads=threads)
        t = time.perf_counter()
        pred = predictor.predict(list(prompts), tokenizer, batch_size=batch_size)
        results[name] = {"seconds": time.perf_counter() - t, **agreement(reference, pred)}
    return results


def main(argv=None) -> int:
    import os
    import tempfile

    parser = argparse.ArgumentParser(description="Agreement of the CPU options (torch int8, ONNX Runtime fp32/int8) "
                                     "with the fp32 model on the CASTILLO test prompts (all LLMs each).")
    parser.add_argument("--model", required=True, help="a LenPred export folder")
    parser.add_argument("--check", nargs="+", default=list(CPU_OPTIONS), choices=CPU_OPTIONS)
    parser.add_argument("--limit", type=int, help="only the first N test prompts")
    parser.add_argument("--threads", type=int, help="torch / ORT intra-op threads")
    parser.add_argument("--workdir", help="where ONNX files go (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lenpred.data import load_castillo, make_splits, prompt_table

    from transformers import AutoModel, AutoTokenizer

    # as `load_export`, with trust_remote_code for the tokenizer too (no [y/N] prompt about the auto_map)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    prompts = prompt_table(make_splits(load_castillo()).test)["prompt_text"].tolist()[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        results = check_agreement(model, tokenizer, prompts, args.check, args.workdir or tmp, threads=args.threads)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r.get("passes", True) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
