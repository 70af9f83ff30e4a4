"""LenPred inference benchmark: batch-1 latency and batched throughput, naive vs fast path, CPU options.

Prints in one run, at the model's own `config.max_length`:

* batch-1 p50/p99 latency of `predict` for a ~100-token test prompt with predictions for every LLM
  (fp32 fast path; torch dynamic int8; bf16 autocast; ONNX Runtime fp32 and int8 when `onnxruntime` is installed;
  on cuda: fp32 and bf16 / fp16 autocast), tokenisation included — what a caller of `predict` waits for;
* throughput in prompts/s over the 1,136 CASTILLO test prompts:
  NAIVE — one forward per ⟨prompt, LLM⟩ test row, unsorted batches of 32 padded to `max_length`, `torch.no_grad`
  (what a straightforward implementation does); FAST — `model.predict` with all LLMs (length-sorted batches,
  dynamic padding, one encoder pass per prompt); their ratio; and the CPU options through the same `predict`;
* agreement of every option with the fp32 fast path on those prompts (agreement bar: mean within 2 %, median
  relative difference ≤ 1 %, bin agreement ≥ 99 %), and a naive-vs-fast consistency check;
* the machine (CPU model, cores, threads, load average) and the date. `--json OUT` writes the same figures.

The naive path is slow (≈ 13,000 rows padded to max_length), so by default it runs for at most
`--naive-seconds` and its throughput is the measured rate over the rows it covered (`--naive-full` runs all).

    python benchmarks/latency.py --model outputs/lenpred-minilm --json runs/bench/latency.json
    python benchmarks/latency.py --quick            # a MiniLM-shaped model, a short run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from prediction_lenpred import tokenize_prompts  # noqa: E402

GOALS_CPU = {"p50_ms": 10.0, "prompts_per_s": 120.0, "fast_over_naive": 5.0}
GOALS_GPU = {"p50_ms": 2.0, "prompts_per_s": 5000.0, "fast_over_naive": 5.0}


# -- setup --------------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_model(path: str | None, llm_names: list[str]):
    """(model, tokenizer, description): an export, or a MiniLM-shaped LenPred warm-started from the shipped
    all-MiniLM-L6-v2 with the data's LLMs (timings do not depend on trained head weights)."""
    from transformers import AutoModel, AutoTokenizer

    from lenpred.hub import default_encoder_path

    if path and not (Path(path) / "modeling_lenpred.py").exists():  # a Trainer checkpoint: no remote code in it
        from modeling_lenpred import LenPredModel

        return (LenPredModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path),
                f"checkpoint {path}")
    if path:
        # as `lenpred.hub.load_export`, but AutoTokenizer gets trust_remote_code too: the export's config.json has
        # an auto_map, and without it AutoTokenizer prints a [y/N] remote-code prompt
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=True), f"export {path}"
    from modeling_lenpred import LenPredModel

    encoder = default_encoder_path()
    model = LenPredModel.from_encoder(encoder, llm_names=llm_names).eval()
    return model, AutoTokenizer.from_pretrained(encoder), f"untrained heads on {encoder} (timing only)"


def load_split(split: str = "test"):
    """(prompts, rows): the unique prompts and the ⟨prompt, LLM⟩ rows of `split` (train.py's split of the shipped
    CASTILLO copy), data order."""
    from lenpred.data import load_castillo, make_splits, prompt_table

    rows = getattr(make_splits(load_castillo()), split)
    return prompt_table(rows)["prompt_text"].tolist(), rows.reset_index(drop=True)


def pick_prompt(prompts: list[str], tokenizer, target: int = 100) -> tuple[str, int]:
    """The test prompt whose token count is closest to `target` (ties: the first)."""
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
    i = min(range(len(prompts)), key=lambda k: abs(lengths[k] - target))
    return prompts[i], lengths[i]


# -- measurements -------------------------------------------------------------------------------------------------
def latency(fn, reps: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "mean_ms": round(statistics.fmean(times), 3), "reps": reps}


def throughput(predictor, prompts, tokenizer, batch_size: int, **kwargs):
    predictor.predict(prompts[:batch_size], tokenizer, batch_size=batch_size, **kwargs)  # warm-up
    t = time.perf_counter()
    pred = predictor.predict(prompts, tokenizer, batch_size=batch_size, **kwargs)
    seconds = time.perf_counter() - t
    return {"prompts_per_s": round(len(prompts) / seconds, 2), "seconds": round(seconds, 2),
            "n_prompts": len(prompts)}, pred


