"""LenPred demo: type a prompt, see how long each LLM's answer is predicted to be.

The Hub's hosted inference widget refuses models that need custom code, so this Gradio app does its job (run it
locally or as a Space, see `space/README.md`):

    python app.py                                  # the published model (or $LENPRED_MODEL)
    python app.py --model runs/export --port 7860  # a local export folder

The model is loaded through `transformers.pipeline(model=..., trust_remote_code=True)`, so only the model folder
(local or on the Hub) is needed; nothing of this repository is imported. The app never opens a share link and sends
no analytics.
"""

from __future__ import annotations

import argparse
import html
import os
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")

__all__ = ["EXAMPLES", "HUB_MODEL_ID", "load_predictor", "predict_rows", "display_rows", "respond", "build_app", "main"]

#: Kept equal to `pipeline_lenpred.HUB_MODEL_ID` / `PIPELINE_TASK` (checked by the tests); hard-coded so a Space
#: needs nothing but this file.
HUB_MODEL_ID = "lenpred/lenpred-minilm-castillo"
PIPELINE_TASK = "length-prediction"

#: One example prompt per CASTILLO prompt set (from its test split, trimmed).
EXAMPLES: list[tuple[str, str]] = [
    ("Alpaca", "Give two tips for consuming more vegetables."),
    ("Apps", "QUESTION: Implement a function that returns the minimal and the maximal value of a list (in this "
             "order).\n\nYour code should start with the following: \n\ndef get_min_max(seq):\n"),
    ("BigCodeBench", "Count the number of files in a directory that contain a specific word.\nThe function should "
                     "output with:\n    count (int): The number of files that contain the given word.\nYou should "
                     "write self-contained code starting with:\n```\nimport re\nimport os\nimport glob\n"
                     "def task_func(directory, word):\n```"),
    ("DS1000", "Problem:\nI have two tensors of dimension 1000 * 1. I want to check how many of the 1000 elements "
               "are equal in the two tensors.\n\nA:\n<code>\nimport torch\nA, B = load_data()\n</code>\n"
               "cnt_equal = ... # put solution in this variable\nBEGIN SOLUTION\n<code>\n"),
    ("DollyDataset", "What is a Peloton in a bicycle race?"),
    ("Mbpp", "You are an expert Python programmer, and here is your task: Write a python function to convert decimal "
             "number to octal number. Your code should pass these tests:\n\nassert decimal_to_Octal(10) == 12\n"
             "assert decimal_to_Octal(33) == 41\n"),
    ("ShareGPT", "how to change background color of an adaptive card"),
]

EMPTY_PROMPT = "Please type a prompt (or pick one of the examples) and press **Predict**."
NO_LLM = "Please choose at least one LLM."


def _short(llm: str) -> str:
    return llm.split("/")[-1]


# -- model -------------------------------------------------------------------------------------------------------
def load_predictor(source: str | None = None):
    """The LenPred pipeline for `source` (a local export folder or a Hub id; default `$LENPRED_MODEL`, then the
    published model), or a one-line message saying why it could not be loaded."""
    source = source or os.environ.get("LENPRED_MODEL") or HUB_MODEL_ID
    if source.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(source)):
        return f"Could not load the LenPred model `{source}`: no such folder (give an export folder or a Hub id)"
    try:
        from transformers import pipeline

        predictor = pipeline(PIPELINE_TASK, model=os.path.expanduser(source), trust_remote_code=True)
        llm_names(predictor)  # a model that is not LenPred fails here, not at the first click
    except Exception as err:  # noqa: BLE001 - any failure becomes a message in the page
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"Could not load the LenPred model `{source}`: {type(err).__name__}: {reason}"
    predictor.source = source
    return predictor


def llm_names(predictor) -> list[str]:
    names = list(predictor.model.config.llm_names or [])
    if not names:
        raise ValueError("the model knows no LLM (config.llm_names is empty)")
    return names


