"""Tests for lenpred.scheduling: the policy orderings hold, every counter moves when it should,
and the simulator is deterministic. Synthetic traces only, so the tests run in seconds."""
import numpy as np
import pandas as pd
import pytest

from lenpred.figures import plot_sweep
from lenpred.scheduling import (DEFAULT_POLICIES, SimConfig, default_policies, main, server_capacity, simulate,
                                summarize, sweep)


def synth(n=1500, n_llm=2, seed=0, mu=5.0, sigma_prompt=1.0, sigma_sample=0.3):
    """Lognormal lengths: prompts differ a lot (sigma 1), samples of one prompt differ little (0.3),
    so a prompt's mean is a good prediction and predictions matter."""
    rng = np.random.default_rng(seed)
    llm = np.array([f"llm{i}" for i in range(n_llm)])[rng.integers(0, n_llm, n)]
    m = rng.normal(mu, sigma_prompt, n)
    sizes = [np.maximum(1, np.round(np.exp(rng.normal(mi, sigma_sample, 10)))).astype(int).tolist() for mi in m]
    df = pd.DataFrame(dict(llm=llm, input_size=rng.integers(20, 800, n), output_sizes=sizes))
    df["pred_mean"] = [float(np.mean(s)) for s in sizes]
    df["pred_bound"] = [float(np.max(s)) * 1.2 for s in sizes]
    df["knn_mean"] = df["pred_mean"] * np.exp(rng.normal(0, 0.7, n))
    df["rand"] = rng.random(n)
    return df


@pytest.fixture(scope="module")
def df():
    return synth()


def mean_ct(df, order, col=None, memory="max_tokens", bound=None, load=0.9, seeds=(0, 1, 2), cfg=None):
    return np.mean([simulate(df, order, col, memory, bound, load, cfg, s)["mean_completion_s"] for s in seeds])


def test_oracle_le_spf_good_lt_fcfs(df):
    fcfs, spf, oracle = mean_ct(df, "fcfs"), mean_ct(df, "spf", "pred_mean"), mean_ct(df, "oracle")
    assert oracle <= spf * 1.01
    assert spf < 0.9 * fcfs  # a real gain, not noise


def test_random_predictions_worse_than_oracle_and_good(df):
    rand, spf, oracle = mean_ct(df, "spf", "rand"), mean_ct(df, "spf", "pred_mean"), mean_ct(df, "oracle")
    assert rand > oracle * 1.1 and rand > spf * 1.1


def test_aging_bounds_longest_wait():
    # 5 long requests among 3,000 short ones near saturation. Under SPF a long one waits until a
    # busy period of short ones ends. Aging lifts it after (pred gap / aging_rate) ~ 3 s of waiting.
    rng = np.random.default_rng(0)
    long = np.arange(3005) < 5
    sizes = [[3000] * 10 if lg else [int(x)] * 10 for lg, x in zip(long, rng.integers(10, 40, 3005))]
    adv = pd.DataFrame(dict(llm="a", input_size=100, output_sizes=sizes, pred=np.where(long, 3000.0, 20.0)))
    cfg = SimConfig(aging_rate=1000.0)
    spf = simulate(adv, "spf", "pred", load=0.98, config=cfg, seed=0)
    aged = simulate(adv, "spf_aging", "pred", load=0.98, config=cfg, seed=0)
    assert aged["max_wait_s"] < 0.5 * spf["max_wait_s"]
    assert spf["n_requests"] == aged["n_requests"] == 3005


def test_predicted_reservation_admits_more(df):
    cfg = SimConfig()
    mt = simulate(df, "fcfs", None, "max_tokens", None, 0.95, cfg, 0)
    pr = simulate(df, "fcfs", None, "predicted", "pred_bound", 0.95, cfg, 0)
    batch_limit = cfg.kv_capacity // (df["input_size"].min() + cfg.max_tokens)
    assert mt["max_running"] <= batch_limit < pr["max_running"]
    assert mt["preemptions"] == 0 and pr["mean_completion_s"] < mt["mean_completion_s"]


def test_under_predicting_bound_causes_preemptions(df):
    under = df.assign(tiny=1.0)
    # load is relative to the max_tokens-reservation capacity; a 1-token bound admits ~10x more,
    # so memory only fills (and running requests outgrow it) far above load 1.
    cfg = SimConfig(kv_capacity=16_384)
    bad = simulate(under, "fcfs", None, "predicted", "tiny", 8.0, cfg, 0)
    good = simulate(df, "fcfs", None, "predicted", "pred_bound", 8.0, cfg, 0)
    safe = simulate(df, "fcfs", None, "max_tokens", None, 8.0, cfg, 0)
    assert bad["preemptions"] > good["preemptions"] and bad["preemptions"] > 0
    assert 0 < bad["preempted_share"] <= 1 and bad["preemptions"] >= bad["preempted_share"] * len(df)
    assert safe["preemptions"] == 0
    assert bad["n_requests"] == len(df)  # every request still completes


def test_truncation_counted_at_max_tokens():
    sizes = [[500] * 10] * 30 + [[50] * 10] * 70
    d = pd.DataFrame(dict(llm="a", input_size=10, output_sizes=sizes))
    r = simulate(d, "fcfs", load=0.7, config=SimConfig(max_tokens=100), seed=3)
    assert r["truncated"] == 30
    assert r["throughput_tps"] * r["makespan_s"] == pytest.approx(30 * 100 + 70 * 50)


def test_deterministic_with_seed(df):
    a = simulate(df, "spf_aging", "pred_mean", "predicted", "pred_bound", 0.9, None, 7)
    b = simulate(df, "spf_aging", "pred_mean", "predicted", "pred_bound", 0.9, None, 7)
    c = simulate(df, "spf_aging", "pred_mean", "predicted", "pred_bound", 0.9, None, 8)
    assert a == b and a != c


