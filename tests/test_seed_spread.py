"""benchmarks/seed_spread.py: mean ± std over training seeds, the bar check, and clear errors for wrong files; and
the per-Llama scores its files hold (`probe_recipe.dev_scores`, through score_export.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import seed_spread  # noqa: E402


def scores_file(path: Path, mae: float, tau: float, acc: float, alpaca_mae: float) -> str:
    """A score_export.py --json file whose three Llamas all have these figures (MAE of 3B one token lower)."""
    def part(m):
        return {llm: {"rows": 10, "mae": m - (1 if "3B" in llm else 0), "acc500": acc, "tau": tau}
                for llm in seed_spread.LLAMAS}
    path.write_text(json.dumps({"export": {"dev": part(mae), "test": part(mae), "Alpaca": part(alpaca_mae)}}))
    return str(path)


def test_mean_std_each_seed_and_the_bar(tmp_path):
    files = [scores_file(tmp_path / "seed42.json", 116, 0.47, 0.80, 160),
             scores_file(tmp_path / "seed1.json", 120, 0.49, 0.78, 170)]
    out = tmp_path / "spread.md"
    result = seed_spread.main([*files, "--out", str(out), "--json", str(tmp_path / "spread.json")])
    text = out.read_text()
    assert result["seeds"] == ["seed42", "seed1"]
    # mean 118, sample std of (116, 120) = 2.83; 3B one token lower
    assert "118.0 ± 2.8 / 117.0 ± 2.8 / 118.0 ± 2.8" in text
    assert "0.480 ± 0.014" in text and "79.0 ± 1.4" in text
    assert "| seed42 | 116.0 / 115.0 / 116.0 |" in text
    assert f"`python benchmarks/seed_spread.py {files[0]} {files[1]} --out {out}" in text
    bar = {(r["part"], r["metric"], r["over"]): r for r in result["bar"]}
    assert bar["test", "mae", "mean"]["met"] == [True, False, False]  # 118 / 117 / 118 against 118 / 110 / 117
    assert bar["test", "tau", "mean"]["met"] == [True, True, True]
    assert bar["test", "tau", "every"]["got"] == pytest.approx([0.47] * 3)  # the worst seed
    assert bar["test", "mae", "every"]["got"] == pytest.approx([120, 119, 120])
    assert bar["Alpaca", "mae", "mean"]["met"] == [False, True, True]  # 165 / 164 / 165 against 164 / 165 / 175
    saved = json.loads((tmp_path / "spread.json").read_text())
    assert np.allclose(saved["figures"]["test"]["acc500"], [[80] * 3, [78] * 3])


def test_a_miss_never_prints_as_the_bound(tmp_path):
    """acc@500 mean 76.96 % against >= 77 prints one digit longer, so the table does not read "77.0 ... no"."""
    files = [scores_file(tmp_path / "seed42.json", 116, 0.47, 0.7696, 160),
             scores_file(tmp_path / "seed1.json", 116, 0.47, 0.7696, 160)]
    out = tmp_path / "spread.md"
    result = seed_spread.main([*files, "--out", str(out)])
    bar = {(r["part"], r["metric"], r["over"]): r for r in result["bar"]}
    assert bar["test", "acc500", "mean"]["met"] == [False, False, True]
    assert "| >= 77.0 / 80.0 / 76.0 | 76.96 / 77.0 / 77.0 | **no** / **no** / yes |" in out.read_text()


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a score_export.py --json file"),
    (json.dumps({"export": {"test": {}}}), "is not a score_export.py --json file"),
    (json.dumps({"export": {part: {llm: {"mae": 100.0, "acc500": 0.8} for llm in seed_spread.LLAMAS}  # no τ
                            for part in seed_spread.PARTS}}), "KeyError: 'tau'"),
])
def test_wrong_files_are_clear_errors(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = scores_file(tmp_path / "seed1.json", 116, 0.47, 0.8, 160)
    with pytest.raises(SystemExit, match=message):
        seed_spread.main([good, str(bad)])


def test_one_seed_or_two_files_of_one_name_are_refused(tmp_path):
    one = scores_file(tmp_path / "seed1.json", 116, 0.47, 0.8, 160)
    (tmp_path / "b").mkdir()
    twin = scores_file(tmp_path / "b" / "seed1.json", 116, 0.47, 0.8, 160)
    with pytest.raises(SystemExit, match="at least two"):
        seed_spread.main([one])
    with pytest.raises(SystemExit, match="two files are named 'seed1'"):
        seed_spread.main([one, twin])


def test_dev_scores_give_the_signed_error_per_llama():
    """score_export.py's and probe_recipe.py's scores: `bias` is the mean of predicted − true mean, per Llama."""
    import pandas as pd
    from probe_recipe import dev_scores
    llm = seed_spread.LLAMAS[0]
    sizes = [[10] * 10, [100] * 10, [400] * 10, [40] * 10]
    pred = pd.DataFrame({"llm": [llm, llm, "other/LLM", "other/LLM"], "prompt_set": ["Mbpp"] * 4,
                         "output_sizes": sizes, "output_mean": [10.0, 100.0, 400.0, 40.0],
                         "output_std": [0.0] * 4, "pred_mean": [30.0, 90.0, 300.0, 40.0]})
    with_inf = pd.concat([pred, pred.iloc[:1].assign(pred_mean=np.inf)], ignore_index=True)
    assert dev_scores(with_inf)[llm]["bias"] == pytest.approx(5.0)  # scored on the rows score_method keeps
    scores = dev_scores(pred)
    assert scores[llm]["bias"] == pytest.approx(5.0)  # (+20 − 10) / 2
    assert scores[llm]["mae"] == pytest.approx(15.0)
    assert scores["all"]["bias"] == pytest.approx((20 - 10 - 100 + 0) / 4)
    assert set(scores) == {"all", llm}
