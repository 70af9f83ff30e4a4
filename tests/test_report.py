"""The evaluation report: hand-checked cells, JSON/Markdown/card agreement, and one end-to-end `evaluate.py` run."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import kendalltau

from configuration_lenpred import make_bin_edges
from lenpred.data import PAPER_LLMS
from lenpred.model_card import MODEL_INDEX_DIGITS, render_card, write_cards
from lenpred.report import ALL_LLMS, build_results, render_markdown, score_method, write_json

REPO = Path(__file__).resolve().parents[1]
LLMS = [PAPER_LLMS[0], "acme/other-llm"]
SETS = ["Mbpp", "DollyDataset", "Alpaca"]


def make_rows(n_prompts=5, seed=0) -> pd.DataFrame:
    """`n_prompts` prompts per set × 2 LLMs, 10 sampled sizes each, in the normalised row schema."""
    rng = np.random.default_rng(seed)
    recs = []
    for s in SETS:
        for i in range(n_prompts):
            for llm in LLMS:
                sizes = rng.integers(5, 1500, size=10).tolist()
                recs.append({"prompt_id": f"{s}-{i}-{seed}", "prompt_text": f"Question {i} about {s}, seed {seed}?",
                             "llm": llm, "prompt_set": s, "input_size": 10, "output_sizes": sizes,
                             "output_mean": float(np.mean(sizes)), "output_std": float(np.std(sizes))})
    return pd.DataFrame(recs)


@pytest.fixture
def scored():
    """Rows with synthetic predictions for two methods: `lenpred` (with bin head and bound) and `median`."""
    rows = make_rows()
    rng = np.random.default_rng(1)
    n = len(rows)
    rows["lenpred_mean"] = rng.uniform(10, 1500, n)
    rows["lenpred_std"] = rng.uniform(10, 500, n)
    rows["lenpred_bound"] = rng.uniform(100, 3000, n)
    rows["lenpred_p99"] = rows["lenpred_bound"] * rng.uniform(1.0, 2.0, n)  # the 0.99 bound, above the reservation's
    rows["lenpred_bin"] = rng.integers(0, 3, n)
    rows["median_mean"] = rows.groupby(["llm", "prompt_set"])["output_mean"].transform("median")
    rows["median_std"] = 100.0
    rows["subset"] = np.where(rows["prompt_set"] == "Alpaca", "alpaca", "in_distribution")
    return rows


def test_score_method_cells_by_hand(scored):
    part = scored[(scored["llm"] == LLMS[1]) & (scored["subset"] == "in_distribution")]
    sc = score_method(part, "lenpred", head_bin_size=500)
    t, p = part["output_mean"].to_numpy(), part["lenpred_mean"].to_numpy()
    assert sc["n"] == len(part) == 10
    assert sc["regression"]["mae_mean"] == pytest.approx(np.abs(t - p).mean())
    assert sc["regression"]["mse_std"] == pytest.approx(((part["output_std"] - part["lenpred_std"]) ** 2).mean())
    # bin size 100: the bin of the predicted mean; bin size 500: the bin head's argmax
    assert sc["classification"]["100"]["accuracy"] == pytest.approx(np.mean(t // 100 == p // 100))
    assert sc["classification"]["500"]["accuracy"] == pytest.approx(np.mean(t // 500 == part["lenpred_bin"]))
    assert sc["classification"]["500"]["source"] == "bin head"
    assert sc["classification"]["100"]["source"] == "predicted mean"
    # the targets' acc@500 (bin of the predicted mean) is kept beside the bin head's; for other sizes they are one
    assert sc["classification"]["500"]["accuracy_mean_bin"] == pytest.approx(np.mean(t // 500 == p // 500))
    assert sc["classification"]["500"]["accuracy_mean_bin"] != sc["classification"]["500"]["accuracy"]
    assert sc["classification"]["100"]["accuracy_mean_bin"] == sc["classification"]["100"]["accuracy"]
    sizes = np.stack(part["output_sizes"].to_numpy())
    p99 = np.percentile(sizes, 99, axis=1)
    edges = make_bin_edges(500)
    expect = np.mean(np.searchsorted(edges, part["lenpred_p99"], "right") == np.searchsorted(edges, p99, "right"))
    assert sc["p99_bin_accuracy"] == pytest.approx(expect)
    assert sc["bound_coverage"] == pytest.approx(np.mean(sizes <= part["lenpred_bound"].to_numpy()[:, None]))
    inside = np.abs(sizes - p[:, None]) <= part["lenpred_std"].to_numpy()[:, None]
    assert sc["coverage_1sigma"] == pytest.approx(inside.mean())
    by_set = {s: np.abs(t - p)[part["prompt_set"].to_numpy() == s].mean() for s in ("Mbpp", "DollyDataset")}
    assert sc["mae_by_prompt_set"] == pytest.approx(by_set)
    tau = {s: kendalltau(t[m], p[m]).statistic for s in by_set for m in [part["prompt_set"].to_numpy() == s]}
    assert sc["tau_by_prompt_set"] == pytest.approx(tau)
    assert sc["kendall_tau_b"] == pytest.approx((tau["Mbpp"] * 5 + tau["DollyDataset"] * 5) / 10)
    # no bin or bound column: every size is mean-derived, no p99 accuracy, no bound coverage
    med = score_method(part, "median", head_bin_size=500)
    assert med["classification"]["500"]["source"] == "predicted mean"
    assert med["p99_bin_accuracy"] is None and med["bound_coverage"] is None
    assert med["kendall_tau_b"] == 0.0 and set(med["tau_by_prompt_set"].values()) == {0.0}  # constant within sets
    assert score_method(part.assign(lenpred_mean=np.nan), "lenpred") is None


def _report(scored) -> dict:
    subsets = {n: scored[scored["subset"] == n] for n in ("in_distribution", "alpaca")}
    meta = {"model": "tiny", "dataset": "fixture", "command": "python evaluate.py --model tiny", "date": "today",
            "head_bin_size": 500, "trained_bin_size": 500, "bin_sizes": [50, 100, 200, 500, 1000],
            "bin_max_tokens": 4000, "reservation_quantile": 0.99, "nominal_1sigma": 0.6827, "nominal_2sigma": 0.9545,
            "llms": LLMS, "test_rows": len(scored), "test_prompts": 15, "pool_rows": 1, "pool_prompts": 1,
            "methods": ["lenpred", "median"], "notes": ["a note"], "wall_time_s": 1.5, "timings_s": {"load": 1.0}}
    return {"meta": meta, "results": build_results(subsets, ["lenpred", "median"], LLMS, 500),
            "model_config": {"llm_names": LLMS, "encoder_layers": 2}}


def test_build_results_layout_and_published_figures(scored):
    res = _report(scored)["results"]
    assert list(res["in_distribution"]) == [*LLMS, ALL_LLMS]  # the paper's Llama first, pooled row last
    llama = res["in_distribution"][PAPER_LLMS[0]]
    assert llama["paper"]["classification"]["50"]["accuracy"] == pytest.approx(0.1681)
    assert res["alpaca"][PAPER_LLMS[0]]["paper"]["regression"]["mae_mean"] == pytest.approx(163.87)
    assert "paper" not in res["in_distribution"][LLMS[1]]
    assert llama["noise_floor"]["n_rows"] == 10 and res["alpaca"][ALL_LLMS]["n_rows"] == 10
    assert res["in_distribution"][ALL_LLMS]["lenpred"]["n"] == 20
    # ordering by prompt length is scored for ranking only; the fixture's constant input_size ranks nothing
    assert res["in_distribution"][LLMS[1]]["prompt_length"] == {
        "kendall_tau_b": 0.0, "tau_by_prompt_set": {"Mbpp": 0.0, "DollyDataset": 0.0}}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def assert_md_matches_json(md: str, report: dict):
    values = list(_numbers(report))
    cells = [part.strip() for line in md.splitlines() if line.startswith("| ") for c in line.strip("|").split("|")
             for part in c.split(" ± ")]  # "mean ± std" cells: both numbers come from the JSON
    checked = 0
    for cell in cells:
        if not re.fullmatch(r"-?\d+(\.\d+)?", cell):
            continue
        d = len(cell.split(".")[1]) if "." in cell else 0
        assert any(f"{v:.{d}f}" == cell or f"{100 * v:.{d}f}" == cell for v in values), cell
        checked += 1
    assert checked > 50


def test_markdown_is_rendered_from_json(scored, tmp_path):
    path = write_json(_report(scored), tmp_path / "report.json")
    report = json.loads(path.read_text())
    md = render_markdown(report)
    assert "python evaluate.py --model tiny" in md and "today" in md and "published, not measured here" in md
    assert "Kendall τ-b per prompt set" in md and "| Prompt length (input_size; ranking only) |" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {LLMS[1].split('/')[-1]} | LenPred"))
    of_mean = report["results"]["in_distribution"][LLMS[1]]["lenpred"]["classification"]["500"]["accuracy_mean_bin"]
    assert "Acc@500, bin of the mean (%)" in md and row.rstrip(" |").endswith(f"{100 * of_mean:.2f}")
    assert_md_matches_json(md, report)


def assert_card_matches_json(card: str, report: dict):
    assert "{{" not in card and "&id0" not in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["datasets"] == ["danfperam/castillo"]
    results = front["model-index"][0]["results"]
    assert results
    size = str(report["meta"]["head_bin_size"])
    for res in results:
        subset = "alpaca" if "Alpaca" in res["dataset"]["name"] else "in_distribution"
        for m in res["metrics"]:
            who = m["name"].rsplit(", ", 1)[1]
            sc = report["results"][subset][ALL_LLMS if who == "all LLMs" else who]["lenpred"]
            want = (sc["classification"][size][m["type"]] if m["type"] in ("accuracy", "f1")
                    else sc["regression"]["mae_mean" if "mean" in m["name"] else "mae_std"])
            assert m["value"] == round(want, MODEL_INDEX_DIGITS[m["type"]])


def test_card_model_index_matches_json(scored, tmp_path):
    report = json.loads(write_json(_report(scored), tmp_path / "r.json").read_text())
    card = render_card(report)
    assert_card_matches_json(card, report)
    assert "--scheduling-policy priority" in card and "2505.16881" in card
    written = write_cards(report, tmp_path / "a.md", None, tmp_path / "x" / "README.md")
    assert [p.name for p in written] == ["a.md", "README.md"] and (tmp_path / "x" / "README.md").read_text() == card
    report["model_config"].update(max_length=256, prompt_tail_tokens=64, use_prompt_length=True,
                                  full_prompt_length=True)
    assert ("cut to their first 192 and last 64 tokens. The log of the prompt's length in encoder tokens is an "
            "input too, counted before the cut.") in render_card(report)


def test_unknown_placeholder_is_an_error(scored, tmp_path):
    (tmp_path / "t.md").write_text("{{ no_such_value }}")
    with pytest.raises(KeyError, match="no_such_value"):
        render_card(_report(scored), tmp_path / "t.md")


# ---------------------------------------------------------------------------------------------- end to end
class FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose replies cycle through good, malformed and broken answers."""

    replies = ["[42]: Sure, here it is.", "I cannot say how long.", None, "120 tokens: An answer."]
    count = 0

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = self.replies[FakeChat.count % len(self.replies)]
        FakeChat.count += 1
        body = b"garbage, not json" if reply is None else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _write_castillo(folder: Path):
    folder.mkdir()
    for split, seed, n in (("train", 1, 8), ("validation", 2, 2), ("test", 3, 4)):
        rows = make_rows(n, seed)
        pd.DataFrame({"sample_id": [f"{p}-{m}" for p, m in zip(rows["prompt_id"], rows["llm"])],
                      "prompt_id": rows["prompt_id"], "model": rows["llm"], "dataset": rows["prompt_set"],
                      "prompt_text": rows["prompt_text"], "input_size": rows["input_size"],
                      "output_sizes": rows["output_sizes"], "output_mean": rows["output_mean"],
                      "output_std": rows["output_std"]}).to_parquet(folder / f"{split}.parquet")


