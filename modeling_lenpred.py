"""LenPred model: a BERT prompt encoder, an LLM-id embedding and the paper's MLP module with a bin head and a
mean/std head. One encoder pass serves every LLM the model knows.

This file is remote code: it is copied into every exported Hub folder and imports nothing from the
project's `lenpred` package — only transformers, torch and its siblings `configuration_lenpred` and
`prediction_lenpred` (the prediction path all backends share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertEmbeddings
from transformers.utils import ModelOutput

try:
    from .configuration_lenpred import LenPredConfig
    from .prediction_lenpred import LenPredPrediction, predict_in_batches, reservation_bound, run_in_batches
except ImportError:  # loaded as a plain module from the repository root
    from configuration_lenpred import LenPredConfig
    from prediction_lenpred import LenPredPrediction, predict_in_batches, reservation_bound, run_in_batches

__all__ = ["LenPredModel", "LenPredForSequenceClassification", "LenPredPreTrainedModel", "LenPredOutput"]


@dataclass
class LenPredOutput(ModelOutput):
    r"""
    Output of [`LenPredModel`]. Prediction fields have shape `(batch,)` / `(batch, num_bins)` when `llm_ids` had
    shape `(batch,)`, and `(batch, n_llms)` / `(batch, n_llms, num_bins)` when it had shape `(batch, n_llms)`.

    loss (`torch.FloatTensor` of shape `()`, returned when labels are given):
        Weighted sum of the bin cross-entropy and the L1 losses of log1p(mean) and log1p(std).
    bin_logits: logits over the length bins of `config.bin_edges`.
    mean: predicted mean answer length, in tokens.
    std: predicted standard deviation of the answer length across samples, in tokens (positive).
    log_mean, log_std: the same in the model's target space, `log1p(tokens)`.
    """

    loss: torch.FloatTensor | None = None
    bin_logits: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    std: torch.FloatTensor | None = None
    log_mean: torch.FloatTensor | None = None
    log_std: torch.FloatTensor | None = None


#: The length feature is log1p(prompt tokens) / this, about 1 for a 512-token prompt.
LENGTH_FEATURE_SCALE = math.log(512.0)


class LenPredPreTrainedModel(PreTrainedModel):
    config_class = LenPredConfig
    config: LenPredConfig
    base_model_prefix = "lenpred"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module):
        """BERT's init (std 0.02) inside the encoder, which warm-start weights usually overwrite. The narrow MLP
        stacks four linear layers with no normalisation between them: at std 0.02 its output would be constant and
        its gradients vanish, so those layers keep PyTorch's fan-in scaled init and the LLM table a unit normal."""
        if getattr(module, "_lenpred_head", False):
            if isinstance(module, nn.Embedding):
                init.normal_(module.weight, mean=0.0, std=1.0)
            else:
                bound = 1.0 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.weight, -bound, bound)
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


