"""Data files for `gora init`: CSV/TSV/JSONL/plain text, task detection, label ids, clear errors."""

from __future__ import annotations

import json
import logging

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
        ("empty.csv", "text,label\n", r"holds no examples \(only a header line\); it must hold a header line naming "
                                      r"a 'text' column .* and at least one row below it"),
        ("blank.csv", "", r"holds no examples \(it is empty\); it must hold a header line"),
        ("empty.jsonl", "\n\n", r"holds no examples \(it is empty\); it must hold one JSON object per line "
                                 r"with a 'text'"),
        ("empty.txt", "  \n", r"it must hold at least one non-blank line \(one document per line"),
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


def test_a_file_that_is_not_utf8_is_refused_with_a_data_error_saying_to_save_it_as_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé crème,1\n".encode("latin-1"))
    with pytest.raises(GoraDataError, match=r"latin1\.csv is not UTF-8.*save it as UTF-8"):
        load_text_data(path)


@pytest.mark.parametrize(("name", "content"), [("bom.csv", "text,label\nhello,1\n"),
                                               ("bom.jsonl", '{"text": "hello", "label": 1}\n')])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8-sig"))
    data = load_text_data(path)
    assert data.task == "seq-cls" and data.records[0]["text"] == "hello" and data.label_names == ["0", "1"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"label": 1}],
         r"line 3 has no 'text' \(it has \['label'\]\)"),
        ([{"text": "a", "label": 0}, {"text": "b"}], r"line 2 has no 'label' \(it has \['text'\]\)"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": None}], "line 2 has no 'label' value"),
        ([{"text": "a"}, {"text": "b", "label": 1}], r"line 1 has no 'label' \(it has \['text'\]\)"),  # label anywhere
    ],
)
def test_every_jsonl_row_is_checked_for_text_and_label(tmp_path, rows, message):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(GoraDataError, match=f"train.jsonl {message}; fill in its .* or drop the row"):
        load_text_data(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\nhello,1\nworld\n", "line 3 has no 'label' value"),  # the row stops before the label cell
        ("text,label\nhello,1\nworld,\nagain,0\n", "line 3 has an empty 'label'"),
        ('text,label\n"two\nlines",1\nworld, \n', "line 4 has an empty 'label'"),  # line numbers count quoted newlines
    ],
)
def test_a_missing_or_empty_label_cell_is_refused_not_made_a_class(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(GoraDataError, match=f"train.csv {message}; fill in its 'label' or drop the row"):
        load_text_data(path)


def test_a_csv_row_longer_than_its_header_does_not_hide_the_missing_text_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence\nhello,extra\n")
    with pytest.raises(GoraDataError, match="no 'text'"):
        read_records(path)


def test_a_labels_column_without_label_warns_that_the_task_is_causal_lm(tmp_path, caplog):
    path = tmp_path / "train.csv"
    path.write_text("text,labels\nhello,1\nworld,0\n")
    with caplog.at_level(logging.WARNING, logger="gora.data_files"):
        data = load_text_data(path)
    assert data.task == "causal-lm"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'labels' column but no 'label'" in warnings[0]
    assert "rename the column to 'label'" in warnings[0] and "--task" in warnings[0]
    with pytest.raises(GoraDataError, match="rename its 'labels' column to 'label'"):
        load_text_data(path, task="seq-cls")


def test_the_task_auto_picks_is_logged_with_its_reason(tmp_path, caplog):
    labelled, plain = tmp_path / "train.csv", tmp_path / "corpus.txt"
    labelled.write_text("text,label\nhello,1\n")
    plain.write_text("hello\n")
    with caplog.at_level(logging.INFO, logger="gora.data_files"):
        load_text_data(labelled)
        load_text_data(plain)
        load_text_data(labelled, task="seq-cls")  # an explicit task needs no explanation
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "has a 'label' column: task seq-cls" in messages[0] and "no 'label' column: task causal-lm" in messages[1]