def _tiny_export(path: Path):
    import torch
    from transformers import AutoTokenizer, BertConfig

    from configuration_lenpred import LenPredConfig
    from lenpred.hub import default_encoder_path, export_model
    from modeling_lenpred import LenPredModel

    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(0)
    enc = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64).to_diff_dict()
    model = LenPredModel(LenPredConfig(encoder_config=enc, llm_names=LLMS, end_dim=16, head_hidden_dim=16))
    export_model(model, tok, path)
    state = {"global_step": 4, "epoch": 2.0, "log_history": [{"step": 2, "loss": 3.0, "learning_rate": 1e-4},
                                                             {"step": 2, "eval_loss": 2.5}, {"step": 4, "loss": 2.0}]}
    (path / "trainer_state.json").write_text(json.dumps(state))


def test_evaluate_end_to_end(tmp_path):
    data, export, out = tmp_path / "castillo", tmp_path / "export", tmp_path / "reports"
    _write_castillo(data)
    _tiny_export(export)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "evaluate.py"), "--model", str(export), "--dataset", str(data), "--out",
             str(out), "--cache-dir", str(tmp_path / "cache"), "--baseline-endpoint",
             f"http://127.0.0.1:{server.server_port}/v1", "--baseline-model", "other-llm"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    counts = report["meta"]["prompt_baseline"]["counts"]
    assert counts == {"ok": 6, "malformed": 3, "failed": 3}  # 12 test prompts of acme/other-llm, 4 reply kinds
    other = report["results"]["in_distribution"]["acme/other-llm"]
    assert other["prompt"]["n"] + report["results"]["alpaca"]["acme/other-llm"]["prompt"]["n"] == 6
    assert {"lenpred", "median", "knn"} <= set(other) and "prompt" not in report["results"]["alpaca"][LLMS[0]]
    md = (out / "report.md").read_text()
    assert "python evaluate.py --model" in md and report["meta"]["date"] in md
    assert report["meta"]["dataset"] == str(data)  # as given on the command line
    weights = hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()
    assert report["meta"]["weights_sha256"] == weights and f"- Weights: sha256 `{weights}`" in md
    fcfs = next(line for line in md.split("### Load 0.9")[1].splitlines() if line.startswith("| fcfs |"))
    assert re.search(r"\| \d+\.\d\d ± \d+\.\d\d \|", fcfs) and "0.0 ± 0.0" in fcfs  # spread over seeds shown
    assert_md_matches_json(md, report)
    for rel in report["figures"].values():
        assert (out / rel).stat().st_size > 1000
    assert "figures/loss_curves.png" in report["figures"].values()
    card = (export / "README.md").read_text()
    assert card == (out / "model_card.md").read_text()
    assert_card_matches_json(card, report)
    assert_metric_module_matches_report(out, report)