# -- prediction --------------------------------------------------------------------------------------------------
def predict_rows(predictor, prompt: str | None, llms: Sequence[str] | None = None) -> tuple[list[dict], str | None]:
    """(the pipeline's per-LLM rows, None), or ([], a message for the page). `llms=None` means every LLM."""
    if isinstance(predictor, str):
        return [], predictor
    if not prompt or not prompt.strip():
        return [], EMPTY_PROMPT
    if llms is not None and len(llms) == 0:
        return [], NO_LLM
    try:
        rows = predictor(prompt, llm=list(llms) if llms is not None else None)
    except (ValueError, TypeError) as err:  # e.g. an LLM the model does not know (only via the API)
        return [], f"Cannot predict: {err}"
    return rows, None


def display_rows(rows: list[dict]) -> list[dict[str, str]]:
    """The figures exactly as the page shows them (tokens with one decimal, probabilities in percent)."""
    out = []
    for row in rows:
        probs = row["bin_probabilities"]
        out.append({
            "llm": row["llm"],
            "mean": f"{row['predicted_mean']:.1f}",
            "std": f"{row['predicted_std']:.1f}",
            "bin": str(row["predicted_bin"]),
            "range": row["predicted_range"],
            "bin_probability": f"{100 * probs[row['predicted_range']]:.1f}",
            "bound": f"{row['upper_bound']:.1f}",
            "quantile": row["reservation_quantile"],
        })
    return out


def results_html(rows: list[dict]) -> str:
    if not rows:
        return "<p class='lenpred-empty'>No prediction yet.</p>"
    quantile = html.escape(rows[0]["reservation_quantile"])
    head = ("<tr><th>LLM</th><th>Mean ± std (tokens)</th><th>Most likely bin</th><th>Range (tokens)</th>"
            f"<th>P(bin)</th><th>{quantile} bound (tokens)</th></tr>")
    body = []
    for i, r in enumerate(display_rows(rows)):
        e = {k: html.escape(v) for k, v in r.items()}
        body.append(
            f"<tr id='lenpred-row-{i}' class='lenpred-row' data-llm='{e['llm']}'>"
            f"<td class='llm'>{e['llm']}</td>"
            f"<td><span class='mean'>{e['mean']}</span> ± <span class='std'>{e['std']}</span></td>"
            f"<td class='bin'>{e['bin']}</td><td class='range'>{e['range']}</td>"
            f"<td><span class='bin-probability'>{e['bin_probability']}</span>%</td>"
            f"<td class='bound'>{e['bound']}</td></tr>"
        )
    return f"<table class='lenpred-table'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def message_html(message: str | None) -> str:
    if not message:
        return ""
    return f"<div class='lenpred-message' role='alert'>{_inline_markdown(html.escape(message))}</div>"


def _inline_markdown(text: str) -> str:
    """`**bold**` and `` `code` `` of an already escaped one-line message."""
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 and i < len(parts) - 1 else p for i, p in enumerate(parts))


