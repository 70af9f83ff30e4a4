"""The Inference Endpoint handler, called in-process on a tiny export (and once from the export folder alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LLMS

PROMPTS = ["Write a haiku about autumn.", "Implement quicksort in Python and explain its complexity."]


@pytest.fixture
def tiny_model(varied_model):
    """Every LLM and prompt gets different figures, so a mix-up between rows shows."""
    return varied_model


@pytest.fixture
def export_dir(tiny_model, tokenizer, tmp_path):
    from lenpred.hub import export_model

    return export_model(tiny_model, tokenizer, tmp_path / "export")


@pytest.fixture
def handler(export_dir):
    from handler import EndpointHandler

    return EndpointHandler(str(export_dir))


@pytest.fixture
def pipe(tiny_model, tokenizer):
    from pipeline_lenpred import LenPredPipeline

    return LenPredPipeline(model=tiny_model, tokenizer=tokenizer)


def assert_same(got, expected):
    """Same structure, same strings and ints, floats equal to float32 precision."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected)
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same(g, e)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    else:
        assert got == expected


def test_export_ships_the_handler(export_dir):
    root = Path(__file__).resolve().parents[1]
    assert (export_dir / "handler.py").read_text() == (root / "handler.py").read_text()


def test_single_prompt_every_llm(handler, pipe):
    out = handler({"inputs": PROMPTS[0]})
    assert [row["llm"] for row in out] == LLMS
    assert_same(out, pipe(PROMPTS[0]))
    row = out[0]
    assert row["predicted_mean"] > 0 and row["predicted_std"] >= 0
    assert row["predicted_range"] in row["bin_probabilities"]
    assert sum(row["bin_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    json.dumps(out)  # an Endpoint returns it as JSON


def test_list_of_prompts(handler, pipe):
    out = handler({"inputs": PROMPTS})
    assert len(out) == 2 and all([r["llm"] for r in rows] == LLMS for rows in out)
    assert_same(out, pipe(PROMPTS))
    assert_same(out[1], handler({"inputs": PROMPTS[1]}))  # batching does not change a prompt's prediction


def test_parameters_one_llm(handler, pipe):
    out = handler({"inputs": PROMPTS[0], "parameters": {"llm": LLMS[1]}})
    assert [row["llm"] for row in out] == [LLMS[1]]
    assert_same(out, pipe(PROMPTS[0], llm=LLMS[1]))
    assert_same(out[0], handler({"inputs": PROMPTS[0]})[1])


def test_parameters_list_of_llms(handler, pipe):
    chosen = [LLMS[2], LLMS[0]]
    out = handler({"inputs": PROMPTS, "parameters": {"llm": chosen}})
    assert [[row["llm"] for row in rows] for rows in out] == [chosen, chosen]
    assert_same(out, pipe(PROMPTS, llm=chosen))


def test_empty_parameters_mean_every_llm(handler):
    assert [r["llm"] for r in handler({"inputs": PROMPTS[0], "parameters": {}})] == LLMS
    assert [r["llm"] for r in handler({"inputs": PROMPTS[0], "parameters": None})] == LLMS


def test_unknown_llm_lists_the_known_ones(handler):
    with pytest.raises(ValueError, match="Unknown LLM") as err:
        handler({"inputs": PROMPTS[0], "parameters": {"llm": "acme/not-a-model"}})
    for llm in LLMS:
        assert llm in str(err.value)
    with pytest.raises(ValueError, match="acme/not-a-model"):
        handler({"inputs": PROMPTS[0], "parameters": {"llm": [LLMS[0], "acme/not-a-model"]}})


@pytest.mark.parametrize("data", [{}, {"prompt": "hi"}, {"parameters": {"llm": LLMS[0]}}, "just a string", None])
def test_missing_inputs(handler, data):
    with pytest.raises(ValueError, match='"inputs"'):
        handler(data)


def test_handler_runs_from_the_export_folder_alone(export_dir, pipe):
    """An Endpoint imports handler.py from the model folder: only its siblings there, not this repository."""
    code = (
        "import json, os, sys; sys.path.insert(0, os.getcwd());"
        "from handler import EndpointHandler; import pipeline_lenpred;"
        "assert os.path.dirname(os.path.abspath(pipeline_lenpred.__file__)) == os.getcwd(), pipeline_lenpred.__file__;"
        f"print('RESULT', json.dumps(EndpointHandler('.')({{'inputs': {PROMPTS[0]!r}}})))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=export_dir, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = [line for line in proc.stdout.splitlines() if "RESULT " in line]
    assert result, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_same(json.loads(result[-1].split("RESULT ", 1)[1]), json.loads(json.dumps(pipe(PROMPTS[0]))))
    # Every load names trust_remote_code=True: on a terminal transformers would otherwise stop and ask.
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