METRIC_SCRIPT = """
import json, sys
import evaluate
import pandas as pd
rows = pd.read_parquet(sys.argv[1])
rows = rows[(rows["llm"] == "acme/other-llm") & (rows["subset"] == "in_distribution")]
metric = evaluate.load("metrics/length_prediction")
kw = dict(predictions=rows["lenpred_mean"].tolist(), references=[list(s) for s in rows["output_sizes"]],
          predicted_std=rows["lenpred_std"].tolist(), predicted_bound=rows["lenpred_bound"].tolist(),
          groups=(rows["llm"] + "|" + rows["prompt_set"]).tolist(), bin_size=500)
print(json.dumps({"of_mean": metric.compute(**kw),
                  "of_head": metric.compute(**kw, predicted_bins=rows["lenpred_bin"].tolist())}))
"""


def assert_metric_module_matches_report(out: Path, report: dict):
    """`evaluate.load("metrics/length_prediction")`, offline and from the repository root as the model card shows
    it, scores evaluate.py's saved predictions to the report's own figures."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf-home")}
    proc = subprocess.run([sys.executable, "-c", METRIC_SCRIPT, str(out / "predictions.parquet")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = report["results"]["in_distribution"]["acme/other-llm"]["lenpred"]
    assert report["meta"]["head_bin_size"] == 500 and None not in (want["bound_coverage"], want["regression"]["mae_std"])
    for key in ("mae_mean", "mse_mean", "mae_std", "mse_std"):
        assert got["of_mean"][key] == pytest.approx(want["regression"][key], rel=1e-9)
    for key in ("kendall_tau_b", "coverage_1sigma", "coverage_2sigma", "bound_coverage"):
        assert got["of_mean"][key] == pytest.approx(want[key], rel=1e-9)
    assert got["of_mean"]["accuracy"] == pytest.approx(want["classification"]["500"]["accuracy_mean_bin"])
    assert got["of_head"]["accuracy"] == pytest.approx(want["classification"]["500"]["accuracy"])
    assert got["of_head"]["f1"] == pytest.approx(want["classification"]["500"]["f1"])
    assert got["of_mean"]["n"] == want["n"]
