"""Loading, cleaning and splitting ⟨prompt, LLM, output lengths⟩ rows.

Every loader returns the same normalised frame (see ``COLUMNS``) so that training,
evaluation and fine-tuning on a user's own gateway logs share one code path.
Bad rows are never turned into labels: they are dropped and counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["CASTILLO_HUB_ID", "PROMPT_SETS", "HELD_OUT_PROMPT_SET", "PAPER_LLMS", "LOCAL_CASTILLO",
           "COLUMNS", "COMPLETE_FINISH_REASONS", "SPLITS", "Splits", "default_dataset_source", "dataset_name",
           "load_rows", "rows_from_records", "validate_rows", "sanitize", "load_castillo", "make_splits", "prompt_table", "mean_std"]

logger = logging.getLogger(__name__)

CASTILLO_HUB_ID = "danfperam/castillo"
PROMPT_SETS = ("Alpaca", "Apps", "BigCodeBench", "DS1000", "DollyDataset", "Mbpp", "ShareGPT")
HELD_OUT_PROMPT_SET = "Alpaca"
PAPER_LLMS = ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
              "meta-llama/Llama-3.1-8B-Instruct")
LOCAL_CASTILLO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "castillo"
COLUMNS = ("prompt_id", "prompt_text", "llm", "prompt_set", "input_size",
           "output_sizes", "output_mean", "output_std", "output_capped", "split")
#: Finish reasons of an answer the LLM ended itself; any other reason ("length": the client's `max_tokens`,
#: "abort", ...) means the answer was cut short, so its length is only a lower bound of the LLM's own.
COMPLETE_FINISH_REASONS = ("stop", "tool_calls", "function_call")
SPLITS = ("train", "validation", "test")
CUSTOM_PROMPT_SET = "custom"

# Upstream "sanitized" rule (CASTILLO README): generation cap and high-variance cut-off.
_CAP_SIZE, _HIGH_VAR_SIZE = 14_999, 8_499
_HUB_SPLIT_NAMES = {"train": "train", "validate": "validation", "validation": "validation",
                    "test": "test"}


def default_dataset_source() -> str:
    """The shipped offline copy when present (CI has no Hub access), else the Hub id."""
    return str(LOCAL_CASTILLO) if LOCAL_CASTILLO.is_dir() else CASTILLO_HUB_ID


def dataset_name(source: str | None) -> str:
    """How a report names its data: `source` as the user gave it; the default as the README names it
    (`../shared/data/castillo`, beside the repository), never resolved to this machine's absolute path."""
    if source is not None:
        return str(source)
    return "../shared/data/castillo" if LOCAL_CASTILLO.is_dir() else CASTILLO_HUB_ID


def _prompt_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _is_missing(x) -> bool:
    return x is None or (np.ndim(x) == 0 and bool(pd.isna(x)))


def _as_sizes(x):
    """Coerce a cell to a list of sizes (kept raw when broken so validation can say why)."""
    if _is_missing(x):
        return None
    if isinstance(x, str):
        try:
            x = json.loads(x)
        except json.JSONDecodeError:
            return ["<unparsable>"]
        if x is None:
            return None
    return np.atleast_1d(np.asarray(x, dtype=object) if isinstance(x, list) else x).tolist()


def _sizes_fault(sizes) -> str | None:
    """Why a size list cannot be a label, or None when it is usable."""
    if len(sizes) == 0:
        return "empty_output_sizes"
    if all(type(v) is int for v in sizes):  # fast path: the common, clean case
        return "negative_output_size" if min(sizes) < 0 else None
    try:
        arr = np.asarray(sizes, dtype=float)
    except (TypeError, ValueError):
        return "invalid_output_size"
    if arr.ndim != 1 or not np.isfinite(arr).all() or (arr != np.round(arr)).any() \
            or any(isinstance(v, bool) for v in sizes):
        return "invalid_output_size"
    return "negative_output_size" if (arr < 0).any() else None


