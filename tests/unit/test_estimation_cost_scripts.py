"""The estimation-cost benchmark scripts (benchmarks/estimation_cost/): their plan, memory guard and tables."""

import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "estimation_cost"


@pytest.fixture(scope="module")
def scripts():
    names = ("env", "run", "models", "methods", "report", "dispatch", "host_add", "host_overhead", "worker")
    sys.path.insert(0, str(SCRIPTS))  # the scripts import each other by name, as they do when run
    try:
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(SCRIPTS))
        for name in names:  # generic names: leave none behind for other tests
            sys.modules.pop(name, None)


def test_markdown_table_renders_one_row_per_record(scripts):
    text = scripts["env"].markdown_table([("a", lambda r: r["a"]), ("b×2", lambda r: f"{2 * r['b']:.1f}")],
                                         [{"a": "x", "b": 1}, {"a": "y", "b": 2.5}])
    assert text == "| a | b×2 |\n|---|---|\n| x | 2.0 |\n| y | 5.0 |"


def test_alternated_best_times_every_function_in_turn_after_a_warm_up_each(scripts):
    calls = []
    best = scripts["env"].alternated_best({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3,
                                          setup=lambda: calls.append("setup"))
    assert calls == ["setup", "a", "setup", "a", "setup", "b", "setup", "b"] * 3
    assert set(best) == {"a", "b"} and all(0 <= seconds < 1 for seconds in best.values())


def test_write_results_writes_json_and_table(scripts, tmp_path, capsys):
    import json

    scripts["env"].write_results(tmp_path / "out", {"date": "d"}, [{"k": 1}], "table\n")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"environment": {"date": "d"},
                                                                           "records": [{"k": 1}]}
    assert (tmp_path / "out" / "table.md").read_text() == "table\n"
    assert capsys.readouterr().out == "table\n\n"


def test_environment_names_versions_and_the_gpu_only_on_cuda(scripts):
    import torch

    env = scripts["env"].environment("cpu")
    assert env["torch"] == torch.__version__ and "gpu" not in env
    assert {"date", "python", "transformers", "peft", "cpu", "cpu_count", "commit", "command"} <= set(env)
    assert env["command"].split()[0] == "python"  # no machine path of the interpreter in committed results


def test_environment_names_the_gpu_on_cuda_as_torch_reports_it(scripts, monkeypatch):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch's own answers, faked: runs on any machine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        total_memory=80 * 2**30))
    env = scripts["env"].environment("cuda")
    assert env["gpu"] == "Fake GPU 80GB" and env["gpu_memory_bytes"] == 80 * 2**30
    assert "gpu" not in scripts["env"].environment("cpu")  # a CPU run names no GPU even where one exists


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_environment_names_the_real_gpu_on_cuda(scripts):
    import torch

    env = scripts["env"].environment("cuda")
    assert env["gpu"] == torch.cuda.get_device_name(0) and env["gpu"]
    assert env["gpu_memory_bytes"] == torch.cuda.get_device_properties(0).total_memory > 0


def test_machine_line_names_date_versions_cores_threads_load_and_commit(scripts):
    env = {"date": "2026-11-23", "torch": "2.13.0", "cpu": "AMD EPYC", "cpu_count": 2, "load_average": (1.0, 0.5, 0.2),
           "commit": "abc1234"}
    assert scripts["env"].machine_line(env) == ("2026-11-23; torch 2.13.0; AMD EPYC (2 CPUs); load average "
                                                "(1.0, 0.5, 0.2); commit abc1234.")
    assert "(2 CPUs, 1 torch threads)" in scripts["env"].machine_line({**env, "torch_threads": 1})


def test_dispatch_table_row(scripts):
    record = {"size": "minilm", "dtype": "float32", "estimator": "full", "layers": 37, "floor_ops_per_step": 690.2,
              "added_ops_per_step": 60.0, "added_launches_per_step": 50.0, "added_launches_per_layer_step": 50 / 37,
              "fixed_launches": 556}
    assert scripts["dispatch"].table([record]).splitlines()[-1] == \
        "| minilm | float32 | full | 37 | 690 | 60.0 | 50.0 | **1.35** | 556 |"


