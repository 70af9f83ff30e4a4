"""Trace-driven simulator of proactive, length-aware scheduling for LLM serving.

Why: the scheduler only cares about a length predictor's accuracy because of what it gains with it.
This module replays a trace of requests (one server per LLM, continuous batching, a paged KV cache)
under different admission orders (FCFS, shortest-predicted-first, with aging, oracle) and memory
policies (reserve ``max_tokens`` or a predicted bound). It reports completion time, time to first
token, throughput and preemptions. Pure numpy: it simulates in jumps between events, not token by token.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = ["SimConfig", "ORDERS", "MEMORIES", "DEFAULT_LOADS", "server_capacity", "simulate", "sweep", "summarize",
           "default_policies", "DEFAULT_POLICIES", "main"]

ORDERS = ("fcfs", "spf", "spf_aging", "oracle")
#: Loads the report and the CLI sweep by default: the scheduling targets are stated at 0.9; inf is a backlog.
DEFAULT_LOADS = (0.5, 0.7, 0.9, math.inf)
MEMORIES = ("max_tokens", "predicted")


@dataclass(frozen=True)
class SimConfig:
    """Server constants and cost model (times in ms). Defaults roughly match a 7B model on one GPU.

    Decode step time with ``B`` running requests holding ``C`` KV tokens in total:
    ``step_base_ms + step_per_req_ms * B + step_per_ctx_token_us / 1000 * C``.

    - step_base_ms = 10: fixed cost per step (read the weights, launch kernels).
    - step_per_req_ms = 0.3: cost per running request per step (MLP work and sampling).
    - step_per_ctx_token_us = 0.1: attention reads the KV cache (6.5 ms for a full 64k cache).
    - prefill_per_token_ms = 0.05: prompt processing. It is charged when a request is admitted,
      and the server stalls meanwhile (a 1,000-token prompt costs 50 ms).
    - kv_capacity = 65,536: KV-cache tokens per server. Prompts longer than
      ``kv_capacity - max_tokens`` are clipped, so every request fits when it runs alone.
    - max_tokens = 4,096: generation cap. Longer true lengths are cut here and counted as ``truncated``.
    - max_batch = 256: most running requests at once (vLLM's ``max_num_seqs``).
    - admit_watermark = 0.01: share of the KV cache left free when admitting (like vLLM), so a new
      request is not preempted at once.
    - aging_rate = 50: priority tokens gained per second of waiting under ``spf_aging``.
    - capacity_reservation = "max_tokens": the batch that defines server capacity
      (see :func:`server_capacity`). "max_tokens" or "mean".
    """

    step_base_ms: float = 10.0
    step_per_req_ms: float = 0.3
    step_per_ctx_token_us: float = 0.1
    prefill_per_token_ms: float = 0.05
    kv_capacity: int = 65_536
    max_tokens: int = 4_096
    max_batch: int = 256
    admit_watermark: float = 0.01
    aging_rate: float = 50.0
    capacity_reservation: str = "max_tokens"


def server_capacity(mean_input: float, mean_output: float, config: SimConfig) -> tuple[float, int]:
    """Return (requests/s, batch) that one server sustains, so that ``load`` means something.

    Batch ``B = floor(kv_capacity / (mean_input + R))``, clipped to [1, max_batch]. Here R = max_tokens
    when ``capacity_reservation == "max_tokens"``: the batch a conservative server without predictions
    keeps full. With "mean", R = mean_output, the batch an ideal paged server reaches. At batch B an
    average step holds ``B * (mean_input + mean_output / 2)`` context tokens. Each request holds a
    batch slot for ``mean_output`` steps and stalls the server for its prefill, so
    ``capacity = 1000 / (mean_output * step_ms / B + prefill_per_token_ms * mean_input)``.
    """
    c = config
    if c.capacity_reservation not in ("max_tokens", "mean"):
        raise ValueError(f"capacity_reservation must be 'max_tokens' or 'mean', got {c.capacity_reservation!r}")
    reserve = c.max_tokens if c.capacity_reservation == "max_tokens" else mean_output
    batch = int(np.clip(c.kv_capacity // max(mean_input + reserve, 1), 1, c.max_batch))
    step = (c.step_base_ms + c.step_per_req_ms * batch
            + c.step_per_ctx_token_us / 1000 * batch * (mean_input + mean_output / 2))
    return 1000.0 / (mean_output * step / batch + c.prefill_per_token_ms * mean_input), batch


def _steps_until(dt: float, a: float, b: float) -> int:
    """Return the fewest decode steps whose total time ``a*k^2 + b*k`` reaches ``dt`` (at least 1)."""
    if dt <= 0:  # the arrival happened during a prefill: stop after one step
        return 1
    k = dt / b if a <= 0 else (-b + math.sqrt(b * b + 4 * a * dt)) / (2 * a)
    return max(1, math.ceil(k - 1e-9))


def _run_server(arr, inp, out, res, pri, aging, cfg):
    """Simulate one server. Requests are sorted by arrival (ms). ``pri=None`` means FCFS.

    Each loop: (1) queue the arrivals. (2) Admit by priority while the chosen request's reservation
    fits ``(1 - admit_watermark) * kv_capacity``, minus the running requests' ``max(reservation, actual)``.
    If the chosen request does not fit, admission stops (head of line): smaller requests may not
    overtake it, so it cannot starve on memory. (3) If the next step would push the actual KV use
    (prompt + generated) past capacity, preempt the most recently admitted requests (recompute: they
    lose their generated tokens and go back to the queue with their original arrival time and
    priority). Admission then pauses until a request completes, to avoid thrashing. (4) Otherwise
    decode k steps in closed form. k runs to the next completion, the next memory overflow or (while
    admission is possible) the next arrival.
    """
    n, cap, u = len(arr), cfg.kv_capacity, cfg.step_per_ctx_token_us / 1000
    admit_cap, M = cap * (1 - cfg.admit_watermark), cfg.max_batch
    inq = np.zeros(n, bool)
    wait, ttft, finish = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    npre = np.zeros(n, np.int64)
    r_idx, r_gen, r_seq = np.empty(M, np.int64), np.empty(M, np.int64), np.empty(M, np.int64)
    nr = nxt = lo = done = seq = steps = bsteps = bmax = 0
    t, paused = 0.0, False
    while done < n:
        while nxt < n and arr[nxt] <= t:
            inq[nxt] = True
            nxt += 1
        while not paused and nr < M:                                   # admission
            while lo < nxt and not inq[lo]:
                lo += 1
            if lo >= nxt:
                break
            if pri is None:
                j = lo
            else:
                p = pri[lo:nxt] if not aging else pri[lo:nxt] - aging * (t - arr[lo:nxt])
                j = lo + int(np.argmin(np.where(inq[lo:nxt], p, np.inf)))
            idx = r_idx[:nr]
            if nr and np.maximum(res[idx], inp[idx] + r_gen[:nr]).sum() + res[j] > admit_cap:
                break                                                  # head-of-line blocking
            t0, t = t, t + cfg.prefill_per_token_ms * inp[j]
            if np.isnan(wait[j]):
                wait[j], ttft[j] = t0 - arr[j], t - arr[j]
            inq[j] = False
            r_idx[nr], r_gen[nr], r_seq[nr] = j, 0, seq
            nr, seq = nr + 1, seq + 1
        if nr == 0:
            paused = False
            if nxt < n:
                t = max(t, arr[nxt])
            continue
        idx, gen = r_idx[:nr], r_gen[:nr]
        asum = int((inp[idx] + gen).sum())
        if asum + nr > cap:                                            # preempt (recompute)
            while nr > 1 and asum + nr > cap:
                m = int(np.argmax(r_seq[:nr]))
                j = r_idx[m]
                asum -= inp[j] + r_gen[m]
                nr -= 1
                r_idx[m], r_gen[m], r_seq[m] = r_idx[nr], r_gen[nr], r_seq[nr]
                inq[j], lo, npre[j] = True, min(lo, j), npre[j] + 1
            paused = True
            continue
        a = u * nr / 2
        b = cfg.step_base_ms + cfg.step_per_req_ms * nr + u * asum - a
        k = min(int((out[idx] - gen).min()), (cap - asum) // nr)
        if nxt < n and not paused and nr < M:
            k = min(k, _steps_until(arr[nxt] - t, a, b))
        t += a * k * k + b * k
        r_gen[:nr] += k
        steps, bsteps, bmax = steps + k, bsteps + nr * k, max(bmax, nr)
        fin = r_gen[:nr] >= out[r_idx[:nr]]
        if fin.any():
            finish[r_idx[:nr][fin]] = t
            keep = ~fin
            nk = int(keep.sum())
            r_idx[:nk], r_gen[:nk], r_seq[:nk] = r_idx[:nr][keep], r_gen[:nr][keep], r_seq[:nr][keep]
            done, nr, paused = done + nr - nk, nk, False
    return dict(wait=wait, ttft=ttft, finish=finish, npre=npre, steps=steps, bsteps=bsteps, bmax=bmax)


def _check_column(requests: pd.DataFrame, col, what: str) -> np.ndarray:
    """Return a column as floats. Raise a ValueError that names the problem, because a typo in a
    column name must not turn into a silent FCFS run."""
    if col is None:
        raise ValueError(f"{what} needs a column name (got None)")
    if col not in requests.columns:
        raise ValueError(f"unknown {what} column {col!r}; available: {sorted(map(str, requests.columns))}")
    v = pd.to_numeric(requests[col], errors="coerce").to_numpy(float)
    if np.isnan(v).any():
        raise ValueError(f"{what} column {col!r} has {int(np.isnan(v).sum())} missing/non-numeric values")
    return v


def simulate(requests: pd.DataFrame, order: str = "fcfs", order_column: str | None = None,
             memory: str = "max_tokens", bound_column: str | None = None, load: float = 0.9,
             config: SimConfig | None = None, seed: int = 0, arrival_column: str | None = None) -> dict:
    """Simulate one policy at one load. Return scalar metrics (times in seconds).

    Each request's true length is one draw from its ``output_sizes``, capped at max_tokens. The draw
    depends only on ``seed``, and so do the Poisson arrivals (per LLM, rate = load x
    :func:`server_capacity`). All policies therefore see the same trace for the same seed.
    ``load=math.inf`` is a backlog: every request is queued at t = 0, so the server is never short of
    work and what a memory policy admits (running requests, throughput, preemptions) shows in full.

    ``arrival_column`` (seconds) replays a given trace instead, e.g. one measured on a real server: arrivals come
    from that column (``load`` is then ignored), requests with equal arrival keep their row order (FCFS and
    priority ties go to the earlier row, as vLLM breaks ties by arrival), and no permutation is drawn.
    """
    cfg = config or SimConfig()
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    if memory not in MEMORIES:
        raise ValueError(f"unknown memory policy {memory!r}; choose one of {MEMORIES}")
    if not load > 0:
        raise ValueError(f"load must be > 0, got {load}")
    if cfg.kv_capacity <= cfg.max_tokens:
        raise ValueError("kv_capacity must exceed max_tokens")
    missing = {"llm", "input_size", "output_sizes"} - set(requests.columns)
    if missing:
        raise ValueError(f"requests lack columns {sorted(missing)}")
    if len(requests) == 0:
        raise ValueError("requests is empty")
    pri_all = _check_column(requests, order_column, f"order '{order}'") if order in ("spf", "spf_aging") else None
    bound = _check_column(requests, bound_column, "memory 'predicted'") if memory == "predicted" else None
    inp = np.minimum(requests["input_size"].to_numpy(np.int64), cfg.kv_capacity - cfg.max_tokens)
    sizes = [np.asarray(s, dtype=np.int64).ravel() for s in requests["output_sizes"]]
    if any(len(s) == 0 for s in sizes):
        raise ValueError("every row needs at least one output size")
    rng = np.random.default_rng([seed, 0])
    pick = rng.random(len(sizes))
    drawn = np.array([s[int(p * len(s))] for s, p in zip(sizes, pick)], dtype=np.int64)
    truncated = int((drawn > cfg.max_tokens).sum())
    out = np.clip(drawn, 1, cfg.max_tokens)
    expected = np.array([np.minimum(s, cfg.max_tokens).mean() for s in sizes])  # for capacity
    if memory == "max_tokens":
        res = inp + cfg.max_tokens
    else:
        res = inp + np.clip(np.ceil(bound), 1, cfg.max_tokens).astype(np.int64)
    pri_all = out.astype(float) if order == "oracle" else pri_all
    aging = cfg.aging_rate / 1000 if order == "spf_aging" else 0.0
    given = None if arrival_column is None else 1000.0 * _check_column(requests, arrival_column, "arrival")
    if given is not None and (given < 0).any():
        raise ValueError(f"arrival column {arrival_column!r} has negative times")
    llms = requests["llm"].astype(str).to_numpy()
    comp, ttft, wait, npre = [], [], [], []
    steps = bsteps = bmax = 0
    t_end, cap_total = 0.0, 0.0
    for s, name in enumerate(sorted(set(llms))):
        rows = np.flatnonzero(llms == name)
        rate, _ = server_capacity(inp[rows].mean(), expected[rows].mean(), cfg)
        if given is not None:
            rows = rows[np.argsort(given[rows], kind="stable")]
            arr = given[rows]
        else:
            srng = np.random.default_rng([seed, 1, s])
            rows = rows[srng.permutation(len(rows))]
            arr = (np.zeros(len(rows)) if math.isinf(load)  # a backlog: every request is queued at t = 0
                   else np.cumsum(srng.exponential(1000.0 / (load * rate), len(rows))))
        r = _run_server(arr, inp[rows], out[rows], res[rows],
                        None if pri_all is None else pri_all[rows], aging, cfg)
        comp.append(r["finish"] - arr)
        ttft.append(r["ttft"])
        wait.append(r["wait"])
        npre.append(r["npre"])
        steps, bsteps, bmax = steps + r["steps"], bsteps + r["bsteps"], max(bmax, r["bmax"])
        t_end, cap_total = max(t_end, r["finish"].max()), cap_total + rate
    comp, ttft, wait, npre = (np.concatenate(x) for x in (comp, ttft, wait, npre))
    span = t_end / 1000
    return dict(
        mean_completion_s=comp.mean() / 1000, p50_completion_s=np.percentile(comp, 50) / 1000,
        p99_completion_s=np.percentile(comp, 99) / 1000, mean_ttft_s=ttft.mean() / 1000,
        p99_ttft_s=np.percentile(ttft, 99) / 1000, throughput_rps=len(comp) / span,
        throughput_tps=float(out.sum()) / span, preemptions=int(npre.sum()),
        preempted_share=float((npre > 0).mean()), mean_running=bsteps / max(steps, 1),
        max_running=int(bmax), max_wait_s=wait.max() / 1000, truncated=truncated,
        n_requests=len(comp), capacity_rps=cap_total, makespan_s=span)


def default_policies(pred_col: str | None = "pred_mean", bound_col: str | None = "pred_bound",
                     knn_col: str | None = "knn_mean", prompt_col: str | None = "input_size") -> dict:
    """Return the standard comparison: name -> (order, order_column, memory, bound_column).

    Ordering policies reserve max_tokens, so they differ only in order. "oracle" is the ordering
    oracle. Policies named ``...+bound_mem`` also reserve the predicted bound. Policies whose column
    is None are left out.
    """
    p = {"fcfs": ("fcfs", None, "max_tokens", None)}
    if pred_col:
        p["spf_pred"] = ("spf", pred_col, "max_tokens", None)
        p["spf_aging_pred"] = ("spf_aging", pred_col, "max_tokens", None)
    if knn_col:
        p["spf_knn"] = ("spf", knn_col, "max_tokens", None)
    if prompt_col:
        p["spf_prompt"] = ("spf", prompt_col, "max_tokens", None)
    p["oracle"] = ("oracle", None, "max_tokens", None)
    if bound_col:
        p["fcfs+bound_mem"] = ("fcfs", None, "predicted", bound_col)
        if pred_col:
            p["spf_pred+bound_mem"] = ("spf", pred_col, "predicted", bound_col)
    return p


DEFAULT_POLICIES = default_policies()


def sweep(requests: pd.DataFrame, policies: dict | None = None, loads=DEFAULT_LOADS, seeds=(0, 1, 2),
          config: SimConfig | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every policy x load x seed. Return one row each (policy, load, seed, metrics)."""
    from tqdm.auto import tqdm

    policies = DEFAULT_POLICIES if policies is None else policies
    for name, spec in policies.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 4:
            raise ValueError(f"policy {name!r} must be (order, order_column, memory, bound_column), got {spec!r}")
    jobs = [(n, l, s) for n in policies for l in loads for s in seeds]
    rows = []
    for name, load, seed in tqdm(jobs, desc="scheduling sweep", disable=not progress):
        order, col, memory, bound = policies[name]
        m = simulate(requests, order, col, memory, bound, load, config, seed)
        rows.append(dict(policy=name, order=order, order_column=col, memory=memory,
                         bound_column=bound, load=load, seed=seed, **m))
    return pd.DataFrame(rows)


_SUMMARY_METRICS = ("mean_completion_s", "p50_completion_s", "p90_completion_s", "p99_completion_s", "mean_ttft_s",
                    "p50_ttft_s", "p90_ttft_s", "p99_ttft_s",
                    "throughput_rps", "throughput_tps", "preemptions", "preempted_share", "mean_running",
                    "max_running", "max_wait_s", "truncated", "gain_pct")


def summarize(df: pd.DataFrame, baseline: str = "fcfs", oracle: str = "oracle") -> pd.DataFrame:
    """Return the mean and std over seeds for each policy x load, plus gains.

    ``gain_pct`` = 100 x (baseline - policy) / baseline mean completion time, paired by (load, seed).
    ``share_of_oracle_gain`` = mean gain / the oracle's mean gain at that load. It is 1 for the oracle,
    0 for the baseline, and NaN when there is no oracle run.
    """
    if baseline not in set(df["policy"]):
        raise ValueError(f"baseline policy {baseline!r} not in sweep (have {sorted(set(df['policy']))})")
    base = df.loc[df["policy"] == baseline, ["load", "seed", "mean_completion_s"]]
    d = df.merge(base.rename(columns={"mean_completion_s": "_base"}), on=["load", "seed"], how="left")
    d["gain_pct"] = 100 * (d["_base"] - d["mean_completion_s"]) / d["_base"]
    cols = [c for c in _SUMMARY_METRICS if c in d.columns]
    g = d.groupby(["policy", "load"], sort=False)[cols].agg(["mean", "std"])
    g.columns = [f"{a}_{b}" for a, b in g.columns]
    g = g.reset_index()
    g.insert(2, "n_seeds", d.groupby(["policy", "load"], sort=False).size().to_numpy())
    og = g.loc[g["policy"] == oracle].set_index("load")["gain_pct_mean"]
    denom = g["load"].map(og) if len(og) else np.nan
    g["share_of_oracle_gain"] = g["gain_pct_mean"] / denom
    return g


#: Columns `lenpred simulate` looks for when not told: `predict_rows`' names, then those of the report's
#: predictions.parquet.
CLI_COLUMNS = {"pred": ("predicted mean length", ("pred_mean", "lenpred_mean")),
               "bound": ("predicted upper bound", ("pred_bound", "lenpred_bound")),
               "knn": ("kNN baseline's mean", ("knn_mean",)), "prompt": ("prompt length", ("input_size",))}


def _read_requests(path: str) -> pd.DataFrame:
    """Read parquet or CSV. In CSV, ``output_sizes`` arrives as text and is parsed back into a list."""
    df = pd.read_parquet(path) if path.endswith((".parquet", ".pq")) else pd.read_csv(path)
    if "output_sizes" in df.columns and len(df) and isinstance(df["output_sizes"].iloc[0], str):
        df["output_sizes"] = df["output_sizes"].map(ast.literal_eval)
    return df


def main(argv=None) -> int:
    """CLI: sweep the default policies over a request file. Write sweep.csv, summary.csv,
    summary.json and sweep.png to --out."""
    ap = argparse.ArgumentParser(prog="lenpred-schedule", description=main.__doc__)
    ap.add_argument("requests", help="parquet/CSV with llm, input_size, output_sizes and prediction columns")
    ap.add_argument("--out", default="scheduling_out", help="output directory")
    for key, (what, candidates) in CLI_COLUMNS.items():
        ap.add_argument(f"--{key}-col", help=f"{what} column ('' to skip; default: the first present of "
                                             f"{', '.join(candidates)})")
    ap.add_argument("--loads", type=float, nargs="+", default=list(DEFAULT_LOADS),
                    help="shares of server capacity; 'inf' adds a backlog (all requests queued at t = 0); "
                         "default: %(default)s")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-tokens", type=int, default=SimConfig.max_tokens)
    ap.add_argument("--kv-capacity", type=int, default=SimConfig.kv_capacity)
    ap.add_argument("--aging-rate", type=float, default=SimConfig.aging_rate)
    ap.add_argument("--capacity-reservation", choices=["max_tokens", "mean"], default="max_tokens")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    df = _read_requests(a.requests)
    cols = {}
    for key, (_, candidates) in CLI_COLUMNS.items():
        named = getattr(a, f"{key}_col")
        if named is None:  # not given: the first candidate present, e.g. the report's lenpred_mean
            named = next((c for c in candidates if c in df.columns), "")
            if not named:
                print(f"note: no column {' or '.join(candidates)} in {a.requests}; its policies are skipped",
                      file=sys.stderr)
        elif named and named not in df.columns:
            ap.error(f"--{key}-col {named!r} is not a column of {a.requests}; it has {list(df.columns)}")
        cols[f"{key}_col"] = named or None
    cfg = SimConfig(max_tokens=a.max_tokens, kv_capacity=a.kv_capacity, aging_rate=a.aging_rate,
                    capacity_reservation=a.capacity_reservation)
    res = sweep(df, default_policies(**cols), a.loads, a.seeds, cfg, progress=not a.no_progress)
    summ = summarize(res)
    os.makedirs(a.out, exist_ok=True)
    res.to_csv(os.path.join(a.out, "sweep.csv"), index=False)
    summ.to_csv(os.path.join(a.out, "summary.csv"), index=False)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), policies=default_policies(**cols),
                       summary=json.loads(summ.to_json(orient="records"))), f, indent=2)
    from lenpred.figures import plot_sweep

    plot_sweep(summ, os.path.join(a.out, "sweep.png"))
    print(summ[["policy", "load", "mean_completion_s_mean", "gain_pct_mean", "share_of_oracle_gain"]]
          .to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
