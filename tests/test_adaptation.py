"""Learning an LLM from its own logs (lenpred.adaptation, train.py --adapt): the other LLMs untouched bitwise, the
sibling start, the fit, cut-short answers as lower bounds, and bad logs."""

from __future__ import annotations

import ast
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch

from lenpred import data as D
from lenpred.adaptation import adapt, choose_siblings, extend_llms
from lenpred.calibration import answer_scores
from lenpred.examples import group_by_prompt

from conftest import LLMS

NEW = "new-org/New-LLM-2B"
PROMPTS = [f"Question {i}: {'explain everything about it in great detail' if i % 2 else 'answer in one word'} "
           f"(topic {i * 7})" for i in range(40)]
OFFSETS = {"0.5": [0.0, 0.1, 0.2], "0.9": [0.3, 0.4, 0.5]}


@pytest.fixture
def model(tiny_model):
    tiny_model.config.bound_offsets = dict(OFFSETS)
    tiny_model.config.reservation_quantile = 0.9
    with torch.no_grad():  # answers of tens to hundreds of tokens, different per LLM
        tiny_model.length_head.bias.add_(torch.tensor([4.0, 3.0]))
        tiny_model.llm_embedding.weight.mul_(3.0)
    return tiny_model


def log_rows(sizes, llm=NEW, prompts=PROMPTS, **extra) -> pd.DataFrame:
    """What the gateway's log gives `train.py`: one answer length per prompt, normalised and validated."""
    raw = pd.DataFrame({"prompt_text": prompts[:len(sizes)], "model": llm, "output_sizes": [[int(s)] for s in sizes],
                        **extra})
    rows, _ = D.validate_rows(D._normalise(raw, "train", "log"))
    return rows


def predictions(model, tokenizer, llms=None):
    return model.predict(PROMPTS, tokenizer, llms=llms)


