"""Data files for `gora init`: CSV/TSV/JSONL/plain text, task detection, label ids, clear errors."""

from __future__ import annotations

import json

import pytest

from gora import GoraDataError
from gora.data_files import label_names, load_text_data, read_records, subsample


def test_csv_with_labels_is_classification_with_sorted_class_names(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    data = load_text_data(path)
    assert data.task == "seq-cls" and data.label_names == ["neg", "pos"]
    assert data.records[0]["text"] == "good, really" and not data.is_pair


def test_jsonl_with_text_pairs_and_integer_labels(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a", "text_pair": "b", "label": 2}, {"text": "c", "text_pair": "d", "label": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_text_data(path)
    assert data.is_pair and data.label_names == ["0", "1", "2"]  # integer labels keep their ids


def test_plain_text_is_causal_lm_one_document_per_nonempty_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond line\n")
    data = load_text_data(path)
    assert data.task == "causal-lm" and [r["text"] for r in data.records] == ["first line", "second line"]


def test_tsv_is_read_with_tabs(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\na, b\t1\n")
    assert read_records(path) == [{"text": "a, b", "label": "1"}]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", "text,label\n", "holds no examples"),
        ("bad.jsonl", '{"text": "a"}\nnot json\n', "line 2 is not valid JSON"),
        ("list.jsonl", "[1, 2]\n", "must be a JSON object"),
        ("cols.csv", "sentence\nhello\n", "no 'text'"),
    ],
)
def test_unreadable_data_files_raise_data_errors_that_say_what_to_fix(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(GoraDataError, match=message):
        read_records(path)


def test_classification_task_requires_labels(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(GoraDataError, match="needs a 'label' column"):
        load_text_data(path, task="seq-cls")


def test_negative_integer_labels_are_refused():
    with pytest.raises(GoraDataError, match=">= 0"):
        label_names([{"label": "-1"}, {"label": "1"}])


def test_subsample_is_seeded_and_keeps_the_class_names_of_the_whole_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'c' if i == 7 else 'a' if i % 2 else 'b'}\n" for i in range(20)))
    data = load_text_data(path)
    small = subsample(data, 5, seed=0)
    assert len(small.records) == 5 and small.label_names == data.label_names == ["a", "b", "c"]
    assert small.records == subsample(data, 5, seed=0).records != subsample(data, 5, seed=1).records
    assert subsample(data, 50, seed=0) is data
