"""Evaluate a LenPred export on the CASTILLO test split, side by side with baselines, and write the model card.

    python evaluate.py --model EXPORT_DIR [--dataset SRC] [--out reports]
                       [--baseline-endpoint URL --baseline-model NAME] [--no-knn] [--max-prompts N]

Writes `OUT/report.json` (every number), `OUT/report.md` (rendered from the JSON), `OUT/figures/*.png`,
`OUT/model_card.md` and, unless `--no-card`, the same card as the export's `README.md`.
Imported rather than run (`import evaluate` from the repository root, where this file comes first on the path),
it hands over to the Hugging Face `evaluate` package, so `evaluate.load("metrics/length_prediction")` works here too.
"""

from __future__ import annotations

if __name__ == "evaluate":  # imported: stand aside for the `evaluate` package found further down the path
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.machinery.PathFinder.find_spec(
        "evaluate", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
    if _spec is None:
        raise ImportError("`import evaluate` found LenPred's evaluate.py script only: pip install evaluate")
    _package = importlib.util.module_from_spec(_spec)
    sys.modules["evaluate"] = _package  # what the import statement returns
    _spec.loader.exec_module(_package)

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from configuration_lenpred import PAPER_BIN_SIZES, LenPredConfig, make_bin_edges
from lenpred.baselines import KnnBaseline, PromptSetMedian, cached_embeddings, run_prompt_baseline
from lenpred.data import HELD_OUT_PROMPT_SET, dataset_name, load_castillo, make_splits, prompt_table
from lenpred.hub import default_encoder_path, load_export, weights_sha256
from lenpred.inference import predict_rows
from lenpred.model_card import write_cards
from lenpred.metrics import nominal_coverage
from lenpred.figures import plot_figures, plot_sweep
from lenpred.report import PAPER_CITATION, build_results, calibration_curve, order_llms, render_markdown, write_json
from lenpred.scheduling import DEFAULT_LOADS
from prediction_lenpred import lognormal_quantile

__all__ = ["parse_args", "main", "select_prompts", "add_model_predictions", "add_reference_baselines",
           "add_prompt_baseline", "training_summary"]

logger = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="LenPred export folder (or Hub id)")
    p.add_argument("--dataset", default=None, help="CASTILLO folder or Hub id (default: the shipped offline copy)")
    p.add_argument("--out", default="reports", help="report folder (default: reports)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate a seeded sample of N test prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-prompts sample")
    p.add_argument("--no-knn", dest="knn", action="store_false", help="skip the kNN baseline")
    p.add_argument("--knn-k", type=int, default=16)
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: ~/.cache/lenpred)")
    p.add_argument("--baseline-endpoint", help="OpenAI-compatible server for the paper's prompt baseline")
    p.add_argument("--baseline-model", help="model name the endpoint serves")
    p.add_argument("--baseline-llm", help="CASTILLO LLM whose answers the stated lengths are scored against "
                                          "(default: --baseline-model if it names one)")
    p.add_argument("--baseline-max-tokens", type=int, default=32,
                   help="reply tokens to generate; only the leading stated length is read (default 32)")
    p.add_argument("--baseline-timeout", type=float, default=60.0)
    p.add_argument("--no-simulate", dest="simulate", action="store_false",
                   help="skip the scheduling simulation on the test rows")
    p.add_argument("--sim-loads", default=",".join(f"{x:g}" for x in DEFAULT_LOADS),
                   help="loads (share of server capacity) to simulate; inf = a backlog, all requests queued at t = 0 "
                        "(default: %(default)s)")
    p.add_argument("--sim-seeds", type=int, default=3, help="seeds per load (spread reported)")
    p.add_argument("--card-to-export", dest="card", action="store_true", default=True,
                   help="write the model card into the export as README.md (default)")
    p.add_argument("--no-card", dest="card", action="store_false", help="leave the export's README.md alone")
    args = p.parse_args(argv)
    if bool(args.baseline_endpoint) != bool(args.baseline_model):
        p.error("--baseline-endpoint and --baseline-model go together")
    return args


def select_prompts(rows: pd.DataFrame, max_prompts: int | None, seed: int = 0) -> pd.DataFrame:
    """All rows, or every row of a seeded sample of `max_prompts` prompts (quick runs)."""
    ids = rows["prompt_id"].drop_duplicates()
    if not max_prompts or max_prompts >= len(ids):
        return rows.reset_index(drop=True)
    keep = set(ids.sample(n=max_prompts, random_state=seed))
    return rows[rows["prompt_id"].isin(keep)].reset_index(drop=True)


