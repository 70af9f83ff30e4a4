"""Leave-LLMs-out benchmark of learning a new LLM from its logs (`train.py --init-from EXPORT --adapt ...`).

A model trained without the held-out LLMs (`--held-out-model`) learns each of them from N of its CASTILLO training
prompts with ONE sampled answer each — what a gateway log holds — and is scored on that LLM's test prompts (MAE of
the mean, acc@500 by the bin of the predicted mean, Kendall τ-b within prompt set, coverage of the calibrated 0.9
bound) against: sibling transfer (the known LLM that fits the same N answers best, unchanged), kNN over frozen
MiniLM embeddings fitted on the N answers, and the model trained with the LLM from the start (`--full-model`).
Each N is drawn with several log seeds (mean ± std). The other LLMs are scored before and after: `--adapt llm` must
leave them bitwise unchanged (checked); `--adapt full` (at `--full-n`, one log seed) is a real fine-tune.
A second table teaches the LLM from a log whose answers were cut at `--cap` tokens (finish reason "length"): as
if they were lengths, left out, or as lower bounds (the default).

    # the held-out model: the main job's recipe without the two LLMs (one training, ~ the main job's time)
    python train.py --llms "$(python benchmarks/adapt_new_llm.py --print-llms)" \\
        --output_dir runs/held-out --export_dir outputs/lenpred-held-out
    python benchmarks/adapt_new_llm.py --held-out-model outputs/lenpred-held-out --full-model outputs/lenpred-minilm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lenpred.adaptation import adapt  # noqa: E402
from lenpred.baselines import KnnBaseline, cached_embeddings  # noqa: E402
from lenpred.data import HELD_OUT_PROMPT_SET, load_castillo, make_splits  # noqa: E402
from lenpred.hub import load_export  # noqa: E402
from lenpred.inference import predict_rows  # noqa: E402
from lenpred.report import md_table, score_method  # noqa: E402

HELD_OUT = ("meta-llama/Llama-3.2-3B-Instruct", "google/gemma-3-4b-it")


def scores(rows: pd.DataFrame, method: str = "pred") -> dict:
    s = score_method(rows, method, bin_sizes=(500,))
    return {"mae": s["regression"]["mae_mean"], "acc500": 100 * s["classification"]["500"]["accuracy_mean_bin"],
            "tau": s["kendall_tau_b"], "coverage": None if s["bound_coverage"] is None else 100 * s["bound_coverage"]}


def make_log(pool: pd.DataFrame, n: int, seed: int, cap: int | None = None) -> pd.DataFrame:
    """`n` prompts of `pool` (one LLM's training rows) with one of their sampled answers each, as a gateway logs
    them; with `cap`, answers longer than it are cut there and marked as cut short."""
    if n > len(pool):
        raise SystemExit(f"--n {n}: the LLM has only {len(pool)} training prompts")
    rng = np.random.default_rng(seed)
    picked = pool.iloc[rng.choice(len(pool), size=n, replace=False)].reset_index(drop=True)
    sizes = [int(rng.choice(s)) for s in picked["output_sizes"]]
    capped = [None] * n if cap is None else [[True] if s > cap else None for s in sizes]
    sizes = sizes if cap is None else [min(s, cap) for s in sizes]
    return picked.assign(output_sizes=[[s] for s in sizes], output_mean=[float(s) for s in sizes],
                         output_std=np.nan, output_capped=capped, prompt_set="custom")


def predict(model, tokenizer, rows: pd.DataFrame) -> pd.DataFrame:
    return predict_rows(model, tokenizer, rows, progress=False)


class CachedVectors:
    """The held-out model's prompt vectors, encoded once: its encoder is frozen in every per-LLM mode, so each
    adapted copy predicts and learns from these (`adapt(vectors_of=)`, `predictor`)."""

    def __init__(self, model, tokenizer, texts):
        texts = list(dict.fromkeys(texts))
        self.by_text = dict(zip(texts, model.encode_prompts(texts, tokenizer, progress=True)))

    def __call__(self, prompts) -> torch.Tensor:
        return torch.stack([self.by_text[p] for p in prompts])

    def predictor(self, model):
        """`model`, predicting from the cached vectors (what `predict_rows` calls)."""
        cache = self

        class _Cached:
            config = model.config

            def predict(self, prompts, tokenizer, llms=None, **_):
                return model.predict_vectors(cache(prompts), llms)

        return _Cached()


def ceiling_from_report(path: str, llm: str, n_rows: int) -> dict:
    """The full model's committed test figures for `llm` (`evaluate.py`'s report.json), in `scores`' keys; its
    rows must be the benchmark's."""
    got = json.loads(Path(path).read_text())["results"]["in_distribution"][llm]
    if got["n_rows"] != n_rows:
        raise SystemExit(f"{path}: {llm} has {got['n_rows']} test rows, the benchmark {n_rows}: not the same split")
    s = got["lenpred"]
    return {"mae": s["regression"]["mae_mean"], "acc500": 100 * s["classification"]["500"]["accuracy_mean_bin"],
            "tau": s["kendall_tau_b"], "coverage": 100 * s["bound_coverage"], "source": path}


