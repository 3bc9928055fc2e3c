"""Batches keep their container type on their way to the model's device: dict, list, tuple, namedtuple,
transformers' ``BatchEncoding`` (attribute access in a ``loss_fn``), other mappings, and nestings of them.

The ``meta`` device stands in for an accelerator: a tensor moved there shows it was moved, on a CPU-only machine.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple
from collections.abc import Mapping
from types import MappingProxyType

import pytest
import torch
from peft import LoraConfig
from transformers import BatchEncoding

from gora import GoraConfig, estimate_gora
from gora.devices import move_to_device
from gora.estimation import batch_size

from conftest import make_bert_batches

META = torch.device("meta")
Pair = namedtuple("Pair", ["input_ids", "labels"])
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


def _ids(rows: int = 2) -> torch.Tensor:
    return torch.arange(rows * 3).view(rows, 3)


def _on_meta(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "meta"


def test_dict_list_and_tuple_keep_their_types_and_other_values():
    moved = move_to_device({"ids": _ids(), "name": "x", "n": 3}, META)
    assert type(moved) is dict and _on_meta(moved["ids"]) and moved["name"] == "x" and moved["n"] == 3
    moved = move_to_device([_ids(), 1.5], META)
    assert type(moved) is list and _on_meta(moved[0]) and moved[1] == 1.5
    moved = move_to_device((_ids(), None), META)
    assert type(moved) is tuple and _on_meta(moved[0]) and moved[1] is None


def test_a_namedtuple_stays_that_namedtuple():
    batch = Pair(_ids(), _ids())
    moved = move_to_device(batch, META)
    assert type(moved) is Pair
    assert _on_meta(moved.input_ids) and _on_meta(moved.labels)
    assert not _on_meta(batch.input_ids)  # the user's batch is untouched
    assert batch_size(moved) == 2


def test_a_batch_encoding_stays_one_with_its_attributes_and_the_users_batch_is_not_moved_in_place():
    batch = BatchEncoding({"input_ids": _ids(), "attention_mask": torch.ones(2, 3)}, n_sequences=1)
    moved = move_to_device(batch, META)
    assert type(moved) is BatchEncoding
    assert _on_meta(moved.input_ids) and _on_meta(moved["attention_mask"])  # attribute and key access
    assert moved.n_sequences == 1  # the tokenizer's extras survive (a copy, not BatchEncoding(dict))
    assert not _on_meta(batch.input_ids) and moved.data is not batch.data


def test_mapping_subclasses_keep_their_type_and_a_type_that_cannot_be_rebuilt_becomes_a_dict():
    ordered = move_to_device(OrderedDict(b=_ids(), a=_ids()), META)
    assert type(ordered) is OrderedDict and list(ordered) == ["b", "a"] and _on_meta(ordered["a"])
    counts = defaultdict(list, ids=_ids())
    moved = move_to_device(counts, META)
    assert type(moved) is defaultdict and moved.default_factory is list and _on_meta(moved["ids"])
    assert not _on_meta(counts["ids"])
    frozen = move_to_device(MappingProxyType({"ids": _ids()}), META)  # MappingProxyType(dict) rebuilds it
    assert isinstance(frozen, MappingProxyType) and _on_meta(frozen["ids"])

    class ReadOnly(Mapping):  # a constructor that takes no dict: a plain dict holds the moved values
        def __init__(self, *, ids):
            self._ids = ids

        def __getitem__(self, key):
            return {"ids": self._ids}[key]

        def __iter__(self):
            return iter(["ids"])

        def __len__(self):
            return 1

    fallback = move_to_device(ReadOnly(ids=_ids()), META)
    assert type(fallback) is dict and _on_meta(fallback["ids"])


def test_nested_containers_are_moved_all_the_way_down_with_their_types():
    batch = {"pair": Pair(_ids(), [_ids(), (_ids(),)]), "encoding": BatchEncoding({"input_ids": _ids()})}
    moved = move_to_device(batch, META)
    assert type(moved["pair"]) is Pair and _on_meta(moved["pair"].input_ids)
    inner = moved["pair"].labels
    assert type(inner) is list and _on_meta(inner[0]) and type(inner[1]) is tuple and _on_meta(inner[1][0])
    assert type(moved["encoding"]) is BatchEncoding and _on_meta(moved["encoding"].input_ids)


@pytest.mark.parametrize("container", ["namedtuple", "BatchEncoding"])
def test_estimation_with_attribute_access_batches_equals_dict_batches(tiny_bert, container):
    batches = make_bert_batches(3)
    config = GoraConfig(num_steps=3, show_progress=False)
    reference = estimate_gora(tiny_bert, LoraConfig(**LORA), batches, gora_config=config)
    if container == "namedtuple":
        Batch = namedtuple("Batch", list(batches[0]))
        wrapped = [Batch(**b) for b in batches]
    else:
        wrapped = [BatchEncoding(b) for b in batches]
    state = estimate_gora(tiny_bert, LoraConfig(**LORA), wrapped, gora_config=config,
                          loss_fn=lambda model, b: model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                         labels=b.labels).loss)
    assert state.ranks == reference.ranks and state.num_samples == reference.num_samples
    for name in reference.C:
        assert torch.equal(state.C[name], reference.C[name]), name
