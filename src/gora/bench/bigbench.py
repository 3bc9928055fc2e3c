"""Stream BIG-bench task files from the 1.0.0 sdist, with an in-memory and on-disk cache.

The sdist (358 MB) is never installed: installing it pulls tensorflow, t5 and seqio. One streaming pass over the
tarball costs 1-7 s per task, so parsed tasks are cached under ``~/.cache/gora/bigbench/`` (``GORA_CACHE_DIR``
overrides the root). Nothing is ever written inside the repository: BIG-bench data carries a canary string and must
not end up in anything published.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tarfile
from pathlib import Path

logger = logging.getLogger(__name__)

SDIST_ENV = "GORA_BIGBENCH_SDIST"
CACHE_ENV = "GORA_CACHE_DIR"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
_MEMORY_CACHE: dict[str, list[tuple[str, str]]] = {}


def cache_dir() -> Path:
    """Root of gora's user cache: ``$GORA_CACHE_DIR`` or ``~/.cache/gora``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gora")


def bigbench_sdist_path() -> Path:
    """Path of the BIG-bench sdist: ``$GORA_BIGBENCH_SDIST``, else ``~/.cache/gora/bigbench-1.0.0.tar.gz``.

    Raises:
        FileNotFoundError: the file is absent; the message gives the command that fetches it.
    """
    path = Path(os.environ.get(SDIST_ENV) or Path.home() / ".cache" / "gora" / SDIST_NAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"BIG-bench sdist not found at {path}. The package index no longer serves bigbench 1.0.0 (only 0.0.1, "
            f"which holds no task data), so this task can only run from a copy you already have: point {SDIST_ENV} "
            "at it. Tasks that install today: rotten_tomatoes, clinc150, yahoo_answers, tweet_sentiment "
            "(scripts/setup.sh)."
        )
    return path


def _cache_file(task_path: str, sdist: Path) -> Path:
    # The sdist size is part of the key so that a different file never serves stale examples.
    safe = task_path.replace("/", "__")
    return cache_dir() / "bigbench" / f"{safe}-{sdist.stat().st_size}.json.gz"


def _best_target(target_scores: dict[str, float]) -> str:
    return max(target_scores, key=lambda name: target_scores[name])


def _stream_task(sdist: Path, task_path: str) -> list[tuple[str, str]]:
    member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{task_path}/task.json"
    with tarfile.open(sdist, "r|gz") as archive:  # one streaming pass
        for info in archive:
            if info.name == member:
                member_file = archive.extractfile(info)
                if member_file is None:  # a directory or link of that name, not the task file
                    break
                examples = json.load(member_file)["examples"]
                return [(ex["input"], _best_target(ex["target_scores"])) for ex in examples]
    raise KeyError(f"{member} is not in {sdist}; check the task path (folders under benchmark_tasks/).")


def load_bigbench_examples(task_path: str) -> list[tuple[str, str]]:
    """(input, label) pairs of one BIG-bench task; label = the highest-scoring target.

    Args:
        task_path: folder under ``benchmark_tasks/``, e.g. ``"multiemo/all_sentence_en"``.
    """
    if task_path in _MEMORY_CACHE:
        return _MEMORY_CACHE[task_path]
    sdist = bigbench_sdist_path()
    cached = _cache_file(task_path, sdist)
    if cached.is_file():
        with gzip.open(cached, "rt", encoding="utf-8") as f:
            examples = [tuple(pair) for pair in json.load(f)]
    else:
        logger.info("Streaming %s from %s (a few seconds; cached afterwards)", task_path, sdist)
        examples = _stream_task(sdist, task_path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(examples, f)
        os.replace(tmp, cached)
    _MEMORY_CACHE[task_path] = examples
    return examples
