"""Rank maps for `gora inspect`: names split into layer × module type; the PNG is written."""

from __future__ import annotations

import math

import pytest

from gora.plotting import NO_INDEX, plot_ranks, rank_grid, rank_spread, split_name


def test_split_name_cuts_at_the_first_layer_index():
    assert split_name("bert.encoder.layer.3.attention.self.query") == ("bert.encoder.layer", 3, "attention.self.query")
    assert split_name("encoder.block.1.layer.0.SelfAttention.q") == ("encoder.block", 1, "layer.0.SelfAttention.q")
    assert split_name("bert.pooler.dense") == (NO_INDEX, -1, "bert.pooler.dense")


def test_rank_spread_counts_adapted_layers_only():
    assert rank_spread([4, 0, 32, 9]) == "ranks 4..32 over 3 layers"
    assert rank_spread([8]) == "ranks 8..8 over 1 layer"
    assert rank_spread([0, 0]) == rank_spread([]) == "no adapted layer"


def test_rank_grid_orders_layers_numerically_and_leaves_holes_for_missing_modules():
    ranks = {"m.layers.10.q": 3, "m.layers.2.q": 5, "m.layers.2.v": 7, "m.layers.10.v": 1, "m.layers.9.q": 2,
             "head.dense": 4}
    grid = rank_grid(ranks)
    assert grid.rows == ["m.layers.2", "m.layers.9", "m.layers.10", NO_INDEX]
    assert grid.columns == ["q", "v", "head.dense"]
    assert grid.ranks[0][:2] == [5.0, 7.0] and grid.ranks[2][:2] == [3.0, 1.0]
    assert math.isnan(grid.ranks[1][1]) and grid.ranks[3][2] == 4.0  # layer 9 has no v


def test_rank_grid_keeps_encoder_and_decoder_blocks_apart():
    grid = rank_grid({"encoder.block.0.layer.0.SelfAttention.q": 4, "decoder.block.0.layer.0.SelfAttention.q": 9})
    assert grid.rows == ["decoder.block.0", "encoder.block.0"]
    assert [row[0] for row in grid.ranks] == [9.0, 4.0]


def test_plot_ranks_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_ranks({f"model.layers.{i}.{kind}": i + 2 for i in range(4) for kind in ("q_proj", "v_proj")},
                      tmp_path / "ranks.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
