"""Grid bookkeeping with a stub runner: resume, lr selection on validation, settings lock, atomic records."""

import json

import pytest

from gora.bench.builders import MethodConfig
from gora.bench.grid import run_grid, select_lr
from gora.bench.records import load_records, save_records
from gora.bench.runner import DataConfig
from gora.bench.train import TrainConfig
from gora.errors import GoraConfigError, GoraDataError

NO_BAR = TrainConfig(progress=False)


class StubRunner:
    """Counts calls; validation accuracy peaks at lr 1e-3, test accuracy encodes the seed."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple] = []
        self.fail_on_call = fail_on_call

    def run(self, method, task, seed, r, lr):
        self.calls.append((method, task, seed, r, lr))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # a killed run
        return {"method": method, "task": task, "seed": seed, "r": r, "lr": lr, "metric": "accuracy",
                "value": 0.5 + seed / 100, "val_value": 1.0 - abs(lr - 1e-3), "trainable_params": 1}


def _grid(tmp_path, runner, seeds=(0, 1), lr_grid=None, **kw):
    return run_grid(["lora", "gora"], ["rotten_tomatoes"], seeds, out_dir=tmp_path, runner=runner,
                    lr_grid=lr_grid or {"lora": (1e-3,), "gora": (1e-3,)}, train_config=NO_BAR, **kw)


def test_every_cell_runs_once_and_is_recorded(tmp_path):
    runner = StubRunner()
    records = _grid(tmp_path, runner)
    assert len(runner.calls) == 4
    assert {(r["method"], r["seed"]) for r in records} == {("lora", 0), ("lora", 1), ("gora", 0), ("gora", 1)}
    assert load_records(tmp_path / "results.json") == records


def test_finished_cells_are_not_recomputed(tmp_path):
    save_records(tmp_path / "results.json", [
        {"method": "lora", "task": "rotten_tomatoes", "seed": 0, "r": 8, "lr": 1e-3, "value": 0.9, "val_value": 0.9},
    ])
    runner = StubRunner()
    records = _grid(tmp_path, runner)
    assert ("lora", "rotten_tomatoes", 0, 8, 1e-3) not in runner.calls
    assert len(runner.calls) == 3
    kept = next(r for r in records if r["method"] == "lora" and r["seed"] == 0)
    assert kept["value"] == 0.9


def test_killed_grid_keeps_finished_cells_and_resumes_the_rest(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _grid(tmp_path, StubRunner(fail_on_call=3))
    assert len(load_records(tmp_path / "results.json")) == 2
    runner = StubRunner()
    assert len(_grid(tmp_path, runner)) == 4
    assert len(runner.calls) == 2


def test_lr_is_chosen_on_validation_and_first_seed_run_is_reused(tmp_path):
    runner = StubRunner()
    records = run_grid(["lora"], ["epistemic"], [0, 1], out_dir=tmp_path, runner=runner,
                       lr_grid={"lora": (1e-4, 1e-3, 1e-2)}, train_config=NO_BAR)
    assert [c[4] for c in runner.calls] == [1e-4, 1e-3, 1e-2, 1e-3]  # three seed-0 searches, then seed 1
    assert [c[2] for c in runner.calls] == [0, 0, 0, 1]
    assert {r["lr"] for r in records} == {1e-3}
    assert len(load_records(tmp_path / "lr_search.json")) == 3


def test_lr_search_runs_are_not_repeated_on_resume(tmp_path):
    lr_grid = {"lora": (1e-4, 1e-3)}
    run_grid(["lora"], ["epistemic"], [0], out_dir=tmp_path, runner=StubRunner(), lr_grid=lr_grid,
             train_config=NO_BAR)
    runner = StubRunner()
    run_grid(["lora"], ["epistemic"], [0, 1], out_dir=tmp_path, runner=runner, lr_grid=lr_grid,
             train_config=NO_BAR)
    assert runner.calls == [("lora", "epistemic", 1, 8, 1e-3)]


def test_select_lr_prefers_best_validation_then_earliest():
    runs = [{"lr": 1, "val_value": 0.7}, {"lr": 2, "val_value": 0.8}, {"lr": 3, "val_value": 0.8}]
    assert select_lr(runs)["lr"] == 2


def test_full_runs_once_per_task_with_rank_none(tmp_path):
    runner = StubRunner()
    run_grid(["full", "lora"], ["epistemic"], [0], out_dir=tmp_path, runner=runner, ranks=(2, 8),
             lr_grid={"full": (1e-5,), "lora": (1e-3,)}, train_config=NO_BAR)
    assert sorted(runner.calls, key=str) == sorted(
        [("full", "epistemic", 0, None, 1e-5), ("lora", "epistemic", 0, 2, 1e-3), ("lora", "epistemic", 0, 8, 1e-3)],
        key=str)


def test_resuming_with_other_settings_is_refused(tmp_path):
    _grid(tmp_path, StubRunner())
    with pytest.raises(GoraConfigError, match="other settings.*max_length"):
        run_grid(["lora"], ["rotten_tomatoes"], [0], out_dir=tmp_path, runner=StubRunner(),
                 train_config=TrainConfig(max_length=128, progress=False))


def test_unknown_method_is_refused_before_any_run(tmp_path):
    runner = StubRunner()
    with pytest.raises(GoraConfigError, match=r"Unknown method\(s\) \['qlora'\].*known methods: full, lora"):
        run_grid(["lora", "qlora"], ["epistemic"], [0], out_dir=tmp_path / "g", runner=runner)
    assert runner.calls == []
    assert not (tmp_path / "g").exists()


def test_records_file_holds_valid_json_without_nan(tmp_path):
    path = tmp_path / "r.json"
    save_records(path, [{"method": "lora", "value": float("nan")}])
    assert json.loads(path.read_text()) == [{"method": "lora", "value": None}]
    assert not (tmp_path / "r.json.tmp").exists()


def test_load_records_accepts_dict_with_records_and_rejects_other_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"records": [{"method": "lora"}]}))
    assert load_records(path) == [{"method": "lora"}]
    path.write_text(json.dumps({"method": "lora"}))
    with pytest.raises(GoraDataError, match="not a JSON list"):
        load_records(path)


def test_every_registered_method_has_a_default_lr_grid():
    from gora.bench.grid import DEFAULT_LR_GRID
    from gora.bench.methods import METHODS

    assert set(DEFAULT_LR_GRID) == set(METHODS)
    assert all(len(rates) >= 2 for rates in DEFAULT_LR_GRID.values())


def test_no_progress_reaches_gora_estimation_and_does_not_lock_the_folder(tmp_path, monkeypatch):
    from gora.bench import grid as grid_module

    seen = []

    class CapturingRunner(StubRunner):
        def __init__(self, train_config, method_config, *args, **kwargs):
            super().__init__()
            seen.append(method_config.show_progress)

    monkeypatch.setattr(grid_module, "CellRunner", CapturingRunner)
    run_grid(["gora"], ["rotten_tomatoes"], [0], out_dir=tmp_path, lr_grid={"gora": (1e-3,)}, train_config=NO_BAR)
    run_grid(["gora"], ["rotten_tomatoes"], [0, 1], out_dir=tmp_path, lr_grid={"gora": (1e-3,)},
             train_config=TrainConfig(progress=True))  # the bar is not a setting: resuming with it is allowed
    assert seen == [False, True]


# ---------------------------------------------------------------- refusals come before anything is written


def test_unknown_task_is_refused_naming_it_and_the_known_tasks_and_nothing_is_written(tmp_path):
    runner, out = StubRunner(), tmp_path / "g3"
    with pytest.raises(GoraConfigError, match=r"Unknown task\(s\) \['nosuchtask'\].*built-in tasks: rotten_tomatoes, "
                                              r"vitaminc, multiemo, epistemic.*--user-task"):
        run_grid(["lora"], ["nosuchtask"], [0], out_dir=out, runner=runner, train_config=NO_BAR)
    assert runner.calls == []
    assert not out.exists()


def test_near_miss_names_get_a_suggestion(tmp_path):
    with pytest.raises(GoraConfigError, match="did you mean 'lora'"):
        run_grid(["lorra"], ["epistemic"], [0], out_dir=tmp_path / "g", runner=StubRunner())
    with pytest.raises(GoraConfigError, match="did you mean 'rotten_tomatoes'"):
        run_grid(["lora"], ["rotten_tomato"], [0], out_dir=tmp_path / "g", runner=StubRunner())
    assert not (tmp_path / "g").exists()


def test_a_refused_run_does_not_block_the_corrected_run_with_other_settings(tmp_path):
    out = tmp_path / "g3"
    with pytest.raises(GoraConfigError, match="nosuchtask"):
        run_grid(["lora"], ["nosuchtask"], [0], out_dir=out, runner=StubRunner(), lr_grid={"lora": (1e-3,)},
                 train_config=NO_BAR)
    runner = StubRunner()
    records = run_grid(["lora"], ["epistemic"], [0], out_dir=out, runner=runner, lr_grid={"lora": (1e-3,)},
                       train_config=TrainConfig(max_length=128, progress=False))
    assert runner.calls == [("lora", "epistemic", 0, 8, 1e-3)] and len(records) == 1
    assert json.loads((out / "grid_config.json").read_text())["train.max_length"] == 128


def _user_task_config(tmp_path):
    return DataConfig(user_tasks={"mine": (str(tmp_path / "missing_train.csv"), str(tmp_path / "test.csv"))})


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"methods": []}, GoraConfigError, r"one or more methods \(--methods\)"),
    ({"tasks": []}, GoraConfigError, r"one or more tasks \(--tasks\)"),
    ({"methods": "lora"}, GoraConfigError, "Need a list"),
    ({"seeds": []}, GoraConfigError, r"seeds must be .* \(--seeds\)"),
    ({"seeds": [-1]}, GoraConfigError, r"seeds must be .*integers >= 0"),
    ({"ranks": [0]}, GoraConfigError, r"ranks must be .*integers >= 1 \(--ranks\)"),
    ({"ranks": []}, GoraConfigError, "ranks must be"),
    ({"lr_grid": {"lorra": (1e-3,)}}, GoraConfigError, r"Unknown method\(s\) \['lorra'\] in the learning-rate grid"),
    ({"lr_grid": {"lora": ()}}, GoraConfigError, r"No learning rates for method 'lora'.*--lr lora="),
    ({"lr_grid": {"lora": (-1e-3,)}}, GoraConfigError, "finite numbers > 0"),
    ({"lr_grid": {"lora": (float("nan"),)}}, GoraConfigError, "finite numbers > 0"),
    ({"alpha_per_rank": 0.0}, GoraConfigError, "alpha_per_rank must be"),
    ({"methods": ["gora"], "method_config": MethodConfig(gora_min_rank=40)}, GoraConfigError,
     r"GoRA settings.*rank range is \[40, 32\]"),
    ({"methods": ["gora"], "method_config": MethodConfig(gora_estimator="sketch")}, GoraConfigError,
     "GoRA settings.*frobenius"),
    ({"train_config": TrainConfig(device="tpu7", progress=False)}, GoraConfigError, "not a torch device"),
    ({"data_config": "user_task", "tasks": ["mine"]}, GoraDataError, "User task 'mine': train file .* not found"),
])
def test_every_invalid_setting_is_refused_before_anything_is_written(tmp_path, options, error, message):
    options = dict(options)
    if options.get("data_config") == "user_task":
        options["data_config"] = _user_task_config(tmp_path)
    kwargs = {"methods": ["lora"], "tasks": ["epistemic"], "seeds": [0], "train_config": NO_BAR,
              "lr_grid": {"lora": (1e-3,), "gora": (1e-3,)}, **options}
    runner, out = StubRunner(), tmp_path / "g"
    with pytest.raises(error, match=message):
        run_grid(kwargs.pop("methods"), kwargs.pop("tasks"), kwargs.pop("seeds"), out_dir=out, runner=runner, **kwargs)
    assert runner.calls == []
    assert not out.exists()


def test_cuda_on_a_machine_without_it_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GoraConfigError, match="torch sees no CUDA GPU.*--device auto or cpu"):
        run_grid(["lora"], ["epistemic"], [0], out_dir=tmp_path / "g", runner=StubRunner(),
                 train_config=TrainConfig(device="cuda", progress=False))
    assert not (tmp_path / "g").exists()


def test_refusal_leaves_an_existing_folder_as_it_was(tmp_path):
    save_records(tmp_path / "results.json", [{"method": "lora", "task": "epistemic", "seed": 0, "r": 8}])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(GoraConfigError, match="nosuchtask"):
        run_grid(["lora"], ["nosuchtask"], [0], out_dir=tmp_path, runner=StubRunner(), train_config=NO_BAR)
    with pytest.raises(GoraConfigError, match=r"ranks must be"):
        run_grid(["lora"], ["epistemic"], [0], out_dir=tmp_path, runner=StubRunner(), ranks=[0], train_config=NO_BAR)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_damaged_results_file_is_refused_before_the_settings_are_written(tmp_path):
    (tmp_path / "results.json").write_text("[{not json")
    with pytest.raises(GoraDataError, match="results.json is not valid JSON"):
        run_grid(["lora"], ["epistemic"], [0], out_dir=tmp_path, runner=StubRunner(), train_config=NO_BAR)
    assert not (tmp_path / "grid_config.json").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "results"
    path.write_text("x")
    with pytest.raises(GoraConfigError, match="not a folder"):
        run_grid(["lora"], ["epistemic"], [0], out_dir=path, runner=StubRunner(), train_config=NO_BAR)
    assert path.read_text() == "x"


def test_missing_task_data_is_refused_before_any_model_or_data_set_loads(tmp_path, monkeypatch):
    from gora.bench import runner as runner_module

    def never(*args, **kwargs):
        raise AssertionError("nothing may load before the settings are checked")

    for name in ("load_tokenizer", "load_classifier", "load_task", "load_user_task"):
        monkeypatch.setattr(runner_module, name, never)
    out = tmp_path / "g"
    with pytest.raises(GoraDataError, match=r"rotten_tomatoes.csv.gz not found.*export-assets"):
        run_grid(["lora"], ["rotten_tomatoes"], [0], out_dir=out, model_path="unused", train_config=NO_BAR,
                 data_config=DataConfig(data_dir=str(tmp_path / "no_exports")))
    assert not out.exists()
