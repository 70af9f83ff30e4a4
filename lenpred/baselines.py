"""Baselines LenPred must beat, and the paper's prompt-based baseline.

- `PromptSetMedian`: knows only which LLM answers and which prompt set the prompt comes from.
- `KnnBaseline`: nearest training prompts in a frozen MiniLM sentence-embedding space (`encode_sentences`).
- The prompt baseline (paper §5.2, Appendix A.2): ask the LLM itself to state its answer's length first.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

__all__ = [
    "PromptSetMedian",
    "encode_sentences",
    "cached_embeddings",
    "KnnBaseline",
    "PAPER_TEMPLATE",
    "build_baseline_prompt",
    "parse_stated_length",
    "BaselineEndpointError",
    "query_chat_endpoint",
    "run_prompt_baseline",
]


# ----------------------------------------------------------------------------------------------- prompt-set median
class PromptSetMedian:
    """Median `output_mean` and median `output_std` of the training pool per (llm, prompt_set).

    The floor a learned model must clear: prompt sets differ wholesale (Alpaca answers are short, ShareGPT long).
    Fallback for a (llm, prompt_set) pair unseen in training: that LLM's median over all its training rows, then
    the global median. Medians skip NaN (a std is unknown where the samples are); a pair with no known std falls
    back the same way for the std.
    """

    def fit(self, train_rows: pd.DataFrame) -> "PromptSetMedian":
        rows = train_rows[["llm", "prompt_set", "output_mean", "output_std"]]
        rows = rows[np.isfinite(rows["output_mean"].astype(float))]
        if rows.empty:
            raise ValueError("PromptSetMedian.fit got no training rows with a finite output_mean")
        self.pair_ = rows.groupby(["llm", "prompt_set"])[["output_mean", "output_std"]].median()
        self.llm_ = rows.groupby("llm")[["output_mean", "output_std"]].median()
        self.global_ = rows[["output_mean", "output_std"]].median()
        return self

    def _lookup(self, llm, prompt_set, column: str) -> float:
        for table, key in ((self.pair_, (llm, prompt_set)), (self.llm_, llm)):
            if key in table.index:
                value = float(table.loc[key, column])
                if math.isfinite(value):
                    return value
        return float(self.global_[column])

    def predict(self, llms: Sequence[str], prompt_sets: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) arrays, one per (llm, prompt_set) pair."""
        if not hasattr(self, "pair_"):
            raise RuntimeError("call fit() before predict()")
        llms, prompt_sets = list(llms), list(prompt_sets)
        if len(llms) != len(prompt_sets):
            raise ValueError(f"{len(llms)} llms but {len(prompt_sets)} prompt sets")
        mean = np.array([self._lookup(m, s, "output_mean") for m, s in zip(llms, prompt_sets)], dtype=float)
        std = np.array([self._lookup(m, s, "output_std") for m, s in zip(llms, prompt_sets)], dtype=float)
        return mean, std


# ---------------------------------------------------------------------------------------------- sentence embeddings
def _default_encoder_path() -> str:
    from lenpred.hub import default_encoder_path  # imported late: it loads transformers and the model code

    return default_encoder_path()


@lru_cache(maxsize=2)
def _load_encoder(path: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def encode_sentences(
    texts: Sequence[str],
    encoder_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    show_progress: bool = True,
) -> np.ndarray:
    """Frozen sentence embeddings (default all-MiniLM-L6-v2), shape (len(texts), hidden), float32, unit norm.

    Mean pooling over the attention mask, then L2 normalisation — how sentence-transformers uses this model, so
    a dot product is the cosine similarity. Texts are batched longest-first to waste little padding; the output
    keeps the input order.
    """
    import torch

    path = str(encoder_path) if encoder_path is not None else _default_encoder_path()
    tokenizer, model = _load_encoder(path)
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="embedding prompts", unit="batch", disable=not show_progress):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().cpu().numpy()
    return out


def cached_embeddings(
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    encoder_path: str | os.PathLike | None = None,
    **kw,
) -> np.ndarray:
    """`encode_sentences` with an on-disk cache (`<cache_dir>/emb-<sha1>.npy`, default `~/.cache/lenpred`).

    The key is the SHA-1 of the encoder path, `max_length` and every text in order, so any change re-encodes.
    """
    path = str(encoder_path) if encoder_path is not None else _default_encoder_path()
    max_length = kw.get("max_length", 256)
    digest = hashlib.sha1()
    digest.update(f"{path}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        data = str(t).encode("utf-8", "surrogatepass")
        digest.update(f"{len(data)}:".encode() + data)
    directory = Path(cache_dir if cache_dir is not None else Path.home() / ".cache" / "lenpred").expanduser()
    file = directory / f"emb-{digest.hexdigest()}.npy"
    if file.exists():
        return np.load(file)
    emb = encode_sentences(texts, encoder_path=path, **kw)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, file)  # atomic: a concurrent reader never sees half a file
    return emb


