"""The benchmark's phases against live servers: one run = one trace through a gateway into vLLM, checked and saved.

Order of phases (``Bench.run_all``), each run saved under ``OUT/runs/RUN.parquet`` so ``--resume`` skips it:

1. warm-up (one request), solo requests one at a time (the simulator's batch-1 step and prefill cost);
2. reference passes, FCFS, backlog: the evaluation pool (its makespan is the measured capacity; its lengths are
   the oracle's and the quality's truth) and the holdout pool (more unseen prompts for the quality figures);
3. pass 1: the adaptation pool, FCFS through the gateway, logged: the closed loop's training data;
4. adaptation (``adapt.py``: sibling = zero-shot, llm = adapted), then a gateway per export;
5. the grid: seeds x loads x policies, policies rotated per seed so that drift (a busy machine) hits all alike.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from benchmarks.serving.adapt import run_adaptation
from benchmarks.serving.analysis import load_label, run_metrics
from benchmarks.serving.client import exactly_once, run_trace
from benchmarks.serving.stack import (REPO, SERVED_NAME, GatewayServer, GatewaySpec, VLLMServer, VLLMSpec,
                                      gateway_flags, kv_cache_tokens, read_metric)
from benchmarks.serving.workload import CLIENT_POLICIES, POLICIES, castillo_prompts, make_trace, sample_pools

__all__ = ["BenchConfig", "Bench"]

PREEMPTIONS = "vllm:num_preemptions_total"


@dataclass
class BenchConfig:
    out: str
    base_export: str
    model_dir: str
    served_name: str = SERVED_NAME
    vllm_python: str = ".venv-vllm/bin/python"
    upstream: str | None = None          # an already running vLLM (then the vLLM options below are not used)
    max_num_seqs: int = 4
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    vllm_args: list[str] = field(default_factory=list)
    requests: int = 40                   # evaluation pool = requests per run
    holdout: int = 40
    adapt: int = 100
    solo: int = 6
    max_tokens: int = 192
    max_prompt_tokens: int = 128
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    loads: list[float] = field(default_factory=lambda: [0.9, math.inf])
    single_seed_loads: list[float] = field(default_factory=list)  # of `loads`, run with the first seed only
    gateway_threads: int | None = 1
    gateway_cpus: list[int] | None = None
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    temperature: float = 0.0
    backend: str = "torch"
    adapt_modes: dict = field(default_factory=lambda: {"lenpred": "sibling", "lenpred_adapted": "llm"})
    adapt_args: list[str] = field(default_factory=list)
    pool_seed: int = 0
    dataset: str | None = None           # CASTILLO source (lenpred.data's default when None)
    resume: bool = False
    work: str | None = None              # adaptation runs and exports (large): default .cache/serving/work/OUT-NAME


class Bench:
    def __init__(self, cfg: BenchConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        for sub in ("runs", "logs", "servers"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.flags = gateway_flags()
        self.keep_client = "--keep-client-priority" in self.flags
        self.meta: dict = {"config": asdict(cfg), "gateway_keeps_client_priority": self.keep_client,
                           "notes": [], "timings_s": {}}
        if not self.keep_client:
            self.meta["notes"].append(
                "the installed gateway has no --keep-client-priority: prompt_len/oracle runs went straight to vLLM "
                "(client priority honoured, no gateway log to check); fcfs runs, reference passes and pass 1 went "
                "through the gateway, which gives an LLM it does not know the default priority (FCFS at aging 0)")
        self.runs: list[dict] = []
        self.records: dict[str, pd.DataFrame] = {}

    # -- one run -------------------------------------------------------------------------------------------------
    def run(self, run_id: str, pool: pd.DataFrame, policy: str, load: float, seed: int, gateway, vllm_url: str,
            capacity: float = 0.0, reference: pd.DataFrame | None = None, phase: str = "grid") -> pd.DataFrame:
        """Send one trace, check it, save it; return its records (with the priority vLLM got, from the log)."""
        path = self.out / "runs" / f"{run_id}.parquet"
        if self.cfg.resume and path.exists():
            rec = pd.read_parquet(path)
            self.runs.append(json.loads((self.out / "runs" / f"{run_id}.json").read_text()))
            self.records[run_id] = rec
            return rec
        trace = make_trace(pool, policy, load, capacity, seed, reference)
        direct = gateway is None
        if policy in ("prompt_len", "oracle") and not self.keep_client:
            direct = True  # the old gateway would overwrite the client's priority
        url = vllm_url if direct else gateway.url
        log = None if direct else Path(gateway.spec.log_path)
        if not direct and not self.keep_client:
            trace["priority"] = pd.array([None] * len(trace), dtype="Int64")  # the old gateway overwrites it anyway
        n0 = _count_lines(log)
        pre0 = read_metric(vllm_url, PREEMPTIONS)
        t0 = time.time()
        rec = run_trace(url, self.cfg.served_name, trace, self.cfg.max_tokens, self.cfg.temperature, seed)
        wall = time.time() - t0
        log_rows = None if log is None else _new_lines(log, n0, len(trace))
        pre1 = read_metric(vllm_url, PREEMPTIONS)
        check = exactly_once(trace, rec, log_rows)
        rec = rec.merge(trace[["prompt_id", "prompt_set", "prompt_text"]], on="prompt_id", how="left")
        if log_rows and policy == "fcfs" and not self.keep_client and any(
                r.get("predicted_mean") is not None for r in log_rows):
            self.meta["notes"].append(f"{run_id}: the old gateway predicted for {self.cfg.served_name}, so this "
                                      "'fcfs' run was ordered by LenPred; use a gateway with --keep-client-priority")
        if log_rows:
            by_text = {r.get("prompt_text"): r for r in log_rows}
            got = [by_text.get(t, {}) for t in rec["prompt_text"]]
            rec["priority"] = [g.get("priority", p) for g, p in zip(got, rec["priority"])]
            rec["predicted_mean"] = [g.get("predicted_mean") for g in got]
            if all("finish_reasons" in g for g in got):  # the ASGI gateway's log: it must agree with the client
                check["log_finish_mismatch"] = int(sum((g["finish_reasons"] or [None])[0] != f
                                                       for g, f in zip(got, rec["finish_reason"])))
                check["log_max_tokens_mismatch"] = int(sum(g.get("max_tokens") != self.cfg.max_tokens for g in got))
                check["ok"] = check["ok"] and not check["log_finish_mismatch"] and not check["log_max_tokens_mismatch"]
            (self.out / "logs" / f"{run_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
        rec = rec.drop(columns=["prompt_text"])
        rec["priority"] = pd.to_numeric(rec["priority"], errors="coerce")
        info = dict(run_id=run_id, phase=phase, policy=policy, load=load, load_label=load_label(load), seed=seed,
                    route="direct" if direct else "gateway", wall_s=round(wall, 1),
                    preemptions=None if pre0 is None or pre1 is None else pre1 - pre0,
                    **run_metrics(rec), **{f"check_{k}": v for k, v in check.items()})
        rec.to_parquet(path, index=False)
        (self.out / "runs" / f"{run_id}.json").write_text(json.dumps(info, default=str))
        print(f"[{run_id}] {policy} load={load_label(load)} seed={seed}: {info['n_answered']}/{len(trace)} answered, "
              f"mean completion {info['mean_completion_s']:.2f} s, {info['throughput_tps']:.1f} tok/s, "
              f"wall {wall:.0f} s, exactly-once {'ok' if check['ok'] else 'FAILED'}", flush=True)
        self.runs.append(info)
        self.records[run_id] = rec
        return rec

    # -- phases --------------------------------------------------------------------------------------------------
    def pools(self):
        from transformers import AutoTokenizer

        c = self.cfg
        tok = AutoTokenizer.from_pretrained(c.model_dir)
        limit = min(c.max_prompt_tokens, c.max_model_len - c.max_tokens - 8)
        prompts = castillo_prompts(c.dataset, split="test", tokenizer=tok, max_prompt_tokens=limit)
        pools = sample_pools(prompts, c.requests, c.holdout, c.adapt, seed=c.pool_seed)
        for name in ("eval", "holdout", "adapt"):
            getattr(pools, name).to_parquet(self.out / f"pool-{name}.parquet", index=False)
        self.meta["pools"] = {n: int(len(getattr(pools, n))) for n in ("eval", "holdout", "adapt")}
        return pools

    def vllm(self):
        c = self.cfg
        if c.upstream:
            return contextlib.nullcontext(type("Upstream", (), {"url": c.upstream.rstrip("/"), "ready_s": None,
                                                                "tail": lambda self, n=0: ""})())
        spec = VLLMSpec(model_dir=c.model_dir, served_name=c.served_name, python=c.vllm_python,
                        max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len, kv_cache_gib=c.kv_cache_gib,
                        extra_args=list(c.vllm_args))
        return VLLMServer(spec, self.out / "servers" / "vllm.log")

    def gateway(self, name: str, export: str, upstream: str, client_priority: bool):
        log = self.out / "servers" / f"gateway-{name}.jsonl"
        spec = GatewaySpec(export=export, upstream=upstream, log_path=str(log),
                           keep_client_priority=client_priority and self.keep_client, backend=self.cfg.backend,
                           threads=self.cfg.gateway_threads,
                           cpus=tuple(self.cfg.gateway_cpus) if self.cfg.gateway_cpus else None)
        return GatewayServer(spec, self.out / "servers" / f"gateway-{name}.log")

    def run_all(self) -> dict:
        c, t_all = self.cfg, time.monotonic()
        pools = self.pools()
        with contextlib.ExitStack() as stack:
            t0 = time.monotonic()
            vllm = stack.enter_context(self.vllm())
            self.meta["timings_s"]["vllm_start"] = round(time.monotonic() - t0, 1)
            self.meta["kv_cache_tokens"] = kv_cache_tokens(vllm.tail(100000)) if not c.upstream else None
            gw = stack.enter_context(self.gateway("base", c.base_export, vllm.url, client_priority=True))
            self.run("warmup", pools.eval.iloc[[0]], "fcfs", math.inf, 0, gw, vllm.url, phase="warmup")
            order = pools.eval.assign(n=pools.eval["prompt_text"].str.len()).sort_values("n").index
            for i, k in enumerate(order[:: max(1, len(order) // max(c.solo, 1))][: c.solo]):
                self.run(f"solo-{i}", pools.eval.loc[[k]], "fcfs", math.inf, 0, gw, vllm.url, phase="solo")
            ref = self.run("reference", pools.eval, "fcfs", math.inf, 0, gw, vllm.url, phase="reference")
            hold = self.run("reference-holdout", pools.holdout, "fcfs", math.inf, 0, gw, vllm.url, phase="reference")
            capacity = len(ref) / run_metrics(ref)["makespan_s"]
            self.meta["capacity_rps"] = capacity
            span = len(pools.eval) / capacity  # a Poisson run at load L lasts about span / L
            est = len(c.policies) * sum((1 if x in c.single_seed_loads else len(c.seeds))
                                        * span / (1.0 if math.isinf(x) else x) for x in c.loads)
            self.meta["timings_s"]["grid_estimate"] = round(est, 1)
            print(f"capacity {capacity:.3f} requests/s ({run_metrics(ref)['throughput_tps']:.1f} tokens/s); "
                  f"the grid should take about {est / 60:.0f} min", flush=True)
            reference = pd.concat([ref, hold]).set_index("prompt_id")[["tokens", "prompt_tokens", "finish_reason"]]
            reference.to_parquet(self.out / "reference.parquet")
            self.run("pass1", pools.adapt, "fcfs", math.inf, 0, gw, vllm.url, phase="pass1")
            log = self.out / "logs" / "pass1.jsonl"
            t0 = time.monotonic()
            exports = {}
            for policy, mode in c.adapt_modes.items():
                if policy not in c.policies:
                    continue
                work = Path(c.work or Path(".cache") / "serving" / "work" / self.out.name)
                info = run_adaptation(mode, c.base_export, str(log), work, extra=c.adapt_args)
                if (work / f"adapt-{mode}.log").exists():
                    shutil.copy2(work / f"adapt-{mode}.log", self.out / "logs" / f"adapt-{mode}.log")
                self.meta.setdefault("adaptation", {})[policy] = info
                if info["export"]:
                    exports[policy] = info["export"]
                else:
                    self.meta["notes"].append(f"policy {policy} skipped: `{info['command']}` failed "
                                              f"(rc {info['rc']})")
            self.meta["timings_s"]["adaptation"] = round(time.monotonic() - t0, 1)
            gws = {p: stack.enter_context(self.gateway(p, e, vllm.url, client_priority=False))
                   for p, e in exports.items()}
            policies = [p for p in c.policies if p in CLIENT_POLICIES or p in gws]
            t0 = time.monotonic()
            for si, seed in enumerate(c.seeds):
                rot = policies[si % len(policies):] + policies[: si % len(policies)]
                for load in c.loads:
                    if si and load in c.single_seed_loads:
                        continue
                    for p in rot:
                        self.run(f"{p}-{load_label(load)}-s{seed}", pools.eval, p, load, seed,
                                 gws.get(p, gw), vllm.url, capacity, reference)
            self.meta["timings_s"]["grid"] = round(time.monotonic() - t0, 1)
        self.meta["timings_s"]["total"] = round(time.monotonic() - t_all, 1)
        self.meta["exports"] = exports
        pd.DataFrame(self.runs).to_csv(self.out / "runs.csv", index=False)
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str))
        return self.meta


def _count_lines(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _new_lines(path: Path, start: int, expect: int, timeout: float = 15.0) -> list[dict]:
    """The gateway log's lines after the first ``start``, waiting up to ``timeout`` s for ``expect`` of them (the
    gateway writes its log from a background thread, after the answer's last byte)."""
    t0 = time.monotonic()
    while _count_lines(path) - start < expect and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    time.sleep(0.5)  # a late extra line (a duplicate) must show up too
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[start:]
    return [json.loads(x) for x in lines if x.strip()]