class LenPredModel(LenPredPreTrainedModel):
    """Prompt → BERT → masked mean pooling → linear reduction to `end_dim`, joined with the LLM embedding (and
    log prompt length) → the paper's MLP module → bin head and mean/std head."""

    def __init__(self, config: LenPredConfig):
        super().__init__(config)
        bert_config = config.bert_config()
        self.encoder = BertModel(bert_config, add_pooling_layer=False)
        self.reduce = nn.Linear(bert_config.hidden_size, config.end_dim)
        self.llm_embedding = nn.Embedding(max(config.num_llms, 1), config.llm_embedding_dim)
        in_dim = config.end_dim + config.llm_embedding_dim + int(config.use_prompt_length)
        # The paper's module: two linear layers, ReLU after the first, two dropout layers, then the heads.
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, config.head_hidden_dim), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.head_hidden_dim, config.head_hidden_dim), nn.Dropout(config.dropout),
        )
        self.bin_head = nn.Linear(config.head_hidden_dim, config.num_bins)
        self.length_head = nn.Linear(config.head_hidden_dim, 2)  # log1p(mean), log1p(std)
        for layer in (self.reduce, self.llm_embedding, self.mlp[0], self.mlp[3], self.bin_head, self.length_head):
            layer._lenpred_head = True
        self.post_init()

    @classmethod
    def from_encoder(cls, encoder: str, num_layers: int | None = None, attention_dropout: float | None = None,
                     **config_kwargs) -> "LenPredModel":
        """Warm-start the encoder from any BERT-family checkpoint (path or Hub id); the heads start fresh.

        `num_layers` keeps only the encoder's first layers: half the layers, about half the latency.
        `attention_dropout` replaces the checkpoint's dropout on attention probabilities (training only).
        """
        overrides = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
        bert = BertModel.from_pretrained(encoder, add_pooling_layer=False, **overrides)
        if num_layers is not None:
            if not 1 <= num_layers <= bert.config.num_hidden_layers:
                raise ValueError(f"num_layers must be between 1 and {bert.config.num_hidden_layers}, got {num_layers}")
            bert.encoder.layer = bert.encoder.layer[:num_layers]
            bert.config.num_hidden_layers = num_layers
        model = cls(LenPredConfig(encoder_config=bert.config.to_diff_dict(), **config_kwargs))
        model.encoder.load_state_dict(bert.state_dict())
        return model

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask=None, token_type_ids=None, prompt_length=None) -> torch.Tensor:
        """One encoder pass: the prompt vector (batch, end_dim [+1]) that every LLM's prediction starts from.

        `prompt_length` (batch,): the prompts' lengths before truncation (see `tokenize_prompts`); used when
        `config.full_prompt_length`, else, or when not given, the length feature counts the tokens the encoder sees.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        vector = self.reduce(pooled)
        if self.config.use_prompt_length:
            n_tokens = (prompt_length if prompt_length is not None and self.config.full_prompt_length
                        else attention_mask.sum(-1)).reshape(-1, 1).to(vector.dtype)
            vector = torch.cat([vector, torch.log1p(n_tokens) / LENGTH_FEATURE_SCALE], dim=-1)
        return vector

    def heads(self, prompt_vector: torch.Tensor, llm_ids: torch.Tensor, llm_table: torch.Tensor | None = None):
        """Predictions for `llm_ids` of shape (batch, n_llms) from prompt vectors (batch, d): no encoder work.
        `llm_table` stands in for the LLM embedding's weight (adapting one LLM's row learns through it)."""
        n = llm_ids.shape[1]
        table = self.llm_embedding.weight if llm_table is None else llm_table
        joined = torch.cat([prompt_vector.unsqueeze(1).expand(-1, n, -1), F.embedding(llm_ids, table)], dim=-1)
        hidden = self.mlp(joined)
        raw = self.length_head(hidden)
        # softplus keeps log1p(tokens) positive, so the std is positive and the mean at least zero.
        log_mean, log_std = F.softplus(raw[..., 0]), F.softplus(raw[..., 1])
        return self.bin_head(hidden), log_mean, log_std

    def _llm_ids(self, llm_ids, batch_size: int, device) -> tuple[torch.Tensor, bool]:
        if llm_ids is None:  # every LLM the model knows
            return torch.arange(self.config.num_llms, device=device).expand(batch_size, -1), False
        llm_ids = torch.as_tensor(llm_ids, device=device, dtype=torch.long)
        if llm_ids.dim() == 1:
            return llm_ids.unsqueeze(1), True
        if llm_ids.dim() != 2:
            raise ValueError(f"llm_ids must have shape (batch,) or (batch, n_llms), got {tuple(llm_ids.shape)}")
        return llm_ids, False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        llm_ids: torch.Tensor | None = None,
        labels_mean: torch.Tensor | None = None,
        labels_std: torch.Tensor | None = None,
        prompt_length: torch.Tensor | None = None,
        label_weight: torch.Tensor | None = None,
        labels_mean_floor: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LenPredOutput:
        r"""
        llm_ids (`torch.LongTensor` of shape `(batch,)` or `(batch, n_llms)`, *optional*):
            Indices into `config.llm_names`; `None` predicts for every LLM. The prompt is encoded once either way.
        labels_mean, labels_std (`torch.FloatTensor`, same shape as `llm_ids`, *optional*):
            Mean and std of the answer length in tokens; NaN marks a missing label (an LLM that did not answer the
            prompt, or a single observed length that has no std), which the loss ignores.
        prompt_length (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Each prompt's length in encoder tokens before truncation, from `tokenize_prompts`.
        label_weight (`torch.FloatTensor` of shape `(batch,)` or `(batch, n_llms)`, *optional*):
            Training only: how much each prompt's labels (or each ⟨prompt, LLM⟩ label) count in the loss, e.g. to
            favour the LLMs that matter most.
        labels_mean_floor (`torch.FloatTensor`, same shape as `llm_ids`, *optional*):
            A lower bound of the mean answer length where an answer was cut short by its `max_tokens` (NaN
            elsewhere; `labels_mean` is NaN there): the loss only pushes predictions below the bound up.
        """
        ids, squeeze = self._llm_ids(llm_ids, input_ids.shape[0], input_ids.device)
        vector = self.encode(input_ids, attention_mask, token_type_ids, prompt_length)
        bin_logits, log_mean, log_std = self.heads(vector, ids)
        loss = None
        if labels_mean is not None or labels_std is not None:
            loss = self.loss(bin_logits, log_mean, log_std, labels_mean, labels_std, ids.shape, label_weight,
                             labels_mean_floor)
        if squeeze:
            bin_logits, log_mean, log_std = bin_logits[:, 0], log_mean[:, 0], log_std[:, 0]
        return LenPredOutput(loss=loss, bin_logits=bin_logits, mean=torch.expm1(log_mean), std=torch.expm1(log_std),
                             log_mean=log_mean, log_std=log_std)

    def loss(self, bin_logits, log_mean, log_std, labels_mean, labels_std, shape,
             label_weight=None, labels_mean_floor=None) -> torch.Tensor:
        """Cross-entropy over bins + L1 on log1p(mean) and log1p(std), each averaged over present labels (weighted
        by `label_weight` when given).

        L1 in log space estimates the conditional median, which is what minimises the MAE the paper reports (the
        median is unchanged by the log); squared or smooth-L1 losses estimate the mean of the log, which lengths'
        left-skewed log distribution drags far below the median. No likelihood head: its σ would mix the
        predictor's own error with the answers' spread; here the std head is supervised by the answers' own spread.

        A capped answer (`labels_mean_floor`) is censored: its length is at least the floor, so the L1 term becomes
        `relu(log1p(floor) - log_mean)` and the bin term the probability of the floor's bin or any above it.
        """
        c = self.config
        weight = None
        if label_weight is not None:  # per prompt (batch,) or per label (batch, n_llms)
            weight = label_weight.to(log_mean.dtype)
            weight = (weight.reshape(-1, 1) if weight.dim() == 1 else weight).expand(shape)

        def average(values, *masks):  # plain or weighted mean over the labels the masks select, in their order
            if weight is None:
                return values.mean()
            w = torch.cat([weight[m] for m in masks])
            return (values * w).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)

        total = bin_logits.sum() * 0.0  # keeps the graph when a batch has no labels at all
        terms = []  # (bin term, L1 term, mask) of the known means, then of the censored ones
        if labels_mean is not None:
            target = labels_mean.to(log_mean.dtype).reshape(shape)
            present = ~torch.isnan(target)
            if present.any():
                tokens = target[present]
                edges = torch.tensor(c.bin_edges[1:], device=tokens.device, dtype=tokens.dtype)
                bins = torch.bucketize(tokens, edges, right=True)
                terms.append((F.cross_entropy(bin_logits[present], bins, reduction="none"),
                              F.l1_loss(log_mean[present], torch.log1p(tokens), reduction="none"), present))
        if labels_mean_floor is not None:
            floor = labels_mean_floor.to(log_mean.dtype).reshape(shape)
            censored = ~torch.isnan(floor)
            if censored.any():
                edges = torch.tensor(c.bin_edges[1:], device=floor.device, dtype=floor.dtype)
                lowest = torch.bucketize(floor[censored], edges, right=True)  # the floor's bin: any bin from it up
                logits = bin_logits[censored]
                above = torch.arange(logits.shape[-1], device=logits.device) >= lowest.unsqueeze(-1)
                tail = logits.masked_fill(~above, torch.finfo(logits.dtype).min).logsumexp(-1)
                terms.append((logits.logsumexp(-1) - tail,
                              F.relu(torch.log1p(floor[censored]) - log_mean[censored]), censored))
        if terms:
            masks = [m for _, _, m in terms]
            total = total + c.bin_loss_weight * average(torch.cat([t[0] for t in terms]), *masks)
            total = total + c.mean_loss_weight * average(torch.cat([t[1] for t in terms]), *masks)
        if labels_std is not None:
            target = labels_std.to(log_std.dtype).reshape(shape)
            present = ~torch.isnan(target)
            if present.any():
                total = total + c.std_loss_weight * average(
                    F.l1_loss(log_std[present], torch.log1p(target[present]), reduction="none"), present)
        return total

    # -- the one fast prediction path ---------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        prompts: str | Sequence[str],
        tokenizer,
        llms: str | Sequence[str] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
        quantile: float | None = None,
    ) -> LenPredPrediction:
        """Predict for every prompt and every requested LLM: no autograd, batches sorted by length with dynamic
        padding, one encoder pass per prompt. Prompts longer than `max_length` (default `config.max_length`)
        encoder tokens are truncated to it (see `tokenize_prompts`). `quantile`: the bound's (default
        `config.reservation_quantile`)."""
        device = self.device
        was_training = self.training
        self.eval()

        def run_batch(input_ids, attention_mask, prompt_length, llm_ids):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                vector = self.encode(input_ids.to(device), attention_mask.to(device),
                                     prompt_length=prompt_length.to(device))
                ids = torch.tensor(llm_ids, device=device).expand(len(input_ids), -1)
                logits, log_mean, log_std = self.heads(vector, ids)
            return (logits.float().softmax(-1).cpu(), torch.expm1(log_mean.float()).cpu(),
                    torch.expm1(log_std.float()).cpu())

        try:
            return predict_in_batches(self.config, tokenizer, prompts, llms, run_batch, batch_size, max_length,
                                      progress, quantile=quantile)
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def encode_prompts(self, prompts: str | Sequence[str], tokenizer, batch_size: int = 64,
                       progress: bool = False) -> torch.Tensor:
        """The prompt vectors (n, d) on the CPU, through `predict`'s batching. With the encoder frozen they are all
        that per-LLM learning needs, and `predict_vectors` turns them into predictions without the encoder."""
        was_training = self.training
        self.eval()
        try:
            def run_batch(input_ids, attention_mask, prompt_length):
                return (self.encode(input_ids.to(self.device), attention_mask.to(self.device),
                                    prompt_length=prompt_length.to(self.device)).float().cpu(),)

            return run_in_batches(self.config, tokenizer, prompts, run_batch, batch_size, progress=progress,
                                  desc="encoding prompts")[0]
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def predict_vectors(self, vectors: torch.Tensor, llms: str | Sequence[str] | None = None,
                        quantile: float | None = None) -> LenPredPrediction:
        """`predict`'s output from prompt vectors (`encode_prompts`), for every LLM in `llms` (None: all)."""
        names = self.config.llm_names if llms is None else ([llms] if isinstance(llms, str) else list(llms))
        ids = [self.config.llm_index(self.config.resolve_llm(n)) for n in names]
        vectors = torch.as_tensor(vectors).to(self.device)
        logits, log_mean, log_std = self.heads(vectors, torch.tensor(ids, device=self.device).expand(len(vectors), -1))
        mean, std = torch.expm1(log_mean.float()).cpu(), torch.expm1(log_std.float()).cpu()
        q = self.config.reservation_quantile if quantile is None else quantile
        bound, calibrated = reservation_bound(self.config, mean, std, ids, q)
        return LenPredPrediction([self.config.llm_names[i] for i in ids], mean, std, bound,
                                 logits.float().softmax(-1).cpu(), list(self.config.bin_edges), q, calibrated)


class LenPredForSequenceClassification(LenPredModel):
    """The bin head for `config.default_llm` as a plain classifier, so the stock `text-classification` pipeline
    returns bin labels (`config.id2label` holds the token ranges). Same weights as [`LenPredModel`]."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, llm_ids=None,
                return_dict=None, **kwargs) -> SequenceClassifierOutput:
        if llm_ids is None:
            llm_ids = torch.full((input_ids.shape[0],), self.config.llm_index(self.config.default_llm),
                                 device=input_ids.device, dtype=torch.long)
        out = super().forward(input_ids, attention_mask, token_type_ids, llm_ids=llm_ids)
        loss = F.cross_entropy(out.bin_logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=out.bin_logits)