def test_plan_orders_sections_and_sizes_as_asked(scripts):
    args = scripts["run"].parse_args(["--device", "cpu", "--out", "x", "--sections", "scale,time",
                                      "--sizes", "llama-tiny", "--methods", "lora,gora", "--steps", "3"])
    specs = scripts["run"].plan(args)
    assert [s["section"] for s in specs] == ["time"] + ["scale"] * 2  # the CPU order: time before scale
    assert specs[0]["method"] == "gora" and specs[0]["reps"] == 3  # lora is no time-section method
    assert [(s["method"], s["size"], s["steps"]) for s in specs[1:]] == [("lora", "llama-tiny", 3),
                                                                          ("gora", "llama-tiny", 3)]
    assert all(s["threads"] == 1 and s["dtype"] == "float32" for s in specs)


def test_plan_time_section_all_methods_and_more_rounds(scripts):
    specs = scripts["run"].plan(scripts["run"].parse_args(["--out", "x", "--sections", "time", "--time-reps", "15"]))
    assert [s["method"] for s in specs] == ["gora", "gora_sketch", "gora_ckpt", "loraga", "official"]
    assert all(s["reps"] == 15 for s in specs)


def test_plan_cuda_defaults_give_every_ratio_an_interval(scripts):
    """On a GPU 3 rounds moved single ratios by a third: the CUDA defaults take enough rounds for a 95 % interval."""
    run = scripts["run"]
    specs = run.plan(run.parse_args(["--out", "x", "--device", "cuda", "--sections", "time,scale"]))
    timed = [s for s in specs if s["method"] != "lora"]
    assert timed and all(s["reps"] >= 6 for s in timed)
    assert scripts["env"].median_interval(list(range(min(s["reps"] for s in timed)))) is not None
    overridden = run.plan(run.parse_args(["--out", "x", "--device", "cuda", "--sections", "scale", "--reps", "2"]))
    assert {s["reps"] for s in overridden} == {2}


def test_median_interval_is_the_binomial_order_statistic_interval(scripts):
    interval = scripts["env"].median_interval
    assert interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 5 draws: even (min, max) covers only 93.75 %
    assert interval([6, 1, 5, 2, 4, 3]) == (1, 6)  # 6 draws: (min, max) covers 1 - 2/64 = 96.9 %
    assert interval(list(range(12, 0, -1))) == (3, 10)  # 12: P(B <= 2) = 79/4096, so (3rd, 10th) covers 96.1 %
    assert interval(list(range(12)), level=0.5) == (4, 7)  # 0.5 level: P(B <= 4) = 794/4096, (5th, 8th) covers 61 %


def test_memory_guard_charges_what_each_method_keeps(scripts):
    params, targets = scripts["models"].parameter_count(scripts["models"].SHAPES["llama-3.2-3b"])
    need = {m: scripts["run"].predicted_host_bytes({"size": "llama-3.2-3b", "dtype": "float32", "method": m,
                                                    "steps": 2}) for m in ("lora", "gora", "official")}
    assert need["gora"] - need["lora"] == 4 * targets  # fp32 sums
    assert need["official"] - need["lora"] == 4 * targets  # its running sums, parameter dtype (divided in place)


