"""What the gateway decides about one request, as pure functions: its priority, the prompt it predicts from, the cap
on the answer, and whether a finished answer is flagged. No I/O here, so the rules are tested without a server."""

from __future__ import annotations

import math

__all__ = ["compute_priority", "is_flagged", "prompt_of", "max_tokens_of", "client_priority"]


def compute_priority(predicted_mean: float | None, seconds_since_start: float, default_priority: int,
                     aging_rate: float) -> int:
    """The package docstring's formula: the predicted mean (or the default) plus the aging credit."""
    base = default_priority if predicted_mean is None else int(round(predicted_mean))
    return int(base + math.floor(aging_rate * max(seconds_since_start, 0.0)))


def is_flagged(predicted: float | None, actual: float, tokens: float = 10.0, fraction: float = 0.10,
               rule: str = "or") -> bool | None:
    """Cheng et al. 2024's online-learning rule ("error exceeded 10 tokens or 10 %"): error > `tokens` OR error >
    `fraction` * actual, i.e. error > min(tokens, fraction * actual). `rule="and"` flags only errors above both
    (error > max(...)), the stricter reading. None when there was no prediction."""
    if predicted is None:
        return None
    err = abs(predicted - actual)
    big, rel = err > tokens, err > fraction * actual
    return bool(big or rel) if rule == "or" else bool(big and rel)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_of(path: str, body: dict, chat_prompt: str = "last_user") -> str | None:
    """The text to predict from: /v1/completions `prompt` (a string, or a list of one string); for chat the last
    user message (CASTILLO's prompts are single-turn), or every message joined with `chat_prompt="all"`. None when
    there is no usable text (the request then gets the default priority)."""
    if path.endswith("/chat/completions"):
        msgs = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        if chat_prompt == "all":
            text = "\n".join(t for m in msgs if (t := _text(m.get("content"))))
        else:
            text = next((_text(m.get("content")) for m in reversed(msgs) if m.get("role") == "user"), "")
    else:
        p = body.get("prompt")
        text = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str) else p
    return text if isinstance(text, str) and text.strip() else None


def _positive_int(x) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def max_tokens_of(body: dict) -> int | None:
    """The cap the client put on the answer: `max_tokens`, or `max_completion_tokens` (OpenAI's newer name); when
    both are there, `max_completion_tokens`, the one vLLM and OpenAI apply. An answer that stopped for "length" at
    this cap is a lower bound on the length the LLM wanted, not that length."""
    return _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))


def client_priority(body: dict) -> int | None:
    """The client's own integer `priority`, if its body has one (a bool is not a priority)."""
    p = body.get("priority")
    return p if isinstance(p, int) and not isinstance(p, bool) else None