def naive(model, tokenizer, rows, max_length: int, batch_size: int, budget_s: float | None, device: str,
          n_prompts: int) -> tuple[dict, dict]:
    """One forward per ⟨prompt, LLM⟩ row, unsorted batches padded to `max_length`. Returns (figures, outputs of the
    rows covered: {row index: (mean, bin)})."""
    llm_index = {n: i for i, n in enumerate(model.config.llm_names)}
    texts, ids = rows["prompt_text"].tolist(), [llm_index[n] for n in rows["llm"]]
    model.eval()
    out, done = {}, 0
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            seqs, full = tokenize_prompts(tokenizer, texts[s:s + batch_size], model.config, max_length)
            enc = tokenizer.pad({"input_ids": seqs}, padding="max_length", max_length=max_length,
                                return_tensors="pt").to(device)
            res = model(**enc, llm_ids=torch.tensor(ids[s:s + batch_size], device=device),
                        prompt_length=torch.tensor(full, device=device))
            for k, (m, b) in enumerate(zip(res.mean.cpu().tolist(), res.bin_logits.argmax(-1).cpu().tolist())):
                out[s + k] = (m, b)
            done = min(s + batch_size, len(texts))
            if budget_s is not None and time.perf_counter() - start > budget_s and s > 0:
                break
    seconds = time.perf_counter() - start
    rows_per_s = done / seconds
    # prompts/s over the test set: rows/s scaled by the test set's rows per prompt
    return {"prompts_per_s": round(rows_per_s * n_prompts / len(texts), 2), "rows_per_s": round(rows_per_s, 2),
            "rows_done": done, "rows_total": len(texts), "seconds": round(seconds, 2),
            "extrapolated": done < len(texts)}, out


def naive_vs_fast(rows, naive_out: dict, fast_pred, prompts) -> dict:
    """Consistency of the two paths on the rows the naive run covered (same model, fp32)."""
    p_index = {p: i for i, p in enumerate(prompts)}
    l_index = {n: j for j, n in enumerate(fast_pred.llm_names)}
    rel, same = [], []
    for r, (m, b) in naive_out.items():
        i, j = p_index[rows.at[r, "prompt_text"]], l_index[rows.at[r, "llm"]]
        f = float(fast_pred.mean[i, j])
        rel.append(abs(m - f) / max(abs(f), 1.0))
        same.append(int(fast_pred.bin_probs[i, j].argmax()) == b)
    return {"rows": len(rel), "max_rel_mean": float(max(rel)) if rel else None,
            "bin_agreement": float(np.mean(same)) if same else None}


