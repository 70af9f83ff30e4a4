"""LenPred configuration: the encoder's BERT settings, the LLMs predicted for, the heads and the bins.

This file is remote code: it is copied into every exported Hub folder and imports nothing from the
project's `lenpred` package.
"""

from __future__ import annotations

import math

from transformers import BertConfig, PretrainedConfig

__all__ = ["LenPredConfig", "make_bin_edges", "bin_labels", "PAPER_BIN_SIZES"]

#: The bin sizes (tokens per bin) the paper evaluates, Tables 2 and 3.
PAPER_BIN_SIZES = (50, 100, 200, 500, 1000)


def make_bin_edges(bin_size: int, max_tokens: int = 4000) -> list[int]:
    """Lower edges of length bins `[0, s), [s, 2s), …`; the last bin, starting below `max_tokens`, is open-ended.

    Example: `make_bin_edges(500)` → `[0, 500, 1000, …, 3500]` (8 bins, the last one `[3500, ∞)`).
    """
    if not isinstance(bin_size, int) or bin_size <= 0:
        raise ValueError(f"bin_size must be a positive integer, got {bin_size!r}")
    if max_tokens <= bin_size:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed bin_size ({bin_size})")
    return list(range(0, int(math.ceil(max_tokens / bin_size)) * bin_size, bin_size))