def _example_label(name: str, text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return f"{name}: {flat if len(flat) <= width else flat[:width].rstrip() + '…'}"


def mean_figure(rows: list[dict]):
    """Bar chart of the predicted mean ± std across LLMs (or None)."""
    if not rows:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 0.9 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    names = [_short(r["llm"]) for r in rows][::-1]
    means = [r["predicted_mean"] for r in rows][::-1]
    stds = [r["predicted_std"] for r in rows][::-1]
    ax.barh(names, means, xerr=stds, color="#4c78a8", ecolor="#333333", capsize=3)
    ax.set_xlabel("predicted answer length (tokens)")
    ax.set_title("Predicted mean ± std per LLM", fontsize=10)
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    return fig


def bins_figure(rows: list[dict], llm: str | None = None):
    """The bin probabilities of `llm` (default: the first row's LLM) as a bar chart (or None)."""
    row = next((r for r in rows if r["llm"] == llm), rows[0] if rows else None)
    if row is None:
        return None
    from matplotlib.figure import Figure

    labels = list(row["bin_probabilities"])
    probs = [100 * v for v in row["bin_probabilities"].values()]
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#f58518" if i == row["predicted_bin"] else "#4c78a8" for i in range(len(labels))]
    ax.bar(range(len(labels)), probs, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0, ha="right"
                  if len(labels) > 6 else "center", fontsize=8)
    ax.set_ylabel("probability (%)")
    ax.set_xlabel("answer length bin (tokens)")
    ax.set_title(f"Bin probabilities: {_short(row['llm'])}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def respond(predictor, prompt: str | None, llms: Sequence[str] | None, focused: str | None = None):
    """What one click on **Predict** shows: (message HTML, results-table HTML, mean ± std figure, bin-probability
    figure, LLMs predicted for, LLM whose bins are shown, the pipeline's rows)."""
    rows, msg = predict_rows(predictor, prompt, llms)
    shown = [r["llm"] for r in rows]
    focused = focused if focused in shown else (shown[0] if shown else None)
    return (message_html(msg), results_html(rows), mean_figure(rows), bins_figure(rows, focused), shown, focused,
            rows)


# -- UI ----------------------------------------------------------------------------------------------------------
CSS = """
.lenpred-table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
.lenpred-table th, .lenpred-table td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }
.lenpred-message { padding: 8px 12px; border-radius: 6px; background: #fff4e5; border: 1px solid #f0b66a; }
#lenpred-error { padding: 8px 12px; border-radius: 6px; background: #fdecea; border: 1px solid #e57373; }
"""


def build_app(predictor_or_error: Any):
    """The Gradio Blocks for a loaded pipeline, or for a load-failure message (the page then shows the message)."""
    import gradio as gr

    failed = isinstance(predictor_or_error, str)
    names = [] if failed else llm_names(predictor_or_error)
    source = getattr(predictor_or_error, "source", None)

    with gr.Blocks(title="LenPred: answer-length prediction", analytics_enabled=False) as demo:
        gr.Markdown(
            "# LenPred — how long will the answer be?\n"
            "Predicts, from the prompt alone, the mean and spread of each LLM's answer length in tokens, the most "
            "likely length bin and a high-quantile bound (for memory reservation)."
            + (f"\n\nModel: `{source}`" if source else "")
        )
        if failed:
            gr.Markdown(predictor_or_error, elem_id="lenpred-error")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=6, placeholder="Type a prompt…", elem_id="lenpred-prompt",
                                    interactive=not failed)
                gr.Examples([[text] for _, text in EXAMPLES], inputs=[prompt], label="Examples (one per prompt set)",
                            example_labels=[_example_label(name, text) for name, text in EXAMPLES])
            with gr.Column(scale=2):
                llms = gr.Dropdown(names, value=names, multiselect=True, label="LLMs", elem_id="lenpred-llms",
                                   interactive=not failed)
                submit = gr.Button("Predict", variant="primary", elem_id="lenpred-submit", interactive=not failed)
        message = gr.HTML("", elem_id="lenpred-message")
        table = gr.HTML(results_html([]), elem_id="lenpred-results")
        with gr.Row():
            mean_plot = gr.Plot(label="Predicted mean ± std across LLMs", show_label=False,
                                elem_id="lenpred-mean-plot")
            with gr.Column():
                focus = gr.Dropdown(names, value=names[0] if names else None, label="Bin probabilities for",
                                    elem_id="lenpred-focus", interactive=not failed)
                bins_plot = gr.Plot(label="Bin probabilities", show_label=False, elem_id="lenpred-bins-plot")
        state = gr.State([])

        def on_submit(text, chosen, focused):
            msg, results, mean_fig, bins_fig, shown, focused, rows = respond(predictor_or_error, text, chosen, focused)
            return msg, results, mean_fig, bins_fig, gr.update(choices=shown or names, value=focused), rows

        def on_focus(focused, rows):
            return bins_figure(rows or [], focused)

        outputs = [message, table, mean_plot, bins_plot, focus, state]
        submit.click(on_submit, [prompt, llms, focus], outputs, api_name="predict")
        prompt.submit(on_submit, [prompt, llms, focus], outputs, api_name=False)
        focus.input(on_focus, [focus, state], [bins_plot], api_name=False)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, **kwargs):
    """Serve `demo` locally: no share link, no server-side rendering (no Node needed), no analytics."""
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, css=CSS, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LenPred demo: predicted answer lengths for a prompt, per LLM.")
    parser.add_argument("--model", default=None,
                        help=f"local export folder or Hub id (default: $LENPRED_MODEL, else {HUB_MODEL_ID})")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port to serve on (default 7860)")
    args = parser.parse_args(argv)
    predictor = load_predictor(args.model)
    if isinstance(predictor, str):
        print(predictor)
    launch(build_app(predictor), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