def _scale_record(scripts, method: str, size: str, params: float, steps: int, ratios: list[float] | None) -> dict:
    record = {"status": "ok", "section": "scale", "method": method, "size": size, "params": params,
              "target_params": params / 4, "steps": steps, "device": "cpu", "dtype": "float32", "batch": 2, "seq": 64,
              "host_peak_rss_bytes": int(params * 5), "threads": 1}
    if ratios:
        record |= {"floor_s": [1.0] * len(ratios), "method_s": ratios, "time_ratio": sorted(ratios)[len(ratios) // 2],
                   "time_ratio_interval": scripts["env"].median_interval(ratios), "step_s": 1.0}
    return record


def test_scale_table_and_plot_show_rounds_and_the_interval(scripts, tmp_path):
    ratios = [1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.14, 1.16]
    records = [_scale_record(scripts, "lora", "s", 1e8, 4, None),
               _scale_record(scripts, "gora", "s", 1e8, 4, ratios),
               _scale_record(scripts, "lora", "m", 1e9, 4, None),
               _scale_record(scripts, "gora", "m", 1e9, 4, ratios[:1])]
    lines = scripts["report"].scale_table(records)
    gora_rows = [line for line in lines if "GoRA full" in line]
    assert gora_rows[0].endswith("| 1.080 | 9 | 1.020–1.140 |")  # 2nd and 8th of 9 sorted ratios
    assert gora_rows[1].endswith("| 1.000 | 1 | – |")  # one round: no interval
    path = scripts["report"].plot(tmp_path, records)  # one N only: no N panel, error bars where there are intervals
    assert path is not None and path.stat().st_size > 0


def test_host_overhead_times_every_variant_and_restores_the_budget(scripts):
    from gora import accumulate

    budget = accumulate.CPU_BATCH_ADD_BYTES
    record = scripts["host_overhead"].measure(layers=3, width=4, batch=2, steps=2, rounds=2)
    assert accumulate.CPU_BATCH_ADD_BYTES == budget  # the benchmark's patch is undone
    for name in ("floor", "drop_hook", "gora_per_hook", "gora_batched", "gora_accelerator_budget"):
        assert len(record["seconds"][name]) == 2 and record[f"{name}_us_per_step"] > 0
    assert record["floor_us_per_layer_over_floor"] == 0.0


def test_official_style_baseline_keeps_one_running_sum_and_sweeps_every_parameter(scripts):
    """The baseline must be what it names: one sum per weight in the parameter dtype (not N copies) and a sweep over
    all parameters in every hook; its mean equals plain autograd's."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import make_bert_batches

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64)).eval()
    batches = make_bert_batches(3)
    targets = ["query", "value"]
    means, estimator = scripts["methods"].run_official(model, targets, batches)
    assert all(isinstance(total, torch.Tensor) for total in estimator.stored.values())  # one tensor, not a list
    assert all(means[name] is total for name, total in estimator.stored.items())  # mean in place, no second copy
    assert set(estimator.counts.values()) == {3} and len(estimator._params) == len(list(model.parameters()))
    for layer in estimator.layers:
        reference = torch.zeros_like(layer.weight, dtype=torch.float64)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            reference += layer.weight.grad.double() / 3
        torch.testing.assert_close(means[layer.name].double(), reference, rtol=1e-5, atol=1e-8)


@pytest.mark.slow  # times three estimators on MiniLM-sized layers
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # PEFT's LoRA-GA hooks on an input without grad
def test_loraga_is_also_timed_against_a_train_mode_floor_with_dropout_on(scripts, monkeypatch):
    """PEFT's LoRA-GA runs its passes in train mode: the time section adds a train-mode floor for it (and only
    for it), run with the model in train mode and restored to eval mode afterwards."""
    worker, methods = scripts["worker"], scripts["methods"]
    modes = []
    run_floor = methods.run_floor

    def recording_floor(model, batches):
        modes.append(model.training)
        return run_floor(model, batches)

    monkeypatch.setattr(methods, "run_floor", recording_floor)
    spec = {"device": "cpu", "dtype": "float32", "section": "time", "size": "minilm", "pretrained": False,
            "steps": 1, "batch": 2, "seq": 8, "reps": 2, "data": "random"}
    out = worker.measure_cost({**spec, "method": "loraga"})
    assert len(out["train_floor_s"]) == len(out["floor_s"]) == len(out["method_s"]) == 2
    assert out["time_ratio_vs_train_floor"] > 0 and out["time_ratio_vs_train_floor_interval"] is None  # 2 rounds
    assert modes.count(True) == 2 and modes.count(False) == 3  # warm-up and 2 eval floors, 2 train floors
    rows = scripts["report"].time_table([{**out, **spec, "method": "loraga", "status": "ok", "weights": "random"}])
    line = next(line for line in rows if line.startswith("| PEFT LoRA-GA"))
    assert f"| {out['time_ratio_vs_train_floor']:.3f} |" in line
    modes.clear()
    out = worker.measure_cost({**spec, "method": "gora"})
    assert "train_floor_s" not in out and True not in modes  # GoRA runs in eval mode: no train-mode floor
