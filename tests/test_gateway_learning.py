"""`lenpred gateway --learn` against the fake upstream (tiny random model): an LLM new to the model learnt while the
gateway serves, every other LLM bitwise unchanged, refits racing predictions, the learn dir and the restart, bad
log lines, and what learning refuses."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from _gateway_util import chat, log_rows, post, wait_for

from lenpred.gateway import Gateway, GatewayConfig
from lenpred.gateway.fake import FakeUpstream

from conftest import LLMS

NEW = "new-org/New-LLM-2B"
PROMPTS = [f"Question {i}: {'explain it all in great detail ' * (i % 5)}(topic {i * 7})" for i in range(40)]


def wants(body) -> int:
    """The fake LLM's answer length: longer for longer prompts, so there is a ranking to learn."""
    return 5 + 4 * len(body["messages"][-1]["content"].split())


@pytest.fixture
def upstream():
    fake = FakeUpstream(tokens=wants).start()
    yield fake
    fake.close()


@pytest.fixture
def learning(tiny_model, tokenizer, tmp_path):
    gateways = []

    def make(upstream_url, **kw) -> Gateway:
        cfg = GatewayConfig(upstream=upstream_url, port=0, log_path=str(tmp_path / "requests.jsonl"), learn=True,
                            learn_every=10, learn_min_answers=10, learn_interval=0.0, aging_rate=0.0,
                            default_priority=777, **kw)
        gw = Gateway(tiny_model, tokenizer, cfg).start()
        gw.learner.start()
        gateways.append(gw)
        return gw

    yield make
    for gw in gateways:
        gw.close()


def known_predictions(model, tokenizer):
    return model.predict(PROMPTS, tokenizer, llms=LLMS)


