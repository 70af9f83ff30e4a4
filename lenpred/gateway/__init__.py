"""An OpenAI-compatible gateway that sets each request's scheduling `priority` from LenPred's length prediction.

    client ──► gateway (predict length, set "priority") ──► vLLM `--scheduling-policy priority`
                                                           or SGLang `--enable-priority-scheduling
                                                           --schedule-low-priority-values-first`

An ASGI app (Starlette) under uvicorn, with an aiohttp client to the upstream, the stack of vLLM's own API server.
POST /v1/chat/completions and /v1/completions get a `priority` (lower runs first); every other path is proxied as
is; the gateway itself answers GET /health, GET /metrics (Prometheus) and GET /llms (what `--learn` learnt). SSE
streams are relayed as they arrive.

Priority (an int, lower = sooner), with `t` = seconds since the gateway started when the request arrived:

    priority = round(predicted_mean_tokens) + floor(aging_rate * t)        (known LLM)
    priority = default_priority             + floor(aging_rate * t)        (unknown LLM, no usable prompt, a
                                                                            prediction error, or --no-predict)
    priority = the client's own integer `priority`                         (--keep-client-priority, when given)

The upstream compares the priorities of requests waiting at the same moment `now`; subtracting the aging credit
`aging_rate * (now - arrival)` from every one of them gives the same order as the formula above (the common
`aging_rate * now` cancels), so fixed priorities sent once age correctly: a request predicted L tokens longer than
a newcomer is overtaken by newcomers for at most L / aging_rate seconds, hence none starves. `aging_rate` is in
tokens per second (0 disables aging: pure shortest-predicted-first). Unknown LLMs age at the same rate.

Prompt used for prediction: /v1/completions `prompt` (a string, or a list of one string); chat requests use the
*last user message* (text parts of a content list joined by newlines), which is what CASTILLO's single-turn prompts
look like; `chat_prompt="all"` concatenates every message's content instead. The same text is logged.

Log (`log_path`, JSONL, append-only; `load_rows` / `train.py --dataset` read it; `lenpred.gateway.logwriter` says
how lines stay whole): exactly one line per finished 200 answer that had a prompt text (a stream: once its last
event went out). Fields: timestamp (UTC ISO), endpoint, model (the LLM id the model resolved, else the name the client
sent), prompt_text, input_size (usage.prompt_tokens or null), output_sizes ([completion_tokens], or null when
n > 1), output_mean (completion_tokens / n), predicted_mean, predicted_std (null for unknown LLMs or
--no-predict), priority (the one sent upstream), latency_s, stream, usage_source ("usage", or "chunks" when a
stream had no usage chunk and the count of non-empty content deltas stands in for completion_tokens),
finish_reasons (one entry per choice, in index order: the upstream's finish_reason, "stop", "length", ..., taken
from the chunks for streams; null where the upstream gave none), max_tokens (the cap the client asked for:
max_completion_tokens, else max_tokens, else null; an answer with finish_reason "length" at this cap is a lower
bound on its length, not its length), flagged.
`flagged` follows Cheng et al. 2024's online-learning rule: |predicted - actual| > 10 tokens OR > 10 % of the
actual (the literal reading; `flag_rule="and"` for both; thresholds configurable); null when there was no
prediction. Answers that did not finish (the client left, the upstream failed or answered an error) are not logged.

`upstream` is the server's base URL (no `/v1`); the client's headers (e.g. Authorization) are forwarded.
Streams are forwarded with `stream_options.include_usage = true`; the usage-only final chunk is dropped from the
relay when the client had not asked for it. Failures and the status each gives: `lenpred.gateway.proxy`;
shutdown: `lenpred.gateway.server`; docs/serving.md has both for operators.
"""

from lenpred.gateway.config import GatewayConfig
from lenpred.gateway.logwriter import LogPathError
from lenpred.gateway.policy import compute_priority, is_flagged

__all__ = ["GatewayConfig", "Gateway", "build_app", "compute_priority", "is_flagged", "LogPathError"]


def __getattr__(name: str):
    """`Gateway` and `build_app` load the serving stack (the `serve` extra) on first use, so `lenpred --help` and
    the policy functions work without it."""
    if name in ("Gateway", "build_app"):
        from lenpred.gateway import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
