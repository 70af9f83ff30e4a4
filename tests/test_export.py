"""The exported Hub folder: complete, self-contained remote code, loadable in a fresh offline process."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lenpred.hub import METRIC_DIR, REMOTE_CODE_FILES, export_model, load_export, push_export, push_metric

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def export_dir(tiny_model, tokenizer, tmp_path) -> Path:
    card = tmp_path / "card.md"
    card.write_text("---\nlibrary_name: transformers\n---\n# LenPred test card\n")
    return export_model(tiny_model, tokenizer, tmp_path / "export", model_card=card)


def run_fresh(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter, offline, outside the repository, with no answer to transformers' [y/N] question."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


def test_export_folder_is_complete(export_dir):
    names = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert set(REMOTE_CODE_FILES) <= names
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "lenpred"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lenpred.LenPredConfig",
        "AutoModel": "modeling_lenpred.LenPredModel",
        "AutoModelForSequenceClassification": "modeling_lenpred.LenPredForSequenceClassification",
    }
    assert list(config["custom_pipelines"]) == ["length-prediction"]
    assert config["id2label"]["0"] == "0-499"
    assert (export_dir / "README.md").read_text().startswith("---\nlibrary_name: transformers")


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_imports_nothing_from_the_project_package(name):
    tree = ast.parse((ROOT / name).read_text())
    siblings = {Path(n).stem for n in REMOTE_CODE_FILES}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            assert module != "lenpred", f"{name} imports lenpred"
            if node.level == 0 and module not in {"transformers", "torch", "typing", "dataclasses", "__future__",
                                                   "math", "os", "tqdm"}:
                assert module in siblings, f"{name} imports {node.module}"
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "lenpred" for a in node.names), name


def test_export_loads_in_a_fresh_offline_process(export_dir, tiny_model, tokenizer, tmp_path):
    prompt = "Explain how a transformer encoder works."
    expected = tiny_model.predict(prompt, tokenizer)
    code = f"""
import json
from transformers import AutoModel, pipeline
path = {str(export_dir)!r}
model = AutoModel.from_pretrained(path, trust_remote_code=True)
assert type(model).__name__ == "LenPredModel", type(model)
assert "lenpred" not in __import__("sys").modules
pipe = pipeline(model=path, trust_remote_code=True)
rows = pipe({prompt!r})
clf = pipeline("text-classification", model=path, trust_remote_code=True)
top = clf({prompt!r})[0]
paper = pipe.predict_response_length({prompt!r}, "llama-3.2-3B", task="classification")
print(json.dumps({{"pipe": type(pipe).__name__, "rows": rows, "top": top, "paper": paper}}))
"""
    result = run_fresh(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["pipe"] == "LenPredPipeline"
    assert [r["llm"] for r in out["rows"]] == tiny_model.config.llm_names
    for j, row in enumerate(out["rows"]):
        assert row["predicted_mean"] == pytest.approx(float(expected.mean[0, j]), rel=1e-4)
        assert row["upper_bound"] == pytest.approx(float(expected.bound[0, j]), rel=1e-4)
    default_bin = int(expected.bin_probs[0, 0].argmax())
    assert out["top"]["label"] == tiny_model.config.id2label[default_bin]
    assert out["paper"]["llm"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert out["paper"]["predicted_range"] in tiny_model.config.id2label.values()


def test_loading_without_trust_remote_code_is_refused(export_dir, tmp_path):
    result = run_fresh(f"from transformers import AutoModel; AutoModel.from_pretrained({str(export_dir)!r})", tmp_path)
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr


def test_push_offline_fails_with_one_clear_message(export_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Could not push .* to the Hub"):
        push_export(export_dir, "someone/lenpred-test", token="hf_dummy")


def test_push_metric_publishes_the_evaluate_module_as_a_space(monkeypatch, tmp_path):
    import huggingface_hub

    from lenpred.hub import main

    calls = []

    class RecordingApi:  # stands in for the Hub, which this machine cannot reach
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    main([str(tmp_path), "--push-metric", "acme/length_prediction"])
    (_, repo, create), (_, same, upload) = calls
    assert repo == same == "acme/length_prediction" and create["repo_type"] == upload["repo_type"] == "space"
    assert upload["folder_path"] == str(METRIC_DIR) and (METRIC_DIR / "length_prediction.py").is_file()
    with pytest.raises(SystemExit):  # no repo id and no --push to take the ORG from
        main([str(tmp_path), "--push-metric"])
    with pytest.raises(FileNotFoundError, match="push the metric from a LenPred checkout"):
        push_metric("acme/length_prediction", folder=tmp_path)


def test_push_metric_offline_fails_with_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Could not push the metric .* to the Hub"):
        push_metric("someone/length_prediction", token="hf_dummy")


def test_a_missing_export_folder_is_named_in_the_error(tmp_path):
    missing = tmp_path / "outputs" / "no-such-export"
    expected = f"{missing} is not a folder here, and as a Hub id it could not be loaded"
    with pytest.raises(OSError, match=re.escape(expected)):
        load_export(missing)


def test_pipeline_bad_input(export_dir):
    from transformers import pipeline

    pipe = pipeline(model=str(export_dir), trust_remote_code=True)
    with pytest.raises(ValueError, match="Unknown LLM 'gpt-9'"):
        pipe("hello", llm="gpt-9")
    with pytest.raises(ValueError, match="empty"):
        pipe("  ")
    with pytest.raises(TypeError):
        pipe(3.5)
    with pytest.raises(ValueError, match="task must be"):
        pipe.predict_response_length("hello", "llama-3.2-1B", task="ranking")
    many = pipe(["one prompt", "another prompt"], llm=["llama-3.2-1B", "Qwen/Qwen2.5-7B-Instruct"])
    assert len(many) == 2 and [r["llm"] for r in many[0]] == ["meta-llama/Llama-3.2-1B-Instruct",
                                                              "Qwen/Qwen2.5-7B-Instruct"]
    regression = pipe.predict_response_length("hello", "llama-3.2-1B")
    assert set(regression) == {"llm", "predicted_mean", "predicted_std"}


def test_paper_api_loads_a_predictor_from_a_path(export_dir, monkeypatch):
    import pipeline_lenpred

    monkeypatch.setattr(pipeline_lenpred, "_DEFAULT", {})
    first = pipeline_lenpred.predict_response_length("Introduce Nanjing University.", "llama-3.2-3B",
                                                     predictor=str(export_dir))
    assert set(first) == {"llm", "predicted_mean", "predicted_std"} and first["predicted_std"] > 0
    monkeypatch.setenv("LENPRED_MODEL", str(export_dir))
    again = pipeline_lenpred.predict_response_length("Introduce Nanjing University.", "llama-3.2-3B")
    assert again == first and len(pipeline_lenpred._DEFAULT) == 1  # loaded once, reused


def test_an_export_trained_with_a_retired_option_is_refused(export_dir):
    """An older export with `pooling: attention` in its config.json fails with a message naming the option, through
    the folder's remote code as every tool loads it (not a silent load as mean pooling)."""
    config_path = export_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "pooling": "attention"}))
    with pytest.raises(ValueError, match="trained with pooling='attention', which this version of LenPred no longer"):
        load_export(export_dir)