def bin_labels(bin_edges: list[int]) -> list[str]:
    """Human-readable token ranges of the bins: `"0-499"`, …, `"3500+"`."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(bin_edges[:-1], bin_edges[1:])]
    return labels + [f"{bin_edges[-1]}+"]


class LenPredConfig(PretrainedConfig):
    r"""
    Configuration of a [`LenPredModel`]: a BERT prompt encoder, an embedding of the LLM that will answer, and
    the paper's MLP module (reduce to `end_dim`, two linear layers with ReLU after the first, two dropout
    layers) feeding a **bin head** and a **mean/std head**.

    Args:
        encoder_config (`dict`, *optional*):
            The BERT encoder's settings (`BertConfig.to_dict()`); a saved model never needs the original backbone
            weights. Defaults to all-MiniLM-L6-v2's shape (384 hidden, 6 layers).
        llm_names (`list[str]`):
            Ordered Hugging Face ids of the LLMs predicted for, e.g. `meta-llama/Llama-3.2-3B-Instruct`.
        default_llm (`str`, *optional*):
            The LLM used when none is named (the stock `text-classification` pipeline names none).
        llm_embedding_dim (`int`): size of the LLM-id embedding joined to the prompt vector.
        end_dim (`int`): the paper's "end dimension", the size the pooled prompt vector is reduced to.
        head_hidden_dim (`int`): width of the MLP module's first linear layer.
        dropout (`float`): probability of both dropout layers.
        bin_size (`int`): tokens per bin of the bin head (the paper evaluates 50, 100, 200, 500, 1000).
        bin_max_tokens (`int`): the last, open-ended bin starts below this many tokens.
        bin_edges (`list[int]`, *optional*): lower bin edges; built from `bin_size` and `bin_max_tokens` if unset.
        max_length (`int`): prompts are truncated to this many encoder tokens.
        prompt_tail_tokens (`int`): of a prompt longer than `max_length`, keep its last this many tokens after the
            head (a long pasted text often ends with the actual question; 0 keeps the head only).
        target_transform (`str`): `"log1p"` — mean and std are predicted as `log1p(tokens)`; lengths span 1–15,000
            tokens and errors are roughly multiplicative, so the log keeps long answers from dominating the loss.
        use_prompt_length (`bool`): feed `log1p(prompt tokens)` to the MLP (longer prompts, longer code answers).
        full_prompt_length (`bool`): count the prompt's tokens before truncation (passed as `prompt_length`), so the
            feature still tells a 300-token prompt from a 3,000-token one; `False` counts the tokens the encoder sees.
        bin_loss_weight, mean_loss_weight, std_loss_weight (`float`): weights of the three loss terms.
        reservation_quantile (`float`): quantile of one answer's length used as the memory-reservation bound.
        bound_offsets (`dict[str, list[float]]`, *optional*): per quantile (key `f"{q:g}"`), one offset per LLM
            added to `log1p` of the log-normal quantile so that the bound covers that share of held-out answers
            (split-conformal, fitted on the dev split by `lenpred calibrate`; train.py runs it). The log-normal of
            the answers' own spread alone ignores the predictor's error and covers far less than nominal.

    Example:

    ```python
    >>> from configuration_lenpred import LenPredConfig
    >>> from modeling_lenpred import LenPredModel

    >>> config = LenPredConfig(llm_names=["meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"])
    >>> model = LenPredModel(config)
    >>> config.bin_edges[:3], config.num_bins
    ([0, 500, 1000], 8)
    ```"""

    model_type = "lenpred"

    encoder_config: dict | None = None
    llm_names: list[str] | None = None
    default_llm: str | None = None
    llm_embedding_dim: int = 32
    end_dim: int = 256
    head_hidden_dim: int = 256
    dropout: float = 0.1
    bin_size: int = 500
    bin_max_tokens: int = 4000
    bin_edges: list[int] | None = None
    max_length: int = 256
    prompt_tail_tokens: int = 0
    target_transform: str = "log1p"
    use_prompt_length: bool = True
    full_prompt_length: bool = False
    bin_loss_weight: float = 1.0
    mean_loss_weight: float = 1.0
    std_loss_weight: float = 0.5
    reservation_quantile: float = 0.99
    bound_offsets: dict[str, list[float]] | None = None

    def __post_init__(self, **kwargs):
        if self.encoder_config is None:
            self.encoder_config = _minilm_shape()
        elif isinstance(self.encoder_config, PretrainedConfig):
            self.encoder_config = self.encoder_config.to_diff_dict()
        self.llm_names = list(self.llm_names or [])
        if len(set(self.llm_names)) != len(self.llm_names):
            raise ValueError(f"llm_names must be unique, got {self.llm_names}")
        if self.default_llm is None and self.llm_names:
            self.default_llm = self.llm_names[0]
        if self.default_llm is not None and self.default_llm not in self.llm_names:
            raise ValueError(f"default_llm {self.default_llm!r} is not one of llm_names {self.llm_names}")
        if self.bin_edges is None:
            self.bin_edges = make_bin_edges(self.bin_size, self.bin_max_tokens)
        self.bin_edges = [int(e) for e in self.bin_edges]
        if self.bin_edges[0] != 0 or any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:])):
            raise ValueError(f"bin_edges must start at 0 and increase, got {self.bin_edges}")
        if not 0 <= self.prompt_tail_tokens <= self.max_length - 2:
            raise ValueError(f"prompt_tail_tokens must be in [0, max_length - 2], got {self.prompt_tail_tokens}")
        _drop_retired_options(kwargs)
        if self.target_transform != "log1p":
            raise ValueError(f"target_transform must be 'log1p', got {self.target_transform!r}")
        if not 0.5 <= self.reservation_quantile < 1.0:
            raise ValueError(f"reservation_quantile must be in [0.5, 1), got {self.reservation_quantile}")
        for q, offsets in (self.bound_offsets or {}).items():
            if not 0.0 < float(q) < 1.0 or len(offsets) != len(self.llm_names):
                raise ValueError(f"bound_offsets[{q!r}] must be a quantile in (0, 1) with one offset per LLM "
                                 f"({len(self.llm_names)}), got {len(offsets)}")
        # The bins double as the labels of the stock text-classification pipeline.
        if kwargs.get("id2label") is None and self.id2label is None:
            self.id2label = dict(enumerate(bin_labels(self.bin_edges)))
            self.label2id = {v: k for k, v in self.id2label.items()}
        super().__post_init__(**kwargs)

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges)

    @property
    def num_llms(self) -> int:
        return len(self.llm_names)

    def bert_config(self) -> BertConfig:
        """The encoder's `BertConfig`."""
        return BertConfig(**{k: v for k, v in self.encoder_config.items() if k not in ("model_type", "architectures")})

    def resolve_llm(self, name: str) -> str:
        """The full id for `name`: an exact id, or a unique case-insensitive part of one (the paper's API says
        `"llama-3.2-3B"`). Unknown or ambiguous names are errors that list the known ids."""
        if not isinstance(name, str):
            raise TypeError(f"LLM name must be a string, got {type(name).__name__}")
        if name in self.llm_names:
            return name
        matches = [n for n in self.llm_names if name.strip() and name.lower() in n.lower()]
        if len(matches) == 1:
            return matches[0]
        what = "Ambiguous" if matches else "Unknown"
        raise ValueError(f"{what} LLM {name!r}. This model predicts for: {', '.join(matches or self.llm_names)}")

    def llm_index(self, llm: str) -> int:
        """Position of an LLM id in `llm_names`; an unknown id is an error that lists the known ones."""
        try:
            return self.llm_names.index(llm)
        except ValueError:
            raise ValueError(f"Unknown LLM {llm!r}. This model predicts for: {', '.join(self.llm_names)}") from None


#: Options that older exports' config.json may hold, with the only value this code implements (None: any value,
#: a training-only setting that changes nothing at prediction time). They were measured as no gain and removed.
RETIRED_OPTIONS = {"pooling": "mean", "prompt_length_slope": False, "rank_loss_weight": None}


def _drop_retired_options(kwargs: dict) -> None:
    """Remove retired keys from `kwargs`; a value this code cannot reproduce is an error, not a silent change."""
    for key, supported in RETIRED_OPTIONS.items():
        value = kwargs.pop(key, supported)
        if supported is not None and value != supported:
            raise ValueError(f"this model was trained with {key}={value!r}, which this version of LenPred no longer "
                             f"implements (only {key}={supported!r}); run it with the version that trained it (the "
                             "remote code its export folder shipped with), or retrain it")


def _minilm_shape() -> dict:
    """all-MiniLM-L6-v2's architecture, the default backbone."""
    return BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512,
    ).to_diff_dict()
