"""Report: table numbers, plots written, module-name parsing for the rank heatmap."""

import json

import pytest

from gora.bench.report import markdown_table, parse_module_name, rank_matrix, records_frame, write_report

RANKS = {
    "bert.encoder.layer.0.attention.self.query": 4,
    "bert.encoder.layer.0.output.dense": 12,
    "bert.encoder.layer.1.attention.self.query": 8,
    "bert.encoder.layer.1.output.dense": 6,
    "bert.pooler.dense": 32,
}


def _record(method, task, seed, value, params, ranks=None):
    return {"method": method, "task": task, "seed": seed, "metric": "accuracy", "value": value,
            "val_value": value, "trainable_params": params, "train_seconds": 1.0, "lr": 1e-3, "r": 8,
            "lora_alpha": 16, "init_seconds": None, "peak_memory_bytes": 1, "ranks": ranks}


@pytest.fixture
def results(tmp_path):
    records = [
        _record("lora", "rotten_tomatoes", 0, 0.79, 338690),
        _record("lora", "rotten_tomatoes", 1, 0.81, 338690),
        _record("lora", "epistemic", 0, 0.60, 338690),
        _record("lora", "epistemic", 1, 0.70, 338690),
        _record("gora", "rotten_tomatoes", 0, 0.82, 300000, RANKS),
        _record("gora", "rotten_tomatoes", 1, 0.84, 302000, {**RANKS, "bert.pooler.dense": 30}),
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    return path


def _row(table: str, method: str) -> list[str]:
    line = next(row for row in table.splitlines() if row.startswith(f"| {method} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_gives_mean_and_sample_std_per_method_and_task(results):
    table = markdown_table(records_frame(json.loads(results.read_text())))
    lora = _row(table, "lora")
    assert lora[1] == "80.00 ± 1.41"  # mean 0.80, std (ddof=1) of 0.79, 0.81 = 0.01414
    assert lora[2] == "65.00 ± 7.07"
    assert lora[3] == "72.50"  # average of the task means
    assert lora[4] == "338.7k"
    assert lora[5] == "2"


def test_table_leaves_average_blank_when_a_task_is_missing(results):
    gora = _row(markdown_table(records_frame(json.loads(results.read_text()))), "gora")
    assert gora[1] == "83.00 ± 1.41"
    assert gora[2] == "—" and gora[3] == "—"
    assert gora[4] == "301.0k"


def test_write_report_writes_table_and_pngs(results, tmp_path):
    out = tmp_path / "report"
    written = write_report(results, out)
    assert set(written) == {"table", "accuracy", "ranks"}
    assert "80.00 ± 1.41" in written["table"].read_text()
    for key in ("accuracy", "ranks"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_rank_records_skips_heatmap(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([_record("lora", "rotten_tomatoes", 0, 0.8, 10)]))
    assert "ranks" not in write_report(path)
    assert (tmp_path / "table.md").is_file() and not (tmp_path / "gora_ranks.png").exists()


def test_report_on_missing_results_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="gora.bench grid"):
        write_report(tmp_path / "nothing.json")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert.encoder.layer.3.attention.self.query", (3, "attention.self.query")),
        ("bert.encoder.layer.11.output.dense", (11, "output.dense")),
        ("model.layers.0.self_attn.q_proj", (0, "self_attn.q_proj")),
        ("bert.pooler.dense", None),
        ("classifier", None),
    ],
)
def test_parse_module_name(name, expected):
    assert parse_module_name(name) == expected


def test_rank_matrix_is_layer_by_module_type_without_unlayered_modules():
    matrix = rank_matrix(RANKS)
    assert list(matrix.index) == [0, 1]
    assert list(matrix.columns) == ["attention.self.query", "output.dense"]
    assert matrix.loc[0, "output.dense"] == 12 and matrix.loc[1, "attention.self.query"] == 8


def test_table_warns_about_runs_collapsed_to_one_class(results):
    records = json.loads(results.read_text())
    for r in records:
        r["test_top_class_share"] = 1.0 if r["method"] == "gora" else 0.6
    table = markdown_table(records_frame(records))
    assert "Warning: 2 of 6 runs predict a single class" in table and "gora/rotten_tomatoes" in table
    records[4]["test_top_class_share"] = records[5]["test_top_class_share"] = 0.9
    assert "Warning" not in markdown_table(records_frame(records))


def test_rank_sweep_gets_one_row_per_method_and_rank():
    records = [{**_record("lora", "rotten_tomatoes", s, v, 1000 * r), "r": r}
               for r, v in ((2, 0.70), (8, 0.80)) for s in (0, 1)]
    records += [{**_record("full", "rotten_tomatoes", 0, 0.9, 10**6), "r": None}]
    table = markdown_table(records_frame(records))
    assert _row(table, "lora r=2")[1] == "70.00 ± 0.00" and _row(table, "lora r=8")[1] == "80.00 ± 0.00"
    assert _row(table, "full")[1] == "90.00 ± 0.00"
    assert "| lora |" not in table  # a method at one rank keeps its plain name (see the fixture tables above)


def test_protocol_2_records_get_one_row_per_arm_not_per_method():
    records = [{**_record("gora", "rotten_tomatoes", s, 0.8, 1), "arm": arm} for s in (0, 1)
               for arm in ("gora", "gora_gamma0")]
    table = markdown_table(records_frame(records))
    assert _row(table, "gora") and _row(table, "gora_gamma0")
