"""Protocol 2 of the grid with a stub runner: lr chosen on mean validation loss over selection seeds, grids extended
past their edge, selection runs never reused as results, resume, two workers on one folder, refusals."""

import math

import pytest

from gora.bench.protocol2 import DEFAULT_ARMS, HEAD_WARMUP_ARMS, parse_worker, run_arm_grid
from gora.bench.records import load_records
from gora.bench.train import TrainConfig, checkpoint_steps
from gora.errors import GoraConfigError

NO_BAR = TrainConfig(progress=False, batch_size=16)


class StubRunner:
    """Validation loss is a parabola in log(lr) with its minimum at ``best[arm]`` (default 4e-4) plus a seed term."""

    def __init__(self, best=None, fail_on_call=None):
        self.calls: list[tuple] = []
        self.tested: list[bool] = []
        self.best = best or {}
        self.fail_on_call = fail_on_call

    def run(self, arm, task, seed, r, lr, *, test=True):
        self.calls.append((arm, task, seed, r, lr))
        self.tested.append(test)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # a killed run
        loss = math.log(lr / self.best.get(arm, 4e-4)) ** 2 + seed / 1000
        return {"method": arm, "arm": arm, "task": task, "seed": seed, "r": r, "lr": lr, "metric": "accuracy",
                "value": 0.5 + seed / 100 if test else None, "val_loss": loss, "val_value": 0.5, "curve": []}


def _grid(tmp_path, runner, arms=("lora", "rslora"), seeds=(0, 1), **kw):
    kw.setdefault("lr_grid", {"lora": (1e-4, 2e-4, 4e-4, 8e-4), "rslora": (1e-4, 2e-4, 4e-4, 8e-4)})
    return run_arm_grid(list(arms), ["rotten_tomatoes"], list(seeds), out_dir=tmp_path, runner=runner,
                        train_config=NO_BAR, **kw)


def test_lr_is_chosen_on_mean_validation_loss_over_selection_seeds_and_never_reused(tmp_path):
    runner = StubRunner()
    records = _grid(tmp_path, runner, arms=["lora"])
    selection = [c for c in runner.calls if c[2] in (100, 101)]
    assert sorted(selection) == sorted(("lora", "rotten_tomatoes", s, 8, lr) for s in (100, 101)
                                       for lr in (1e-4, 2e-4, 4e-4, 8e-4))
    assert [c[2:] for c in runner.calls if c[2] in (0, 1)] == [(0, 8, 4e-4), (1, 8, 4e-4)]  # test seeds run anew
    assert {r["seed"] for r in records} == {0, 1} and {r["lr"] for r in records} == {4e-4}
    record = records[0]
    assert record["protocol"] == 2 and record["arm"] == "lora" and record["excluded_from_average"] is False
    assert record["selected_by"] == "val_loss mean over seeds 100,101; grid 0.0001..0.0008 (4 points, factor 2)"
    assert record["lr_extensions"] == 0 and record["selection_seeds"] == [100, 101]
    assert len(load_records(tmp_path / "lr_search.json")) == 8
    assert all(r["seed"] in (100, 101) for r in load_records(tmp_path / "lr_search.json"))
    # selection runs never touch the test set; test runs do
    assert [t for c, t in zip(runner.calls, runner.tested) if c[2] in (100, 101)] == [False] * 8
    assert [t for c, t in zip(runner.calls, runner.tested) if c[2] in (0, 1)] == [True, True]


def test_a_choice_at_the_grid_edge_extends_the_grid_until_it_is_inside(tmp_path):
    runner = StubRunner(best={"lora": 2.5e-5})  # two halvings below the grid
    records = _grid(tmp_path, runner, arms=["lora"], seeds=[0])
    assert records[0]["lr"] == 2.5e-5 and records[0]["lr_extensions"] == 3  # 5e-5, 2.5e-5, then 1.25e-5 to bracket
    assert records[0]["lr_grid"] == [1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4]
    assert records[0]["lr_at_edge"] is False and "extended 3x past an edge" in records[0]["selected_by"]
    tried = {c[4] for c in runner.calls if c[2] == 100}
    assert tried == set(records[0]["lr_grid"])


def test_extension_stops_after_max_extensions_and_says_the_choice_is_still_at_the_edge(tmp_path):
    runner = StubRunner(best={"lora": 1e-1})
    records = _grid(tmp_path, runner, arms=["lora"], seeds=[0], max_extensions=2)
    assert records[0]["lr"] == 3.2e-3 and records[0]["lr_extensions"] == 2
    assert records[0]["lr_at_edge"] is True and records[0]["selected_by"].endswith("still at the grid's edge")


def test_one_lr_skips_the_search(tmp_path):
    runner = StubRunner()
    records = _grid(tmp_path, runner, arms=["lora"], lr_grid={"lora": (1e-3,)})
    assert [c[2] for c in runner.calls] == [0, 1]
    assert records[0]["selected_by"] == "fixed lr (no search)"


