"""How much slower a CPU prediction is after the process sat idle: batch-1 `predict` (a ~100-token test prompt,
one LLM, as the gateway asks at low load) back to back, and after idle gaps of growing length, per backend.

A gateway at low load predicts after an idle gap every time; `benchmarks/gateway_load.py` takes the after-idle time
as the reference for the added time to first token. This shows where that extra time starts and what the thread
settings change.

    python benchmarks/idle_wakeup.py --model outputs/lenpred-minilm --out reports/benchmarks/idle_wakeup
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latency import load_split, pick_prompt  # noqa: E402
from lenpred.fast import build_option  # noqa: E402
from lenpred.hub import load_export  # noqa: E402


def timings(predictor, tokenizer, prompt: str, llm: str, gaps, n: int) -> dict:
    """p50 ms back to back ("0") and after each idle gap (seconds)."""
    for _ in range(10):
        predictor.predict(prompt, tokenizer, llms=[llm])
    out = {}
    for gap in [0.0, *gaps]:
        times = []
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            predictor.predict(prompt, tokenizer, llms=[llm])
            times.append(1000 * (time.perf_counter() - t))
        out[f"{gap:g}"] = round(float(np.median(times)), 2)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a LenPred export")
    ap.add_argument("--gaps", default="0.002,0.01,0.05,0.2,1", help="idle gaps in seconds, comma-separated")
    ap.add_argument("--n", type=int, default=40, help="predictions per gap")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    model, tokenizer = load_export(args.model)
    prompts, _ = load_split("test")
    prompt, tokens = pick_prompt(prompts, tokenizer)
    llm = model.config.llm_names[0]
    result = {"model": args.model, "prompt_tokens": tokens, "n": args.n, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, option, threads, spin in (("torch fp32, 2 threads", "torch", 2, True),
                                            ("onnx, 2 threads, spinning", "onnx", 2, True),
                                            ("onnx, 2 threads, no spinning (the gateway's)", "onnx", 2, False),
                                            ("onnx, 1 thread", "onnx", 1, True)):
            torch.set_num_threads(threads)
            predictor = model if option == "torch" else build_option(option, model, tokenizer, tmp, threads=threads,
                                                                     spin=spin)
            result["backends"][name] = timings(predictor, tokenizer, prompt, llm, gaps, args.n)
            print(name, result["backends"][name], flush=True)
    header = "| backend | " + " | ".join(["back to back", *(f"after {g:g} s idle" for g in gaps)]) + " |"
    lines = [f"# Batch-1 predict after idle ({tokens}-token prompt, one LLM; p50 ms over {args.n})", "",
             f"`python benchmarks/idle_wakeup.py --model {args.model}`", "", header,
             "|" + " --- |" * (len(gaps) + 2)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |"
              for name, row in result["backends"].items()]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=2))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
