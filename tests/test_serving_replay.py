"""The serving benchmark's pure parts, with fakes: pools, arrivals, policy priorities, the streaming client and its
exactly-once checks, the summary math, the simulator fit and the report. No vLLM, no gateway, no model."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pandas as pd
import pytest

from benchmarks.serving import analysis, client, workload
from benchmarks.serving.simcompare import compare, fit_sim_config, simulate_run
from lenpred.scheduling import SimConfig, simulate


def _prompts(n=60):
    sets = ["Alpaca", "Mbpp", "DollyDataset"]
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "prompt_text": [f"prompt {i}" for i in range(n)],
                         "prompt_set": [sets[i % 3] for i in range(n)]})


def test_pools_are_disjoint_fixed_and_keep_the_alpaca_share():
    p = workload.sample_pools(_prompts(), 12, 9, 18, seed=3, alpaca_share=1 / 3)
    ids = [set(x["prompt_id"]) for x in (p.eval, p.holdout, p.adapt)]
    assert [len(i) for i in ids] == [12, 9, 18]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert (p.eval["prompt_set"] == "Alpaca").sum() == 4
    again = workload.sample_pools(_prompts(), 12, 9, 18, seed=3, alpaca_share=1 / 3)
    assert again.eval["prompt_id"].tolist() == p.eval["prompt_id"].tolist()
    assert set(p.unseen()["prompt_id"]) == ids[0] | ids[1]
    with pytest.raises(ValueError, match="need"):
        workload.sample_pools(_prompts(10), 5, 5, 5)


def test_arrivals_poisson_rate_backlog_and_seeded():
    a = workload.arrival_times(4000, 0.5, 2.0, seed=1)
    assert a[0] == 0 and np.all(np.diff(a) >= 0)
    assert np.mean(np.diff(a)) == pytest.approx(1.0, rel=0.06)  # rate = load x capacity = 1 request/s
    assert np.array_equal(a, workload.arrival_times(4000, 0.5, 2.0, seed=1))
    assert not np.array_equal(a, workload.arrival_times(4000, 0.5, 2.0, seed=2))
    assert np.all(workload.arrival_times(5, math.inf, 0.0, seed=0) == 0)
    with pytest.raises(ValueError):
        workload.arrival_times(5, 0.0, 1.0, 0)


def test_policy_priorities_and_trace():
    assert workload.client_priority("fcfs") == 0
    assert workload.client_priority("prompt_len", prompt_tokens=37) == 37
    assert workload.client_priority("oracle", ref_tokens=12) == 12
    assert workload.client_priority("lenpred") is None and workload.client_priority("lenpred_adapted") is None
    with pytest.raises(ValueError):
        workload.client_priority("oracle")
    with pytest.raises(ValueError):
        workload.client_priority("sjf")
    pool = _prompts(6)
    ref = pd.DataFrame({"prompt_tokens": [10, 20, 30, 40, 50, 60], "tokens": [6, 5, 4, 3, 2, 1]},
                       index=pool["prompt_id"])
    t = workload.make_trace(pool, "oracle", 0.9, 1.0, seed=4, reference=ref)
    assert sorted(t["prompt_id"]) == sorted(pool["prompt_id"])
    assert (t["priority"].to_numpy() == ref.loc[t["prompt_id"], "tokens"].to_numpy()).all()
    same = workload.make_trace(pool, "prompt_len", 0.9, 1.0, seed=4, reference=ref)
    assert same["prompt_id"].tolist() == t["prompt_id"].tolist()  # one seed: one trace for every policy
    assert same["submit_s"].tolist() == t["submit_s"].tolist()
    assert workload.make_trace(pool, "lenpred", math.inf, 1.0, 0)["priority"].isna().all()


def _sse(tokens, rid):
    chunks = [{"id": rid, "choices": [{"delta": {"content": f"t{i} "}, "finish_reason": None}]} for i in range(tokens)]
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    chunks.append({"id": rid, "choices": [], "usage": {"completion_tokens": tokens, "prompt_tokens": 9}})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_client_streams_times_and_sends_priority():
    seen = []

    def handler(request: httpx.Request):
        body = json.loads(request.content)
        seen.append(body)
        n = len(body["messages"][0]["content"])
        return httpx.Response(200, text=_sse(n % 5 + 1, f"id-{n}"), headers={"content-type": "text/event-stream"})

    trace = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt_text": ["x", "yy", "zzz"],
                          "submit_s": [0.0, 0.05, 0.1], "priority": pd.array([3, None, 1], dtype="Int64")})
    rec = client.run_trace("http://gw", "m", trace, max_tokens=16, transport=httpx.MockTransport(handler))
    assert rec["tokens"].tolist() == [2, 3, 4] and rec["prompt_tokens"].tolist() == [9, 9, 9]
    assert (rec["finish_reason"] == "stop").all() and (rec["status"] == 200).all()
    assert (rec["first_s"] <= rec["last_s"]).all() and (rec["last_s"] <= rec["done_s"]).all()
    assert (rec["sent_s"] >= rec["submit_s"] - 1e-3).all()
    by_text = {b["messages"][0]["content"]: b for b in seen}
    assert by_text["x"]["priority"] == 3 and "priority" not in by_text["yy"] and by_text["zzz"]["priority"] == 1
    assert all(b["stream"] and b["temperature"] == 0 and b["max_tokens"] == 16 for b in seen)
    ok = client.exactly_once(trace, rec, [{"prompt_text": t} for t in ["zzz", "x", "yy"]])
    assert ok["ok"] and ok["answered_once"] and ok["logged_once"]


def test_exactly_once_catches_loss_duplicates_and_errors():
    trace = pd.DataFrame({"prompt_text": ["a", "b"]})
    good = pd.DataFrame({"req": [0, 1], "status": [200, 200], "error": [None, None], "finish_reason": ["stop"] * 2,
                         "tokens": [3, 4], "response_id": ["r1", "r2"]})
    assert client.exactly_once(trace, good, None)["ok"]  # no log (direct to vLLM): only the answers are checked
    assert client.exactly_once(trace, good, None)["logged_once"] is None
    assert not client.exactly_once(trace, good, [{"prompt_text": "a"}])["ok"]  # one log line missing
    assert client.exactly_once(trace, good, [{"prompt_text": "a"}, {"prompt_text": "b"}, {"prompt_text": "b"}]
                               )["log_extra"] == 1
    dup = good.assign(response_id=["r1", "r1"])
    assert client.exactly_once(trace, dup, None)["duplicate_response_ids"] == 1
    failed = good.assign(status=[200, 500], error=[None, "boom"])
    assert not client.exactly_once(trace, failed, None)["ok"]
    assert not client.exactly_once(trace, good.iloc[:1], None)["ok"]  # an unanswered request


def test_sse_parsing():
    assert client.parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert client.parse_sse_line("data: [DONE]") is None and client.parse_sse_line(": ping") is None
    assert client.parse_sse_line("data: {broken") is None


def _records(lengths, submit, first_offset=0.1, done=None):
    n = len(lengths)
    done = np.asarray(done if done is not None else np.arange(1, n + 1), float)
    return pd.DataFrame({"req": range(n), "prompt_id": [f"p{i}" for i in range(n)], "submit_s": submit,
                         "first_s": np.asarray(submit) + first_offset, "last_s": done, "done_s": done,
                         "tokens": lengths, "prompt_tokens": [10] * n, "finish_reason": ["stop"] * n,
                         "status": [200] * n, "error": [None] * n, "priority": [0] * n})


def test_run_metrics_and_summary_math():
    m = analysis.run_metrics(_records([5, 5, 5, 5], [0, 0, 0, 0], done=[1, 2, 3, 4]))
    assert m["mean_completion_s"] == 2.5 and m["p50_completion_s"] == 2.5
    assert m["throughput_rps"] == 1.0 and m["throughput_tps"] == 5.0 and m["mean_ttft_s"] == pytest.approx(0.1)
    rows = []
    for seed in (0, 1):
        for pol, jct in (("fcfs", 10.0), ("oracle", 6.0), ("lenpred", 7.0 + seed), ("prompt_len", 9.0)):
            rows.append(dict(policy=pol, load=0.9, seed=seed, mean_completion_s=jct))
    s = analysis.summarize_runs(pd.DataFrame(rows)).set_index("policy")
    assert s.loc["oracle", "gain_pct_mean"] == pytest.approx(40.0)
    assert s.loc["lenpred", "gain_pct_mean"] == pytest.approx(25.0)  # (30 % + 20 %) / 2
    assert s.loc["lenpred", "share_of_oracle_gain"] == pytest.approx(25 / 40)
    checks = analysis.bar_checks(s.reset_index(), 0.9, {"tau_adapted": 0.5, "tau_zero_shot": 0.4},
                                 lost={"runs": 3, "runs_ok": 3})
    by = {c["check"].split(":")[0] + c["target"]: c for c in checks}
    assert by["0.9>= 0.85"]["met"] is False and by["0.9> 0"]["met"] is True
    assert by["backlog>= 0.85"]["met"] is None  # no backlog run: unmeasured, not failed
    assert by["closed loop>= 0.05"]["met"] is True and by["nothing lost= 3"]["met"] is True


def test_repeatability():
    ref = pd.Series([10, 20, 30], index=["p0", "p1", "p2"])
    rec = pd.concat([_records([10, 20, 30], [0, 0, 0]), _records([10, 22, 30], [0, 0, 0])])
    r = analysis.repeatability(rec, ref)
    assert r["answers"] == 6 and r["same_length_share"] == pytest.approx(5 / 6)
    assert r["prompts_always_same_share"] == pytest.approx(2 / 3) and r["mean_abs_diff"] == pytest.approx(2 / 6)


def test_simulator_replays_given_arrivals_and_ties_in_row_order():
    req = pd.DataFrame({"llm": "x", "input_size": [1, 1, 1], "output_sizes": [[10], [1], [1]],
                        "arrival_s": [0.0, 0.0, 0.0], "p": [0, 0, 0]})
    cfg = SimConfig(step_base_ms=10, step_per_req_ms=0, step_per_ctx_token_us=0, prefill_per_token_ms=0,
                    kv_capacity=1000, max_tokens=100, max_batch=1)
    fcfs = simulate(req, "spf", "p", config=cfg, arrival_column="arrival_s")
    assert fcfs["mean_completion_s"] == pytest.approx((0.10 + 0.11 + 0.12) / 3)  # row order: the long one first
    sjf = simulate(req, "oracle", config=cfg, arrival_column="arrival_s")
    assert sjf["mean_completion_s"] == pytest.approx((0.01 + 0.02 + 0.12) / 3)
    late = simulate(req.assign(arrival_s=[0.0, 5.0, 5.0]), "fcfs", config=cfg, arrival_column="arrival_s")
    assert late["makespan_s"] == pytest.approx(5.02)
    with pytest.raises(ValueError, match="arrival"):
        simulate(req, config=cfg, arrival_column="nope")


def test_fit_sim_config_matches_the_reference_makespan():
    truth = SimConfig(step_base_ms=20, step_per_req_ms=5, step_per_ctx_token_us=0, prefill_per_token_ms=0.5,
                      kv_capacity=100_000, max_tokens=64, max_batch=4, aging_rate=0)
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 64, 40)
    ref = _records(lengths, np.zeros(40))
    ref["done_s"] = ref["submit_s"]  # only the makespan of the reference matters: set it from the true config
    span = simulate_run(ref.assign(done_s=0.0), truth)["makespan_s"]
    ref.loc[ref.index[-1], "done_s"] = span
    solo = _records([11, 21], [0.0, 0.0])
    solo["prompt_tokens"] = [10, 30]
    solo["first_s"] = 0.5 * solo["prompt_tokens"] / 1000  # prefill 0.5 ms a prompt token
    solo["last_s"] = solo["first_s"] + (solo["tokens"] - 1) * 0.025  # 25 ms a step alone = 20 + 5
    cfg, fit = fit_sim_config(solo, ref, max_num_seqs=4, max_tokens=64, kv_tokens=100_000)
    assert fit["itl_batch1_ms"] == pytest.approx(25.0) and fit["prefill_per_token_ms"] == pytest.approx(0.5)
    assert cfg.step_per_req_ms == pytest.approx(5.0, abs=0.05)
    assert fit["simulated_makespan_s"] == pytest.approx(span, rel=1e-3)
    runs = pd.DataFrame([dict(run_id=f"{p}", policy=p, load=math.inf, seed=0, mean_completion_s=1.0,
                              mean_ttft_s=0.1, makespan_s=span) for p in ("fcfs", "oracle")])
    recs = {"fcfs": ref, "oracle": ref.assign(priority=ref["tokens"])}
    _, table = compare(runs, recs, cfg)
    assert table.set_index("policy").loc["oracle", "sim_cut_pct"] > 10


def test_priority_order_tells_honoured_from_ignored():
    rec = _records([5] * 6, [0.0] * 6).assign(priority=[6, 5, 4, 3, 2, 1], first_s=[0.1, 0.2, 3, 2, 1, 0.5])
    assert analysis.priority_order(rec) < 0.5
    assert analysis.priority_order(rec.assign(first_s=[6.0, 5, 4, 3, 2, 1])) == pytest.approx(1.0)
    assert analysis.priority_order(rec, skip_first=2) == pytest.approx(1.0)  # two early starters left out
    assert math.isnan(analysis.priority_order(rec.assign(priority=0)))
