"""train.py end to end on a tiny encoder: export, 2-process DDP, resume, a new LLM, serving logs, bad arguments."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--max_length", "32", "--end_dim", "16",
        "--head_hidden_dim", "16", "--llm_embedding_dim", "4", "--dataloader_num_workers", "0"]


def train(args, tmp_path: Path, launcher=(sys.executable,), env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([*launcher, str(ROOT / "train.py"), *TINY, *map(str, args)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_train_exports_a_loadable_model_with_metrics(tiny_encoder, castillo_dir, tmp_path):
    ok(train(["--encoder", tiny_encoder, "--dataset", castillo_dir, "--output_dir", "run", "--export_dir", "export",
              "--num_train_epochs", "2"], tmp_path))
    export = tmp_path / "export"
    for name in ("model.safetensors", "config.json", "trainer_state.json", "dev_metrics.json", "test_metrics.json",
                 "training_info.json", "modeling_lenpred.py"):
        assert (export / name).exists(), name
    dev = json.loads((export / "dev_metrics.json").read_text())
    assert {"dev_bin500_accuracy", "dev_mean_mae", "dev_std_mae"} <= set(dev)
    info = json.loads((export / "training_info.json").read_text())
    assert info["world_size"] == 1 and len(info["llm_names"]) == 3
    assert info["weights_sha256"] == hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()
    state = json.loads((export / "trainer_state.json").read_text())
    assert any("loss" in entry for entry in state["log_history"])
    from transformers import AutoModel

    model = AutoModel.from_pretrained(export, trust_remote_code=True)
    assert model.config.llm_names == info["llm_names"]
    # the bound is calibrated on the dev split at the end: the default 0.9 and the paper's 0.99, per LLM
    assert model.config.reservation_quantile == 0.9
    assert {"0.5", "0.9", "0.95", "0.99"} == set(model.config.bound_offsets)
    assert all(len(v) == 3 for v in model.config.bound_offsets.values())


def test_two_process_ddp_on_cpu(tiny_encoder, castillo_dir, tmp_path):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0")
    ok(train(["--encoder", tiny_encoder, "--dataset", castillo_dir, "--output_dir", "run", "--export_dir", "export",
              "--num_train_epochs", "1"], tmp_path, launcher, env={"ACCELERATE_USE_CPU": "true"}))
    info = json.loads((tmp_path / "export" / "training_info.json").read_text())
    assert info["world_size"] == 2
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path / "export", trust_remote_code=True).config.model_type == "lenpred"


def test_resume_from_checkpoint_reaches_the_same_weights(tiny_encoder, castillo_dir, tmp_path):
    common = ["--encoder", tiny_encoder, "--dataset", castillo_dir, "--max_steps", "6", "--save_strategy", "steps",
              "--save_steps", "3", "--eval_strategy", "no", "--seed", "7"]
    ok(train([*common, "--output_dir", "full", "--export_dir", "full_export"], tmp_path))
    ok(train([*common, "--output_dir", "stopped", "--export_dir", "stopped_export"], tmp_path))
    # What a run stopped after step 3 leaves behind: only its step-3 checkpoint.
    shutil.rmtree(tmp_path / "stopped" / "checkpoint-6")
    ok(train([*common, "--output_dir", "stopped", "--export_dir", "resumed_export",
              "--resume_from_checkpoint", tmp_path / "stopped" / "checkpoint-3"], tmp_path))
    full = load_file(tmp_path / "full_export" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed_export" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=1e-5, atol=1e-6, msg=key)


def test_logs_without_single_lengths_leave_the_bound_uncalibrated_and_say_so(tiny_encoder, tmp_path):
    """A log with one mean per prompt tells no single answer's length: the export's bound stays uncalibrated."""
    rows = [{"prompt_text": f"Prompt {i}: {'explain at length' if i % 2 else 'answer in a word'}", "model": llm,
             "output_mean": 40.0 + 400 * (i % 2), "output_std": 5.0}
            for i in range(30) for llm in ("org/A-1B", "org/B-2B")]
    log = tmp_path / "means.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ok(train(["--encoder", tiny_encoder, "--dataset", log, "--output_dir", "run", "--export_dir", "export",
                    "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no"], tmp_path))
    assert "the reservation bound is left uncalibrated: calibration needs held-out rows with output_sizes" \
        in run.stderr
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["bound_offsets"] is None and config["llm_names"] == ["org/A-1B", "org/B-2B"]


def test_llm_loss_weights_change_the_training_and_score_export_scores_it(tiny_encoder, castillo_dir, tmp_path):
    """--llm_loss_weights reaches the loss (the default favours the paper's Llamas; '' weighs all alike), and
    benchmarks/score_export.py scores an export on dev, test and Alpaca, alone and in an ensemble."""
    common = ["--encoder", tiny_encoder, "--dataset", castillo_dir, "--max_steps", "5", "--save_strategy", "no",
              "--eval_strategy", "no", "--seed", "3", "--learning_rate", "1e-2", "--max_train_prompts", "13"]
    ok(train([*common, "--output_dir", "plain", "--export_dir", "plain_export"], tmp_path))
    plain = load_file(tmp_path / "plain_export" / "model.safetensors")
    out = tmp_path / "scores.json"
    ok(subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_export.py"), "--model", "plain_export",
                       "--dataset", str(castillo_dir), "--split-seed", "3", "--json", str(out),
                       "--ensemble-with", "plain_export"],
                      cwd=tmp_path, capture_output=True, text=True, timeout=600,
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
    scores = json.loads(out.read_text())
    assert set(scores) == {"export", "ensemble"} and set(scores["export"]) == {"dev", "test", "Alpaca"}
    for part, by_llm in scores["export"].items():  # an ensemble of a model with itself is that model
        for llm, s in by_llm.items():
            alone = scores["ensemble"][part][llm]
            assert alone["mae"] == pytest.approx(s["mae"]) and alone["tau"] == pytest.approx(s["tau"]), (part, llm)
    ok(train([*common, "--output_dir", "one", "--export_dir", "one_llm_export", "--max_steps", "1",
              "--llms", "meta-llama/Llama-3.2-1B-Instruct"], tmp_path))
    other_llms = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_export.py"), "--model",
                                 "plain_export", "--ensemble-with", "one_llm_export"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert other_llms.returncode != 0 and "one_llm_export predicts other LLMs" in other_llms.stderr
    ok(train([*common, "--output_dir", "mix", "--export_dir", "mix_export", "--llm_loss_weights", ""], tmp_path))
    unweighted = load_file(tmp_path / "mix_export" / "model.safetensors")
    assert any(not torch.allclose(plain[k], unweighted[k]) for k in plain)
    ok(train([*common, "--output_dir", "llm", "--export_dir", "llm_export",
              "--llm_loss_weights", "meta-llama/Llama-3.2-1B-Instruct=3"], tmp_path))
    favoured = load_file(tmp_path / "llm_export" / "model.safetensors")
    assert any(not torch.allclose(favoured[k], unweighted[k]) for k in plain)


@pytest.mark.parametrize("args, message", [
    (["--llms", "no-such/llm"], "absent from the data"),
    (["--heads", "ranking"], "--heads must be one of"),
    (["--attention_dropout", "1"], "--attention_dropout must be in [0, 1)"),
    (["--llm_loss_weights", "paper"], "takes LLM=WEIGHT items"),
    (["--llm_loss_weights", "meta-llama/Llama-3.2-1B-Instruct=-2"], "takes LLM=WEIGHT items"),
    (["--llm_loss_weights", "no-such/llm=2"], "names an LLM the model does not train"),
    (["--llm_loss_weights", "meta-llama/Llama-3.2-1B-Instruct=0,Mbpp=1"], "names an LLM the model does not train"),
])
def test_bad_arguments_fail_clearly(tiny_encoder, castillo_dir, tmp_path, args, message):
    result = train(["--encoder", tiny_encoder, "--dataset", castillo_dir, "--output_dir", "run", *args], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


def test_help_lists_the_arguments():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for flag in ("--dataset", "--llms", "--init_from", "--heads", "--bin_size", "--export_dir", "--num_train_epochs"):
        assert flag in result.stdout


def test_probe_recipe_scores_dev_per_llama(tiny_encoder, castillo_dir, tmp_path):
    """benchmarks/probe_recipe.py: trains through train.py and scores the dev split (here with dropout 0.2)."""
    script = ROOT / "benchmarks" / "probe_recipe.py"
    result = ok(subprocess.run(
        [sys.executable, str(script), "--out", "probe", "--", "--encoder", str(tiny_encoder), "--dataset",
         str(castillo_dir), "--dropout", "0.2", *TINY], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe["train_args"][-len(TINY):] == TINY and '"all"' in result.stdout
    scores = probe["dev"]["all"]
    assert scores["rows"] > 0 and scores["mae"] > 0 and 0 <= scores["acc500"] <= 1 and -1 <= scores["tau"] <= 1
    assert "meta-llama/Llama-3.2-1B-Instruct" in probe["dev"]
    config = json.loads((tmp_path / "probe" / "export" / "config.json").read_text())
    assert config["dropout"] == 0.2
    assert set(scores["tau_by_prompt_set"]) <= {"DollyDataset", "Mbpp"}  # Alpaca is never in the dev split
    # --rescore scores the same export again without training: the same figures
    ok(subprocess.run([sys.executable, str(script), "--out", "probe", "--rescore", "--", "--encoder", str(tiny_encoder),
                       "--dataset", str(castillo_dir), *TINY], cwd=tmp_path, capture_output=True, text=True,
                      timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["dev"] == probe["dev"]


def test_split_seed_fixes_the_dev_split_across_training_seeds():
    import train as train_module

    _, dargs, targs = train_module.parse_args(["--output_dir", "run", "--seed", "3"])
    assert train_module.split_seed(dargs, targs) == 3
    _, dargs, targs = train_module.parse_args(["--output_dir", "run", "--seed", "3", "--split_seed", "42"])
    assert train_module.split_seed(dargs, targs) == 42


def search_recipes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import search_recipes

    return search_recipes


def test_search_recipes_grid_errors_and_deadline(tmp_path):
    search = search_recipes()
    grid = tmp_path / "grid.txt"
    grid.write_text("# comment\nbase\ndrop  --dropout 0.2  # trailing comment\n")
    assert search.read_grid(grid) == [("base", []), ("drop", ["--dropout", "0.2"])]
    for bad in ("base\nbase --seed 1\n", "--seed 1\n", "# nothing\n"):
        grid.write_text(bad)
        with pytest.raises(ValueError, match="configuration"):
            search.read_grid(grid)
    grid.write_text("base\ndrop --dropout 0.2\n")
    rows = search.main(["--grid", str(grid), "--out", str(tmp_path / "out"), "--deadline", "0"])
    assert {row["name"]: row["status"] for row in rows} == {"base": "not started", "drop": "not started"}
    assert "| drop |" in (tmp_path / "out" / "summary.md").read_text()


def test_search_recipes_runs_configurations_side_by_side(tiny_encoder, castillo_dir, tmp_path):
    """Two probes at once; a configuration that fails is reported as failed, not dropped."""
    grid = tmp_path / "grid.txt"
    grid.write_text("base\nshort --max_length 24\nbroken --heads ranking\n")
    common = " ".join(["--encoder", str(tiny_encoder), "--dataset", str(castillo_dir), *TINY])
    result = ok(subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search_recipes.py"), "--grid", str(grid), "--out", "out",
         "--jobs", "2", "--epochs", "1", "--common", common], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
    rows = {row["name"]: row for row in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert rows["base"]["status"] == rows["short"]["status"] == "ok" and rows["broken"]["status"] == "exit 1"
    for name in ("base", "short"):
        assert rows[name]["all mae"] > 0 and -1 <= rows[name]["all tau"] <= 1 and rows[name]["train_runtime"] > 0
        assert rows[name]["Llama-3.2-1B mae"] > 0
    assert json.loads((tmp_path / "out" / "short" / "export" / "config.json").read_text())["max_length"] == 24
    assert "--heads must be one of" in (tmp_path / "out" / "broken.log").read_text()
    assert "| broken |" in result.stdout
