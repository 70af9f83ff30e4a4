"""The replay client: send a trace of chat requests on schedule, stream each answer, time it, check nothing is lost.

Why streaming: completion time alone hides where the time goes; the first content chunk gives time to first token
(the queueing an ordering policy moves around), the last one the end of decoding. Every request is sent exactly
once (no retries: a retry would hide a lost answer), and :func:`exactly_once` then checks that each got exactly
one complete answer and, where a gateway log exists, exactly one log line.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pandas as pd

__all__ = ["RECORD_FIELDS", "replay_trace", "run_trace", "exactly_once", "parse_sse_line"]

RECORD_FIELDS = ("req", "prompt_id", "submit_s", "sent_s", "first_s", "last_s", "done_s", "tokens", "prompt_tokens",
                 "chunks", "finish_reason", "response_id", "status", "error", "priority")


def parse_sse_line(line: str) -> dict | None:
    """The JSON object of one server-sent-events ``data:`` line; None for anything else (comments, [DONE])."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


async def _one(client, url: str, body: dict, rec: dict, t0: float) -> dict:
    """Send one streaming request and fill ``rec`` with its times (seconds since ``t0``) and counts."""
    rec["sent_s"] = time.perf_counter() - t0
    try:
        async with client.stream("POST", url, json=body) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                rec["error"] = (await resp.aread()).decode("utf-8", "replace")[:500]
                return rec
            async for line in resp.aiter_lines():
                obj = parse_sse_line(line)
                if obj is None:
                    continue
                now = time.perf_counter() - t0
                rec["response_id"] = rec["response_id"] or obj.get("id")
                for ch in obj.get("choices") or []:
                    if (ch.get("delta") or {}).get("content") or ch.get("text"):
                        rec["chunks"] += 1
                        rec["first_s"] = now if rec["first_s"] is None else rec["first_s"]
                        rec["last_s"] = now
                    if ch.get("finish_reason"):
                        rec["finish_reason"] = ch["finish_reason"]
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    rec["tokens"] = usage.get("completion_tokens")
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, never retried
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["done_s"] = time.perf_counter() - t0
    return rec


async def replay_trace(base_url: str, model: str, trace: pd.DataFrame, max_tokens: int, temperature: float = 0.0,
                       seed: int = 0, timeout_s: float = 3600.0, transport=None) -> pd.DataFrame:
    """Send ``trace`` (rows with prompt_id, prompt_text, submit_s, priority) to ``base_url``/v1/chat/completions,
    each at its ``submit_s`` after the start; return one record per request (``RECORD_FIELDS``, seconds since the
    run's start). ``transport`` replaces the network in tests (an ``httpx.MockTransport``)."""
    import httpx

    url = base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits,
                                 transport=transport) as client:
        t0 = time.perf_counter()
        tasks = []
        for i, row in enumerate(trace.itertuples(index=False)):
            body = {"model": model, "messages": [{"role": "user", "content": row.prompt_text}],
                    "max_tokens": int(max_tokens), "temperature": temperature, "seed": int(seed), "stream": True,
                    "stream_options": {"include_usage": True}}
            pri = getattr(row, "priority", None)
            if pri is not None and not pd.isna(pri):
                body["priority"] = int(pri)
            rec = dict.fromkeys(RECORD_FIELDS)
            rec.update(req=i, prompt_id=row.prompt_id, submit_s=float(row.submit_s), chunks=0,
                       priority=body.get("priority"))
            delay = row.submit_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, body, rec, t0)))
        out = await asyncio.gather(*tasks)
    return pd.DataFrame(out, columns=list(RECORD_FIELDS))


def run_trace(*args, **kwargs) -> pd.DataFrame:
    """:func:`replay_trace` from synchronous code."""
    return asyncio.run(replay_trace(*args, **kwargs))


def _texts(trace: pd.DataFrame) -> Counter:
    return Counter(trace["prompt_text"])


def exactly_once(trace: pd.DataFrame, records: pd.DataFrame, log_rows: list[dict] | None) -> dict:
    """Check that each request of ``trace`` was answered exactly once (one record, HTTP 200, a finish reason, a
    token count, a response id no other request got) and, with ``log_rows`` (the gateway's log lines written during
    this run), logged exactly once (the same multiset of prompt texts). Returns counts and ``ok``."""
    n = len(trace)
    answered = records[(records["status"] == 200) & records["error"].isna() & records["finish_reason"].notna()
                       & records["tokens"].notna()]
    ids = Counter(records["response_id"].dropna())
    out = {"requests": n, "records": len(records), "answered": int(len(answered)),
           "duplicate_records": int(records["req"].duplicated().sum()),
           "duplicate_response_ids": int(sum(c - 1 for c in ids.values() if c > 1)),
           "errors": int((records["error"].notna() | (records["status"] != 200)).sum())}
    out["answered_once"] = (out["answered"] == n == out["records"] and not out["duplicate_records"]
                            and not out["duplicate_response_ids"] and set(records["req"]) == set(range(n)))
    if log_rows is None:
        out["logged"], out["logged_once"] = None, None
    else:
        logged = Counter(r.get("prompt_text") for r in log_rows)
        want = _texts(trace)
        out["logged"] = len(log_rows)
        out["log_missing"] = int(sum((want - logged).values()))
        out["log_extra"] = int(sum((logged - want).values()))
        out["logged_once"] = out["log_missing"] == 0 and out["log_extra"] == 0
    out["ok"] = bool(out["answered_once"] and out["logged_once"] is not False)
    return out
