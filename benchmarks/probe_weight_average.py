"""Would averaging a run's last checkpoints beat its best one? Loads an export, swaps in the uniform average of the
named checkpoints' weights, and scores the dev split per Llama (the report's own scores, as `probe_recipe.py`),
beside the export as trained. No training: it reads the checkpoints `train.py` kept (`--save_total_limit`).

    python benchmarks/probe_weight_average.py --export outputs/lenpred-minilm-seed2 --run runs/lenpred-seed2 \
        --average 1120,1400 840,1120,1400 --json reports/probes/weight-average-seed2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe_recipe import dev_scores  # noqa: E402

from lenpred.data import load_castillo, make_splits  # noqa: E402
from lenpred.hub import load_export  # noqa: E402
from lenpred.inference import predict_rows  # noqa: E402


def average_weights(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """The uniform average of the checkpoints' tensors (all must hold the same names and shapes)."""
    states = [load_file(str(c / "model.safetensors")) for c in checkpoints]
    for c, s in zip(checkpoints[1:], states[1:]):
        if s.keys() != states[0].keys():
            raise SystemExit(f"{c} holds other tensors than {checkpoints[0]}: not checkpoints of one model")
    return {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}


def llama_summary(scores: dict) -> dict:
    llamas = [k for k in scores if k != "all"]
    return {"llama_mean_tau": sum(scores[k]["tau"] for k in llamas) / len(llamas),
            "llama_mean_mae": sum(scores[k]["mae"] for k in llamas) / len(llamas)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="the run's export folder (its weights are the run's best)")
    ap.add_argument("--run", required=True, help="the run's output_dir, holding checkpoint-STEP folders")
    ap.add_argument("--average", nargs="+", required=True, metavar="STEP,STEP[,...]",
                    help="one or more sets of checkpoint steps to average")
    ap.add_argument("--split-seed", type=int, default=42, help="seed train.py carved the dev split with")
    ap.add_argument("--json", help="write the scores here")
    args = ap.parse_args(argv)
    sets = []
    for spec in args.average:
        paths = [Path(args.run, f"checkpoint-{step.strip()}") for step in spec.split(",")]
        absent = [str(p) for p in paths if not (p / "model.safetensors").is_file()]
        if absent or len(paths) < 2:
            raise SystemExit(f"--average {spec}: " + (f"no checkpoint at {', '.join(absent)}" if absent
                                                        else "name two checkpoints or more"))
        sets.append((spec, paths))
    model, tokenizer = load_export(args.export)
    rows = load_castillo(None)
    dev = make_splits(rows, seed=args.split_seed,
                      llms=[n for n in model.config.llm_names if n in set(rows["llm"])]).dev
    result = {"export": args.export, "run": args.run, "dev": {}}
    result["dev"]["export"] = scores = dev_scores(predict_rows(model, tokenizer, dev, progress=False))
    print(f"export: {llama_summary(scores)}", flush=True)
    for spec, paths in sets:
        missing, unexpected = model.load_state_dict(average_weights(paths), strict=False)
        if unexpected or any(not k.startswith("calibration") for k in missing):
            raise SystemExit(f"{spec}: the checkpoints do not fit {args.export} ({missing[:3]} {unexpected[:3]})")
        result["dev"][spec] = scores = dev_scores(predict_rows(model, tokenizer, dev, progress=False))
        print(f"average of {spec}: {llama_summary(scores)}", flush=True)
    result["summary"] = {k: llama_summary(v) for k, v in result["dev"].items()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
