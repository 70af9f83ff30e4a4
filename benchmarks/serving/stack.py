"""Start and stop the serving stack — vLLM and the LenPred gateway — as context managers.

Why a module: a benchmark that leaves a server running, or reads results from a server that never became healthy,
measures nothing. Each server runs in its own process group with its output in a log file; ``__enter__`` waits
until it answers (and fails with the log's tail if the process dies first); ``__exit__`` sends SIGTERM to the group,
then SIGKILL after a grace period, so no child (vLLM's engine core) is left behind.

    with VLLMServer(VLLMSpec(model_dir=...), log="vllm.log") as vllm, \\
         GatewayServer(GatewaySpec(export=..., upstream=vllm.url), log="gw.log") as gw:
        ...  # send requests to gw.url
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import httpx

__all__ = ["REPO", "SERVED_NAME", "repo_path", "VLLMSpec", "GatewaySpec", "VLLMServer", "GatewayServer", "free_port",
           "gateway_flags", "read_metric", "kv_cache_tokens"]

REPO = Path(__file__).resolve().parents[2]
#: The name vLLM serves SmolLM2 under: its real Hub id, so the gateway log (grouped by `model` in train.py) names it.
SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def repo_path(path: str | Path) -> str:
    """`path` (from the current folder) as seen from the repository root, where the servers run: relative when it
    lies in the repository or beside it (../shared/...), so reports name no machine's folders; else absolute."""
    rel = os.path.relpath(Path(path).absolute(), REPO)
    return str(Path(path).absolute()) if rel.startswith(os.pardir + os.sep + os.pardir) else rel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMSpec:
    """How to start vLLM's OpenAI server. The defaults are the checked CPU recipe (../shared/ENVIRONMENT.md)."""

    model_dir: str
    served_name: str = SERVED_NAME
    python: str = str(REPO / ".venv-vllm" / "bin" / "python")
    max_num_seqs: int = 4
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    kv_cache_gib: int = 2               # VLLM_CPU_KVCACHE_SPACE, an integer (ignored by GPU builds)
    extra_args: list[str] = field(default_factory=list)
    port: int | None = None

    def command(self, port: int) -> list[str]:
        # Prefix caching off: the replay sends the same prompts in every run, and cached prefills would make
        # later runs (and so later policies) faster than earlier ones.
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--served-model-name", self.served_name, "--scheduling-policy", "priority",
                "--max-num-seqs", str(self.max_num_seqs), "--max-model-len", str(self.max_model_len),
                "--dtype", self.dtype, "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port),
                *self.extra_args]


@dataclass
class GatewaySpec:
    """How to start `python -m lenpred.cli gateway` (the project's venv, the worktree's code on PYTHONPATH)."""

    export: str
    upstream: str
    log_path: str | None = None
    python: str = sys.executable
    keep_client_priority: bool = False
    no_predict: bool = False
    aging_rate: float = 0.0
    default_priority: int = 1000
    backend: str = "torch"
    port: int | None = None
    threads: int | None = 1       # OMP_NUM_THREADS: on a small CPU box the predictor must not crowd vLLM's core
    cpus: tuple[int, ...] | None = None  # pin the gateway to these CPUs (e.g. the one vLLM's CPU build reserves)
    extra_args: tuple[str, ...] = ()  # more `lenpred gateway` flags (e.g. --learn ...)

    def command(self, port: int) -> list[str]:
        cmd = [self.python, "-m", "lenpred.cli", "gateway", "--model", self.export, "--upstream", self.upstream,
               "--host", "127.0.0.1", "--port", str(port), "--aging-rate", str(self.aging_rate),
               "--default-priority", str(self.default_priority), "--backend", self.backend]
        if self.log_path:
            cmd += ["--log", self.log_path]
        for flag, on in (("--keep-client-priority", self.keep_client_priority), ("--no-predict", self.no_predict)):
            if on:
                if flag not in gateway_flags(self.python):
                    raise RuntimeError(f"this gateway has no {flag} (the ASGI gateway adds it)")
                cmd.append(flag)
        return cmd + list(self.extra_args)


@lru_cache(maxsize=None)
def gateway_flags(python: str = sys.executable) -> frozenset:
    """The long options `lenpred gateway --help` lists, so the replay knows what the installed gateway can do."""
    out = subprocess.run([python, "-m", "lenpred.cli", "gateway", "--help"], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=120).stdout
    return frozenset(re.findall(r"--[a-z][a-z0-9-]+", out))


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


class _Process:
    """A server in its own process group, logging to a file; healthy once ``health_path`` answers 200."""

    health_path = "/health"
    startup_timeout = 900.0

    def __init__(self, command: list[str], log: str | Path, env: dict | None = None, port: int | None = None,
                 cpus: tuple[int, ...] | None = None):
        self.port = port or free_port()
        self.command, self.log, self.env, self.cpus = command, Path(log), env, cpus
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log, "ab") as f:
            f.write(("$ " + " ".join(self.command) + "\n").encode())
            f.flush()
            self.proc = subprocess.Popen(self.command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=REPO, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[:4]} exited with {self.proc.returncode}; log {self.log}:\n"
                                   f"{self.tail()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=5).status_code == 200:
                    self.ready_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"{self.url} not healthy after {self.startup_timeout:.0f} s; log {self.log}")

    def __exit__(self, *exc):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass


class VLLMServer(_Process):
    def __init__(self, spec: VLLMSpec, log: str | Path):
        port = spec.port or free_port()
        env = _env({"VLLM_CPU_KVCACHE_SPACE": str(int(spec.kv_cache_gib))})
        super().__init__(spec.command(port), log, env, port)
        self.spec = spec


class GatewayServer(_Process):
    """The gateway proxies paths it does not handle, so /v1/models answers only when both it and vLLM are up."""

    health_path = "/v1/models"
    startup_timeout = 300.0

    def __init__(self, spec: GatewaySpec, log: str | Path):
        port = spec.port or free_port()
        env = _env({"OMP_NUM_THREADS": str(spec.threads)} if spec.threads else None)
        super().__init__(spec.command(port), log, env, port, spec.cpus)
        self.spec = spec


def read_metric(base_url: str, name: str) -> float | None:
    """Sum of a Prometheus counter's samples at ``base_url``/metrics (e.g. vllm:num_preemptions_total); None when
    the server does not report it."""
    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+([0-9.eE+-]+)\s*$",
                                                    text, re.M)]
    return sum(vals) if vals else None


def kv_cache_tokens(log_text: str) -> int | None:
    """The KV-cache size vLLM reports at start-up ("GPU KV cache size: 93,184 tokens"), for the simulator."""
    m = re.findall(r"KV cache size:\s*([0-9,]+)\s*tokens", log_text)
    return int(m[-1].replace(",", "")) if m else None