def knn_rows(log: pd.DataFrame, rows: pd.DataFrame, embeddings: dict) -> pd.DataFrame:
    """kNN (k=16, frozen MiniLM; `embeddings`: prompt text -> vector) fitted on the log's answers; the log holds no
    spread, so no bound."""
    knn = KnnBaseline().fit(log.assign(prompt_id=log["prompt_text"]), embeddings)
    mean, _ = knn.predict(list(rows["llm"]), list(rows["prompt_text"]))
    return rows.assign(pred_mean=mean)


def full_finetune(held_out_model: str, log: pd.DataFrame, epochs: float, lr: float, workdir: Path) -> Path:
    """`train.py --adapt full` on the log beside the replayed pool; returns the export."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "log.jsonl"
    records = [{"prompt_text": t, "model": m, "output_sizes": s} for t, m, s in
               zip(log["prompt_text"], log["llm"], log["output_sizes"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    export = workdir / "export"
    cmd = [sys.executable, str(ROOT / "train.py"), "--init-from", held_out_model, "--dataset", str(path),
           "--adapt", "full", "--num_train_epochs", str(epochs), "--learning_rate", str(lr),
           "--head_learning_rate", str(10 * lr), "--output_dir", str(workdir / "run"),
           "--export_dir", str(export), "--save_strategy", "no", "--eval_strategy", "no"]
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return export


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{np.mean(values):.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def fmt_tau(values) -> str:
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-out-model", help="export trained without the --llms (see above)")
    ap.add_argument("--full-model", help="export trained with them from the start (the main job's): the ceiling")
    ap.add_argument("--full-report", help="instead of --full-model: that model's committed report.json (evaluate.py), "
                    "whose test figures are the ceiling (--split test only)")
    ap.add_argument("--llms", default=",".join(HELD_OUT), help="the held-out LLMs, comma-separated")
    ap.add_argument("--print-llms", action="store_true", help="print the LLMs to train the held-out model on, exit")
    ap.add_argument("--dataset", help="CASTILLO folder or Hub id (default: the shipped copy)")
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="score on the test split (reporting) or the dev split (choosing a method)")
    ap.add_argument("--n", default="50,200,1000,all", help="logged prompts per held-out LLM ('all': its whole pool)")
    ap.add_argument("--log-seeds", default="0,1,2", help="seeds drawing the logged prompts and answers")
    ap.add_argument("--full-n", type=int, default=1000, help="N at which --adapt full also runs (0: never)")
    ap.add_argument("--full-epochs", type=float, default=1.0, help="epochs of --adapt full over logs + replay")
    ap.add_argument("--full-lr", type=float, default=2e-5,
                    help="encoder learning rate of --adapt full (the heads' is 10x): a fifth of training's, so one "
                         "epoch refines the model rather than retraining it")
    ap.add_argument("--cap", type=int, default=300, help="max_tokens of the cut-short log (N = 200)")
    ap.add_argument("--cache-dir", help="kNN embedding cache (default ~/.cache/lenpred)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "adaptation"), help="folder for results.json / .md")
    args = ap.parse_args(argv)
    rows = load_castillo(args.dataset)
    held_out = [s.strip() for s in args.llms.split(",") if s.strip()]
    missing = sorted(set(held_out) - set(rows["llm"]))
    if missing:
        raise SystemExit(f"--llms names LLMs absent from the data: {missing}")
    if args.print_llms:
        print(",".join(n for n in sorted(rows["llm"].unique()) if n not in held_out))
        return {}
    if not args.held_out_model:
        ap.error("--held-out-model is required (see --help for how to train it)")
    if args.full_report and (args.full_model or args.split != "test"):
        ap.error("--full-report stands for --full-model, on the test split")
    base, tokenizer = load_export(args.held_out_model)
    full = load_export(args.full_model)[0] if args.full_model else None
    if set(held_out) & set(base.config.llm_names) or (full and set(held_out) - set(full.config.llm_names)):
        raise SystemExit("--held-out-model must not know the --llms, and --full-model must know them all")
    sizes = [n if n == "all" else int(n) for n in args.n.split(",")]
    seeds = [int(s) for s in args.log_seeds.split(",")]
    known = list(base.config.llm_names)
    # the held-out model's own dev split (train.py, seed 42): the held-out LLMs' dev prompts are those, their
    # training prompts (what the logs are drawn from) the rest of the pool
    dev_ids = set(make_splits(rows, seed=42, llms=known).dev["prompt_id"])
    splits = make_splits(rows, seed=42)
    pool_rows = pd.concat([splits.train, splits.dev], ignore_index=True)
    train_rows = pool_rows[~pool_rows["prompt_id"].isin(dev_ids)]
    evaluated = splits.test if args.split == "test" else pool_rows[pool_rows["prompt_id"].isin(dev_ids)]
    evaluated = evaluated[evaluated["prompt_set"] != HELD_OUT_PROMPT_SET]  # in distribution
    cache = CachedVectors(base, tokenizer, [*train_rows.loc[train_rows["llm"].isin(held_out), "prompt_text"],
                                            *evaluated["prompt_text"]])
    cached = cache.predictor
    others_before = predict(cached(base), tokenizer, evaluated[evaluated["llm"].isin(known)])
    result = {"split": args.split, "held_out_model": args.held_out_model,
              "full_model": args.full_model or args.full_report,
              "others_before": {m: scores(others_before[others_before["llm"] == m]) for m in known}, "llms": {}}
    workdir = Path(tempfile.mkdtemp(prefix="adapt-bench-"))
    for llm in held_out:
        print(f"== {llm}", flush=True)
        pool, target = train_rows[train_rows["llm"] == llm], evaluated[evaluated["llm"] == llm]
        res = {"runs": [], "capped": []}
        if full is not None or args.full_report:
            res["with_it_from_start"] = (scores(predict(full, tokenizer, target)) if full is not None
                                         else ceiling_from_report(args.full_report, llm, len(target)))
        texts = list(dict.fromkeys([*pool["prompt_text"], *target["prompt_text"]]))
        embeddings = dict(zip(texts, cached_embeddings(texts, cache_dir=args.cache_dir)))
        for n in sizes:
            for seed in seeds if n != "all" else seeds[:1]:  # the whole pool: one draw of its answers
                log = make_log(pool, len(pool) if n == "all" else n, seed)
                run = {"n": n, "seed": seed, "prompts": len(log)}
                sibling, rep = adapt(base, tokenizer, log, mode="sibling", vectors_of=cache)
                run["sibling"], run["sibling_name"] = scores(predict(cached(sibling), tokenizer, target)), rep.siblings[llm]
                run["knn"] = scores(knn_rows(log, target, embeddings))
                began = time.time()
                adapted, rep = adapt(base, tokenizer, log, vectors_of=cache)
                run["seconds"], run["prior"] = round(time.time() - began, 1), rep.prior
                run["llm"] = scores(predict(cached(adapted), tokenizer, target))
                after = predict(cached(adapted), tokenizer, others_before[known_cols(others_before)])
                run["others_bitwise_unchanged"] = all(
                    np.array_equal(np.stack(after[c]), np.stack(others_before[c]))
                    for c in ("pred_mean", "pred_std", "pred_bound", "pred_bin_probs"))
                if n == args.full_n and seed == seeds[0]:
                    tuned, _ = load_export(full_finetune(args.held_out_model, log, args.full_epochs, args.full_lr,
                                                         workdir / f"{llm.replace('/', '--')}-{n}"))
                    run["full"] = scores(predict(tuned, tokenizer, target))
                    tuned_others = predict(tuned, tokenizer, evaluated[evaluated["llm"].isin(known)])
                    run["others_after_full"] = {m: scores(tuned_others[tuned_others["llm"] == m]) for m in known}
                res["runs"].append(run)
                print(f"  N={n} seed={seed}: sibling {run['sibling_name']} MAE {run['sibling']['mae']:.1f} "
                      f"tau {run['sibling']['tau']:.3f} | llm MAE {run['llm']['mae']:.1f} tau {run['llm']['tau']:.3f}"
                      f" ({run['seconds']} s) | kNN MAE {run['knn']['mae']:.1f}", flush=True)
        for seed in seeds:  # the cut-short log: three ways to read it
            log = make_log(pool, 200, seed, cap=args.cap)
            cut = log["output_capped"].map(bool)
            ways = {"as lengths": log.assign(output_capped=None), "left out": log[~cut],
                    "lower bounds": log}
            res["capped"].append({"seed": seed, "cut_share": float(cut.mean()), **{
                way: scores(predict(cached(adapt(base, tokenizer, frame, vectors_of=cache)[0]), tokenizer, target))
                for way, frame in ways.items()}})
        result["llms"][llm] = res
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-{args.split}.json").write_text(json.dumps(result, indent=2))
    (out / f"results-{args.split}.md").write_text(render(result, args))
    print(f"wrote {out}/results-{args.split}.json and .md")
    return result


def table_md(header, rows) -> str:
    return md_table(header, [[str(c) for c in r] for r in rows])


def known_cols(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if not c.startswith("pred_")]


METHODS = (("sibling", "sibling transfer"), ("knn", "kNN on the log"), ("llm", "--adapt llm (default)"),
           ("full", "--adapt full"))


def command(args) -> str:
    ceiling = (f" --full-model {args.full_model}" if args.full_model else
               f" --full-report {args.full_report}" if args.full_report else "")
    return (f"python benchmarks/adapt_new_llm.py --held-out-model {args.held_out_model}{ceiling} --split {args.split} "
            f"--n {args.n} --full-n {args.full_n}")


def render(result: dict, args) -> str:
    """The markdown tables, the bar's checks computed from the figures."""
    lines = [f"# Learning a new LLM from its logs ({result['split']} split, in distribution)", "",
             f"`{command(args)}`; N logged prompts with one sampled answer each; mean ± std over log seeds "
             f"{args.log_seeds} (N = all: one draw). MAE in tokens, acc@500 and bound coverage (calibrated 0.9 "
             "bound) in %, τ = Kendall τ-b within prompt set.", ""]
    for llm, res in result["llms"].items():
        lines += [f"## {llm}", ""]
        table = []
        for n in dict.fromkeys(r["n"] for r in res["runs"]):
            runs = [r for r in res["runs"] if r["n"] == n]
            for method, label in METHODS:
                got = [r[method] for r in runs if method in r]
                if got:
                    table.append([f"{n} ({runs[0]['prompts']})" if n == "all" else n, label,
                                  mean_std([g["mae"] for g in got]), mean_std([g["acc500"] for g in got]),
                                  fmt_tau([g["tau"] for g in got]), mean_std([g["coverage"] for g in got])])
        if "with_it_from_start" in res:
            w = res["with_it_from_start"]
            table.append(["all", "trained with it from the start" + (" (committed report)" if "source" in w else ""),
                          f"{w['mae']:.1f}", f"{w['acc500']:.1f}", f"{w['tau']:.3f}", mean_std([w["coverage"]])])
        lines += [table_md(["N", "method", "MAE", "acc@500", "τ", "bound coverage"], table), ""]
        siblings = sorted({r["sibling_name"] for r in res["runs"]})
        secs = "; ".join(f"N = {n}: {mean_std([r['seconds'] for r in res['runs'] if r['n'] == n])} s"
                         for n in dict.fromkeys(r["n"] for r in res["runs"]))
        lines += [f"Siblings chosen: {', '.join(siblings)}. `--adapt llm` on cached prompt vectors (5-fold choice of "
                  f"the prior, fit, calibration), 2 CPU cores: {secs}. Other LLMs bitwise unchanged by `--adapt llm` "
                  f"in every run: {all(r['others_bitwise_unchanged'] for r in res['runs'])}.", ""]
        if res["capped"]:
            lines += [f"Cut-short log (N = 200, max_tokens {args.cap}: "
                      f"{100 * np.mean([c['cut_share'] for c in res['capped']]):.0f} % of answers cut; `--adapt llm`):",
                      ""]
            lines += [table_md(["answers cut short, read", "MAE", "τ"], [
                [way, mean_std([c[way]["mae"] for c in res["capped"]]), fmt_tau([c[way]["tau"] for c in res["capped"]])]
                for way in ("as lengths", "left out", "lower bounds")]), ""]
    lines += ["## The other LLMs", ""]
    full_runs = [(llm, r) for llm, res in result["llms"].items() for r in res["runs"] if "others_after_full" in r]
    header = ["LLM", "MAE before", "τ before"] + [f"after --adapt full ({llm.split('/')[-1]})" for llm, _ in full_runs]
    rows = []
    for m, before in result["others_before"].items():
        rows.append([m, f"{before['mae']:.1f}", f"{before['tau']:.3f}"] + [
            f"MAE {r['others_after_full'][m]['mae']:.1f} ({100 * (r['others_after_full'][m]['mae'] / before['mae'] - 1):+.1f} %), "
            f"τ {r['others_after_full'][m]['tau']:.3f} ({r['others_after_full'][m]['tau'] - before['tau']:+.3f})"
            for _, r in full_runs])
    lines += [table_md(header, rows), ""] + bar_checks(result)
    return "\n".join(lines) + "\n"