def mean_std(sizes: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised per-row mean and population std (NaN std for a single observation)."""
    lens = np.fromiter((len(s) for s in sizes), dtype=np.int64, count=len(sizes))
    if not len(sizes):
        return np.zeros(0), np.zeros(0)
    flat = np.fromiter((v for s in sizes for v in s), dtype=float, count=int(lens.sum()))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    mean = np.add.reduceat(flat, starts) / lens
    std = np.sqrt(np.add.reduceat((flat - np.repeat(mean, lens)) ** 2, starts) / lens)
    return mean, np.where(lens > 1, std, np.nan)


def _normalise(raw: pd.DataFrame, split: str, origin: str) -> pd.DataFrame:
    """Map a CASTILLO or user-log frame onto ``COLUMNS``; raise on missing columns."""
    missing = [c for c in ("prompt_text", "model") if c not in raw.columns]
    if "output_sizes" not in raw.columns and "output_mean" not in raw.columns:
        missing.append("output_sizes or output_mean")
    if missing:
        raise ValueError(f"{origin}: missing required column(s) {missing}; "
                         f"found {sorted(map(str, raw.columns))}")
    n, text = len(raw), raw["prompt_text"].astype(object)

    def num(col):  # numeric column or all-NaN
        return (pd.to_numeric(raw[col], errors="coerce").to_numpy(float, copy=True)
                if col in raw.columns else np.full(n, np.nan))

    def obj(col):
        return raw[col].astype(object).tolist() if col in raw.columns else [None] * n

    pid = [str(p) if not _is_missing(p) else (_prompt_hash(t) if isinstance(t, str) else None)
           for p, t in zip(obj("prompt_id"), text)]
    sizes = [_as_sizes(x) for x in obj("output_sizes")]
    mean, std, good = num("output_mean"), num("output_std"), []
    for i, sz in enumerate(sizes):
        if sz is None:
            continue  # mean-only row: keep what the file says (validated later)
        if _sizes_fault(sz) is None:
            sizes[i] = [int(v) for v in sz]
            good.append(i)
        else:
            mean[i] = std[i] = np.nan  # never let a broken size list leave a label behind
    mean[good], std[good] = mean_std([sizes[i] for i in good])
    capped = _capped(raw, sizes)
    pset = [CUSTOM_PROMPT_SET if _is_missing(d) or d == "" else str(d) for d in obj("dataset")]
    return pd.DataFrame({
        "prompt_id": pd.Series(pid, dtype=object), "prompt_text": text.to_numpy(),
        "llm": raw["model"].astype(object).to_numpy(), "prompt_set": pset,
        "input_size": num("input_size"), "output_sizes": pd.Series(sizes, dtype=object),
        "output_mean": mean, "output_std": std, "output_capped": pd.Series(capped, dtype=object), "split": split,
    }, columns=list(COLUMNS))


def _capped(raw: pd.DataFrame, sizes: list) -> list:
    """Per row, which answers were cut short, aligned with its sizes (None: no answer was, or the file cannot
    tell). From `finish_reasons` (one per answer, as the gateway logs them) or `finish_reason`; where the reason
    is unknown, an answer of `max_tokens` tokens or more counts as cut short. A fault is kept as a marker string
    for `validate_rows` to count: reasons that do not match the sizes, or a cut-short answer in a row that logs
    only a mean (its length cannot be told)."""
    n = len(raw)
    if not {"finish_reasons", "finish_reason", "max_tokens"} & set(raw.columns):
        return [None] * n
    if "finish_reasons" in raw.columns:
        reasons = [_as_sizes(r) for r in raw["finish_reasons"].astype(object)]
    elif "finish_reason" in raw.columns:
        reasons = [None if _is_missing(r) else [r] for r in raw["finish_reason"].astype(object)]
    else:
        reasons = [None] * n
    caps = (pd.to_numeric(raw["max_tokens"], errors="coerce").to_numpy(float) if "max_tokens" in raw.columns
            else np.full(n, np.nan))
    out = []
    for sz, why, cap in zip(sizes, reasons, caps):
        answers = len(sz) if isinstance(sz, list) else (len(why) if why else 0)
        if why is not None and len(why) != answers:
            out.append("<finish_reasons_mismatch>")
            continue
        why = why or [None] * answers
        cut = [r not in COMPLETE_FINISH_REASONS if isinstance(r, str)
               else bool(isinstance(sz, list) and np.isfinite(cap) and _number(sz[i]) >= cap)
               for i, r in enumerate(why)]
        if not any(cut):
            out.append(None)
        elif not isinstance(sz, list):
            out.append("<capped_without_sizes>")
        else:
            out.append(cut)
    return out


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _read_user_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path, dtype={c: object for c in
                                        ("prompt_id", "prompt_text", "model", "dataset", "output_sizes")})
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return pd.DataFrame.from_records(json.loads(text))
        records = [_json_obj(line) for line in text.splitlines() if line.strip()]
        bad = sum(r is None for r in records)  # e.g. a half-written last line of a live log
        records = [r for r in records if r is not None]
        if bad:
            logger.warning("%s: skipped %d unparsable JSON line(s)", path, bad)
        return pd.DataFrame.from_records(records)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .parquet, .jsonl, .json or .csv")


def _json_obj(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _load_hub(repo_id: str, splits: Sequence[str]) -> pd.DataFrame:
    import datasets

    config = "original" if repo_id == CASTILLO_HUB_ID else None
    try:
        dsd = datasets.load_dataset(repo_id, config)
    except Exception as exc:  # offline, missing, auth: one readable message, no chain
        raise RuntimeError(
            f"Could not load the Hub dataset {repo_id!r} (config {config!r}): "
            f"{type(exc).__name__}: {exc}. Offline, pass a local folder holding "
            f"train/validation/test.parquet instead, e.g. load_rows('{LOCAL_CASTILLO}')."
        ) from None
    frames = []
    for hub_split, ds in dsd.items():
        split = _HUB_SPLIT_NAMES.get(hub_split)
        if split is None or split not in splits:
            continue  # e.g. "full" = all three splits again
        frames.append(_normalise(ds.to_pandas(), split, f"{repo_id}[{hub_split}]"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def load_rows(source: str | Path | Sequence[str | Path] | None = None,
              splits: Sequence[str] = SPLITS) -> pd.DataFrame:
    """Read a CASTILLO folder, the Hub copy, or user log files into ``COLUMNS`` rows.

    Rows are not yet validated: call :func:`validate_rows` (or :func:`load_castillo`).
    User files carry no split, so their rows get split "train".
    """
    splits = tuple(splits)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected a subset of {SPLITS}")
    source = default_dataset_source() if source is None else source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            frames = []
            for split in splits:
                f = path / f"{split}.parquet"
                if not f.exists() and split == "validation":
                    f = path / "validate.parquet"
                if not f.exists():
                    logger.warning("%s: no %s.parquet, split skipped", path, split)
                    continue
                frames.append(_normalise(pd.read_parquet(f), split, str(f)))
            if not frames:
                raise FileNotFoundError(f"{path}: none of {[s + '.parquet' for s in splits]} found")
            out = pd.concat(frames, ignore_index=True)
            logger.info("loaded %d rows from %s (%s)", len(out), path, ", ".join(splits))
            return out
        if not path.exists():
            if str(source).count("/") == 1 and not path.suffix:
                return _load_hub(str(source), splits)
            raise FileNotFoundError(f"{source}: no such file or folder (nor a Hub dataset id)")
        source = [path]
    if not source:
        raise ValueError("load_rows: empty list of files")
    frames = []
    for f in source:
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file")
        frames.append(_normalise(_read_user_file(f), "train", str(f)))
    out = pd.concat(frames, ignore_index=True)
    if "train" not in splits:
        logger.warning("user log files only have split 'train'; requested %s gives no rows", splits)
    out = out[out["split"].isin(splits)].reset_index(drop=True)
    logger.info("loaded %d rows from %d user file(s)", len(out), len(frames))
    return out


def rows_from_records(records: Sequence[dict], origin: str = "records") -> tuple[pd.DataFrame, dict[str, int]]:
    """Log records (dicts, as the gateway writes them) as validated rows, and the counts of those skipped by
    reason: what `load_rows` + `validate_rows` make of the same lines in a file."""
    if not records:
        raise ValueError(f"{origin}: no records")
    return validate_rows(_normalise(pd.DataFrame.from_records(list(records)), "train", origin))


def _row_fault(text, llm, sizes, mean, std, capped=None) -> str | None:
    """First reason a normalised row cannot be a label, else None."""
    if not isinstance(text, str) or not text.strip():
        return "missing_prompt_text"
    if not isinstance(llm, str) or not llm.strip():
        return "missing_llm"
    if isinstance(capped, str):  # a marker left by `_capped`
        return capped.strip("<>")
    fault = _sizes_fault(sizes) if sizes is not None else None
    return fault or ("missing_output" if not math.isfinite(mean) else
                     "negative_output_mean" if mean < 0 else
                     "negative_output_std" if std < 0 else None)


def validate_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop rows that cannot give a trustworthy label; return kept rows and counts by reason."""
    capped = df["output_capped"] if "output_capped" in df.columns else [None] * len(df)
    faults = [_row_fault(t, m, s, u, d, c) for t, m, s, u, d, c in zip(
        df["prompt_text"], df["llm"], df["output_sizes"],
        pd.to_numeric(df["output_mean"], errors="coerce").to_numpy(float),
        pd.to_numeric(df["output_std"], errors="coerce").to_numpy(float), capped)]
    counts = {str(k): int(v) for k, v in pd.Series(faults, dtype=object).dropna().value_counts().items()}
    keep = np.array([f is None for f in faults], dtype=bool)
    out = df.loc[keep].reset_index(drop=True)
    if counts:
        logger.warning("skipped %d malformed row(s) of %d: %s", int((~keep).sum()), len(df), counts)
    else:
        logger.info("all %d rows valid", len(df))
    return out, counts


def sanitize(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply upstream's degeneration rule so capped run-away generations do not skew labels."""
    df = df.copy()
    sizes_col = df["output_sizes"].tolist()
    capped_col = df["output_capped"].tolist() if "output_capped" in df.columns else [None] * len(df)
    means, stds = df["output_mean"].to_numpy(float).copy(), df["output_std"].to_numpy(float).copy()
    changed, remove = 0, np.zeros(len(df), dtype=bool)
    for i, s in enumerate(sizes_col):
        if s is None or len(s) == 0 or max(s) <= _HIGH_VAR_SIZE:
            continue  # fast path: nothing above either threshold
        arr = np.asarray(s, dtype=float)
        if arr.std() > 2 * arr.mean():
            keep = arr <= _HIGH_VAR_SIZE
        elif arr.max() >= _CAP_SIZE:
            keep = arr < _CAP_SIZE
        else:
            continue
        changed += 1
        remove[i] = not keep.any()
        if keep.any():
            sizes_col[i] = [v for v, k in zip(s, keep) if k]
            if isinstance(capped_col[i], list):  # the cut-short flags follow their answers
                capped_col[i] = [c for c, k in zip(capped_col[i], keep) if k]
            (means[i],), (stds[i],) = mean_std([sizes_col[i]])
    df["output_sizes"] = pd.Series(sizes_col, index=df.index, dtype=object)
    df["output_capped"] = pd.Series(capped_col, index=df.index, dtype=object)
    df["output_mean"], df["output_std"] = means, stds
    out = df.loc[~remove].reset_index(drop=True)
    counts = {"rows_changed": int(changed - remove.sum()), "rows_removed": int(remove.sum())}
    logger.info("sanitize: %s (of %d rows)", counts, len(df))
    return out, counts


def load_castillo(source: str | Path | Sequence[str | Path] | None = None,
                  splits: Sequence[str] = SPLITS, sanitize_rows: bool = True) -> pd.DataFrame:
    """load_rows → validate_rows → sanitize, per split so the logged counts are per split."""
    rows, _ = validate_rows(load_rows(source, splits))
    if not sanitize_rows:
        return rows
    parts = []
    for split in [s for s in SPLITS if s in set(rows["split"])]:
        part, counts = sanitize(rows[rows["split"] == split])
        logger.info("sanitize[%s]: %s", split, counts)
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else rows


@dataclass
class Splits:
    """Prompt-disjoint train/dev/test frames; ``heldout`` = pool rows of the held-out set."""

    train: pd.DataFrame
    dev: pd.DataFrame
    test: pd.DataFrame
    heldout: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(COLUMNS)))

    def summary(self) -> dict[str, dict]:
        return {name: {"rows": len(df), "prompts": int(df["prompt_id"].nunique()),
                       "llms": int(df["llm"].nunique()),
                       "prompts_per_set": {str(k): int(v) for k, v in df.groupby(
                           "prompt_set")["prompt_id"].nunique().items()}}
                for name, df in (("train", self.train), ("dev", self.dev), ("test", self.test),
                                 ("heldout", self.heldout))}


