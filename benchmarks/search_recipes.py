"""Search training recipes: run many `probe_recipe.py` configurations at once, one process each (several share one
GPU), and rank them on the dev split. Made for a lent GPU, where a 3-epoch probe takes a minute or two; confirm the
winner with the main job on CPU afterwards.

    python benchmarks/search_recipes.py --grid benchmarks/grids/recipes.txt --out runs/search --jobs 8 --epochs 3

Grid file: one configuration per line, `NAME train.py-ARGS…`; `#` starts a comment. The first configuration runs
alone (its training time is a clean epoch time on this machine), the rest `--jobs` at a time in file order. At
`--deadline` seconds the runs still going are stopped and reported as such; summary.json and summary.md are
rewritten after every finished run, so a cut-short search still leaves its table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenpred.report import md_table  # noqa: E402

PROBE = Path(__file__).resolve().with_name("probe_recipe.py")
LLAMAS = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B")


def read_grid(path: str) -> list[tuple[str, list[str]]]:
    """(name, train.py args) per line; a repeated name or a line without a name is an error."""
    configs, seen = [], set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        name, args = words[0], words[1:]
        if name.startswith("-") or name in seen:
            raise ValueError(f"{path}:{number}: each line starts with a new configuration name, got {name!r}")
        seen.add(name)
        configs.append((name, args))
    if not configs:
        raise ValueError(f"{path}: no configurations")
    return configs


def summarise(results: dict[str, dict]) -> list[dict]:
    """One flat row per configuration: dev figures over all LLMs, per Llama, and APPS τ per Llama."""
    rows = []
    for name, r in results.items():
        row = {"name": name, "args": " ".join(r.get("train_args", [])), "status": r["status"],
               "seconds": r.get("seconds"), "train_runtime": r.get("train_runtime")}
        for llm, scores in r.get("dev", {}).items():
            key = "all" if llm == "all" else next((short for short in LLAMAS if short in llm), llm)
            row.update({f"{key} mae": scores["mae"], f"{key} acc500": scores["acc500"], f"{key} tau": scores["tau"]})
            if key != "all":
                row[f"{key} APPS tau"] = scores["tau_by_prompt_set"].get("Apps")
        rows.append(row)
    return sorted(rows, key=lambda row: -(row.get("all tau") or -1))


def markdown(rows: list[dict]) -> str:
    cols = ["name", "all tau", "all mae", "all acc500"] + [f"{s} {m}" for s in LLAMAS
                                                         for m in ("tau", "mae", "acc500", "APPS tau")]
    cols += ["train_runtime", "status", "args"]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)
    return md_table(cols, [[cell(row.get(c)) for c in cols] for row in rows]) + "\n"


def write_summary(out: Path, results: dict[str, dict]) -> list[dict]:
    rows = summarise(results)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(markdown(rows))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, help="grid file: NAME train.py-ARGS… per line")
    ap.add_argument("--out", required=True, help="one folder per configuration, plus summary.json / summary.md")
    ap.add_argument("--jobs", type=int, default=4, help="configurations run at once after the first")
    ap.add_argument("--epochs", type=float, default=3.0, help="epochs per configuration (a line may override)")
    ap.add_argument("--common", default="", help="train.py args added to every line, e.g. '--encoder DIR'")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; then running jobs are stopped")
    args = ap.parse_args(argv)
    configs = read_grid(args.grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 2) // max(args.jobs, 1)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    started, pending, running, results = time.time(), list(configs), {}, {}

    def launch(name, extra):
        cmd = [sys.executable, str(PROBE), "--out", str(out / name), "--epochs", str(args.epochs), "--",
               *shlex.split(args.common), *extra]
        log = open(out / f"{name}.log", "w")
        running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
        print(f"[{time.time() - started:6.0f} s] start {name}: {' '.join(extra) or '(defaults)'}", flush=True)

    def finish(name, status):
        proc, log, t0 = running.pop(name)
        log.close()
        probe = out / name / "probe.json"
        if status == "ok" and not probe.exists():  # exited cleanly without scores
            status = "failed"
        result = json.loads(probe.read_text()) if status == "ok" else {}
        results[name] = {**result, "status": status, "seconds": round(time.time() - t0, 1),
                         "train_args": dict(configs)[name]}
        write_summary(out, results)
        print(f"[{time.time() - started:6.0f} s] {results[name]['status']} {name}", flush=True)

    solo = True  # the first configuration runs alone
    while pending or running:
        overdue = time.time() - started >= args.deadline
        for name, (proc, _, _) in list(running.items()):
            if proc.poll() is not None:
                finish(name, "ok" if proc.returncode == 0 else f"exit {proc.returncode}")
            elif overdue:
                proc.kill()
                proc.wait()
                finish(name, "stopped at deadline")
        if overdue:
            results.update({name: {"status": "not started", "train_args": extra} for name, extra in pending})
            pending = []
        solo = solo and not results
        while pending and len(running) < (1 if solo else args.jobs):
            launch(*pending.pop(0))
        time.sleep(1)
    rows = write_summary(out, results)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
