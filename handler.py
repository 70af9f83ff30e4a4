"""Inference Endpoint handler: the Hub's hosted widget refuses custom-code models, an Endpoint runs this instead.

This file is remote code: it ships in the exported folder and imports only its siblings there.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModel, AutoTokenizer

try:
    from .pipeline_lenpred import LenPredPipeline
except ImportError:  # loaded as a plain module from the repository root or the export folder
    from pipeline_lenpred import LenPredPipeline

__all__ = ["EndpointHandler"]


class EndpointHandler:
    """`EndpointHandler(path)(data)`: `data["inputs"]` is a prompt or a list of prompts; optional
    `data["parameters"]["llm"]` names one LLM or a list (default: every LLM the model knows)."""

    def __init__(self, path: str = ""):
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.pipeline = LenPredPipeline(model=model, tokenizer=tokenizer)

    def __call__(self, data: dict[str, Any]) -> list:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request body must be a JSON object with "inputs" (a prompt or a list of prompts)')
        parameters = data.get("parameters") or {}
        return self.pipeline(data["inputs"], llm=parameters.get("llm"))
