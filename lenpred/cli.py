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
    from lenpred.inference import CPU_OPTIONS
    from lenpred.gateway import GatewayConfig

    d = GatewayConfig()
    ap.add_argument("--model", required=True, help="LenPred export folder (lenpred.hub.export_model output)")
    ap.add_argument("--upstream", default=d.upstream, help="OpenAI-compatible server (vLLM/SGLang) base URL, no /v1")
    ap.add_argument("--host", default=d.host)
    ap.add_argument("--port", type=int, default=d.port)
    ap.add_argument("--log", dest="log_path", help="append one JSONL line per finished request (train.py --dataset)")
    ap.add_argument("--default-priority", type=int, default=d.default_priority,
                    help="priority for LLMs the model does not know (before aging)")
    ap.add_argument("--aging-rate", type=float, default=d.aging_rate,
                    help="priority (tokens) added per second of arrival time; 0 = no aging")
    ap.add_argument("--chat-prompt", choices=("last_user", "all"), default=d.chat_prompt,
                    help="chat text to predict from: the last user message, or all messages joined")
    ap.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                    help="wait this long to grow a prediction batch (0: batch only what queued meanwhile)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="prompts per prediction batch")
    ap.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout, help="seconds")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false", help="do not fsync the log after each line")
    ap.add_argument("--flag-tokens", type=float, default=d.flag_tokens, help="flag |error| above this many tokens")
    ap.add_argument("--flag-fraction", type=float, default=d.flag_fraction, help="... or above this share of actual")
    ap.add_argument("--flag-rule", choices=("or", "and"), default=d.flag_rule,
                    help="flag when either threshold is exceeded (Cheng et al. as worded) or only when both are")
    ap.add_argument("--backend", choices=("torch", *CPU_OPTIONS), default="torch",
                    help="predictor: the fp32 torch fast path, or a lenpred.fast CPU option (python -m lenpred.fast "
                         "--check reports their agreement with fp32)")
    ap.add_argument("--device", help="torch device for the model (default: CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return ap


def run_gateway(args: argparse.Namespace) -> int:
    import signal

    from lenpred.gateway import Gateway, GatewayConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = GatewayConfig(**{k: v for k, v in vars(args).items() if k in GatewayConfig.__dataclass_fields__})
    gw = Gateway.from_export(args.model, config, device=args.device, backend=args.backend)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    logging.getLogger("lenpred.gateway").info("LenPred gateway on %s -> %s (LLMs: %s)", gw.url, config.upstream,
                                              ", ".join(gw.model.config.llm_names))
    try:
        gw.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        gw.close()
    return 0


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