def test_llm_mode_leaves_every_other_llm_bitwise_unchanged(model, tokenizer):
    before = predictions(model, tokenizer)
    sibling = before.mean[:, 1].numpy()
    adapted, report = adapt(model, tokenizer, log_rows(sibling * 2.5))
    assert adapted.config.llm_names == LLMS + [NEW] and report.new_llms == [NEW]
    after = predictions(adapted, tokenizer, LLMS)
    for field in ("mean", "std", "bound", "bin_probs"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    old, new = model.state_dict(), adapted.state_dict()
    assert old.keys() == new.keys()
    for key in old:
        if key == "llm_embedding.weight":
            assert torch.equal(old[key], new[key][:3])
        else:
            assert torch.equal(old[key], new[key]), key
    for q, values in OFFSETS.items():  # the others' calibration stays; the new LLM gets its own offsets
        assert adapted.config.bound_offsets[q][:3] == values
    assert report.calibrated[NEW].startswith("fitted on 40 answers")
    assert model.config.llm_names == LLMS  # the input model is left as it was


def test_a_new_llm_starts_as_the_known_llm_whose_predictions_fit_its_log(model, tokenizer):
    target = predictions(model, tokenizer).mean[:, 2].numpy()
    siblings, losses = choose_siblings(model, tokenizer, log_rows(np.round(target)))
    assert siblings == {NEW: LLMS[2]} and set(losses[NEW]) == set(LLMS)
    copied, report = adapt(model, tokenizer, log_rows(np.round(target)), mode="sibling")
    assert report.siblings == {NEW: LLMS[2]} and report.prior is None
    pred = predictions(copied, tokenizer, [NEW, LLMS[2]])
    assert torch.equal(pred.mean[:, 0], pred.mean[:, 1])  # a copy of its sibling, no training


def test_llm_mode_fits_the_log_better_than_the_sibling(model, tokenizer):
    pred = predictions(model, tokenizer)
    truth = pred.mean[:, 1].numpy() * 2.5  # an LLM that answers like its sibling, only longer
    adapted, report = adapt(model, tokenizer, log_rows(truth))
    fitted = predictions(adapted, tokenizer, NEW).mean[:, 0].numpy()
    sibling = pred.mean[:, list(LLMS).index(report.siblings[NEW])].numpy()

    def error(p):
        return np.abs(np.log1p(p) - np.log1p(np.round(truth))).mean()

    assert error(fitted) < 0.5 * error(sibling)
    assert set(report.cv_loss) == {"0", "0.01", "0.1", "1"} and report.prior is not None


def test_refreshing_a_known_llm_moves_only_its_own_row(model, tokenizer):
    before = predictions(model, tokenizer)
    refreshed, report = adapt(model, tokenizer, log_rows(before.mean[:, 0].numpy() * 4, llm=LLMS[0]))
    after = predictions(refreshed, tokenizer)
    assert report.new_llms == [] and refreshed.config.llm_names == LLMS
    assert torch.equal(before.mean[:, 1:], after.mean[:, 1:]) and torch.equal(before.bound[:, 1:], after.bound[:, 1:])
    assert not torch.equal(before.mean[:, 0], after.mean[:, 0])
    assert refreshed.config.bound_offsets["0.9"][1:] == OFFSETS["0.9"][1:]


def test_cut_short_answers_are_lower_bounds_not_lengths(tmp_path):
    records = [{"prompt_text": "tell a long story", "model": NEW, "output_sizes": [100], "finish_reasons": ["length"],
                "max_tokens": 100},
               {"prompt_text": "say hi", "model": NEW, "output_sizes": [3], "finish_reasons": ["stop"], "max_tokens": 100},
               # an older log with no finish reason: an answer that reached max_tokens counts as cut short
               {"prompt_text": "count to a million", "model": NEW, "output_sizes": [64], "max_tokens": 64},
               {"prompt_text": "aborted", "model": NEW, "output_sizes": [7], "finish_reasons": ["abort"]}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = D.load_castillo(log)
    assert rows["output_capped"].tolist() == [[True], None, [True], [True]]
    ds = group_by_prompt(rows, [NEW])
    labels = dict(zip(ds["prompt_text"], zip(ds["labels_mean"], ds["labels_mean_floor"])))
    assert np.isnan(labels["tell a long story"][0][0]) and labels["tell a long story"][1] == [100.0]
    assert labels["say hi"][0] == [3.0] and np.isnan(labels["say hi"][1][0])
    # calibration: a cut-short answer is never counted as covered
    scores = answer_scores(rows["output_sizes"], rows["output_capped"], np.full(4, 50.0), np.full(4, 10.0), 0.9)
    assert np.isinf(scores).tolist() == [True, False, True, True]


def test_the_censored_loss_only_pushes_predictions_below_the_floor_up(model):
    logits = torch.zeros(2, 1, model.config.num_bins, requires_grad=True)
    log_mean = torch.log1p(torch.tensor([[50.0], [400.0]])).requires_grad_()
    floor = torch.tensor([[100.0], [100.0]])
    nan = torch.full((2, 1), float("nan"))
    loss = model.loss(logits, log_mean, log_mean.detach(), nan, nan, (2, 1), labels_mean_floor=floor)
    loss.backward()
    assert log_mean.grad[0, 0] < 0 and log_mean.grad[1, 0] == 0  # below the floor: up; above it: no pull
    # the bin term: every bin from the floor's up is right, so it is -log P(bin >= 0) = 0 for a floor in bin 0
    uniform = model.loss(torch.zeros(1, 1, model.config.num_bins), torch.log1p(torch.tensor([[200.0]])),
                         torch.zeros(1, 1), torch.full((1, 1), float("nan")), None, (1, 1),
                         labels_mean_floor=torch.tensor([[100.0]]))
    assert float(uniform) == pytest.approx(0.0, abs=1e-6)


def test_a_log_where_many_answers_hit_the_cap(model, tokenizer):
    """An LLM that answers long, logged behind a max_tokens below what its sibling predicts: every answer stops at
    the cap. Read as lengths they pull the new LLM down to the cap; as lower bounds they say only "at least the
    cap", which the sibling's prediction already is, so it stays."""
    cap = int(0.6 * np.median(predictions(model, tokenizer).mean.numpy(), axis=0).min())  # below every LLM's
    capped = log_rows(np.full(len(PROMPTS), cap), finish_reasons=[["length"]] * len(PROMPTS))
    as_floor, report = adapt(model, tokenizer, capped)
    as_length, _ = adapt(model, tokenizer, log_rows(np.full(len(PROMPTS), cap)))
    floor_pred = predictions(as_floor, tokenizer, NEW).mean[:, 0].numpy()
    length_pred = predictions(as_length, tokenizer, NEW).mean[:, 0].numpy()
    assert np.median(floor_pred) > 1.2 * cap and np.median(length_pred) < 1.1 * cap
    # no quantile of answers that all stopped at the cap can be told: the starting offsets stay
    assert "40 cut short" in report.calibrated[NEW] and "keep the starting offsets" in report.calibrated[NEW]


def test_bad_logs_are_errors_or_counted_skips(tmp_path, caplog):
    records = [
        {"prompt_text": "fine", "model": NEW, "output_sizes": [12], "finish_reasons": ["stop"]},
        {"prompt_text": "two reasons, one size", "model": NEW, "output_sizes": [5], "finish_reasons": ["stop", "stop"]},
        {"prompt_text": "n=2, a mean and a cut-short answer", "model": NEW, "output_mean": 40.0,
         "finish_reasons": ["stop", "length"]},
        {"prompt_text": "text length", "model": NEW, "output_sizes": ["many"], "finish_reasons": ["stop"]},
        {"prompt_text": "negative", "model": NEW, "output_sizes": [-4], "finish_reasons": ["stop"]},
        {"prompt_text": "", "model": NEW, "output_sizes": [4], "finish_reasons": ["stop"]},
    ]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept, counts = D.validate_rows(D.load_rows(log))
    assert kept["prompt_text"].tolist() == ["fine"]
    assert counts == {"finish_reasons_mismatch": 1, "capped_without_sizes": 1, "invalid_output_size": 1,
                      "negative_output_size": 1, "missing_prompt_text": 1}
    with caplog.at_level(logging.INFO, logger="lenpred.examples"):
        ds = group_by_prompt(kept, [NEW])
    assert np.isnan(ds["labels_std"][0][0]) and "1 label(s) hold a single answer length: no std label" in caplog.text
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "q", "llm": NEW, "tokens": 5}) + "\n")
    with pytest.raises(ValueError, match="missing required column"):
        D.load_rows(other)


