"""The Gradio demo (`app.py`): its prediction function, and the page driven end to end in headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LLMS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PROMPT = "Write a short poem about the sea and explain its meter."


@pytest.fixture
def tiny_model(varied_model):
    """Every LLM and prompt gets different figures, so a mix-up between rows shows."""
    return varied_model


@pytest.fixture
def app():
    import app as app_module

    return app_module


@pytest.fixture
def export_dir(tiny_model, tokenizer, tmp_path):
    from lenpred.hub import export_model

    return export_model(tiny_model, tokenizer, tmp_path / "export")


@pytest.fixture
def predictor(app, export_dir):
    """The pipeline exactly as the app loads it (remote code from the export folder)."""
    pred = app.load_predictor(str(export_dir))
    assert not isinstance(pred, str), pred
    return pred


def shown(row: dict) -> dict[str, str]:
    """The pipeline's figures rounded as the page shows them, computed here independently of the app."""
    return {
        "llm": row["llm"],
        "mean": f"{row['predicted_mean']:.1f}",
        "std": f"{row['predicted_std']:.1f}",
        "bin": str(row["predicted_bin"]),
        "range": row["predicted_range"],
        "bin_probability": f"{100 * max(row['bin_probabilities'].values()):.1f}",
        "bound": f"{row['upper_bound']:.1f}",
    }


# -- the prediction function -------------------------------------------------------------------------------------
def test_constants_follow_the_pipeline(app):
    import pipeline_lenpred

    assert app.HUB_MODEL_ID == pipeline_lenpred.HUB_MODEL_ID
    assert app.PIPELINE_TASK == pipeline_lenpred.PIPELINE_TASK


def test_one_short_example_per_prompt_set(app):
    assert [name for name, _ in app.EXAMPLES] == ["Alpaca", "Apps", "BigCodeBench", "DS1000", "DollyDataset",
                                                  "Mbpp", "ShareGPT"]
    for _, text in app.EXAMPLES:
        assert text.strip() and len(text) < 600 and text.count("\n") <= 12


def test_app_imports_nothing_from_the_repository():
    """A Space holds app.py alone: it must not import the project's modules."""
    source = (ROOT / "app.py").read_text()
    for module in ("lenpred", "pipeline_lenpred", "modeling_lenpred", "configuration_lenpred", "handler"):
        assert f"import {module}" not in source and f"from {module}" not in source


def test_loads_an_export_with_its_llms(predictor):
    assert predictor.model.config.llm_names == LLMS
    assert predictor.source.endswith("export")


def test_load_failure_is_a_message(app, tmp_path):
    missing = tmp_path / "no-such-model"
    message = app.load_predictor(str(missing))
    assert isinstance(message, str) and message.startswith("Could not load the LenPred model")
    assert str(missing) in message
    rows, msg = app.predict_rows(message, PROMPT, None)
    assert rows == [] and msg == message
    out = app.respond(message, PROMPT, None)
    assert "Could not load" in out[0] and "lenpred-row" not in out[1] and out[2] is None and out[3] is None
    failed = _by_elem_id(app.build_app(message))  # the page still builds, with the message and disabled inputs
    assert failed["lenpred-error"].value == message
    for elem_id in INPUTS:
        assert failed[elem_id].interactive is False, elem_id
    hub = app.load_predictor("acme/not-a-lenpred-model")  # offline here (HF_HUB_OFFLINE=1): fails fast
    assert hub.startswith("Could not load the LenPred model `acme/not-a-lenpred-model`")


INPUTS = ("lenpred-prompt", "lenpred-llms", "lenpred-submit", "lenpred-focus")


def _by_elem_id(demo) -> dict:
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_a_loaded_model_gets_live_inputs_and_no_error(app, predictor):
    page = _by_elem_id(app.build_app(predictor))
    assert "lenpred-error" not in page
    for elem_id in INPUTS:
        assert page[elem_id].interactive is not False, elem_id
    assert page["lenpred-llms"].value == LLMS


def test_load_failure_uses_the_environment(app, monkeypatch, tmp_path):
    monkeypatch.setenv("LENPRED_MODEL", str(tmp_path / "from-env"))
    assert "from-env" in app.load_predictor()


@pytest.mark.parametrize("prompt", ["", "   \n ", None])
def test_empty_prompt_is_a_message(app, predictor, prompt):
    rows, msg = app.predict_rows(predictor, prompt, LLMS)
    assert rows == [] and msg == app.EMPTY_PROMPT
    message_html, table_html, mean_fig, bins_fig, llms, focused, state = app.respond(predictor, prompt, LLMS)
    assert "Please type a prompt" in message_html and "lenpred-row" not in table_html
    assert mean_fig is None and bins_fig is None and llms == [] and focused is None and state == []


def test_no_llm_chosen_is_a_message(app, predictor):
    assert app.predict_rows(predictor, PROMPT, []) == ([], app.NO_LLM)


def test_unknown_llm_through_the_api_is_a_message(app, predictor):
    rows, msg = app.predict_rows(predictor, PROMPT, ["acme/not-a-model"])
    assert rows == [] and "Unknown LLM" in msg and all(llm in msg for llm in LLMS)