def test_capacity_is_meaningful():
    # Overload under max_tokens reservation: throughput saturates near the defined capacity.
    d = synth(3000, 1, seed=2)
    r = simulate(d, "fcfs", load=1.5, seed=0)
    assert 0.85 < r["throughput_rps"] / r["capacity_rps"] < 1.05
    rps, batch = server_capacity(400, 200, SimConfig())
    assert batch == 65_536 // (400 + 4_096) and rps > 0


def test_sweep_summarize_plot(df, tmp_path):
    pol = {k: DEFAULT_POLICIES[k] for k in ("fcfs", "spf_pred", "oracle")}
    res = sweep(df, pol, loads=(0.7, 0.9), seeds=(0, 1), progress=False)
    assert len(res) == 3 * 2 * 2
    s = summarize(res).set_index(["policy", "load"])
    assert len(s) == 6
    for load in (0.7, 0.9):
        assert s.loc[("oracle", load), "share_of_oracle_gain"] == pytest.approx(1.0)
        assert s.loc[("fcfs", load), "share_of_oracle_gain"] == pytest.approx(0.0)
        assert s.loc[("fcfs", load), "gain_pct_mean"] == 0.0
    assert s.loc[("oracle", 0.9), "gain_pct_mean"] > 0
    path = plot_sweep(summarize(res), str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_default_policies_columns():
    p = default_policies(pred_col="a", bound_col=None, knn_col=None, prompt_col="input_size")
    assert p["spf_pred"] == ("spf", "a", "max_tokens", None) and "spf_knn" not in p
    assert not any(v[2] == "predicted" for v in p.values())


def test_clear_value_errors(df):
    with pytest.raises(ValueError, match="unknown order"):
        simulate(df, "lifo")
    with pytest.raises(ValueError, match="unknown memory"):
        simulate(df, "fcfs", memory="infinite")
    with pytest.raises(ValueError, match="unknown order 'spf' column 'nope'"):
        simulate(df, "spf", "nope")
    with pytest.raises(ValueError, match="needs a column"):
        simulate(df, "spf_aging", None)
    with pytest.raises(ValueError, match="unknown memory 'predicted' column"):
        simulate(df, "fcfs", None, "predicted", "pred_bnd")
    with pytest.raises(ValueError, match="must be"):
        sweep(df, {"x": ("fcfs", None)}, progress=False)
    res = sweep(df, {"spf": DEFAULT_POLICIES["spf_pred"]}, loads=(0.5,), seeds=(0,), progress=False)
    with pytest.raises(ValueError, match="baseline"):
        summarize(res)


def test_cli(df, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    path = tmp_path / "req.csv"
    df.head(300).to_csv(path, index=False)  # output_sizes becomes text; the CLI parses it back
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--loads", "0.9", "--seeds", "0", "--no-progress"]) == 0
    summ = pd.read_csv(out / "summary.csv")
    assert {"fcfs", "spf_pred", "spf_knn", "oracle", "spf_pred+bound_mem"} <= set(summ["policy"])
    assert (out / "sweep.png").stat().st_size > 0 and (out / "summary.json").exists()


def test_cli_reads_the_reports_columns_and_rejects_absent_ones(df, tmp_path, capsys):
    # The report's predictions.parquet names its columns lenpred_mean / lenpred_bound: found without flags.
    path = tmp_path / "predictions.parquet"
    df.head(200).rename(columns={"pred_mean": "lenpred_mean", "pred_bound": "lenpred_bound"}).drop(
        columns="knn_mean").to_parquet(path)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--loads", "0.9", "--seeds", "0", "--no-progress"]) == 0
    summ = pd.read_csv(out / "summary.csv")
    assert {"spf_pred", "spf_pred+bound_mem"} <= set(summ["policy"]) and "spf_knn" not in set(summ["policy"])
    assert "no column knn_mean" in capsys.readouterr().err  # a default that is absent is said, not hidden
    with pytest.raises(SystemExit) as e:  # a column named on the command line must exist
        main([str(path), "--out", str(out), "--pred-col", "pred_mean", "--no-progress"])
    assert e.value.code == 2 and "'pred_mean' is not a column" in capsys.readouterr().err


def test_backlog_shows_what_the_bound_admits(df, tmp_path):
    # load=inf queues every request at t = 0: the server never runs short of work, so the bound's
    # extra concurrency shows in full, and ordering by a good prediction cuts completion time.
    cfg = SimConfig()
    pol = {k: DEFAULT_POLICIES[k] for k in ("fcfs", "spf_pred", "oracle", "fcfs+bound_mem")}
    res = sweep(df, pol, loads=(0.9, float("inf")), seeds=(0,), config=cfg, progress=False)
    backlog = res[np.isinf(res["load"])].set_index("policy")
    assert backlog.loc["fcfs", "mean_running"] <= cfg.kv_capacity // (df["input_size"].min() + cfg.max_tokens)
    assert backlog.loc["fcfs+bound_mem", "mean_running"] > 2 * backlog.loc["fcfs", "mean_running"]
    assert backlog.loc["spf_pred", "mean_completion_s"] < 0.9 * backlog.loc["fcfs", "mean_completion_s"]
    assert (backlog["n_requests"] == len(df)).all()
    s = summarize(res)
    assert open(plot_sweep(s, str(tmp_path / "p.png")), "rb").read(4) == b"\x89PNG"  # inf is left off the plot
    from lenpred.report import render_scheduling, to_jsonable

    sched = {"notes": ["n"], "summary": to_jsonable(s.to_dict(orient="records"))}  # inf → None, as in report.json
    text = render_scheduling(sched)
    assert "### Load 0.9" in text and text.index("### Load 0.9") < text.index("### Backlog")