def test_extend_llms_copies_the_start_rows_and_offsets(model):
    grown = extend_llms(model, {NEW: LLMS[1]})
    assert grown.config.llm_names == LLMS + [NEW]
    assert torch.equal(grown.llm_embedding.weight[3], model.llm_embedding.weight[1])
    assert grown.config.bound_offsets["0.9"] == OFFSETS["0.9"] + [OFFSETS["0.9"][1]]
    with pytest.raises(ValueError, match="Unknown LLM"):
        extend_llms(model, {NEW: "org/not-known"})


# -- train.py --init-from, each mode, end to end -----------------------------------------------------------------
TWO = "meta-llama/Llama-3.2-1B-Instruct,meta-llama/Llama-3.2-3B-Instruct"


@pytest.fixture(scope="module")
def base_export(tiny_encoder, castillo_dir, tmp_path_factory):
    from test_train import ok, train

    path = tmp_path_factory.mktemp("base")
    ok(train(["--encoder", tiny_encoder, "--dataset", castillo_dir, "--output_dir", "run", "--export_dir", "base",
              "--max_steps", "2", "--llms", TWO], path))
    return path / "base"


def write_log(path, n=30):
    rows = [{"prompt_text": f"Question number {i}: explain {'everything' if i % 2 else 'briefly'}", "model": NEW,
             "output_sizes": [50 + 300 * (i % 2)], "finish_reasons": ["stop"], "max_tokens": 1000} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path, trust_remote_code=True), AutoTokenizer.from_pretrained(path)


