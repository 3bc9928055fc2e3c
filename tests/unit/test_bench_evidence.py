"""Paired evidence of a protocol-v2 study: reference statistics, pairing by seed, automatic exclusions, files."""

import json
import math

import pytest

from gora.bench import evidence
from gora.bench.records import save_records


def rec(arm, task, seed, value, *, majority=0.5, lr=1e-3, metric="accuracy", curve=None, **extra):
    return {"method": arm.split("_")[0], "arm": arm, "task": task, "seed": seed, "value": value, "metric": metric,
            "majority_rate": majority, "lr": lr, "r": 8, "protocol": 2, "curve": curve or [], **extra}


def test_t_interval_matches_reference_values():
    mean, low, high = evidence.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} * s / sqrt(n)
    assert mean == 3.0 and low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    assert evidence.t_quantile_975(1) == 12.706 and evidence.t_quantile_975(100) == 1.960
    assert evidence.mean_interval([0.7]) == (0.7, -math.inf, math.inf)


def test_differences_are_paired_by_seed_and_unpaired_seeds_are_dropped():
    records = [rec("rslora", "t", s, 0.80 + 0.01 * s) for s in range(5)]
    records += [rec("gora", "t", s, 0.80 + 0.01 * s + d) for s, d in enumerate([0.01, 0.02, 0.01, 0.02, 0.01])]
    records.append(rec("gora", "t", 9, 0.10))  # no rslora run with seed 9: not paired, not counted
    (entry,) = [e for e in evidence.paired_differences(records, ["rslora"]) if e["task"] == "t"]
    assert entry["n_seeds"] == 5 and entry["mean_diff"] == pytest.approx(0.014)
    assert entry["ci_low"] > 0 and evidence.verdict(entry) == "helps"
    # Unpaired, the seed-to-seed spread (0.04) would swamp the 0.014 difference; paired, it cancels.


def test_verdicts_follow_the_metric_direction_and_intervals_containing_zero_tie():
    base = {"ci_low": -0.02, "ci_high": -0.01, "metric": "accuracy"}
    assert evidence.verdict(base) == "hurts"
    assert evidence.verdict({**base, "metric": "answer_loss"}) == "helps"  # lower loss is better
    assert evidence.verdict({**base, "ci_high": 0.01}) == "tie"
    assert evidence.verdict({**base, "ci_low": None}) == "tie"


def test_unlearned_and_saturated_tasks_leave_averages_but_are_reported():
    records = []
    for s in range(3):
        records += [rec("lora", "learned", s, 0.70 + 0.01 * s), rec("gora", "learned", s, 0.72 + 0.01 * s)]
        records += [rec("lora", "learned2", s, 0.60), rec("gora", "learned2", s, 0.64)]
        records += [rec("lora", "unlearned", s, 0.33, majority=0.34), rec("gora", "unlearned", s, 0.30,
                                                                          majority=0.34)]
        records += [rec("lora", "saturated", s, 0.999), rec("gora", "saturated", s, 0.997)]
    excluded = evidence.excluded_tasks(records)
    assert set(excluded) == {"unlearned", "saturated"}
    entries = {e["task"]: e for e in evidence.paired_differences(records, ["lora"])}
    assert entries["unlearned"]["excluded_from_average"] and entries["saturated"]["excluded_from_average"]
    assert entries["average"]["tasks"] == ["learned", "learned2"]
    assert entries["average"]["mean_diff"] == pytest.approx(0.03)


def test_one_task_left_has_no_average_row_that_would_repeat_it():
    records = [rec(arm, "t", s, 0.7 + 0.01 * s + (arm == "gora") * 0.02) for s in range(3) for arm in ("lora", "gora")]
    records += [rec(arm, "unlearned", s, 0.3, majority=0.34) for s in range(3) for arm in ("lora", "gora")]
    tasks = [e["task"] for e in evidence.paired_differences(records, ["lora"])]
    assert sorted(tasks) == ["t", "unlearned"]