def test_killed_grid_resumes_without_recomputing_finished_runs(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _grid(tmp_path, StubRunner(fail_on_call=10))  # during lora's test seeds
    runner = StubRunner()
    records = _grid(tmp_path, runner)
    assert len(records) == 4
    assert ("lora", "rotten_tomatoes", 0, 8, 4e-4) not in runner.calls  # finished before the kill
    assert len([c for c in runner.calls if c[0] == "lora"]) == 1 and len(runner.calls) == 1 + 8 + 2
    again = StubRunner()
    _grid(tmp_path, again)
    assert again.calls == []


def test_two_workers_split_the_units_and_merge_into_one_results_file(tmp_path):
    arms = ["lora", "rslora", "gora"]
    runners = [StubRunner(), StubRunner()]
    for index, runner in enumerate(runners):
        _grid(tmp_path, runner, arms=arms, worker=(index, 2), lr_grid={a: (1e-4, 2e-4, 4e-4, 8e-4) for a in arms})
    assert {c[0] for c in runners[0].calls} == {"lora", "gora"} and {c[0] for c in runners[1].calls} == {"rslora"}
    merged = load_records(tmp_path / "results.json")
    assert sorted((r["arm"], r["seed"]) for r in merged) == sorted((a, s) for a in arms for s in (0, 1))
    assert len(load_records(tmp_path / "lr_search.json")) == 3 * 8
    assert len(load_records(tmp_path / "results.worker1of2.json")) == 2
    single = StubRunner()  # a single worker resuming the folder finds everything done
    _grid(tmp_path, single, arms=arms, lr_grid={a: (1e-4, 2e-4, 4e-4, 8e-4) for a in arms})
    assert single.calls == []


def test_a_damaged_worker_file_is_refused(tmp_path):
    _grid(tmp_path, StubRunner(), arms=["lora"], worker=(0, 2))
    (tmp_path / "results.worker0of2.json").write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        _grid(tmp_path, StubRunner(), arms=["lora"], worker=(0, 2))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seeds": [0, 100]}, r"Selection seeds \[100\] are also test seeds"),
    ({"selection_seeds": [100]}, r">= 2 selection seeds"),
    ({"arms": ["lorra"]}, r"Unknown arm\(s\) \['lorra'\] in --arms \(did you mean 'lora'\?\)"),
    ({"worker": (2, 2)}, r"worker must be"),
    ({"max_extensions": -1}, r"max_extensions"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    out, runner = tmp_path / "g", StubRunner()
    with pytest.raises(GoraConfigError, match=message):
        _grid(out, runner, **kwargs)
    assert runner.calls == [] and not out.exists()


def test_a_protocol_1_folder_is_not_resumed_as_protocol_2(tmp_path):
    from gora.bench.grid import run_grid

    class V1Stub:
        def run(self, method, task, seed, r, lr):
            return {"method": method, "task": task, "seed": seed, "r": r, "lr": lr, "value": 0.5, "val_value": 0.5}

    run_grid(["lora"], ["rotten_tomatoes"], [0], out_dir=tmp_path, runner=V1Stub(), lr_grid={"lora": (1e-3,)},
             train_config=TrainConfig(progress=False))
    with pytest.raises(GoraConfigError, match="other settings"):
        _grid(tmp_path, StubRunner(), arms=["lora"])


def test_head_warmup_arms_are_refused_clearly_when_the_core_lacks_the_field(tmp_path, monkeypatch):
    from gora.bench import protocol2

    monkeypatch.setattr(protocol2, "has_gora_field", lambda name: False)
    with pytest.raises(GoraConfigError, match=r"need GoraConfig.head_warmup_steps"):
        _grid(tmp_path / "g", StubRunner(), arms=["lora", *HEAD_WARMUP_ARMS])


def test_default_arms_are_the_ten_controlled_comparisons():
    assert DEFAULT_ARMS == ("lora", "rslora", "rslora_loraplus", "gora", "gora_loraplus", "gora_gamma0",
                            "gora_fixed_rank", "gora_head_warmup", "gora_adaptive_gamma", "gora_warmup_adaptive")


def test_worker_option_parses_and_refuses_bad_forms():
    assert parse_worker("1/2") == (1, 2)
    for text in ("2/2", "a/b", "1"):
        with pytest.raises(GoraConfigError, match="I/N"):
            parse_worker(text)


@pytest.mark.parametrize(("steps", "points"), [(200, [25, 50, 100, 200]), (60, [25, 50, 60]), (25, [25]),
                                               (10, [10]), (500, [25, 50, 100, 200, 400, 500])])
def test_curve_checkpoints_double_from_25_and_end_at_the_last_step(steps, points):
    assert checkpoint_steps(steps) == points


def test_protocol_1_settings_leave_out_the_protocol_2_fields_at_their_defaults():
    from gora.bench.builders import MethodConfig
    from gora.bench.grid import grid_settings
    from gora.bench.runner import DataConfig

    settings = grid_settings(TrainConfig(), MethodConfig(), DataConfig(), 2.0)
    assert not any(k in settings for k in ("train.steps", "train.curve", "method.head_lr",
                                          "method.gora_eval_batches", "method.gora_head_warmup_steps"))