def test_a_new_llm_is_learnt_while_serving_and_the_others_stay_bitwise(upstream, learning, tokenizer, tmp_path):
    from transformers import AutoModel

    gw = learning(upstream.url, learn_dir=str(tmp_path / "learnt"))
    before = known_predictions(gw.model, tokenizer)
    for p in PROMPTS[:10]:
        assert post(gw.url, chat(p, model=NEW)).status_code == 200
    assert [r["priority"] for r in upstream.received] == [777] * 10  # unknown: the default, until learnt
    wait_for(lambda: NEW in gw.model.config.llm_names)
    assert post(gw.url, chat(PROMPTS[11], model=NEW)).status_code == 200
    predicted = gw.model.predict(PROMPTS[11], tokenizer, llms=[NEW]).mean[0, 0].item()
    assert upstream.received[-1]["priority"] == round(predicted) != 777
    after = known_predictions(gw.model, tokenizer)
    for field in ("mean", "std", "bound", "bin_probs"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    state = httpx.get(gw.url + "/llms", timeout=30).json()
    info = state["llms"][NEW]
    assert state["learning"] and NEW in state["predicted"] and info["refits"] >= 1 and info["mode"] == "llm"
    assert info["answers_seen"] == 11 and info["prequential"]["answers"] == 1  # one answer was predicted first
    metrics = httpx.get(gw.url + "/metrics", timeout=30).text
    assert f'lenpred_gateway_learn_refits_total{{llm="{NEW}"}}' in metrics
    assert f'lenpred_gateway_learn_answers_remembered{{llm="{NEW}"}} 11.0' in metrics
    wait_for(lambda: (tmp_path / "learnt" / "learning.json").exists()
             and gw.learner.llms()[NEW]["refits"] == reloaded_refits(tmp_path / "learnt"))
    reloaded = AutoModel.from_pretrained(tmp_path / "learnt", trust_remote_code=True)
    assert torch.equal(reloaded.predict(PROMPTS, tokenizer, llms=[NEW]).mean,
                       gw.model.predict(PROMPTS, tokenizer, llms=[NEW]).mean)


def reloaded_refits(folder) -> int:
    return json.loads((folder / "learning.json").read_text())["llms"][NEW]["refits"]


def test_prequential_scores_follow_the_answers():
    from lenpred.gateway.learning import prequential_scores

    got = prequential_scores([(10.0, 20.0, 12.0, False), (30.0, 25.0, 28.0, False), (50.0, 60.0, 55.0, False),
                              (5.0, 8.0, 64.0, True)])
    assert got["answers"] == 4 and got["capped_share"] == 0.25
    assert got["mae"] == pytest.approx((2 + 2 + 5) / 3) and got["tau"] == pytest.approx(1.0)
    assert got["coverage"] == pytest.approx(2 / 4)  # 28 > 25 missed; the cut-short answer counts as not covered
    assert prequential_scores([])["mae"] is None


def test_restart_from_the_log_and_learn_dir_gives_bitwise_the_parameters(upstream, learning, tiny_model, tokenizer,
                                                                            tmp_path):
    from lenpred.hub import export_model

    base = export_model(tiny_model, tokenizer, tmp_path / "base")
    gw = learning(upstream.url, learn_dir=str(tmp_path / "learnt"))
    for p in PROMPTS[:20]:
        assert post(gw.url, chat(p, model=NEW)).status_code == 200
    log_rows(gw)
    wait_for(lambda: gw.learner.llms().get(NEW, {}).get("answers_seen") == 20)
    gw.learner.close()  # no refit of its own from here on: the one below covers all 20 answers
    gw.learner.refit(NEW)
    served = gw.model.llm_embedding.weight[gw.model.config.llm_index(NEW)].clone()
    gw.close()
    with open(gw.config.log_path, "a", encoding="utf-8") as f:  # lines a restart must skip, not learn from
        f.write('{"torn": \n' + json.dumps({"prompt_text": "two answers", "model": NEW, "output_sizes": None,
                                            "output_mean": 7.0}) + "\n")
    again = Gateway.from_export(base, GatewayConfig(**{**gw.config.__dict__, "port": 0}))
    try:
        assert torch.equal(again.model.llm_embedding.weight[again.model.config.llm_index(NEW)], served)
        info = again.learner.llms()[NEW]
        assert info["answers_remembered"] == 20 and info["refits"] == gw.learner.llms()[NEW]["refits"]
        again.learner.refit(NEW)  # the rebuilt memory (saved vectors, the log's answers) refits to the same bits
        assert torch.equal(again.model.llm_embedding.weight[again.model.config.llm_index(NEW)], served)
    finally:
        again.close_resources()


def test_refits_racing_predictions_never_tear_the_served_model(upstream, learning, tokenizer):
    gw = learning(upstream.url)
    for p in PROMPTS[:12]:
        assert post(gw.url, chat(p, model=NEW)).status_code == 200
    wait_for(lambda: NEW in gw.model.config.llm_names)
    means = known_predictions(gw.model, tokenizer).mean
    expected = {p: means[i].tolist() for i, p in enumerate(PROMPTS)}
    stop, errors, seen = threading.Event(), [], []

    def hammer(k):  # batches of every make-up, for known LLMs and the one being refitted
        while not stop.is_set():
            for i, p in enumerate(PROMPTS[k::4]):
                try:
                    mean, _, _, _ = gw.batcher.submit(p, LLMS[i % 3]).result(30)
                    new_mean, _, _, _ = gw.batcher.submit(p, NEW).result(30)
                except Exception as exc:  # noqa: BLE001 - a torn model would fail here
                    errors.append(repr(exc))
                    continue
                if mean != pytest.approx(expected[p][i % 3], rel=1e-4) or not new_mean > 0:
                    errors.append((p, mean, new_mean))
                seen.append(mean)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            gw.learner.refit(NEW)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert seen and not errors


def test_learning_refuses_what_it_cannot_do(tiny_model, tokenizer, tmp_path):
    from lenpred.hub import export_model

    with pytest.raises(ValueError, match="needs --log"):
        Gateway(tiny_model, tokenizer, GatewayConfig(learn=True))
    with pytest.raises(ValueError, match="--learn-every must be at least 1"):
        Gateway(tiny_model, tokenizer, GatewayConfig(learn=True, log_path=str(tmp_path / "l.jsonl"), learn_every=0))
    with pytest.raises(ValueError, match="needs a model and prediction on"):
        Gateway(tiny_model, tokenizer, GatewayConfig(learn=True, predict=False, log_path=str(tmp_path / "l.jsonl")))
    export = export_model(tiny_model, tokenizer, tmp_path / "export")
    with pytest.raises(ValueError, match="'onnx' backend.*use --backend torch"):
        Gateway.from_export(export, GatewayConfig(learn=True, log_path=str(tmp_path / "l.jsonl")), backend="onnx")


def test_a_crash_while_writing_the_learn_dir_leaves_the_previous_export(upstream, learning, tokenizer, tmp_path,
                                                                        monkeypatch):
    from transformers import AutoModel

    from lenpred import hub

    gw = learning(upstream.url, learn_dir=str(tmp_path / "learnt"))
    for p in PROMPTS[:10]:
        assert post(gw.url, chat(p, model=NEW)).status_code == 200
    wait_for(lambda: (tmp_path / "learnt" / "learning.json").exists())
    gw.learner.close()
    good = AutoModel.from_pretrained(tmp_path / "learnt", trust_remote_code=True)

    def crash(model, tok, out_dir, **kw):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(hub, "export_model", crash)
    with pytest.raises(OSError, match="disk full"):
        gw.learner.persist()
    again = AutoModel.from_pretrained(tmp_path / "learnt", trust_remote_code=True)
    assert torch.equal(again.llm_embedding.weight, good.llm_embedding.weight)


def test_the_cli_takes_the_learning_flags_and_refuses_bad_ones_with_exit_2(tiny_model, tokenizer, tmp_path):
    import subprocess
    import sys

    from lenpred.hub import export_model

    export = export_model(tiny_model, tokenizer, tmp_path / "export")
    base = [sys.executable, "-m", "lenpred.cli", "gateway", "--model", str(export), "--port", "0", "--learn"]
    for extra, message in (([], "--learn needs --log"),
                           (["--log", str(tmp_path / "l.jsonl"), "--learn-every", "0"], "--learn-every must be"),
                           (["--log", str(tmp_path / "l.jsonl"), "--backend", "onnx"], "use --backend torch")):
        run = subprocess.run(base + extra, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert run.returncode == 2 and message in run.stderr, run.stderr
