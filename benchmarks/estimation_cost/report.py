"""Markdown table and PNG plot from the estimation-cost ``results.json``."""

from __future__ import annotations

import statistics
from pathlib import Path

GIB = 2**30
LABELS = {"floor": "floor (plain fwd+bwd)", "lora": "PEFT LoRA step (r=8)", "gora": "GoRA full",
          "gora_sketch": "GoRA sketch", "gora_ckpt": "GoRA full + grad. ckpt", "gora_offload": "GoRA full, CPU sums",
          "gora_ondevice": "GoRA full, device sums", "loraga": "PEFT LoRA-GA estimation",
          "official": "official-style (baseline)"}
TIME_TARGET, MEMORY_TARGET, THROUGHPUT_TARGET = 1.10, 1.10, 0.98


def _ok(records: list[dict], **match) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _peak(record: dict) -> int | None:
    """The memory the targets are about: CUDA allocator peak on a GPU, host peak RSS on the CPU."""
    return record.get("device_peak_bytes") if record["device"] == "cuda" else record.get("host_peak_rss_bytes")


def _fmt(value, digits=2, scale=1.0, suffix=""):
    return "–" if value is None else f"{value / scale:.{digits}f}{suffix}"


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def time_table(records: list[dict]) -> list[str]:
    rows = _ok(records, section="time")
    if not rows:
        return []
    first = rows[0]
    lines = [f"### Time: estimation vs the floor ({first['size']}, {first['weights']} weights, {first['data']} batches, "
             f"N={first['steps']}, batch {first['batch']}×{first['seq']}, {first['dtype']}, {first['device']})", "",
             "Floor = N plain forward+backward passes, same model, batches, mode and gradient-receiving weights, "
             "interleaved with the method in one process: ratio = median over rounds of method ÷ the floor run "
             "in the same round (rounds alternate the order: floor first, then method first), with its distribution-"
             "free 95 % interval where there are 6 rounds or more; `min` ratio = best method run ÷ best floor run. "
             "Drop-hook floor = the same passes with a hook "
             "that drops each target gradient once complete (what every streaming estimator must at least do). Loop only = "
             "GoRA's N passes without scoring, allocation and C (``GoraState.estimation_seconds``). Train-mode floor "
             "(PEFT LoRA-GA only, which runs its passes in train mode) = the floor with dropout on: median ratio and "
             "its 95 % interval.", "",
             "| method | rounds | method s | floor s | ratio (median) | 95 % interval | ratio (min) | ≤ 1.10 | "
             "loop only ÷ floor | ÷ drop-hook floor | ÷ train-mode floor | NaN/Inf probe / floor step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("time_ratio")
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {len(r['method_s'])} | "
                     f"{_fmt(statistics.median(r['method_s']))} | {_fmt(statistics.median(r['floor_s']))} | "
                     f"{_fmt(ratio, 3)} | {_interval(r)} | {_fmt(r.get('time_ratio_min'), 3)} | "
                     f"{_verdict(None if ratio is None else ratio <= TIME_TARGET)} | {_fmt(r.get('loop_ratio'), 3)} | "
                     f"{_fmt(r.get('time_ratio_vs_drop_floor'), 3)} | {_train_floor(r)} | "
                     f"{_fmt(r.get('finite_check_share'), 2, 0.01, ' %')} |")
    return lines + [""]


def _train_floor(record: dict) -> str:
    ratio = _fmt(record.get("time_ratio_vs_train_floor"), 3)
    interval = _interval(record, "time_ratio_vs_train_floor_interval")
    return ratio if interval == "–" else f"{ratio} ({interval})"


