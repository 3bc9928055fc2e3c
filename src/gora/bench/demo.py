"""The project's main command: GoRA vs LoRA on Rotten Tomatoes with MiniLM, on CPU in under 10 minutes.

Cost model (batch 32 x 64 tokens): measured 0.68 s per training step and 0.5 s per GoRA estimation step on two
dedicated Xeon cores (``taskset -c 0,1``), plus about 15 s per method for loading and evaluating the 2,393 test
reviews. The defaults below (6,400 training reviews = 200 steps per method, one epoch, one seed) therefore take
about 5.5 minutes on an idle 2-core machine; the printed header states them. On a shared machine, give torch only
the free cores (``--threads``): 2 threads on 1 free core ran 7x slower than 1 thread.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from gora.bench.builders import MethodConfig
from gora.bench.grid import run_grid
from gora.bench.records import Record
from gora.bench.report import markdown_table, records_frame, write_report
from gora.bench.runner import DataConfig
from gora.bench.train import TrainConfig
from gora.config import field_default
from gora.plotting import rank_spread

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes and settings of the demo (all stated in its output)."""

    max_train: int = 6400
    """Training reviews (a subsample of the ~8.2k in the train split)."""
    max_val: int = 500
    max_test: int | None = None
    """None: the whole test split (movies never seen in training)."""
    max_length: int = 64
    batch_size: int = 32
    epochs: float = 1.0
    lrs: dict[str, float] = field(default_factory=lambda: {"lora": 1e-3, "gora": 5e-4})
    """Per-method learning rates, fixed (no search in the demo); see benchmarks/README.md for how they were picked."""
    seed: int = 0
    split_seed: int = 0
    gora_steps: int = 32
    r: int = 8
    out_dir: str | None = None
    """Where results, table and plots go; default a new temporary folder."""
    progress: bool = True


def header(cfg: DemoConfig) -> str:
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in cfg.lrs.items())
    test = "whole test split" if cfg.max_test is None else f"{cfg.max_test} test reviews"
    return (
        "GoRA vs LoRA: MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, split by movie (split seed "
        f"{cfg.split_seed}).\nSizes: {cfg.max_train} training reviews, {cfg.max_val} validation, {test}; "
        f"{cfg.epochs:g} epoch, batch {cfg.batch_size}, max length {cfg.max_length}, seed {cfg.seed}.\n"
        f"Adapters on query/key/value/dense, r={cfg.r}, alpha={2 * cfg.r}; GoRA: N={cfg.gora_steps} estimation "
        f"batches, gamma {field_default('gamma'):g}, ranks in [{max(1, cfg.r // 2)}, {4 * cfg.r}]. "
        f"Learning rates: {lrs}.\n"
    )


def details(records: list[Record]) -> str:
    lines = []
    for r in records:
        extra = ""
        if r.get("ranks"):
            extra = f", {rank_spread(r['ranks'].values())}, init {r['init_seconds']:.1f} s"
        lines.append(f"- {r['method']}: test {100 * r['value']:.2f} %, validation {100 * r['val_value']:.2f} %, "
                     f"{r['trainable_params']:,} trainable params, train {r['train_seconds']:.0f} s{extra}")
    return "\n".join(lines) + "\n"


def run_demo(cfg: DemoConfig | None = None, stream: TextIO | None = sys.stdout) -> str:
    """Run the demo, write its table and plots, and return (and write to ``stream``) the text summary."""
    cfg = cfg or DemoConfig()
    out_dir = Path(cfg.out_dir or tempfile.mkdtemp(prefix="gora-demo-"))
    if stream is not None:
        stream.write(header(cfg) + "\n")
        stream.flush()
    start = time.perf_counter()
    records = run_grid(
        list(cfg.lrs), ["rotten_tomatoes"], [cfg.seed], out_dir=out_dir,
        lr_grid={m: (lr,) for m, lr in cfg.lrs.items()},
        train_config=TrainConfig(max_length=cfg.max_length, batch_size=cfg.batch_size, epochs=cfg.epochs,
                                 progress=cfg.progress),
        method_config=MethodConfig(r=cfg.r, init_steps=cfg.gora_steps),
        data_config=DataConfig(split_seed=cfg.split_seed, max_train=cfg.max_train, max_val=cfg.max_val,
                               max_test=cfg.max_test),
    )
    write_report(out_dir / "results.json")
    text = (
        "Test accuracy (%), one seed:\n\n" + markdown_table(records_frame(records)) + "\n" + details(records)
        + f"\nWall time {time.perf_counter() - start:.0f} s; results, table and plots in {out_dir}\n"
    )
    if stream is not None:
        stream.write(text)
        stream.flush()
    return header(cfg) + "\n" + text
