"""The reservation bound's split-conformal calibration: offsets, where the model applies them, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LLMS

ROOT = Path(__file__).resolve().parents[1]


def test_conformal_offset_is_the_ceil_n_plus_1_q_th_score():
    from lenpred.calibration import conformal_offset

    scores = np.arange(1, 100, dtype=float)[::-1]  # 99 scores, unsorted
    assert conformal_offset(scores, 0.9) == 90.0  # ⌈100 × 0.9⌉ = 90th smallest
    assert conformal_offset(scores, 0.999) == 99.0  # past the largest: the largest
    with pytest.raises(ValueError, match="no held-out answers"):
        conformal_offset([], 0.9)


def test_config_rejects_offsets_that_do_not_fit_its_llms():
    from configuration_lenpred import LenPredConfig

    with pytest.raises(ValueError, match="one offset per LLM"):
        LenPredConfig(llm_names=LLMS, bound_offsets={"0.9": [0.1]})
    with pytest.raises(ValueError, match="quantile in"):
        LenPredConfig(llm_names=LLMS, bound_offsets={"1.5": [0.1] * len(LLMS)})


def test_predict_applies_the_offsets_of_the_quantile_asked_for(varied_model, tokenizer):
    prompts = ["Write a poem.", "Explain the theory of everything in detail."]
    raw = varied_model.predict(prompts, tokenizer)
    assert not raw.bound_calibrated
    offsets = [0.5, -0.2, 1.0]
    varied_model.config.bound_offsets = {"0.99": offsets}
    calibrated = varied_model.predict(prompts, tokenizer)
    assert calibrated.bound_calibrated and calibrated.reservation_quantile == 0.99
    expected = torch.expm1(torch.log1p(raw.bound) + torch.tensor(offsets))
    torch.testing.assert_close(calibrated.bound, expected)
    one = varied_model.predict(prompts, tokenizer, llms=LLMS[2])  # the offset follows the LLM, not the column
    torch.testing.assert_close(one.bound[:, 0], expected[:, 2])
    p90 = varied_model.predict(prompts, tokenizer, quantile=0.9)  # no offsets for 0.9: the raw log-normal quantile
    assert not p90.bound_calibrated and (p90.bound < raw.bound).all()


def test_fit_bound_offsets_reaches_the_quantile_on_its_rows(varied_model, tokenizer, castillo_dir, caplog):
    from lenpred.calibration import fit_bound_offsets
    from lenpred.data import load_castillo

    rows = load_castillo(castillo_dir)
    few = rows["llm"] == LLMS[2]
    rows = rows[~few | (rows["prompt_id"] == rows.loc[few, "prompt_id"].iloc[0])]  # one prompt (10 answers) for LLMS[2]
    with caplog.at_level("INFO", logger="lenpred.calibration"):
        offsets = fit_bound_offsets(varied_model, tokenizer, rows, quantiles=(0.5, 0.9))
    assert set(offsets) == {"0.5", "0.9"} and all(len(v) == len(LLMS) for v in offsets.values())
    assert "takes the pooled offset" in caplog.text and LLMS[2] in caplog.text
    varied_model.config.bound_offsets = offsets
    pred = varied_model.predict(sorted(set(rows["prompt_text"])), tokenizer, quantile=0.9)
    index = {t: i for i, t in enumerate(sorted(set(rows["prompt_text"])))}
    for j, llm in enumerate(LLMS[:2]):  # each LLM with enough answers covers ≥ 90 % of its own answers
        mine = rows[rows["llm"] == llm]
        bound = pred.bound[[index[t] for t in mine["prompt_text"]], j].numpy()
        sizes = np.stack(mine["output_sizes"].map(np.asarray).to_list())
        assert (sizes <= bound[:, None]).mean() >= 0.9
    blank = rows.assign(output_sizes=[None] * len(rows))
    with pytest.raises(ValueError, match="needs held-out rows with output_sizes"):
        fit_bound_offsets(varied_model, tokenizer, blank)
    with pytest.raises(ValueError, match="no held-out rows"):  # e.g. a dev split of none
        fit_bound_offsets(varied_model, tokenizer, rows.iloc[:0])


def test_pipeline_p99_class_is_the_prompts_own_p99_not_the_calibrated_bound(varied_model, tokenizer):
    from pipeline_lenpred import LenPredPipeline
    from prediction_lenpred import lognormal_quantile

    varied_model.config.reservation_quantile = 0.5
    varied_model.config.bound_offsets = {"0.5": [0.0] * 3, "0.99": [3.0] * 3}  # a calibrated p99 far above
    pipe = LenPredPipeline(model=varied_model, tokenizer=tokenizer)
    row = pipe("Write a poem.", llm=LLMS[0])[0]
    assert row["reservation_quantile"] == "p50" and row["bound_calibrated"] is True
    own = float(lognormal_quantile(torch.tensor(row["predicted_mean"]), torch.tensor(row["predicted_std"]), 0.99))
    calibrated = float(varied_model.predict(["Write a poem."], tokenizer, llms=LLMS[0], quantile=0.99).bound[0, 0])
    assert calibrated > own
    out = pipe.predict_response_length("Write a poem.", LLMS[0], task="classification")
    edges = varied_model.config.bin_edges
    assert out["predicted_p99_class"] == sum(e <= own for e in edges) - 1
    assert out["predicted_p99_class"] >= sum(e <= row["upper_bound"] for e in edges) - 1  # the p50 bound's bin


def test_cli_calibrates_an_export_in_place(varied_model, tokenizer, castillo_dir, tmp_path, capsys):
    from lenpred.hub import export_model

    export_model(varied_model, tokenizer, tmp_path / "export")
    run = subprocess.run([sys.executable, "-m", "lenpred", "calibrate", str(tmp_path / "export"), "--dataset",
                          str(castillo_dir), "--quantiles", "0.8", "--reservation-quantile", "0.7"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert set(config["bound_offsets"]) == {"0.8", "0.7"}  # asked for, and the model's new reservation_quantile
    assert config["reservation_quantile"] == 0.7
    assert "q=0.8" in run.stdout
    from lenpred.calibration import main

    export = str(tmp_path / "export")
    for argv, message in (([export, "--quantiles", "0.9,high"], "--quantiles must be comma-separated numbers"),
                          ([export, "--reservation-quantile", "1.2"], "--reservation-quantile must be in [0.5, 1)"),
                          ([str(tmp_path / "nope")], "is not an export folder here")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