# -- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="a LenPred export (or Trainer checkpoint) folder "
                        "(default: MiniLM-shaped, untrained heads)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch (and ONNX Runtime) intra-op threads")
    parser.add_argument("--quick", action="store_true", help="short run: 128 prompts, 20 latency reps, 10 s naive")
    parser.add_argument("--reps", type=int, help="batch-1 latency repetitions (default 100; quick 20)")
    parser.add_argument("--batch-size", type=int, help="fast-path batch size (default 8 on cpu — the ONNX path's "
                        "own default, reports/benchmarks/latency-batch-sweep.txt — 256 on cuda)")
    parser.add_argument("--batch-sweep", help="also the throughput of every variant at these batch sizes "
                        "(comma-separated), after the main figures")
    parser.add_argument("--naive-seconds", type=float, default=60.0,
                        help="time budget of the naive path; its rate is measured over the rows it covered")
    parser.add_argument("--naive-full", action="store_true", help="run the naive path over every test row")
    parser.add_argument("--options", nargs="*", default=None,
                        help="CPU options to measure (default: int8 bf16 onnx onnx-int8; onnx* need onnxruntime)")
    parser.add_argument("--onnx-dir", help="keep the ONNX exports here (default: a temporary folder)")
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="prompts to time and score: the test split (reporting) or dev (choosing a path)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lenpred.data import HELD_OUT_PROMPT_SET
    from lenpred.fast import agreement, build_option, onnxruntime_available, quality_agreement

    prompts, rows = load_split(args.split)
    model, tokenizer, described = load_model(args.model, sorted(rows["llm"].unique()))
    model.to(args.device).eval()
    rows = rows[rows["llm"].isin(model.config.llm_names)].reset_index(drop=True)  # a model may know fewer LLMs
    max_length = model.config.max_length
    n_llms = model.config.num_llms
    reps = args.reps or (20 if args.quick else 100)
    batch_size = args.batch_size or (256 if args.device == "cuda" else 8)
    if args.quick:
        prompts = prompts[:128]
        rows = rows[rows["prompt_text"].isin(set(prompts))].reset_index(drop=True)
    budget = None if args.naive_full else (min(args.naive_seconds, 10.0) if args.quick else args.naive_seconds)
    one, one_tokens = pick_prompt(prompts, tokenizer)

    info = machine_info(args.device)
    result = {"machine": info, "model": described, "max_length": max_length, "n_llms": n_llms,
              "batch_size": batch_size, "latency_prompt_tokens": one_tokens, "n_prompts": len(prompts),
              "n_rows": len(rows), "split": args.split, "latency": {}, "throughput": {}, "agreement": {},
              "quality": {}}
    print(f"LenPred inference benchmark — {info['date_utc']}")
    print(f"machine: {info['cpu']} | {info['cpus_usable']} usable cores | torch {info['torch']} with "
          f"{info['torch_threads']} threads | load avg {info['loadavg_1m_at_start']}"
          + (f" | GPU {info['gpu']}" if args.device == "cuda" else "")
          + (f" | onnxruntime {info['onnxruntime']}" if info["onnxruntime"] else ""))
    print(f"model: {described}; max_length {max_length}; {n_llms} LLMs per prompt; device {args.device}")
    print(f"{args.split} set: {len(prompts)} prompts, {len(rows)} ⟨prompt, LLM⟩ rows; batch-1 prompt: {one_tokens} "
          "tokens\n")

    # variants: name -> (predictor, predict kwargs)
    variants = {"fp32": (model, {})}
    if args.device == "cuda":
        variants["bf16-autocast"] = (model, {"autocast_dtype": torch.bfloat16})
        variants["fp16-autocast"] = (model, {"autocast_dtype": torch.float16})
        options = []
    else:
        options = args.options if args.options is not None else ["int8", "bf16", "onnx", "onnx-int8"]
    tmp = tempfile.TemporaryDirectory()
    workdir = Path(args.onnx_dir or tmp.name)
    for name in options:
        if name == "bf16":  # CPU autocast: oneDNN bf16 kernels where the CPU has AVX512-BF16 / AMX
            variants["bf16-autocast"] = (model, {"autocast_dtype": torch.bfloat16})
            continue
        if name.startswith("onnx") and not onnxruntime_available():
            print(f"[skip] {name}: onnxruntime is not installed (pip install onnx onnxscript onnxruntime)")
            continue
        t = time.perf_counter()
        try:
            variants[name] = (build_option(name, model, tokenizer, workdir, threads=torch.get_num_threads()), {})
        except Exception as err:  # one failing option must not sink the benchmark
            print(f"[skip] {name}: {type(err).__name__}: {err}")
            continue
        result.setdefault("build_seconds", {})[name] = round(time.perf_counter() - t, 1)

    print(f"batch-1 latency, predict() for all {n_llms} LLMs, tokenisation included ({reps} reps):")
    for name, (pred, kw) in variants.items():
        lat = latency(lambda: pred.predict([one], tokenizer, **kw), reps)
        result["latency"][name] = lat
        print(f"  {name:<14} p50 {lat['p50_ms']:8.2f} ms   p99 {lat['p99_ms']:8.2f} ms")

    print(f"\nthroughput over {len(prompts)} {args.split} prompts (all {n_llms} LLMs each):")
    nv, naive_out = naive(model, tokenizer, rows, max_length, 32, budget, args.device, len(prompts))
    result["throughput"]["naive"] = nv
    note = (f"  (rate over {nv['rows_done']}/{nv['rows_total']} rows in {nv['seconds']} s)" if nv["extrapolated"]
            else f"  ({nv['seconds']} s)")
    print(f"  {'naive':<14} {nv['prompts_per_s']:9.2f} prompts/s   {nv['rows_per_s']:8.2f} rows/s{note}")
    preds = {}
    for name, (pred, kw) in variants.items():
        tp, preds[name] = throughput(pred, prompts, tokenizer, batch_size, **kw)
        tp["over_naive"] = round(tp["prompts_per_s"] / nv["prompts_per_s"], 2)
        result["throughput"][name] = tp
        print(f"  {name:<14} {tp['prompts_per_s']:9.2f} prompts/s   {tp['over_naive']:6.2f}× naive   "
              f"({tp['seconds']} s)")
    if args.batch_sweep:
        sizes = [int(b) for b in args.batch_sweep.split(",")]
        print(f"  batch sweep, prompts/s at batch {' / '.join(map(str, sizes))}:")
        for name, (pred, kw) in variants.items():
            got = [throughput(pred, prompts, tokenizer, b, **kw)[0]["prompts_per_s"] for b in sizes]
            result.setdefault("batch_sweep", {})[name] = dict(zip(map(str, sizes), got))
            print(f"    {name:<14} " + " / ".join(f"{g:.1f}" for g in got))
    result["fast_over_naive"] = result["throughput"]["fp32"]["over_naive"]
    print(f"  fast (fp32) / naive = {result['fast_over_naive']:.2f}×")

    result["naive_vs_fast"] = naive_vs_fast(rows, naive_out, preds["fp32"], prompts)
    nf = result["naive_vs_fast"]
    print(f"\nnaive vs fast fp32 on {nf['rows']} rows: max rel. diff of mean {nf['max_rel_mean']:.2e}, "
          f"bin agreement {nf['bin_agreement']:.4f}")
    if len(variants) > 1:
        print("per-prediction deviation from fp32 (beside the quality check below; 'ok': max ≤ 2 %, median ≤ 1 %, "
              "bins ≥ 99 %):")
    for name in variants:
        if name == "fp32":
            continue
        a = agreement(preds["fp32"], preds[name])
        result["agreement"][name] = a
        print(f"  {name:<14} max {a['max_rel_mean'] * 100:6.2f} %  p99 {a['p99_rel_mean'] * 100:6.2f} %  "
              f"median {a['median_rel_mean'] * 100:6.3f} %  within 2 %: {a['share_mean_within_2pct'] * 100:6.2f} %  "
              f"bins {a['bin_agreement'] * 100:6.2f} %  {'ok' if a['passes'] else ''}")
    if not args.model:
        print("  (untrained heads: agreement figures are indicative only — rerun with --model for the real check)")
    else:  # what a scheduler sees: per-LLM quality on the split's sampled answers, Alpaca aside
        in_dist = rows[rows["prompt_set"] != HELD_OUT_PROMPT_SET]
        print(f"\nquality against fp32 per LLM ({args.split} split, in distribution; bar: MAE within 1 %, τ within "
              "0.005, acc@500 within 0.5 points, bound coverage within 1 point):")
        for name in variants:
            if name == "fp32":
                continue
            q = quality_agreement(in_dist, prompts, preds["fp32"], preds[name])
            result["quality"][name] = q
            w = q["worst_gaps"]
            failing = [m.split("/")[-1] for m, v in q["per_llm"].items() if not v["passes"]]
            print(f"  {name:<14} worst gaps: MAE {100 * w['mae_rel']:+.2f} %  τ {w['tau']:+.4f}  acc@500 "
                  f"{w['acc500_points']:+.2f}  coverage {w['coverage_points']:+.2f}  -> "
                  + ("PASS" if q["passes"] else f"FAIL ({', '.join(failing)})"))

    goals = GOALS_GPU if args.device == "cuda" else GOALS_CPU
    # a fast path is eligible when it keeps the quality a scheduler sees (with a trained model), else (timing runs
    # of untrained heads) when its single predictions agree
    ok = ({n: q["passes"] for n, q in result["quality"].items()} if result["quality"] else
          {n: a.get("passes", False) for n, a in result["agreement"].items()}) | {"fp32": True}
    eligible = [n for n in variants if ok.get(n)]
    best_lat = min(eligible, key=lambda n: result["latency"][n]["p50_ms"])
    best_tp = max(eligible, key=lambda n: result["throughput"][n]["prompts_per_s"])
    result["goals"] = {
        "targets": goals,
        "p50_ms": {"best": best_lat, "value": result["latency"][best_lat]["p50_ms"],
                   "met": result["latency"][best_lat]["p50_ms"] <= goals["p50_ms"]},
        "prompts_per_s": {"best": best_tp, "value": result["throughput"][best_tp]["prompts_per_s"],
                          "met": result["throughput"][best_tp]["prompts_per_s"] >= goals["prompts_per_s"]},
        "fast_over_naive": {"value": result["fast_over_naive"],
                            "met": result["fast_over_naive"] >= goals["fast_over_naive"]},
    }
    g = result["goals"]
    print(f"\ngoals ({'GPU' if args.device == 'cuda' else 'CPU'}; among variants that keep fp32's quality):")
    print(f"  batch-1 p50 ≤ {goals['p50_ms']} ms: {g['p50_ms']['value']} ms ({best_lat}) "
          f"-> {'met' if g['p50_ms']['met'] else 'NOT met'}")
    print(f"  throughput ≥ {goals['prompts_per_s']} prompts/s: {g['prompts_per_s']['value']} ({best_tp}) "
          f"-> {'met' if g['prompts_per_s']['met'] else 'NOT met'}")
    print(f"  fast ≥ {goals['fast_over_naive']}× naive: {g['fast_over_naive']['value']}× "
          f"-> {'met' if g['fast_over_naive']['met'] else 'NOT met'}")
    info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
