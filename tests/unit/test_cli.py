"""The gora command line: fast help, explained options, clear errors (exit 2, no traceback), delegation."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import types

import pytest

from gora import cli
from gora.cli import checks, passthrough

HEAVY = ("torch", "transformers", "peft", "matplotlib")


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_help_of_gora_and_every_verb_loads_no_heavy_library():
    probe = (
        "import sys, time, contextlib, io\n"
        "start = time.perf_counter()\n"
        "from gora.cli import main\n"
        "for argv in ([], ['--help'], ['init', '--help'], ['inspect', '--help'], ['export', '--help'],\n"
        "             ['bench', '--help'], ['demo', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), time.perf_counter() - start)\n"
    )
    result = _run("-c", probe)
    assert result.returncode == 0, result.stderr
    loaded, seconds = result.stdout.split("]")
    assert loaded == "[", f"--help imported {loaded}]"
    assert float(seconds) < 2.0  # well under a second on an idle machine; generous for a loaded CI box


def test_console_script_answers_help():
    executable = shutil.which("gora")
    if executable is None:
        pytest.skip("the gora console script is not on PATH (package not installed)")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for verb in ("init", "inspect", "export", "bench", "demo"):
        assert verb in result.stdout


def test_python_dash_m_gora_is_the_command_line_and_reports_the_package_version():
    import importlib.metadata

    import gora

    version = _run("-m", "gora", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"gora {gora.__version__}"
    assert importlib.metadata.version("gora-peft") == gora.__version__  # pyproject reads it from gora.__version__
    bare = _run("-m", "gora")  # no verb: the help, exit 2, as the console script
    assert bare.returncode == 2 and "gora init MODEL DATA" in bare.stdout
    failing = _run("-m", "gora", "inspect", "/nonexistent/state")  # errors reach the shell's exit status
    assert failing.returncode == 2 and failing.stderr.startswith("gora: error:")


def test_every_option_of_every_verb_has_a_help_text():
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("init", "inspect", "export"):
        for action in verbs.choices[name]._actions:
            assert action.help, f"gora {name} {action.option_strings or action.dest} has no help"


def test_missing_model_directory_exits_2_with_the_fix_and_no_traceback(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,1\n")
    result = _run("-m", "gora.cli", "init", str(tmp_path / "nowhere"), str(data), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("gora: error:") and "save_pretrained" in result.stderr
    assert "Traceback" not in result.stderr


def _model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return str(tmp_path / "model")


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--num-steps", "0"], "--num-steps must be >= 1"),
        (["--min-rank", "9", "--max-rank", "3"], "min_rank"),
        (["--estimator", "sketch"], "importance='frobenius'"),
        (["--targets", " , "], "--targets is empty"),
    ],
)
def test_invalid_init_options_exit_2_before_any_model_is_loaded(tmp_path, capsys, argv_tail, message):
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,1\n")
    status = cli.main(["init", _model_dir(tmp_path), str(data), "-o", str(tmp_path / "out"), *argv_tail])
    assert status == 2
    assert message in capsys.readouterr().err


def test_data_file_without_text_column_names_the_columns(tmp_path, capsys):
    data = tmp_path / "data.csv"
    data.write_text("sentence,label\ngood,1\n")
    assert cli.main(["init", _model_dir(tmp_path), str(data), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "['label', 'sentence']" in err and "'text'" in err


def test_inspect_refuses_a_directory_without_state_or_sidecar(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "gora_state.json" in capsys.readouterr().err


def test_inspect_of_a_damaged_sidecar_says_to_export_again(tmp_path, capsys):
    (tmp_path / "gora_config.json").write_text(json.dumps({"ranks": {"a": "x"}, "format": "gora-adapter",
                                                           "format_version": 1}))
    assert cli.main(["inspect", str(tmp_path), "--no-plot"]) == 2
    assert "export the adapter again" in capsys.readouterr().err


def test_inspect_prints_the_sidecar_rank_table_and_budget(tmp_path, capsys):
    sidecar = {"ranks": {"model.layers.0.q_proj": 6, "model.layers.0.v_proj": 0, "model.layers.1.q_proj": 10},
               "importance": {"model.layers.0.q_proj": 0.5, "model.layers.1.q_proj": 1.5},
               "budget": 1024, "actual_params": 960, "r": 8, "num_steps": 32, "num_samples": 256, "gamma": 0.05,
               "format": "gora-adapter", "format_version": 1}
    (tmp_path / "gora_config.json").write_text(json.dumps(sidecar))
    assert cli.main(["inspect", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.q_proj" in out and "budget 1,024 params" in out and "actual 960 (93.8%)" in out
    assert "ranks 6..10 over 2 layers" in out


def test_inspect_and_init_print_the_same_module_rows_a_layer_without_gradient_with_its_reason(tmp_path, capsys):
    from gora import GoraState

    from test_state_files import full_state

    saved = tmp_path / "state"
    full_state().save(saved)  # a layer with no gradient, one tied head
    assert cli.main(["inspect", str(saved), "--no-plot"]) == 0
    inspected = capsys.readouterr().out.splitlines()
    summary = GoraState.load(saved).summary().splitlines()
    rows = len(summary) - 2  # the summary's footer: the budget line and the initial step's
    assert inspected[:rows] == summary[:rows] and inspected[rows].startswith("budget ")
    assert [row.split()[-1] for row in summary[1:rows]] == ["0.25", "0.75", "gradient", "embeddings"]


def test_inspect_without_matplotlib_skips_the_default_plot_and_refuses_an_asked_for_one(tmp_path, monkeypatch,
                                                                                         capsys):
    (tmp_path / "gora_config.json").write_text(json.dumps({"ranks": {"model.layers.0.q_proj": 6},
                                                           "format": "gora-adapter", "format_version": 1}))
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails: not installed
    assert cli.main(["inspect", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "model.layers.0.q_proj" in captured.out and "rank plot skipped" in captured.err
    assert "needs matplotlib" in captured.err and not (tmp_path / "gora_ranks.png").exists()
    assert cli.main(["inspect", str(tmp_path), "--plot", str(tmp_path / "r.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err and not (tmp_path / "r.png").exists()


def _fake_bench(monkeypatch, main):
    module = types.ModuleType("gora.bench.cli")
    if main is not None:
        module.main = main
    real_import = passthrough.importlib.import_module
    monkeypatch.setattr(passthrough.importlib, "import_module",
                        lambda name: module if name == "gora.bench.cli" else real_import(name))


def test_bench_and_demo_hand_their_arguments_to_gora_bench(monkeypatch):
    calls = []
    _fake_bench(monkeypatch, lambda argv: calls.append(list(argv)) or 0)
    assert cli.main(["bench", "grid", "--methods", "lora", "gora"]) == 0
    assert cli.main(["demo", "--max-train", "64"]) == 0
    assert calls == [["grid", "--methods", "lora", "gora"], ["demo", "--max-train", "64"]]


def test_bench_without_gora_bench_exits_2_with_an_install_hint(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(passthrough.importlib, "import_module", missing)
    assert cli.main(["bench", "grid"]) == 2
    assert "gora-peft[bench]" in capsys.readouterr().err


def test_bench_returns_gora_bench_exit_status(monkeypatch):
    _fake_bench(monkeypatch, lambda argv: 3)
    assert cli.main(["bench", "report", "x"]) == 3


def test_targets_accept_names_and_all_linear():
    assert checks.parse_targets("query, value,dense") == ["query", "value", "dense"]
    assert checks.parse_targets("all-linear") == "all-linear"


def test_model_directory_without_a_tokenizer_exits_2_with_the_fix(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=8)).save_pretrained(tmp_path / "model")
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,1\n")
    assert cli.main(["init", str(tmp_path / "model"), str(data), "-o", str(tmp_path / "out")]) == 2
    assert "tokenizer.save_pretrained" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["auto", "causal-lm"])
def test_text_without_labels_on_a_model_that_is_no_causal_lm_is_refused_naming_the_label_column(tmp_path, capsys,
                                                                                               task):
    model = _model_dir(tmp_path)
    (tmp_path / "model" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    data = tmp_path / "data.csv"
    data.write_text("text\ngood film\n")
    assert cli.main(["init", model, str(data), "-o", str(tmp_path / "out"), "--task", task]) == 2
    err = capsys.readouterr().err
    assert "holds a BertModel, not a causal language model" in err and "add a 'label' column" in err
    assert ("has no 'label' column" in err) == (task == "auto")
    assert not (tmp_path / "out").exists()
