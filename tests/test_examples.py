"""Fast tests for lenpred.examples: one example per prompt, label masks, loss weights."""

import math

import numpy as np
import pandas as pd
import pytest

from lenpred import examples as E
from lenpred.data import PAPER_LLMS

A, B, C = "org/llm-a", "org/llm-b", "org/llm-c"


def test_group_by_prompt_masks_missing_llms():
    rows = pd.DataFrame({
        "prompt_id": ["p1", "p1", "p2", "p2", "p3"], "prompt_text": ["one", "one", "two", "two", "3"],
        "llm": [A, B, B, C, C], "prompt_set": "Mbpp", "input_size": np.nan,
        "output_sizes": [[1, 3], [5, 5], [7], None, [9]],
        "output_mean": [2.0, 5.0, 7.0, 8.0, 9.0], "output_std": [1.0, 0.0, np.nan, np.nan, np.nan],
        "split": "train"})
    ds = E.group_by_prompt(rows, [A, B])
    assert ds["prompt_id"] == ["p1", "p2"]  # p3 has only the ignored LLM C
    assert ds[0]["labels_mean"] == [2.0, 5.0] and ds[0]["labels_std"] == [1.0, 0.0]
    assert math.isnan(ds[1]["labels_mean"][0]) and ds[1]["labels_mean"][1] == 7.0
    assert all(math.isnan(v) for v in ds[1]["labels_std"])
    dup = pd.concat([rows.iloc[[0]], rows.iloc[[0]].assign(output_sizes=[[5, 7]])])
    pooled = E.group_by_prompt(dup, [A])
    assert pooled[0]["labels_mean"] == [4.0]  # repeated ⟨prompt, LLM⟩ rows are pooled


def test_llm_loss_weights_name_llms_or_the_papers_set():
    names = [A, *PAPER_LLMS]
    assert E.llm_loss_weights(None, names) is None
    np.testing.assert_allclose(E.llm_loss_weights("paper=3", names), [1, 3, 3, 3])
    np.testing.assert_allclose(E.llm_loss_weights(f"paper=2, {A}=0.5", names), [0.5, 2, 2, 2])
    for spec, message in (("paper", "LLM=WEIGHT"), (f"{A}=x", "LLM=WEIGHT"), (f"{A}=-1", "LLM=WEIGHT"),
                          (f"{A}=nan", "LLM=WEIGHT"), ("org/other=2", "does not train"),
                          (f"{A}=0,paper=0", "every LLM weight 0")):
        with pytest.raises(ValueError, match=message):
            E.llm_loss_weights(spec, names)
    assert E.llm_loss_weights("paper=2", [A, B]) is None  # logs of other LLMs: 'paper' weighs none of them
    np.testing.assert_allclose(E.llm_loss_weights("paper=2", [A, PAPER_LLMS[0]]), [1, 2])


def test_label_weights_repeat_the_llm_weights_for_every_prompt():
    assert E.label_weights(4, [A, B]) is None  # every LLM weighs 1: the plain loss
    np.testing.assert_array_equal(E.label_weights(4, [A, B], llm_spec=f"{A}=3"), [[3, 1]] * 4)