def scale_table(records: list[dict]) -> list[str]:
    rows = _ok(records, section="scale")
    if not rows:
        return []
    device = rows[0]["device"]
    mem = "device peak (CUDA allocator)" if device == "cuda" else "peak RSS (VmHWM over the phase)"
    lines = [f"### Memory and time vs model size ({rows[0]['dtype']}, {device}; batch {rows[0]['batch']}×{rows[0]['seq']})",
             "", f"Memory = {mem}, model weights included. Targets: " + (
                 "sums offloaded to the CPU, and sketch, ≤ 1.00 × LoRA (GoRA full with its sums on the GPU: none)."
                 if device == "cuda" else "sketch ≤ 1.10 × LoRA; full ≤ 1.10 × LoRA + 4 B × target parameters."), "",
             "| size | params | target params | method | N | memory GiB | ÷ LoRA | target | host peak GiB | "
             "s/step | ÷ floor (median) | rounds | 95 % interval |", "|---" * 13 + "|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        lora = next((r for r in rows if r["size"] == size and r["method"] == "lora"), None)
        lora_peak = _peak(lora) if lora else None
        for r in sorted((r for r in rows if r["size"] == size), key=lambda r: (r["steps"], r["method"])):
            peak = _peak(r)
            ratio = peak / lora_peak if peak and lora_peak else None
            lines.append(f"| {size} | {r['params'] / 1e6:.0f}M | {r['target_params'] / 1e6:.0f}M | "
                         f"{LABELS.get(r['method'], r['method'])} | {r['steps']} | {_fmt(peak, 2, GIB)} | "
                         f"{_fmt(ratio, 3)} | {_verdict(_memory_target(r, peak, lora_peak))} | "
                         f"{_fmt(r.get('host_peak_rss_bytes'), 2, GIB)} | {_fmt(r.get('step_s'), 3)} | "
                         f"{_fmt(r.get('time_ratio'), 3)} | {len(r.get('floor_s') or []) or '–'} | {_interval(r)} |")
    return lines + [""]


def _interval(record: dict, key: str = "time_ratio_interval") -> str:
    """The distribution-free 95 % interval of a median time ratio, or a dash under 6 rounds."""
    interval = record.get(key)
    return "–" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _memory_target(record: dict, peak: int | None, lora_peak: int | None) -> bool | None:
    """The issue's memory targets. GPU: the CUDA peak with the sums offloaded (and the sketch, whose sums are small)
    ≤ one LoRA step's; GoRA full with its sums on the GPU has no target there. CPU: sketch ≤ 1.10 × LoRA, full
    ≤ 1.10 × LoRA + 4 B per target parameter."""
    if not peak or not lora_peak:
        return None
    if record["device"] == "cuda":
        return peak <= lora_peak if record["method"] in ("gora_offload", "gora_sketch") else None
    if record["method"] == "gora_sketch":
        return peak <= MEMORY_TARGET * lora_peak
    if record["method"] in ("gora", "gora_ondevice") or (record["method"] == "gora_offload" and record["device"] == "cpu"):
        return peak <= MEMORY_TARGET * lora_peak + 4 * record["target_params"]
    return None


def throughput_table(records: list[dict]) -> list[str]:
    rows = _ok(records, section="throughput")
    if not rows:
        return []
    lines = ["### Training throughput: GoRA PeftModel vs PEFT LoRA (same budget, AdamW)", "",
             "Steps/s = 1 / median step time over single steps alternated LoRA, GoRA (order flipped every round). "
             "Paired ratio = median over adjacent pairs of LoRA step time ÷ GoRA step time.", "",
             "| size | batch | steps each | LoRA steps/s | GoRA steps/s | ratio (medians) | ratio (paired) | "
             "ratio (best) | ≥ 0.98 | GoRA ranks | trainable LoRA / GoRA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["trainable_params"]
        lines.append(f"| {r['size']} | {r['batch']}×{r['seq']} | {r['train_steps']} | {r['lora_steps_per_s']:.3f} | "
                     f"{r['gora_steps_per_s']:.3f} | {r['throughput_ratio']:.3f} | "
                     f"{_fmt(r.get('throughput_ratio_paired'), 3)} | {r['throughput_ratio_best']:.3f} | "
                     f"{_verdict(r['throughput_ratio'] >= THROUGHPUT_TARGET)} | {r['gora_rank_range']} | "
                     f"{t['lora']:,} / {t['gora']:,} |")
    return lines + [""]


def ranks_table(records: list[dict]) -> list[str]:
    rows = _ok(records, section="ranks")
    if not rows:
        return []
    r = rows[0]
    lines = [f"### Full vs sketch ranks ({r['size']}, {r['weights']} weights, {r['data']} batches, N={r['steps']}, "
             f"batch {r['batch']}×{r['seq']}, {r['target_layers']} layers)", "",
             "| comparison | Spearman (importance) | equal ranks | within ±1 | mean abs diff | max diff |",
             "|---|---|---|---|---|---|"]
    shown = set()
    for name, a in r["agreement"].items():
        first, _, second = name.partition("_vs_")
        if (second, first) in shown:  # the same pair the other way round
            continue
        shown.add((first, second))
        lines.append(f"| {name} | {a['spearman_importance']:.3f} | {a['equal_ranks']:.2f} | {a['within_one']:.2f} | "
                     f"{a['mean_abs_rank_diff']:.2f} | {a['max_abs_rank_diff']} |")
    lines += ["", "Estimation seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()), ""]
    return lines


def failures(records: list[dict]) -> list[str]:
    bad = [r for r in records if r.get("status") != "ok"]
    if not bad:
        return []
    return ["### Not measured", ""] + [f"- {r['section']} {r['method']} {r['size']} N={r['steps']}: {r['status']}: "
                                       f"{r.get('error', '')[:300]}" for r in bad] + [""]


COLORS = {"lora": "black", "floor": "grey", "gora": "tab:blue", "gora_sketch": "tab:green", "gora_ckpt": "tab:cyan",
          "gora_offload": "tab:purple", "gora_ondevice": "tab:blue", "loraga": "tab:orange", "official": "tab:red"}


def _plain_log_ticks(axis, at: list[float] | None) -> None:
    """Label a log axis in plain numbers: major ticks ``at`` the given values (else at 1, 2, 5 × 10^k), minor ones
    unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(FixedLocator(at) if at else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}" if value < 100 else f"{value:.0f}"))
    axis.set_minor_formatter(NullFormatter())


def plot(out: Path, records: list[dict]) -> Path | None:
    rows = _ok(records, section="scale")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = dict.fromkeys(r["size"] for r in rows)
    counts = {size: len({r["steps"] for r in rows if r["size"] == size}) for size in sizes}
    sweep_size = max(counts, key=counts.get)  # the size measured at the most values of N
    fig, axes = plt.subplots(1, 3 if counts[sweep_size] > 1 else 2, figsize=(16 if counts[sweep_size] > 1 else 11, 4.8))
    base_n = statistics.mode([r["steps"] for r in rows])
    for method in dict.fromkeys(r["method"] for r in rows):
        style = {"color": COLORS.get(method), "label": LABELS.get(method, method)}
        points = sorted((r["params"], _peak(r), r.get("time_ratio"), r.get("time_ratio_interval")) for r in rows
                        if r["method"] == method and r["steps"] == base_n and _peak(r))
        if not points:
            continue
        axes[0].plot([p[0] / 1e6 for p in points], [p[1] / GIB for p in points], "o-", **style)
        timed = [p for p in points if p[2] is not None]
        if timed:  # error bars: the 95 % interval of the median ratio, where there were 6 rounds or more
            low = [p[2] - p[3][0] if p[3] else 0.0 for p in timed]
            high = [p[3][1] - p[2] if p[3] else 0.0 for p in timed]
            axes[1].errorbar([p[0] / 1e6 for p in timed], [p[2] for p in timed], yerr=[low, high], fmt="o-",
                             capsize=3, **style)
    device = rows[0]["device"]
    rounds = sorted({len(r["floor_s"]) for r in rows if r.get("floor_s")})
    rounds_text = ("one round each: noisy" if rounds == [1] else
                   f"median of {'/'.join(map(str, rounds))} rounds, 95 % CI")
    axes[0].set(xscale="log", yscale="log", xlabel="model parameters (M)",
                ylabel="peak device memory (GiB)" if device == "cuda" else "peak RSS (GiB)",
                title=f"Peak memory, N={base_n} ({rows[0]['dtype']}, {device})")
    axes[1].axhline(TIME_TARGET, color="grey", ls="--", lw=1)
    axes[1].set(xscale="log", xlabel="model parameters (M)", ylabel="time ÷ floor (N fwd+bwd)",
                title=f"Time ÷ floor ({rounds_text})")
    measured = sorted({r["params"] / 1e6 for r in rows})
    for ax in axes[:2]:  # ticks at the measured sizes, in plain numbers (log-scale minor labels overlap)
        _plain_log_ticks(ax.xaxis, measured)
    _plain_log_ticks(axes[0].yaxis, None)
    if counts[sweep_size] > 1:
        for method in ("lora", "gora", "gora_sketch", "official"):
            points = sorted((r["steps"], r.get("host_peak_rss_bytes"), _peak(r)) for r in rows
                            if r["method"] == method and r["size"] == sweep_size and r.get("host_peak_rss_bytes"))
            if points:
                axes[2].plot([p[0] for p in points], [p[1] / GIB for p in points], "o-", color=COLORS[method],
                             label=f"{LABELS[method]}, host RSS")
                if device == "cuda":
                    axes[2].plot([p[0] for p in points], [p[2] / GIB for p in points], "s--", color=COLORS[method],
                                 alpha=0.6, label=f"{LABELS[method]}, device")
        axes[2].set(xlabel="N (batches)", ylabel="peak memory (GiB)", title=f"Peak memory vs N ({sweep_size})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "cost_vs_size.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(out: Path, data: dict | list) -> str:
    records = data["records"] if isinstance(data, dict) else data
    env = data.get("environment", {}) if isinstance(data, dict) else {}
    header = ["## Estimation cost", ""]
    threads = sorted({r["threads"] for r in records if "threads" in r})
    if env:
        kept = f" ({env['records_kept']})" if env.get("records_kept") else ""
        header += [f"{env.get('date')}{kept}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
                   f"peft {env.get('peft')}; {env.get('gpu') or env.get('cpu')} ({env.get('cpu_count')} CPUs, "
                   f"{'/'.join(map(str, threads))} torch thread(s) per worker); load average at start "
                   f"{[round(x, 2) for x in env.get('load_average', [])]}.", ""]
    for run in data.get("earlier_runs", []) if isinstance(data, dict) else []:
        header += [f"Records from an earlier run ({run.get('records_kept', 'see results.json')}): {run.get('date')}, "
                   f"load average at start {[round(x, 2) for x in run.get('load_average', [])]}, "
                   f"{run.get('total_s', 0) / 60:.1f} min.", ""]
    if env.get("note"):
        header += [f"Note: {env['note']}.", ""]
    text = "\n".join(header + time_table(records) + scale_table(records) + throughput_table(records)
                     + ranks_table(records) + failures(records))
    (out / "table.md").write_text(text)
    plot(out, records)
    return text
