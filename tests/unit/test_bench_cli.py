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


# ---------------------------------------------------------------- refusals: a message and exit 2, nothing written


@pytest.mark.parametrize(("options", "message"), [
    (["--methods", "lora", "--tasks", "nosuchtask"],
     r"Unknown task\(s\) \['nosuchtask'\].*built-in tasks: rotten_tomatoes, vitaminc, multiemo, epistemic"),
    (["--methods", "lorra"],
     r"Unknown method\(s\) \['lorra'\] in --methods \(did you mean 'lora'\?\); known methods: full, lora"),
    (["--methods", "lora", "--lr", "lorra=1e-3"], r"Unknown method\(s\) \['lorra'\] in the learning-rate grid"),
    (["--methods", "lora", "--ranks", "0"], r"ranks must be .*\(--ranks\)"),
    (["--methods", "gora", "--gora-min-rank", "40"], r"GoRA settings .* rank range is \[40, 32\]"),
    (["--methods", "lora", "--batch-size", "0"], r"--batch-size"),
    (["--methods", "lora", "--max-train", "0"], r"--max-train"),
])
def test_bench_grid_refusal_is_a_gora_error_and_writes_nothing(tmp_path, options, message):
    from gora.bench.cli import main
    from gora.errors import GoraConfigError

    out = tmp_path / "g3"
    with pytest.raises(GoraConfigError, match=message):
        main(["grid", "--protocol", "1", *options, "--out-dir", str(out), "--no-progress", "--no-report"])
    assert not out.exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--arms", "lorra"], r"Unknown arm\(s\) \['lorra'\] in --arms \(did you mean 'lora'\?\); known arms: lora"),
    (["--arms", "lora", "--tasks", "nosuchtask"], r"Unknown task\(s\) \['nosuchtask'\].*clinc150"),
    (["--arms", "lora", "--lr", "lorra=1e-3"], r"Unknown arm\(s\) \['lorra'\] in the learning-rate grid"),
    (["--arms", "lora", "--seeds", "0", "100"], r"Selection seeds \[100\] are also test seeds"),
    (["--arms", "lora", "--selection-seeds", "7"], r">= 2 selection seeds"),
    (["--arms", "lora", "--ranks", "4", "8"], r"one reference rank"),
    (["--arms", "lora", "--ranks", "0"], r"rank must be .*\(--ranks\)"),
    (["--arms", "lora", "--epochs", "2"], r"--epochs: protocol 2 trains a fixed number of --steps"),
    (["--arms", "gora", "--adaptive-gamma"], r"gora_adaptive_gamma"),
    (["--arms", "lora", "--steps", "0"], r"--steps"),
    (["--arms", "lora", "--head-lr", "0"], r"--head-lr"),
    (["--arms", "lora", "--batch-size", "0"], r"--batch-size"),
    (["--arms", "lora", "--worker", "2/2"], r"0 <= I < N"),
    (["--arms", "lora", "--methods", "lora"], r"Pass the arms once"),
])
def test_protocol_2_grid_refusal_writes_nothing(tmp_path, options, message):
    from gora.bench.cli import main
    from gora.errors import GoraConfigError

    out = tmp_path / "g5"
    with pytest.raises(GoraConfigError, match=message):
        main(["grid", *options, "--out-dir", str(out), "--no-progress", "--no-report"])
    assert not out.exists()


def test_protocol_1_refuses_protocol_2_options(tmp_path):
    from gora.bench.cli import main
    from gora.errors import GoraConfigError

    with pytest.raises(GoraConfigError, match=r"--steps, --head-lr: protocol 2 options"):
        main(["grid", "--protocol", "1", "--steps", "10", "--head-lr", "1e-3", "--out-dir", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def test_protocol_2_is_the_default_with_its_sizes(monkeypatch, tmp_path):
    from gora.bench import protocol2
    from gora.bench.cli import main

    seen = {}
    monkeypatch.setattr(protocol2, "run_arm_grid", lambda arms, tasks, seeds, **kw: seen.update(
        arms=arms, tasks=tasks, seeds=seeds, **kw) or [])
    assert main(["grid", "--out-dir", str(tmp_path), "--no-report", "--worker", "1/2"]) == 0
    assert seen["arms"] == list(protocol2.DEFAULT_ARMS) and seen["seeds"] == [0, 1, 2, 3, 4]
    assert seen["selection_seeds"] == (100, 101) and seen["worker"] == (1, 2) and seen["max_extensions"] == 3
    assert seen["train_config"].batch_size == 16 and seen["train_config"].curve is True
    assert seen["method_config"].gora_eval_batches is True and seen["r"] == 8


def test_gora_bench_grid_with_unknown_task_exits_2_with_the_message(tmp_path, capsys):
    from gora.cli import main

    out = tmp_path / "g3"
    code = main(["bench", "grid", "--arms", "lora", "--tasks", "nosuchtask", "--out-dir", str(out),
                 "--no-progress", "--no-report"])
    assert code == 2
    err = capsys.readouterr().err
    assert "gora: error: Unknown task(s) ['nosuchtask']" in err and "Traceback" not in err
    assert not out.exists()


def test_python_m_gora_bench_turns_refusals_into_exit_2(tmp_path, monkeypatch, capsys):
    import runpy

    out = tmp_path / "g4"
    monkeypatch.setattr(sys, "argv", ["gora.bench", "grid", "--protocol", "1", "--methods", "lorra", "--out-dir",
                                      str(out), "--no-progress", "--no-report"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("gora.bench", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 2
    assert "python -m gora.bench: error: Unknown method(s) ['lorra']" in capsys.readouterr().err
    assert not out.exists()