def _with_bound(rows: pd.DataFrame, method: str, q: float) -> pd.DataFrame:
    """The log-normal q-quantile bound (and the 0.99 quantile, for the p99 class) from a baseline's mean and std:
    the model's formula before its split-conformal offsets, which the baselines do not get."""
    mean = torch.tensor(rows[f"{method}_mean"].to_numpy(float))
    std = torch.tensor(rows[f"{method}_std"].to_numpy(float))
    return rows.assign(**{f"{method}_bound": lognormal_quantile(mean, std, q).numpy(),
                          f"{method}_p99": lognormal_quantile(mean, std, 0.99).numpy()})


def add_model_predictions(model, tokenizer, rows: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """`lenpred_*` columns from one encoder pass per prompt for all LLMs (`predict_rows`)."""
    pred = predict_rows(model, tokenizer, rows, batch_size=batch_size, progress=True)
    return rows.assign(lenpred_mean=pred["pred_mean"].to_numpy(), lenpred_std=pred["pred_std"].to_numpy(),
                       lenpred_bound=pred["pred_bound"].to_numpy(), lenpred_p99=pred["pred_p99"].to_numpy(),
                       lenpred_bin=pred["pred_bin"].to_numpy())


def add_reference_baselines(rows: pd.DataFrame, pool: pd.DataFrame, q: float, knn: bool = True, k: int = 16,
                            cache_dir: str | None = None) -> pd.DataFrame:
    """`median_*` and (if `knn`) `knn_*` columns, both fitted on the training pool only."""
    mean, std = PromptSetMedian().fit(pool).predict(rows["llm"], rows["prompt_set"])
    rows = _with_bound(rows.assign(median_mean=mean, median_std=std), "median", q)
    if not knn:
        return rows
    encoder = default_encoder_path()
    pool_prompts, test_prompts = prompt_table(pool), prompt_table(rows)
    pool_emb = cached_embeddings(pool_prompts["prompt_text"].tolist(), cache_dir, encoder)
    test_emb = cached_embeddings(test_prompts["prompt_text"].tolist(), cache_dir, encoder)
    model = KnnBaseline(k=k).fit(pool, (pool_prompts["prompt_id"].tolist(), pool_emb))
    known = rows["llm"].isin(list(model.index_)).to_numpy()
    mean, std = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    if known.any():
        mean[known], std[known] = model.predict(rows["llm"][known].tolist(), rows["prompt_id"][known].tolist(),
                                                embeddings=(test_prompts["prompt_id"].tolist(), test_emb))
    return _with_bound(rows.assign(knn_mean=mean, knn_std=std), "knn", q)


def _resolve_llm(name: str, llms) -> str:
    """The config's own rule (an exact id or a unique part of one), applied to the test LLMs."""
    try:
        return LenPredConfig(llm_names=list(llms)).resolve_llm(name)
    except ValueError as err:
        raise SystemExit(f"--baseline-llm: {err}; name one with --baseline-llm") from None


def add_prompt_baseline(rows: pd.DataFrame, url: str, model: str, llm: str | None = None, max_tokens=32,
                        timeout: float = 60.0) -> tuple[pd.DataFrame, dict]:
    """`prompt_mean` for the rows of one LLM (the one behind the endpoint), NaN elsewhere and for bad replies.

    The stated length has no std and no bound: those columns stay absent, their cells show `—`.
    """
    llm = _resolve_llm(llm or model, sorted(rows["llm"].unique()))
    prompts = prompt_table(rows[rows["llm"] == llm])
    lengths, counts = run_prompt_baseline(prompts["prompt_text"].tolist(), url, model, timeout=timeout,
                                          max_tokens=max_tokens)
    stated = dict(zip(prompts["prompt_id"], [np.nan if v is None else float(v) for v in lengths]))
    mean = np.where(rows["llm"] == llm, rows["prompt_id"].map(stated).astype(float), np.nan)
    return rows.assign(prompt_mean=mean), {"model": model, "llm": llm, "endpoint": url, "counts": counts}


def simulate_scheduling(rows: pd.DataFrame, loads, n_seeds: int, out: Path) -> dict:
    """Replay the test rows through the simulator with LenPred's, kNN's and the oracle's orderings."""
    from lenpred.scheduling import SimConfig, default_policies, summarize, sweep

    requests = rows.rename(columns={"lenpred_mean": "pred_mean", "lenpred_bound": "pred_bound"})
    knn = "knn_mean" if "knn_mean" in requests and requests["knn_mean"].notna().all() else None
    config = SimConfig()
    policies = default_policies("pred_mean", "pred_bound", knn, "input_size")
    summary = summarize(sweep(requests, policies, loads=loads, seeds=tuple(range(n_seeds)), config=config))
    figure = plot_sweep(summary, str(out / "figures" / "scheduling.png"))
    notes = [f"Simulator `lenpred/scheduling.py`: one server per LLM, continuous batching, KV cache "
             f"{config.kv_capacity:,} tokens, max_tokens {config.max_tokens:,}; each request's true length is drawn "
             "from its 10 sampled sizes; Poisson arrivals at the given share of capacity; "
             f"{n_seeds} seeds per load (tables: means over seeds).",
             "Orderings reserve max_tokens per request; `+bound_mem` policies reserve LenPred's bound instead "
             "(preempted = recomputed). `spf_prompt` orders by prompt length; `oracle` by the true drawn length.",
             "Load is a share of the capacity of a server that reserves max_tokens (`server_capacity`). The backlog "
             "(every request queued at t = 0) shows what each memory policy admits when work never runs short: "
             "requests running at once, throughput and the share of requests preempted."]
    return {"notes": notes, "summary": summary.to_dict(orient="records"), "policies": {k: list(v) for k, v in
            policies.items()}, "figure": str(Path(figure).relative_to(out))}


def training_summary(export: Path) -> tuple[dict | None, dict]:
    """(trainer_state or None, a short summary for the card) from the export's `trainer_state.json`."""
    path = export / "trainer_state.json"
    if not path.is_file():
        return None, {}
    state = json.loads(path.read_text(encoding="utf-8"))
    hist = state.get("log_history", [])
    last = lambda key: next((h[key] for h in reversed(hist) if key in h), None)  # noqa: E731
    lrs = [h["learning_rate"] for h in hist if "learning_rate" in h]
    return state, {"global_step": state.get("global_step"), "epochs": state.get("epoch"),
                   "train_batch_size": state.get("train_batch_size"), "best_metric": state.get("best_metric"),
                   "peak_learning_rate": max(lrs) if lrs else None, "final_train_loss": last("loss"),
                   "final_eval_loss": last("eval_loss")}


def _notes(config, args, pool: pd.DataFrame, meta: dict) -> list[str]:
    head = config.bin_size if meta["head_bin_size"] else None
    return [
        "Labels: the bin of each row's sanitised `output_mean` (upstream degeneration rule applied); F1 is the "
        "support-weighted F1; accuracy in %.",
        (f"† LenPred's column at its trained bin size ({head} tokens) comes from the bin head's argmax; every "
         "other column (and every baseline) is the bin of the predicted mean; the last column gives LenPred's "
         f"accuracy at {head} with the bin of its predicted mean too, the definition the quality targets use for "
         "acc@500." if head else
         "The bin head's edges differ from uniform bins, so every column is the bin of the predicted mean.")
        + f" Bins are uniform up to {config.bin_max_tokens} tokens, the last one open-ended.",
        f"p99-bin accuracy: the bin (size {config.bin_size}) of the 0.99 quantile of the predicted log-normal (from "
        "mean and std, without the reservation bound's calibration: it estimates the prompt's own p99, as the "
        "paper's p99 class does) vs the bin of the true p99 of the row's sampled sizes (numpy linear percentile).",
        f"Reservation bound: the log-normal {config.reservation_quantile:g}-quantile from predicted mean and std, "
        + ("shifted per LLM by split-conformal offsets fitted on the dev split (`config.bound_offsets`, "
           "`lenpred calibrate`)" if (config.bound_offsets or {}).get(f"{config.reservation_quantile:g}")
           else "uncalibrated (no `config.bound_offsets` for it)")
        + " (baselines: the same log-normal formula from their own mean and std, uncalibrated); coverage = share "
        "of sampled sizes ≤ bound.",
        "Calibration: share of all sampled sizes inside predicted mean ± 1σ / ± 2σ vs the normal's nominal share.",
        "Kendall τ-b: predicted vs true mean within each (LLM, prompt set), weighted by its size; constant "
        "predictions count 0 (the median baseline therefore scores 0).",
        f"Training pool of the baselines: `make_splits(load_castillo(dataset))` train + dev ({len(pool):,} rows, "
        f"{pool['prompt_id'].nunique():,} prompts), Alpaca excluded as in training. Median: per (LLM, prompt "
        "set) median of `output_mean` and `output_std` (unseen pair → that LLM's median, so Alpaca gets it).",
        (f"kNN: k={args.knn_k}, mean of log1p(length) over the nearest training prompts the same LLM answered, by "
         "cosine similarity of frozen all-MiniLM-L6-v2 mean-pooled sentence embeddings (pool cached)."
         if args.knn else "kNN: skipped (--no-knn)."),
        "Noise floor: error of one sampled answer against its 10-sample mean, and the sampling error of that "
        "mean itself (the noise in the target).",
        f"Paper rows are the published figures of {meta['citation']}: published, not measured here; its "
        "classification figures come from classifiers trained separately per bin size.",
    ] + ([f"Skipped test rows of LLMs the model does not know: {', '.join(meta['skipped_llms'])}."]
         if meta["skipped_llms"] else [])


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start, timings = time.perf_counter(), {}
    tick = lambda name, t0: timings.__setitem__(name, time.perf_counter() - t0)  # noqa: E731
    t0 = time.perf_counter()
    model, tokenizer = load_export(args.model)
    config = model.config
    splits = make_splits(load_castillo(args.dataset))
    pool = pd.concat([splits.train, splits.dev], ignore_index=True)
    test = splits.test
    skipped = sorted(set(test["llm"]) - set(config.llm_names))
    test = select_prompts(test[test["llm"].isin(config.llm_names)], args.max_prompts, args.seed)
    test = test.assign(subset=np.where(test["prompt_set"] == HELD_OUT_PROMPT_SET, "alpaca", "in_distribution"))
    tick("load", t0)
    t0 = time.perf_counter()
    rows = add_model_predictions(model, tokenizer, test, args.batch_size)
    tick("lenpred_predict", t0)
    t0 = time.perf_counter()
    rows = add_reference_baselines(rows, pool, config.reservation_quantile, args.knn, args.knn_k, args.cache_dir)
    tick("baselines", t0)
    methods = ["lenpred", "median"] + (["knn"] if args.knn else [])
    head_ok = list(config.bin_edges) == make_bin_edges(config.bin_size, config.bin_max_tokens)
    meta = {"model": str(args.model), "dataset": dataset_name(args.dataset),
        "command": "python evaluate.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "head_bin_size": config.bin_size if head_ok else None, "trained_bin_size": config.bin_size,
        "bin_sizes": list(PAPER_BIN_SIZES), "bin_max_tokens": config.bin_max_tokens,
        "reservation_quantile": config.reservation_quantile, "nominal_1sigma": nominal_coverage(1.0),
        "nominal_2sigma": nominal_coverage(2.0), "llms": order_llms(rows["llm"].unique()), "skipped_llms": skipped,
        "test_rows": int(len(rows)), "test_prompts": int(rows["prompt_id"].nunique()),
        "pool_rows": int(len(pool)), "pool_prompts": int(pool["prompt_id"].nunique()), "knn_k": args.knn_k,
        "citation": PAPER_CITATION, "max_prompts": args.max_prompts,
        "weights_sha256": weights_sha256(args.model)}
    if args.baseline_endpoint:
        t0 = time.perf_counter()
        rows, meta["prompt_baseline"] = add_prompt_baseline(rows, args.baseline_endpoint, args.baseline_model,
                                                            args.baseline_llm, args.baseline_max_tokens,
                                                            args.baseline_timeout)
        methods.append("prompt")
        tick("prompt_baseline", t0)
    meta["methods"] = methods
    meta["notes"] = _notes(config, args, pool, meta)
    t0 = time.perf_counter()
    subsets = {name: rows[rows["subset"] == name] for name in ("in_distribution", "alpaca")}
    report = {"meta": meta, "results": build_results(subsets, methods, config.llm_names, meta["head_bin_size"],
                                                     config.bin_max_tokens)}
    report["calibration_curve"] = {n: {m: calibration_curve(r, m) for m in methods} for n, r in subsets.items()
                                   if len(r)}
    state, report["training"] = training_summary(Path(args.model))
    # a key that an older export's config lacks takes the class default, which is how that export behaves
    report["model_config"] = {k: getattr(config, k, getattr(LenPredConfig, k)) for k in (
        "llm_names", "bin_size", "bin_edges", "end_dim", "head_hidden_dim", "dropout", "max_length",
        "reservation_quantile", "llm_embedding_dim", "use_prompt_length", "prompt_tail_tokens", "full_prompt_length",
        "bound_offsets")}
    report["model_config"]["encoder_layers"] = config.encoder_config.get("num_hidden_layers")
    report["model_config"]["encoder_hidden_size"] = config.encoder_config.get("hidden_size")
    tick("scores", t0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report["figures"] = plot_figures(report, rows, out, state)
    tick("figures", t0)
    if args.simulate:
        t0 = time.perf_counter()
        report["scheduling"] = simulate_scheduling(rows, [float(x) for x in args.sim_loads.split(",")],
                                                   args.sim_seeds, out)
        report["figures"]["Scheduling: completion time and share of the oracle's gain vs load"] = \
            report["scheduling"]["figure"]
        tick("scheduling", t0)
    meta["timings_s"], meta["wall_time_s"] = timings, time.perf_counter() - start
    write_json(report, out / "report.json")
    rows.drop(columns=["prompt_text"]).to_parquet(out / "predictions.parquet")  # for `lenpred simulate` and reuse
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))  # render exactly what was saved
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    export = Path(args.model)
    cards = write_cards(report, out / "model_card.md", export / "README.md" if args.card and export.is_dir() else None)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {len(report['figures'])} figures, "
          f"{', '.join(map(str, cards))} in {meta['wall_time_s']:.1f} s")
    return report


if __name__ == "__main__":
    main()