def make_splits(rows: pd.DataFrame, dev_fraction: float = 0.1, seed: int = 42,
                llms: Sequence[str] | None = None,
                held_out: str | None = HELD_OUT_PROMPT_SET) -> Splits:
    """Carve a dev set from the train+validation pool by prompt, per prompt set.

    Dev membership comes from a seeded hash of the prompt id, so it does not depend on
    row order; the upstream test split is kept as is (Alpaca included) for generalisation.
    """
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if llms is not None:
        available = sorted(rows["llm"].unique())
        absent = [m for m in llms if m not in set(available)]
        if absent:
            raise ValueError(f"LLM(s) {absent} not in the data; available: {available}")
        rows = rows[rows["llm"].isin(list(llms))]
    test = rows[rows["split"] == "test"]
    pool = rows[rows["split"].isin(["train", "validation"])]
    overlap = pool["prompt_id"].isin(set(test["prompt_id"]))
    if overlap.any():
        logger.warning("dropping %d pool row(s) whose prompt is also in test", int(overlap.sum()))
        pool = pool[~overlap]
    is_held = pool["prompt_set"] == held_out if held_out else np.zeros(len(pool), dtype=bool)
    heldout, pool = pool[is_held], pool[~is_held]
    prompts = pool.drop_duplicates("prompt_id")[["prompt_id", "prompt_set"]]
    dev_ids: set[str] = set()
    for _, grp in prompts.groupby("prompt_set", sort=True):
        ids = sorted(grp["prompt_id"], key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).digest())
        dev_ids.update(ids[:int(round(dev_fraction * len(ids)))])
    in_dev = pool["prompt_id"].isin(dev_ids)
    splits = Splits(train=pool[~in_dev].reset_index(drop=True),
                    dev=pool[in_dev].reset_index(drop=True),
                    test=test.reset_index(drop=True), heldout=heldout.reset_index(drop=True))
    logger.info("splits: %s", {k: (v["rows"], v["prompts"]) for k, v in splits.summary().items()})
    return splits


def prompt_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Unique prompts in first-seen order, so evaluation encodes each prompt once."""
    return (rows.drop_duplicates("prompt_id")[["prompt_id", "prompt_text", "prompt_set"]]
            .reset_index(drop=True))