def test_results_equal_the_pipeline_rounded_as_shown(app, predictor, tiny_model, tokenizer):
    from pipeline_lenpred import LenPredPipeline

    reference = LenPredPipeline(model=tiny_model, tokenizer=tokenizer)  # the in-memory model, not the export
    chosen = [LLMS[2], LLMS[0]]
    rows, msg = app.predict_rows(predictor, PROMPT, chosen)
    want = reference(PROMPT, llm=chosen)
    assert msg is None and [r["llm"] for r in rows] == [w["llm"] for w in want] == chosen  # in the order chosen
    for got_row, want_row in zip(rows, want):  # the export's remote code against the in-memory model
        for key in ("predicted_mean", "predicted_std", "upper_bound"):
            assert got_row[key] == pytest.approx(want_row[key], rel=1e-5), key
        assert got_row["predicted_bin"] == want_row["predicted_bin"]
    expected = [shown(r) for r in want]
    got = [{k: v for k, v in r.items() if k != "quantile"} for r in app.display_rows(rows)]
    assert got == expected
    message_html, table_html, mean_fig, bins_fig, llms, focused, state = app.respond(predictor, PROMPT, chosen,
                                                                                   LLMS[0])
    assert message_html == "" and llms == chosen and focused == LLMS[0] and state == rows
    for e in expected:
        for key in ("mean", "std", "range", "bound", "bin_probability"):
            assert f">{e[key]}<" in table_html
    assert mean_fig is not None and len(mean_fig.axes[0].patches) == 2
    assert bins_fig is not None and len(bins_fig.axes[0].patches) == tiny_model.config.num_bins
    assert bins_fig.axes[0].get_title().endswith(LLMS[0].split("/")[-1])


def test_every_llm_by_default(app, predictor):
    rows, msg = app.predict_rows(predictor, PROMPT, None)
    assert msg is None and [r["llm"] for r in rows] == LLMS


def test_help_needs_no_model():
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--host", "--port"):
        assert option in proc.stdout


def test_space_metadata():
    readme = (ROOT / "space" / "README.md").read_text()
    front = readme.split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front
    requirements = (ROOT / "space" / "requirements.txt").read_text()
    for package in ("transformers", "torch", "gradio", "matplotlib"):
        assert package in requirements


# -- the page in a real browser ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Debian Chromium through Selenium, with the driver named explicitly (no Selenium Manager)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run .ci/install-browser.sh "
                    "(Debian packages chromium and chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


@contextlib.contextmanager
def serve(app, predictor_or_error):
    """The app served in-process (a server thread) on 127.0.0.1, an ephemeral port; yields its URL."""
    demo = app.build_app(predictor_or_error)
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def served(app, predictor):
    with serve(app, predictor) as url:
        yield url


def test_page_in_headless_chromium(app, browser, served, predictor, tiny_model, tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline_lenpred import LenPredPipeline

    started = time.monotonic()
    wait = WebDriverWait(browser, 60)
    browser.get(served)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#lenpred-prompt textarea")))
    submit = wait.until(EC.element_to_be_clickable((By.ID, "lenpred-submit")))
    assert "LenPred" in browser.title

    # An empty prompt gives a message, not a traceback.
    submit.click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#lenpred-message"), "Please type a prompt"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#lenpred-results .lenpred-row")

    # Every LLM the model knows is offered and chosen by default.
    chosen = wait.until(EC.visibility_of_element_located((By.ID, "lenpred-llms"))).text
    assert all(llm in chosen for llm in LLMS), chosen

    # An example fills the prompt box.
    example = (By.XPATH, "//button[starts-with(normalize-space(.), 'Alpaca:')]")
    wait.until(EC.element_to_be_clickable(example)).click()
    wait.until(lambda d: prompt.get_attribute("value") == app.EXAMPLES[0][1])
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys(Keys.DELETE)
    prompt.send_keys(PROMPT)
    wait.until(lambda d: prompt.get_attribute("value") == PROMPT)
    submit.click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#lenpred-results .lenpred-row")) == len(LLMS))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#lenpred-mean-plot img, #lenpred-mean-plot canvas"))
    assert browser.find_element(By.ID, "lenpred-message").text.strip() == ""

    page = []
    for tr in browser.find_elements(By.CSS_SELECTOR, "#lenpred-results .lenpred-row"):
        cell = {key: tr.find_element(By.CSS_SELECTOR, f".{css}").text.strip()
                for key, css in [("llm", "llm"), ("mean", "mean"), ("std", "std"), ("bin", "bin"),
                                 ("range", "range"), ("bin_probability", "bin-probability"), ("bound", "bound")]}
        page.append(cell)
    reference = LenPredPipeline(model=tiny_model, tokenizer=tokenizer)
    assert page == [shown(r) for r in reference(PROMPT)]

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "lenpred-app.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("LENPRED_SCREENSHOT_DIR"):  # keep a copy outside pytest's temp dir when asked
        shutil.copy2(shot, Path(os.environ["LENPRED_SCREENSHOT_DIR"]) / shot.name)
    assert time.monotonic() - started < 120


def test_load_failure_page_in_headless_chromium(app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    message = app.load_predictor(str(tmp_path / "no-such-model"))
    with serve(app, message) as url:
        browser.get(url)
        error = WebDriverWait(browser, 60).until(EC.visibility_of_element_located((By.ID, "lenpred-error")))
        assert "Could not load the LenPred model" in error.text and "no-such-model" in error.text
        assert not browser.find_element(By.ID, "lenpred-submit").is_enabled()
        assert "Traceback" not in browser.page_source
        browser.save_screenshot(str(tmp_path / "lenpred-app-load-failure.png"))
