"""The `lenpred` command: `lenpred gateway`, `lenpred simulate`, `lenpred export` (each with `--help`).

    lenpred gateway --model EXPORT_DIR --upstream http://127.0.0.1:8000 --port 8080 --log requests.jsonl
    lenpred simulate REQUESTS.parquet --out scheduling_out        (= lenpred.scheduling.main)
    lenpred export EXPORT_DIR --out NEW_DIR [--push REPO_ID]       (= lenpred.hub.main)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

# `simulate` and `export` keep their own parsers: everything after the subcommand goes to them as is.
DELEGATES = {
    "simulate": ("lenpred.scheduling", "replay requests through the scheduling simulator (lenpred.scheduling)"),
    "calibrate": ("lenpred.calibration", "refit an export's reservation bound on held-out answers (lenpred.calibration)"),
    "export": ("lenpred.hub", "re-export a model folder with remote code, or push it to the Hub (lenpred.hub)"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _ensure_repo_on_path() -> None:
    """The remote-code modules (configuration_lenpred, ...) live at the repository root, beside `lenpred/`."""
    root = Path(__file__).resolve().parents[1]
    if (root / "modeling_lenpred.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def add_gateway_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`lenpred gateway`'s flags, grouped as `vllm serve --help` groups its own."""
    from lenpred.gateway.config import GatewayConfig
    from lenpred.inference import CPU_OPTIONS

    d = GatewayConfig()
    g = ap.add_argument_group("model", "the length predictor")
    g.add_argument("--model", help="LenPred export folder (lenpred.hub.export_model output); required unless "
                                   "--no-predict")
    g.add_argument("--backend", choices=("auto", "torch", *CPU_OPTIONS), default="auto",
                   help="predictor: auto (default) = the CPU serving path of docs/speed.md when onnxruntime is "
                        "installed (pip install 'lenpred[fast]') and the model runs on the CPU without --learn, else "
                        "torch; torch = the fp32 torch fast path; or a lenpred.fast CPU option (benchmarks/latency.py "
                        "reports their speed and quality against fp32)")
    g.add_argument("--fast-dir", help="folder for the --backend files (ONNX; reused when there; default "
                                      "<model>/fast)")
    g.add_argument("--device", help="torch device for the model (default: CPU)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="wait this long to grow a prediction batch (0: batch only what queued meanwhile)")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="prompts per prediction batch")
    g.add_argument("--no-predict", dest="predict", action="store_false",
                   help="switch prediction off: every request gets --default-priority with aging (a baseline, and "
                        "the gateway's own cost)")

    g = ap.add_argument_group("priority", "the `priority` sent upstream (lower runs first)")
    g.add_argument("--default-priority", type=int, default=d.default_priority,
                   help="priority for LLMs the model does not know, prompts without text (before aging)")
    g.add_argument("--aging-rate", type=float, default=d.aging_rate,
                   help="priority (tokens) added per second of arrival time; 0 = no aging")
    g.add_argument("--chat-prompt", choices=("last_user", "all"), default=d.chat_prompt,
                   help="chat text to predict from: the last user message, or all messages joined")
    g.add_argument("--keep-client-priority", action="store_true",
                   help="forward a client's own integer `priority` unchanged (still predicted and logged)")

    g = ap.add_argument_group("upstream", "the OpenAI-compatible server (vLLM, SGLang)")
    g.add_argument("--upstream", default=d.upstream, help="base URL, no /v1")
    g.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout,
                   help="seconds the upstream may stay silent (connecting, or between two reads): then 504, or an "
                        "error event mid-stream")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds for a whole request, body and answer (0: no limit)")
    g.add_argument("--max-upstream-connections", type=int, default=d.max_upstream_connections,
                   help="open connections to the upstream at most (0: no limit)")
    g.add_argument("--upstream-keepalive", type=float, default=d.upstream_keepalive,
                   help="seconds an idle upstream connection is kept for reuse; keep it below the upstream's own "
                        "keep-alive timeout (vLLM, uvicorn: 5 s)")

    g = ap.add_argument_group("server", "the gateway's own HTTP server (uvicorn)")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port, help="0: any free port (logged)")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="larger request bodies get 413")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="on SIGTERM, seconds in-flight answers get to finish before their streams are ended")
    g.add_argument("--access-log", action="store_true", help="one uvicorn access-log line per request")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")

    g = ap.add_argument_group("request log", "JSONL training data: one line per finished answer")
    g.add_argument("--log", dest="log_path", help="append one JSONL line per finished request (train.py --dataset)")
    g.add_argument("--no-fsync", dest="fsync", action="store_false", help="do not fsync the log after each write")
    g.add_argument("--flag-tokens", type=float, default=d.flag_tokens, help="flag |error| above this many tokens")
    g.add_argument("--flag-fraction", type=float, default=d.flag_fraction, help="... or above this share of actual")
    g.add_argument("--flag-rule", choices=("or", "and"), default=d.flag_rule,
                   help="flag when either threshold is exceeded (Cheng et al. as worded) or only when both are")

    g = ap.add_argument_group("online learning", "refit each LLM from its own answers while serving (needs --log)")
    g.add_argument("--learn", action="store_true",
                   help="learn every LLM in the traffic, new to the model or known, from its logged answers: a "
                        "background worker (a process when --model is an export folder) refits that LLM's own "
                        "parameters (the others stay bitwise as they were) "
                        "and swaps them in between prediction batches; GET /llms and /metrics show the refits and "
                        "prequential MAE / Kendall tau / bound coverage")
    g.add_argument("--learn-every", type=int, default=d.learn_every, help="new answers of an LLM between its refits")
    g.add_argument("--learn-interval", type=float, default=d.learn_interval,
                   help="seconds at least between two refits of one LLM")
    g.add_argument("--learn-min-answers", type=int, default=d.learn_min_answers,
                   help="answers an LLM needs before its first refit; until then an LLM new to the model gets "
                        "--default-priority")
    g.add_argument("--learn-memory", type=int, default=d.learn_memory,
                   help="newest answers (with their prompt vectors) remembered per LLM; a refit uses all of them")
    g.add_argument("--learn-window", type=int, default=d.learn_window,
                   help="newest answers per LLM that the prequential scores cover")
    g.add_argument("--learn-dir", help="after each refit, write the served model here as a loadable export (a "
                                       "symlink switched atomically); on a restart the gateway serves it again")
    return ap


