#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it into a fresh venv (torch's CPU wheel first, then
# the wheel with its dependencies), and, away from the checkout, run the CLI, import the package and write a
# remote-code export with it that AutoModel and the pipeline load.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q setuptools wheel
"$work/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/dist" .
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/lenpred-*.whl
cd "$work"  # only the installed package is importable from here
venv/bin/lenpred --help > /dev/null
venv/bin/python - <<'PY'
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
import lenpred  # noqa: E402
from transformers import AutoModel, AutoTokenizer, BertConfig, pipeline  # noqa: E402

from configuration_lenpred import LenPredConfig  # noqa: E402
from lenpred.hub import default_encoder_path, export_model  # noqa: E402
from modeling_lenpred import LenPredModel  # noqa: E402

site = os.path.dirname(os.path.dirname(lenpred.__file__))
assert "site-packages" in site and not os.path.exists(os.path.join(site, "evaluate.py")), site
tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
encoder = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
config = LenPredConfig(encoder_config=encoder.to_diff_dict(), llm_names=["meta-llama/Llama-3.2-1B-Instruct"],
                       end_dim=16, head_hidden_dim=16, llm_embedding_dim=4, max_length=64)
export_model(LenPredModel(config).eval(), tokenizer, "export")
model = AutoModel.from_pretrained("export", trust_remote_code=True)
pred = model.predict(["Write a haiku about the sea."], AutoTokenizer.from_pretrained("export", trust_remote_code=True))
out = pipeline(model="export", trust_remote_code=True)("Write a haiku about the sea.")
assert pred.mean.shape == (1, 1) and out, (pred, out)
print(f"wheel ok: lenpred from {site}; export loads (mean {float(pred.mean[0, 0]):.1f} tokens)")
PY
