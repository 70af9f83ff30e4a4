"""Fast tests for lenpred.data: loaders, validation, sanitising, splits, grouping."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lenpred import data as D

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "castillo"
A, B, C = "org/llm-a", "org/llm-b", "org/llm-c"


def _castillo_like(split: str, n_prompts: int, sets=("Mbpp", "Alpaca", "DS1000"), llms=(A, B),
                   offset: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(n_prompts):
        pid = f"{split}-{offset + i:04d}"
        for j, llm in enumerate(llms):
            sizes = [10 + i + j + k for k in range(10)]
            rows.append({"sample_id": f"{pid}-{j}", "prompt_id": pid, "model": llm,
                         "dataset": sets[i % len(sets)], "prompt_text": f"prompt {pid}",
                         "input_size": 5, "output_sizes": sizes,
                         "output_mean": float(np.mean(sizes)), "output_std": float(np.std(sizes))})
    return pd.DataFrame(rows)


@pytest.fixture
def castillo_dir(tmp_path):
    for split, n, off in (("train", 60, 0), ("validation", 30, 100), ("test", 12, 200)):
        _castillo_like(split, n, offset=off).to_parquet(tmp_path / f"{split}.parquet")
    return tmp_path


def test_load_castillo_folder_schema(castillo_dir):
    rows = D.load_rows(castillo_dir)
    assert list(rows.columns) == list(D.COLUMNS)
    assert rows["split"].value_counts().to_dict() == {"train": 120, "validation": 60, "test": 24}
    r = rows.iloc[0]
    assert r["llm"] == A and r["prompt_set"] == "Mbpp" and r["input_size"] == 5.0
    assert r["output_sizes"] == list(range(10, 20))
    assert r["output_mean"] == pytest.approx(14.5)
    assert r["output_std"] == pytest.approx(np.std(range(10, 20)))
    assert set(D.load_rows(castillo_dir, splits=("test",))["split"]) == {"test"}


def test_user_files_parquet_jsonl_csv(tmp_path):
    pq = tmp_path / "a.parquet"
    pd.DataFrame({"prompt_text": ["hi"], "model": [A], "output_sizes": [[3, 5]],
                  "dataset": ["Mbpp"]}).to_parquet(pq)
    jl = tmp_path / "gw.jsonl"  # gateway log: one observed size, extra columns, a torn last line
    jl.write_text(json.dumps({"prompt_text": "hello", "model": B, "output_sizes": [123],
                              "predicted_mean": 99.0, "latency_ms": 3}) + "\n" + '{"prompt_te')
    csv = tmp_path / "c.csv"
    pd.DataFrame({"prompt_text": ["x", "y"], "model": [A, A],
                  "output_sizes": ["[1, 2, 3]", None], "output_mean": [None, 7.5],
                  "output_std": [None, 1.5]}).to_csv(csv, index=False)
    rows = D.load_rows([pq, jl, csv])
    assert list(rows.columns) == list(D.COLUMNS) and len(rows) == 4
    assert set(rows["split"]) == {"train"}
    assert rows["prompt_set"].tolist() == ["Mbpp", "custom", "custom", "custom"]
    assert rows.loc[0, "output_mean"] == 4.0 and rows.loc[0, "output_std"] == 1.0
    gw = rows.iloc[1]
    assert gw["output_sizes"] == [123] and gw["output_mean"] == 123.0
    assert math.isnan(gw["output_std"])  # one observation: spread unknown, not 0
    assert gw["prompt_id"] == D._prompt_hash("hello") and len(gw["prompt_id"]) == 16
    assert math.isnan(gw["input_size"])
    assert rows.loc[2, "output_sizes"] == [1, 2, 3] and rows.loc[2, "output_mean"] == 2.0
    assert rows.loc[3, "output_sizes"] is None  # mean-only row
    assert (rows.loc[3, "output_mean"], rows.loc[3, "output_std"]) == (7.5, 1.5)


def test_missing_column_names_column_and_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt_text": "p", "output_sizes": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*model"):
        D.load_rows(f)
    g = tmp_path / "bad2.csv"
    pd.DataFrame({"prompt_text": ["p"], "model": [A]}).to_csv(g, index=False)
    with pytest.raises(ValueError, match=r"bad2\.csv.*output_sizes or output_mean"):
        D.load_rows(g)


def test_malformed_rows_skipped_and_counted(tmp_path):
    recs = [
        {"prompt_text": "ok", "model": A, "output_sizes": [4, 6]},
        {"prompt_text": "nan sizes", "model": A, "output_sizes": None},
        {"prompt_text": "empty sizes", "model": A, "output_sizes": []},
        {"prompt_text": "neg size", "model": A, "output_sizes": [5, -1]},
        {"prompt_text": "nan size", "model": A, "output_sizes": [5, float("nan")]},
        {"prompt_text": "nan mean", "model": A, "output_mean": float("nan")},
        {"prompt_text": "neg mean", "model": A, "output_mean": -3.0},
        {"prompt_text": "   ", "model": A, "output_sizes": [1]},
        {"prompt_text": "", "model": A, "output_sizes": [1]},
        {"model": A, "output_sizes": [1]},
        {"prompt_text": "no model", "output_sizes": [1]},
        {"prompt_text": "mean only", "model": B, "output_mean": 12.0},
    ]
    f = tmp_path / "logs.jsonl"
    f.write_text("\n".join(json.dumps(r, allow_nan=True) for r in recs))
    raw = D.load_rows(f)
    assert len(raw) == len(recs)
    # broken size lists never leave a label behind, even before validation
    assert raw.loc[raw["prompt_text"] == "neg size", "output_mean"].isna().all()
    kept, counts = D.validate_rows(raw)
    assert kept["prompt_text"].tolist() == ["ok", "mean only"]
    assert counts == {"missing_output": 2, "empty_output_sizes": 1, "negative_output_size": 1,
                      "invalid_output_size": 1, "negative_output_mean": 1,
                      "missing_prompt_text": 3, "missing_llm": 1}


def _rows(sizes_list):
    return pd.DataFrame({
        "prompt_id": [f"p{i}" for i in range(len(sizes_list))], "prompt_text": "t", "llm": A,
        "prompt_set": "Mbpp", "input_size": np.nan, "output_sizes": sizes_list,
        "output_mean": [np.mean(s) if s else 50.0 for s in sizes_list],
        "output_std": [np.std(s) if s else np.nan for s in sizes_list], "split": "train"})


def test_sanitize_rule():
    capped = [100, 200, 15000, 300]            # hits the cap: 15000 dropped
    high_var = [10, 10, 10, 10, 10, 10, 10, 10, 10, 9000]  # std > 2·mean and > 8499: 9000 dropped
    all_capped = [14999, 15000]                # every size at the cap: row removed
    clean = [100, 9000, 200]                   # > 8499 but std <= 2·mean: untouched
    df = _rows([capped, high_var, all_capped, clean, None])
    out, counts = D.sanitize(df)
    assert counts == {"rows_changed": 2, "rows_removed": 1}
    assert out["prompt_id"].tolist() == ["p0", "p1", "p3", "p4"]
    assert out.loc[0, "output_sizes"] == [100, 200, 300]
    assert out.loc[0, "output_mean"] == pytest.approx(200.0)
    assert out.loc[0, "output_std"] == pytest.approx(np.std([100, 200, 300]))
    assert out.loc[1, "output_sizes"] == [10] * 9 and out.loc[1, "output_std"] == 0.0
    assert out.loc[2, "output_sizes"] == clean
    assert out.loc[2, "output_mean"] == pytest.approx(np.mean(clean))
    assert out.loc[3, "output_sizes"] is None and out.loc[3, "output_mean"] == 50.0
    assert df.loc[0, "output_sizes"] == capped  # input not mutated


def test_load_castillo_pipeline(castillo_dir):
    rows = D.load_castillo(castillo_dir)
    assert len(rows) == 204 and rows["output_mean"].notna().all()


def test_make_splits_disjoint_and_heldout(castillo_dir):
    rows = D.load_castillo(castillo_dir)
    sp = D.make_splits(rows, dev_fraction=0.2, seed=1)
    tr, dv, te = (set(x["prompt_id"]) for x in (sp.train, sp.dev, sp.test))
    assert not (tr & dv) and not (tr & te) and not (dv & te)
    assert "Alpaca" not in set(sp.train["prompt_set"]) | set(sp.dev["prompt_set"])
    assert set(sp.heldout["prompt_set"]) == {"Alpaca"} and "Alpaca" in set(sp.test["prompt_set"])
    assert len(dv) / (len(tr) + len(dv)) == pytest.approx(0.2, abs=0.05)
    assert len(tr) + len(dv) == 60  # 90 pool prompts, a third Alpaca
    again = D.make_splits(rows.sample(frac=1, random_state=0), dev_fraction=0.2, seed=1)
    assert set(again.dev["prompt_id"]) == dv  # independent of row order
    assert set(D.make_splits(rows, dev_fraction=0.2, seed=2).dev["prompt_id"]) != dv
    s = sp.summary()
    assert s["test"]["prompts"] == 12 and s["dev"]["rows"] == len(sp.dev)
    only_a = D.make_splits(rows, llms=[A])
    assert set(only_a.train["llm"]) == {A}
    with pytest.raises(ValueError, match="available"):
        D.make_splits(rows, llms=["nope/llm"])


def test_make_splits_user_logs_have_empty_test(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_text("\n".join(json.dumps({"prompt_text": f"q{i}", "model": A, "output_sizes": [i]})
                           for i in range(20)))
    sp = D.make_splits(D.load_castillo(f))
    assert len(sp.test) == 0 and len(sp.train) + len(sp.dev) == 20 and len(sp.dev) == 2


def test_prompt_table_first_seen_order():
    rows = pd.DataFrame({"prompt_id": ["b", "a", "b"], "prompt_text": ["B", "A", "B"],
                         "prompt_set": ["x", "y", "x"], "llm": [A, A, B]})
    t = D.prompt_table(rows)
    assert t["prompt_id"].tolist() == ["b", "a"] and list(t.columns) == [
        "prompt_id", "prompt_text", "prompt_set"]


def test_hub_offline_clear_error(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    with pytest.raises(RuntimeError, match="danfperam/castillo.*local folder") as exc:
        D.load_rows(D.CASTILLO_HUB_ID)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_default_source_and_constants():
    assert D.default_dataset_source() in (str(D.LOCAL_CASTILLO), D.CASTILLO_HUB_ID)
    # reports name the data as given, and the default as the README does: never this machine's absolute path
    assert D.dataset_name("my/logs.jsonl") == "my/logs.jsonl"
    assert D.dataset_name(None) in ("../shared/data/castillo", D.CASTILLO_HUB_ID)
    assert D.LOCAL_CASTILLO == REAL and len(D.PROMPT_SETS) == 7
    assert D.HELD_OUT_PROMPT_SET in D.PROMPT_SETS


@pytest.mark.skipif(not REAL.is_dir(), reason=f"CASTILLO copy not found at {REAL}")
def test_real_castillo():
    raw = D.load_rows(REAL)
    assert raw["split"].value_counts().to_dict() == {"train": 25_333, "validation": 24_475,
                                                     "test": 13_011}
    assert raw.loc[raw["split"] == "test", "prompt_id"].nunique() == 1_136
    rows, counts = D.validate_rows(raw)
    assert counts == {} and len(rows) == len(raw)
    sp = D.make_splits(D.sanitize(rows)[0])
    assert "Alpaca" not in set(sp.train["prompt_set"]) | set(sp.dev["prompt_set"])
    assert not set(sp.train["prompt_id"]) & (set(sp.dev["prompt_id"]) | set(sp.test["prompt_id"]))
    assert sp.summary()["test"]["prompts"] == 1_136
    assert (sp.train["output_sizes"].map(max) < 14_999).all()  # sanitised
