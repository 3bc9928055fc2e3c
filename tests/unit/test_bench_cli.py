"""CLI: every verb answers --help without heavy imports; options become configs."""

import subprocess
import sys

import pytest

from gora.bench.cli import _grid_kwargs, build_parser

VERBS = ("grid", "rank-sweep", "demo", "report", "export-assets")


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m gora.bench " + verb in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = "import sys; from gora.bench.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_grid_options_become_configs():
    args = build_parser().parse_args([
        "grid", "--methods", "lora", "gora", "--out-dir", "x", "--lrs", "1e-4", "2e-4", "--lr", "gora=3e-4",
        "--max-train", "100", "--max-length", "48", "--user-task", "mine", "a.csv", "b.csv", "--gamma", "0.08",
        "--gora-estimator", "sketch", "--gora-importance", "frobenius",
    ])
    kwargs = _grid_kwargs(args, args.methods)
    assert kwargs["lr_grid"] == {"lora": (1e-4, 2e-4), "gora": (3e-4,)}
    assert kwargs["train_config"].max_length == 48 and kwargs["data_config"].max_train == 100
    assert kwargs["data_config"].user_tasks == {"mine": ("a.csv", "b.csv")}
    assert kwargs["method_config"].gora_gamma == 0.08
    assert (kwargs["method_config"].gora_estimator, kwargs["method_config"].gora_importance) == ("sketch", "frobenius")
    defaults = _grid_kwargs(build_parser().parse_args(["grid", "--out-dir", "x"]), ["gora"])["method_config"]
    assert (defaults.gora_estimator, defaults.gora_importance) == ("full", "mean_abs")


def test_bad_lr_option_says_the_expected_form(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["grid", "--out-dir", "x", "--lr", "gora=fast"])
    assert "METHOD=LR[,LR...]" in capsys.readouterr().err


def test_folder_readme_states_command_versions_and_settings_and_keeps_notes(tmp_path):
    import json

    from gora.bench.provenance import write_folder_readme

    (tmp_path / "grid_config.json").write_text(json.dumps({"train.max_length": 64, "data.max_train": 2000}))
    path = write_folder_readme(tmp_path, ["grid", "--out-dir", str(tmp_path)])
    text = path.read_text()
    assert f"`python -m gora.bench grid --out-dir {tmp_path}`" in text
    assert "`data.max_train`: 2000" in text and "transformers " in text and "Device: " in text
    path.write_text("hand-written notes")
    write_folder_readme(tmp_path, ["grid"])
    assert path.read_text() == "hand-written notes"
