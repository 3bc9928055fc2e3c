"""Adaptive γ on the real MiniLM: time of the N estimation passes against the extra time of the γ search.

Sequence classification on Rotten Tomatoes (``gora.bench.tasks``), LoRA r = 8 on query/key/value/dense. Each round
runs ``estimate_gora`` three times, in turn: plain (fixed γ), adaptive γ with ``gamma_search="golden"`` and with
``"scan"``, on the same batches; the first round also runs both searches on a grid ten times wider (up to γ = 10),
whose minimum lies inside it. The search is timed by wrapping ``gora.api.search_gamma``; the passes' time is the
state's ``estimation_seconds``. Medians over the rounds; golden's held-out loss against the scan's best.

    nice -n 10 python benchmarks/adaptive_gamma/run.py --out benchmarks/results/cpu/adaptive-gamma
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from gora.bench.provenance import cpu_model  # noqa: E402


def _batches(texts: list[str], labels: list[int], tokenizer, batch_size: int, max_length: int) -> list[dict]:
    out = []
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                        padding="max_length", return_tensors="pt")
        out.append({**enc, "labels": torch.tensor(labels[start:start + batch_size])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu/adaptive-gamma")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--gamma-batches", type=int, default=4)
    args = parser.parse_args()

    import peft
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import gora.api
    from gora import GoraConfig, estimate_gora
    from gora.config import default_gamma_grid
    from gora.bench.assets import default_model_path
    from gora.bench.tasks import load_task

    started = time.perf_counter()
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the fresh classification head
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    task = load_task("rotten_tomatoes", max_train=args.num_steps * args.batch_size,
                     max_val=args.gamma_batches * args.batch_size)
    estimation = _batches(list(task.train["text"]), list(task.train["label"]), tokenizer, args.batch_size,
                          args.max_length)
    held_out = _batches(list(task.validation["text"]), list(task.validation["label"]), tokenizer, args.batch_size,
                        args.max_length)
    print(f"data and model ready after {time.perf_counter() - started:.0f}s: {len(estimation)} estimation and {len(held_out)} held-out batches", flush=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")

    search_seconds: list[float] = []
    original = gora.api.search_gamma

    def timed_search(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            search_seconds.append(time.perf_counter() - start)

    gora.api.search_gamma = timed_search
    wide = [10 * gamma for gamma in default_gamma_grid()]  # 10 ... 1e-4: holds a minimum beyond the default's 1
    arms = {"plain": {}, "golden": {"adaptive_gamma": True, "gamma_search": "golden"},
            "golden-wide": {"adaptive_gamma": True, "gamma_search": "golden", "gamma_grid": wide},
            "scan": {"adaptive_gamma": True, "gamma_search": "scan"},
            "scan-wide": {"adaptive_gamma": True, "gamma_search": "scan", "gamma_grid": wide}}
    timed = ("plain", "golden", "scan")  # every round; the wide-grid arms once (their losses are deterministic)
    records = []
    # warm-up call, not kept: pages, allocator, thread pools
    estimate_gora(model, lora, estimation[:2], gora_config=GoraConfig(num_steps=2, show_progress=False))
    for round_ in range(1, args.rounds + 1):
        for arm, extra in arms.items():
            if round_ > 1 and arm not in timed:
                continue
            config = GoraConfig(num_steps=args.num_steps, show_progress=False, **extra)
            search_seconds.clear()
            start = time.perf_counter()
            state = estimate_gora(model, lora, estimation, gora_config=config, eval_batches=held_out)
            wall = time.perf_counter() - start
            notes = state.notes.get("adaptive_gamma", {})
            record = {"round": round_, "arm": arm, "wall_seconds": wall, "passes_seconds": state.estimation_seconds,
                      "search_seconds": search_seconds[0] if search_seconds else 0.0, "gamma": state.gamma,
                      "losses_scored": len(notes.get("scan", {})) + (1 if notes else 0),
                      "baseline_loss": notes.get("baseline_loss"), "chosen_loss": notes.get("scan", {}).get(
                          str(state.gamma), notes.get("baseline_loss")), "init_stats": state.init_stats}
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "init_stats"}), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)  # what is done so far survives an interruption
            (Path(args.out) / "records.partial.json").write_text(json.dumps(records, indent=2))

    summary = {}
    for arm in arms:
        rows = [r for r in records if r["arm"] == arm]
        ratios = [r["search_seconds"] / r["passes_seconds"] for r in rows]
        summary[arm] = {"passes_seconds": statistics.median(r["passes_seconds"] for r in rows),
                        "search_seconds": statistics.median(r["search_seconds"] for r in rows),
                        "extra_fraction": statistics.median(ratios), "extra_fraction_range": [min(ratios), max(ratios)],
                        "gamma": rows[0]["gamma"], "losses_scored": rows[0]["losses_scored"],
                        "baseline_loss": rows[0]["baseline_loss"], "chosen_loss": rows[0]["chosen_loss"],
                        "relative_delta": rows[0]["init_stats"]["relative_delta"]}
    for suffix in ("", "-wide"):
        golden, scan = summary["golden" + suffix], summary["scan" + suffix]
        summary["golden_vs_scan_loss" + suffix] = (golden["chosen_loss"] - scan["chosen_loss"]) / abs(
            scan["chosen_loss"])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "commit": commit,
           "command": " ".join(["python"] + sys.argv), "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": env, "summary": summary, "records": records},
                                                 indent=2))
    lines = [f"MiniLM-L6 (seq-cls, Rotten Tomatoes), N = {args.num_steps} batches of {args.batch_size} x "
             f"{args.max_length} tokens, {args.gamma_batches} held-out batches; medians of {args.rounds} rounds.", "",
             "| arm | passes (s) | gamma search (s) | extra vs passes | losses scored | gamma | held-out loss "
             "(W0 -> chosen) | dW0/W0 |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        s = summary[arm]
        losses = (f"{s['baseline_loss']:.5f} -> {s['chosen_loss']:.5f}" if s["baseline_loss"] is not None else "-")
        extra = (f"{s['extra_fraction']:.1%} ({s['extra_fraction_range'][0]:.1%}..{s['extra_fraction_range'][1]:.1%})"
                 if arm != "plain" else "-")
        lines.append(f"| {arm} | {s['passes_seconds']:.2f} | {s['search_seconds']:.2f} | {extra} | "
                     f"{s['losses_scored'] or '-'} | {s['gamma']:g} | {losses} | {s['relative_delta']:.3g} |")
    lines += ["", "Extra time is the gamma search over the N passes (median; range over the rounds). The -wide arms "
              "search gamma in 1e-4..10 (the default grid times 10), once.", "",
              f"golden's chosen loss vs the scan's best: {summary['golden_vs_scan_loss']:+.4%} (default grid), "
              f"{summary['golden_vs_scan_loss-wide']:+.4%} (wide grid)"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "records.partial.json").unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