def test_average_is_over_seeds_of_the_per_seed_mean_across_tasks():
    records = []
    for s, (da, db) in enumerate([(0.01, 0.03), (0.02, 0.00), (0.00, 0.04)]):
        records += [rec("rslora", "a", s, 0.6), rec("gora", "a", s, 0.6 + da)]
        records += [rec("rslora", "b", s, 0.7), rec("gora", "b", s, 0.7 + db)]
    average = [e for e in evidence.paired_differences(records, ["rslora"]) if e["task"] == "average"][0]
    per_seed = [0.02, 0.01, 0.02]
    mean, low, high = evidence.mean_interval(per_seed)
    assert average["n_seeds"] == 3
    assert (average["mean_diff"], average["ci_low"], average["ci_high"]) == pytest.approx((mean, low, high))


def test_write_evidence_reads_worker_parts_once_and_writes_table_and_plots(tmp_path):
    curve = [{"step": 25, "train_loss": 0.7, "val_loss": 0.69, "val_metric": 0.5},
             {"step": 50, "train_loss": 0.6, "val_loss": 0.60, "val_metric": 0.7}]
    results = [rec(arm, "t", s, 0.7 + (0.01 if arm == "gora" else 0) + 0.001 * s, curve=curve)
               for arm in ("lora", "rslora", "gora") for s in range(3)]
    save_records(tmp_path / "results.w0.json", results[:5])
    save_records(tmp_path / "results.w1.json", results[3:])  # overlaps the first part: counted once
    selection = [rec(arm, "t", s, 0.0, lr=lr, val_loss=0.6 + abs(math.log10(lr) + 3), val_value=0.7, curve=curve)
                 for arm in ("lora", "rslora", "gora") for s in (100, 101) for lr in (5e-4, 1e-3, 2e-3)]
    save_records(tmp_path / "lr_search.json", selection)
    written = evidence.write_evidence(tmp_path)
    assert set(written) == {"paired.json", "paired.md", "arms.md", "paired_differences.png", "lr_sensitivity.png",
                            "convergence.png"}
    entries = json.loads((tmp_path / "paired.json").read_text())
    gora_vs_lora = [e for e in entries if e["arm"] == "gora" and e["reference"] == "lora" and e["task"] == "t"][0]
    assert gora_vs_lora["n_seeds"] == 3 and gora_vs_lora["mean_diff"] == pytest.approx(0.01)
    assert "| t | gora | lora | 3 | +1.00 |" in (tmp_path / "paired.md").read_text()
    assert evidence.common_lr(selection, "t", ["lora", "rslora", "gora"]) == 1e-3
    assert all(p.stat().st_size > 0 for p in written.values())


def test_an_empty_study_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the study first"):
        evidence.write_evidence(tmp_path)


def test_gora_variants_are_also_paired_against_plain_gora_and_other_arms_are_not():
    records = [rec(arm, "t", s, 0.7 + 0.01 * s) for arm in ("lora", "rslora", "gora", "gora_gamma0") for s in range(3)]
    pairs = {(e["arm"], e["reference"]) for e in evidence.paired_differences(records) if e["task"] == "t"}
    assert ("gora_gamma0", "gora") in pairs
    assert ("lora", "gora") not in pairs and ("rslora", "gora") not in pairs
    assert ("gora", "lora") in pairs and ("gora_gamma0", "rslora") in pairs


def test_gora_with_loraplus_is_also_paired_against_rslora_with_loraplus_and_only_it():
    arms = ("lora", "rslora", "rslora_loraplus", "gora", "gora_loraplus", "gora_gamma0")
    records = [rec(arm, "t", s, 0.7 + 0.01 * s + (0.02 if arm == "gora_loraplus" else 0)) for arm in arms
               for s in range(3)]
    entries = [e for e in evidence.paired_differences(records) if e["task"] == "t"]
    against = {e["arm"] for e in entries if e["reference"] == "rslora_loraplus"}
    assert against == {"gora_loraplus"}
    (entry,) = [e for e in entries if e["reference"] == "rslora_loraplus"]
    assert entry["mean_diff"] == pytest.approx(0.02)
    assert ("rslora_loraplus", "rslora") in {(e["arm"], e["reference"]) for e in entries}


