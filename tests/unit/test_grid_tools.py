"""The benchmark scripts that run grids in parallel processes and merge their folders (benchmarks/grid/)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

GRID_SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "grid"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"grid_scripts_{name}", GRID_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _record(method, task, seed, lr, val, value=0.5):
    return {"method": method, "task": task, "seed": seed, "lr": lr, "r": 8, "metric": "accuracy", "value": value,
            "val_value": val, "trainable_params": 10, "train_seconds": 1.0}


def _write(folder: Path, records, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(records))
    (folder / "grid_config.json").write_text(json.dumps(config or {"train.epochs": 1.0}))


PLAN = {"common": ["--device", "cpu"], "task_args": {"epistemic": ["--epochs", "4"], "*": ["--epochs", "1"]},
        "studies": [{"name": "s", "methods": ["lora"], "tasks": ["epistemic", "rt"], "seeds": [0, 1, 2],
                     "lrs": {"lora": [1e-3, 2e-3]}, "args": ["--gamma", "0"]},
                    {"name": "one", "methods": ["gora"], "tasks": ["rt"], "seeds": [0, 1],
                     "lrs": {"gora": [5e-4]}}]}


def test_search_runs_first_seed_then_later_seeds_use_the_validation_choice(tmp_path):
    pg = _load("parallel_grid")
    groups = pg.groups_of(PLAN)
    search = groups[0]
    assert [(r.lr, r.seed) for r in search.search] == [(1e-3, 0), (2e-3, 0)]
    assert [(r.lr, r.seed) for r in groups[2].search] == [(5e-4, 0), (5e-4, 1)]  # one rate: every seed at once
    assert pg.later_runs(search, tmp_path) == []  # the search is not finished
    for run, val in zip(search.search, (0.7, 0.9)):
        _write(run.folder(tmp_path), [_record("lora", "epistemic", 0, run.lr, val)])
    later = pg.later_runs(search, tmp_path)
    assert search.chosen == 2e-3 and [(r.lr, r.seed) for r in later] == [(2e-3, 1), (2e-3, 2)]


def test_command_carries_task_and_study_arguments(tmp_path):
    pg = _load("parallel_grid")
    groups = pg.groups_of(PLAN)
    epistemic, rt = groups[0].search[0], groups[1].search[0]
    cmd = pg.command(epistemic, PLAN, PLAN["studies"][0], tmp_path)
    assert cmd[cmd.index("--lr") + 1] == "lora=0.001" and cmd[cmd.index("--seeds") + 1] == "0"
    assert "4" == cmd[cmd.index("--epochs") + 1] and cmd[-3:-2] == ["0"]  # ... --gamma 0 --out-dir FOLDER
    rt_cmd = pg.command(rt, PLAN, PLAN["studies"][0], tmp_path)
    assert rt_cmd[rt_cmd.index("--epochs") + 1] == "1"


def test_merge_study_keeps_chosen_runs_and_every_search_run(tmp_path):
    pg = _load("parallel_grid")
    group = pg.groups_of(PLAN)[0]
    for run, val in zip(group.search, (0.9, 0.7)):
        _write(run.folder(tmp_path), [_record("lora", "epistemic", 0, run.lr, val)])
    for later in pg.later_runs(group, tmp_path):
        _write(later.folder(tmp_path), [_record("lora", "epistemic", later.seed, later.lr, 0.8)])
    pg.merge_study("s", [group], tmp_path)
    merged = tmp_path / "merged" / "s"
    results = json.loads((merged / "results.json").read_text())
    assert [(r["seed"], r["lr"]) for r in results] == [(0, 1e-3), (1, 1e-3), (2, 1e-3)]
    assert len(json.loads((merged / "lr_search.json").read_text())) == 2
    assert len(json.loads((merged / "grid_configs.json").read_text())) == 4


def test_merge_renames_filters_and_refuses_overlaps(tmp_path):
    mr = _load("merge_results")
    _write(tmp_path / "a" / "lora" / "main", [_record("lora", "rt", 0, 1e-3, 0.8), _record("lora", "vc", 0, 1e-3, 0.5)])
    _write(tmp_path / "b" / "gora", [_record("gora", "rt", 0, 5e-4, 0.8, value=0.9)])
    count = mr.merge([tmp_path / "a", Path(f"{tmp_path / 'b'}={{method}}, gamma 0")], tmp_path / "out", tasks=["rt"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert count == 2 and {r["method"] for r in results} == {"lora", "gora, gamma 0"}
    assert (tmp_path / "out" / "table.md").is_file() and (tmp_path / "out" / "grid_configs.json").is_file()
    _write(tmp_path / "c", [_record("lora", "rt", 0, 1e-3, 0.8)])
    with pytest.raises(SystemExit, match="appears twice"):
        mr.merge([tmp_path / "a", tmp_path / "c"], tmp_path / "out2")
