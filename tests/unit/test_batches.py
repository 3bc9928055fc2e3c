"""The held-out-batch rule in one place: the ``gamma_batches`` batches after the ``num_steps`` estimation batches."""

from __future__ import annotations

from gora import GoraConfig
from gora.batches import batches_needed, split_estimation_batches, take_held_out


def test_split_takes_num_steps_then_the_next_gamma_batches():
    config = GoraConfig(num_steps=3, gamma_batches=2)
    assert split_estimation_batches(list(range(10)), config) == ([0, 1, 2], [3, 4])
    assert split_estimation_batches(list(range(4)), config) == ([0, 1, 2], [3])
    assert split_estimation_batches(list(range(3)), config) == ([0, 1, 2], [])


def test_batches_needed_adds_gamma_batches_only_when_held_out_batches_are_wanted():
    assert batches_needed(GoraConfig(num_steps=5, gamma_batches=3)) == 5
    assert batches_needed(GoraConfig(num_steps=5, gamma_batches=3, adaptive_gamma=True)) == 8
    assert batches_needed(GoraConfig(num_steps=5, gamma_batches=3), held_out=True) == 8
    assert batches_needed(GoraConfig(num_steps=5, gamma_batches=3, adaptive_gamma=True), held_out=False) == 5


def test_take_held_out_reads_the_next_gamma_batches_of_a_walked_iterator():
    iterator = iter(range(10))
    for _ in range(4):  # the estimation loop's batches
        next(iterator)
    assert take_held_out(iterator, GoraConfig(gamma_batches=3)) == [4, 5, 6]
    assert next(iterator) == 7
