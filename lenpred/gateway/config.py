"""The gateway's settings: one dataclass that the CLI flags fill field by field (`--flag-name` -> `flag_name`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GatewayConfig"]


@dataclass
class GatewayConfig:
    upstream: str = "http://127.0.0.1:8000"   # the OpenAI-compatible server's base URL, no /v1
    host: str = "127.0.0.1"
    port: int = 8080                           # 0: any free port (tests, benchmarks)
    log_path: str | None = None                # JSONL request log; None: no log
    default_priority: int = 1000               # for unknown LLMs, prompts without text, prediction errors
    aging_rate: float = 10.0                   # tokens of priority per second of arrival time; 0: no aging
    chat_prompt: str = "last_user"             # or "all"
    batch_wait_ms: float = 0.0                 # 0: batch whatever queued up while the model was busy
    max_batch: int = 64
    upstream_timeout: float = 600.0            # seconds the upstream may stay silent: connecting, between reads
    fsync: bool = True
    flag_tokens: float = 10.0
    flag_fraction: float = 0.10
    flag_rule: str = "or"                      # or "and"
    predict: bool = True                       # False (--no-predict): default priority + aging for every request
    keep_client_priority: bool = False         # forward a client's own integer `priority` unchanged
    request_timeout: float = 0.0               # seconds for a whole request (body, answer); 0: no limit
    max_request_bytes: int = 16 * 1024 * 1024  # larger bodies get 413
    shutdown_timeout: float = 30.0             # seconds in-flight answers get to finish after SIGTERM
    max_upstream_connections: int = 0          # 0: no limit
    upstream_keepalive: float = 4.0            # seconds an idle upstream connection is kept (vLLM drops it at 5)
    access_log: bool = False                   # uvicorn's access log (one line per request)
    learn: bool = False                        # refit each LLM from its answers while serving (needs log_path)
    learn_every: int = 50                      # new answers of an LLM between two refits of it
    learn_interval: float = 30.0               # seconds at least between two refits of one LLM
    learn_min_answers: int = 50                # answers before an LLM's first refit (until then: as it was)
    learn_memory: int = 20000                  # newest answers (and prompt vectors) remembered per LLM
    learn_window: int = 500                    # newest answers per LLM the prequential scores cover
    learn_dir: str | None = None               # a loadable export after each refit (a symlink, switched atomically)