def test_train_py_default_mode_adds_the_llm_and_leaves_the_others_bitwise(base_export, tmp_path):
    from test_train import ok, train

    run = ok(train(["--init-from", base_export, "--dataset", write_log(tmp_path / "log.jsonl"), "--export_dir",
                    "adapted"], tmp_path))
    assert "starts as meta-llama/" in run.stderr
    base, tokenizer = load(base_export)
    adapted, _ = load(tmp_path / "adapted")
    assert adapted.config.llm_names == TWO.split(",") + [NEW]
    before, after = base.predict(PROMPTS, tokenizer), adapted.predict(PROMPTS, tokenizer, llms=TWO.split(","))
    assert torch.equal(before.mean, after.mean) and torch.equal(before.bound, after.bound)
    assert adapted.config.bound_offsets["0.9"][:2] == base.config.bound_offsets["0.9"]
    info = json.loads((tmp_path / "adapted" / "training_info.json").read_text())
    assert info["adaptation"]["mode"] == "llm" and info["adaptation"]["new_llms"] == [NEW]
    assert info["adaptation"]["calibrated"][NEW].startswith("fitted on 30 answers")


def test_train_py_sibling_mode_copies_the_best_fitting_llm(base_export, tmp_path):
    from test_train import ok, train

    ok(train(["--init-from", base_export, "--dataset", write_log(tmp_path / "log.jsonl"), "--adapt", "sibling",
              "--export_dir", "copied"], tmp_path))
    model, tokenizer = load(tmp_path / "copied")
    sibling = json.loads((tmp_path / "copied" / "training_info.json").read_text())["adaptation"]["siblings"][NEW]
    pred = model.predict(PROMPTS, tokenizer, llms=[NEW, sibling])
    assert torch.equal(pred.mean[:, 0], pred.mean[:, 1])


def test_train_py_full_mode_replays_the_pool_beside_the_log(base_export, castillo_dir, tmp_path):
    from test_train import ok, train

    run = ok(train(["--init-from", base_export, "--dataset", write_log(tmp_path / "log.jsonl"), "--adapt", "full",
                    "--replay", castillo_dir, "--max_steps", "3", "--attention_dropout", "0.05", "--output_dir",
                    "run", "--export_dir", "tuned"], tmp_path))
    assert "replaying" in run.stderr and "starts as meta-llama/" in run.stderr
    model, tokenizer = load(tmp_path / "tuned")
    assert model.config.encoder_config["attention_probs_dropout_prob"] == 0.05  # the export's value replaced
    assert model.config.llm_names == TWO.split(",") + [NEW]
    assert all(len(v) == 3 for v in model.config.bound_offsets.values())
    assert torch.isfinite(model.predict("Question number 99: explain everything", tokenizer, llms=NEW).mean).all()


def test_train_py_rejects_an_unknown_mode(base_export, tmp_path):
    from test_train import train

    run = train(["--init-from", base_export, "--dataset", write_log(tmp_path / "log.jsonl"), "--adapt", "most"],
                tmp_path)
    assert run.returncode != 0 and "--adapt must be one of ['llm', 'sibling', 'full']" in run.stderr


def test_gateway_log_retrain_reload_loop(base_export, tmp_path):
    """The documented loop: the gateway logs traffic of an LLM the export does not know (default priority), train.py
    learns it from that log (answers cut by max_tokens as lower bounds), and a gateway on the new export predicts
    for it."""
    import httpx

    from lenpred.gateway import Gateway, GatewayConfig
    from lenpred.gateway.fake import FakeUpstream
    from test_train import ok, train

    fake = FakeUpstream(models=(NEW,)).start()
    log = tmp_path / "requests.jsonl"
    try:
        with Gateway.from_export(base_export, GatewayConfig(upstream=fake.url, port=0, log_path=str(log))) as gw:
            for i in range(24):
                fake.tokens = 40 if i % 2 else 3  # long answers to the long prompts
                body = {"model": NEW, "messages": [{"role": "user", "content": PROMPTS[i]}],
                        **({"max_tokens": 20} if i % 4 == 1 else {})}  # some answers are cut at 20 tokens
                assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(records) == 24 and all(r["predicted_mean"] is None and r["priority"] >= 1000 for r in records)
        assert sum(r["finish_reasons"] == ["length"] for r in records) == 6
        ok(train(["--init-from", base_export, "--dataset", log, "--export_dir", "adapted"], tmp_path))
        fake.tokens = 40
        with Gateway.from_export(tmp_path / "adapted", GatewayConfig(upstream=fake.url, port=0)) as gw:
            body = {"model": NEW, "messages": [{"role": "user", "content": PROMPTS[1]}]}
            assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        assert fake.received[-1]["priority"] < 1000  # predicted now, no longer the default
    finally:
        fake.close()
    info = json.loads((tmp_path / "adapted" / "training_info.json").read_text())
    # a quarter of the answers stopped at the cap: the 0.9 quantile and above cannot be told from this log
    assert info["adaptation"]["calibrated"][NEW].startswith("fitted on 24 answers (6 cut short); quantiles ['0.9'")