def test_arm_table_reports_the_chosen_lr_scores_and_the_initial_step():
    runs = [rec("gora", "t", s, v, lr=5e-4, lr_grid=[2.5e-4, 5e-4, 1e-3], lr_at_edge=False, val_loss=0.5,
                init_relative_delta=6e-5, init_loss_w0=0.70, init_loss_after=0.69, gamma=0.05)
            for s, v in enumerate([0.70, 0.72])]
    runs += [rec("lora", "t", s, 0.7, lr=2e-3, lr_grid=[5e-4, 2e-3], lr_at_edge=True) for s in range(2)]
    table = evidence.arm_table(runs)
    assert "| t | gora | 2 | 0.0005 (0.00025..0.001) | 71.00 ± 1.41 | 0.5000 | 6.0e-05 | -0.01000 | 0.05 |" in table
    assert "| t | lora | 2 | 0.002 (0.0005..0.002) **at edge** | 70.00 ± 0.00 | — | — | — | — |" in table
    lm = [rec("gora", "g", s, v, metric="answer_loss", exact_match=em) for s, v, em in [(0, 1.0, 0.25), (1, 1.1, 0.0)]]
    # a loss keeps four digits (no points of accuracy); exact match, where runs have it, beside it
    assert "| g | gora | 2 | 0.001 | 1.0500 ± 0.0707 (exact match 12.5 %) |" in evidence.arm_table(lm)


def test_the_bench_command_writes_the_evidence_of_a_folder(tmp_path, capsys):
    from gora.bench.cli import main

    records = [rec(arm, "t", s, 0.7 + 0.01 * s) for arm in ("lora", "rslora", "gora") for s in range(2)]
    save_records(tmp_path / "results.json", records)
    assert main(["evidence", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 0
    assert "paired.md" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "paired.json").read_text())


def test_plots_of_a_loss_only_task_drop_the_accuracy_panel_and_label_short_step_ranges(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(evidence, "_save", lambda fig, path: figures.append(fig))
    curve = [{"step": 25, "val_loss": 1.2, "val_metric": None}, {"step": 32, "val_loss": 1.1, "val_metric": None}]
    selection = [rec(arm, "g", s, 1.1, lr=lr, metric="answer_loss", val_loss=1.1 + lr, val_value=None, curve=curve)
                 for arm in ("lora", "gora") for s in (100, 101) for lr in (2.5e-4, 5e-4)]
    results = [rec(arm, "g", s, 1.1, lr=5e-4, metric="answer_loss", curve=curve) for arm in ("lora", "gora")
               for s in range(3)]
    assert evidence.plot_lr_sensitivity(selection, tmp_path / "lr.png")
    loss_panel, accuracy_panel = figures[0].axes
    assert loss_panel.get_lines() and not accuracy_panel.get_visible()
    assert evidence.plot_convergence(results, selection, tmp_path / "conv.png")
    labels = [t.get_text() for t in figures[1].axes[0].get_xticklabels()]
    assert labels == ["25", "32"]  # less than a decade: the drawn steps are the ticks


def test_difference_axes_name_the_metric_unit():
    accuracy = {"metric": "accuracy"}
    loss = {"metric": "answer_loss"}
    assert evidence.difference_units([accuracy, accuracy]) == "points"
    assert evidence.difference_units([loss]) == "answer_loss, lower is better"
    assert evidence.difference_units([loss, accuracy]) == "answer_loss, lower is better, points"


def test_the_lr_and_convergence_pictures_draw_a_column_for_every_task_up_to_the_cap(tmp_path, monkeypatch):
    curve = [{"step": 25, "train_loss": 0.7, "val_loss": 0.69, "val_metric": 0.5}]
    tasks = [f"task{i}" for i in range(evidence.PLOT_TASKS + 1)]
    results = [rec(arm, t, 0, 0.7, curve=curve) for arm in ("lora", "gora") for t in tasks]
    selection = [rec(arm, t, 100, 0.0, val_loss=0.6, val_value=0.7, curve=curve) for arm in ("lora", "gora")
                 for t in tasks]
    drawn = []
    columns = evidence._task_columns
    monkeypatch.setattr(evidence, "_task_columns", lambda ts: drawn.append(list(ts)) or columns(ts))
    assert evidence.plot_lr_sensitivity(selection, tmp_path / "lr.png")
    assert evidence.plot_convergence(results, selection, tmp_path / "conv.png")
    assert drawn == [tasks[:evidence.PLOT_TASKS]] * 2  # four tasks drawn; the fifth (by name) left to the tables