def run_gateway(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model and args.predict:
        print("lenpred gateway: --model is required (or --no-predict)", file=sys.stderr)
        return 2
    try:
        from lenpred.gateway import Gateway, GatewayConfig, LogPathError
        from lenpred.gateway.server import serve
    except ImportError as exc:
        print(f"lenpred gateway: {exc}; install the serving stack with: pip install 'lenpred[serve]'", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = GatewayConfig(**{k: v for k, v in vars(args).items() if k in GatewayConfig.__dataclass_fields__})
    try:
        if args.model:
            gw = Gateway.from_export(args.model, config, device=args.device, backend=args.backend,
                                     workdir=args.fast_dir, threads=args.threads)
        else:
            gw = Gateway(None, None, config)
    except (LogPathError, ValueError) as exc:
        print(f"lenpred gateway: {exc}", file=sys.stderr)
        return 2
    if gw.model is not None:
        logging.getLogger("lenpred.gateway").info("LLMs predicted for: %s%s", ", ".join(gw.model.config.llm_names),
                                                  "" if config.predict else " (prediction off)")
    return serve(gw, log_level=args.log_level)


def build_parser() -> argparse.ArgumentParser:
    from lenpred import gateway

    ap = argparse.ArgumentParser(prog="lenpred", description=__doc__, formatter_class=_Formatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    gw = sub.add_parser("gateway", help="OpenAI-compatible gateway setting `priority` from predicted lengths",
                        description=gateway.__doc__, formatter_class=_Formatter)
    add_gateway_arguments(gw)
    for name, (_, text) in DELEGATES.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here; parsed by the delegate
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _ensure_repo_on_path()
    if argv and argv[0] in DELEGATES:
        import importlib

        return importlib.import_module(DELEGATES[argv[0]][0]).main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return run_gateway(args)


if __name__ == "__main__":
    sys.exit(main())
