"""The gateway learning the LLM it serves, while it serves it (`lenpred gateway --learn`), on a real vLLM.

    bash benchmarks/serving/setup.sh      # once: vLLM's CPU build and SmolLM2-135M-Instruct
    python benchmarks/serving/online.py --model outputs/lenpred-minilm --out reports/serving/online

SmolLM2-135M-Instruct is an LLM the export does not know. Per seed, a fresh learning gateway and `--waves` waves of
`--requests` CASTILLO test prompts (disjoint, at most `--max-prompt-tokens` chat tokens), each wave sent as a
backlog three times, one after another: FCFS (equal priorities) and the oracle (priority = the answer length the
FCFS pass measured; greedy decoding), both through a gateway that predicts nothing and keeps the client's priority
(so every policy pays the same relay), then through the learning gateway (LenPred's priority; it learns from these
answers only, `--learn-every` answers between refits, each refit in its worker process while the wave runs). Per wave: each
policy's mean completion time, LenPred's cut against FCFS and its share of the oracle's cut, the refits so far, and
the prequential scores of the gateway's predictions (made before each answer was known): MAE on answers not cut
short by max_tokens, Kendall τ-b against the served lengths (what the scheduler orders by). At the end, the offline
loop on the same log (`train.py --init-from --adapt llm` on all waves but the last), scored on the last wave's
answers beside the online gateway's predictions for them. Outputs: waves.csv, offline.json, summary.md, the
gateway logs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.serving.adapt import run_adaptation  # noqa: E402
from benchmarks.serving.analysis import run_metrics  # noqa: E402
from benchmarks.serving.client import exactly_once, run_trace  # noqa: E402
from benchmarks.serving.stack import SERVED_NAME, GatewayServer, GatewaySpec, VLLMServer, VLLMSpec  # noqa: E402
from benchmarks.serving.workload import castillo_prompts, make_trace  # noqa: E402


def prequential(rows: list[dict], cap: int) -> dict:
    """MAE of the predicted mean on answers not cut short, Kendall τ-b of the prediction against the served length
    (capped answers tie at the cap), over the log rows that had a prediction."""
    from scipy.stats import kendalltau

    got = [r for r in rows if r.get("predicted_mean") is not None]
    if not got:
        return {"predicted": 0, "mae": None, "tau": None}
    pred = np.array([r["predicted_mean"] for r in got], float)
    served = np.array([r["output_sizes"][0] for r in got], float)
    whole = np.array([(r.get("finish_reasons") or ["stop"])[0] != "length" for r in got])
    tau = kendalltau(pred, np.minimum(served, cap)).statistic if len(got) >= 3 else math.nan
    return {"predicted": len(got), "mae": float(np.abs(pred - served)[whole].mean()) if whole.any() else None,
            "tau": None if np.isnan(tau) else float(tau)}


def read_log(path: Path, start: int) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [json.loads(x) for x in lines[start:] if x.strip()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="LenPred export the gateway starts from")
    ap.add_argument("--out", default="reports/serving/online", help="output folder")
    ap.add_argument("--model-dir", default=".cache/serving/SmolLM2-135M-Instruct", help="the served LLM's folder")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    ap.add_argument("--seeds", default="0", help="comma-separated; each: a fresh gateway and its own prompts")
    ap.add_argument("--waves", type=int, default=6)
    ap.add_argument("--requests", type=int, default=32, help="prompts per wave")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--learn-every", type=int, default=16, help="the gateway's --learn-every and --learn-min-answers")
    ap.add_argument("--dataset", help="CASTILLO source (default: the shipped copy)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = castillo_prompts(args.dataset, split="test", tokenizer=tok, max_prompt_tokens=args.max_prompt_tokens)
    prompts = prompts.drop_duplicates("prompt_text").reset_index(drop=True)
    need = args.waves * args.requests
    rows, offline, t_all = [], {}, time.monotonic()
    spec = VLLMSpec(model_dir=args.model_dir, served_name=SERVED_NAME, python=args.vllm_python,
                    max_num_seqs=args.max_num_seqs)
    with VLLMServer(spec, out / "logs" / "vllm.log") as vllm:
        run_trace(vllm.url, SERVED_NAME, make_trace(prompts.iloc[:1], "fcfs", math.inf, 1.0, 0), args.max_tokens,
                  0.0, 0)  # warm-up
        for seed in seeds:
            draw = prompts.iloc[np.random.default_rng([seed, 21]).permutation(len(prompts))[:need]]
            log = out / "logs" / f"gateway-s{seed}.jsonl"
            log.unlink(missing_ok=True)
            flags = ("--learn", "--learn-every", str(args.learn_every), "--learn-min-answers", str(args.learn_every),
                     "--learn-interval", "0")
            gw_spec = GatewaySpec(export=args.model, upstream=vllm.url, log_path=str(log), extra_args=flags)
            ref_spec = GatewaySpec(export=args.model, upstream=vllm.url, keep_client_priority=True, no_predict=True)
            with GatewayServer(gw_spec, out / "logs" / f"gateway-s{seed}.log") as gw, \
                    GatewayServer(ref_spec, out / "logs" / f"gateway-ref-s{seed}.log") as ref:
                for w in range(args.waves):
                    pool = draw.iloc[w * args.requests:(w + 1) * args.requests]
                    wave = {"seed": seed, "wave": w + 1}
                    info = httpx.get(gw.url + "/llms", timeout=30).json()["llms"].get(SERVED_NAME, {})
                    wave["refits_before"] = info.get("refits", 0)
                    fcfs = run_trace(ref.url, SERVED_NAME, make_trace(pool, "fcfs", math.inf, 1.0, seed),
                                     args.max_tokens, 0.0, seed)
                    reference = fcfs.set_index("prompt_id")[["tokens", "prompt_tokens", "finish_reason"]]
                    oracle = run_trace(ref.url, SERVED_NAME, make_trace(pool, "oracle", math.inf, 1.0, seed,
                                                                         reference), args.max_tokens, 0.0, seed)
                    start = len(read_log(log, 0))
                    trace = make_trace(pool, "lenpred", math.inf, 1.0, seed)
                    lenpred = run_trace(gw.url, SERVED_NAME, trace, args.max_tokens, 0.0, seed)
                    time.sleep(1.0)  # the log's writer thread: the wave's last lines
                    logged = read_log(log, start)
                    check = exactly_once(trace, lenpred, logged)
                    for name, rec in (("fcfs", fcfs), ("oracle", oracle), ("lenpred", lenpred)):
                        wave[f"{name}_mean_completion_s"] = run_metrics(rec)["mean_completion_s"]
                    f, o, lp = (wave[f"{n}_mean_completion_s"] for n in ("fcfs", "oracle", "lenpred"))
                    wave["lenpred_cut"], wave["oracle_cut"] = 1 - lp / f, 1 - o / f
                    wave["share_of_oracle_cut"] = wave["lenpred_cut"] / wave["oracle_cut"] if o < f else None
                    wave["capped_share"] = float((lenpred["finish_reason"] == "length").mean())
                    wave.update({f"prequential_{k}": v for k, v in prequential(logged, args.max_tokens).items()})
                    wave["exactly_once"] = check["ok"]
                    rows.append(wave)
                    print(json.dumps(wave), flush=True)
                    pd.DataFrame(rows).to_csv(out / "waves.csv", index=False)
                final = httpx.get(gw.url + "/llms", timeout=30).json()
            (out / f"llms-s{seed}.json").write_text(json.dumps(final, indent=2))
            offline[seed] = offline_loop(args, log, out, seed)
    summary = {"seconds": round(time.monotonic() - t_all, 1), "offline": offline, "args": vars(args)}
    (out / "offline.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(render(pd.DataFrame(rows), summary))
    return summary


def offline_loop(args, log: Path, out: Path, seed: int) -> dict:
    """`train.py --init-from --adapt llm` on every wave's log lines but the last's, scored on the last wave's
    answers beside the online gateway's own predictions of them (made after learning from the same earlier waves
    and, within the last wave, from its first answers too)."""
    from lenpred.hub import load_export

    lines = read_log(log, 0)
    last = args.requests
    earlier, final = lines[:-last], lines[-last:]
    path = out / "logs" / f"offline-s{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in earlier))
    info = run_adaptation("llm", args.model, str(path), ROOT / ".cache" / "serving" / "work" / f"online-s{seed}")
    result = {"command": info["command"], "seconds": info["seconds"], "online": prequential(final, args.max_tokens)}
    if info["export"]:
        model, tok = load_export(info["export"])
        pred = model.predict([r["prompt_text"] for r in final], tok, llms=[SERVED_NAME]).mean[:, 0].tolist()
        result["offline"] = prequential([{**r, "predicted_mean": p} for r, p in zip(final, pred)], args.max_tokens)
    (out / "logs" / f"adapt-offline-s{seed}.log").write_text(
        (Path(info["export"] or ".").parent / "adapt-llm.log").read_text() if info["export"] else "failed")
    return result


def render(waves: pd.DataFrame, summary: dict) -> str:
    a = summary["args"]
    lines = ["# The gateway learning SmolLM2 while serving it (real vLLM, CPU)", "",
             f"`python benchmarks/serving/online.py --model {a['model']} --out {a['out']} --seeds {a['seeds']} "
             f"--waves {a['waves']} --requests {a['requests']}`; {summary['seconds'] / 60:.0f} min. Each wave: "
             f"{a['requests']} new prompts as a backlog, max_tokens {a['max_tokens']}, under FCFS, the oracle and "
             f"the learning gateway (refit every {a['learn_every']} answers). Cut = 1 − mean completion time / "
             "FCFS's. Prequential: the gateway's predictions made before each answer (MAE on answers not cut "
             "short; τ-b against the served length).", ""]
    cols = ["seed", "wave", "refits_before", "fcfs_mean_completion_s", "oracle_cut", "lenpred_cut",
            "share_of_oracle_cut", "prequential_predicted", "prequential_mae", "prequential_tau", "capped_share",
            "exactly_once"]
    fmt = waves[cols].copy()
    for c in ("fcfs_mean_completion_s", "prequential_mae"):
        fmt[c] = fmt[c].map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    for c in ("oracle_cut", "lenpred_cut", "share_of_oracle_cut", "capped_share"):
        fmt[c] = fmt[c].map(lambda v: "—" if pd.isna(v) else f"{100 * v:.0f} %")
    fmt["prequential_tau"] = fmt["prequential_tau"].map(lambda v: "—" if pd.isna(v) else f"{v:.3f}")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in fmt.itertuples(index=False)]
    lines += ["", "Offline loop on the same log (all waves but the last), scored on the last wave:", ""]
    for seed, o in summary["offline"].items():
        on, off = o["online"], o.get("offline", {})
        lines.append(f"- seed {seed}: online MAE {on['mae']}, τ {on['tau']}; offline `{o['command']}` "
                     f"({o['seconds']} s): MAE {off.get('mae')}, τ {off.get('tau')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