# ------------------------------------------------------------------------------------------------------------- kNN
def _unit(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim == 1:
        m = m[None, :]
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)


class KnnBaseline:
    """k-nearest-neighbour length prediction in a frozen sentence-embedding space.

    Space: the unit-norm MiniLM embeddings of `encode_sentences` (re-normalised here), compared by cosine
    similarity (dot product). For each LLM only the training prompts *that LLM* answered are neighbours.
    Prediction: the mean of log1p(output_mean) over the k=16 (default) most similar prompts, mapped back with
    expm1 — a geometric-style mean, since lengths are skewed and errors multiplicative. The std is the same
    average over the k most similar training prompts whose std is known (NaN stds are ignored).
    """

    def __init__(self, k: int = 16):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k

    @staticmethod
    def _as_mapping(embeddings) -> dict:
        if isinstance(embeddings, Mapping):
            return dict(embeddings)
        ids, matrix = embeddings
        matrix = np.asarray(matrix)
        if len(ids) != len(matrix):
            raise ValueError(f"{len(ids)} prompt ids but {len(matrix)} embeddings")
        return dict(zip(list(ids), matrix))

    def fit(self, train_rows: pd.DataFrame, train_embeddings_by_prompt_id) -> "KnnBaseline":
        """`train_embeddings_by_prompt_id`: `{prompt_id: vector}` or `(prompt_ids, matrix)`; may also hold the
        embeddings of the prompts to predict later, so `predict` can take prompt ids."""
        self.embeddings_ = self._as_mapping(train_embeddings_by_prompt_id)
        rows = train_rows[np.isfinite(train_rows["output_mean"].astype(float))]
        missing = sorted({str(p) for p in rows["prompt_id"] if p not in self.embeddings_})
        if missing:
            raise KeyError(f"no embedding for {len(missing)} training prompt(s), e.g. {missing[:3]}")
        self.index_ = {}
        for llm, part in rows.groupby("llm", sort=False):
            emb = _unit(np.stack([self.embeddings_[p] for p in part["prompt_id"]]))
            std = part["output_std"].astype(float).to_numpy()
            known = np.isfinite(std)
            self.index_[llm] = {
                "emb": emb, "log_mean": np.log1p(part["output_mean"].astype(float).to_numpy()),
                "std_emb": emb[known], "log_std": np.log1p(std[known]),
            }
        return self

    def _knn_mean(self, sims: np.ndarray, values: np.ndarray) -> np.ndarray:
        if values.size == 0:
            return np.full(sims.shape[0], np.nan)
        k = min(self.k, values.size)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < values.size else np.arange(values.size)[None]
        return np.expm1(values[top].mean(axis=1))

    def predict(self, llms: Sequence[str], queries, embeddings=None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per query. `queries`: prompt ids (looked up in `embeddings`, default the mapping given to
        `fit`) or a (n, dim) embedding matrix. An LLM without training rows raises ValueError."""
        if not hasattr(self, "index_"):
            raise RuntimeError("call fit() before predict()")
        llms = list(llms)
        if isinstance(queries, np.ndarray) and queries.dtype.kind == "f":
            q = _unit(queries)
        else:
            lookup = self.embeddings_ if embeddings is None else self._as_mapping(embeddings)
            absent = [p for p in queries if p not in lookup]
            if absent:
                raise KeyError(f"no embedding for {len(absent)} query prompt(s), e.g. {absent[:3]}")
            q = _unit(np.stack([lookup[p] for p in queries])) if len(queries) else np.zeros((0, 1), np.float32)
        if len(q) != len(llms):
            raise ValueError(f"{len(llms)} llms but {len(q)} queries")
        unknown = sorted({str(m) for m in llms if m not in self.index_})
        if unknown:
            raise ValueError(f"KnnBaseline has no training rows for LLM(s) {unknown}; known: {sorted(self.index_)}")
        mean, std = np.full(len(llms), np.nan), np.full(len(llms), np.nan)
        llm_arr = np.asarray(llms, dtype=object)
        for llm, ix in self.index_.items():
            sel = np.flatnonzero(llm_arr == llm)
            if sel.size == 0:
                continue
            mean[sel] = self._knn_mean(q[sel] @ ix["emb"].T, ix["log_mean"])
            std[sel] = self._knn_mean(q[sel] @ ix["std_emb"].T, ix["log_std"])
        return mean, std


# ------------------------------------------------------------------------------------------- paper prompt baseline
#: The paper's instruction (Appendix A.2), followed directly by the user's question.
PAPER_TEMPLATE = (
    'Predict the length of your answer before answering my question, use the format: '
    '"[length(only one number)]: (your answer)". The length of your answer should be as close to the prediction '
    'of the length you give me as possible. Remember to follow the format. '
)

#: Stated lengths above this are treated as garbage, not as a prediction.
MAX_PLAUSIBLE_LENGTH = 100_000


def build_baseline_prompt(question: str) -> str:
    """The paper's baseline prompt: `PAPER_TEMPLATE + question`."""
    return PAPER_TEMPLATE + str(question)


_LEAD = re.compile(r"^[\s*#>_`~]*(?:[-+•]\s+)?[\s*_`~]*")
_NUM = r"(?P<neg>-\s*)?(?P<num>\d[\d,]*(?:\.\d+)?)"
_UNIT = r"(?:\s*(?:tokens?|words?|characters?|chars?))?"
_LABEL = r"(?:(?:predicted|estimated|answer)\s+)?length(?:\s+of\s+(?:my|the)\s+answer)?\s*(?:\(.*?\)\s*)?[:=]?[\s*_`]*"
_PATTERNS = [
    # [55]: … / [55 tokens]: … / [Length: 55] / (55): …
    re.compile(r"^[\[(]\s*(?:" + _LABEL + r")?" + _NUM + _UNIT + r"\s*[\])]", re.I),
    re.compile(r"^" + _LABEL + r"\[?\s*" + _NUM, re.I),  # Length: 55 …
    re.compile(r"^" + _NUM + _UNIT + r"[\s*_`~]*(?:[:=\]\)\n]|$)", re.I),  # 55: … / 55 tokens: … / a bare 55
]


def parse_stated_length(reply: str | None) -> int | None:
    """The length the LLM stated at the start of its reply, or None if it gave none, or a negative or absurd one.

    Accepts the paper's `55: answer` and the variants models actually produce: `[55]: …`, `[55 tokens]: …`,
    `Length: 55`, `**[120]**: …`, `1,200: …`, a bare number, after leading whitespace or markdown. A number
    that merely starts a sentence ("3 ways to …") is not a stated length. Decimals are rounded.
    """
    if not isinstance(reply, str):
        return None
    text = _LEAD.sub("", reply, count=1)
    for pattern in _PATTERNS:
        match = pattern.match(text)
        if match:
            if match.group("neg"):
                return None
            value = round(float(match.group("num").replace(",", "")))
            return value if 0 <= value <= MAX_PLAUSIBLE_LENGTH else None
    return None


class BaselineEndpointError(RuntimeError):
    """The chat endpoint could not be reached or answered with an error or an unusable body."""


def query_chat_endpoint(url: str, model: str, prompt: str, timeout: float = 60, max_tokens: int | None = None) -> str:
    """Send `prompt` as one user message to an OpenAI-compatible server; return the reply text.

    POSTs to `{url}/chat/completions` if `url` ends with `/v1`, else to `{url}/v1/chat/completions` (vLLM,
    llama.cpp, TGI, Ollama all serve this). Raises `BaselineEndpointError` on HTTP or connection errors.
    """
    base = url.rstrip("/")
    endpoint = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
    payload: dict = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        payload["max_tokens"] = int(max_tokens)
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode("utf-8", "replace")
        raise BaselineEndpointError(f"{endpoint} answered HTTP {err.code} {err.reason}: {detail}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, DNS, timeout, cut off
        reason = getattr(err, "reason", err)
        raise BaselineEndpointError(f"could not reach {endpoint}: {reason}") from err
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise BaselineEndpointError(f"{endpoint} sent no OpenAI chat completion: {body[:200]!r}") from err
    return content if isinstance(content, str) else ""


def run_prompt_baseline(
    prompts: Sequence[str],
    url: str,
    model: str,
    timeout: float = 60,
    max_tokens: int | None = None,
    wrap: bool = True,
    show_progress: bool = True,
) -> tuple[list[int | None], dict[str, int]]:
    """Ask the LLM for each prompt's length the paper's way; return the stated lengths and outcome counts.

    `prompts` are the users' questions, wrapped with `PAPER_TEMPLATE` (`wrap=False` sends them as given).
    Counts: `ok` (a length was parsed), `malformed` (a reply without a usable length), `failed` (request
    error) — the latter two give None and never stop the run. The stated length is in whatever unit the LLM
    has in mind; like the paper, score it as tokens. `max_tokens` may be small: only the leading number is read,
    though truncating the answer could change what the model states.
    """
    lengths: list[int | None] = []
    counts = {"ok": 0, "malformed": 0, "failed": 0}
    bar = tqdm(prompts, desc=f"prompt baseline ({model})", unit="prompt", disable=not show_progress)
    for prompt in bar:
        text = build_baseline_prompt(prompt) if wrap else str(prompt)
        try:
            reply = query_chat_endpoint(url, model, text, timeout=timeout, max_tokens=max_tokens)
        except BaselineEndpointError:
            counts["failed"] += 1
            lengths.append(None)
            continue
        value = parse_stated_length(reply)
        counts["ok" if value is not None else "malformed"] += 1
        lengths.append(value)
        bar.set_postfix(counts)
    return lengths, counts