def bar_checks(result: dict) -> list[str]:
    """Dev: docs/adaptation.md's rule 1 at N = 200. Test: the learning-curve bar at N = 200 and N = 1,000."""
    lines = ["## Checks", ""]
    for llm, res in result["llms"].items():
        def avg(n, method, key):
            got = [r[method][key] for r in res["runs"] if r["n"] == n and method in r]
            return float(np.mean(got)) if got else None

        def verdict(ok):
            return "met" if ok else "missed"

        smae, stau = avg(200, "sibling", "mae"), avg(200, "sibling", "tau")
        mae, tau = avg(200, "llm", "mae"), avg(200, "llm", "tau")
        if mae is not None and result["split"] == "dev":
            lines.append(f"- {llm}, N = 200, `--adapt llm` (rule 1): MAE {mae:.1f} vs 0.92 × sibling "
                         f"{0.92 * smae:.1f} ({verdict(mae <= 0.92 * smae)}); τ {tau:.3f} vs sibling + 0.03 = "
                         f"{stau + 0.03:.3f} ({verdict(tau >= stau + 0.03)})")
        elif mae is not None:
            lines.append(f"- {llm}, N = 200, `--adapt llm`: τ {tau:.3f} vs sibling {stau:.3f} "
                         f"({verdict(tau >= stau)})")
        w = res.get("with_it_from_start")
        if w is None or result["split"] != "test":
            continue
        for mode in ("llm", "full"):
            mae, tau, sib = avg(1000, mode, "mae"), avg(1000, mode, "tau"), avg(1000, "sibling", "tau")
            if mae is None:
                continue
            half = sib + 0.5 * (w["tau"] - sib)
            lines.append(f"- {llm}, N = 1,000, `--adapt {mode}`: MAE {mae:.1f} vs 1.05 × ceiling {w['mae']:.1f} = "
                         f"{1.05 * w['mae']:.1f} ({verdict(mae <= 1.05 * w['mae'])}); τ {tau:.3f} vs halfway from "
                         f"the sibling's {sib:.3f} to the ceiling's {w['tau']:.3f} = {half:.3f} ({verdict(tau >= half)})")
        for r in res["runs"]:
            if "others_after_full" in r:
                worst_mae = max(abs(a["mae"] / result["others_before"][m]["mae"] - 1)
                                for m, a in r["others_after_full"].items())
                lines.append(f"- after `--adapt full` with {llm}: the other LLMs' MAE moved at most "
                             f"{100 * worst_mae:.1f} % (bar 1 %)")
    return lines


if __name__ == "__main__":
    main()