def test_train_py_skips_a_bad_logs_bad_lines_by_reason_and_refuses_a_log_without_its_columns(base_export, tmp_path):
    """Through `train.py`, as a user meets it: each malformed line is skipped and counted by its reason (and the
    LLM is learnt from the rest); a file without the columns it needs is an error naming them."""
    from test_train import ok, train

    path = write_log(tmp_path / "log.jsonl")
    bad = [{"prompt_text": "   ", "model": NEW, "output_sizes": [10]},
           {"prompt_text": "No model", "model": "", "output_sizes": [10]},
           {"prompt_text": "Negative", "model": NEW, "output_sizes": [-5]},
           {"prompt_text": "Not a number", "model": NEW, "output_sizes": ["many"]},
           {"prompt_text": "Two reasons, one answer", "model": NEW, "output_sizes": [10],
            "finish_reasons": ["stop", "stop"]}]
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in bad) + "{not json\n")
    run = ok(train(["--init-from", base_export, "--dataset", path, "--export_dir", "adapted"], tmp_path))
    assert "skipped 1 unparsable JSON line(s)" in run.stderr
    counts = re.search(r"skipped 5 malformed row\(s\) of 35: (\{.*\})", run.stderr)
    assert counts, run.stderr[-3000:]
    assert ast.literal_eval(counts.group(1)) == {"missing_prompt_text": 1, "missing_llm": 1, "negative_output_size": 1,
                                                 "invalid_output_size": 1, "finish_reasons_mismatch": 1}
    assert NEW in json.loads((tmp_path / "adapted" / "config.json").read_text())["llm_names"]
    (tmp_path / "no-model.jsonl").write_text(json.dumps({"prompt_text": "x", "output_sizes": [3]}) + "\n")
    run = train(["--init-from", base_export, "--dataset", tmp_path / "no-model.jsonl", "--export_dir", "never"],
                tmp_path)
    assert run.returncode != 0 and "missing required column(s) ['model']" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "never").exists()


def test_cached_prompt_vectors_give_the_predictions_and_the_adaptation_of_a_fresh_encoding(model, tokenizer):
    vectors = model.encode_prompts(PROMPTS, tokenizer)
    direct, cached = model.predict(PROMPTS, tokenizer), model.predict_vectors(vectors)
    assert cached.llm_names == direct.llm_names and cached.bound_calibrated == direct.bound_calibrated
    for field in ("mean", "std", "bound", "bin_probs"):
        torch.testing.assert_close(getattr(cached, field), getattr(direct, field))
    by_text = dict(zip(PROMPTS, vectors))
    asked = []

    def vectors_of(prompts):
        asked.extend(prompts)
        return torch.stack([by_text[p] for p in prompts])

    rows = log_rows(direct.mean[:, 1].numpy() * 2)
    fresh, _ = adapt(model, tokenizer, rows)
    reused, _ = adapt(model, tokenizer, rows, vectors_of=vectors_of)
    assert sorted(asked) == sorted(PROMPTS)  # every log prompt came from the cache, none was encoded again
    torch.testing.assert_close(reused.llm_embedding.weight, fresh.llm_embedding.weight)
